//! A VM's life as the scheduler drives it: provisioning, the state machine's transitions
//! ([`super::vm::next`] is the only writer of a VM's state), timers, teardown and its
//! retries, and the pools' back-off after failures of the host.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use tracing::{debug, error, info, warn};

use super::event::{Event, spawn_reporting};
use super::provision::{self, Plan, ProvisionError, Provisioned, TeardownOutcome};
use super::vm::{self, Input};
use super::{Scheduler, Work};
use crate::config::PoolConfig;
use crate::github::GitHub;
use crate::hypervisor::{self, Hypervisor};
use crate::metrics::{self, ReasonLabels, StepLabels};
use crate::model::{JobState, Reason, VmRec, VmState};
use crate::timeline::Mark;

const BACKOFF_MIN: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A failed teardown is tried again after this, doubling with each failure in a row up to
/// [`TEARDOWN_RETRY_MAX`] (a runner GitHub keeps busy, its job not yet failed after its VM
/// died, is asked about for minutes: not six times a minute).
const TEARDOWN_RETRY: Duration = Duration::from_secs(10);
const TEARDOWN_RETRY_MAX: Duration = Duration::from_secs(300);
/// A teardown GitHub's rate limit held back is retried once the limit lifts (waiting an
/// hour at most), but never sooner than this after it failed, doubling with each failure
/// in a row up to [`RATE_LIMIT_RETRY_FLOOR`] (not far past a limit answered again and
/// again).
const RATE_LIMIT_RETRY_MIN: Duration = Duration::from_secs(1);
const RATE_LIMIT_RETRY_FLOOR: Duration = Duration::from_secs(60);
const RATE_LIMIT_WAIT_MAX: Duration = Duration::from_secs(3600);

/// Up to a second, the same for a VM each time: what spreads the retries of teardowns a
/// rate limit held back over the second it lifts (deterministic, for the simulator).
fn spread(vm: &str) -> Duration {
    let hash = vm.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    Duration::from_millis(hash % 1000)
}

/// When a teardown that failed (its `failures`th in a row) is tried again. One that
/// failed only because GitHub's rate limit held its calls back (`rate_limited`: the limit's
/// wait) is tried as the limit lifts (a back-off from 10 s would leave a registration up
/// to [`TEARDOWN_RETRY_MAX`] after a long limit lifted), spread over a second by `vm` so
/// that the teardowns it held do not call at once, and never sooner than a back-off from
/// 1 s (a limit answered with no wait is not hammered); any other after a back-off.
fn teardown_retry(failures: u32, rate_limited: Option<Duration>, vm: &str) -> Duration {
    let doubled = |from: Duration| from.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(TEARDOWN_RETRY_MAX);
    match rate_limited {
        Some(wait) => {
            wait.min(RATE_LIMIT_WAIT_MAX).max(doubled(RATE_LIMIT_RETRY_MIN).min(RATE_LIMIT_RETRY_FLOOR)) + spread(vm)
        }
        None => doubled(TEARDOWN_RETRY),
    }
}

/// Back-offs by key (a pool's name), each doubling from [`BACKOFF_MIN`] up to
/// [`BACKOFF_MAX`] with each failure until cleared.
#[derive(Debug, Default)]
pub struct Backoffs(BTreeMap<String, (Instant, Duration)>);

impl Backoffs {
    /// Whether `key` backs off at `now`.
    pub fn active(&self, key: &str, now: Instant) -> bool {
        self.0.get(key).is_some_and(|(until, _)| *until > now)
    }

    /// One more failure of `key`: it backs off twice as long as last time; the delay.
    pub fn bump(&mut self, key: &str, now: Instant) -> Duration {
        self.bump_within(key, now, BACKOFF_MIN, BACKOFF_MAX)
    }

    /// [`Backoffs::bump`] from `min` up to `max`.
    pub fn bump_within(&mut self, key: &str, now: Instant, min: Duration, max: Duration) -> Duration {
        let delay = self.0.get(key).map(|(_, d)| (*d * 2).min(max)).unwrap_or(min);
        self.0.insert(key.to_string(), (now + delay, delay));
        delay
    }

    /// Whether a back-off ran out after `since`, by `now`.
    pub fn ended_between(&self, since: Instant, now: Instant) -> bool {
        self.0.values().any(|(until, _)| *until > since && *until <= now)
    }

    /// `key` works again: its next failure backs off from scratch.
    pub fn clear(&mut self, key: &str) {
        self.0.remove(key);
    }
}

#[derive(Default)]
pub struct State {
    /// Pool-level back-off after failures of the host (provisioning errors, VMs paused on
    /// a full disk), until a VM of the pool has its runner online.
    pub(super) backoff: Backoffs,
    /// When each surplus runner became surplus (see [`super::demand::plan`]).
    pub surplus_since: BTreeMap<String, Instant>,
}

/// The label set of a provisioning failure at `step`.
fn step(pool: &str, step: &str) -> StepLabels {
    StepLabels::new(pool, step)
}

impl State {
    pub fn backing_off(&self, pool: &str, now: Instant) -> bool {
        self.backoff.active(pool, now)
    }
}

impl<G: GitHub, H: Hypervisor> Scheduler<G, H> {
    /// Applies `input` to the VM's state through [`vm::next`]; false if it changes nothing.
    pub(super) fn transition(&mut self, name: &str, input: Input) -> bool {
        let now = self.now();
        let Some(vm) = self.book.vms.get_mut(name) else {
            return false;
        };
        let Some(s) = vm::next(vm.state, input) else {
            return false;
        };
        debug!(vm = %name, from = vm.state.as_str(), to = s.as_str(), ?input, "vm state");
        if matches!(input, Input::RunnerOnline | Input::TookJob) {
            // The pool works end to end (a VM that merely started may still pause on a
            // full disk or never boot): failures back off from scratch again.
            self.lifecycle.backoff.clear(&vm.pool);
        }
        vm.state = s;
        vm.state_since = now;
        self.book.touch_vm(name);
        let mark = match input {
            Input::GuestReady => Some(Mark::Ready),
            Input::RunnerOnline | Input::TookJob => Some(Mark::Online),
            Input::JobCompleted => Some(Mark::Completed),
            _ => None,
        };
        if let Some(mark) = mark {
            let vm = &self.book.vms[name];
            self.timeline.mark(vm, self.queued_at(vm), mark, now);
        }
        true
    }

    /// Says so when job `job_id` gets another VM while its own VM's runner is busy with a
    /// job nothing named: its hold (`Book::taken_unheard`) ran out, that runner most likely
    /// took another job.
    pub(super) fn say_if_held_before(&self, job_id: u64) {
        if let Some(busy) = self.book.vms.values().find(|v| v.job_id == job_id && v.is_busy_unnamed()) {
            info!(job_id, vm = %busy.name, "the job's own runner went busy with a job still not named; the job gets another VM");
        }
    }

    /// When the job `vm` serves (the one its runner took, else the one it was made or
    /// bound for) reached the agent.
    pub(super) fn queued_at(&self, vm: &VmRec) -> Option<SystemTime> {
        self.book.jobs.get(&vm.took_job.unwrap_or(vm.job_id)).map(|j| j.received_at)
    }

    /// Whether the VM's provisioning or save is under way: a libvirt call that cannot be
    /// called back (it may still make its domain, or its saved state).
    pub(super) fn in_call(&self, name: &str) -> bool {
        matches!(
            (self.book.vms.get(name).map(|v| v.state), self.work.get(name)),
            (Some(VmState::Provisioning), Some(Work::Provisioning(_))) | (Some(VmState::Saving), Some(Work::Saving(_)))
        )
    }

    /// Tears a VM down for `reason`: now, or once its provisioning or save reports.
    pub(super) fn reap(&mut self, name: &str, reason: Reason) {
        let in_call = self.in_call(name);
        let Some(vm) = self.book.vms.get_mut(name) else {
            return;
        };
        if in_call {
            if vm.reap.is_none() {
                info!(vm = %name, reason = %reason.as_str(), "vm will be torn down once its provisioning or save reports");
                vm.reap = Some(reason);
                self.book.touch_vm(name);
            }
            return;
        }
        if vm.state == VmState::TearingDown && matches!(self.work.get(name), Some(Work::TearingDown { .. })) {
            return;
        }
        self.begin_teardown(name, reason);
    }

    /// Moves the VM to `TearingDown` for `reason`, counts a failed attempt for its job if it
    /// never took one, and spawns the teardown.
    pub(super) fn begin_teardown(&mut self, name: &str, reason: Reason) {
        self.begin_teardown_asking(name, reason, None);
    }

    /// [`Self::begin_teardown`], asking GitHub about the VM's runner before destroying it
    /// if `runner_first` says so (`None`: as `reason` and the VM's state say).
    pub(super) fn begin_teardown_asking(&mut self, name: &str, reason: Reason, runner_first: Option<bool>) {
        let Some(vm) = self.book.vms.get(name) else { return };
        let before = vm.clone();
        self.timeline.reaping(&before, reason, self.now());
        let input = if before.state == VmState::Provisioning { Input::ProvisionFailed } else { Input::Reap };
        if before.state != VmState::TearingDown && !self.transition(name, input) {
            error!(vm = %name, state = before.state.as_str(), reason = %reason.as_str(), "cannot tear down a vm in this state");
            return;
        }
        if let Some(Work::Provisioning(task) | Work::Binding(task) | Work::Watching(task) | Work::Saving(task)) =
            self.work.remove(name)
        {
            // A binding, watch or save whose deadline passed (or the VM is gone): what it
            // would still do, the teardown and the sweep undo. (A provisioning under way is
            // never aborted: `reap` waits for its report.)
            task.abort();
        }
        let early = matches!(reason, Reason::Stopped | Reason::RegistrationTimeout);
        if (before.is_unbound_warm() || before.for_slot) && early {
            // No job is hurt, but a pool whose warm VMs die must not boot them for ever.
            warn!(vm = %name, pool = %before.pool, reason = %reason.as_str(), "warm vm failed before it could serve a job");
            self.bump_backoff(&before.pool);
        }
        if let Some(slot) = &before.slot
            && matches!(before.state, VmState::Warming | VmState::Waiting | VmState::Binding)
            && (early || reason == Reason::BindFailed)
        {
            // A restored guest that never waits or never takes its command: the slot's
            // saved state is at fault, not the job (which boots cold).
            warn!(vm = %name, slot = %slot, reason = %reason.as_str(), "vm restored from a snapshot slot failed before its runner started: the slot is made again");
            self.slot_failed(&before, slot);
        }
        // A runner we do not know busy may have taken a job unseen (while the agent was
        // down, or its webhook is late): asked first, and a busy one keeps its VM. So may a
        // runner whose binding is under way (its command may be delivered, its runner
        // online): a job any runner takes went to it while its domain was destroyed
        // (simulator seed 8897 of 2,000 steps). So may one whose binding failed after its
        // command may have reached the guest (the delivery's acknowledgement lost, then the
        // check of its port failed; a binding past its backstop): it ran its job's runner,
        // destroyed mid-job (simulator seed 111830 of 665 steps). A binding that failed
        // before its delivery says so (`BindError::may_have_reached_guest`).
        let runner_first = runner_first.unwrap_or(matches!(
            (reason, &before.state),
            (Reason::Surplus, VmState::Idle | VmState::Booting | VmState::Binding)
                | (Reason::RegistrationTimeout, VmState::Booting)
                | (Reason::BindFailed, VmState::Binding)
        ));
        // A VM that died or stalled before any runner on it took a job is a failed attempt,
        // counted now (the job's next VM is made meanwhile); one whose runner may be busy
        // gives it back if GitHub says so, and its job is not given up until it is known.
        // (A VM with no runner of its own, `runner_done`, is not asked about.)
        let asks = runner_first && before.has_runner();
        let charged = vm::counts_as_failure(&before, reason) && self.charge_attempt(&before, reason.as_str(), asks);
        if let Some(vm) = self.book.vms.get_mut(name) {
            vm.reap = Some(reason);
            vm.charged |= charged && asks;
        }
        self.book.touch_vm(name);
        self.lifecycle.surplus_since.remove(name);
        self.metrics.teardowns.get_or_create(&ReasonLabels::new(reason.as_str())).inc();
        info!(vm = %name, pool = %before.pool, job_id = before.job_id, reason = %reason.as_str(), "tearing down vm");
        self.spawn_teardown(name, runner_first);
    }

    /// Counts a failed attempt of `vm`'s job, if it is still queued (returns whether it
    /// did); the job is given up once its pool's `max_attempts` have failed (`asking`: once
    /// `vm`'s teardown has found its runner not busy, [`Self::give_up_if_spent`]).
    fn charge_attempt(&mut self, vm: &VmRec, why: &str, asking: bool) -> bool {
        let Some(job) = self.book.jobs.get_mut(&vm.job_id).filter(|j| j.state == JobState::Queued) else {
            return false;
        };
        job.failed_vms += 1;
        let id = job.info.id;
        let max = self.config.max_attempts(&vm.pool);
        warn!(job_id = id, vm = %vm.name, reason = why, attempt = job.failed_vms, max_attempts = max, "vm failed before taking a job");
        self.book.touch_job(id);
        if !asking {
            self.give_up_if_spent(id, &vm.pool, why);
        }
        true
    }

    /// Gives job `id` up if it is still queued and its pool's `max_attempts` have failed,
    /// unless a teardown still asks GitHub about the runner of a VM charged to it (which
    /// may be running it: its attempt would be given back).
    fn give_up_if_spent(&mut self, id: u64, pool: &str, why: &str) {
        if self.book.charged_to(id) {
            return;
        }
        let max = self.config.max_attempts(pool);
        let Some(job) = self.book.jobs.get_mut(&id).filter(|j| j.state == JobState::Queued && j.failed_vms >= max)
        else {
            return;
        };
        job.state = JobState::Abandoned { reason: format!("{} VMs failed ({why})", job.failed_vms) };
        self.metrics.jobs_failed.get_or_create(&metrics::pool(pool)).inc();
        error!(job_id = id, run_id = job.info.run_id, repository = %job.info.repository, pool = %pool, attempts = job.failed_vms, "job given up: its VMs keep failing; check the pool's image and the console logs");
        self.book.touch_job(id);
    }

    fn spawn_teardown(&mut self, name: &str, runner_first: bool) {
        let Some(vm) = self.book.vms.get(name).cloned() else { return };
        let failures = match self.work.get(name) {
            Some(Work::TeardownRetry { failures, .. }) => *failures,
            _ => 0,
        };
        self.work.insert(name.to_string(), Work::TearingDown { failures, runner_first });
        let ctx = self.ctx.clone();
        let (n, failed) = (name.to_string(), name.to_string());
        spawn_reporting(
            &self.ctx.events,
            async move { Event::TornDown { vm: n, outcome: provision::teardown(ctx, vm, runner_first).await } },
            move |message| {
                let mut outcome = TeardownOutcome::default();
                outcome.failed(message);
                Event::TornDown { vm: failed, outcome }
            },
        );
    }

    /// A teardown waiting out its back-off (of `vm`, or every one) is tried again now: what
    /// made it fail may be over (libvirt is back; the job's end freed its runner).
    pub(super) fn retry_teardowns_now(&mut self, vm: Option<&str>) {
        let now = Instant::now();
        for (name, w) in self.work.iter_mut() {
            if let Work::TeardownRetry { at, .. } = w
                && vm.is_none_or(|v| v == name)
            {
                *at = (*at).min(now);
            }
        }
    }

    /// Teardowns whose retry is due, and teardowns a restart left unfinished.
    pub(super) fn retry_teardowns(&mut self) {
        let now = Instant::now();
        let due: Vec<(String, bool)> = self
            .book
            .vms
            .values()
            .filter(|v| v.state == VmState::TearingDown)
            .filter(|v| match self.work.get(&v.name) {
                None => true,
                Some(Work::TeardownRetry { at, .. }) => *at <= now,
                Some(_) => false,
            })
            // A teardown that asked GitHub about its runner first asks again: it stopped
            // there when GitHub did not answer. One a restart left unfinished asks first if
            // its reason may (what its first try did is not kept).
            .map(|v| {
                let runner_first = match self.work.get(&v.name) {
                    Some(Work::TeardownRetry { runner_first, .. }) => *runner_first,
                    _ => {
                        matches!(v.reap, Some(Reason::Surplus | Reason::RegistrationTimeout | Reason::BindFailed))
                            && !v.runner_done
                    }
                };
                (v.name.clone(), runner_first)
            })
            .collect();
        for (name, runner_first) in due {
            self.spawn_teardown(&name, runner_first);
        }
    }

    pub(super) fn on_torn_down(&mut self, name: String, outcome: TeardownOutcome) {
        let (failed_before, runner_first) = match self.work.remove(&name) {
            Some(Work::TearingDown { failures, runner_first }) => (failures, runner_first),
            _ => (0, false),
        };
        if outcome.aborted_busy {
            if self.transition(&name, Input::KeptBusy)
                && let Some(vm) = self.book.vms.get_mut(&name)
            {
                let reason = vm.why();
                vm.reap = None;
                info!(vm = %name, reason, "its runner turned out busy at GitHub: the vm is kept");
                if std::mem::take(&mut vm.charged) {
                    // It did not fail: the attempt it was charged is given back.
                    let id = vm.job_id;
                    if let Some(job) = self.book.jobs.get_mut(&id) {
                        job.failed_vms = job.failed_vms.saturating_sub(1);
                        self.book.touch_job(id);
                    }
                }
            }
            return;
        }
        if outcome.runner_idle
            && let Some(vm) = self.book.vms.get_mut(&name).filter(|v| v.charged)
        {
            // Its runner was not busy: the attempt it was charged stands, whether or not
            // the rest of the teardown did.
            vm.charged = false;
            let (id, pool, why) = (vm.job_id, vm.pool.clone(), vm.why());
            self.book.touch_vm(&name);
            self.give_up_if_spent(id, &pool, why);
        }
        // Its runner still busy at GitHub once all of the host's was gone: the VM holds
        // nothing of the host's, and its record goes with the place it holds under the
        // caps (a job that took its runner's credentials out of its VM could keep the runner
        // busy for days: helper-67). The sync deletes the runner once it is not busy
        // (`late_runners`, watched while it is); GitHub removes an ephemeral one once its
        // job ends.
        let host_freed = outcome.busy_after_host && outcome.errors.len() == 1;
        if outcome.errors.is_empty() || host_freed {
            self.metrics.teardown_seconds.observe(outcome.duration.as_secs_f64());
            let now = self.now();
            if let Some(vm) = self.book.remove_vm(&name) {
                match host_freed {
                    false => {
                        info!(vm = %name, pool = %vm.pool, job_id = vm.job_id, duration_ms = outcome.duration.as_millis() as u64, "vm torn down: domain, volumes and runner registration gone")
                    }
                    true => {
                        info!(vm = %name, pool = %vm.pool, job_id = vm.job_id, "vm torn down: domain and volumes gone; its runner is still busy at GitHub and is deleted once it is not")
                    }
                }
                self.timeline.gone(&vm, now);
                if vm.charged {
                    // No busy runner turned up before it went (one a guest registers
                    // itself was not found; a restart's retry did not ask): the attempt it
                    // was charged stands.
                    self.give_up_if_spent(vm.job_id, &vm.pool, vm.why());
                }
                if (vm.runner_id.is_none() && vm.has_runner()) || host_freed {
                    // Registered by its guest (a registration token), its runner may show
                    // up after the teardown looked for it; or it is busy still.
                    self.sync.watch_late_runner(&name, Instant::now());
                    self.save_late_runners();
                }
                // Its domain was the slot's: a listing from before says nothing of it.
                if let Some(slot) = &vm.slot {
                    self.sweep.torn_down(slot, now);
                }
            }
            self.sweep.torn_down(&name, now);
        } else {
            let failures = failed_before + 1;
            let delay = teardown_retry(failures, outcome.only_rate_limited(), &name);
            for e in &outcome.errors {
                self.metrics.teardown_failures.inc();
                warn!(vm = %name, error = %e, retry_in_s = delay.as_secs(), "teardown step failed; will retry");
            }
            // A runner found not busy (and deleted) is not asked about again: the retry
            // destroys first.
            let runner_first = runner_first && !outcome.runner_idle;
            self.work.insert(name, Work::TeardownRetry { at: Instant::now() + delay, failures, runner_first });
        }
    }

    /// Every VM whose timer ran out (registration, lifetime, finishing, provisioning) goes.
    pub(super) fn expire_timers(&mut self) {
        let now = self.now();
        let timers = vm::Timers {
            stop_grace: self.config.reconcile.stop_grace,
            provision_timeout: self.config.reconcile.provision_timeout,
        };
        let expired: Vec<(String, String, Reason)> = self
            .book
            .vms
            .values()
            .filter_map(|v| {
                let pool = self.config.pool(&v.pool)?;
                vm::expired(v, pool, timers, now).map(|r| (v.name.clone(), v.pool.clone(), r))
            })
            // A provisioning or save a restart cut short has no call to wait for: the first
            // sweep adopts or removes it, whatever its age.
            .filter(|(name, _, r)| *r != Reason::ProvisionTimeout || self.in_call(name))
            .collect();
        for (name, pool, reason) in expired {
            match self.book.vms.get_mut(&name) {
                // Counted once; the VM goes once its call returns (see `reap`).
                Some(vm) if reason == Reason::ProvisionTimeout => {
                    if vm.reap == Some(Reason::ProvisionTimeout) {
                        continue;
                    }
                    // Whatever it was to go for before (surplus, say), it timed out.
                    vm.reap = Some(Reason::ProvisionTimeout);
                    let what = if vm.state == VmState::Saving { "a snapshot slot's save" } else { "provisioning" };
                    self.book.touch_vm(&name);
                    self.metrics.provision_failures.get_or_create(&step(&pool, "timeout")).inc();
                    error!(vm = %name, pool = %pool, timeout_secs = timers.provision_timeout.as_secs(), "{what} did not finish in time (reconcile.provision_timeout): the vm is torn down once its libvirt call returns, holding its place until then (the call may still make its domain or saved state); a job stays queued");
                    self.bump_backoff(&pool);
                }
                _ => self.reap(&name, reason),
            }
        }
    }

    /// Records a new VM for `job_id`, commits it, and only then spawns its provisioning:
    /// a crash from there on is recovered by name. If the record cannot be committed,
    /// nothing is made.
    pub(super) fn start_provision(&mut self, job_id: u64, pool: &PoolConfig) {
        let now = self.now();
        let Some(job) = self.book.jobs.get_mut(&job_id) else {
            return;
        };
        // In a fleet the attempt is counted fleet-wide by the claim: names stay unique.
        job.vms_made = match self.fleet.as_mut() {
            Some(fleet) => {
                let Some(attempt) = fleet.serving(job_id, Instant::now()) else { return };
                fleet.used(job_id);
                attempt
            }
            None => job.vms_made + 1,
        };
        let name = hypervisor::vm_name(&pool.name, job_id, job.vms_made);
        let mut vm = VmRec {
            job_id,
            run_id: job.info.run_id,
            repository: job.info.repository.clone(),
            job_url: job.info.html_url.clone(),
            ..VmRec::new(name.clone(), &pool.name, false, now)
        };
        let (workflow, job_name) = (job.info.workflow_name.clone(), job.info.name.clone());
        let (run_id, repository) = (job.info.run_id, job.info.repository.clone());
        // No warm VM waits for it: a saved slot serves it next, unless a restore failed it.
        if !self.warm.cold_only.contains(&job_id) && pool.snapshot_slots > 0 {
            // The image may have been replaced since the last sweep: a slot made from the
            // old one must not be restored over a disk that changed under it.
            self.refresh_slot_source(pool);
            vm.slot = self.free_slots(&pool.name).into_iter().next();
        }
        let restoring = vm.slot.is_some();
        self.say_if_held_before(job_id);
        match &vm.slot {
            Some(slot) => {
                info!(job_id, run_id, repository = %repository, pool = %pool.name, vm = %name, slot = %slot, "restoring a vm from a snapshot slot")
            }
            None => info!(job_id, run_id, repository = %repository, pool = %pool.name, vm = %name, "provisioning vm"),
        }
        let plan = self.plan(vm.clone(), pool, workflow, job_name);
        self.book.touch_job(job_id);
        // A restored runner counts once bound (`warm.rs`): a failed restore goes cold.
        if self.launch(vm, plan) && !restoring {
            self.metrics.job_runners.get_or_create(&metrics::PathLabels::new(&pool.name, "cold")).inc();
        }
    }

    /// What a provisioning or binding task needs to make `vm` a runner of `pool`.
    pub(super) fn plan(&self, vm: VmRec, pool: &PoolConfig, workflow: String, job_name: String) -> Plan {
        Plan {
            slot: vm.slot.as_ref().and_then(|s| self.book.slots.get(s)).cloned(),
            made_from: None,
            vm,
            pool: pool.clone(),
            labels: pool.labels.clone(),
            runner_group_id: self.sync.runner_group_id.unwrap_or(1),
            workflow,
            job_name,
        }
    }

    /// Whether a VM name is one this agent holds: a VM's of the book (a new one's record
    /// would overwrite it, its volumes taken for stale ones) or a late runner's it still
    /// watches (a runner still registered under it).
    pub(super) fn name_taken(&self, name: &str) -> bool {
        self.book.vms.contains_key(name) || self.sync.watches_late_runner(name)
    }

    /// Records `vm`, commits it, and only then spawns its provisioning. False (nothing
    /// made, the pool backs off) if the record cannot be committed.
    pub(super) fn launch(&mut self, vm: VmRec, plan: Plan) -> bool {
        let name = vm.name.clone();
        let (pool, job_id) = (vm.pool.clone(), vm.job_id);
        // Names are made so that this never happens ([`Self::name_taken`]).
        if self.name_taken(&name) {
            error!(vm = %name, pool = %pool, job_id, "a new vm's name is one this agent holds (a vm's, or a runner's it still watches): nothing is made");
            self.bump_backoff(&pool);
            return false;
        }
        // Its address, if it gets one, is on the network configured now.
        let network = self.config.libvirt.network.libvirt_network().filter(|_| vm.slot.is_none()).map(str::to_string);
        self.book.insert_vm(VmRec { network, ..vm });
        if let Err(e) = self.flush() {
            self.book.remove_vm(&name);
            self.metrics.provision_failures.get_or_create(&step(&pool, "store")).inc();
            error!(vm = %name, pool = %pool, job_id, error = %e, "cannot persist the new vm's record: nothing is made until the store works; the job stays queued");
            self.bump_backoff(&pool);
            return false;
        }
        provision::crash_point("after-persist");
        let vm = &self.book.vms[&name];
        self.timeline.created(vm, self.queued_at(vm));
        let ctx = self.ctx.clone();
        let (n, failed) = (name.clone(), name.clone());
        let task = spawn_reporting(
            &self.ctx.events,
            async move { Event::Provisioned { vm: n, result: provision::provision(ctx, plan).await } },
            move |message| Event::Provisioned { vm: failed, result: Err(ProvisionError::Task(message)) },
        );
        self.work.insert(name, Work::Provisioning(task));
        true
    }

    pub(super) fn on_provisioned(&mut self, name: String, result: Result<Provisioned, ProvisionError>) {
        if !matches!(self.work.get(&name), Some(Work::Provisioning(_))) {
            // The VM is gone already (its record removed by a reload's retired pool, say).
            debug!(vm = %name, ok = result.is_ok(), "late provisioning report ignored");
            return;
        }
        self.work.remove(&name);
        let Some(vm) = self.book.vms.get(&name).cloned() else {
            return;
        };
        match result {
            Ok(Provisioned { took, defined }) => {
                let now = self.now();
                let defined_at = now.checked_sub(took.saturating_sub(defined)).unwrap_or(now);
                self.timeline.provisioned(&vm, self.queued_at(&vm), defined_at, now);
                self.metrics.vms_started.get_or_create(&metrics::pool(&vm.pool)).inc();
                self.metrics.provision_seconds.get_or_create(&metrics::pool(&vm.pool)).observe(took.as_secs_f64());
                match &vm.slot {
                    Some(slot) => {
                        info!(vm = %name, pool = %vm.pool, job_id = vm.job_id, slot = %slot, duration_ms = took.as_millis() as u64, "vm restored from slot")
                    }
                    None => {
                        info!(vm = %name, pool = %vm.pool, job_id = vm.job_id, runner_id = ?vm.runner_id, warm = vm.warm, duration_ms = took.as_millis() as u64, "vm started")
                    }
                }
                self.transition(&name, Input::Provisioned);
                if let Some(reason) = vm.reap {
                    self.reap(&name, reason);
                }
            }
            Err(e @ ProvisionError::Restore(_)) => {
                // The slot's fault (its saved state missing, corrupt or made by another
                // libvirt/QEMU): the job boots cold now, the slot is made again.
                let slot = vm.slot.clone().unwrap_or_default();
                self.metrics.provision_failures.get_or_create(&step(&vm.pool, e.step())).inc();
                error!(vm = %name, pool = %vm.pool, job_id = vm.job_id, slot = %slot, error = %e, "cannot restore the vm from its snapshot slot: the job boots a vm cold; the slot is made again");
                self.slot_failed(&vm, &slot);
                self.begin_teardown(&name, Reason::SlotGone);
            }
            Err(e) => {
                self.metrics.provision_failures.get_or_create(&step(&vm.pool, e.step())).inc();
                error!(vm = %name, pool = %vm.pool, job_id = vm.job_id, step = e.step(), error = %e, "provisioning failed; the job stays queued");
                self.bump_backoff(&vm.pool);
                // A definition libvirt refuses may be the job's own doing (its strings are in
                // it): without a charge the pool would retry it for ever.
                if e.charged_to_job() {
                    let _ = self.charge_attempt(&vm, "definition refused", false);
                }
                self.begin_teardown(&name, Reason::ProvisionFailed);
            }
        }
    }

    /// QEMU paused the VM because a write to its overlay failed, as a full storage pool
    /// makes it: tear it down without counting it against the job (which stays queued), and
    /// back the pool off as for any failure of the host.
    pub(super) fn on_disk_error(&mut self, name: &str) {
        if !self.domain_stop_ends(name) {
            return;
        }
        let vm = &self.book.vms[name];
        let pool = vm.pool.clone();
        error!(vm = %name, pool = %pool, job_id = vm.job_id, storage_pool = %self.config.libvirt.storage_pool, "domain paused on a disk I/O error: is the storage pool full? tearing it down; the job stays queued");
        self.bump_backoff(&pool);
        self.reap(name, Reason::DiskError);
    }

    /// Whether its domain stopping (or pausing for good) ends this VM: not while it is
    /// still being provisioned or already torn down.
    pub(super) fn domain_stop_ends(&self, name: &str) -> bool {
        self.book.vms.get(name).is_some_and(|v| vm::next(v.state, Input::DomainStopped) == Some(VmState::TearingDown))
    }

    pub(super) fn bump_backoff(&mut self, pool: &str) {
        let delay = self.lifecycle.backoff.bump(pool, Instant::now());
        warn!(pool, retry_in_ms = delay.as_millis() as u64, "provisioning backs off");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_teardown_is_tried_again_after_a_back_off_or_as_the_rate_limit_lifts() {
        let s = Duration::from_secs;
        let vm = "rv-small-1";
        // (failures in a row, the rate limit's wait if only it failed the teardown, the
        // delay before the spread)
        let table = [
            (1, None, s(10)),
            (2, None, s(20)),
            (5, None, s(160)),
            (6, None, s(300)),
            (40, None, s(300)),
            (1, Some(s(100)), s(100)),
            (1, Some(s(0)), s(1)),
            (3, Some(s(0)), s(4)),
            (7, Some(s(0)), s(60)),
            (40, Some(s(0)), s(60)),
            (3, Some(s(2)), s(4)),
            (1, Some(s(7200)), s(3600)),
        ];
        for (failures, rate_limited, want) in table {
            let spread = if rate_limited.is_some() { spread(vm) } else { Duration::ZERO };
            assert_eq!(teardown_retry(failures, rate_limited, vm), want + spread, "{failures} {rate_limited:?}");
        }
        // The spread: under a second, the same for a VM each time, not the same for all.
        assert!(spread(vm) < s(1));
        assert_eq!(spread(vm), spread("rv-small-1"));
        let spreads: std::collections::BTreeSet<Duration> = (0..20).map(|i| spread(&format!("rv-small-{i}"))).collect();
        assert!(spreads.len() > 10, "{spreads:?}");
    }
}

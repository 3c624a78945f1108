//! Late binding, and warm pools. Every VM boots from its pool's image with no GitHub
//! credential at all and waits on its bind port; its job's runner credential is made when
//! the job is bound to it and delivered into it over that virtio-serial port. A cold VM is
//! made for a job and bound to it as soon as its guest waits; a warm VM waits for a job to
//! arrive for its pool.
//!
//! - [`Scheduler::start_warm`]: a new warm VM (`rv-<pool>-w<seq>`), made for no job.
//! - [`Scheduler::watch_guests`]: a warming VM (cold or warm) is watched until its guest
//!   opened the port (libvirt's view of it, nothing read from the guest), then it is
//!   `Waiting`; a cold one is bound to its job at once.
//! - [`Scheduler::start_bind`]: [`super::demand::plan`] chose a waiting warm VM for a job,
//!   or a cold VM's guest waits.
//! - [`Scheduler::on_bound`]: delivered (it boots its runner), or not: the VM is destroyed
//!   with its runner registration (GitHub asked first whether that runner is busy, when the
//!   command may have reached the guest: a busy one keeps its VM); a warm VM's job goes the
//!   cold path, a cold VM's failure is one of its job's attempts. A binding a restart cut
//!   short is resumed from what libvirt says of the guest's port.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use tracing::{debug, error, info, warn};

use super::claims::MayBind;
use super::event::{Event, spawn_reporting};
use super::provision::{self, BindError, BindTimes};
use super::vm::Input;
use super::{Scheduler, Work};
use crate::config::PoolConfig;
use crate::github::GitHub;
use crate::hypervisor::{self, Hypervisor};
use crate::metrics::{self, PathLabels, StepLabels};
use crate::model::{JobState, Reason, VmRec, VmState};
use crate::timeline::Mark;

/// How often a warming VM's port is looked at.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Default)]
pub struct State {
    /// Jobs a warm VM failed to take: they go the cold path.
    pub cold_only: BTreeSet<u64>,
    /// The last warm VM's sequence number (milliseconds since the epoch, made unique).
    last_seq: u64,
}

/// The next warm VM's sequence number: `at` (the time's), past the `last` one by `step` at
/// least, and past every one `taken` says this agent holds ([`Scheduler::name_taken`]):
/// the clock stepped back across a restart (the sequence is not kept) would name a living
/// warm VM again, whose record the new one's would overwrite and whose overlay it would
/// delete as stale.
fn next_seq(at: u64, last: u64, step: u64, taken: impl Fn(u64) -> bool) -> u64 {
    let mut seq = at.max(last + step);
    while taken(seq) {
        seq += step;
    }
    seq
}

impl<G: GitHub, H: Hypervisor> Scheduler<G, H> {
    /// Records and provisions one new warm VM of `pool`.
    pub(super) fn start_warm(&mut self, pool: &PoolConfig) {
        let now = self.now();
        let millis = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        let (at, step) = match &self.fleet {
            // Members may make warm VMs in the same millisecond: the last three digits are
            // the member's number, so that names (runner names at GitHub) stay unique in
            // the fleet. Not known yet (no heartbeat written): no warm VM yet.
            Some(f) => match f.number() {
                Some(number) => (millis * 1000 + number, 1000),
                None => return,
            },
            None => (millis, 1),
        };
        self.warm.last_seq =
            next_seq(at, self.warm.last_seq, step, |seq| self.name_taken(&hypervisor::warm_vm_name(&pool.name, seq)));
        let name = hypervisor::warm_vm_name(&pool.name, self.warm.last_seq);
        let vm = VmRec::new(name.clone(), &pool.name, true, now);
        let plan = self.plan(vm.clone(), pool, String::new(), String::new());
        info!(pool = %pool.name, vm = %name, "provisioning warm vm (no credential)");
        self.launch(vm, plan);
    }

    /// Watches every warming VM that is not watched yet (new ones, and those a restart
    /// found), and finds out how far bindings a restart cut short got
    /// ([`provision::resume_bind`]).
    pub(super) fn watch_guests(&mut self) {
        let jobs = &self.book.jobs;
        self.warm.cold_only.retain(|id| jobs.get(id).is_some_and(|j| j.is_unserved()));
        let unwatched: Vec<(String, String, VmState, bool)> = self
            .book
            .vms
            .values()
            .filter(|v| matches!(v.state, VmState::Warming | VmState::Waiting | VmState::Binding) && v.reap.is_none())
            .filter(|v| !self.work.contains_key(&v.name))
            .filter(|v| v.state != VmState::Waiting || v.for_slot)
            .map(|v| (v.name.clone(), v.domain().to_string(), v.state, v.for_slot))
            .collect();
        for (name, domain, state, for_slot) in unwatched {
            if for_slot && self.adopted_slot_vm(&name) {
                continue;
            }
            if state == VmState::Waiting {
                // A slot VM whose guest waits (a save that failed to persist): saved now.
                self.start_save(&name);
                continue;
            }
            let hv = self.ctx.hv.clone();
            if state == VmState::Binding {
                info!(vm = %name, "a binding was cut short by a restart: did the guest take its command?");
                let (n, failed) = (name.clone(), name.clone());
                let task = spawn_reporting(
                    &self.ctx.events,
                    async move { Event::Bound { vm: n, result: provision::resume_bind(hv, domain).await } },
                    move |message| Event::Bound { vm: failed, result: Err(BindError::Task(message)) },
                );
                self.work.insert(name, Work::Binding(task));
                continue;
            }
            let (n, failed) = (name.clone(), name.clone());
            let task = spawn_reporting(
                &self.ctx.events,
                async move {
                    let result = watch(hv, domain).await;
                    Event::GuestWaiting { vm: n, result }
                },
                move |message| Event::GuestWaiting { vm: failed, result: Err(message) },
            );
            self.work.insert(name, Work::Watching(task));
        }
    }

    pub(super) fn on_guest_waiting(&mut self, name: String, result: Result<(), String>) {
        if !matches!(self.work.get(&name), Some(Work::Watching(_))) {
            return;
        }
        self.work.remove(&name);
        match result {
            Ok(()) => {
                if self.transition(&name, Input::GuestReady) {
                    let vm = &self.book.vms[&name];
                    let booted = self.now().duration_since(vm.created_at).unwrap_or_default();
                    if vm.for_slot {
                        info!(vm = %name, pool = %vm.pool, boot_ms = booted.as_millis() as u64, "snapshot slot's vm waiting: saving it");
                        self.start_save(&name);
                        return;
                    }
                    if vm.warm {
                        info!(vm = %name, pool = %vm.pool, boot_ms = booted.as_millis() as u64, "warm vm waiting for a job");
                        return;
                    }
                    // A cold VM: [`Scheduler::bind_cold_vms`] starts its job's runner now.
                    debug!(vm = %name, pool = %vm.pool, job_id = vm.job_id, boot_ms = booted.as_millis() as u64, "vm waiting for its job's runner command");
                }
            }
            Err(e) => {
                // The watch itself failed (a panic): a VM nobody watches could never serve.
                warn!(vm = %name, error = %e, "cannot watch the vm's guest: replacing the vm");
                self.reap(&name, Reason::RegistrationTimeout);
            }
        }
    }

    /// Binds every cold VM whose guest waits to the job it was made for, unless its pool
    /// backs off (GitHub failed to make a credential): then at the end of the back-off.
    pub(super) fn bind_cold_vms(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<(String, u64, String)> = self
            .book
            .vms
            .values()
            .filter(|v| !v.warm && v.state == VmState::Waiting && v.reap.is_none())
            .filter(|v| !self.work.contains_key(&v.name) && !self.lifecycle.backing_off(&v.pool, now))
            .map(|v| (v.name.clone(), v.job_id, v.pool.clone()))
            .collect();
        for (name, job_id, pool) in due {
            // Fleet mode: a job still queued is bound only within this member's claim.
            let queued = self.book.jobs.get(&job_id).is_some_and(|j| j.state == JobState::Queued);
            match self.fleet.as_ref().filter(|_| queued).map(|f| f.may_bind(job_id, now)) {
                None | Some(MayBind::Yes) => {}
                Some(MayBind::Wait) => continue,
                Some(MayBind::Lost) => {
                    info!(vm = %name, job_id, "the claim of this cold VM's job was lost (another member serves it): the VM is surplus");
                    self.reap(&name, Reason::Surplus);
                    continue;
                }
            }
            match self.config.pool(&pool).cloned() {
                Some(pool) => self.start_bind(job_id, &name, &pool),
                // Its pool was removed while it booted: it goes with it.
                None => self.reap(&name, Reason::Surplus),
            }
        }
    }

    /// Gives the waiting VM `vm_name` the job `job_id` (a warm VM: the job demand chose for
    /// it; a cold VM: the job it was made for): commits the binding, then makes and
    /// delivers the credential in a task.
    pub(super) fn start_bind(&mut self, job_id: u64, vm_name: &str, pool: &PoolConfig) {
        let Some(vm) = self.book.vms.get(vm_name) else { return };
        let (run_id, repository, job_url, workflow, job_name) = match self.book.jobs.get(&job_id) {
            Some(job) => (
                job.info.run_id,
                job.info.repository.clone(),
                job.info.html_url.clone(),
                job.info.workflow_name.clone(),
                job.info.name.clone(),
            ),
            // A cold VM whose job left the book meanwhile: its own record says what it is.
            None if !vm.warm => (vm.run_id, vm.repository.clone(), vm.job_url.clone(), String::new(), String::new()),
            None => return,
        };
        // (A cold VM, made for its job or restored for it, said so when it was made.)
        let warm = vm.warm;
        if !self.transition(vm_name, Input::Bind) {
            return;
        }
        if warm {
            self.say_if_held_before(job_id);
        }
        if let Some(fleet) = self.fleet.as_mut() {
            fleet.used(job_id);
        }
        let Some(vm) = self.book.vms.get_mut(vm_name) else { return };
        vm.job_id = job_id;
        vm.run_id = run_id;
        vm.repository = repository.clone();
        vm.job_url = job_url;
        vm.binds += 1;
        let vm = vm.clone();
        self.timeline.mark(&vm, self.queued_at(&vm), Mark::Bound, self.now());
        if let Err(e) = self.flush() {
            // Nothing secret is in it yet; the job is served again.
            error!(vm = %vm_name, job_id, error = %e, "cannot persist the binding: the warm vm goes");
            self.begin_teardown(vm_name, Reason::BindFailed);
            return;
        }
        let what = if vm.warm { "binding warm vm to job" } else { "binding vm to its job" };
        info!(job_id, run_id, repository = %repository, pool = %pool.name, vm = %vm_name, "{what}");
        let plan = self.plan(vm, pool, workflow, job_name);
        let ctx = self.ctx.clone();
        let (n, failed) = (vm_name.to_string(), vm_name.to_string());
        let task = spawn_reporting(
            &self.ctx.events,
            async move { Event::Bound { vm: n, result: provision::bind(ctx, plan).await } },
            move |message| Event::Bound { vm: failed, result: Err(BindError::Task(message)) },
        );
        self.work.insert(vm_name.to_string(), Work::Binding(task));
    }

    pub(super) fn on_bound(&mut self, name: String, result: Result<BindTimes, BindError>) {
        if !matches!(self.work.get(&name), Some(Work::Binding(_))) {
            // Its deadline passed, or the VM went meanwhile.
            return;
        }
        self.work.remove(&name);
        let Some(vm) = self.book.vms.get(&name).cloned() else { return };
        // A cold VM was counted when it was made for its job.
        let path = if vm.warm { Some("warm") } else { vm.slot.as_ref().map(|_| "restored") };
        match result {
            Err(e) if matches!(vm.state, VmState::Idle | VmState::Busy | VmState::Finishing) => {
                // Its runner came online or took the job (or ran it) while the delivery's
                // failure was on its way: the guest had its command, only the
                // acknowledgement was lost (libvirtd restarted during the exchange, as the
                // restart-libvirtd drill met it). Destroying the VM would kill the job's
                // runner, mid-job or as it takes one.
                warn!(vm = %name, pool = %vm.pool, job_id = vm.job_id, error = %e, "the delivery failed after its runner came online or took the job: the guest had its command, the vm is kept");
                self.count_runner(&vm.pool, path);
                if let Some(reason) = vm.reap {
                    self.reap(&name, reason);
                }
            }
            Ok(times) if times.resumed => {
                info!(vm = %name, pool = %vm.pool, job_id = vm.job_id, "the guest had taken its command before the restart: its runner starts");
                self.count_runner(&vm.pool, path);
                self.transition(&name, Input::Bound);
            }
            Ok(times) => {
                let total = times.credential + times.delivery;
                self.count_runner(&vm.pool, path);
                self.metrics.bind_seconds.get_or_create(&metrics::pool(&vm.pool)).observe(total.as_secs_f64());
                info!(
                    vm = %name, pool = %vm.pool, job_id = vm.job_id, runner_id = ?vm.runner_id,
                    credential_ms = millis(times.credential),
                    delivery_ms = millis(times.delivery),
                    "{}", if vm.warm { "warm vm bound: its runner starts now" } else { "vm bound to its job: its runner starts now" }
                );
                self.transition(&name, Input::Bound);
                if let Some(reason) = vm.reap {
                    self.reap(&name, reason);
                }
            }
            Err(BindError::Interrupted) => {
                // Nothing reached the guest: the job is served again, warm or cold.
                info!(vm = %name, pool = %vm.pool, job_id = vm.job_id, "the guest never took its command before the restart: replacing the vm");
                self.begin_teardown(&name, Reason::Interrupted);
            }
            Err(BindError::Credential(e)) if e.status() == Some(409) && self.fleet.is_some() => {
                // Its name is taken by a runner that may be another member's (see
                // `provision::credential`): this VM goes, the job's next VM has a new name.
                self.metrics.bind_failures.get_or_create(&StepLabels::new(&vm.pool, "credential")).inc();
                warn!(vm = %name, pool = %vm.pool, job_id = vm.job_id, error = %e, "a runner already has this vm's name: destroying the vm; the job gets another");
                if vm.warm {
                    self.warm.cold_only.insert(vm.job_id);
                }
                // No runner of this VM exists: its teardown deletes none (one looked up by
                // the name would be that other runner).
                if let Some(v) = self.book.vms.get_mut(&name) {
                    v.runner_done = true;
                }
                self.book.touch_vm(&name);
                self.begin_teardown(&name, Reason::BindFailed);
            }
            Err(e @ (BindError::Credential(_) | BindError::Describe(_))) if !vm.warm => {
                // GitHub's failure (or libvirt's, marking the domain), not the VM's: nothing
                // reached the guest, which still waits. The pool backs off, then the VM is
                // bound again (a warm VM goes instead: its job need not wait for it).
                self.metrics.bind_failures.get_or_create(&StepLabels::new(&vm.pool, e.step())).inc();
                warn!(vm = %name, pool = %vm.pool, job_id = vm.job_id, error = %e, "cannot bind the vm yet; it waits and is bound again after the pool's back-off");
                self.transition(&name, Input::BindDeferred);
                self.bump_backoff(&vm.pool);
                if let Some(reason) = vm.reap {
                    self.reap(&name, reason);
                }
            }
            Err(e) if vm.warm => {
                self.metrics.bind_failures.get_or_create(&StepLabels::new(&vm.pool, e.step())).inc();
                error!(vm = %name, pool = %vm.pool, job_id = vm.job_id, step = e.step(), error = %e, "warm vm did not take its job: destroying it; the job boots a vm of its own");
                self.warm.cold_only.insert(vm.job_id);
                self.begin_teardown_asking(&name, Reason::BindFailed, Some(e.may_have_reached_guest()));
            }
            Err(e) => {
                self.metrics.bind_failures.get_or_create(&StepLabels::new(&vm.pool, e.step())).inc();
                let hint = if matches!(e, BindError::Delivery(_)) {
                    " (is the image's runnervisor-warm program current?)"
                } else {
                    ""
                };
                error!(vm = %name, pool = %vm.pool, job_id = vm.job_id, step = e.step(), error = %e, "vm did not take its job's runner command: destroying it{hint}");
                self.begin_teardown_asking(&name, Reason::BindFailed, Some(e.may_have_reached_guest()));
            }
        }
    }

    /// A runner started on the `path` (`warm`, `restored`) of `pool`: counted once per VM,
    /// when its binding stands (a cold VM was counted when it was made for its job).
    fn count_runner(&self, pool: &str, path: Option<&str>) {
        if let Some(path) = path {
            self.metrics.job_runners.get_or_create(&PathLabels::new(pool, path)).inc();
        }
    }
}

/// Milliseconds to a tenth, for the log.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// Polls libvirt until the warm VM's guest has its bind port open. No deadline of its
/// own: the registration timeout (`vm::expired`) reaps a VM that never gets there, and
/// its teardown aborts this watch.
async fn watch<H: Hypervisor>(hv: std::sync::Arc<H>, vm: String) -> Result<(), String> {
    loop {
        let (h, n) = (hv.clone(), vm.clone());
        match crate::offload::spawn(move || h.guest_waiting(&n)).await {
            Ok(Ok(true)) => return Ok(()),
            // Not yet, or libvirt is away for a moment: look again.
            Ok(Ok(false) | Err(_)) => {}
            Err(e) => return Err(format!("watch: {e}")),
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    /// The time's number, past the last by a step, past every one taken (a single host's
    /// step is 1; a fleet member's 1000, keeping its number in the last three digits).
    #[test]
    fn a_warm_vms_number_is_the_times_unless_taken() {
        let taken = |t: &'static [u64]| move |seq: u64| t.contains(&seq);
        #[rustfmt::skip]
        let table: [(u64, u64, u64, &'static [u64], u64); 6] = [
            (500, 0, 1, &[], 500),
            (500, 500, 1, &[], 501),               // the same millisecond again
            (500, 900, 1, &[], 901),               // the clock stepped back while up
            (500, 0, 1, &[500, 501], 502),         // ... while down: living VMs' numbers
            (500_007, 0, 1000, &[500_007], 501_007),
            (500_007, 501_007, 1000, &[502_007], 503_007),
        ];
        for (at, last, step, t, want) in table {
            assert_eq!(super::next_seq(at, last, step, taken(t)), want, "{at} {last} {step} {t:?}");
        }
    }
}

//! The scheduler: the one task that owns jobs and VMs.
//!
//! It receives a closed set of [`Event`]s (webhook inbox, hypervisor lifecycle, results of
//! the tasks it spawned, periodic sweeps, admin commands), updates its state, persists the
//! change, and decides: provision VMs for unserved jobs within each pool's capacity, tear
//! down VMs that stopped, timed out or are surplus. Provisioning and teardown run as
//! spawned tasks ([`provision`]) that report back; nothing else mutates scheduling state.
//!
//! Counting, not binding: GitHub gives a job to any idle runner whose labels cover it, so
//! the scheduler keeps, per pool, the number of available runners (provisioning, booting
//! or idle) equal to the number of unserved jobs, never above `max_vms` VMs.

pub mod demand;
pub mod job;
pub mod provision;
pub mod vm;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{Config, PoolConfig, Registration};
use crate::github::{GhError, GitHub, JobStatus, RunnerInfo};
use crate::hypervisor::{self, DomainState, HvError, HvEvent, Hypervisor, VmInfo};
use crate::metrics::Metrics;
use crate::model::{JobAction, JobEvent, JobInfo, JobRec, JobState, Reason, VmRec, VmState};
use crate::store::{Batch, Store};
use provision::{Ctx, Plan, ProvisionError, TeardownOutcome};
use vm::Input;

/// Everything the scheduler reacts to.
pub enum Event {
    Hv(HvEvent),
    RunnerCreated {
        vm: String,
        runner_id: u64,
    },
    Provisioned {
        vm: String,
        result: Result<Duration, ProvisionError>,
    },
    TornDown {
        vm: String,
        outcome: TeardownOutcome,
    },
    SeedRemoved {
        vm: String,
        result: Result<(), String>,
    },
    Swept {
        vms: Result<Vec<VmInfo>, HvError>,
        volumes: Result<Vec<String>, HvError>,
        pool: Result<(), HvError>,
    },
    GitHubSynced {
        /// When the runner list was requested: VMs made later cannot be in it.
        started: SystemTime,
        runners: Result<Vec<RunnerInfo>, GhError>,
        jobs: Vec<(u64, JobStatus)>,
        found: Vec<JobEvent>,
    },
    GroupResolved(Result<u64, GhError>),
    Admin(AdminCommand, oneshot::Sender<AdminReply>),
}

pub enum AdminCommand {
    Status,
    Drain(bool),
    DestroyVm(String),
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub enum AdminReply {
    Status(Status),
    Ok(String),
    Error(String),
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    pub draining: bool,
    pub libvirt_connected: bool,
    pub pools: Vec<PoolStatus>,
    pub queued: Vec<QueuedStatus>,
    pub vms: Vec<VmStatus>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PoolStatus {
    pub name: String,
    pub vms: usize,
    pub max_vms: usize,
    pub queued: usize,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct QueuedStatus {
    pub job_id: u64,
    pub pool: String,
    pub repository: String,
    pub age_secs: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub pool: String,
    pub state: String,
    pub age_secs: u64,
    pub job_id: u64,
    pub took_job: Option<u64>,
    pub runner_id: Option<u64>,
    pub repository: String,
}

/// Pool-level backoff after failures of the host (provisioning errors, VMs paused on a full
/// disk), doubling up to [`BACKOFF_MAX`] until a VM of the pool has its runner online.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    delay: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const TEARDOWN_RETRY: Duration = Duration::from_secs(10);
/// Finished jobs are kept this long so late or redelivered events are recognized.
const JOB_RETENTION: Duration = Duration::from_secs(3 * 86400);
/// After a failed seed removal, the next try.
const SEED_RETRY: Duration = Duration::from_secs(30);
/// The conclusion recorded for a job GitHub answers 404 for.
const NOT_FOUND: &str = "not_found";

pub struct Scheduler<G: GitHub, H: Hypervisor> {
    config: Arc<Config>,
    ctx: Ctx<G, H>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    jobs: BTreeMap<u64, JobRec>,
    vms: BTreeMap<String, VmRec>,
    rx: UnboundedReceiver<Event>,
    inbox_ready: Arc<Notify>,
    dirty_jobs: BTreeSet<u64>,
    dirty_vms: BTreeSet<String>,
    removed_jobs: BTreeSet<u64>,
    removed_vms: BTreeSet<String>,
    inbox_done: Vec<u64>,
    runner_group_id: Option<u64>,
    group_pending: bool,
    backoff: HashMap<String, Backoff>,
    provisioning: BTreeSet<String>,
    tearing_down: BTreeSet<String>,
    teardown_retry_at: HashMap<String, Instant>,
    /// Token mode: seeds being removed, and when to try again after a failure.
    removing_seeds: HashMap<String, Option<Instant>>,
    /// Provisioning records found at start: the first sweep decides adopt or tear down.
    interrupted: BTreeSet<String>,
    surplus_since: HashMap<String, Instant>,
    draining: bool,
    /// libvirt answered the last sweep; no provisioning while it is away.
    hv_ready: bool,
    hv_connected_once: bool,
    sweep_running: bool,
    /// When the sweep whose result is awaited started listing.
    sweep_started: Instant,
    /// VMs torn down recently, and when: a sweep that listed before that is stale for them.
    torn_down_at: HashMap<String, Instant>,
    github_running: bool,
    stopping: bool,
    last_prune: Instant,
    last_image_check: Option<Instant>,
}

impl<G: GitHub, H: Hypervisor> Scheduler<G, H> {
    /// Loads the store. `tx`/`rx` is the scheduler's event channel (the hypervisor's
    /// events are forwarded into it by the caller).
    pub fn new(
        config: Arc<Config>,
        github: Arc<G>,
        hv: Arc<H>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        inbox_ready: Arc<Notify>,
        tx: UnboundedSender<Event>,
        rx: UnboundedReceiver<Event>,
    ) -> Result<Self, crate::store::StoreError> {
        let snap = store.load()?;
        let draining = snap.meta.get("draining").is_some_and(|v| v == b"1");
        let interrupted =
            snap.vms.values().filter(|v| v.state == VmState::Provisioning).map(|v| v.name.clone()).collect();
        Ok(Scheduler {
            ctx: Ctx { github, hv, config: config.clone(), events: tx },
            config,
            store,
            metrics,
            jobs: snap.jobs,
            vms: snap.vms,
            rx,
            inbox_ready,
            dirty_jobs: BTreeSet::new(),
            dirty_vms: BTreeSet::new(),
            removed_jobs: BTreeSet::new(),
            removed_vms: BTreeSet::new(),
            inbox_done: Vec::new(),
            runner_group_id: None,
            group_pending: false,
            backoff: HashMap::new(),
            provisioning: BTreeSet::new(),
            tearing_down: BTreeSet::new(),
            teardown_retry_at: HashMap::new(),
            removing_seeds: HashMap::new(),
            interrupted,
            surplus_since: HashMap::new(),
            draining,
            hv_ready: false,
            hv_connected_once: false,
            sweep_running: false,
            sweep_started: Instant::now(),
            torn_down_at: HashMap::new(),
            github_running: false,
            stopping: false,
            last_prune: Instant::now(),
            last_image_check: None,
        })
    }

    pub async fn run(mut self, shutdown: CancellationToken, ready: Option<oneshot::Sender<()>>) {
        info!(
            jobs = self.jobs.values().filter(|j| j.is_unserved()).count(),
            vms = self.vms.len(),
            draining = self.draining,
            "scheduler starting"
        );
        self.metrics.draining.set(&[], if self.draining { 1.0 } else { 0.0 });
        self.drain_inbox();
        self.start_sweep();
        self.start_github_sync();
        let mut ready = ready;
        let mut sweep = tokio::time::interval(self.config.reconcile.sweep_interval);
        let mut github = tokio::time::interval(self.config.reconcile.github_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        github.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(ev) = self.rx.recv() => self.handle(ev),
                _ = self.inbox_ready.notified() => self.drain_inbox(),
                _ = sweep.tick() => self.start_sweep(),
                _ = github.tick() => self.start_github_sync(),
                _ = housekeeping.tick() => crate::systemd::watchdog(),
            }
            self.reconcile();
            self.flush();
            self.update_gauges();
            if self.hv_ready
                && let Some(r) = ready.take()
            {
                let _ = r.send(());
            }
        }
        self.shutdown().await;
    }

    /// SIGTERM: start nothing new, let in-flight provisioning and teardown finish (bounded).
    async fn shutdown(&mut self) {
        self.stopping = true;
        let deadline = tokio::time::Instant::now() + self.config.reconcile.shutdown_grace;
        while !self.provisioning.is_empty() || !self.tearing_down.is_empty() {
            info!(
                provisioning = self.provisioning.len(),
                tearing_down = self.tearing_down.len(),
                "waiting for in-flight work before exiting"
            );
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => self.handle(ev),
                Ok(None) => break,
                Err(_) => {
                    warn!("shutdown grace period over; in-flight work is resumed at next start");
                    break;
                }
            }
            self.flush();
        }
        self.flush();
        info!(vms = self.vms.len(), "scheduler stopped; running VMs keep running");
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Hv(h) => self.on_hv(h),
            Event::RunnerCreated { vm, runner_id } => {
                if let Some(v) = self.vms.get_mut(&vm) {
                    v.runner_id = Some(runner_id);
                    self.dirty_vms.insert(vm);
                }
            }
            Event::Provisioned { vm, result } => self.on_provisioned(vm, result),
            Event::TornDown { vm, outcome } => self.on_torn_down(vm, outcome),
            Event::SeedRemoved { vm, result } => self.on_seed_removed(vm, result),
            Event::Swept { vms, volumes, pool } => self.on_swept(vms, volumes, pool),
            Event::GitHubSynced { started, runners, jobs, found } => {
                self.on_github_synced(started, runners, jobs, found)
            }
            Event::GroupResolved(r) => {
                self.group_pending = false;
                match r {
                    Ok(id) => {
                        info!(runner_group = %self.config.github.runner_group, runner_group_id = id, "runner group resolved");
                        self.runner_group_id = Some(id);
                    }
                    Err(e) => {
                        error!(runner_group = %self.config.github.runner_group, error = %e, "cannot resolve the runner group");
                        let pools: Vec<String> = self.config.pools.iter().map(|p| p.name.clone()).collect();
                        for p in pools {
                            self.bump_backoff(&p);
                        }
                    }
                }
            }
            Event::Admin(cmd, reply) => {
                let r = self.on_admin(cmd);
                let _ = reply.send(r);
            }
        }
    }

    // ---- inbox: webhook events ----

    fn drain_inbox(&mut self) {
        let inbox = match self.store.inbox() {
            Ok(i) => i,
            Err(e) => {
                error!(error = %e, "cannot read the inbox");
                return;
            }
        };
        for (seq, ev) in inbox {
            if self.inbox_done.contains(&seq) {
                continue;
            }
            self.apply(ev);
            self.inbox_done.push(seq);
        }
        self.flush();
    }

    fn match_pool(&self, labels: &[String]) -> Option<String> {
        let mut want: Vec<String> = labels.iter().map(|l| l.to_lowercase()).collect();
        want.sort();
        want.dedup();
        self.config
            .pools
            .iter()
            .find(|p| {
                let mut have: Vec<String> = p.labels.iter().map(|l| l.to_lowercase()).collect();
                have.sort();
                have == want
            })
            .map(|p| p.name.clone())
    }

    fn new_job(&self, info: &JobInfo, received_at: SystemTime) -> JobRec {
        JobRec {
            pool: self.match_pool(&info.labels),
            info: JobInfo { runner_name: None, conclusion: None, ..info.clone() },
            state: JobState::Queued,
            received_at,
            vms_made: 0,
            failed_vms: 0,
            updated_at: SystemTime::now(),
        }
    }

    /// Applies one job event (see [`job::next`]): duplicates, redeliveries and reordering
    /// (e.g. `completed` before `queued`) change nothing once a later state is known. The
    /// runner named in the event, if it is one of our VMs, moves that VM along.
    fn apply(&mut self, ev: JobEvent) {
        let id = ev.job.id;
        if !self.jobs.contains_key(&id) && self.match_pool(&ev.job.labels).is_none() {
            // No pool serves it: a counter, not a record — unless it names one of our
            // runners (a runner may take any job its labels cover), which must be tracked.
            let names_ours = ev.job.runner_name.as_ref().is_some_and(|r| self.vms.contains_key(r));
            if !names_ours {
                if ev.action == JobAction::Queued {
                    self.metrics.jobs_unmatched.inc();
                    info!(job_id = id, repository = %ev.job.repository, labels = ?ev.job.labels, "no pool has exactly these labels; job ignored");
                }
                return;
            }
        }
        let current = self.jobs.get(&id).map(|j| j.state.clone());
        let changed = job::next(current.as_ref(), ev.action, &ev.job);
        if let Some(state) = changed.clone() {
            let fresh = current.is_none().then(|| self.new_job(&ev.job, ev.received_at));
            let job = match fresh {
                Some(j) => self.jobs.entry(id).or_insert(j),
                None => self.jobs.get_mut(&id).expect("known"),
            };
            job.state = state;
            job.updated_at = SystemTime::now();
            self.dirty_jobs.insert(id);
        } else {
            debug!(job_id = id, delivery = %ev.delivery, action = ?ev.action, "event changes nothing (duplicate, late or reordered)");
        }
        let Some(job) = self.jobs.get(&id) else { return };
        let (pool, received) = (job.pool.clone(), job.received_at);
        let ours = ev.job.runner_name.clone().filter(|r| self.vms.contains_key(r));
        match (ev.action, changed.is_some()) {
            (JobAction::Queued, true) => match &pool {
                Some(pool) => {
                    self.metrics.jobs_received.inc(&[("pool", pool)]);
                    info!(job_id = id, run_id = ev.job.run_id, repository = %ev.job.repository, pool = %pool, workflow = %ev.job.workflow_name, "job queued");
                }
                None => {}
            },
            (JobAction::InProgress, changed) => match &ours {
                Some(vm) => {
                    self.vms.get_mut(vm).expect("ours").took_job = Some(id);
                    self.dirty_vms.insert(vm.clone());
                    self.transition(vm, Input::TookJob);
                    if changed {
                        let vm_pool = self.vms[vm].pool.clone();
                        self.metrics.jobs_started.inc(&[("pool", &vm_pool)]);
                        let waited = SystemTime::now().duration_since(received).unwrap_or_default();
                        self.metrics
                            .queued_to_runner_online_seconds
                            .observe(&[("pool", &vm_pool)], waited.as_secs_f64());
                        info!(job_id = id, run_id = ev.job.run_id, repository = %ev.job.repository, pool = %vm_pool, vm = %vm, runner_name = %vm, "job started on our runner");
                    }
                }
                None if changed => {
                    debug!(job_id = id, runner_name = ?ev.job.runner_name, pool = ?pool, "job started on a runner that is not ours")
                }
                None => {}
            },
            (JobAction::Completed, changed) => {
                let conclusion = ev.job.conclusion.clone().unwrap_or_default();
                match &ours {
                    Some(vm) => {
                        if changed {
                            let vm_pool = self.vms[vm].pool.clone();
                            self.metrics.jobs_completed.inc(&[("pool", &vm_pool), ("conclusion", &conclusion)]);
                            info!(job_id = id, repository = %ev.job.repository, pool = %vm_pool, vm = %vm, runner_name = %vm, conclusion = %conclusion, "job completed on our runner");
                        }
                        self.transition(vm, Input::JobCompleted);
                    }
                    None if changed && ev.job.runner_name.is_none() => {
                        info!(job_id = id, repository = %ev.job.repository, conclusion = %conclusion, "job completed before any runner took it")
                    }
                    None if changed => debug!(job_id = id, "job completed on a runner that is not ours"),
                    None => {}
                }
            }
            _ => {}
        }
    }

    // ---- VM state ----

    fn transition(&mut self, name: &str, input: Input) -> bool {
        let Some(vm) = self.vms.get_mut(name) else {
            return false;
        };
        match vm::next(vm.state, input) {
            Some(s) => {
                debug!(vm = %name, from = vm.state.as_str(), to = s.as_str(), ?input, "vm state");
                if matches!(input, Input::RunnerOnline | Input::TookJob) {
                    // The pool works end to end (a VM that merely started may still pause
                    // on a full disk or never boot): failures back off from scratch again.
                    self.backoff.remove(&vm.pool);
                }
                vm.state = s;
                vm.state_since = SystemTime::now();
                self.dirty_vms.insert(name.to_string());
                true
            }
            None => false,
        }
    }

    /// Tears a VM down for `reason` (now, or once its provisioning reports).
    fn reap(&mut self, name: &str, reason: Reason) {
        let Some(vm) = self.vms.get_mut(name) else {
            return;
        };
        if vm.state == VmState::Provisioning {
            if vm.reap.is_none() {
                info!(vm = %name, reason = %reason.as_str(), "vm will be torn down once provisioning reports");
                vm.reap = Some(reason);
                self.dirty_vms.insert(name.to_string());
            }
            return;
        }
        if vm.state == VmState::TearingDown && self.tearing_down.contains(name) {
            return;
        }
        self.begin_teardown(name, reason);
    }

    /// Marks the VM torn down for `reason`, counts a failed attempt for its job if it
    /// never took one, and spawns the teardown.
    fn begin_teardown(&mut self, name: &str, reason: Reason) {
        let Some(vm) = self.vms.get(name) else { return };
        let vm_snapshot = vm.clone();
        // A VM that died or stalled before any runner on it took a job is a failed attempt.
        if vm::counts_as_failure(&vm_snapshot, reason)
            && let Some(job) = self.jobs.get_mut(&vm_snapshot.job_id).filter(|j| j.state == JobState::Queued)
        {
            job.failed_vms += 1;
            self.dirty_jobs.insert(job.info.id);
            let max = self.config.pool(&vm_snapshot.pool).map(|p| p.max_attempts).unwrap_or(1);
            warn!(job_id = job.info.id, vm = %name, reason = %reason.as_str(), attempt = job.failed_vms, max_attempts = max, "vm failed before taking a job");
            if job.failed_vms >= max {
                job.state =
                    JobState::Abandoned { reason: format!("{} VMs failed ({})", job.failed_vms, reason.as_str()) };
                self.metrics.jobs_failed.inc(&[("pool", &vm_snapshot.pool)]);
                error!(job_id = job.info.id, run_id = job.info.run_id, repository = %job.info.repository, pool = %vm_snapshot.pool, attempts = job.failed_vms, "job given up: its VMs keep failing; check the pool's image and the console logs");
            }
        }
        let runner_first =
            matches!(reason, Reason::Surplus) && matches!(vm_snapshot.state, VmState::Idle | VmState::Booting);
        let vm = self.vms.get_mut(name).expect("exists");
        vm.state = VmState::TearingDown;
        vm.state_since = SystemTime::now();
        vm.reap = Some(reason);
        self.dirty_vms.insert(name.to_string());
        self.surplus_since.remove(name);
        self.metrics.teardowns.inc(&[("reason", reason.as_str())]);
        info!(vm = %name, pool = %vm_snapshot.pool, job_id = vm_snapshot.job_id, reason = %reason.as_str(), "tearing down vm");
        self.spawn_teardown(vm_snapshot, runner_first);
    }

    fn spawn_teardown(&mut self, vm: VmRec, runner_first: bool) {
        let mut vm = vm;
        if let Some(current) = self.vms.get(&vm.name) {
            vm.runner_id = current.runner_id.or(vm.runner_id);
        }
        self.tearing_down.insert(vm.name.clone());
        self.teardown_retry_at.remove(&vm.name);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let name = vm.name.clone();
            let outcome = provision::teardown(ctx.clone(), vm, runner_first).await;
            let _ = ctx.events.send(Event::TornDown { vm: name, outcome });
        });
    }

    /// Token mode: a seed holds a registration token valid for an hour for the whole scope.
    /// Once the runner is online the token is spent: the seed is detached from the VM and
    /// deleted, so a job that gains root in the VM cannot read it.
    fn remove_spent_seeds(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .vms
            .values()
            .filter(|v| matches!(v.state, VmState::Idle | VmState::Busy) && !v.seed_removed && v.reap.is_none())
            .filter(|v| self.config.pool(&v.pool).is_some_and(|p| p.registration == Registration::Token))
            .filter(|v| match self.removing_seeds.get(&v.name) {
                None => true,
                Some(retry_at) => retry_at.is_some_and(|t| t <= now),
            })
            .map(|v| v.name.clone())
            .collect();
        for name in due {
            self.removing_seeds.insert(name.clone(), None);
            let hv = self.ctx.hv.clone();
            let events = self.ctx.events.clone();
            tokio::spawn(async move {
                let n = name.clone();
                let result = match tokio::task::spawn_blocking(move || hv.remove_seed(&n)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("seed removal task failed: {e}")),
                };
                let _ = events.send(Event::SeedRemoved { vm: name, result });
            });
        }
    }

    fn on_seed_removed(&mut self, name: String, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.removing_seeds.remove(&name);
                if let Some(vm) = self.vms.get_mut(&name) {
                    vm.seed_removed = true;
                    self.dirty_vms.insert(name.clone());
                    info!(vm = %name, "runner online: seed with the registration token detached and deleted");
                }
            }
            Err(e) => {
                warn!(vm = %name, error = %e, "cannot remove the seed with the registration token; will retry");
                self.removing_seeds.insert(name, Some(Instant::now() + SEED_RETRY));
            }
        }
    }

    fn on_torn_down(&mut self, name: String, outcome: TeardownOutcome) {
        self.tearing_down.remove(&name);
        if outcome.aborted_busy {
            if let Some(vm) = self.vms.get_mut(&name) {
                info!(vm = %name, "surplus runner turned out busy; keeping it");
                vm.state = VmState::Busy;
                vm.reap = None;
                vm.state_since = SystemTime::now();
                self.dirty_vms.insert(name);
            }
            return;
        }
        if outcome.errors.is_empty() {
            self.metrics.teardown_seconds.observe(&[], outcome.duration.as_secs_f64());
            if let Some(vm) = self.vms.remove(&name) {
                info!(vm = %name, pool = %vm.pool, job_id = vm.job_id, duration_ms = outcome.duration.as_millis() as u64, "vm torn down: domain, volumes and runner registration gone");
            }
            self.dirty_vms.remove(&name);
            self.removing_seeds.remove(&name);
            self.torn_down_at.insert(name.clone(), Instant::now());
            self.removed_vms.insert(name);
        } else {
            for e in &outcome.errors {
                self.metrics.teardown_failures.inc();
                warn!(vm = %name, error = %e, "teardown step failed; will retry");
            }
            self.teardown_retry_at.insert(name, Instant::now() + TEARDOWN_RETRY);
        }
    }

    // ---- provisioning ----

    fn start_provision(&mut self, job_id: u64, pool: &PoolConfig) {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        job.vms_made += 1;
        let name = hypervisor::vm_name(&pool.name, job_id, job.vms_made);
        let now = SystemTime::now();
        let vm = VmRec {
            name: name.clone(),
            pool: pool.name.clone(),
            job_id,
            run_id: job.info.run_id,
            repository: job.info.repository.clone(),
            job_url: job.info.html_url.clone(),
            runner_id: None,
            state: VmState::Provisioning,
            created_at: now,
            state_since: now,
            took_job: None,
            seed_removed: false,
            reap: None,
        };
        let plan = Plan {
            vm: vm.clone(),
            pool: pool.clone(),
            labels: pool.labels.clone(),
            runner_group_id: self.runner_group_id.unwrap_or(1),
            workflow: job.info.workflow_name.clone(),
            job_name: job.info.name.clone(),
        };
        info!(job_id, run_id = job.info.run_id, repository = %job.info.repository, pool = %pool.name, vm = %name, "provisioning vm");
        self.dirty_jobs.insert(job_id);
        self.vms.insert(name.clone(), vm);
        self.dirty_vms.insert(name.clone());
        self.provisioning.insert(name.clone());
        // The record is durable before anything exists outside: a crash from here on is
        // recovered by name.
        self.flush();
        provision::crash_point("after-persist");
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let result = provision::provision(ctx.clone(), plan).await;
            let _ = ctx.events.send(Event::Provisioned { vm: name, result });
        });
    }

    fn on_provisioned(&mut self, name: String, result: Result<Duration, ProvisionError>) {
        self.provisioning.remove(&name);
        let Some(vm) = self.vms.get(&name).cloned() else {
            return;
        };
        match result {
            Ok(took) => {
                self.metrics.vms_started.inc(&[("pool", &vm.pool)]);
                self.metrics.provision_seconds.observe(&[("pool", &vm.pool)], took.as_secs_f64());
                info!(vm = %name, pool = %vm.pool, job_id = vm.job_id, runner_id = ?vm.runner_id, duration_ms = took.as_millis() as u64, "vm started");
                self.transition(&name, Input::Provisioned);
                if let Some(reason) = vm.reap {
                    self.reap(&name, reason);
                }
            }
            Err(e) => {
                self.metrics.provision_failures.inc(&[("pool", &vm.pool), ("step", e.step())]);
                error!(vm = %name, pool = %vm.pool, job_id = vm.job_id, step = e.step(), error = %e, "provisioning failed; the job stays queued");
                self.bump_backoff(&vm.pool);
                debug_assert_eq!(vm::next(vm.state, Input::ProvisionFailed), Some(VmState::TearingDown));
                self.begin_teardown(&name, Reason::ProvisionFailed);
            }
        }
    }

    /// QEMU paused the VM because a write to its overlay failed, as a full storage pool
    /// makes it: tear it down without counting it against the job (which stays queued), and
    /// back the pool off as for any failure of the host.
    fn on_disk_error(&mut self, name: &str) {
        if !self.domain_stop_ends(name) {
            return;
        }
        let vm = &self.vms[name];
        let pool = vm.pool.clone();
        error!(vm = %name, pool = %pool, job_id = vm.job_id, storage_pool = %self.config.libvirt.storage_pool, "domain paused on a disk I/O error: is the storage pool full? tearing it down; the job stays queued");
        self.bump_backoff(&pool);
        self.reap(name, Reason::DiskError);
    }

    /// Whether its domain stopping (or pausing for good) ends this VM: not while it is
    /// still being provisioned or already torn down.
    fn domain_stop_ends(&self, name: &str) -> bool {
        self.vms.get(name).is_some_and(|v| vm::next(v.state, Input::DomainStopped) == Some(VmState::TearingDown))
    }

    fn bump_backoff(&mut self, pool: &str) {
        let delay = self.backoff.get(pool).map(|b| (b.delay * 2).min(BACKOFF_MAX)).unwrap_or(BACKOFF_MIN);
        warn!(pool, retry_in_ms = delay.as_millis() as u64, "provisioning backs off");
        self.backoff.insert(pool.to_string(), Backoff { until: Instant::now() + delay, delay });
    }

    /// Timers, then demand: per pool, available runners = unserved jobs, within capacity.
    fn reconcile(&mut self) {
        if self.stopping {
            return;
        }
        let now = SystemTime::now();
        let expired: Vec<(String, Reason)> = self
            .vms
            .values()
            .filter_map(|v| {
                let pool = self.config.pool(&v.pool)?;
                vm::expired(v, pool, self.config.reconcile.stop_grace, now).map(|r| (v.name.clone(), r))
            })
            .collect();
        for (name, reason) in expired {
            self.reap(&name, reason);
        }
        let retry: Vec<String> = self
            .teardown_retry_at
            .iter()
            .filter(|(n, t)| **t <= Instant::now() && !self.tearing_down.contains(*n))
            .map(|(n, _)| n.clone())
            .collect();
        for name in retry {
            if let Some(vm) = self.vms.get(&name).cloned() {
                self.spawn_teardown(vm, false);
            }
        }
        self.remove_spent_seeds();
        if !self.hv_ready {
            return;
        }
        for pool in self.config.pools.clone() {
            self.reconcile_pool(&pool);
        }
    }

    fn reconcile_pool(&mut self, pool: &PoolConfig) {
        let mut unserved: Vec<&JobRec> =
            self.jobs.values().filter(|j| j.is_unserved() && j.pool.as_deref() == Some(&pool.name)).collect();
        unserved.sort_by_key(|j| (j.received_at, j.info.id));
        let unserved: Vec<u64> = unserved.iter().map(|j| j.info.id).collect();
        let mut available: Vec<&VmRec> =
            self.vms.values().filter(|v| v.pool == pool.name && v.state.is_available() && v.reap.is_none()).collect();
        let alive = self.vms.values().filter(|v| v.pool == pool.name).count();

        // Surplus: more available runners than unserved jobs (cancelled, served elsewhere).
        let surplus = available.len().saturating_sub(unserved.len());
        let now = Instant::now();
        let unserved_set: BTreeSet<u64> = unserved.iter().copied().collect();
        available.sort_by_key(|v| (unserved_set.contains(&v.job_id), std::cmp::Reverse(v.created_at)));
        let surplus_names: Vec<String> = available.iter().take(surplus).map(|v| v.name.clone()).collect();
        let covered: BTreeSet<u64> = available.iter().map(|v| v.job_id).collect();
        let available_count = available.len();
        self.surplus_since.retain(|n, _| surplus_names.contains(n) || !hypervisor::is_vm_of_pool(n, &pool.name));
        for name in surplus_names {
            let since = *self.surplus_since.entry(name.clone()).or_insert(now);
            if now.duration_since(since) >= pool.idle_timeout {
                self.reap(&name, Reason::Surplus);
            }
        }

        if self.draining {
            return;
        }
        if self.backoff.get(&pool.name).is_some_and(|b| b.until > now) {
            return;
        }
        let deficit = unserved.len().saturating_sub(available_count);
        let room = pool.max_vms.saturating_sub(alive);
        let n = deficit.min(room);
        if n == 0 {
            return;
        }
        if pool.registration == Registration::Jit && self.runner_group_id.is_none() {
            self.resolve_group();
            return;
        }
        let queue: Vec<(u64, &str)> =
            unserved.iter().filter_map(|id| self.jobs.get(id).map(|j| (*id, j.info.repository.as_str()))).collect();
        let mut alive_by_repo: BTreeMap<String, usize> = BTreeMap::new();
        for v in self.vms.values().filter(|v| v.pool == pool.name) {
            *alive_by_repo.entry(v.repository.clone()).or_insert(0) += 1;
        }
        let host = match self.config.capacity.max_vms {
            Some(cap) => cap.saturating_sub(self.vms.len()),
            None => usize::MAX,
        };
        let room = demand::Room { pool: n, host, per_repository: pool.max_vms_per_repository };
        let picks = demand::pick(&queue, &covered, &alive_by_repo, room);
        for job in picks {
            self.start_provision(job, pool);
        }
    }

    /// Once libvirt answers: the pools' worst case against the host, in the log.
    fn report_capacity(&self) {
        let need = crate::capacity::worst_case(&self.config.pools, self.config.capacity.max_vms);
        let hv = self.ctx.hv.clone();
        tokio::spawn(async move {
            match tokio::task::spawn_blocking(move || hv.host_resources()).await {
                Ok(Ok(host)) => {
                    let problems = crate::capacity::findings(&need, &host);
                    for p in &problems {
                        warn!("capacity: {p}");
                    }
                    info!(
                        vms = need.vms,
                        vcpus = need.vcpus,
                        memory_mib = need.memory_mib,
                        disk_gib = need.disk_gib,
                        host_cpus = host.cpus,
                        host_memory_mib = host.memory_mib,
                        pool_gib = host.pool_gib,
                        fits = problems.is_empty(),
                        "capacity: the pools' worst case against this host"
                    );
                }
                Ok(Err(e)) => warn!(error = %e, "capacity: cannot read the host's resources"),
                Err(e) => warn!(error = %e, "capacity: task failed"),
            }
        });
    }

    fn resolve_group(&mut self) {
        if self.group_pending {
            return;
        }
        self.group_pending = true;
        let ctx = self.ctx.clone();
        let name = self.config.github.runner_group.clone();
        tokio::spawn(async move {
            let r = ctx.github.runner_group_id(&name).await;
            let _ = ctx.events.send(Event::GroupResolved(r));
        });
    }

    // ---- hypervisor ----

    fn on_hv(&mut self, ev: HvEvent) {
        match ev {
            HvEvent::Stopped(name) => {
                // Webhooks already accepted may say its runner took (and finished) a job:
                // apply them first, or the VM would look like it died before taking one.
                self.drain_inbox();
                if self.domain_stop_ends(&name) {
                    info!(vm = %name, "domain stopped");
                    self.reap(&name, Reason::Stopped);
                }
            }
            HvEvent::IoPaused(name) => self.on_disk_error(&name),
            HvEvent::Started(_) => {}
            HvEvent::Disconnected => {
                warn!("libvirt connection lost: no provisioning until it is back");
                self.hv_ready = false;
            }
            HvEvent::Reconnected => {
                if self.hv_connected_once {
                    self.metrics.libvirt_reconnects.inc();
                    info!("libvirt connection back: full sweep");
                }
                if !self.hv_connected_once {
                    self.report_capacity();
                }
                self.hv_connected_once = true;
                self.start_sweep();
            }
        }
    }

    fn start_sweep(&mut self) {
        if self.sweep_running {
            return;
        }
        self.sweep_running = true;
        self.sweep_started = Instant::now();
        let ctx = self.ctx.clone();
        tokio::task::spawn_blocking(move || {
            let vms = ctx.hv.list_vms();
            let volumes = ctx.hv.list_volumes();
            let pool = ctx.hv.check_pool();
            let _ = ctx.events.send(Event::Swept { vms, volumes, pool });
        });
    }

    /// Compares the hypervisor with the records: stopped or vanished domains are torn down,
    /// running unknown domains of ours are adopted, the rest (and stray volumes) removed.
    fn on_swept(
        &mut self,
        vms: Result<Vec<VmInfo>, HvError>,
        volumes: Result<Vec<String>, HvError>,
        pool: Result<(), HvError>,
    ) {
        self.sweep_running = false;
        // What was torn down after this sweep listed is gone, whatever the listing says.
        let listed_at = self.sweep_started;
        self.torn_down_at.retain(|_, t| t.elapsed() < Duration::from_secs(600));
        let stale: BTreeSet<String> =
            self.torn_down_at.iter().filter(|(_, t)| **t >= listed_at).map(|(n, _)| n.clone()).collect();
        let found = match vms {
            Ok(v) => v,
            Err(e) => {
                if self.hv_ready {
                    warn!(error = %e, "hypervisor sweep failed");
                }
                self.hv_ready = !matches!(e, HvError::Unavailable { .. }) && self.hv_ready;
                return;
            }
        };
        if let Err(e) = pool {
            warn!(error = %e, "job storage pool unavailable: no provisioning");
            self.hv_ready = false;
            return;
        }
        self.hv_ready = true;
        let by_name: HashMap<&str, &VmInfo> = found.iter().map(|v| (v.name.as_str(), v)).collect();
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for name in names {
            let vm = self.vms[&name].clone();
            let domain = by_name.get(name.as_str()).map(|d| d.state.clone());
            if self.interrupted.remove(&name) {
                // Provisioning was cut short by a restart.
                if domain == Some(DomainState::Running) {
                    info!(vm = %name, "re-adopting a vm whose provisioning finished before the restart");
                    let v = self.vms.get_mut(&name).expect("exists");
                    v.state = VmState::Booting;
                    v.state_since = SystemTime::now();
                    self.dirty_vms.insert(name.clone());
                } else {
                    self.begin_teardown(&name, Reason::Interrupted);
                }
                continue;
            }
            match vm.state {
                VmState::Provisioning => {}
                VmState::TearingDown => {
                    if !self.tearing_down.contains(&name) && !self.teardown_retry_at.contains_key(&name) {
                        self.spawn_teardown(vm, false);
                    }
                }
                _ if domain == Some(DomainState::Running) => {}
                _ if domain == Some(DomainState::IoPaused) => self.on_disk_error(&name),
                _ => {
                    info!(vm = %name, domain = ?domain, "domain not running");
                    self.reap(&name, Reason::Stopped);
                }
            }
        }
        for info in &found {
            // Only names of our pools: other `rv-` domains on this host are not ours to touch.
            if self.vms.contains_key(&info.name) || !self.is_ours(&info.name) || stale.contains(&info.name) {
                continue;
            }
            let now = SystemTime::now();
            let adoptable = info.state == DomainState::Running
                && info.metadata.as_ref().is_some_and(|m| self.config.pool(&m.pool).is_some());
            let meta = info.metadata.clone();
            let vm = VmRec {
                name: info.name.clone(),
                pool: meta.as_ref().map(|m| m.pool.clone()).unwrap_or_default(),
                job_id: meta.as_ref().map(|m| m.job_id).unwrap_or(0),
                run_id: meta.as_ref().map(|m| m.run_id).unwrap_or(0),
                repository: meta.as_ref().map(|m| m.repository.clone()).unwrap_or_default(),
                job_url: meta.as_ref().map(|m| m.job_url.clone()).unwrap_or_default(),
                runner_id: None,
                state: VmState::Booting,
                created_at: meta.as_ref().map(|m| m.created).unwrap_or(now),
                state_since: now,
                took_job: None,
                seed_removed: false,
                reap: None,
            };
            self.vms.insert(info.name.clone(), vm);
            self.dirty_vms.insert(info.name.clone());
            if adoptable {
                info!(vm = %info.name, "adopted a running vm found without a record");
            } else {
                info!(vm = %info.name, running = info.state == DomainState::Running, "removing a domain of ours that has no record");
                self.reap(&info.name, Reason::Orphan);
            }
        }
        match volumes {
            Ok(vols) => {
                for vol in vols {
                    let Some(owner) = hypervisor::vm_of_volume(&vol) else {
                        continue;
                    };
                    if self.vms.contains_key(owner) || !self.is_ours(owner) || stale.contains(owner) {
                        continue;
                    }
                    info!(volume = %vol, "deleting a volume of ours that belongs to no vm");
                    let hv = self.ctx.hv.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = hv.delete_volume(&vol) {
                            warn!(volume = %vol, error = %e, "cannot delete stray volume");
                        }
                    });
                }
            }
            Err(e) => warn!(error = %e, "cannot list volumes"),
        }
        self.prune();
        self.check_images();
    }

    /// Warns when a pool's image declares a runner too old for GitHub (at start, then hourly).
    fn check_images(&mut self) {
        if self.last_image_check.is_some_and(|t| t.elapsed() < Duration::from_secs(3600)) {
            return;
        }
        self.last_image_check = Some(Instant::now());
        for pool in &self.config.pools {
            let problem = crate::images::read_manifest(&pool.image)
                .and_then(|m| crate::images::runner_age_problem(&m, pool.runner_max_age, SystemTime::now()));
            self.metrics.image_runner_outdated.set(&[("pool", &pool.name)], if problem.is_some() { 1.0 } else { 0.0 });
            if let Some(p) = problem {
                warn!(pool = %pool.name, image = %pool.image.display(), "{p}; rebuild the image with a current runner");
            }
        }
    }

    /// Forgets finished jobs and old delivery ids after the redelivery window.
    fn prune(&mut self) {
        if self.last_prune.elapsed() < Duration::from_secs(3600) {
            return;
        }
        self.last_prune = Instant::now();
        let now = SystemTime::now();
        let old: Vec<u64> = self
            .jobs
            .values()
            .filter(|j| !j.is_unserved() && now.duration_since(j.updated_at).unwrap_or_default() > JOB_RETENTION)
            .map(|j| j.info.id)
            .collect();
        for id in old {
            self.jobs.remove(&id);
            self.dirty_jobs.remove(&id);
            self.removed_jobs.insert(id);
        }
        if let Err(e) = self.store.prune_deliveries(JOB_RETENTION, now) {
            warn!(error = %e, "cannot prune delivery ids");
        }
    }

    // ---- GitHub reconciliation ----

    fn start_github_sync(&mut self) {
        if self.github_running || self.stopping {
            return;
        }
        self.github_running = true;
        let ctx = self.ctx.clone();
        let now = SystemTime::now();
        let stale_after = self.config.reconcile.github_interval * 2;
        let stale: Vec<(String, u64)> = self
            .jobs
            .values()
            .filter(|j| j.pool.is_some() && matches!(j.state, JobState::Queued | JobState::InProgress { .. }))
            .filter(|j| now.duration_since(j.updated_at).unwrap_or_default() >= stale_after)
            .take(20)
            .map(|j| (j.info.repository.clone(), j.info.id))
            .collect();
        let repo_scope = match self.config.github.scope() {
            crate::config::Scope::Repository { owner, name } => Some(format!("{owner}/{name}")),
            _ => None,
        };
        let redeliver = self.config.github.hook.is_some();
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let started = SystemTime::now();
            let runners = ctx.github.list_runners().await;
            let mut jobs = Vec::new();
            for (repo, id) in stale {
                match ctx.github.job_status(&repo, id).await {
                    Ok(Some(s)) => jobs.push((id, s)),
                    // GitHub does not know it (deleted run, or never real): it ends here.
                    Ok(None) => jobs.push((
                        id,
                        JobStatus { status: "completed".into(), conclusion: Some(NOT_FOUND.into()), runner_name: None },
                    )),
                    Err(e) => {
                        debug!(job_id = id, error = %e, "cannot refresh job status");
                        break;
                    }
                }
            }
            if redeliver {
                redeliver_failed(&ctx, &store, &metrics).await;
            }
            let mut found = Vec::new();
            if let Some(repo) = repo_scope {
                match ctx.github.queued_jobs(&repo).await {
                    Ok(list) => {
                        for job in list {
                            let delivery = format!("poll-{}", job.id);
                            found.push(JobEvent {
                                delivery,
                                action: JobAction::Queued,
                                job,
                                received_at: SystemTime::now(),
                            });
                        }
                    }
                    Err(e) => debug!(error = %e, "cannot poll queued jobs"),
                }
            }
            let _ = ctx.events.send(Event::GitHubSynced { started, runners, jobs, found });
        });
    }

    fn on_github_synced(
        &mut self,
        started: SystemTime,
        runners: Result<Vec<RunnerInfo>, GhError>,
        jobs: Vec<(u64, JobStatus)>,
        found: Vec<JobEvent>,
    ) {
        self.github_running = false;
        for (id, status) in jobs {
            let Some(job) = self.jobs.get(&id) else {
                continue;
            };
            let mut info = job.info.clone();
            info.runner_name = status.runner_name.clone();
            info.conclusion = status.conclusion.clone();
            let action = match status.status.as_str() {
                "completed" => JobAction::Completed,
                "in_progress" => JobAction::InProgress,
                _ => {
                    if let Some(j) = self.jobs.get_mut(&id) {
                        j.updated_at = SystemTime::now();
                        self.dirty_jobs.insert(id);
                    }
                    continue;
                }
            };
            if status.conclusion.as_deref() == Some(NOT_FOUND) {
                warn!(job_id = id, repository = %info.repository, "GitHub answers 404 for this job: dropped");
            } else {
                info!(job_id = id, status = %status.status, "job status refreshed from GitHub (a webhook was missed)");
            }
            self.apply(JobEvent {
                delivery: format!("refresh-{id}"),
                action,
                job: info,
                received_at: SystemTime::now(),
            });
        }
        for ev in found {
            if !self.jobs.contains_key(&ev.job.id) {
                info!(job_id = ev.job.id, repository = %ev.job.repository, "queued job found by polling (its webhook was missed)");
                self.apply(ev);
            }
        }
        let runners = match runners {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot list runners at GitHub");
                return;
            }
        };
        let by_name: HashMap<&str, &RunnerInfo> = runners.iter().map(|r| (r.name.as_str(), r)).collect();
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for name in names {
            let vm = self.vms[&name].clone();
            if vm.state_since >= started {
                // Its state changed after the list was requested (e.g. its JIT runner was
                // created meanwhile): the list cannot tell about it.
                continue;
            }
            match by_name.get(name.as_str()) {
                Some(r) => {
                    if vm.runner_id.is_none() {
                        self.vms.get_mut(&name).expect("exists").runner_id = Some(r.id);
                        self.dirty_vms.insert(name.clone());
                    }
                    if r.busy {
                        self.transition(&name, Input::TookJob);
                    } else if r.online {
                        self.transition(&name, Input::RunnerOnline);
                    }
                }
                None => match vm.state {
                    // Registered runners vanish when their ephemeral job is done: the guest
                    // is powering off. An idle one vanishing means it was removed under us.
                    VmState::Idle => {
                        info!(vm = %name, "runner registration vanished while idle");
                        self.reap(&name, Reason::RunnerGone);
                    }
                    VmState::Booting
                        if vm.runner_id.is_some()
                            && self.config.pool(&vm.pool).is_some_and(|p| p.registration == Registration::Jit) =>
                    {
                        info!(vm = %name, "JIT runner registration vanished before it came online");
                        self.reap(&name, Reason::RunnerGone);
                    }
                    VmState::Busy => {
                        self.transition(&name, Input::JobCompleted);
                    }
                    _ => {}
                },
            }
        }
        // Runners named like our VMs that have no VM: leftovers of crashes. Remove them.
        for r in &runners {
            if self.is_ours(&r.name) && !self.vms.contains_key(&r.name) && !r.busy {
                info!(runner_name = %r.name, runner_id = r.id, "deleting a runner registration that has no vm");
                let ctx = self.ctx.clone();
                let (id, name) = (r.id, r.name.clone());
                tokio::spawn(async move {
                    if let Err(e) = ctx.github.delete_runner(id).await {
                        warn!(runner_name = %name, error = %e, "cannot delete orphan runner");
                    }
                });
            }
        }
    }

    /// A domain, volume owner or runner name of one of our pools.
    fn is_ours(&self, name: &str) -> bool {
        self.config.pools.iter().any(|p| hypervisor::is_vm_of_pool(name, &p.name))
    }

    // ---- admin ----

    fn on_admin(&mut self, cmd: AdminCommand) -> AdminReply {
        match cmd {
            AdminCommand::Status => AdminReply::Status(self.status()),
            AdminCommand::Drain(on) => {
                self.draining = on;
                self.metrics.draining.set(&[], if on { 1.0 } else { 0.0 });
                if let Err(e) = self.store.commit(&Batch {
                    meta: vec![("draining".into(), if on { b"1".to_vec() } else { b"0".to_vec() })],
                    ..Default::default()
                }) {
                    return AdminReply::Error(format!("cannot persist drain state: {e}"));
                }
                info!(draining = on, "drain state changed");
                AdminReply::Ok(if on {
                    "draining: no new jobs are taken; running VMs finish".into()
                } else {
                    "taking jobs again".into()
                })
            }
            AdminCommand::DestroyVm(name) => match self.vms.get(&name) {
                None => AdminReply::Error(format!("no vm named {name:?} (see runnervisor status)")),
                Some(_) => {
                    self.reap(&name, Reason::Operator);
                    AdminReply::Ok(format!("{name}: teardown started (domain, volumes, runner registration)"))
                }
            },
        }
    }

    fn status(&self) -> Status {
        let now = SystemTime::now();
        let age = |t: SystemTime| now.duration_since(t).unwrap_or_default().as_secs();
        Status {
            draining: self.draining,
            libvirt_connected: self.hv_ready,
            pools: self
                .config
                .pools
                .iter()
                .map(|p| PoolStatus {
                    name: p.name.clone(),
                    vms: self.vms.values().filter(|v| v.pool == p.name).count(),
                    max_vms: p.max_vms,
                    queued: self
                        .jobs
                        .values()
                        .filter(|j| j.is_unserved() && j.pool.as_deref() == Some(&p.name))
                        .count(),
                })
                .collect(),
            queued: self
                .jobs
                .values()
                .filter(|j| j.is_unserved())
                .map(|j| QueuedStatus {
                    job_id: j.info.id,
                    pool: j.pool.clone().unwrap_or_default(),
                    repository: j.info.repository.clone(),
                    age_secs: age(j.received_at),
                })
                .collect(),
            vms: self
                .vms
                .values()
                .map(|v| VmStatus {
                    name: v.name.clone(),
                    pool: v.pool.clone(),
                    state: v.state.as_str().into(),
                    age_secs: age(v.created_at),
                    job_id: v.job_id,
                    took_job: v.took_job,
                    runner_id: v.runner_id,
                    repository: v.repository.clone(),
                })
                .collect(),
        }
    }

    // ---- persistence and gauges ----

    fn flush(&mut self) {
        let batch = Batch {
            jobs: self.dirty_jobs.iter().filter_map(|id| self.jobs.get(id).cloned()).collect(),
            remove_jobs: self.removed_jobs.iter().copied().collect(),
            vms: self.dirty_vms.iter().filter_map(|n| self.vms.get(n).cloned()).collect(),
            remove_vms: self.removed_vms.iter().cloned().collect(),
            inbox_done: self.inbox_done.clone(),
            meta: Vec::new(),
        };
        if batch.is_empty() {
            return;
        }
        match self.store.commit(&batch) {
            Ok(()) => {
                self.dirty_jobs.clear();
                self.dirty_vms.clear();
                self.removed_jobs.clear();
                self.removed_vms.clear();
                self.inbox_done.clear();
            }
            Err(e) => error!(error = %e, "cannot persist scheduler state; will retry"),
        }
    }

    fn update_gauges(&self) {
        for p in &self.config.pools {
            let queued = self.jobs.values().filter(|j| j.is_unserved() && j.pool.as_deref() == Some(&p.name)).count();
            self.metrics.queue_depth.set(&[("pool", &p.name)], queued as f64);
            for s in [
                VmState::Provisioning,
                VmState::Booting,
                VmState::Idle,
                VmState::Busy,
                VmState::Finishing,
                VmState::TearingDown,
            ] {
                let n = self.vms.values().filter(|v| v.pool == p.name && v.state == s).count();
                self.metrics.vms.set(&[("pool", &p.name), ("state", s.as_str())], n as f64);
            }
        }
    }
}

/// Asks GitHub to redeliver failed `workflow_job` deliveries we never received.
async fn redeliver_failed<G: GitHub, H: Hypervisor>(ctx: &Ctx<G, H>, store: &Store, metrics: &Metrics) {
    let deliveries = match ctx.github.list_deliveries(300).await {
        Ok(d) => d,
        Err(e) => {
            warn!(error = %e, "cannot list webhook deliveries");
            return;
        }
    };
    let window = SystemTime::now() - Duration::from_secs(3 * 86400 - 3600);
    let ok_guids: BTreeSet<&str> =
        deliveries.iter().filter(|d| (200..300).contains(&d.status_code)).map(|d| d.guid.as_str()).collect();
    let mut asked = BTreeSet::new();
    for d in &deliveries {
        if d.event != "workflow_job" || (200..300).contains(&d.status_code) || d.delivered_at < window {
            continue;
        }
        // Another attempt of the same delivery succeeded, or we already have it.
        if ok_guids.contains(d.guid.as_str())
            || !asked.insert(d.guid.clone())
            || store.delivery_seen(&d.guid).unwrap_or(false)
        {
            continue;
        }
        match ctx.github.redeliver(d.id).await {
            Ok(()) => {
                metrics.deliveries_redelivered.inc();
                info!(delivery = %d.guid, delivery_id = d.id, action = ?d.action, status_code = d.status_code, "asked GitHub to redeliver a failed delivery");
            }
            Err(e) => warn!(delivery = %d.guid, error = %e, "redelivery request failed"),
        }
    }
}

#[cfg(test)]
mod tests;

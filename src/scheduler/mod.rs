//! The scheduler: the one task that owns jobs and VMs.
//!
//! It receives a closed set of [`Event`]s (webhook inbox, hypervisor lifecycle, results of
//! the tasks it spawned, periodic sweeps, admin commands), updates its [`book::Book`],
//! commits the change, and decides ([`demand`]): provision VMs for unserved jobs within
//! each pool's capacity, tear down VMs that stopped, timed out or are surplus.
//! Provisioning, teardown, sweeps and GitHub calls run as spawned tasks that report back
//! with an event even when they panic ([`event::spawn_reporting`]); nothing else mutates
//! scheduling state.
//!
//! One file per concern: this one holds the run loop and the dispatch; [`intake`] applies
//! job events; [`lifecycle`] moves VMs through [`vm`]'s state machine (provisioning,
//! teardown, back-off); [`sweep`] compares the hypervisor with the book; [`sync`]
//! compares GitHub with it; [`admin`] answers the admin socket.

pub mod admin;
pub mod book;
pub mod claims;
pub mod demand;
pub mod event;
pub mod intake;
pub mod job;
pub mod lifecycle;
pub mod provision;
pub mod reload;
pub mod slots;
pub mod sweep;
pub mod sync;
pub mod vm;
pub mod warm;

#[cfg(test)]
pub(crate) mod fixtures;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::clock::{Clock, Followed, FrameClock, SystemClock};
use crate::config::Config;
use crate::github::GitHub;
use crate::hypervisor::Hypervisor;
use crate::metrics::{self, Metrics};
use crate::model::VmState;
use crate::store::{SchedulerStore, StoreError};
use crate::timeline;
use book::Book;
pub use event::{AdminCommand, Event};
use provision::Ctx;

/// Finished jobs are kept this long so late or redelivered events are recognized.
const JOB_RETENTION: Duration = Duration::from_secs(3 * 86400);

/// A task in flight for one VM, or the retry the scheduler owes it.
#[derive(Debug)]
enum Work {
    /// Provisioning runs; aborted when its deadline passes.
    Provisioning(AbortHandle),
    /// A warm VM's guest is watched until it waits for a job.
    Watching(AbortHandle),
    /// A job's credential is made and delivered into a warm VM.
    Binding(AbortHandle),
    /// A VM made for a snapshot slot is being saved.
    Saving(AbortHandle),
    /// A teardown runs, after this many that failed in a row; `runner_first`: it asks
    /// GitHub about the VM's runner before destroying anything (as its retries do).
    TearingDown { failures: u32, runner_first: bool },
    /// A teardown failed (`failures` in a row); the next try is due `at`.
    TeardownRetry { at: Instant, failures: u32, runner_first: bool },
}

/// The hypervisor as the last sweep and libvirt's events found it.
#[derive(Debug, Default)]
struct HvHealth {
    /// libvirt answered and the storage pool is there: VMs may be provisioned.
    ready: bool,
    /// Why not, when it is not.
    problem: Option<String>,
    connected_once: bool,
}

/// The store's key for the frame of its timestamps ([`FrameClock`]).
const CLOCK_FRAME: &str = "clock_frame";

/// Under a stream of webhooks, the inbox is applied at most this often (see `run`).
const INBOX_PASS: Duration = Duration::from_millis(5);

/// How long a single host with nothing new goes at most between two plans of its pools (see
/// `run`).
const IDLE_PLAN: Duration = Duration::from_secs(5);

/// How long at least a job whose own VM's runner went busy with a job nothing named yet
/// needs no other VM (`Book::taken_unheard`): GitHub's `in_progress` webhook follows a
/// runner's start within seconds, and a restart asks for the deliveries it missed at once;
/// one that failed later is asked for by a sync (so: two `github_interval`s, if longer).
const TAKEN_UNHEARD: Duration = Duration::from_secs(60);

/// How long the gauges stand at most while housekeeping ticks change nothing.
const GAUGES_STAND: Duration = Duration::from_secs(10);

/// How often a store that keeps refusing the scheduler's commits is logged at most.
const UNPERSISTED_LOG_EVERY: Duration = Duration::from_secs(60);

/// The scheduler's commits failing in a row: logged at most once a [`UNPERSISTED_LOG_EVERY`]
/// (a full file system failed every turn's commit, an ERROR line a second into the journal
/// on that full disk), and once when they work again.
struct Unpersisted {
    failures: u64,
    log: crate::logging::Throttle,
}

impl Default for Unpersisted {
    fn default() -> Self {
        Unpersisted { failures: 0, log: crate::logging::Throttle::new(UNPERSISTED_LOG_EVERY) }
    }
}

pub struct Scheduler<G: GitHub, H: Hypervisor> {
    config: Arc<Config>,
    ctx: Ctx<G, H>,
    store: Arc<dyn SchedulerStore>,
    metrics: Arc<Metrics>,
    rx: UnboundedReceiver<Event>,
    inbox_ready: Arc<Notify>,
    book: Book,
    /// Per VM: the task in flight or the retry due. A VM in `Provisioning` without an
    /// entry is one whose provisioning a restart cut short.
    work: BTreeMap<String, Work>,
    lifecycle: lifecycle::State,
    warm: warm::State,
    slots: slots::State,
    sweep: sweep::State,
    sync: sync::State,
    intake: intake::State,
    hv: HvHealth,
    draining: bool,
    stopping: bool,
    /// Wall time in the frame of the book's timestamps (see [`FrameClock`]).
    clock: Arc<FrameClock>,
    /// Each VM's milestones (`runnervisor timeline`).
    timeline: timeline::Recorder,
    /// Fleet mode: the claims this member holds.
    fleet: Option<claims::Fleet>,
    /// Pools that are runner scale sets: the capacity their listeners announce.
    scale_sets: Option<Arc<crate::scaleset::Registry>>,
    unpersisted: Unpersisted,
    /// Each pool's gauges (`update_gauges`), by pool: dropped with the pool's series.
    gauges: BTreeMap<String, metrics::PoolGauges>,
    /// When this process's scheduler was made (`Book::taken_unheard` counts from it).
    started: Instant,
}

impl<G: GitHub, H: Hypervisor> Scheduler<G, H> {
    /// Loads the store. `tx`/`rx` is the scheduler's event channel (the hypervisor's
    /// events are forwarded into it by the caller).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        github: Arc<G>,
        hv: Arc<H>,
        store: Arc<dyn SchedulerStore>,
        metrics: Arc<Metrics>,
        inbox_ready: Arc<Notify>,
        tx: UnboundedSender<Event>,
        rx: UnboundedReceiver<Event>,
    ) -> Result<Self, StoreError> {
        let snap = store.load()?;
        let draining = snap.meta.get("draining").is_some_and(|v| v == b"1");
        // A frame that does not decode is as good as none: the wall clock's is taken.
        let frame = snap.meta.get(CLOCK_FRAME).and_then(|v| serde_json::from_slice(v).ok());
        let mut scheduler = Scheduler {
            ctx: Ctx {
                github,
                hv,
                config: config.clone(),
                events: tx,
                fence_others: Default::default(),
                scale_sets: None,
            },
            config,
            store,
            metrics,
            rx,
            inbox_ready,
            book: Book::new(snap.jobs, snap.vms).with_slots(snap.slots),
            work: BTreeMap::new(),
            lifecycle: lifecycle::State::default(),
            warm: warm::State::default(),
            slots: slots::State::default(),
            sweep: sweep::State::default(),
            sync: sync::State::default(),
            intake: intake::State::default(),
            hv: HvHealth::default(),
            draining,
            stopping: false,
            clock: Arc::new(FrameClock::new(Arc::new(SystemClock), frame)),
            timeline: timeline::Recorder::default(),
            fleet: None,
            scale_sets: None,
            unpersisted: Unpersisted::default(),
            gauges: BTreeMap::new(),
            started: Instant::now(),
        };
        // (Restored at the start of `run`, on the scheduler's own clock.)
        scheduler.sync.saved_late_runners = snap.meta.get(sync::LATE_RUNNERS).cloned();
        scheduler.retire_unknown_pools();
        scheduler.index_pools();
        Ok(scheduler)
    }

    /// Pools that are runner scale sets: their runners' JIT configs come from `runners`, and
    /// each pass publishes the capacity their listeners announce in `registry`.
    pub fn with_scale_sets(
        mut self,
        registry: Arc<crate::scaleset::Registry>,
        runners: Arc<dyn crate::scaleset::ScaleSetRunners>,
    ) -> Self {
        self.scale_sets = Some(registry);
        self.ctx.scale_sets = Some(runners);
        self
    }

    /// Fleet mode: serves only the jobs this member claims.
    pub fn with_fleet(mut self, fleet: claims::Fleet) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// Reads wall time from `clock` (tests: one that follows tokio's paused clock).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Arc::new(FrameClock::new(clock, self.clock.frame()));
        self
    }

    fn now(&self) -> std::time::SystemTime {
        self.clock.now()
    }

    /// Its clock: wall time in the frame of its book (what the intake stamps deliveries
    /// with, so that they move with the book when the wall clock is stepped).
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// Keeps the book in the wall clock's frame. After a step of the wall clock, every
    /// timestamp a timer counts from moves by the step (a step ages no VM, and holds none
    /// back), and the new frame is committed with them; one made while the agent was down
    /// is found at its start, against the frame in the store.
    fn follow_clock(&mut self) {
        let frame = match self.clock.follow() {
            Followed::Same => return,
            Followed::Taken(frame) => {
                self.book.clamp(self.now());
                frame
            }
            Followed::Stepped(frame, step) => {
                warn!(%step, vms = self.book.vms.len(), "the wall clock was stepped: the VMs' timers keep counting from where they were");
                self.book.shift(step);
                self.sweep.shift(step);
                // The watches stored in the old frame are stored again in the new.
                if self.sync.watches_late_runners() {
                    self.save_late_runners();
                }
                self.intake.last_webhook = self.intake.last_webhook.map(|t| step.apply(t));
                frame
            }
        };
        match serde_json::to_vec(&frame) {
            Ok(v) => self.book.set_meta(CLOCK_FRAME, v),
            Err(e) => warn!(error = %e, "cannot encode the clock's frame"),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken, ready: Option<oneshot::Sender<()>>) {
        info!(
            jobs = self.book.all_unserved().count(),
            vms = self.book.vms.len(),
            draining = self.draining,
            "scheduler starting"
        );
        self.metrics.draining.set(self.draining as i64);
        // Deliveries accepted before a step made while the agent was down are in the
        // stored frame: applied first, they move with the rest; so are the late runners'
        // watches.
        let wall = self.now();
        self.sync.restore_late_runners(wall);
        self.drain_inbox();
        self.follow_clock();
        self.start_sweep();
        self.start_github_sync();
        let mut ready = ready;
        let mut sweep = tokio::time::interval(self.config.reconcile.sweep_interval);
        let mut github = tokio::time::interval(self.config.reconcile.github_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        github.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        let mut last_drain = Instant::now();
        // When the inbox is drained next (deliveries are waiting).
        let mut drain_at: Option<Instant> = None;
        // When the gauges were last counted, and the book's changes then.
        let mut gauged: Option<(u64, Instant)> = None;
        // When the pools were last planned, and the book's changes then.
        let mut planned: Option<(u64, Instant)> = None;
        loop {
            // A turn of the housekeeping timer alone (most turns of an idle agent), or of a
            // request that only reads (status).
            let mut tick_only = false;
            // In a fixed order (`biased`), so that a run is the same every time its inputs
            // are (the simulator replays a seed): timers first (each is ready only when
            // due, so a stream of events cannot starve them), then the inbox, then events.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = sweep.tick() => self.start_sweep(),
                _ = github.tick() => self.start_github_sync(),
                _ = housekeeping.tick() => {
                    crate::systemd::watchdog();
                    tick_only = true;
                }
                _ = tokio::time::sleep_until(drain_at.unwrap_or(last_drain)), if drain_at.is_some() => {
                    drain_at = None;
                    self.drain_inbox();
                    last_drain = Instant::now();
                }
                _ = self.inbox_ready.notified(), if drain_at.is_none() => {
                    // Isolated deliveries are applied at once; a stream of them in passes at
                    // most INBOX_PASS apart, so that the pools' demand is not recomputed
                    // (and committed) once per delivery. The wait is a timer of the loop,
                    // not a pause of it: events and status requests are answered meanwhile.
                    drain_at = Some(last_drain + INBOX_PASS);
                    continue;
                }
                Some(ev) = self.rx.recv() => {
                    tick_only = ev.only_reads();
                    let timers = (self.config.reconcile.sweep_interval, self.config.reconcile.github_interval);
                    self.handle(ev);
                    // A reload may change the timers.
                    if timers != (self.config.reconcile.sweep_interval, self.config.reconcile.github_interval) {
                        sweep = tokio::time::interval(self.config.reconcile.sweep_interval);
                        github = tokio::time::interval(self.config.reconcile.github_interval);
                        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        github.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
            }
            self.follow_clock();
            // The pools are planned after every turn that may have changed what they need
            // (an event, a pass of the inbox, a change of the book, a back-off that ran out),
            // and at least every IDLE_PLAN otherwise: a plan is most of a turn's work, and an
            // idle agent's housekeeping ticks were 58% of the simulator's scheduler turns, its
            // status requests 20% more. The timers of VMs (idle, registration and bind
            // timeouts, lifetimes) and teardown retries are acted on up to IDLE_PLAN late. A
            // fleet member plans every turn: its claims, reads of the fleet's rows and a cold
            // member's head start are timed in seconds.
            let idle = tick_only
                && self.fleet.is_none()
                && planned.is_some_and(|(changes, at)| {
                    let now = Instant::now();
                    changes == self.book.changes()
                        && now.duration_since(at) < IDLE_PLAN
                        && !self.lifecycle.backoff.ended_between(at, now)
                        && !self.slots.backoff.ended_between(at, now)
                });
            if !idle {
                self.reconcile();
                planned = Some((self.book.changes(), Instant::now()));
            }
            let _ = self.flush();
            // The gauges read the book, mostly: after a tick that changed nothing they stand
            // (what else they read, the slots' image and config, an event changes; and at
            // least every GAUGES_STAND they are counted anyway).
            let stand =
                gauged.is_some_and(|(changes, at)| changes == self.book.changes() && at.elapsed() < GAUGES_STAND);
            if !tick_only || !stand {
                self.update_gauges();
                gauged = Some((self.book.changes(), Instant::now()));
            }
            if let Some(f) = &self.fleet {
                self.metrics.fleet_claims_held.set(f.held() as i64);
            }
            // Every turn (a store of an atomic), whether or not the gauges were counted: what
            // makes the hypervisor ready or not (a sweep's answer, libvirt's events, a sweep
            // found overdue) is in no one place.
            self.metrics.hypervisor_ready.set(self.hv.ready as i64);
            if self.hv.ready
                && let Some(r) = ready.take()
            {
                let _ = r.send(());
            }
        }
        self.shutdown().await;
    }

    /// Provisioning and teardown tasks still running.
    fn in_flight(&self) -> (usize, usize) {
        let provisioning = self.work.values().filter(|w| matches!(w, Work::Provisioning(_) | Work::Binding(_))).count();
        let tearing_down = self.work.values().filter(|w| matches!(w, Work::TearingDown { .. })).count();
        (provisioning, tearing_down)
    }

    /// SIGTERM: start nothing new, let in-flight provisioning and teardown finish (bounded).
    async fn shutdown(&mut self) {
        self.stopping = true;
        let deadline = Instant::now() + self.config.reconcile.shutdown_grace;
        loop {
            let (provisioning, tearing_down) = self.in_flight();
            if provisioning + tearing_down == 0 {
                break;
            }
            info!(provisioning, tearing_down, "waiting for in-flight work before exiting");
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => self.handle(ev),
                Ok(None) => break,
                Err(_) => {
                    warn!("shutdown grace period over; in-flight work is resumed at next start");
                    break;
                }
            }
            let _ = self.flush();
        }
        let _ = self.flush();
        info!(vms = self.book.vms.len(), "scheduler stopped; running VMs keep running");
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Hv(h) => self.on_hv(h),
            Event::RunnerCreated { vm, runner_id } => {
                if let Some(v) = self.book.vms.get_mut(&vm) {
                    v.runner_id = Some(runner_id);
                    self.book.touch_vm(&vm);
                }
            }
            Event::Provisioned { vm, result } => self.on_provisioned(vm, result),
            Event::TornDown { vm, outcome } => self.on_torn_down(vm, outcome),
            Event::GuestWaiting { vm, result } => self.on_guest_waiting(vm, result),
            Event::Bound { vm, result } => self.on_bound(vm, result),
            Event::Saved { vm, result } => self.on_saved(vm, result),
            Event::SlotFound { slot, result } => self.on_slot_found(slot, result),
            Event::SlotDomainDestroyed { slot, result } => self.on_slot_domain_destroyed(slot, result),
            Event::Swept(sweep) => self.on_swept(*sweep),
            Event::GitHubSynced { started, runners, jobs, found, deliveries_checked, pruned } => {
                self.sync.on_pruned(pruned, Instant::now());
                self.on_github_synced(started, runners, jobs, found, deliveries_checked)
            }
            Event::GroupResolved(r) => self.on_group_resolved(r),
            Event::Claimed { asked, sent, result } => self.on_claimed(asked, sent, result),
            Event::Renewed { asked, sent, result } => self.on_renewed(asked, sent, result),
            Event::Heartbeat { members, database } => self.on_heartbeat(members, database),
            Event::TakeoverChecked { job, status } => self.on_takeover_checked(job, status),
            Event::FleetRead(result) => self.on_fleet_read(result),
            Event::ClaimedOnWrite(c) => self.on_claimed_on_write(c),
            Event::FleetWake => {
                if let Some(f) = self.fleet.as_mut() {
                    f.read_due = true;
                }
            }
            Event::Admin(cmd, reply) => {
                let r = self.on_admin(cmd);
                let _ = reply.send(r);
            }
            Event::Reload(config, reply) => {
                let r = self.on_reload(&config);
                let _ = reply.send(r);
            }
        }
    }

    /// Timers, then demand (see [`Scheduler::plan_pools`]); in a fleet, then the room
    /// this member has for new jobs goes to its intake (claim on write).
    fn reconcile(&mut self) {
        self.plan_pools();
        if let Some(f) = self.fleet.as_mut() {
            f.publish_room();
        }
    }

    /// Timers, then demand: per pool, available runners = unserved jobs, within capacity.
    fn plan_pools(&mut self) {
        if self.stopping {
            return;
        }
        self.expire_timers();
        self.retry_teardowns();
        self.watch_guests();
        if self.hv.ready {
            self.bind_cold_vms();
        }
        self.forget_retired_pools();
        self.tend_claims();
        if !self.hv.ready {
            // No VM can be made: GitHub is to assign the scale sets nothing more.
            if let Some(registry) = &self.scale_sets {
                for p in self.config.pools.iter().filter(|p| p.scale_set().is_some()) {
                    registry.set_capacity(&p.name, 0);
                }
            }
            return;
        }
        self.tend_slots();
        let config = self.config.clone();
        // The jobs whose own runner went busy with a job not named yet, for every pool.
        let within = TAKEN_UNHEARD.max(config.reconcile.github_interval.saturating_mul(2));
        let taken = self.book.taken_unheard(self.now(), self.started.elapsed(), within);
        for pool in &config.pools {
            self.reconcile_pool(pool, &taken);
        }
    }

    /// Plans `pool`; `taken`: the jobs held from a new VM ([`Book::taken_unheard`]).
    fn reconcile_pool(&mut self, pool: &crate::config::PoolConfig, taken: &BTreeSet<u64>) {
        let now = Instant::now();
        let host_room = match self.config.capacity.max_vms {
            Some(cap) => cap.saturating_sub(self.book.vms.len()),
            None => usize::MAX,
        };
        // A pool a reload removed drains: its VMs finish, it makes none.
        let gate = demand::Gate {
            hold: self.draining || pool.retiring || self.lifecycle.backing_off(&pool.name, now),
            draining: self.draining || pool.retiring,
            host_room,
        };
        let decision = {
            let mut unserved = self.book.unserved(&pool.name);
            // A job whose last attempt a teardown still asks GitHub about (its runner may
            // be busy with it) gets no VM meanwhile.
            let book = &self.book;
            unserved.retain(|j| !book.last_attempt_in_question(j, pool.max_attempts));
            // Nor does one whose own runner went busy with a job not named yet.
            unserved.retain(|j| !taken.contains(&j.info.id));
            if let Some(fleet) = &self.fleet {
                // Jobs another member holds are its to serve (counting stays fleet-wide:
                // a runner of ours may still take one).
                unserved.retain(|j| !fleet.elsewhere(j.info.id, now));
            }
            let vms: Vec<_> = self.book.vms_of(&pool.name).collect();
            let since = &self.lifecycle.surplus_since;
            // The host's room goes to jobs before spares: while the host is full and
            // another pool has jobs waiting that need a new place (below its own `max_vms`),
            // this pool keeps no warm VM and makes no slot (a warm VM of one pool held the
            // only place of `capacity.max_vms` for good while another pool's jobs queued:
            // found by the simulator). Jobs needing none are no reason: the warm VM given up
            // for them (their pool at its `max_vms`, a runner of theirs on its way, another
            // member holding them) was made again once its place was free, and reaped again
            // when it waited, every few seconds (found in a profile of the simulator).
            let others_waiting: usize = match self.config.capacity.max_vms {
                Some(_) => {
                    let mut waiting: BTreeMap<&str, usize> = BTreeMap::new();
                    for j in self.book.all_unserved() {
                        let Some(p) = j.pool.as_deref().filter(|p| *p != pool.name) else { continue };
                        if self.fleet.as_ref().is_some_and(|f| f.elsewhere(j.info.id, now)) {
                            continue;
                        }
                        // (Nor is a job whose last attempt is in question: its pool makes
                        // it no VM meanwhile, above.)
                        if self.book.last_attempt_in_question(j, self.config.max_attempts(p))
                            || taken.contains(&j.info.id)
                        {
                            continue;
                        }
                        *waiting.entry(p).or_default() += 1;
                    }
                    // A scale set's jobs waiting to be acquired are in no book: it acquires
                    // only as many as it has room for, none while the host is full (other
                    // pools' warm VMs held its only places for good, its jobs never acquired:
                    // found by the simulator).
                    if let Some(registry) = &self.scale_sets {
                        for p in self.config.pools.iter().filter(|p| p.scale_set().is_some() && p.name != pool.name) {
                            let n = usize::try_from(registry.available(&p.name)).unwrap_or(usize::MAX);
                            *waiting.entry(p.name.as_str()).or_default() += n;
                        }
                    }
                    waiting
                        .into_iter()
                        .filter_map(|(p, n)| {
                            let other = self.config.pool(p)?;
                            let theirs: Vec<_> = self.book.vms_of(p).collect();
                            // Runners on their way: VMs made for jobs, and unbound warm VMs.
                            let coming = theirs
                                .iter()
                                .filter(|v| v.reap.is_none() && (v.is_available() || v.is_unbound_warm()))
                                .count();
                            Some(n.saturating_sub(coming).min(other.max_vms.saturating_sub(theirs.len())))
                        })
                        .sum()
                }
                None => 0,
            };
            // A spare is made only with a place left beyond those jobs' (`>`); one already
            // there is kept while they have their places without its (`>=`).
            let spares = others_waiting == 0 || host_room > others_waiting;
            let warm = match spares {
                true => pool.warm,
                false if host_room >= others_waiting => {
                    pool.warm.min(vms.iter().filter(|v| v.is_unbound_warm() && v.reap.is_none()).count())
                }
                false => 0,
            };
            let limits = demand::Limits {
                slots_missing: if spares { self.slots_missing(pool) } else { 0 },
                slots_free: self.free_slots(&pool.name).len(),
                warm,
                ..demand::Limits::of(pool)
            };
            let mut decision = demand::plan(limits, &unserved, &vms, since, &self.warm.cold_only, gate, now);
            if !spares {
                // Kept, not made: one bound now is not replaced while other pools' jobs need
                // the host's room.
                decision.warm = 0;
            }
            if let Some(fleet) = self.fleet.as_mut() {
                fleet.note_room(pool, &vms, &decision, gate);
            }
            decision
        };
        if let (Some(registry), Some(_)) = (&self.scale_sets, pool.scale_set()) {
            // The jobs it could run at once: its VMs (warm ones and slots among them) and
            // the places it may still start.
            let held = self.book.vms_of(&pool.name).count();
            // None either while it holds (drains, retires, backs off after failures): GitHub
            // would assign jobs no VM is made for, and give them up after a while.
            let capacity = if gate.hold { 0 } else { pool.max_vms.min(held.saturating_add(host_room)) };
            registry.set_capacity(&pool.name, capacity as u64);
        }
        let since = &mut self.lifecycle.surplus_since;
        // Another pool's timers stay: a VM's pool is its record's (its name alone cannot
        // tell "small" job 2 attempt 41 from "small-2" job 41). A VM without a record is gone.
        let book = &self.book;
        since.retain(|n, _| decision.surplus.contains(n) || book.vms.get(n).is_some_and(|v| v.pool != pool.name));
        for name in &decision.surplus {
            since.entry(name.clone()).or_insert(now);
        }
        for name in decision.reap {
            self.reap(&name, crate::model::Reason::Surplus);
        }
        for name in decision.unwarm {
            self.reap(&name, crate::model::Reason::WarmSurplus);
        }
        // The plan counted its bindings as made; a waiting VM not bound now (its job not
        // claimed here yet: another member may win it) is still spare, and no VM is made
        // to replace it (in a fleet, every member that read the job would otherwise boot
        // one, and reap it as surplus once the job was won elsewhere).
        let not_bound = decision.bind.len().saturating_sub(self.serve_pool(pool, decision.bind, decision.provision));
        for _ in 0..decision.warm.saturating_sub(not_bound) {
            self.start_warm(pool);
        }
        for _ in 0..decision.slots {
            self.start_slot(pool);
        }
    }

    /// Binds waiting warm VMs and provisions cold ones for the jobs this member may serve
    /// now (all of them on a single host; in a fleet, those it holds); how many it bound.
    fn serve_pool(&mut self, pool: &crate::config::PoolConfig, bind: Vec<(u64, String)>, provision: Vec<u64>) -> usize {
        if provision.is_empty() && bind.is_empty() {
            return 0;
        }
        if self.slot_found_pending(pool) {
            // A saved slot found without a record is looked at (milliseconds): the job may
            // be restored from it rather than boot.
            return 0;
        }
        // A scale set's runners join its group (the set makes their JIT configs).
        if pool.registration == crate::config::Registration::Jit
            && pool.scale_set().is_none()
            && self.sync.runner_group_id.is_none()
        {
            self.resolve_group();
            return 0;
        }
        let bind_jobs = self.claimed_only(bind.iter().map(|(j, _)| (*j, false)).collect());
        let mut bound = 0;
        for (job, vm) in bind {
            if bind_jobs.contains(&job) {
                self.start_bind(job, &vm, pool);
                bound += 1;
            }
        }
        // In a fleet, a job a free snapshot slot serves here is no cold boot (slots count
        // as warm VMs do). A job waiting for a slot is looked at again next pass.
        let (free, releasing) = (self.free_slots(&pool.name).len(), self.slots_releasing(pool));
        let want = slots::restore_or_boot(provision, &self.warm.cold_only, free, releasing);
        for job in self.claimed_only(want) {
            self.start_provision(job, pool);
        }
        bound
    }

    /// Commits what changed since the last commit. On failure everything stays to commit
    /// again, and the error is returned for callers that must not go on without it.
    fn flush(&mut self) -> Result<(), StoreError> {
        let batch = self.book.batch();
        if batch.is_empty() {
            return Ok(());
        }
        match self.store.commit(&batch) {
            Ok(()) => {
                self.book.committed();
                if self.unpersisted.failures > 0 {
                    info!(failures = self.unpersisted.failures, "scheduler state persisted again");
                    self.unpersisted = Unpersisted::default();
                }
                Ok(())
            }
            Err(e) => {
                self.unpersisted.failures += 1;
                if let Some(left_out) = self.unpersisted.log.check_at(Instant::now().into_std()) {
                    error!(error = %e, failures = self.unpersisted.failures, left_out, "cannot persist scheduler state; will retry (logged once a minute while it fails)");
                }
                Err(e)
            }
        }
    }

    fn update_gauges(&mut self) {
        let queued = self.book.unserved_counts();
        let mut vms: BTreeMap<(&str, VmState), i64> = BTreeMap::new();
        for v in self.book.vms.values() {
            *vms.entry((v.pool.as_str(), v.state)).or_default() += 1;
        }
        for p in &self.config.pools {
            if !self.gauges.contains_key(&p.name) {
                self.gauges.insert(p.name.clone(), self.metrics.pool_gauges(&p.name));
            }
            let g = &self.gauges[&p.name];
            g.queue_depth.set(queued.get(p.name.as_str()).copied().unwrap_or(0) as i64);
            for (gauge, s) in g.vms.iter().zip(VmState::ALL) {
                gauge.set(vms.get(&(p.name.as_str(), s)).copied().unwrap_or(0));
            }
            g.slots_ready.set(self.free_slots(&p.name).len() as i64);
        }
    }
}

#[cfg(test)]
mod tests;

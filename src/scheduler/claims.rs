//! Fleet mode in the scheduler: a member serves a job only while it holds the job's claim
//! (`fleet::claims`). The job rows in PostgreSQL are the queue: the member reads the rows
//! it needs (the oldest queued jobs of its pools that no live claim holds, the jobs it
//! knows of, the jobs its runners took) when woken (`NOTIFY`: a job left to claim) and
//! every [`READ_POLL`] (the other changes, such as a job one of its runners took moving on
//! or a lease that ran out), and applies each as an event, as a single host applies its webhooks: a
//! row is the job's state now, so nothing is missed however late its writer committed.
//! What changes is which jobs this member makes VMs for:
//! - demand leaves out jobs another member holds (until its lease runs out, as read; tried
//!   again then, which is how a dead member's jobs come back: a claim wins);
//! - a job the plan wants served is claimed first (one batch per pass), and served once
//!   the claim is won; a cold VM leaves a young job `cold_head_start` to the others while
//!   one of them keeps warm VMs;
//! - a job taken over from a member whose lease ran out is checked at GitHub first (still
//!   queued?) before a VM is made for it;
//! - the claims of jobs still queued are renewed every third of the lease;
//! - when this member's runner takes a job another member holds, the job it was made for
//!   is left to that member's VM (now without a job) for half a lease before it gets a
//!   second VM here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::Scheduler;
use super::event::{Event, spawn_reporting};
use crate::fleet::FleetError;
use crate::fleet::claims::{Claimed, Claims, JobRow, MemberInfo, ReadQuery};
use crate::fleet::intake::{ClaimedOnWrite, FleetIntake, Reserve};
use crate::github::GitHub;
use crate::hypervisor::Hypervisor;
use crate::model::{JobAction, JobEvent, JobState, VmState};

/// How soon a job another member held is tried again (its holder may have died).
const RETRY_OTHERS: Duration = Duration::from_secs(15);
/// After a failed call to the fleet's database.
const RETRY_ERROR: Duration = Duration::from_secs(2);
/// How often the job rows are read without a notification: the changes that wake no one
/// (a lease that ran out, a job claimed on write, another member's runner taking a job)
/// and any notification missed while the `LISTEN` connection was down.
pub const READ_POLL: Duration = Duration::from_secs(2);
/// The oldest unheld queued jobs of this member's pools read at a time: more than it can
/// serve at once; the next read brings the next ones as these are claimed.
const READY_WINDOW: u32 = 256;

/// A claim this member holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// The attempt the claim started (the VM's name carries it).
    attempt: u32,
    /// A VM was made on it.
    used: bool,
    /// Until when it may be used, by this member's clock: the lease from when the claim or
    /// its last renewal that succeeded was sent, less a margin (the database's lease runs
    /// from when it got the request, later). Past it another member may hold the job.
    until: Instant,
    /// Claimed on write (`intake::Reserve`): when, if not used yet. Such a claim the plan
    /// does not take up soon (the room was counted high) goes back to the fleet.
    on_write: Option<Instant>,
}

impl Held {
    fn new(attempt: u32, used: bool, sent: Instant, lease: Duration) -> Held {
        Held { attempt, used, until: sent + lease - lease / 10, on_write: None }
    }

    /// The claim of a VM found at start: held as far as this member knows, of an attempt
    /// the first renewal tells, and unusable until that renewal confirms it.
    fn adopted(now: Instant) -> Held {
        Held { attempt: 0, used: true, until: now, on_write: None }
    }
}

/// How long a claim made on write may wait unused before it goes back to the fleet.
fn unused_on_write(lease: Duration) -> Duration {
    lease / 3
}

/// See [`Fleet::may_bind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MayBind {
    Yes,
    Wait,
    Lost,
}

pub struct Fleet {
    pub(super) claims: Arc<dyn Claims>,
    /// Where what this member learns from GitHub for the fleet goes (the fleet's log);
    /// `None` (unit tests): applied here only.
    pub(super) publish: Option<FleetIntake>,
    pub host: String,
    lease: Duration,
    cold_head_start: Duration,
    /// Jobs this member holds (a second VM for a job claims again: a new attempt, a new
    /// name).
    held: BTreeMap<u64, Held>,
    /// Claimed, but taken over from a member that went away: checked at GitHub first.
    verifying: BTreeSet<u64>,
    /// A claim is in flight.
    pending: BTreeSet<u64>,
    /// Jobs another member holds: not tried again before then.
    others: BTreeMap<u64, Instant>,
    /// No claim before then (the database failed).
    pause_until: Option<Instant>,
    renewing: bool,
    renewed_at: Option<Instant>,
    /// The jobs of the VMs found at start were taken as held; the first renewal tells.
    adopted: bool,
    /// The fleet as last heard (every member's heartbeat).
    pub members: Vec<MemberInfo>,
    /// The fleet's database's addresses, as last resolved (the fence drops them).
    database: Vec<Ipv4Addr>,
    heartbeat_pending: bool,
    /// A read of the job rows is in flight.
    reading: bool,
    /// A notification (a job left to claim) came since the last read began.
    pub(super) read_due: bool,
    read_at: Option<Instant>,
    read_failing: bool,
    /// Set once this member holds its lock on its host id (`fleet::listen`): no claim,
    /// renewal or heartbeat before. `None`: at once (unit tests).
    joined: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The room for new jobs this member's intake may claim on write, and this pass's
    /// count of it (label set → jobs).
    reserve: Option<Arc<Reserve>>,
    room: BTreeMap<Vec<String>, u32>,
    /// Of it, places for cold VMs (out of the host's room, across pools).
    room_cold: usize,
}

impl Fleet {
    pub fn new(
        claims: Arc<dyn Claims>,
        publish: Option<FleetIntake>,
        host: String,
        lease: Duration,
        cold_head_start: Duration,
    ) -> Fleet {
        Fleet {
            claims,
            publish,
            host,
            lease,
            cold_head_start,
            held: BTreeMap::new(),
            verifying: BTreeSet::new(),
            pending: BTreeSet::new(),
            others: BTreeMap::new(),
            pause_until: None,
            renewing: false,
            renewed_at: None,
            adopted: false,
            members: Vec::new(),
            database: Vec::new(),
            heartbeat_pending: false,
            reading: false,
            read_due: true,
            read_at: None,
            read_failing: false,
            joined: None,
            reserve: None,
            room: BTreeMap::new(),
            room_cold: 0,
        }
    }

    /// New queued jobs its intake writes may be claimed on write, within the room each
    /// pass leaves (`reserve`, shared with the intake).
    pub fn with_reserve(self, reserve: Arc<Reserve>) -> Fleet {
        Fleet { reserve: Some(reserve), ..self }
    }

    /// A pool's room for a new job now, from its plan: a waiting warm VM no job takes this
    /// pass, or (while no other member keeps warm VMs, which a cold member leaves young
    /// jobs to) a place for a cold VM. None while the pool holds back (back-off, drain), has
    /// a per-repository cap (the row's repository is not weighed here), or this member is
    /// not joined or its claims fail.
    pub(super) fn note_room(
        &mut self,
        pool: &crate::config::PoolConfig,
        vms: &[&crate::model::VmRec],
        decision: &super::demand::Decision,
        gate: super::demand::Gate,
    ) {
        let now = Instant::now();
        if self.reserve.is_none()
            || gate.hold
            || pool.max_vms_per_repository.is_some()
            || !self.joined()
            || self.pause_until.is_some_and(|t| t > now)
        {
            return;
        }
        let waiting = vms
            .iter()
            .filter(|v| v.is_unbound_warm() && v.state == VmState::Waiting && v.reap.is_none())
            .filter(|v| !decision.unwarm.contains(&v.name))
            .count();
        let warm = waiting.saturating_sub(decision.bind.len());
        let cold = if self.warm_elsewhere() {
            0
        } else {
            // New VMs this pass (jobs, warm VMs, slots) and the cold room given to the
            // pools before this one come out of the host's room.
            let starting = decision.provision.len() + decision.warm + decision.slots;
            let cold = pool
                .max_vms
                .saturating_sub(vms.len() + starting)
                .min(gate.host_room.saturating_sub(starting + self.room_cold));
            self.room_cold += cold;
            cold
        };
        let room = (warm + cold) as u32;
        if room > 0 {
            *self.room.entry(crate::model::label_set(&pool.queue_labels())).or_default() += room;
        }
    }

    /// Hands this pass's room to the intake.
    pub(super) fn publish_room(&mut self) {
        self.room_cold = 0;
        if let Some(r) = &self.reserve {
            r.set(std::mem::take(&mut self.room));
        }
    }

    /// Claims nothing until `joined` is set.
    pub fn joined_when(self, joined: Arc<std::sync::atomic::AtomicBool>) -> Fleet {
        Fleet { joined: Some(joined), ..self }
    }

    pub(super) fn joined(&self) -> bool {
        self.joined.as_ref().is_none_or(|j| j.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Whether another member holds `job` (as last seen).
    pub fn elsewhere(&self, job: u64, now: Instant) -> bool {
        self.others.get(&job).is_some_and(|until| *until > now)
    }

    /// The attempt of the claim this member holds on `job`, if it may make a VM with it.
    pub fn serving(&self, job: u64, now: Instant) -> Option<u32> {
        match self.held.get(&job) {
            Some(h) if !h.used && h.until > now && !self.verifying.contains(&job) => Some(h.attempt),
            _ => None,
        }
    }

    /// Whether a cold VM made on this member's claim of the queued `job` may be bound to it
    /// now: only within the claim's lease (a renewal may come yet); not at all once the
    /// claim is lost (another member serves the job: the VM is surplus).
    pub fn may_bind(&self, job: u64, now: Instant) -> MayBind {
        match self.held.get(&job) {
            Some(h) if h.until > now => MayBind::Yes,
            Some(_) => MayBind::Wait,
            None if self.adopted => MayBind::Lost,
            None => MayBind::Wait,
        }
    }

    /// A VM is made with the claim's attempt.
    pub fn used(&mut self, job: u64) {
        if let Some(h) = self.held.get_mut(&job) {
            h.used = true;
            h.on_write = None;
        }
    }

    /// This member's number in the fleet (0–999, given by the database at its first
    /// heartbeat, kept by its host id): the tail of its warm VMs' and slots' numbers, so
    /// that members sharing a libvirtd (and GitHub's runner names) never share a name.
    pub fn number(&self) -> Option<u64> {
        self.members.iter().find(|m| m.host_id == self.host).and_then(|m| m.number).map(u64::from)
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// This member's runner, made for `made_for`, took `took` instead (any runner takes
    /// any job its labels cover). If another member holds `took`, the VM it made for
    /// `took` has no job now and will most likely take `made_for`: a second VM for
    /// `made_for` here would be surplus. This member leaves it to that VM for half a
    /// lease, then serves it again if it is still queued.
    pub fn runner_swapped(&mut self, made_for: u64, took: u64, now: Instant) {
        if made_for != took && !self.held.contains_key(&took) && self.held.contains_key(&made_for) {
            self.others.insert(made_for, now + self.lease / 2);
        }
    }

    /// Whether another live member keeps warm VMs (as last heard): only then does a cold
    /// VM leave a young job to the others for `cold_head_start`.
    fn warm_elsewhere(&self) -> bool {
        self.members
            .iter()
            .any(|m| m.host_id != self.host && m.warm_target > 0 && Duration::from_secs(m.seen_secs_ago) < self.lease)
    }
}

/// Per scale set this member serves (its name folded, [`crate::scaleset::fold`]), the jobs
/// its pool could run at once now.
fn own_scale_set_capacity(
    config: &crate::config::Config,
    registry: Option<&crate::scaleset::Registry>,
) -> BTreeMap<String, u32> {
    let Some(registry) = registry else { return BTreeMap::new() };
    config
        .pools
        .iter()
        .filter_map(|p| {
            Some((crate::scaleset::fold(p.scale_set()?), registry.own_capacity(&p.name).min(u32::MAX as u64) as u32))
        })
        .collect()
}

impl<G: GitHub, H: Hypervisor> Scheduler<G, H> {
    /// Fleet mode: of the jobs the plan wants served (`want`: job, and whether it would
    /// boot cold), those this member may serve now; the rest are claimed (a young job is
    /// left to warm members for `cold_head_start` first).
    pub(super) fn claimed_only(&mut self, want: Vec<(u64, bool)>) -> Vec<u64> {
        let now = Instant::now();
        let wall = self.now();
        let Some(fleet) = self.fleet.as_mut() else {
            return want.into_iter().map(|(j, _)| j).collect();
        };
        if !fleet.joined() {
            return Vec::new();
        }
        let mut serve = Vec::new();
        let mut claim = Vec::new();
        let warm_elsewhere = fleet.warm_elsewhere();
        for (job, cold) in want {
            if fleet.serving(job, now).is_some() {
                serve.push(job);
                continue;
            }
            if fleet.verifying.contains(&job) || fleet.pending.contains(&job) || fleet.elsewhere(job, now) {
                continue;
            }
            let age = self.book.jobs.get(&job).map(|j| wall.duration_since(j.received_at).unwrap_or_default());
            if cold && warm_elsewhere && age.is_some_and(|a| a < fleet.cold_head_start) {
                // A member with a warm VM waiting takes it first.
                continue;
            }
            claim.push(job);
        }
        if !claim.is_empty() && fleet.pause_until.is_none_or(|t| t <= now) {
            fleet.pending.extend(claim.iter().copied());
            let claims = fleet.claims.clone();
            let (asked, failed) = (claim.clone(), claim.clone());
            spawn_reporting(
                &self.ctx.events,
                async move { Event::Claimed { asked, sent: now, result: claims.claim(claim).await } },
                move |message| Event::Claimed { asked: failed, sent: now, result: Err(FleetError::Pool(message)) },
            );
        }
        serve
    }

    pub(super) fn on_claimed(&mut self, asked: Vec<u64>, sent: Instant, result: Result<Vec<Claimed>, FleetError>) {
        let now = Instant::now();
        let Some(fleet) = self.fleet.as_mut() else { return };
        for job in &asked {
            fleet.pending.remove(job);
        }
        let count = |result: &str, n: usize| {
            self.metrics.fleet_claims.get_or_create(&crate::metrics::ResultLabels::new(result)).inc_by(n as u64)
        };
        let won = match result {
            Ok(won) => won,
            Err(e) => {
                count("error", asked.len());
                warn!(error = %e, jobs = asked.len(), "cannot claim jobs in the fleet's database; retrying");
                fleet.pause_until = Some(now + RETRY_ERROR);
                return;
            }
        };
        count("won", won.len());
        count("lost", asked.len().saturating_sub(won.len()));
        let won_ids: BTreeSet<u64> = won.iter().map(|c| c.job).collect();
        for job in asked.iter().filter(|j| !won_ids.contains(j)) {
            fleet.others.insert(*job, now + RETRY_OTHERS.min(fleet.lease / 2));
        }
        let mut verify = Vec::new();
        for c in won {
            fleet.held.insert(c.job, Held::new(c.attempt, false, sent, fleet.lease));
            fleet.others.remove(&c.job);
            if let Some(from) = &c.taken_over_from {
                self.metrics.fleet_takeovers.inc();
                // A scale set's request is not a job the REST API knows: its set's messages
                // say whether it moved on (a runner of the set that took it: its row).
                if self.book.jobs.get(&c.job).is_some_and(|j| j.info.scale_set.is_some()) {
                    info!(job_id = c.job, from = %from, "taking over a scale set's job whose member went away (its lease ran out)");
                    continue;
                }
                info!(job_id = c.job, from = %from, "taking over a job whose member went away (its lease ran out); checking GitHub first");
                fleet.verifying.insert(c.job);
                verify.push(c.job);
            }
        }
        for job in verify {
            self.verify_takeover(job);
        }
    }

    /// A delivery this member's intake wrote and claimed at once: the job is applied (as a
    /// read of its row would) and its claim held as any other.
    pub(super) fn on_claimed_on_write(&mut self, c: ClaimedOnWrite) {
        let now = Instant::now();
        let (job, labels) = (c.event.job.id, c.event.job.queue_labels());
        self.apply(c.event);
        self.intake.last_webhook = Some(self.now());
        let Some(fleet) = self.fleet.as_mut() else { return };
        if let Some(r) = &fleet.reserve {
            r.arrived(&labels);
        }
        self.metrics.fleet_claims.get_or_create(&crate::metrics::ResultLabels::new("won_on_write")).inc();
        fleet.others.remove(&job);
        let held = Held { on_write: Some(now), ..Held::new(c.attempt, false, c.sent, fleet.lease) };
        let queued = self.book.jobs.get(&job).is_some_and(|j| j.state == JobState::Queued);
        if held.until > now && queued {
            fleet.held.entry(job).or_insert(held);
        } else if !fleet.held.contains_key(&job) {
            // Not this member's to serve after all (its pool went in a reload, the news
            // came too late): back to the fleet at once.
            let claims = fleet.claims.clone();
            tokio::spawn(async move {
                if let Err(e) = claims.release(vec![(job, c.attempt)]).await {
                    warn!(error = %e, "cannot give up a claim (its lease runs out instead)");
                }
            });
        }
    }

    /// A job taken over: still queued at GitHub? (Its member may have served it before it
    /// went away, and the news may not have reached the fleet.)
    fn verify_takeover(&mut self, job: u64) {
        let Some(repo) = self.book.jobs.get(&job).map(|j| j.info.repository.clone()) else { return };
        let ctx = self.ctx.clone();
        spawn_reporting(
            &self.ctx.events,
            async move { Event::TakeoverChecked { job, status: ctx.github.job_status(&repo, job).await } },
            move |message| Event::TakeoverChecked {
                job,
                status: Err(crate::github::GhError::Transport { method: "GET".into(), path: "job".into(), message }),
            },
        );
    }

    pub(super) fn on_takeover_checked(
        &mut self,
        job: u64,
        status: Result<Option<crate::github::JobStatus>, crate::github::GhError>,
    ) {
        let action = match &status {
            Ok(Some(s)) if s.status == "completed" => Some(JobAction::Completed),
            Ok(Some(s)) if s.status == "in_progress" => Some(JobAction::InProgress),
            Ok(None) => Some(JobAction::Completed),
            Ok(Some(_)) => None,
            Err(e) => {
                // Serving it anyway is the safe side: a surplus runner is reaped.
                warn!(job_id = job, error = %e, "cannot check a taken-over job at GitHub; serving it");
                None
            }
        };
        if let Some(f) = self.fleet.as_mut() {
            f.verifying.remove(&job);
        }
        if let (Some(action), Some(rec)) = (action, self.book.jobs.get(&job)) {
            let mut info = rec.info.clone();
            if let Ok(Some(s)) = &status {
                info.runner_name = s.runner_name.clone();
                info.conclusion = s.conclusion.clone();
            }
            info!(job_id = job, ?action, "a taken-over job was served before its member went away");
            let received_at = self.now();
            let ev = JobEvent { delivery: format!("takeover-{job}"), action, job: info, received_at };
            // The fleet hears what GitHub said of the job (its row would stay queued
            // otherwise, and each member in turn would take it over and ask again, for
            // good: an independent read found it); this member's book has it at once, its
            // mirror again later (forward only). Not a 404: GitHub's API may lag behind its
            // webhooks, or this token lose the repository, and the fleet's row could never
            // be queued again (the sync drops a job on a second 404 only); the next member
            // to take the job over asks again.
            if matches!(status, Ok(Some(_))) {
                let _ = self.publish(vec![ev.clone()], "the next member to take it over asks again");
            }
            self.apply(ev);
        }
    }

    /// Writes what GitHub said into the fleet's log, in order, in a task of its own (the
    /// whole fleet hears it, this member by its mirror); `unwritten` says what a failure
    /// leaves to whom. Not in a fleet: the events are given back, for this member's book.
    pub(super) fn publish(&self, events: Vec<JobEvent>, unwritten: &'static str) -> Result<(), Vec<JobEvent>> {
        let Some(publish) = self.fleet.as_ref().and_then(|f| f.publish.clone()) else { return Err(events) };
        if !events.is_empty() {
            tokio::spawn(async move {
                for ev in events {
                    if let Err(e) = publish.accept(ev).await {
                        warn!(error = %e, "cannot write what GitHub said into the fleet's log; {unwritten}");
                        break;
                    }
                }
            });
        }
        Ok(())
    }

    /// Reads the job rows this member needs, when one changed or every [`READ_POLL`].
    fn read_rows(&mut self) {
        let now = Instant::now();
        let Some(fleet) = self.fleet.as_ref() else { return };
        let due = fleet.read_due || fleet.read_at.is_none_or(|t| now.duration_since(t) >= READ_POLL);
        if fleet.reading || !due {
            return;
        }
        let query = ReadQuery {
            pools: self.config.pools.iter().filter(|p| !p.retiring).map(|p| p.queue_labels()).collect(),
            ready: READY_WINDOW,
            known: self
                .book
                .jobs
                .iter()
                .filter(|(_, j)| matches!(j.state, JobState::Queued | JobState::InProgress { .. }))
                .map(|(id, _)| *id)
                .collect(),
            runners: self.book.vms.keys().cloned().collect(),
        };
        let Some(fleet) = self.fleet.as_mut() else { return };
        (fleet.reading, fleet.read_due, fleet.read_at) = (true, false, Some(now));
        let claims = fleet.claims.clone();
        spawn_reporting(&self.ctx.events, async move { Event::FleetRead(claims.read(query).await) }, |message| {
            Event::FleetRead(Err(FleetError::Pool(message)))
        });
    }

    /// Applies the rows read: each is the job's state now, applied as an event (a row
    /// already applied changes nothing); a job another member holds is left to it until its
    /// lease runs out.
    pub(super) fn on_fleet_read(&mut self, result: Result<Vec<JobRow>, FleetError>) {
        let now = Instant::now();
        let Some(fleet) = self.fleet.as_mut() else { return };
        fleet.reading = false;
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                if !fleet.read_failing {
                    warn!(error = %e, "cannot read the fleet's jobs; retrying (this member serves what it holds)");
                    fleet.read_failing = true;
                }
                return;
            }
        };
        if std::mem::take(&mut fleet.read_failing) {
            info!("the fleet's jobs are readable again");
        }
        for row in &rows {
            if let Some(left) = row.held_elsewhere {
                fleet.others.insert(row.id, now + left.min(fleet.lease));
            }
        }
        let mut news = false;
        for row in rows {
            let known = self.book.jobs.get(&row.id);
            let Some(info) = row.info.or_else(|| known.map(|j| j.info.clone())) else {
                // A row without a job this agent can read (a newer agent's): another
                // member serves it.
                self.metrics.fleet_rows_unreadable.inc();
                debug!(job_id = row.id, "a fleet job row this agent cannot read; skipped");
                continue;
            };
            news |= super::job::next(known.map(|j| &j.state), row.action, &info, info.scale_set.is_some()).is_some();
            let delivery = format!("fleet-{}-{}", row.id, crate::fleet::intake::state_name(row.action));
            self.apply(JobEvent { delivery, action: row.action, job: info, received_at: row.received_at });
        }
        if news {
            self.intake.last_webhook = Some(self.now());
        }
    }

    /// Keeps the claims of jobs still queued; forgets those of jobs that moved on (their
    /// claim no longer matters) and gives up those of jobs this member abandoned.
    pub(super) fn tend_claims(&mut self) {
        let now = Instant::now();
        if self.fleet.is_none() {
            return;
        }
        self.read_rows();
        let free_slots: u32 = self.config.pools.iter().map(|p| self.free_slots(&p.name).len() as u32).sum();
        // Snapshot slots serve a job about as fast as a warm VM: they count as warm.
        let warm_target =
            self.config.pools.iter().filter(|p| !p.retiring).map(|p| (p.warm + self.slot_target(p)) as u32).sum();
        let Some(fleet) = self.fleet.as_mut() else { return };
        if !fleet.joined() {
            return;
        }
        if !fleet.adopted {
            // After a restart (or a partition), this member's VMs are back from its store;
            // whether it still holds their jobs, the first renewal says. A job it lost is
            // another member's now: its VM here becomes surplus (reaped once idle; a busy
            // runner finishes its job).
            fleet.adopted = true;
            for vm in self.book.vms.values().filter(|v| v.job_id != 0) {
                if self.book.jobs.get(&vm.job_id).is_some_and(|j| j.state == JobState::Queued) {
                    fleet.held.entry(vm.job_id).or_insert(Held::adopted(now));
                }
            }
        }
        fleet.others.retain(|_, until| *until > now);
        let mut release = Vec::new();
        fleet.held.retain(|job, h| match self.book.jobs.get(job).map(|j| &j.state) {
            Some(JobState::Queued) => true,
            Some(JobState::Abandoned { .. }) => {
                release.push((*job, h.attempt));
                false
            }
            _ => false,
        });
        // A claim this member cannot serve now goes back to the fleet at once rather than
        // being renewed until it can (a healthy member takes it): no VM of this member is
        // on the job and it drains, its libvirt is away, or the job's pool backs off (its
        // provisioning failed) or is gone. It claims the job again once it can, if the job
        // is still there to claim.
        let (book, config, lifecycle) = (&self.book, &self.config, &self.lifecycle);
        let blocked_pool = |pool: &str| {
            self.draining
                || !self.hv.ready
                || config.pool(pool).is_none_or(|p| p.retiring)
                || lifecycle.backing_off(pool, now)
        };
        let unservable: Vec<u64> = fleet
            .held
            .keys()
            .copied()
            // (A VM going whose teardown asks GitHub about its runner first may be running
            // the job: its attempt is given back if so.)
            .filter(|job| {
                !book.vms.values().any(|v| v.job_id == *job && v.state != VmState::TearingDown)
                    && !book.charged_to(*job)
            })
            .filter(|job| book.jobs.get(job).and_then(|j| j.pool.as_deref()).is_none_or(blocked_pool))
            .collect();
        if !unservable.is_empty() {
            info!(jobs = ?unservable, draining = self.draining, libvirt_ready = self.hv.ready, "giving back claims this member cannot serve now (another member may)");
            self.metrics
                .fleet_claims
                .get_or_create(&crate::metrics::ResultLabels::new("given_back"))
                .inc_by(unservable.len() as u64);
        }
        for job in &unservable {
            if let Some(h) = fleet.held.remove(job) {
                release.push((*job, h.attempt));
            }
        }
        // A claim made on write that the plan has not taken up: the room was counted high
        // (another member may serve the job now).
        let stale: Vec<u64> = fleet
            .held
            .iter()
            .filter(|(_, h)| h.on_write.is_some_and(|t| now.duration_since(t) >= unused_on_write(fleet.lease)))
            .map(|(job, _)| *job)
            .collect();
        for job in stale {
            if let Some(h) = fleet.held.remove(&job) {
                info!(job_id = job, "giving back a claim made on write this member has not used");
                release.push((job, h.attempt));
            }
        }
        fleet.verifying.retain(|j| fleet.held.contains_key(j));
        if !release.is_empty() {
            let claims = fleet.claims.clone();
            tokio::spawn(async move {
                if let Err(e) = claims.release(release).await {
                    warn!(error = %e, "cannot give up claims (their leases run out instead)");
                }
            });
        }
        let due = fleet.renewed_at.is_none_or(|t| now.duration_since(t) >= fleet.lease / 3);
        if !due || fleet.renewing {
            return;
        }
        fleet.renewed_at = Some(now);
        // A heartbeat still on its way (a lookup of the database's name, a busy pool) is
        // not sent again, and holds up no renewal: those go over a connection of their own
        // (`Member::leases`), and a claim not renewed in time is lost (an independent read
        // found renewals waiting on a hung heartbeat).
        if !fleet.heartbeat_pending {
            self.send_heartbeat(free_slots, warm_target);
        }
        let Some(fleet) = self.fleet.as_mut() else { return };
        if fleet.held.is_empty() {
            return;
        }
        fleet.renewing = true;
        let asked: Vec<(u64, u32)> = fleet.held.iter().map(|(job, h)| (*job, h.attempt)).collect();
        let (claims, a) = (fleet.claims.clone(), asked.clone());
        spawn_reporting(
            &self.ctx.events,
            async move { Event::Renewed { asked: a, sent: now, result: claims.renew(asked).await } },
            move |message| Event::Renewed { asked: Vec::new(), sent: now, result: Err(FleetError::Pool(message)) },
        );
    }

    /// This member's word to the fleet (`runnervisor status` shows every member's).
    fn send_heartbeat(&mut self, free_slots: u32, warm_target: u32) {
        let Some(fleet) = self.fleet.as_ref() else { return };
        let me = MemberInfo {
            host_id: fleet.host.clone(),
            max_vms: self
                .config
                .pools
                .iter()
                .filter(|p| !p.retiring)
                .map(|p| p.max_vms as u32)
                .sum::<u32>()
                .min(self.config.capacity.max_vms.map(|m| m as u32).unwrap_or(u32::MAX)),
            vms: self.book.vms.len() as u32,
            warm_waiting: self.book.vms.values().filter(|v| v.is_unbound_warm() && v.state == VmState::Waiting).count()
                as u32
                + free_slots,
            warm_target,
            held: fleet.held.len() as u32,
            version: env!("CARGO_PKG_VERSION").into(),
            seen_secs_ago: 0,
            // The other members' fences drop them.
            addresses: crate::fence::host_addresses()
                .unwrap_or_default()
                .into_iter()
                .filter(|a| !a.is_loopback())
                .map(|a| a.to_string())
                .collect(),
            // Given by the fleet's database.
            number: None,
            scale_sets: own_scale_set_capacity(&self.config, self.scale_sets.as_deref()),
        };
        let claims = fleet.claims.clone();
        // Bounded: one that hung (a lookup, a pool) would stop every later heartbeat, and the
        // others would take this member for gone.
        let limit = fleet.lease / 3;
        let url = self.config.fleet.as_ref().map(|f| f.postgres.url.clone()).unwrap_or_default();
        if let Some(fleet) = self.fleet.as_mut() {
            fleet.heartbeat_pending = true;
        }
        spawn_reporting(
            &self.ctx.events,
            async move {
                let beat = async {
                    let database = crate::fleet::database_addresses(&url).await;
                    (claims.heartbeat(me).await, database)
                };
                match tokio::time::timeout(limit, beat).await {
                    Ok((members, database)) => Event::Heartbeat { members, database },
                    Err(_) => Event::Heartbeat {
                        members: Err(FleetError::Pool(format!("no answer within {limit:?}"))),
                        database: Vec::new(),
                    },
                }
            },
            |message| Event::Heartbeat { members: Err(FleetError::Pool(message)), database: Vec::new() },
        );
    }

    pub(super) fn on_heartbeat(&mut self, result: Result<Vec<MemberInfo>, FleetError>, database: Vec<Ipv4Addr>) {
        let Some(fleet) = self.fleet.as_mut() else { return };
        fleet.heartbeat_pending = false;
        let heard = result.is_ok();
        match result {
            Ok(members) => fleet.members = members,
            Err(e) => warn!(error = %e, "cannot write this member's heartbeat to the fleet's database"),
        }
        // What the other members' pools of each scale set could run (those heard from
        // within a lease): the set's session announces it with this member's. Without a
        // fresh reading, none: the others may be gone (fewer jobs assigned, not more than
        // the fleet can run).
        if let Some(registry) = &self.scale_sets {
            for pool in self.config.pools.iter() {
                let Some(set) = pool.scale_set().map(crate::scaleset::fold) else { continue };
                let others: u64 = fleet
                    .members
                    .iter()
                    .filter(|m| heard && m.host_id != fleet.host && Duration::from_secs(m.seen_secs_ago) < fleet.lease)
                    .filter_map(|m| m.scale_sets.get(&set))
                    .map(|c| u64::from(*c))
                    .sum();
                registry.set_others(&pool.name, others);
            }
        }
        // The fence drops the other members' addresses and the database's (the last ones
        // known: a failed heartbeat or lookup keeps them). Loopback is dropped anyway.
        let mut others: Vec<Ipv4Addr> = fleet
            .members
            .iter()
            .filter(|m| m.host_id != fleet.host)
            .flat_map(|m| m.addresses.iter().filter_map(|a| a.parse().ok()))
            .collect();
        if !database.is_empty() {
            fleet.database = database;
        }
        others.extend(fleet.database.iter().copied());
        others.retain(|a: &Ipv4Addr| !a.is_loopback());
        if self.ctx.fence_others.set(others) {
            info!(others = ?self.ctx.fence_others.get(), "the fence drops the fleet's other hosts too (members, database)");
        }
    }

    pub(super) fn on_renewed(
        &mut self,
        asked: Vec<(u64, u32)>,
        sent: Instant,
        result: Result<Vec<(u64, u32)>, FleetError>,
    ) {
        let Some(fleet) = self.fleet.as_mut() else { return };
        fleet.renewing = false;
        match result {
            Ok(kept) => {
                for job in fleet.renewed(&asked, sent, kept, Instant::now()) {
                    warn!(job_id = job, "lost the claim of a job (its lease ran out and another member took it)");
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot renew claims in the fleet's database; retrying");
                fleet.renewed_at = None;
            }
        }
    }
}

impl Fleet {
    /// A renewal sent at `sent` for the claims `asked` kept `kept`: their leases run from
    /// then; the claims asked about and not kept are lost (returned), unless the job was
    /// claimed again here since (another attempt, which this renewal could not know).
    fn renewed(&mut self, asked: &[(u64, u32)], sent: Instant, kept: Vec<(u64, u32)>, now: Instant) -> Vec<u64> {
        let kept: BTreeMap<u64, u32> = kept.into_iter().collect();
        let lease = self.lease;
        for (job, attempt) in &kept {
            // The claim renewed is the one held (the epoch); an adopted claim (attempt 0)
            // learns its attempt.
            if let Some(h) = self.held.get_mut(job).filter(|h| h.attempt == 0 || h.attempt == *attempt) {
                h.attempt = *attempt;
                h.until = h.until.max(Held::new(h.attempt, h.used, sent, lease).until);
            }
        }
        let mut lost = Vec::new();
        for (job, attempt) in asked.iter().filter(|(j, _)| !kept.contains_key(j)) {
            let same = self.held.get(job).is_some_and(|h| h.attempt == *attempt || *attempt == 0);
            if same && self.held.remove(job).is_some() {
                self.others.insert(*job, now + RETRY_OTHERS.min(lease / 2));
                lost.push(*job);
            }
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::claims::{MemoryBoard, MemoryClaims};

    /// A claim is used only within its lease as this member counts it: from when the
    /// claim (or the last renewal that succeeded) was sent, less a tenth. A member whose
    /// renewals fail makes no VM on it after that, when another may hold the job.
    #[tokio::test(start_paused = true)]
    async fn a_claim_is_used_only_within_its_lease_from_when_it_was_sent() {
        let lease = Duration::from_secs(30);
        let mut fleet = lone_fleet(lease);
        let sent = Instant::now();
        fleet.held.insert(7, Held::new(3, false, sent, lease));
        #[rustfmt::skip]
        let table = [
            ("at once", Duration::ZERO, Some(3)),
            ("within the lease less a tenth", Duration::from_secs(26), Some(3)),
            ("at the lease less a tenth", Duration::from_secs(27), None),
            ("past the lease", Duration::from_secs(31), None),
        ];
        for (what, after, want) in table {
            assert_eq!(fleet.serving(7, sent + after), want, "{what}");
        }
        // A renewal sent at 20 s that succeeded: 27 s from then.
        let h = fleet.held[&7];
        fleet.held.insert(7, Held::new(h.attempt, h.used, sent + Duration::from_secs(20), lease));
        assert_eq!(fleet.serving(7, sent + Duration::from_secs(46)), Some(3));
        assert_eq!(fleet.serving(7, sent + Duration::from_secs(47)), None);
        // Used: a second VM claims again.
        fleet.used(7);
        assert_eq!(fleet.serving(7, sent), None);
    }

    fn lone_fleet(lease: Duration) -> Fleet {
        let clock = Arc::new(crate::clock::TokioClock::new());
        let claims = MemoryClaims { board: Arc::new(MemoryBoard::default()), host: "hv".into(), lease, clock };
        Fleet::new(Arc::new(claims), None, "hv".into(), lease, Duration::from_secs(1))
    }

    /// A renewal acts on the claims it named: one that finds the job claimed again here
    /// since (a new attempt) loses nothing; one that finds a claim gone loses it; an
    /// adopted claim is unusable until a renewal confirms it, which tells its attempt.
    #[tokio::test(start_paused = true)]
    async fn a_renewal_acts_only_on_the_claims_it_named() {
        let lease = Duration::from_secs(30);
        let mut fleet = lone_fleet(lease);
        let sent = Instant::now();
        // Job 7 was claimed again (attempt 4) while a renewal of attempt 3 was in flight.
        fleet.held.insert(7, Held::new(4, false, sent, lease));
        fleet.held.insert(8, Held::new(1, false, sent, lease));
        let lost = fleet.renewed(&[(7, 3), (8, 1)], sent, vec![], sent);
        assert_eq!(lost, [8], "attempt 3's renewal says nothing of attempt 4");
        assert_eq!(fleet.serving(7, sent), Some(4));
        assert!(fleet.elsewhere(8, sent));
        // Adopted at a restart: not usable before a renewal confirms it.
        fleet.held.insert(9, Held::adopted(sent));
        assert_eq!(fleet.may_bind(9, sent), MayBind::Wait);
        let later = sent + Duration::from_secs(1);
        assert!(fleet.renewed(&[(9, 0)], later, vec![(9, 5)], later).is_empty());
        assert_eq!((fleet.held[&9].attempt, fleet.may_bind(9, later)), (5, MayBind::Yes));
    }
}

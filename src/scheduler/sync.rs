//! GitHub against the book: the periodic sync (runner list, stale jobs refreshed, queued
//! jobs polled in repository scope, failed deliveries redelivered) and the runner group.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use tracing::{debug, error, info, warn};

use super::Scheduler;
use super::event::{Event, spawn_reporting};
use super::provision::Ctx;
use super::vm::Input;
use crate::clock::Clock;
use crate::config::Registration;
use crate::github::{DeliveryInfo, GhError, GitHub, JobStatus, RunnerInfo};
use crate::hypervisor::Hypervisor;
use crate::metrics::Metrics;
use crate::model::{JobAction, JobEvent, JobRec, JobState, Reason, VmState};
use crate::store::SchedulerStore;

/// The conclusion recorded for a job GitHub answers 404 for.
const NOT_FOUND: &str = "not_found";

/// Without a hook's delivery log, jobs are still checked one by one while webhooks flow,
/// but only those without news for this long (one missed webhook among many is invisible).
pub const UNHOOKED_RECHECK: Duration = Duration::from_secs(15 * 60);
/// With a hook: jobs without news for this long are checked all the same, at a low rate
/// (what the delivery log could not show: a delivery GitHub never made, a log read short).
const HOOKED_RECHECK: Duration = Duration::from_secs(60 * 60);

/// How long a queued or running job goes without news before the sync asks GitHub about it
/// (`GET job`, one call per job, at most 20 a sync; again only after a back-off that
/// doubles while GitHub has nothing new to say, up to the recheck period). Missed
/// webhooks are what this catches, so it happens often only when they could go unnoticed
/// (a queued job is also asked about when a runner of its pool waits online without a
/// job, a few more a sync: see `start_github_sync`):
/// - with a hook configured, the sync reads its delivery log and redelivers what failed:
///   once a webhook has arrived since the start, only jobs without news for an hour are
///   checked (before that, jobs a restart may have missed news of are);
/// - without one, jobs without news for two sync intervals are checked while webhooks are
///   quiet, and only those without news for 15 minutes while they flow.
pub fn refresh_after(interval: Duration, webhook_age: Option<Duration>, hooked: bool) -> Duration {
    let stale = interval * 2;
    match webhook_age {
        None => stale,
        Some(_) if hooked => HOOKED_RECHECK.max(stale),
        Some(age) if age < stale => UNHOOKED_RECHECK.max(stale),
        Some(_) => stale,
    }
}

#[derive(Default)]
pub struct State {
    /// A sync's result is awaited.
    running: bool,
    /// Every delivery of the hook's log made before this was handled (received, or asked
    /// again): the next sync reads back to here. Kept in memory: after a restart the log is
    /// read back to the redelivery window ([`MAX_DELIVERIES`] at most), which is what an
    /// outage needs.
    pub deliveries_checked: Option<SystemTime>,
    pub runner_group_id: Option<u64>,
    group_pending: bool,
    /// After a failed resolution, when to ask again (doubling, 5 s to 5 min). Asked again
    /// at once, a rate-limited GitHub answered at once and the scheduler asked in a tight
    /// loop (found by the simulator).
    group_retry: super::lifecycle::Backoffs,
    /// Fleet mode: when this member, leading, last pruned the fleet's tables; whether a
    /// batch was left over (then it prunes again at the next sync).
    pruned_at: Option<tokio::time::Instant>,
    prune_more: bool,
    /// VMs torn down before their runner was seen, and when: a registration of that exact
    /// name showing up later (its guest registered it just before it went) is deleted,
    /// also once its pool is removed and its names are no longer the agent's.
    late_runners: BTreeMap<String, tokio::time::Instant>,
    /// The watches the store had at the start, restored once the scheduler runs.
    pub(super) saved_late_runners: Option<Vec<u8>>,
    /// Jobs asked after (see `start_github_sync`), while they are queued or running.
    asked: BTreeMap<u64, Asked>,
}

/// Why the sync asks GitHub about a job (recorded in `State::asked` once GitHub answered).
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    /// The back-off's base: the stale period, or two syncs beside a waiting runner.
    base: Duration,
    /// Asked because a runner of its pool waited online without a job.
    beside_runner: bool,
}

/// A job the sync asked GitHub about.
#[derive(Debug)]
struct Asked {
    /// How often.
    times: u32,
    /// When it may be asked again.
    next: tokio::time::Instant,
    /// GitHub answered 404 once: the next 404 drops it (GitHub's API may not know yet a
    /// job its webhook announced).
    missing: bool,
    /// Asked because a runner of its pool waited online without a job.
    beside_runner: bool,
    /// It was running (not queued) then.
    running: bool,
}

/// How long a torn-down VM's runner registration is watched for (see `late_runners`).
const LATE_RUNNER_WATCH: Duration = Duration::from_secs(3600);

/// The store's setting that keeps `late_runners` across a restart: each name with when
/// its watch began (unix seconds, wall clock).
pub(super) const LATE_RUNNERS: &str = "late_runners";

/// At most this many queued jobs a sync asks after because a runner of their pool waits
/// online without a job (beside the stale ones).
const UNCLAIMED_ASKS: usize = 3;

/// A job GitHub kept queued while a runner of its pool waited online, said at most this
/// often.
static KEPT_QUEUED: crate::logging::Throttle = crate::logging::Throttle::new(Duration::from_secs(3600));

/// How often the lead prunes the fleet's tables when the last prune left nothing over.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

impl State {
    /// (Those watched longer than [`LATE_RUNNER_WATCH`] are let go at the next sync.)
    pub fn watch_late_runner(&mut self, name: &str, now: tokio::time::Instant) {
        self.late_runners.insert(name.to_string(), now);
    }

    /// Lets go of the late runners watched for [`LATE_RUNNER_WATCH`], counted from when each
    /// was last seen `busy` (its VM went while it ran a job, which may last days: a fleet
    /// deletes no runner of another name); whether the watches changed.
    pub(super) fn tend_late_runners<'a>(
        &mut self,
        busy: impl Iterator<Item = &'a str>,
        now: tokio::time::Instant,
    ) -> bool {
        let mut changed = false;
        for name in busy {
            // Moved on every few minutes, not every sync (each move is a store write).
            if let Some(at) =
                self.late_runners.get_mut(name).filter(|at| now.duration_since(**at) >= LATE_RUNNER_WATCH / 12)
            {
                *at = now;
                changed = true;
            }
        }
        let watched = self.late_runners.len();
        self.late_runners.retain(|_, at| now.duration_since(*at) < LATE_RUNNER_WATCH);
        changed || self.late_runners.len() != watched
    }

    /// Whether a runner of this name is watched (a VM's name the agent must not give again).
    pub(super) fn watches_late_runner(&self, name: &str) -> bool {
        self.late_runners.contains_key(name)
    }

    pub(super) fn watches_late_runners(&self) -> bool {
        !self.late_runners.is_empty()
    }

    /// The watches as the store keeps them (`wall` is now on the wall clock, read with
    /// the monotonic one here).
    pub(super) fn late_runners_saved(&self, wall: SystemTime) -> Vec<u8> {
        let now = tokio::time::Instant::now();
        let since: BTreeMap<&str, u64> = self
            .late_runners
            .iter()
            .map(|(name, at)| {
                let since = wall.checked_sub(now.duration_since(*at)).unwrap_or(wall);
                (name.as_str(), since.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs())
            })
            .collect();
        serde_json::to_vec(&since).unwrap_or_default()
    }

    /// The watches a restart left in the store, each for what was left of its hour (one
    /// that does not decode is as good as none); `wall` is now, in the stored clock frame.
    pub(super) fn restore_late_runners(&mut self, wall: SystemTime) {
        let saved = self.saved_late_runners.take();
        let Some(since) = saved.and_then(|v| serde_json::from_slice::<BTreeMap<String, u64>>(&v).ok()) else {
            return;
        };
        let now = tokio::time::Instant::now();
        for (name, at) in since {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(at);
            let watched = wall.duration_since(at).unwrap_or_default().min(LATE_RUNNER_WATCH);
            self.late_runners.insert(name, now.checked_sub(watched).unwrap_or(now));
        }
    }

    fn prune_due(&self, now: tokio::time::Instant) -> bool {
        self.prune_more || self.pruned_at.is_none_or(|t| now.duration_since(t) >= PRUNE_EVERY)
    }

    pub(super) fn on_pruned(&mut self, pruned: Option<crate::fleet::claims::Pruned>, now: tokio::time::Instant) {
        let Some(p) = pruned else { return };
        (self.pruned_at, self.prune_more) = (Some(now), p.more());
        if p != crate::fleet::claims::Pruned::default() {
            info!(
                jobs = p.jobs,
                deliveries = p.deliveries,
                members = p.members,
                events = p.events,
                more = p.more(),
                "pruned the fleet's tables"
            );
        }
    }
}

impl<G: GitHub, H: Hypervisor> Scheduler<G, H> {
    pub(super) fn start_github_sync(&mut self) {
        if self.sync.running || self.stopping {
            return;
        }
        self.sync.running = true;
        let ctx = self.ctx.clone();
        let now = self.now();
        let webhook_age = self.intake.last_webhook.map(|t| now.duration_since(t).unwrap_or_default());
        let redeliver = self.config.github.hook.is_some();
        let deliveries_since = self.sync.deliveries_checked.unwrap_or(now - REDELIVERY_WINDOW);
        let stale_after = refresh_after(self.config.reconcile.github_interval, webhook_age, redeliver);
        let refreshable = |j: &&JobRec| {
            j.pool.is_some()
                && matches!(j.state, JobState::Queued | JobState::InProgress { .. })
                // A scale set's jobs are its requests, which the REST API does not know:
                // their news comes from the set's messages, which wait until acknowledged.
                && j.info.scale_set.is_none()
        };
        let quiet = |j: &JobRec| now.duration_since(j.updated_at).unwrap_or_default();
        let jobs = &self.book.jobs;
        let running = |j: &JobRec| matches!(j.state, JobState::InProgress { .. });
        // (A job that started since it was last asked about starts its back-off anew.)
        self.sync.asked.retain(|id, a| jobs.get(id).is_some_and(|j| refreshable(&j) && running(j) == a.running));
        let at = tokio::time::Instant::now();
        let due = |id: &u64| self.sync.asked.get(id).is_none_or(|a| a.next <= at);
        let mut stale: Vec<&JobRec> =
            jobs.values().filter(refreshable).filter(|j| quiet(j) >= stale_after && due(&j.info.id)).collect();
        // The longest without news first; each refreshed job counts as news (below).
        stale.sort_by_key(|j| j.updated_at);
        stale.truncate(20);
        // A runner that has waited online for two syncs without a job, while its pool has
        // queued jobs, should have been given one of them within seconds: the oldest such
        // jobs are asked after now, hook or not (one per such runner, a few a sync). They
        // are likely gone, their run or repository deleted, which sends no webhook; the
        // runner kept for them would idle for the hour.
        let unclaimed = self.config.reconcile.github_interval * 2;
        let mut waiting: BTreeMap<&str, usize> = BTreeMap::new();
        for v in self.book.vms.values() {
            if v.state == VmState::Idle && now.duration_since(v.state_since).unwrap_or_default() >= unclaimed {
                *waiting.entry(v.pool.as_str()).or_default() += 1;
            }
        }
        // The pools' oldest queued jobs but those `skip` leaves out, one per such runner.
        let beside_runners = |skip: &dyn Fn(&JobRec) -> bool| {
            let mut left = waiting.clone();
            let mut unclaimed_jobs: Vec<&JobRec> = jobs
                .values()
                .filter(refreshable)
                .filter(|j| j.state == JobState::Queued && quiet(j) >= unclaimed && !skip(j))
                // (The back-off of asks made for a reason of their own holds no such ask.)
                .filter(|j| self.sync.asked.get(&j.info.id).is_none_or(|a| !a.beside_runner || a.next <= at))
                .collect();
            unclaimed_jobs.sort_by_key(|j| (j.received_at, j.info.id));
            let mut picked = Vec::new();
            for j in unclaimed_jobs {
                if picked.len() == UNCLAIMED_ASKS {
                    break;
                }
                if let Some(n) = j.pool.as_deref().and_then(|p| left.get_mut(p)).filter(|n| **n > 0) {
                    *n -= 1;
                    picked.push(j);
                }
            }
            picked
        };
        // Each job GitHub answers for is asked again only after a back-off that doubles while
        // GitHub has nothing new to say, from the base its ask says (`on_github_synced`).
        let ask = |j: &JobRec, base, beside_runner| (j.info.repository.clone(), j.info.id, Ask { base, beside_runner });
        let mut lead_asks: Vec<_> = stale.iter().map(|j| ask(j, stale_after, false)).collect();
        if !waiting.is_empty() {
            let beside = beside_runners(&|j| stale.iter().any(|s| s.info.id == j.info.id));
            lead_asks.extend(beside.into_iter().map(|j| ask(j, unclaimed, true)));
        }
        // In a fleet, a member that does not lead asks only about the jobs beside its own
        // waiting runners, stale or not: the lead may never have read them (a member claims
        // a job as it writes it, and no other reads it then). Not those another member holds:
        // their holder's runner waits too, and it asks.
        let own_asks: Vec<_> = match &self.fleet {
            Some(f) if !waiting.is_empty() => {
                beside_runners(&|j| f.elsewhere(j.info.id, at)).into_iter().map(|j| ask(j, unclaimed, true)).collect()
            }
            _ => Vec::new(),
        };
        let repo_scope = match self.config.github.scope() {
            crate::config::Scope::Repository { owner, name } => Some(format!("{owner}/{name}")),
            _ => None,
        };
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let clock = self.clock.clone();
        let fleet = self.fleet.as_ref().map(|f| f.claims.clone());
        let joined = self.fleet.as_ref().is_none_or(|f| f.joined());
        let interval = self.config.reconcile.github_interval;
        let prune_due = self.sync.prune_due(tokio::time::Instant::now());
        let work = async move {
            // On the monotonic clock: the scheduler puts it in its frame when the sync
            // reports (the wall clock may be stepped meanwhile).
            let started = tokio::time::Instant::now();
            // In a fleet, one member at a time reads the hook's delivery log, polls and
            // refreshes jobs (what it learns goes into the fleet's log) and lists the
            // runners; the others follow their VMs on the list it shares, and ask only
            // about the jobs beside their own waiting runners (`own_asks`).
            let leads = match &fleet {
                None => true,
                // Not a member yet (its lock on its host id not held): a twin would share
                // the lead, whose holder is the host id.
                Some(_) if !joined => false,
                Some(claims) => claims.lead(crate::fleet::claims::GITHUB_WORK).await.unwrap_or_else(|e| {
                    debug!(error = %e, "cannot take the fleet's GitHub lead");
                    false
                }),
            };
            let (asks, redeliver, repo_scope) =
                if leads { (lead_asks, redeliver, repo_scope) } else { (own_asks, false, None) };
            // The lead prunes what the fleet no longer needs, a batch at a time.
            let pruned = match &fleet {
                Some(claims) if leads && prune_due => match claims.prune().await {
                    Ok(p) => Some(p),
                    Err(e) => {
                        warn!(error = %e, "cannot prune the fleet's tables");
                        None
                    }
                },
                _ => None,
            };
            let (runners, started) = match &fleet {
                Some(claims) if !leads => match claims.runners().await {
                    // As old as it is: a VM whose state changed since is not judged by it.
                    Ok(Some((list, age))) if age <= interval * 2 && started.checked_sub(age).is_some() => {
                        (Ok(list), started - age)
                    }
                    _ => (ctx.github.list_runners().await, started),
                },
                _ => {
                    let listed = tokio::time::Instant::now();
                    let runners = ctx.github.list_runners().await;
                    if let (Some(claims), Ok(list)) = (&fleet, &runners) {
                        // As of when the listing began: a runner that came up during the
                        // (paginated) call may be missing from it.
                        match claims.publish_runners(list.clone(), listed).await {
                            Ok(true) => {}
                            Ok(false) => {
                                debug!("the runner list was not shared: the lead passed on, or a newer list is")
                            }
                            Err(e) => debug!(error = %e, "cannot share the runner list with the fleet"),
                        }
                    }
                    (runners, listed)
                }
            };
            let mut jobs = Vec::new();
            for (repo, id, ask) in asks {
                match ctx.github.job_status(&repo, id).await {
                    Ok(Some(s)) => jobs.push((id, s, ask)),
                    // GitHub does not know it (deleted run, or never real): it ends here.
                    Ok(None) => jobs.push((
                        id,
                        JobStatus { status: "completed".into(), conclusion: Some(NOT_FOUND.into()), runner_name: None },
                        ask,
                    )),
                    Err(e) => {
                        debug!(job_id = id, error = %e, "cannot refresh job status");
                        break;
                    }
                }
            }
            // In a fleet the lead reads on from where any lead left the log (a new lead
            // would read the whole redelivery window again), and records how far it got.
            let since = match &fleet {
                Some(claims) if redeliver => match claims.deliveries_checked().await {
                    Ok(Some(shared)) => shared.max(deliveries_since),
                    _ => deliveries_since,
                },
                _ => deliveries_since,
            };
            let deliveries_checked = match redeliver {
                true => redeliver_failed(&ctx, &*store, &metrics, since, clock.now()).await,
                false => None,
            };
            if let (Some(claims), Some(until)) = (&fleet, deliveries_checked)
                && let Err(e) = claims.check_deliveries(until).await
            {
                debug!(error = %e, "cannot share how far the delivery log was read");
            }
            let mut found = Vec::new();
            if let Some(repo) = repo_scope {
                match ctx.github.queued_jobs(&repo).await {
                    Ok(list) => {
                        for job in list {
                            let delivery = format!("poll-{}", job.id);
                            found.push(JobEvent { delivery, action: JobAction::Queued, job, received_at: clock.now() });
                        }
                    }
                    Err(e) => debug!(error = %e, "cannot poll queued jobs"),
                }
            }
            Event::GitHubSynced { started, runners, jobs, found, deliveries_checked, pruned }
        };
        spawn_reporting(&self.ctx.events, work, move |message| Event::GitHubSynced {
            started: tokio::time::Instant::now(),
            runners: Err(GhError::Transport { method: "-".into(), path: "GitHub sync".into(), message }),
            jobs: Vec::new(),
            found: Vec::new(),
            deliveries_checked: None,
            pruned: None,
        });
    }

    pub(super) fn on_github_synced(
        &mut self,
        started: tokio::time::Instant,
        runners: Result<Vec<RunnerInfo>, GhError>,
        jobs: Vec<(u64, JobStatus, Ask)>,
        found: Vec<JobEvent>,
        deliveries_checked: Option<SystemTime>,
    ) {
        self.sync.running = false;
        // In the book's frame now, whatever steps of the wall clock came meanwhile.
        let started = self.now().checked_sub(started.elapsed()).unwrap_or(SystemTime::UNIX_EPOCH);
        if deliveries_checked.is_some() {
            self.sync.deliveries_checked = deliveries_checked;
        }
        let mut learned = Vec::new();
        let now = self.now();
        let at = tokio::time::Instant::now();
        let recheck = if self.config.github.hook.is_some() { HOOKED_RECHECK } else { UNHOOKED_RECHECK };
        let unclaimed = self.config.reconcile.github_interval * 2;
        for (id, status, Ask { base, beside_runner }) in jobs {
            let Some(job) = self.book.jobs.get_mut(&id) else {
                continue;
            };
            // Asked again only after a back-off that doubles while GitHub has nothing new to
            // say, up to the recheck period: a backlog of queued jobs, or a job GitHub keeps
            // queued beside a waiting runner (an incident, a repository the runner group does
            // not allow), is not asked about at every other sync.
            let running = matches!(job.state, JobState::InProgress { .. });
            let a = self.sync.asked.entry(id).or_insert(Asked {
                times: 0,
                next: at,
                missing: false,
                beside_runner,
                running,
            });
            if beside_runner && !a.beside_runner {
                a.times = 0;
            }
            a.beside_runner = beside_runner;
            a.times += 1;
            a.next = at + base.saturating_mul(1 << (a.times - 1).min(16)).min(recheck.max(base));
            // A job is dropped on a second 404, asked two syncs later, not the first: GitHub's
            // API may not know a job yet that its webhook announced.
            if status.conclusion.as_deref() == Some(NOT_FOUND) && !a.missing {
                (a.missing, a.next) = (true, at + unclaimed);
                debug!(job_id = id, "GitHub answers 404 for this job: asked again before it is dropped");
                continue;
            }
            // Checked now, whatever GitHub says: not again before its next stale period (a
            // job that runs for hours is asked about once an hour, not at every sync).
            job.updated_at = now;
            let (mut info, pool) = (job.info.clone(), job.pool.clone());
            self.book.touch_job(id);
            info.runner_name = status.runner_name.clone();
            info.conclusion = status.conclusion.clone();
            let action = match status.status.as_str() {
                "completed" => JobAction::Completed,
                "in_progress" if !running => JobAction::InProgress,
                "queued" if beside_runner => {
                    if let Some(left_out) = KEPT_QUEUED.check() {
                        warn!(job_id = id, repository = %info.repository, pool = ?pool, left_out, "GitHub keeps this job queued while a runner of its pool waits online without a job: is its repository allowed in the runner group, or are GitHub's jobs delayed? (asked again after a back-off)");
                    }
                    continue;
                }
                // Still queued, or still running: nothing was missed.
                _ => continue,
            };
            if status.conclusion.as_deref() == Some(NOT_FOUND) {
                warn!(job_id = id, repository = %info.repository, "GitHub answers 404 for this job: dropped");
            } else {
                info!(job_id = id, status = %status.status, "job status refreshed from GitHub (a webhook was missed)");
            }
            learned.push(JobEvent {
                delivery: format!("refresh-{id}-{action:?}"),
                action,
                job: info,
                received_at: self.now(),
            });
        }
        for ev in found {
            // (A job no pool takes is polled every time: not news.)
            if !self.book.jobs.contains_key(&ev.job.id) && self.match_pool(&ev.job.labels).is_some() {
                info!(job_id = ev.job.id, repository = %ev.job.repository, "queued job found by polling (its webhook was missed)");
                learned.push(ev);
            }
        }
        if let Err(learned) = self.publish(learned, "the next sync tries again") {
            for ev in learned {
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
        let by_name: BTreeMap<&str, &RunnerInfo> = runners.iter().map(|r| (r.name.as_str(), r)).collect();
        let names: Vec<String> = self.book.vms.keys().cloned().collect();
        for name in names {
            let vm = self.book.vms[&name].clone();
            if vm.state_since >= started {
                // Its state changed after the list was requested (e.g. its JIT runner was
                // created meanwhile): the list cannot tell about it.
                continue;
            }
            match by_name.get(name.as_str()) {
                Some(r) => {
                    if vm.runner_id.is_none() {
                        self.book.vms.get_mut(&name).expect("exists").runner_id = Some(r.id);
                        self.book.touch_vm(&name);
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
        // Runners named like our VMs that have no VM: leftovers of crashes. Remove them. Not
        // in a fleet (the other members' runners are named like ours; GitHub removes an
        // ephemeral runner left offline after a day), but for the exact names of VMs this
        // agent tore down before their runner showed up.
        let now = tokio::time::Instant::now();
        let busy = runners.iter().filter(|r| r.busy).map(|r| r.name.as_str());
        if self.sync.tend_late_runners(busy, now) {
            self.save_late_runners();
        }
        for r in &runners {
            let late = self.sync.late_runners.contains_key(&r.name);
            let orphan = late || (self.fleet.is_none() && self.is_ours(&r.name));
            if orphan && !self.book.vms.contains_key(&r.name) && !r.busy {
                info!(runner_name = %r.name, runner_id = r.id, "deleting a runner registration that has no vm");
                let ctx = self.ctx.clone();
                let (id, name) = (r.id, r.name.clone());
                // Fire and forget: the next sync finds it again if this fails.
                tokio::spawn(async move {
                    if let Err(e) = ctx.github.delete_runner(id).await {
                        warn!(runner_name = %name, error = %e, "cannot delete orphan runner");
                    }
                });
            }
        }
    }

    /// The watches of late runners are committed with the next batch: a restart within
    /// their hour keeps them (their names may be no pool's any more).
    pub(super) fn save_late_runners(&mut self) {
        let saved = self.sync.late_runners_saved(self.now());
        self.book.set_meta(LATE_RUNNERS, saved);
    }

    pub(super) fn resolve_group(&mut self) {
        if self.sync.group_pending || self.sync.group_retry.active(GROUP, tokio::time::Instant::now()) {
            return;
        }
        self.sync.group_pending = true;
        let ctx = self.ctx.clone();
        let name = self.config.github.runner_group.clone();
        spawn_reporting(
            &self.ctx.events,
            async move { Event::GroupResolved(ctx.github.runner_group_id(&name).await) },
            |message| {
                Event::GroupResolved(Err(GhError::Transport {
                    method: "-".into(),
                    path: "runner group".into(),
                    message,
                }))
            },
        );
    }

    pub(super) fn on_group_resolved(&mut self, r: Result<u64, GhError>) {
        self.sync.group_pending = false;
        match r {
            Ok(id) => {
                info!(runner_group = %self.config.github.runner_group, runner_group_id = id, "runner group resolved");
                self.sync.runner_group_id = Some(id);
                self.sync.group_retry.clear(GROUP);
            }
            Err(e) => {
                let now = tokio::time::Instant::now();
                let delay = self.sync.group_retry.bump_within(GROUP, now, GROUP_RETRY_FIRST, GROUP_RETRY_MAX);
                error!(runner_group = %self.config.github.runner_group, error = %e, retry_in_s = delay.as_secs(), "cannot resolve the runner group");
                let pools: Vec<String> = self.config.pools.iter().map(|p| p.name.clone()).collect();
                for p in pools {
                    self.bump_backoff(&p);
                }
            }
        }
    }
}

/// The key of the runner group's back-off.
const GROUP: &str = "runner group";

/// The first wait before the runner group is asked for again after a failure, and the longest.
const GROUP_RETRY_FIRST: Duration = Duration::from_secs(5);
const GROUP_RETRY_MAX: Duration = Duration::from_secs(300);

/// How far back GitHub redelivers a hook's deliveries (three days), less an hour.
const REDELIVERY_WINDOW: Duration = Duration::from_secs(3 * 86400 - 3600);

/// The most deliveries one sync reads (100 a page): what a long outage of a busy
/// organization leaves, within the API's hourly budget.
pub const MAX_DELIVERIES: usize = 5000;

/// How far before the newest delivery read the next sync reads again: deliveries are listed
/// by when they were made, and one still in flight is listed later with an earlier time.
const DELIVERY_OVERLAP: Duration = Duration::from_secs(300);

/// The most redeliveries one sync asks for (oldest first): GitHub limits how fast write
/// requests may come, and the sync holds back the runner list while it runs.
const MAX_REDELIVERIES: usize = 50;

/// Asks GitHub to redeliver failed `workflow_job` deliveries we never received, reading the
/// hook's log back to `since` (the last sync's checkpoint, or the redelivery window), the
/// oldest first, at most [`MAX_REDELIVERIES`], stopping at the first request that fails.
/// Returns the next checkpoint: the oldest failed delivery not asked for yet, else a little
/// before the newest read; `None` when the log could not be read.
async fn redeliver_failed<G: GitHub, H: Hypervisor>(
    ctx: &Ctx<G, H>,
    store: &dyn SchedulerStore,
    metrics: &Metrics,
    since: SystemTime,
    now: SystemTime,
) -> Option<SystemTime> {
    let window = now - REDELIVERY_WINDOW;
    let since = since.max(window);
    let deliveries = match ctx.github.list_deliveries(since, MAX_DELIVERIES).await {
        Ok(d) => d,
        Err(e) => {
            warn!(error = %e, "cannot list webhook deliveries");
            return None;
        }
    };
    if deliveries.len() >= MAX_DELIVERIES {
        warn!(
            read = deliveries.len(),
            "the hook's delivery log holds more than one sync reads: older failed deliveries are not redelivered"
        );
    }
    let newest = deliveries.iter().map(|d| d.delivered_at).max().unwrap_or(since).min(now);
    let ok_guids: BTreeSet<&str> =
        deliveries.iter().filter(|d| (200..300).contains(&d.status_code)).map(|d| d.guid.as_str()).collect();
    let mut seen = BTreeSet::new();
    let mut failed: Vec<&DeliveryInfo> = deliveries
        .iter()
        .filter(|d| d.event == "workflow_job" && !(200..300).contains(&d.status_code) && d.delivered_at >= window)
        // Another attempt of the same delivery succeeded, or we already have it.
        .filter(|d| !ok_guids.contains(d.guid.as_str()) && !store.delivery_seen(&d.guid).unwrap_or(false))
        .collect();
    failed.sort_by_key(|d| d.delivered_at);
    failed.retain(|d| seen.insert(d.guid.as_str()));
    for (i, d) in failed.iter().enumerate() {
        if i == MAX_REDELIVERIES {
            // The rest at the next sync, from here.
            return Some(d.delivered_at);
        }
        match ctx.github.redeliver(d.id).await {
            Ok(()) => {
                metrics.deliveries_redelivered.inc();
                info!(delivery = %d.guid, delivery_id = d.id, action = ?d.action, status_code = d.status_code, "asked GitHub to redeliver a failed delivery");
            }
            Err(e) => {
                warn!(delivery = %d.guid, error = %e, "redelivery request failed: the rest at the next sync");
                return Some(d.delivered_at);
            }
        }
    }
    Some(newest.checked_sub(DELIVERY_OVERLAP).unwrap_or(newest).max(since))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A late runner is watched for an hour from when it was last seen busy: one whose VM
    /// went while it ran a job that lasts longer is still deleted once it is not busy.
    #[test]
    fn a_late_runner_is_watched_while_it_is_busy() {
        let mut st = State::default();
        let t0 = tokio::time::Instant::now();
        let min = |n: u64| t0 + Duration::from_secs(60 * n);
        st.watch_late_runner("rv-a-1", t0);
        st.watch_late_runner("rv-a-2", t0);
        assert!(st.tend_late_runners(["rv-a-1", "rv-b-9"].into_iter(), min(50)), "seen busy");
        assert!(!st.tend_late_runners(["rv-a-1"].into_iter(), min(52)), "moved every few minutes, not every sync");
        assert!(st.tend_late_runners(std::iter::empty(), min(70)), "rv-a-2's hour is over");
        assert_eq!(st.late_runners.keys().collect::<Vec<_>>(), ["rv-a-1"]);
        assert!(!st.tend_late_runners(std::iter::empty(), min(100)), "nothing changed");
        assert!(st.tend_late_runners(std::iter::empty(), min(111)));
        assert!(st.late_runners.is_empty());
    }

    #[test]
    fn jobs_are_checked_one_by_one_only_when_missed_webhooks_could_go_unnoticed() {
        let m = |n: u64| Duration::from_secs(60 * n);
        // (webhook age, hook configured, refresh after)
        let table: &[(Option<Duration>, bool, Duration)] = &[
            // None since the start: whatever happened while the agent was down is checked.
            (None, true, m(2)),
            (None, false, m(2)),
            // A hook's delivery log shows what failed (and it is redelivered): only jobs
            // without news for an hour, even while webhooks are quiet.
            (Some(m(0)), true, m(60)),
            (Some(m(30)), true, m(60)),
            // No hook, webhooks flowing: only jobs without news for 15 minutes.
            (Some(m(1)), false, m(15)),
            // No hook, webhooks quiet for two intervals: every stale job is checked.
            (Some(m(2)), false, m(2)),
            (Some(m(30)), false, m(2)),
        ];
        for (age, hooked, want) in table {
            assert_eq!(refresh_after(m(1), *age, *hooked), *want, "age {age:?} hooked {hooked}");
        }
        // A long interval is never undercut by the unhooked recheck.
        assert_eq!(refresh_after(m(10), Some(m(1)), false), m(20));
    }
}

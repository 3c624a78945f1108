//! Pools that are runner scale sets (`intake = "scale_set"`): a listener per pool holds
//! the set's message session and turns GitHub's job messages into the same inbox events
//! webhooks make, so that the scheduler, `status`, the timeline, metrics and teardown work
//! unchanged. No connection from GitHub: the agent long-polls it.
//!
//! The listener ([`Listener::run`]): finds or makes the set ([`ScaleSets::ensure`]), opens
//! its session (another holder's: tried again with back-off, as after a `kill -9` the
//! service lets the old session go once nobody polls it), and long-polls. A message's jobs
//! are handled before it is acknowledged: `JobAvailable` ones are acquired (the service
//! assigns at most the capacity the poll announced, the listener asks for no more than
//! the pool has room for now; one acquired is queued at once);
//! `JobAssigned`, `JobStarted` and `JobCompleted` become inbox events (a job assigned is
//! queued for the pool; a job a set gives up on, to offer it again, completes
//! `cancelled`), written durably, with delivery ids made of the request and what happened
//! to it, so that a message seen again (not acknowledged before a crash, grouped
//! otherwise) changes nothing. A failure leaves the message unacknowledged: it comes again
//! (but a failing `acquirejobs`, which holds up nothing). Failing polls back off; five in a
//! row give the session up for a new one, but failures that pass (GitHub's 5xx and 429,
//! timeouts, the store's) only once they last ten minutes; a session given up or stopped
//! is deleted, again after a failure; a session create answered 404 finds or makes the set
//! again. Offered jobs are acquired within the room the pool has when they come, which
//! may be less than its poll announced ([`to_acquire`]).
//!
//! The capacity each poll announces (`X-ScaleSetMaxCapacity`) is the scheduler's: the jobs
//! the pool could run at once (its VMs and the places it may still start, warm VMs and
//! snapshot slots among them), 0 while it holds or libvirt is away, and in a fleet the
//! other members' as their heartbeats said ([`Lead`]); [`Registry`] carries
//! it, the set's id for the provisioning's JIT configs ([`Runners`]), and what `status`
//! shows.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::clock::Clock;
use crate::github::scaleset::{JobMessage, JobRef, Message, ScaleSetInfo, ScaleSetSpec, ScaleSets, Session, SsError};
use crate::github::{GhError, JitRunner};
use crate::model::{JobAction, JobEvent, JobInfo};
use crate::webhook::Persist;

/// How a session's polling ended.
enum Ended {
    Stopped,
    /// The service lost it, or it kept failing: open another.
    Lost,
}

/// Failures of a session's polls that do not pass ([`passing`]), since the last poll that
/// went through, after which it is given up for a new one.
const GIVE_UP: u32 = 5;

/// How long a session's polls may keep failing before it is given up (failures that pass,
/// [`passing`]: GitHub's outage, the store's): a new one would not mend them, and while
/// the old one is not let go (its delete fails as well) the service refuses another.
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);

/// How long letting a session go is tried (its delete, again after a failure), counted from
/// the stop: within `Agent::finish`'s wait for the listeners (10 s). A session not let go
/// holds the set (409 to the next create) until the service drops it.
const LET_GO: Duration = Duration::from_secs(8);

/// The shortest time between two polls that brought nothing.
const MIN_POLL: Duration = Duration::from_secs(1);

/// How long a session create in flight is given to answer once the listener stops.
const CREATE_GRACE: Duration = Duration::from_secs(5);

/// The longest wait between two attempts (to find the set, open its session, poll).
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What the listeners and the scheduler share about each scale-set pool.
#[derive(Default)]
pub struct Registry {
    pools: Mutex<BTreeMap<String, Entry>>,
}

#[derive(Default, Clone, Copy)]
struct Entry {
    set_id: Option<u64>,
    /// This agent's.
    capacity: u64,
    /// In a fleet, the other members' (their last heartbeats).
    others: u64,
    session: bool,
    /// The set's jobs GitHub offers and no set acquired, as its last statistics said (less
    /// those acquired since; 0 once the session is given up): jobs the scheduler cannot see,
    /// for which other pools' spare VMs give up the host's room. In a fleet, the lead's
    /// only (the member holding the session).
    available: u64,
}

impl Registry {
    fn with<T>(&self, pool: &str, f: impl FnOnce(&mut Entry) -> T) -> T {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        f(pools.entry(pool.to_string()).or_default())
    }

    /// The pool's scale set, once its listener found or made it.
    pub fn set_id(&self, pool: &str) -> Option<u64> {
        self.with(pool, |e| e.set_id)
    }

    /// The scheduler: how many jobs the pool could run at once now.
    pub fn set_capacity(&self, pool: &str, capacity: u64) {
        self.with(pool, |e| e.capacity = capacity);
    }

    /// In a fleet: how many the other members' pools of the set could (as they last said).
    pub fn set_others(&self, pool: &str, capacity: u64) {
        self.with(pool, |e| e.others = capacity);
    }

    /// This agent's capacity for the pool (what its heartbeat tells the fleet).
    pub fn own_capacity(&self, pool: &str) -> u64 {
        self.with(pool, |e| e.capacity)
    }

    /// What the set's polls announce: this agent's capacity, and in a fleet the others'.
    pub fn capacity(&self, pool: &str) -> u64 {
        self.with(pool, |e| e.capacity.saturating_add(e.others))
    }

    /// How many of the set's jobs wait to be acquired (see `Entry::available`).
    pub fn available(&self, pool: &str) -> u64 {
        self.with(pool, |e| e.available)
    }

    /// The listener: what the set's statistics say of its jobs waiting to be acquired.
    pub fn set_available(&self, pool: &str, n: u64) {
        self.with(pool, |e| e.available = n);
    }

    fn found(&self, pool: &str, set_id: u64) {
        self.with(pool, |e| e.set_id = Some(set_id));
    }

    /// The set's id is unknown to the service (the set was deleted, and in a fleet made
    /// again by the member leading it): found again by the listener.
    fn lost(&self, pool: &str, set_id: u64) {
        self.with(pool, |e| {
            if e.set_id == Some(set_id) {
                e.set_id = None;
            }
        });
    }

    fn session(&self, pool: &str, open: bool) {
        self.with(pool, |e| e.session = open);
    }

    /// What `runnervisor status` shows of the pool's set (`name`: its name).
    pub fn status(&self, pool: &str, name: &str) -> crate::admin::proto::ScaleSetStatus {
        let e = self.with(pool, |e| *e);
        crate::admin::proto::ScaleSetStatus {
            name: name.to_string(),
            id: e.set_id,
            session: e.session,
            capacity: self.capacity(pool),
        }
    }
}

/// What provisioning asks of a pool's scale set (object-safe: the scheduler holds it
/// without knowing the client's type).
pub trait ScaleSetRunners: Send + Sync {
    /// A JIT config for a runner called `name` in `pool`'s scale set.
    fn jit<'a>(
        &'a self,
        pool: &'a str,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<JitRunner, GhError>> + Send + 'a>>;
}

/// [`ScaleSetRunners`] over a [`ScaleSets`] client.
pub struct Runners<S> {
    pub client: Arc<S>,
    pub registry: Arc<Registry>,
}

impl<S: ScaleSets> ScaleSetRunners for Runners<S> {
    fn jit<'a>(
        &'a self,
        pool: &'a str,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<JitRunner, GhError>> + Send + 'a>> {
        Box::pin(async move {
            let Some(set) = self.registry.set_id(pool) else {
                return Err(GhError::Decode {
                    path: format!("scale set of pool {pool}"),
                    message: "not found or made yet (its listener is still trying)".into(),
                });
            };
            let made = self.client.generate_jit_config(set, name).await;
            if made.as_ref().is_err_and(|e| e.status() == Some(404)) {
                self.registry.lost(pool, set);
            }
            made.map_err(SsError::into_gh)
        })
    }
}

/// `$call`, made with the session's queue token (`$s`, a `&Session`); when the service
/// answers that the token expired, the session (`$session`, a place) is refreshed (another
/// token) and `$call` made once more, at once, as GitHub's own listener does for its
/// polls, acquisitions and acknowledgements. (A 401 to an acquire or an ack was a failure,
/// warned of and backed off from, until the next poll renewed the token.) A second 401 is
/// the caller's failure: counted and backed off. (A macro, not an async closure: the
/// listener's future must be `Send` for every lifetime, which such a closure's is not.)
macro_rules! renewing {
    ($listener:expr, $set_id:expr, $session:expr, |$s:ident| $call:expr) => {{
        let first = {
            let $s = &$session;
            $call.await
        };
        match first {
            Err(SsError::QueueToken) => match $listener.client.refresh_session($set_id, &$session.id).await {
                Ok(fresh) => {
                    $session = fresh;
                    debug!(pool = %$listener.pool, "the scale set's queue token renewed");
                    let $s = &$session;
                    $call.await
                }
                Err(e) => Err(e),
            },
            other => other,
        }
    }};
}

/// One pool's listener.
pub struct Listener<S> {
    pub client: Arc<S>,
    pub registry: Arc<Registry>,
    pub pool: String,
    pub spec: ScaleSetSpec,
    pub persist: Persist,
    pub inbox_ready: Arc<Notify>,
    /// The scheduler's frame clock (what deliveries are stamped with).
    pub clock: Arc<dyn Clock>,
    /// Who holds the session (the service shows it to another client that tries).
    pub owner: String,
    /// In a fleet: the lead under which the session is held (`None`: a single host).
    pub lead: Option<Lead>,
    /// GitHub's statistics of the set go to `runnervisor_scale_set_statistics`.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// A fleet's scale set is served by one member at a time, the one that leads its work
/// ([`lead_work`]): GitHub lets one client hold a set's session. Its jobs are written to
/// the fleet's queue (filed under the set) and claimed by any member with room; the
/// capacity it announces is the fleet's (each member's heartbeat says its own). A lead per
/// set: members may serve different sets (and do while a config change rolls out).
#[derive(Clone)]
pub struct Lead {
    pub claims: Arc<dyn crate::fleet::claims::Claims>,
    /// The fleet's lease: the lead is renewed every third of it, and given up (the session
    /// let go) once it is not renewed for nine tenths of it, counted from when the renewal
    /// was sent (the database counts from later).
    pub lease: Duration,
}

/// A set's name as the fleet compares it: GitHub's names are case-insensitive (and
/// `validate` keeps them ASCII, so that this folds them as PostgreSQL and GitHub do).
pub fn fold(set: &str) -> String {
    set.to_ascii_lowercase()
}

/// The lead work of the fleet's scale set `set` (`rv_leader`).
pub fn lead_work(set: &str) -> String {
    format!("scale-set:{}", fold(set))
}

/// The kinds of GitHub's statistics of a set (`runnervisor_scale_set_statistics`).
const STATISTICS: [&str; 7] = ["available", "acquired", "assigned", "running", "registered", "busy", "idle"];

/// `1 s · 2^n`, capped at [`MAX_BACKOFF`], with jitter.
fn backoff(failures: u32) -> Duration {
    let policy = crate::github::http::RetryPolicy {
        attempts: 0,
        base: Duration::from_secs(2),
        cap: MAX_BACKOFF,
        max_wait: MAX_BACKOFF,
    };
    crate::github::http::backoff(&policy, failures)
}

/// The offered requests to acquire: all of them while the pool has the room the poll
/// announced (the service holds to that); fewer once it has less. A long poll announces the
/// capacity of when it was sent, up to a minute before its message comes, and the pool may
/// have lost room since (libvirt away, a hold, other pools' VMs): jobs acquired beyond it
/// would wait for a VM until the set gives them up, where those not acquired are offered
/// again. The room now is `now` less the jobs the set has assigned (waiting or running), as
/// the message's statistics count them (as the service counts its own).
fn to_acquire<'a>(
    offered: &'a [u64],
    announced: u64,
    now: u64,
    statistics: Option<&crate::github::scaleset::Statistics>,
) -> &'a [u64] {
    if now >= announced {
        return offered;
    }
    let room = now.saturating_sub(statistics.map_or(0, |s| s.assigned));
    &offered[..offered.len().min(usize::try_from(room).unwrap_or(usize::MAX))]
}

/// Whether a failure of the message queue is one a session may outlast: the service or the
/// way to it failing for a while (5xx, 429, a timeout, a connection refused), or the store.
/// A session is given up on such failures only once they last [`GIVE_UP_AFTER`].
fn passing(e: &SsError) -> bool {
    match e {
        SsError::Transport { .. } => true,
        SsError::Status { status, .. } => *status >= 500 || *status == 429,
        SsError::GitHub(GhError::Status { status, .. }) => *status >= 500 || *status == 429,
        SsError::GitHub(g) => matches!(g, GhError::RateLimited { .. } | GhError::Transport { .. }),
        _ => false,
    }
}

/// A conclusion as webhooks spell it, from a job message's `result`.
fn conclusion(result: &str) -> String {
    match result.to_ascii_lowercase().as_str() {
        "succeeded" | "success" => "success".into(),
        "failed" | "failure" => "failure".into(),
        "canceled" | "cancelled" => "cancelled".into(),
        other => other.to_string(),
    }
}

/// The inbox events a message's jobs make (`JobAvailable` makes none: it is acquired), for
/// the scale set called `set`.
pub fn events(set: &str, set_id: u64, m: &Message, now: std::time::SystemTime) -> Vec<JobEvent> {
    let info = |j: &JobRef, runner: Option<String>, conclusion: Option<String>| JobInfo {
        id: j.request_id,
        run_id: j.run_id,
        run_attempt: 1,
        name: j.display_name.clone(),
        workflow_name: String::new(),
        labels: j.labels.clone(),
        repository: j.repository.clone(),
        html_url: String::new(),
        runner_name: runner,
        conclusion,
        scale_set: Some(set.to_string()),
    };
    m.jobs
        .iter()
        .filter_map(|job| {
            let (kind, action, job) = match job {
                JobMessage::Available(_) => return None,
                JobMessage::Assigned(j) => ("assigned", JobAction::Queued, info(j, None, None)),
                JobMessage::Started { job, runner_name } => {
                    ("started", JobAction::InProgress, info(job, runner_name.clone(), None))
                }
                JobMessage::Completed { job, result, runner_name } => {
                    ("completed", JobAction::Completed, info(job, runner_name.clone(), Some(conclusion(result))))
                }
            };
            // Each happens once per request: the same id however the service groups its
            // job messages into messages when it sends them again. But an assignment: GitHub
            // may assign a request it gave up on again (its message is a new one).
            // And a give-up (`cancelled`, no runner): a request may be given up on again after
            // it was assigned again.
            let again = kind == "assigned"
                || (kind == "completed" && job.runner_name.is_none() && job.conclusion.as_deref() == Some("cancelled"));
            let delivery = match again {
                true => format!("scale-set-{set_id}-{}-{kind}-{}", job.id, m.id),
                false => format!("scale-set-{set_id}-{}-{kind}", job.id),
            };
            Some(JobEvent { delivery, action, job, received_at: now })
        })
        .collect()
}

impl<S: ScaleSets> Listener<S> {
    /// Until `shutdown`: then the session is deleted, so that the next start opens one at
    /// once. In a fleet, only while this member leads the set's work.
    pub async fn run(self, shutdown: CancellationToken) {
        match self.lead.clone() {
            None => self.serve(&shutdown).await,
            Some(lead) => self.run_led(&lead, &shutdown).await,
        }
    }

    /// A fleet member's listener: waits to lead, holds the session while it does, lets it go
    /// once it does not (another member, or none for a while). Until it leads, it only finds
    /// the set (its VMs' JIT configs need the set's id), never makes or changes it.
    async fn run_led(&self, lead: &Lead, shutdown: &CancellationToken) {
        let held = |sent: tokio::time::Instant| sent + lead.lease.mul_f64(0.9);
        let work = lead_work(&self.spec.name);
        let (mut found_failures, mut lead_failures) = (0u32, 0u32);
        loop {
            let sent = loop {
                let sent = tokio::time::Instant::now();
                match lead.claims.lead(&work).await {
                    Ok(true) => break sent,
                    Ok(false) => lead_failures = 0,
                    Err(e) => {
                        // Once per outage (every member asks every third of a lease).
                        lead_failures += 1;
                        if lead_failures == 1 {
                            warn!(pool = %self.pool, error = %e, "cannot ask the fleet's database who leads the scale set; asking again")
                        } else {
                            debug!(pool = %self.pool, error = %e, "cannot ask the fleet's database who leads the scale set")
                        }
                    }
                }
                if self.registry.set_id(&self.pool).is_none() {
                    match self.client.find(&self.spec).await {
                        Ok(Some(set)) => self.registry.found(&self.pool, set.id),
                        Ok(None) => {
                            debug!(pool = %self.pool, scale_set = %self.spec.name, "the scale set is not made yet (the member leading it makes it)")
                        }
                        Err(e) => {
                            found_failures += 1;
                            if found_failures == 3 {
                                warn!(pool = %self.pool, scale_set = %self.spec.name, error = %e, "cannot find the scale set; its jobs get no VM of this member's until it can");
                            }
                        }
                    }
                }
                if sleep_or_stop(lead.lease / 3, shutdown).await {
                    return;
                }
            };
            lead_failures = 0;
            info!(pool = %self.pool, scale_set = %self.spec.name, "this member leads the scale set for the fleet: holding its session");
            let session = shutdown.child_token();
            let renew = async {
                let mut until = held(sent);
                loop {
                    let next = (tokio::time::Instant::now() + lead.lease / 3).min(until);
                    tokio::select! {
                        _ = session.cancelled() => return,
                        _ = tokio::time::sleep_until(next) => {}
                    }
                    if tokio::time::Instant::now() >= until {
                        warn!(pool = %self.pool, "the lead of the scale set could not be renewed within its lease: letting the session go");
                        break;
                    }
                    let sent = tokio::time::Instant::now();
                    match tokio::time::timeout_at(until, lead.claims.lead(&work)).await {
                        Ok(Ok(true)) => until = held(sent),
                        Ok(Ok(false)) => {
                            warn!(pool = %self.pool, "another member leads the scale set now: letting the session go");
                            break;
                        }
                        Ok(Err(e)) => {
                            warn!(pool = %self.pool, error = %e, "cannot renew the lead of the scale set; trying again within its lease")
                        }
                        Err(_) => {}
                    }
                }
                session.cancel();
            };
            tokio::join!(self.serve(&session), renew);
            if shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// Holds the set's session until `shutdown`.
    async fn serve(&self, shutdown: &CancellationToken) {
        // Failures in a row, whatever failed (finding the set, opening a session, polling):
        // the back-off grows until a poll goes through.
        let mut failures = 0u32;
        'set: loop {
            let Some(set_id) = self.find_set(shutdown).await else { return };
            loop {
                if shutdown.is_cancelled() {
                    return;
                }
                // Not cut short at once: a session the service made for a request dropped
                // midway would hold the set (409 to the next holder) until it let it go. Given
                // a few seconds (within `Agent::finish`'s wait), one made after all is deleted.
                let create = self.client.create_session(set_id, &self.owner);
                tokio::pin!(create);
                let mut stopped = None;
                let opened = tokio::select! {
                    r = &mut create => r,
                    _ = shutdown.cancelled() => {
                        stopped = Some(tokio::time::Instant::now());
                        match tokio::time::timeout(CREATE_GRACE, &mut create).await {
                            Ok(r) => r,
                            Err(_) => return,
                        }
                    }
                };
                if shutdown.is_cancelled() {
                    if let Ok(s) = &opened {
                        let stopped = stopped.unwrap_or_else(tokio::time::Instant::now);
                        self.let_go(set_id, s, stopped + LET_GO).await;
                    }
                    return;
                }
                let session = match opened {
                    Ok(s) => s,
                    Err(e) => {
                        match &e {
                            SsError::Conflict(_) => {
                                warn!(pool = %self.pool, scale_set = %self.spec.name, error = %e, "the scale set's session is held by another client (another agent serving this pool, or this agent before a crash, whose session the service lets go once nobody polls it); trying again")
                            }
                            _ => {
                                warn!(pool = %self.pool, scale_set = %self.spec.name, error = %e, "cannot open the scale set's session; trying again")
                            }
                        }
                        if sleep_or_stop(backoff(failures), shutdown).await {
                            return;
                        }
                        failures += 1;
                        // The set is gone (deleted on GitHub's side): found or made again.
                        if e.status() == Some(404) {
                            continue 'set;
                        }
                        continue;
                    }
                };
                info!(pool = %self.pool, scale_set = %self.spec.name, scale_set_id = set_id, assigned = session.statistics.assigned, "scale set session open: taking the jobs GitHub assigns to it");
                self.statistics(&session.statistics, 0);
                let (ended, session) = self.listen(set_id, session, &mut failures, shutdown).await;
                self.registry.session(&self.pool, false);
                // Counts no session brings up to date any more (in a fleet, the new lead's).
                self.forget_statistics();
                // Stopping, or giving the session up: let it go, so that the next one (this
                // start's or the next's) opens at once.
                self.let_go(set_id, &session, tokio::time::Instant::now() + LET_GO).await;
                match ended {
                    Ended::Stopped => return,
                    Ended::Lost => {
                        if sleep_or_stop(backoff(failures), shutdown).await {
                            return;
                        }
                        failures += 1;
                    }
                }
            }
        }
    }

    /// Deletes `session`, again after a failure, until `deadline` at most.
    async fn let_go(&self, set_id: u64, session: &Session, deadline: tokio::time::Instant) {
        let mut wait = Duration::from_millis(500);
        loop {
            let e = match tokio::time::timeout_at(deadline, self.client.delete_session(set_id, &session.id)).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(_) => {
                    warn!(pool = %self.pool, "cannot delete the scale set's session in time: the service lets it go once nobody polls it, and refuses another session until then");
                    return;
                }
            };
            // Gone already, or refused for good: nothing to let go, or nothing to try again.
            if matches!(e, SsError::SessionGone(_)) || !passing(&e) {
                debug!(pool = %self.pool, error = %e, "the scale set's session not deleted");
                return;
            }
            if tokio::time::Instant::now() + wait >= deadline {
                warn!(pool = %self.pool, error = %e, "cannot delete the scale set's session: the service lets it go once nobody polls it, and refuses another session until then");
                return;
            }
            debug!(pool = %self.pool, error = %e, "cannot delete the scale set's session; trying again");
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }

    /// Finds or makes the set, trying until it can; `None`: stopped first.
    async fn find_set(&self, shutdown: &CancellationToken) -> Option<u64> {
        let mut failures = 0u32;
        loop {
            let found = tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = self.client.ensure(&self.spec) => r,
            };
            match found {
                Ok(set) => {
                    info!(pool = %self.pool, scale_set = %set.name, scale_set_id = set.id, runner_group_id = set.runner_group_id, labels = ?set.labels, "scale set found or made");
                    self.registry.found(&self.pool, set.id);
                    return Some(set.id);
                }
                Err(e) => {
                    warn!(pool = %self.pool, scale_set = %self.spec.name, error = %e, "cannot find or make the scale set; trying again");
                    if sleep_or_stop(backoff(failures), shutdown).await {
                        return None;
                    }
                    failures += 1;
                }
            }
        }
    }

    /// Polls `session` until `shutdown`, or until it is given up: the service lost it, or
    /// [`GIVE_UP`] failures that do not pass ([`passing`]) since the last poll that went
    /// through (a queue that refuses it for good answers no 401 or 404 a client could
    /// tell), or failures lasting [`GIVE_UP_AFTER`] (an outage a new session would not
    /// mend). Returns the session either way (to be deleted).
    async fn listen(
        &self,
        set_id: u64,
        mut session: Session,
        failures: &mut u32,
        shutdown: &CancellationToken,
    ) -> (Ended, Session) {
        let mut last = 0u64;
        // Since the last poll that went through: when the first failure came, and how many
        // failures did not pass.
        let mut failing: Option<(tokio::time::Instant, u32)> = None;
        self.registry.session(&self.pool, true);
        loop {
            let capacity = self.registry.capacity(&self.pool);
            let asked = tokio::time::Instant::now();
            let polled = tokio::select! {
                _ = shutdown.cancelled() => return (Ended::Stopped, session),
                r = async { renewing!(self, set_id, session, |s| self.client.poll(s, last, capacity)) } => r,
            };
            let failed = match polled {
                Ok(None) => {
                    // An empty answer at once (a proxy's, not the service's long poll) is
                    // not asked again at once.
                    if asked.elapsed() < MIN_POLL && sleep_or_stop(MIN_POLL, shutdown).await {
                        return (Ended::Stopped, session);
                    }
                    None
                }
                Ok(Some(m)) => match self.handle(set_id, &mut session, &m, capacity).await {
                    Ok(()) => {
                        last = m.id;
                        renewing!(self, set_id, session, |s| self.client.ack(s, m.id)).err()
                    }
                    Err(e) => {
                        warn!(pool = %self.pool, message_id = m.id, error = %e, "cannot take in the scale set's message: it is not acknowledged, and comes again");
                        Some(e)
                    }
                },
                Err(e) => Some(e),
            };
            let Some(e) = failed else {
                *failures = 0;
                failing = None;
                self.registry.session(&self.pool, true);
                // A JIT config answered 404 meanwhile (a proxy's, or a passing fault): the
                // set the session polls is there.
                if self.registry.set_id(&self.pool).is_none() {
                    self.registry.found(&self.pool, set_id);
                }
                continue;
            };
            self.registry.session(&self.pool, false);
            if matches!(e, SsError::SessionGone(_)) {
                warn!(pool = %self.pool, error = %e, "the service lost the scale set's session: opening another");
                return (Ended::Lost, session);
            }
            *failures += 1;
            let (since, hard) = failing.unwrap_or((tokio::time::Instant::now(), 0));
            let hard = hard + u32::from(!passing(&e));
            failing = Some((since, hard));
            if hard >= GIVE_UP || since.elapsed() >= GIVE_UP_AFTER {
                warn!(pool = %self.pool, error = %e, failures = *failures, "the scale set's message queue keeps failing: giving the session up and opening another");
                return (Ended::Lost, session);
            }
            warn!(pool = %self.pool, error = %e, failures = *failures, "the scale set's message queue failed; trying again");
            if sleep_or_stop(backoff(*failures), shutdown).await {
                return (Ended::Stopped, session);
            }
        }
    }

    /// GitHub's counts, for an operator to set beside the book's (`runnervisor_queue_depth`,
    /// `runnervisor_vms`): they do not drive demand, each job's own messages do (but a
    /// message's `assigned` bounds the jobs it acquires once the pool has less room than its
    /// poll announced: [`to_acquire`]); and the
    /// jobs waiting to be acquired give other pools' spare VMs reason to leave the host's
    /// room ([`Registry::available`]), less `acquired`: the jobs the message these came
    /// with had acquired (counted as available in them, made before; in the book now, or
    /// another pool's warm VM gave its place up for a job already served).
    fn statistics(&self, st: &crate::github::scaleset::Statistics, acquired: usize) {
        let acquired = u64::try_from(acquired).unwrap_or(u64::MAX);
        self.registry.set_available(&self.pool, st.available.saturating_sub(acquired));
        let counts = [st.available, st.acquired, st.assigned, st.running, st.registered, st.busy, st.idle];
        for (kind, n) in STATISTICS.into_iter().zip(counts) {
            let labels = crate::metrics::ScaleSetLabels::new(&self.pool, kind);
            self.metrics.scale_set_statistics.get_or_create(&labels).set(n.min(i64::MAX as u64) as i64);
        }
    }

    fn forget_statistics(&self) {
        self.registry.set_available(&self.pool, 0);
        for kind in STATISTICS {
            self.metrics.scale_set_statistics.remove(&crate::metrics::ScaleSetLabels::new(&self.pool, kind));
        }
    }

    /// Acquires the message's available jobs (within the room the pool has now, its poll
    /// having `announced` the room of before: [`to_acquire`]), and writes its other jobs'
    /// events durably.
    async fn handle(&self, set_id: u64, session: &mut Session, m: &Message, announced: u64) -> Result<(), SsError> {
        let offered: Vec<u64> = m
            .jobs
            .iter()
            .filter_map(|j| match j {
                JobMessage::Available(j) => Some(j.request_id),
                _ => None,
            })
            .collect();
        let now = self.registry.capacity(&self.pool);
        let available = to_acquire(&offered, announced, now, m.statistics.as_ref());
        if available.len() < offered.len() {
            debug!(pool = %self.pool, offered = offered.len(), acquiring = available.len(), announced, capacity = now, "the pool has less room than its poll announced: acquiring fewer of the jobs offered");
        }
        // At best: a job not acquired is offered again, one acquired comes as assigned. A
        // failure here must not hold up the message's other news (a message not
        // acknowledged comes again, and every message after it waits) — but a queue token
        // that expired again once renewed, or a session the renewal found gone, is the
        // message's failure: it comes again (or the session is opened again).
        let mut acquired = Vec::new();
        if !available.is_empty() {
            match renewing!(self, set_id, *session, |s| self.client.acquire(set_id, s, available)) {
                Ok(a) => {
                    debug!(pool = %self.pool, offered = available.len(), acquired = a.len(), "scale set jobs acquired");
                    acquired = a;
                }
                Err(e @ (SsError::QueueToken | SsError::SessionGone(_))) => return Err(e),
                Err(e) => {
                    warn!(pool = %self.pool, offered = available.len(), error = %e, "cannot acquire the jobs the scale set was offered: they are offered again")
                }
            }
        }
        // A job acquired is assigned to the set: queued now, not a long poll later when its
        // `JobAssigned` comes (which then changes nothing).
        let taken = Message {
            jobs: m
                .jobs
                .iter()
                .map(|j| match j {
                    JobMessage::Available(r) if acquired.contains(&r.request_id) => JobMessage::Assigned(r.clone()),
                    other => other.clone(),
                })
                .collect(),
            ..m.clone()
        };
        let events = events(&self.spec.name, set_id, &taken, self.clock.now());
        let mut new = false;
        for ev in events {
            new |= self.persist.accept(ev).await.map_err(|message| SsError::Transport {
                method: "-".into(),
                path: "the store's inbox".into(),
                message,
            })?;
        }
        if new {
            self.inbox_ready.notify_one();
        }
        if let Some(why) = &m.unreadable {
            warn!(pool = %self.pool, message_id = m.id, problem = %why, "a scale set message not all of which could be read: what could be is taken in, and it is acknowledged (it would come again as unreadable)");
        }
        if let Some(st) = m.statistics {
            debug!(pool = %self.pool, message_id = m.id, available = st.available, assigned = st.assigned, running = st.running, idle = st.idle, "scale set message taken in");
            self.statistics(&st, acquired.len());
        }
        Ok(())
    }
}

/// The scale-set client the agent runs with: GitHub's, or the deterministic simulator's
/// model of the Actions service ([`crate::Deps::scale_sets`]).
pub enum Client<G> {
    Http(crate::github::scaleset::HttpScaleSets<G>),
    #[cfg(any(test, feature = "sim"))]
    Sim(crate::sim::scaleset::SimScaleSets),
}

/// Each call to whichever client it is.
macro_rules! each {
    ($self:ident, $c:ident => $call:expr) => {
        match $self {
            Client::Http($c) => $call.await,
            #[cfg(any(test, feature = "sim"))]
            Client::Sim($c) => $call.await,
        }
    };
}

impl<G: crate::github::GitHub> ScaleSets for Client<G> {
    async fn ensure(&self, spec: &ScaleSetSpec) -> Result<ScaleSetInfo, SsError> {
        each!(self, c => c.ensure(spec))
    }
    async fn find(&self, spec: &ScaleSetSpec) -> Result<Option<ScaleSetInfo>, SsError> {
        each!(self, c => c.find(spec))
    }
    async fn delete(&self, set_id: u64) -> Result<(), SsError> {
        each!(self, c => c.delete(set_id))
    }
    async fn create_session(&self, set_id: u64, owner: &str) -> Result<Session, SsError> {
        each!(self, c => c.create_session(set_id, owner))
    }
    async fn refresh_session(&self, set_id: u64, session_id: &str) -> Result<Session, SsError> {
        each!(self, c => c.refresh_session(set_id, session_id))
    }
    async fn delete_session(&self, set_id: u64, session_id: &str) -> Result<(), SsError> {
        each!(self, c => c.delete_session(set_id, session_id))
    }
    async fn poll(&self, session: &Session, last: u64, capacity: u64) -> Result<Option<Message>, SsError> {
        each!(self, c => c.poll(session, last, capacity))
    }
    async fn ack(&self, session: &Session, message_id: u64) -> Result<(), SsError> {
        each!(self, c => c.ack(session, message_id))
    }
    async fn acquire(&self, set_id: u64, session: &Session, requests: &[u64]) -> Result<Vec<u64>, SsError> {
        each!(self, c => c.acquire(set_id, session, requests))
    }
    async fn generate_jit_config(&self, set_id: u64, name: &str) -> Result<JitRunner, SsError> {
        each!(self, c => c.generate_jit_config(set_id, name))
    }
    async fn delete_runner(&self, runner_id: u64) -> Result<crate::github::Deleted, SsError> {
        each!(self, c => c.delete_runner(runner_id))
    }
}

/// Sleeps `d`; `true` if `shutdown` came first.
async fn sleep_or_stop(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests;

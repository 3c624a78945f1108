//! The simulator's GitHub: jobs, runners, the hook's deliveries and their log, and faults
//! on its API (5xx, timeouts, rate limits), behind the [`GitHub`] seam the agent uses.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::github::{Deleted, DeliveryInfo, GhError, GitHub, JitRunner, JobStatus, RunnerInfo};
use crate::model::{JobInfo, label_set};
use crate::secret::Secret;

use super::time::Time;

pub const ORG: &str = "octo-org";
/// The enterprise the organization belongs to.
pub const ENTERPRISE: &str = "octo-ent";
/// The organization's repositories jobs come from.
pub const REPOS: &[&str] = &["octo-org/app", "octo-org/lib", "octo-org/web"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Queued,
    InProgress,
    Completed(String),
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: u64,
    pub run_id: u64,
    pub run_attempt: u32,
    pub labels: Vec<String>,
    pub repository: String,
    /// The pool whose label set the job's equals when it was queued (`None`: no pool's).
    pub pool: Option<String>,
    pub status: Status,
    pub queued_at: Duration,
    pub runner: Option<String>,
    /// Runners that took it (GitHub gives a job to one: more is the model's bug).
    pub taken: u32,
    /// Its place in a scale set that covers its labels ([`Hub::route`]).
    pub routed: Option<Routed>,
}

/// A job routed to a scale set: offered (`JobAvailable`) until the set acquires it, then
/// run by any of the set's runners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub set: u64,
    /// The request's id (`runnerRequestId`): the job's id in the agent, of another number
    /// space than the job's own (which the REST API knows).
    pub request: u64,
    /// When the set acquired the request (`None`: offered, not acquired).
    pub acquired_at: Option<Duration>,
    pub offered_at: Duration,
    /// Times it was given up on for the set and offered again ([`Hub::reassign_stale`]).
    pub reassignments: u32,
}

impl Routed {
    pub fn acquired(&self) -> bool {
        self.acquired_at.is_some()
    }
}

/// Times a job a set's runner never starts is offered again; then GitHub fails it.
pub const MAX_REASSIGNMENTS: u32 = 3;

/// How long a rate limit GitHub answers holds the REST API's calls back.
const RATE_LIMIT: Duration = Duration::from_secs(120);

/// How long a job the set acquired may wait for one of its runners before it is given up
/// on for the set and offered again under a new request (GitHub: about a minute).
pub const REASSIGN_AFTER: Duration = Duration::from_secs(60);

/// A scale set's message session.
#[derive(Debug, Clone)]
pub struct SetSession {
    pub id: String,
    /// When it was last heard of (a poll, its creation or refresh).
    pub seen: Duration,
    /// Its message queue's token, and when that expires (a refresh renews it).
    pub token: String,
    pub expires: Duration,
}

/// Request ids are numbered from here on, in the order the service makes requests (a job
/// offered again gets a new one).
pub const REQUESTS: u64 = 31_000_000_000;

/// A scale set of the Actions service ([`super::scaleset`]).
#[derive(Debug, Clone)]
pub struct Set {
    pub id: u64,
    pub name: String,
    /// Lowercase, its name among them: the labels of the jobs it takes.
    pub labels: Vec<String>,
    pub session: Option<SetSession>,
    /// Job messages not acknowledged, by id.
    pub messages: BTreeMap<u64, crate::github::scaleset::JobMessage>,
    /// What the last poll announced.
    pub capacity: u64,
}

#[derive(Debug, Clone)]
pub struct Runner {
    pub id: u64,
    pub name: String,
    /// Lowercase.
    pub labels: Vec<String>,
    pub online: bool,
    pub job: Option<u64>,
    /// Made by a registration token (the guest registered it), not a JIT config.
    pub by_token: bool,
    /// The scale set it is a runner of (it takes only jobs the set acquired).
    pub scale_set: Option<u64>,
}

/// One delivery of the hook (a redelivery is a delivery of its own, with the same guid).
#[derive(Debug, Clone)]
pub struct Hook {
    pub id: u64,
    pub guid: String,
    pub action: String,
    pub body: String,
    pub redelivery: bool,
    /// GitHub's own duplicate of a delivery it made, sent later (not in its log again).
    pub copy: bool,
}

/// What a scale set's message says of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Available,
    Assigned,
    Started,
    /// With its result (`succeeded`, `failed`, `canceled`).
    Completed(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 502 from the API.
    ServerError,
    /// No answer: the client's timeout passes.
    Timeout,
    /// 403 with the rate limit spent, for a while.
    RateLimit,
    /// The call takes effect, and its answer is lost: the client's timeout passes (a runner
    /// registered, or deleted, that the agent does not know of).
    LostAnswer,
}

#[derive(Debug)]
pub struct Hub {
    pub jobs: BTreeMap<u64, Job>,
    pub runners: BTreeMap<u64, Runner>,
    pub next_runner: u64,
    pub next_delivery: u64,
    /// Deliveries to post, with when.
    pub outbox: Vec<(Duration, Hook)>,
    /// Every delivery posted (or given up), as GitHub's log shows it.
    pub log: Vec<DeliveryInfo>,
    /// The jobs a delivery of which the agent took (answered 2xx; [`Hub::answered`]).
    pub heard: BTreeSet<u64>,
    /// Each delivery's payload, by guid (what a redelivery sends again).
    pub bodies: BTreeMap<String, String>,
    /// The next `left` calls fail so.
    pub fault: Option<(Fault, u32)>,
    pub rate_limited_until: Option<Duration>,
    pub api_timeout: Duration,
    pub calls: u64,
    /// Calls by endpoint (the trace's summary).
    pub calls_by: BTreeMap<String, u64>,
    pub time: Time,
    /// The agent's (`github` in its config): a repository's runners take only its jobs.
    pub scope: crate::config::Scope,
    /// The Actions service's scale sets, by id, and its counters.
    pub sets: BTreeMap<u64, Set>,
    pub next_set: u64,
    pub next_message: u64,
    pub next_session: u64,
    pub next_request: u64,
    /// A set acquired jobs: the world's next turn is now (an idle runner of the set takes
    /// one then, as GitHub assigns it at once).
    pub nudge: bool,
    /// The draws of the later faults (deliveries of a started or ended job minutes late,
    /// duplicates sent later, answers lost after their call took effect), a stream of their
    /// own so that the world's other draws stay as they were; `None`: no faults.
    pub late: Option<fastrand::Rng>,
}

impl Hub {
    pub fn new(time: Time, api_timeout: Duration, scope: crate::config::Scope) -> Hub {
        Hub {
            jobs: BTreeMap::new(),
            runners: BTreeMap::new(),
            next_runner: 0,
            next_delivery: 0,
            outbox: Vec::new(),
            log: Vec::new(),
            heard: BTreeSet::new(),
            bodies: BTreeMap::new(),
            fault: None,
            rate_limited_until: None,
            api_timeout,
            calls: 0,
            calls_by: BTreeMap::new(),
            time,
            scope,
            sets: BTreeMap::new(),
            next_set: 0,
            next_message: 0,
            next_session: 0,
            next_request: 0,
            nudge: false,
            late: None,
        }
    }

    /// A queued job goes to the first scale set whose labels cover its own, offered to it.
    pub fn route(&mut self, id: u64) {
        let Some(job) = self.jobs.get(&id).filter(|j| j.routed.is_none() && j.status == Status::Queued) else {
            return;
        };
        let labels = label_set(&job.labels);
        let covered = |s: &&Set| labels.iter().all(|l| s.labels.contains(l));
        let Some(set) = self.sets.values().find(covered).map(|s| s.id).filter(|_| self.in_scope(job)) else {
            return;
        };
        let now = self.time.now();
        self.next_request += 1;
        let routed =
            Routed { set, request: REQUESTS + self.next_request, acquired_at: None, offered_at: now, reassignments: 0 };
        self.jobs.get_mut(&id).expect("found").routed = Some(routed);
        // Its webhook, answered before the set was made, did not give it to the agent (which
        // leaves a job a scale-set pool covers to the set's messages).
        self.heard.remove(&id);
        self.post(id, Kind::Available);
    }

    /// Posts a message about job `id` on its scale set's queue.
    pub fn post(&mut self, id: u64, kind: Kind) {
        use crate::github::scaleset::{JobMessage, JobRef};
        let Some(job) = self.jobs.get(&id) else { return };
        let Some(routed) = job.routed.clone() else { return };
        let job_ref = JobRef {
            request_id: routed.request,
            repository: job.repository.clone(),
            job_id: id.to_string(),
            run_id: job.run_id,
            display_name: "build".into(),
            labels: job.labels.clone(),
        };
        let runner_name = job.runner.clone();
        let message = match kind {
            Kind::Available => JobMessage::Available(job_ref),
            Kind::Assigned => JobMessage::Assigned(job_ref),
            Kind::Started => JobMessage::Started { job: job_ref, runner_name },
            Kind::Completed(result) => JobMessage::Completed { job: job_ref, result: result.into(), runner_name },
        };
        self.next_message += 1;
        let mid = self.next_message;
        if let Some(set) = self.sets.get_mut(&routed.set) {
            set.messages.insert(mid, message);
        }
    }

    /// Jobs of set `set` still not acquired `after` their last offer are offered again (a
    /// set whose capacity was full then may have room now).
    pub fn reoffer(&mut self, set: u64, after: Duration) {
        let now = self.time.now();
        let due: Vec<u64> = self
            .jobs
            .values()
            .filter(|j| j.status == Status::Queued)
            .filter(|j| j.routed.as_ref().is_some_and(|r| r.set == set && !r.acquired() && r.offered_at + after <= now))
            .map(|j| j.id)
            .collect();
        for id in due {
            if let Some(r) = self.jobs.get_mut(&id).and_then(|j| j.routed.as_mut()) {
                r.offered_at = now;
            }
            self.post(id, Kind::Available);
        }
    }

    /// Jobs of set `set` acquired and not started within [`REASSIGN_AFTER`] are given up
    /// on for the set (`JobCompleted`, `canceled`, no runner) and offered again under a new
    /// request; after [`MAX_REASSIGNMENTS`] GitHub fails the job.
    pub fn reassign_stale(&mut self, set: u64) {
        let now = self.time.now();
        let stale: Vec<u64> = self
            .jobs
            .values()
            .filter(|j| j.status == Status::Queued)
            .filter(|j| {
                j.routed
                    .as_ref()
                    .is_some_and(|r| r.set == set && r.acquired_at.is_some_and(|t| t + REASSIGN_AFTER <= now))
            })
            .map(|j| j.id)
            .collect();
        for id in stale {
            self.post(id, Kind::Completed("canceled"));
            let job = self.jobs.get_mut(&id).expect("listed");
            let r = job.routed.as_mut().expect("routed");
            if r.reassignments >= MAX_REASSIGNMENTS {
                job.status = Status::Completed("failure".into());
                self.emit(id, "completed", Duration::from_millis(300));
                continue;
            }
            r.reassignments += 1;
            r.acquired_at = None;
            r.offered_at = now;
            self.next_request += 1;
            r.request = REQUESTS + self.next_request;
            // Not the agent's under its new request until acquired again.
            self.heard.remove(&id);
            self.post(id, Kind::Available);
        }
    }

    /// The set's counts, as its messages carry them.
    pub fn statistics(&self, set: u64) -> crate::github::scaleset::Statistics {
        let mut s = crate::github::scaleset::Statistics::default();
        for j in self.jobs.values() {
            let Some(r) = j.routed.as_ref().filter(|r| r.set == set) else { continue };
            match (&j.status, r.acquired()) {
                (Status::Queued, false) => s.available += 1,
                (Status::Queued, true) => {
                    s.acquired += 1;
                    s.assigned += 1;
                }
                (Status::InProgress, _) => {
                    s.running += 1;
                    s.assigned += 1;
                }
                (Status::Completed(_), _) => {}
            }
        }
        for r in self.runners.values().filter(|r| r.scale_set == Some(set)) {
            s.registered += 1;
            if r.job.is_some() {
                s.busy += 1;
            } else if r.online {
                s.idle += 1;
            }
        }
        s
    }

    /// Deletes runner `id` unless it is busy (the REST API's, and the Actions service's).
    pub fn delete_runner(&mut self, id: u64) -> Deleted {
        match self.runners.get(&id) {
            None => Deleted::NotFound,
            Some(r) if r.job.is_some() => Deleted::Busy,
            Some(_) => {
                self.runners.remove(&id);
                Deleted::Deleted
            }
        }
    }

    /// The job's id in the agent: its request's for a job of a scale set.
    pub fn agent_id(&self, id: u64) -> u64 {
        self.jobs.get(&id).and_then(|j| j.routed.as_ref()).map_or(id, |r| r.request)
    }

    /// Whether the agent's runners may take `job`, and its deliveries are the agent's.
    pub fn in_scope(&self, job: &Job) -> bool {
        self.scope.admits(&job.repository, Some(ENTERPRISE))
    }

    pub fn runner_named(&self, name: &str) -> Option<&Runner> {
        self.runners.values().find(|r| r.name == name)
    }

    pub fn runner_named_mut(&mut self, name: &str) -> Option<&mut Runner> {
        self.runners.values_mut().find(|r| r.name == name)
    }

    /// The job as a webhook's `workflow_job` carries it.
    pub fn info(&self, id: u64) -> JobInfo {
        let j = &self.jobs[&id];
        JobInfo {
            id,
            run_id: j.run_id,
            run_attempt: j.run_attempt,
            name: "build".into(),
            workflow_name: "ci".into(),
            labels: j.labels.clone(),
            repository: j.repository.clone(),
            html_url: String::new(),
            runner_name: j.runner.clone(),
            conclusion: match &j.status {
                Status::Completed(c) => Some(c.clone()),
                _ => None,
            },
            scale_set: None,
        }
    }

    /// A `workflow_job` delivery of the job as it is now, posted after `delay`.
    pub fn emit(&mut self, id: u64, action: &str, mut delay: Duration) {
        // A started or ended job's delivery minutes late now and then (a queued one's delay
        // the world draws).
        if action != "queued"
            && let Some(r) = self.late.as_mut()
            && r.u8(0..30) == 0
        {
            delay = Duration::from_secs(r.u64(30..=1200));
        }
        let info = self.info(id);
        let body = serde_json::json!({
            "action": action,
            "workflow_job": {
                "id": info.id, "run_id": info.run_id, "run_attempt": info.run_attempt,
                "name": info.name, "workflow_name": info.workflow_name, "labels": info.labels,
                "html_url": info.html_url, "runner_name": info.runner_name, "conclusion": info.conclusion,
            },
            "repository": {"full_name": info.repository},
            "enterprise": {"slug": ENTERPRISE},
        })
        .to_string();
        self.next_delivery += 1;
        let guid = format!("g{id}-{}", self.next_delivery);
        self.bodies.insert(guid.clone(), body.clone());
        let hook = Hook { id: self.next_delivery, guid, action: action.into(), body, redelivery: false, copy: false };
        self.outbox.push((self.time.now() + delay, hook));
    }

    /// Notes that the agent answered a post of this delivery (`code`), whatever GitHub's log
    /// says of it (a delivery lost after the agent took it is logged as failed).
    pub fn answered(&mut self, hook: &Hook, code: u16) {
        let job = hook.guid.strip_prefix('g').and_then(|g| g.split('-').next()?.parse().ok());
        // A scale set's job reaches the agent through the set's messages (`ack`), not its
        // webhooks (which the agent answers and ignores).
        let routed = |id: &u64| self.jobs.get(id).is_some_and(|j| j.routed.is_some());
        if let Some(job) = job.filter(|j| (200..300).contains(&code) && !routed(j)) {
            self.heard.insert(job);
        }
    }

    /// Logs a delivery GitHub made (`code`: the agent's answer; 0: none).
    pub fn logged(&mut self, hook: &Hook, code: u16) {
        self.log.push(DeliveryInfo {
            id: hook.id,
            guid: hook.guid.clone(),
            delivered_at: self.time.wall(),
            status_code: code,
            redelivery: hook.redelivery,
            event: "workflow_job".into(),
            action: Some(hook.action.clone()),
        });
    }

    /// No answer to a call on `path`: the client's timeout passes, then it fails.
    fn timed_out(&self, path: &str) -> (GhError, Duration) {
        (GhError::Transport { method: "X".into(), path: path.into(), message: "timed out".into() }, self.api_timeout)
    }

    /// Whether a call fails, and how (drawn before the call's effect): `Ok(true)`, it takes
    /// effect and its answer is lost.
    fn fault(&mut self, path: &str, api: bool) -> Result<bool, (GhError, Duration)> {
        let now = self.time.now();
        // The REST API's limit holds back its own calls only (the Actions service's limits
        // are its own: a 429 answered there holds nothing here).
        if let Some(until) = self.rate_limited_until.filter(|_| api) {
            // Not a call GitHub counts: the agent's HTTP client sends none while the limit
            // it was answered holds (`github::http`), and fails it at once.
            if now < until {
                return Err((
                    GhError::RateLimited { method: "X".into(), path: path.into(), wait: until - now },
                    Duration::ZERO,
                ));
            }
            self.rate_limited_until = None;
        }
        // The REST API's calls count toward its rate limit; the Actions service's do not.
        self.calls += u64::from(api);
        *self.calls_by.entry(path.to_string()).or_default() += 1;
        let Some((kind, left)) = self.fault.as_mut() else { return Ok(false) };
        *left -= 1;
        let kind = *kind;
        if *left == 0 {
            self.fault = None;
        }
        Err(match kind {
            Fault::LostAnswer => return Ok(true),
            Fault::ServerError => (
                GhError::Status { method: "X".into(), path: path.into(), status: 502, message: "injected".into() },
                Duration::ZERO,
            ),
            Fault::Timeout => self.timed_out(path),
            Fault::RateLimit => {
                if api {
                    self.rate_limited_until = Some(now + RATE_LIMIT);
                }
                (GhError::RateLimited { method: "X".into(), path: path.into(), wait: RATE_LIMIT }, Duration::ZERO)
            }
        })
    }
}

/// The agent's GitHub in the simulator.
#[derive(Clone)]
pub struct SimGitHub {
    pub hub: Arc<Mutex<Hub>>,
    /// The agent's disk: once its process died (mid-write), its calls never return.
    pub disk: super::disk::Disk,
}

impl SimGitHub {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters a call: a fault is answered after its delay (a timeout's).
    async fn enter(&self, path: &str) -> Result<std::sync::MutexGuard<'_, Hub>, GhError> {
        self.enter_as(path, true).await
    }

    /// Enters a call of the REST API (`api`) or of the Actions service (whose calls do not
    /// count toward the API's rate limit). A call that only reads: an answer lost is a
    /// timeout.
    pub(super) async fn enter_as(&self, path: &str, api: bool) -> Result<std::sync::MutexGuard<'_, Hub>, GhError> {
        if let (hub, false) = self.enter_effect(path, api).await? {
            return Ok(hub);
        }
        self.lost_answer(path).await
    }

    /// A call that changes GitHub: `effect` made under the hub's lock, its answer lost
    /// after it now and then (a fault).
    async fn call<T>(&self, path: &str, effect: impl FnOnce(&mut Hub) -> Result<T, GhError>) -> Result<T, GhError> {
        let (made, lost) = {
            let (mut hub, lost) = self.enter_effect(path, true).await?;
            (effect(&mut hub), lost)
        };
        // A call GitHub refused (409, 404) is answered so, fault or not: only an effect
        // made can have its answer lost.
        if lost && made.is_ok() {
            return self.lost_answer(path).await;
        }
        made
    }

    /// Enters a call; `true`: it takes effect and its answer is lost (then
    /// [`SimGitHub::lost_answer`] is its answer).
    async fn enter_effect(&self, path: &str, api: bool) -> Result<(std::sync::MutexGuard<'_, Hub>, bool), GhError> {
        if self.disk.dead() {
            std::future::pending::<()>().await;
        }
        let fault = self.lock().fault(path, api);
        match fault {
            Ok(lost) => Ok((self.lock(), lost)),
            Err(failed) => answer(failed).await,
        }
    }

    /// The answer of a call whose effect is made and whose answer is lost: the client's
    /// timeout passes, as for a call that never reached GitHub.
    async fn lost_answer<T>(&self, path: &str) -> Result<T, GhError> {
        let timed_out = self.lock().timed_out(path);
        answer(timed_out).await
    }
}

/// A failed call's answer: its error, once its delay (a timeout's) has passed.
async fn answer<T>((e, delay): (GhError, Duration)) -> Result<T, GhError> {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    Err(e)
}

impl GitHub for SimGitHub {
    async fn generate_jit_config(&self, name: &str, labels: &[String], _group: u64) -> Result<JitRunner, GhError> {
        self.call("jit", |hub| {
            if hub.runner_named(name).is_some() {
                return Err(GhError::Status {
                    method: "POST".into(),
                    path: "generate-jitconfig".into(),
                    status: 409,
                    message: "Already exists - A runner with the same name already exists".into(),
                });
            }
            hub.next_runner += 1;
            let id = hub.next_runner;
            hub.runners.insert(
                id,
                Runner {
                    id,
                    name: name.into(),
                    labels: label_set(labels),
                    online: false,
                    job: None,
                    by_token: false,
                    scale_set: None,
                },
            );
            Ok(JitRunner { runner_id: id, encoded: Secret::new(crate::github::fake::encoded_jit_config(id, name)) })
        })
        .await
    }

    async fn registration_token(&self) -> Result<Secret, GhError> {
        drop(self.enter("registration-token").await?);
        Ok(Secret::new("SIMTOKEN"))
    }

    async fn runner_group_id(&self, _name: &str) -> Result<u64, GhError> {
        drop(self.enter("runner-groups").await?);
        Ok(1)
    }

    async fn list_runners(&self) -> Result<Vec<RunnerInfo>, GhError> {
        let hub = self.enter("runners").await?;
        Ok(hub
            .runners
            .values()
            .map(|r| RunnerInfo { id: r.id, name: r.name.clone(), online: r.online, busy: r.job.is_some() })
            .collect())
    }

    async fn find_runner(&self, name: &str) -> Result<Option<RunnerInfo>, GhError> {
        let hub = self.enter("runners?name").await?;
        Ok(hub.runner_named(name).map(|r| RunnerInfo {
            id: r.id,
            name: r.name.clone(),
            online: r.online,
            busy: r.job.is_some(),
        }))
    }

    async fn delete_runner(&self, id: u64) -> Result<Deleted, GhError> {
        self.call("delete runner", |hub| Ok(hub.delete_runner(id))).await
    }

    async fn job_status(&self, _repo: &str, job_id: u64) -> Result<Option<JobStatus>, GhError> {
        let hub = self.enter("job").await?;
        Ok(hub.jobs.get(&job_id).map(|j| {
            let (status, conclusion) = match &j.status {
                Status::Queued => ("queued", None),
                Status::InProgress => ("in_progress", None),
                Status::Completed(c) => ("completed", Some(c.clone())),
            };
            JobStatus { status: status.into(), conclusion, runner_name: j.runner.clone() }
        }))
    }

    async fn queued_jobs(&self, repo: &str) -> Result<Vec<JobInfo>, GhError> {
        let hub = self.enter("runs?status=queued").await?;
        let ids: Vec<u64> =
            hub.jobs.values().filter(|j| j.status == Status::Queued && j.repository == repo).map(|j| j.id).collect();
        Ok(ids.into_iter().map(|id| hub.info(id)).collect())
    }

    async fn list_deliveries(&self, since: SystemTime, max: usize) -> Result<Vec<DeliveryInfo>, GhError> {
        let hub = self.enter("hook deliveries").await?;
        let mut out: Vec<_> = hub.log.iter().filter(|d| d.delivered_at >= since).cloned().collect();
        out.sort_by_key(|d| std::cmp::Reverse((d.delivered_at, d.id)));
        out.truncate(max);
        Ok(out)
    }

    async fn redeliver(&self, id: u64) -> Result<(), GhError> {
        self.call("redeliver", |hub| {
            let Some(d) = hub.log.iter().find(|d| d.id == id).cloned() else {
                return Err(GhError::Status {
                    method: "POST".into(),
                    path: "attempts".into(),
                    status: 404,
                    message: "no such delivery".into(),
                });
            };
            // The same payload again, under the same guid, as a delivery of its own.
            let Some(body) = hub.bodies.get(&d.guid).cloned() else { return Ok(()) };
            hub.next_delivery += 1;
            let hook = Hook {
                id: hub.next_delivery,
                guid: d.guid,
                action: d.action.unwrap_or_default(),
                body,
                redelivery: true,
                copy: false,
            };
            let due = hub.time.now() + Duration::from_millis(500);
            hub.outbox.push((due, hook));
            Ok(())
        })
        .await
    }

    async fn hook_ranges(&self) -> Result<Vec<ipnet::IpNet>, GhError> {
        drop(self.enter("meta").await?);
        Ok(Vec::new())
    }
}

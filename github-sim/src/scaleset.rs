//! Runner scale sets, as GitHub's Actions service plays them for the Runner Scale Set Client
//! (`actions/scaleset`, ARC's listener): not in the REST reference, so the shapes follow the
//! official Go client. The service lives at the URL the registration exchange returns
//! (`<base>/_runner`), authenticated by the exchange's token (the *admin* token):
//!
//! - `_apis/runtime/runnergroups/?groupName=`, `_apis/runtime/runnerscalesets[?name=]`,
//!   `…/{id}` (get, PATCH, DELETE), `…/{id}/sessions[/{sid}]` (POST 409 while another
//!   session is alive, PATCH refreshes its queue token, DELETE),
//!   `…/{id}/acquirejobs` (with the session's queue token), `…/{id}/generatejitconfig`,
//!   `_apis/distributedtask/pools/0/agents[/{id}]`;
//! - the session's message queue `_queue/{sid}`: a long poll (`lastMessageId`,
//!   `X-ScaleSetMaxCapacity`) answered 200 with the next message (a UTF-8 BOM first, as the
//!   service sends), or 202 when the window passes with none; `DELETE _queue/{sid}/{mid}`
//!   acknowledges a message; 401 once the queue token expired.
//!
//! The rules (pure, in [`World`]): a job queued at a scope a scale set covers, whose labels
//! the set's name and labels cover, is the set's ("available"); `acquirejobs` assigns it
//! to the set, within the capacity its last poll announced; only the set's runners take
//! it, oldest first; a job assigned and not started within `reassign_after` is cancelled
//! for the set and offered again under a new request id (GitHub does so up to three
//! times). Every change is a message on the set's queue: `JobAvailable`, `JobAssigned`,
//! `JobStarted`, `JobCompleted`; every answer carries the set's statistics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Sim;
use crate::model::{JobStatus, NewRunner, Scope, World, WorldError, guid, labels_cover, token};

/// Job messages in one message at most (GitHub's service: 50).
pub const MAX_BATCH: usize = 50;

/// Times GitHub offers a job to a set that never starts it before giving up on the set.
pub const MAX_REASSIGNMENTS: u32 = 3;

#[derive(Debug, Clone)]
pub struct ScaleSet {
    pub id: u64,
    pub name: String,
    pub scope: Scope,
    pub group_id: u64,
    pub labels: Vec<String>,
    pub session: Option<Session>,
    /// Undeleted messages by id: each one job message.
    pub messages: BTreeMap<u64, Value>,
    /// The capacity the last poll announced (`X-ScaleSetMaxCapacity`); `None`: unlimited.
    pub capacity: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub owner: String,
    pub queue_token: String,
    pub token_expires: SystemTime,
    /// Its last poll (or creation): a session not heard of for `session_idle` is gone.
    pub last_seen: SystemTime,
}

/// A job's place in a scale set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub scale_set: u64,
    /// The current request's id (`runnerRequestId`): a new one at each reassignment.
    pub request_id: u64,
    pub acquired_at: Option<SystemTime>,
    pub reassignments: u32,
    /// When it was last offered (`JobAvailable`): offered again while not acquired.
    pub offered_at: SystemTime,
}

/// What the set's statistics say (`RunnerScaleSetStatistic`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Statistics {
    pub available: u64,
    pub acquired: u64,
    pub assigned: u64,
    pub running: u64,
    pub registered: u64,
    pub busy: u64,
    pub idle: u64,
}

impl Statistics {
    pub fn to_json(self) -> Value {
        json!({
            "totalAvailableJobs": self.available, "totalAcquiredJobs": self.acquired,
            "totalAssignedJobs": self.assigned, "totalRunningJobs": self.running,
            "totalRegisteredRunners": self.registered, "totalBusyRunners": self.busy,
            "totalIdleRunners": self.idle,
        })
    }
}

impl ScaleSet {
    pub fn to_json(&self, world: &World, now: SystemTime) -> Value {
        let group = world.group(self.group_id).map(|g| g.name.clone()).unwrap_or_default();
        let labels: Vec<Value> = self.labels.iter().map(|l| json!({"type": "System", "name": l})).collect();
        json!({
            "id": self.id, "name": self.name, "runnerGroupId": self.group_id, "runnerGroupName": group,
            "labels": labels, "runnerSetting": {"disableUpdate": true},
            "statistics": world.statistics(self.id, now).to_json(),
        })
    }

    /// The labels a job may ask for: the set's name and its labels.
    fn covers(&self, job_labels: &[String]) -> bool {
        let mut all = self.labels.clone();
        all.push(self.name.clone());
        labels_cover(&all, job_labels)
    }
}

impl World {
    /// A new scale set (`POST runnerscalesets`): queued jobs it covers become its own.
    pub fn create_scale_set(
        &mut self,
        name: &str,
        scope: Scope,
        group_id: u64,
        labels: Vec<String>,
        now: SystemTime,
    ) -> Result<u64, WorldError> {
        if self.group(group_id).is_none() {
            return Err(WorldError::Invalid(format!("Runner group {group_id} does not exist")));
        }
        if self.scale_sets.values().any(|s| s.scope == scope && s.name.eq_ignore_ascii_case(name)) {
            return Err(WorldError::Invalid(format!("A runner scale set named {name} already exists")));
        }
        self.next_scale_set += 1;
        let id = self.next_scale_set;
        let labels = if labels.is_empty() { vec![name.to_string()] } else { labels };
        let set = ScaleSet {
            id,
            name: name.into(),
            scope,
            group_id,
            labels,
            session: None,
            messages: BTreeMap::new(),
            capacity: None,
        };
        self.scale_sets.insert(id, set);
        let queued: Vec<u64> =
            self.jobs.values().filter(|j| j.status == JobStatus::Queued && j.routed.is_none()).map(|j| j.id).collect();
        for job in queued {
            self.route(job, now);
        }
        Ok(id)
    }

    /// A queued job goes to the first scale set that covers it (none: it stays for
    /// runners registered the classic way).
    pub fn route(&mut self, job_id: u64, now: SystemTime) {
        let Some(job) = self.jobs.get(&job_id).filter(|j| j.routed.is_none() && j.status == JobStatus::Queued) else {
            return;
        };
        let Some(set) = self.scale_sets.values().find(|s| s.scope.covers_repo(&job.repo) && s.covers(&job.labels))
        else {
            return;
        };
        let set = set.id;
        self.next_request += 1;
        let request_id = self.next_request;
        if let Some(job) = self.jobs.get_mut(&job_id) {
            job.routed =
                Some(Routed { scale_set: set, request_id, acquired_at: None, reassignments: 0, offered_at: now });
        }
        self.post_message(job_id, "JobAvailable", None, now);
    }

    /// Posts a message about `job_id` on its scale set's queue.
    pub(crate) fn post_message(&mut self, job_id: u64, kind: &str, result: Option<&str>, now: SystemTime) {
        let Some(job) = self.jobs.get(&job_id) else { return };
        let Some(routed) = job.routed.clone() else { return };
        let (owner, repo) = job.repo.split_once('/').unwrap_or(("", &job.repo));
        let mut m = json!({
            "messageType": kind, "runnerRequestId": routed.request_id, "repositoryName": repo,
            "ownerName": owner, "jobId": job.id.to_string(), "workflowRunId": job.run_id,
            "jobDisplayName": job.name, "jobWorkflowRef": format!("{}/.github/workflows/ci.yml@refs/heads/main", job.repo),
            "eventName": "push", "requestLabels": job.labels,
            "queueTime": humantime::format_rfc3339_seconds(job.created_at).to_string(),
        });
        if let Some(r) = &job.runner
            && kind != "JobAvailable"
            && kind != "JobAssigned"
        {
            m["runnerId"] = json!(r.id);
            m["runnerName"] = json!(r.name);
        }
        if kind == "JobAvailable" {
            m["acquireJobUrl"] = json!("");
        }
        if let Some(result) = result {
            m["result"] = json!(result);
            m["finishTime"] = json!(humantime::format_rfc3339_seconds(now).to_string());
        }
        self.next_message += 1;
        let id = self.next_message;
        if let Some(set) = self.scale_sets.get_mut(&routed.scale_set) {
            set.messages.insert(id, m);
        }
    }

    /// `acquirejobs`: the set's available jobs among `requests` become assigned to it, as
    /// many as its announced capacity leaves room for. Returns the requests acquired.
    pub fn acquire(&mut self, set_id: u64, requests: &[u64], now: SystemTime) -> Vec<u64> {
        let Some(capacity) = self.scale_sets.get(&set_id).map(|s| s.capacity) else { return Vec::new() };
        let mut room = capacity.map(|c| c.saturating_sub(self.statistics(set_id, now).assigned));
        let mut acquired = Vec::new();
        for &request in requests {
            if room == Some(0) {
                break;
            }
            let Some(job) = self.jobs.values_mut().find(|j| {
                j.status == JobStatus::Queued
                    && j.routed
                        .as_ref()
                        .is_some_and(|r| r.scale_set == set_id && r.request_id == request && r.acquired_at.is_none())
            }) else {
                continue;
            };
            if let Some(r) = job.routed.as_mut() {
                r.acquired_at = Some(now);
            }
            let id = job.id;
            acquired.push(request);
            room = room.map(|n| n - 1);
            self.post_message(id, "JobAssigned", None, now);
        }
        acquired
    }

    /// Jobs assigned to a set and not started within `after` are cancelled for it and
    /// offered again under a new request (a job offered [`MAX_REASSIGNMENTS`] times stays
    /// with the set: GitHub would fail it; the simulator keeps it for the test to see).
    pub fn reassign_stale(&mut self, after: Duration, now: SystemTime) {
        let stale: Vec<u64> = self
            .jobs
            .values()
            .filter(|j| j.status == JobStatus::Queued)
            .filter(|j| {
                j.routed.as_ref().is_some_and(|r| {
                    r.reassignments < MAX_REASSIGNMENTS
                        && r.acquired_at.is_some_and(|t| now.duration_since(t).unwrap_or_default() >= after)
                })
            })
            .map(|j| j.id)
            .collect();
        for id in stale {
            self.post_message(id, "JobCompleted", Some("canceled"), now);
            self.next_request += 1;
            let request_id = self.next_request;
            if let Some(r) = self.jobs.get_mut(&id).and_then(|j| j.routed.as_mut()) {
                r.request_id = request_id;
                r.acquired_at = None;
                r.reassignments += 1;
                r.offered_at = now;
            }
            self.post_message(id, "JobAvailable", None, now);
        }
    }

    /// Jobs of the set still available `after` their last offer are offered again (a set
    /// whose capacity was full when they came may have room now).
    pub fn reoffer(&mut self, set_id: u64, after: Duration, now: SystemTime) {
        let due: Vec<u64> = self
            .jobs
            .values()
            .filter(|j| j.status == JobStatus::Queued)
            .filter(|j| {
                j.routed.as_ref().is_some_and(|r| {
                    r.scale_set == set_id
                        && r.acquired_at.is_none()
                        && now.duration_since(r.offered_at).unwrap_or_default() >= after
                })
            })
            .map(|j| j.id)
            .collect();
        for id in due {
            if let Some(r) = self.jobs.get_mut(&id).and_then(|j| j.routed.as_mut()) {
                r.offered_at = now;
            }
            self.post_message(id, "JobAvailable", None, now);
        }
    }

    pub fn statistics(&self, set_id: u64, now: SystemTime) -> Statistics {
        let mut s = Statistics::default();
        for j in self.jobs.values() {
            let Some(r) = j.routed.as_ref().filter(|r| r.scale_set == set_id) else { continue };
            match (j.status, r.acquired_at) {
                (JobStatus::Queued, None) => s.available += 1,
                (JobStatus::Queued, Some(_)) => {
                    s.acquired += 1;
                    s.assigned += 1;
                }
                (JobStatus::InProgress, _) => {
                    s.running += 1;
                    s.assigned += 1;
                }
                (JobStatus::Completed, _) => {}
            }
        }
        for r in self.runners.values().filter(|r| r.scale_set == Some(set_id)) {
            s.registered += 1;
            if r.job.is_some() {
                s.busy += 1;
            } else if r.online(now) {
                s.idle += 1;
            }
        }
        s
    }

    /// The session of `set_id`, if one is alive (`idle`: how long one lasts unheard of).
    fn live_session(&mut self, set_id: u64, idle: Duration, now: SystemTime) -> Option<&mut Session> {
        let set = self.scale_sets.get_mut(&set_id)?;
        if set.session.as_ref().is_some_and(|s| now.duration_since(s.last_seen).unwrap_or_default() >= idle) {
            set.session = None;
        }
        set.session.as_mut()
    }

    /// The set whose live session (see [`World::live_session`]) holds `queue_token`,
    /// unexpired, with the session's id.
    fn session_of_token(&mut self, queue_token: &str, idle: Duration, now: SystemTime) -> Option<(u64, String)> {
        let (set, session) = self.scale_sets.values().find_map(|s| {
            let sess = s.session.as_ref().filter(|x| x.queue_token == queue_token && x.token_expires > now)?;
            Some((s.id, sess.id.clone()))
        })?;
        self.live_session(set, idle, now)?;
        Some((set, session))
    }
}

/// The `typeName`/`message` error body of the Actions service.
struct ServiceError {
    status: StatusCode,
    type_name: &'static str,
    message: String,
}

impl ServiceError {
    fn new(status: StatusCode, type_name: &'static str, message: impl Into<String>) -> Self {
        ServiceError { status, type_name, message: message.into() }
    }
    fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "UnauthorizedException", "The token is not valid or has expired")
    }
    fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "GitHub.DistributedTask.WebApi.NotFoundException", what)
    }
    fn bad_request(what: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "ArgumentException", what)
    }
}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({"typeName": self.type_name, "message": self.message}))).into_response()
    }
}

type R = Result<Response, ServiceError>;
type S = State<Arc<Sim>>;

pub fn router(sim: Arc<Sim>) -> Router {
    const SETS: &str = "/_runner/_apis/runtime/runnerscalesets";
    Router::new()
        .route("/_runner/_apis/runtime/runnergroups/", get(runner_groups))
        .route(SETS, get(find_sets).post(create_set))
        .route(&format!("{SETS}/{{id}}"), get(get_set).patch(update_set).delete(delete_set))
        .route(&format!("{SETS}/{{id}}/sessions"), post(create_session))
        .route(&format!("{SETS}/{{id}}/sessions/{{sid}}"), axum::routing::patch(refresh_session).delete(delete_session))
        .route(&format!("{SETS}/{{id}}/acquirejobs"), post(acquire_jobs))
        .route(&format!("{SETS}/{{id}}/generatejitconfig"), post(generate_jit_config))
        .route("/_runner/_apis/distributedtask/pools/0/agents", get(find_agent))
        .route("/_runner/_apis/distributedtask/pools/0/agents/{id}", get(get_agent).delete(delete_agent))
        .route("/_runner/_queue/{sid}", get(poll))
        .route("/_runner/_queue/{sid}/{mid}", axum::routing::delete(delete_message))
        .with_state(sim)
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers.get("authorization")?.to_str().ok()?.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

/// Counts the call, and answers it as an armed `api_error` fault whose `path` is in
/// `"{prefix} {route}"` says (`/_runner/_queue`: the message queue, `/_runner/_apis`: the
/// rest; or a route, `acquirejobs` say).
fn call(sim: &Sim, route: &str, prefix: &str) -> Result<(), ServiceError> {
    sim.count_call(format!("scaleset {route}"));
    match sim.faults().on_api_call(&format!("{prefix} {route}")).error {
        Some(crate::faults::Fault::ApiError { status, .. }) => Err(ServiceError::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "ServiceUnavailableException",
            "The service is unavailable (an injected fault)",
        )),
        _ => Ok(()),
    }
}

/// The scope the request's admin token (from the registration exchange) is for.
fn admin(sim: &Sim, headers: &HeaderMap, route: &str) -> Result<Scope, ServiceError> {
    call(sim, route, "/_runner/_apis")?;
    let token = bearer(headers).ok_or_else(ServiceError::unauthorized)?;
    let now = SystemTime::now();
    match sim.world().admin_tokens.get(&token) {
        Some((scope, expires)) if *expires > now => Ok(scope.clone()),
        _ => Err(ServiceError::unauthorized()),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ServiceError> {
    serde_json::from_slice(body).map_err(|e| ServiceError::bad_request(format!("bad request body: {e}")))
}

/// A set of the admin token's scope.
fn set_at(world: &World, scope: &Scope, id: &str) -> Result<u64, ServiceError> {
    id.parse::<u64>()
        .ok()
        .filter(|id| world.scale_sets.get(id).is_some_and(|s| &s.scope == scope))
        .ok_or_else(|| ServiceError::not_found(format!("runner scale set {id} not found")))
}

#[derive(Deserialize)]
struct GroupQuery {
    #[serde(rename = "groupName")]
    group_name: Option<String>,
}

async fn runner_groups(State(sim): S, headers: HeaderMap, Query(q): Query<GroupQuery>) -> R {
    admin(&sim, &headers, "runnergroups")?;
    let world = sim.world();
    let groups: Vec<Value> = world
        .groups
        .iter()
        .filter(|g| q.group_name.as_deref().is_none_or(|n| g.name.eq_ignore_ascii_case(n)))
        .map(|g| json!({"id": g.id, "name": g.name, "isDefaultGroup": g.default}))
        .collect();
    Ok(axum::Json(json!({"count": groups.len(), "value": groups})).into_response())
}

#[derive(Deserialize)]
struct SetQuery {
    name: Option<String>,
    #[serde(rename = "runnerGroupId")]
    runner_group_id: Option<u64>,
}

async fn find_sets(State(sim): S, headers: HeaderMap, Query(q): Query<SetQuery>) -> R {
    let scope = admin(&sim, &headers, "runnerscalesets")?;
    let now = SystemTime::now();
    let world = sim.world();
    let sets: Vec<Value> = world
        .scale_sets
        .values()
        .filter(|s| s.scope == scope)
        .filter(|s| q.name.as_deref().is_none_or(|n| s.name.eq_ignore_ascii_case(n)))
        .filter(|s| q.runner_group_id.is_none_or(|g| s.group_id == g))
        .map(|s| s.to_json(&world, now))
        .collect();
    Ok(axum::Json(json!({"count": sets.len(), "value": sets})).into_response())
}

#[derive(Deserialize)]
struct SetBody {
    name: Option<String>,
    #[serde(rename = "runnerGroupId")]
    runner_group_id: Option<u64>,
    labels: Option<Vec<Label>>,
}

#[derive(Deserialize)]
struct Label {
    name: String,
}

async fn create_set(State(sim): S, headers: HeaderMap, body: Bytes) -> R {
    let scope = admin(&sim, &headers, "runnerscalesets create")?;
    let req: SetBody = parse(&body)?;
    let name =
        req.name.filter(|n| !n.trim().is_empty()).ok_or_else(|| ServiceError::bad_request("name is required"))?;
    let labels = req.labels.unwrap_or_default().into_iter().map(|l| l.name).collect();
    let now = SystemTime::now();
    let mut world = sim.world();
    let id = world
        .create_scale_set(&name, scope, req.runner_group_id.unwrap_or(1), labels, now)
        .map_err(|e| ServiceError::bad_request(e.to_string()))?;
    let body = world.scale_sets[&id].to_json(&world, now);
    Ok(axum::Json(body).into_response())
}

async fn get_set(State(sim): S, headers: HeaderMap, Path(id): Path<String>) -> R {
    let scope = admin(&sim, &headers, "runnerscaleset")?;
    let world = sim.world();
    let id = set_at(&world, &scope, &id)?;
    Ok(axum::Json(world.scale_sets[&id].to_json(&world, SystemTime::now())).into_response())
}

async fn update_set(State(sim): S, headers: HeaderMap, Path(id): Path<String>, body: Bytes) -> R {
    let scope = admin(&sim, &headers, "runnerscaleset update")?;
    let req: SetBody = parse(&body)?;
    let mut world = sim.world();
    let id = set_at(&world, &scope, &id)?;
    if let Some(g) = req.runner_group_id
        && world.group(g).is_none()
    {
        return Err(ServiceError::bad_request(format!("Runner group {g} does not exist")));
    }
    let set = world.scale_sets.get_mut(&id).expect("found");
    if let Some(n) = req.name.filter(|n| !n.trim().is_empty()) {
        set.name = n;
    }
    if let Some(g) = req.runner_group_id {
        set.group_id = g;
    }
    if let Some(l) = req.labels.filter(|l| !l.is_empty()) {
        set.labels = l.into_iter().map(|l| l.name).collect();
    }
    Ok(axum::Json(world.scale_sets[&id].to_json(&world, SystemTime::now())).into_response())
}

async fn delete_set(State(sim): S, headers: HeaderMap, Path(id): Path<String>) -> R {
    let scope = admin(&sim, &headers, "runnerscaleset delete")?;
    let mut world = sim.world();
    let id = set_at(&world, &scope, &id)?;
    let now = SystemTime::now();
    // Its runners go with it: a busy one's job fails, as when a runner is lost.
    let runners: Vec<u64> = world.runners.values().filter(|r| r.scale_set == Some(id)).map(|r| r.id).collect();
    for r in runners {
        let _ = world.runner_lost(r, now);
        world.runners.remove(&r);
    }
    world.scale_sets.remove(&id);
    // Its queued jobs are nobody's now, or another set's that covers them.
    let queued: Vec<u64> = world
        .jobs
        .values()
        .filter(|j| j.status == JobStatus::Queued && j.routed.as_ref().is_some_and(|r| r.scale_set == id))
        .map(|j| j.id)
        .collect();
    for j in queued {
        if let Some(job) = world.jobs.get_mut(&j) {
            job.routed = None;
        }
        world.route(j, now);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn session_json(world: &World, set_id: u64, s: &Session, base: &str, now: SystemTime) -> Value {
    json!({
        "sessionId": s.id, "ownerName": s.owner,
        "runnerScaleSet": world.scale_sets[&set_id].to_json(world, now),
        "messageQueueUrl": format!("{base}/_runner/_queue/{}", s.id),
        "messageQueueAccessToken": s.queue_token,
        "statistics": world.statistics(set_id, now).to_json(),
    })
}

#[derive(Deserialize)]
struct SessionBody {
    #[serde(rename = "ownerName")]
    owner_name: Option<String>,
}

async fn create_session(State(sim): S, headers: HeaderMap, Path(id): Path<String>, body: Bytes) -> R {
    let scope = admin(&sim, &headers, "sessions create")?;
    let req: SessionBody = parse(&body)?;
    let now = SystemTime::now();
    let mut world = sim.world();
    let id = set_at(&world, &scope, &id)?;
    if world.live_session(id, sim.config.scale_set_session_idle, now).is_some() {
        let name = world.scale_sets[&id].name.clone();
        let msg = format!("The actions runner scaleset {name} already has an active session.");
        return Err(ServiceError::new(
            StatusCode::CONFLICT,
            "GitHub.Actions.Runtime.WebApi.RunnerScaleSetSessionConflictException",
            msg,
        ));
    }
    let session = Session {
        id: guid(),
        owner: req.owner_name.unwrap_or_default(),
        queue_token: token("mq_", 40),
        token_expires: now + sim.config.queue_token_ttl,
        last_seen: now,
    };
    world.scale_sets.get_mut(&id).expect("found").session = Some(session.clone());
    Ok(axum::Json(session_json(&world, id, &session, &sim.base_url, now)).into_response())
}

async fn refresh_session(State(sim): S, headers: HeaderMap, Path((id, sid)): Path<(String, String)>) -> R {
    let scope = admin(&sim, &headers, "sessions refresh")?;
    let now = SystemTime::now();
    let mut world = sim.world();
    let id = set_at(&world, &scope, &id)?;
    let ttl = sim.config.queue_token_ttl;
    let Some(s) = world.live_session(id, sim.config.scale_set_session_idle, now).filter(|s| s.id == sid) else {
        return Err(ServiceError::new(
            StatusCode::NOT_FOUND,
            "GitHub.DistributedTask.WebApi.RunnerAdminException",
            "runner referenced a session ID that doesn't exist",
        ));
    };
    s.queue_token = token("mq_", 40);
    s.token_expires = now + ttl;
    s.last_seen = now;
    let s = s.clone();
    Ok(axum::Json(session_json(&world, id, &s, &sim.base_url, now)).into_response())
}

async fn delete_session(State(sim): S, headers: HeaderMap, Path((id, sid)): Path<(String, String)>) -> R {
    let scope = admin(&sim, &headers, "sessions delete")?;
    let mut world = sim.world();
    let id = set_at(&world, &scope, &id)?;
    let set = world.scale_sets.get_mut(&id).expect("found");
    if set.session.as_ref().is_some_and(|s| s.id == sid) {
        set.session = None;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct PollQuery {
    #[serde(rename = "lastMessageId")]
    last_message_id: Option<u64>,
}

/// The long poll of a session's message queue.
async fn poll(State(sim): S, headers: HeaderMap, Path(sid): Path<String>, Query(q): Query<PollQuery>) -> R {
    call(&sim, "message poll", "/_runner/_queue")?;
    let token = bearer(&headers).ok_or_else(ServiceError::unauthorized)?;
    let capacity = headers
        .get("x-scalesetmaxcapacity")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| ServiceError::bad_request("X-ScaleSetMaxCapacity is required"))?;
    let deadline = tokio::time::Instant::now() + sim.config.message_poll_window;
    // Authenticated as it arrives; then it waits while its session lasts.
    let idle = sim.config.scale_set_session_idle;
    let set_id = match sim.world().session_of_token(&token, idle, SystemTime::now()) {
        Some((set, session)) if session == sid => set,
        _ => return Err(ServiceError::unauthorized()),
    };
    loop {
        let now = SystemTime::now();
        {
            let mut world = sim.world();
            world.reassign_stale(sim.config.reassign_after, now);
            world.reoffer(set_id, sim.config.reassign_after / 4, now);
            let live = world.scale_sets.get(&set_id).and_then(|s| s.session.as_ref()).is_some_and(|s| s.id == sid);
            if !live {
                return Err(ServiceError::unauthorized());
            }
            let stats = world.statistics(set_id, now);
            let set = world.scale_sets.get_mut(&set_id).expect("found");
            set.capacity = Some(capacity);
            if let Some(s) = set.session.as_mut() {
                s.last_seen = now;
            }
            // What came since the client's last, up to 50 job messages, as one message
            // (its id the last one's: acknowledging it acknowledges them all).
            let after = q.last_message_id.unwrap_or(0);
            let batch: Vec<(u64, Value)> =
                set.messages.range(after + 1..).take(MAX_BATCH).map(|(id, m)| (*id, m.clone())).collect();
            if let Some((mid, _)) = batch.last() {
                let jobs: Vec<Value> = batch.iter().map(|(_, m)| m.clone()).collect();
                let body = serde_json::to_string(&jobs).expect("json");
                let envelope = json!({
                    "messageId": mid, "messageType": "RunnerScaleSetJobMessages",
                    "body": body, "statistics": stats.to_json(),
                });
                // The service writes a UTF-8 byte-order mark before its JSON.
                let mut bytes = b"\xEF\xBB\xBF".to_vec();
                bytes.extend(serde_json::to_vec(&envelope).expect("json"));
                return Ok(([("content-type", "application/json; charset=utf-8")], bytes).into_response());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(StatusCode::ACCEPTED.into_response());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn delete_message(State(sim): S, headers: HeaderMap, Path((sid, mid)): Path<(String, String)>) -> R {
    call(&sim, "message delete", "/_runner/_queue")?;
    let token = bearer(&headers).ok_or_else(ServiceError::unauthorized)?;
    let now = SystemTime::now();
    let mut world = sim.world();
    let (set_id, session) = world
        .session_of_token(&token, sim.config.scale_set_session_idle, now)
        .ok_or_else(ServiceError::unauthorized)?;
    if session != sid {
        return Err(ServiceError::unauthorized());
    }
    let mid: u64 = mid.parse().map_err(|_| ServiceError::not_found("message"))?;
    // A message is the job messages up to its id (see `poll`).
    world.scale_sets.get_mut(&set_id).expect("found").messages.retain(|id, _| *id > mid);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn acquire_jobs(State(sim): S, headers: HeaderMap, Path(id): Path<String>, body: Bytes) -> R {
    call(&sim, "acquirejobs", "/_runner/_apis")?;
    let token = bearer(&headers).ok_or_else(ServiceError::unauthorized)?;
    let requests: Vec<u64> = parse(&body)?;
    let now = SystemTime::now();
    let mut world = sim.world();
    let (set_id, _) = world
        .session_of_token(&token, sim.config.scale_set_session_idle, now)
        .ok_or_else(ServiceError::unauthorized)?;
    if id.parse::<u64>().ok() != Some(set_id) {
        return Err(ServiceError::unauthorized());
    }
    let acquired = world.acquire(set_id, &requests, now);
    drop(world);
    sim.jobs_changed.notify_waiters();
    Ok(axum::Json(json!({"count": acquired.len(), "value": acquired})).into_response())
}

#[derive(Deserialize)]
struct JitBody {
    name: Option<String>,
    #[serde(rename = "workFolder")]
    work_folder: Option<String>,
}

async fn generate_jit_config(State(sim): S, headers: HeaderMap, Path(id): Path<String>, body: Bytes) -> R {
    let scope = admin(&sim, &headers, "generatejitconfig")?;
    let req: JitBody = parse(&body)?;
    let name =
        req.name.filter(|n| !n.trim().is_empty()).ok_or_else(|| ServiceError::bad_request("name is required"))?;
    let now = SystemTime::now();
    let mut world = sim.world();
    let set_id = set_at(&world, &scope, &id)?;
    let set = world.scale_sets[&set_id].clone();
    let runner_id = world
        .add_runner(
            NewRunner {
                name: name.clone(),
                scope: set.scope.clone(),
                labels: set.labels.clone(),
                group_id: set.group_id,
                ephemeral: true,
                jit: true,
                replace: false,
                scale_set: Some(set_id),
            },
            now,
        )
        .map_err(|e| match e {
            WorldError::RunnerNameTaken(_) => ServiceError::new(
                StatusCode::CONFLICT,
                "GitHub.DistributedTask.WebApi.AgentExistsException",
                e.to_string(),
            ),
            other => ServiceError::bad_request(other.to_string()),
        })?;
    let runner = world.runners[&runner_id].clone();
    let group = world.group(set.group_id).map(|g| g.name.clone()).unwrap_or_default();
    drop(world);
    let base = &sim.base_url;
    let runner_file = json!({
        "agentId": runner_id, "agentName": name, "poolId": set.group_id, "poolName": group,
        "serverUrl": format!("{base}/_runner"), "gitHubUrl": format!("{base}/{}", set.scope.web_path()),
        "workFolder": req.work_folder.filter(|w| !w.is_empty()).unwrap_or_else(|| "_work".into()), "ephemeral": true,
    });
    let credentials = json!({"scheme": "OAuth", "data": {"clientId": guid(), "token": runner.credential}});
    Ok(axum::Json(json!({
        "runner": {"id": runner_id, "name": name, "runnerScaleSetId": set_id},
        "encodedJITConfig": crate::api::encode_jit_config(&runner_file, &credentials),
    }))
    .into_response())
}

fn agent_json(r: &crate::model::Runner) -> Value {
    json!({"id": r.id, "name": r.name, "runnerScaleSetId": r.scale_set.unwrap_or(0)})
}

#[derive(Deserialize)]
struct AgentQuery {
    #[serde(rename = "agentName")]
    agent_name: Option<String>,
}

async fn find_agent(State(sim): S, headers: HeaderMap, Query(q): Query<AgentQuery>) -> R {
    let scope = admin(&sim, &headers, "agents")?;
    let world = sim.world();
    let found: Vec<Value> = world
        .runners
        .values()
        .filter(|r| r.scope == scope && r.scale_set.is_some())
        .filter(|r| q.agent_name.as_deref().is_none_or(|n| r.name.eq_ignore_ascii_case(n)))
        .map(agent_json)
        .collect();
    Ok(axum::Json(json!({"count": found.len(), "value": found})).into_response())
}

async fn get_agent(State(sim): S, headers: HeaderMap, Path(id): Path<String>) -> R {
    let scope = admin(&sim, &headers, "agent")?;
    let world = sim.world();
    let r = id
        .parse::<u64>()
        .ok()
        .and_then(|id| world.runners.get(&id))
        .filter(|r| r.scope == scope)
        .ok_or_else(|| ServiceError::not_found("agent"))?;
    Ok(axum::Json(agent_json(r)).into_response())
}

async fn delete_agent(State(sim): S, headers: HeaderMap, Path(id): Path<String>) -> R {
    let scope = admin(&sim, &headers, "agent delete")?;
    let id: u64 = id.parse().map_err(|_| ServiceError::not_found("agent"))?;
    match sim.world().delete_runner(&scope, id) {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(WorldError::NotFound) => Err(ServiceError::new(
            StatusCode::NOT_FOUND,
            "GitHub.DistributedTask.WebApi.AgentNotFoundException",
            format!("agent {id} not found"),
        )),
        Err(WorldError::RunnerBusy(name)) => Err(ServiceError::new(
            StatusCode::BAD_REQUEST,
            "GitHub.DistributedTask.WebApi.JobStillRunningException",
            format!("runner {name} is still running a job"),
        )),
        Err(e) => Err(ServiceError::bad_request(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NewJob;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    fn job(world: &mut World, repo: &str, labels: &[&str], at: SystemTime) -> u64 {
        world.add_job(
            NewJob {
                repo: repo.into(),
                labels: labels.iter().map(|l| l.to_string()).collect(),
                name: None,
                workflow_name: None,
                run_id: None,
                behaviour: Default::default(),
            },
            at,
        )
    }

    fn kinds(world: &World, set: u64) -> Vec<(String, u64)> {
        world.scale_sets[&set]
            .messages
            .values()
            .map(|m| (m["messageType"].as_str().unwrap().to_string(), m["runnerRequestId"].as_u64().unwrap()))
            .collect()
    }

    /// A job the set covers is offered to it; acquired within the announced capacity; run
    /// by the set's runner only; each change a message.
    #[test]
    fn a_scale_sets_job_is_offered_acquired_within_capacity_and_run_by_its_runners_only() {
        let mut w = World::default();
        let set = w.create_scale_set("rv-linux", Scope::Org("octo".into()), 1, vec![], t(0)).unwrap();
        let a = job(&mut w, "octo/app", &["rv-linux"], t(1));
        let b = job(&mut w, "octo/app", &["rv-linux"], t(2));
        let other = job(&mut w, "octo/app", &["self-hosted"], t(3));
        let elsewhere = job(&mut w, "else/app", &["rv-linux"], t(3));
        assert!(w.jobs[&other].routed.is_none() && w.jobs[&elsewhere].routed.is_none());
        let (ra, rb) = (w.jobs[&a].routed.clone().unwrap().request_id, w.jobs[&b].routed.clone().unwrap().request_id);
        assert_eq!(w.statistics(set, t(4)).available, 2);
        // Capacity 1: one of the two.
        w.scale_sets.get_mut(&set).unwrap().capacity = Some(1);
        assert_eq!(w.acquire(set, &[ra, rb], t(5)), [ra]);
        assert_eq!(w.acquire(set, &[rb], t(5)), Vec::<u64>::new());
        let s = w.statistics(set, t(5));
        assert_eq!((s.available, s.acquired, s.assigned), (1, 1, 1));
        // A classic runner with the same labels does not take the set's job.
        let classic = w
            .add_runner(
                NewRunner {
                    name: "classic".into(),
                    scope: Scope::Org("octo".into()),
                    labels: vec!["rv-linux".into(), "self-hosted".into()],
                    group_id: 1,
                    ephemeral: true,
                    jit: true,
                    replace: false,
                    scale_set: None,
                },
                t(6),
            )
            .unwrap();
        assert_eq!(w.assign(classic, t(6)), Some(other));
        let mine = w
            .add_runner(
                NewRunner {
                    name: "mine".into(),
                    scope: Scope::Org("octo".into()),
                    labels: vec!["rv-linux".into()],
                    group_id: 1,
                    ephemeral: true,
                    jit: true,
                    replace: false,
                    scale_set: Some(set),
                },
                t(7),
            )
            .unwrap();
        assert_eq!(w.assign(mine, t(7)), Some(a));
        w.complete(mine, a, "success", t(8)).unwrap();
        assert_eq!(
            kinds(&w, set),
            [
                ("JobAvailable".to_string(), ra),
                ("JobAvailable".into(), rb),
                ("JobAssigned".into(), ra),
                ("JobStarted".into(), ra),
                ("JobCompleted".into(), ra),
            ]
        );
        let done = w.scale_sets[&set].messages.values().last().unwrap().clone();
        assert_eq!((done["result"].as_str(), done["runnerName"].as_str()), (Some("succeeded"), Some("mine")));
    }

    /// Assigned and never started: cancelled for the set and offered again under a new
    /// request, at most three times.
    #[test]
    fn a_job_no_runner_starts_is_offered_again_under_a_new_request() {
        let mut w = World::default();
        let set = w.create_scale_set("rv", Scope::Repo("o/r".into()), 1, vec![], t(0)).unwrap();
        let j = job(&mut w, "o/r", &["rv"], t(0));
        for round in 0..4u64 {
            let r = w.jobs[&j].routed.clone().unwrap();
            assert_eq!(r.reassignments as u64, round.min(3));
            assert_eq!(w.acquire(set, &[r.request_id], t(round * 100)), [r.request_id]);
            w.reassign_stale(Duration::from_secs(60), t(round * 100 + 59));
            assert_eq!(w.jobs[&j].routed.as_ref().unwrap().request_id, r.request_id, "not yet");
            w.reassign_stale(Duration::from_secs(60), t(round * 100 + 60));
            let now = w.jobs[&j].routed.clone().unwrap();
            if round < 3 {
                assert_ne!(now.request_id, r.request_id);
                let last: Vec<_> = kinds(&w, set).into_iter().rev().take(2).collect();
                assert_eq!(last, [("JobAvailable".to_string(), now.request_id), ("JobCompleted".into(), r.request_id)]);
            } else {
                assert_eq!(now.request_id, r.request_id, "offered three times at most");
                break;
            }
        }
    }

    /// Jobs queued before the set exists become its own when it is made.
    #[test]
    fn a_new_scale_set_takes_the_queued_jobs_it_covers() {
        let mut w = World::default();
        let j = job(&mut w, "o/r", &["rv"], t(0));
        assert!(w.jobs[&j].routed.is_none());
        let set = w.create_scale_set("rv", Scope::Org("o".into()), 1, vec![], t(1)).unwrap();
        assert_eq!(w.jobs[&j].routed.as_ref().map(|r| r.scale_set), Some(set));
        assert!(w.create_scale_set("RV", Scope::Org("o".into()), 1, vec![], t(1)).is_err(), "names are unique");
    }
}

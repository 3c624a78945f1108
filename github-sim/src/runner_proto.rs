//! What the runner inside a VM speaks. GitHub's real runner protocol (the Actions
//! service) is out of scope; the shape kept faithful is the part runnervisor relies on:
//! `config.sh` exchanges a registration token at `<api>/actions/runner-registration`
//! (`Authorization: RemoteAuth <token>`), registers under a name with labels, and the
//! runner then long-polls with its own credential, runs one job, reports, and exits.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::Sim;
use crate::error::{ApiError, parse_body, parse_id};
use crate::model::{NewRunner, Scope, WorldError, token};

type S = State<Arc<Sim>>;

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/actions/runner-registration", post(exchange_token))
        .route("/api/v3/actions/runner-registration", post(exchange_token))
        .route("/_runner/register", post(register))
        .route("/_runner/jobs/next", get(next_job))
        .route("/_runner/jobs/{id}/heartbeat", post(heartbeat))
        .route("/_runner/jobs/{id}/complete", post(complete))
        .with_state(sim)
}

fn bearer(headers: &HeaderMap, scheme: &str) -> Option<String> {
    headers.get("authorization")?.to_str().ok()?.strip_prefix(scheme).map(|t| t.trim().to_string())
}

/// First contacts may be stalled by a `runner_stall` fault: the answer never comes.
async fn maybe_stall(sim: &Sim) {
    if sim.faults().on_runner_first_contact() {
        std::future::pending::<()>().await;
    }
}

#[derive(Deserialize)]
struct ExchangeBody {
    url: Option<String>,
}

async fn exchange_token(State(sim): S, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    maybe_stall(&sim).await;
    let token = bearer(&headers, "RemoteAuth ").ok_or_else(ApiError::not_found)?;
    let req: ExchangeBody = parse_body(&body)?;
    let now = SystemTime::now();
    let mut world = sim.world();
    let scope = match world.registration_tokens.get(&token) {
        Some(t) if t.expires_at > now => t.scope.clone(),
        _ => return Err(ApiError::not_found()),
    };
    // The URL names the scope the token is for (the service finds its tenant by it).
    let path = format!("/{}", scope.web_path()).to_ascii_lowercase();
    if req.url.is_some_and(|u| !u.trim_end_matches('/').to_ascii_lowercase().ends_with(&path)) {
        return Err(ApiError::not_found());
    }
    let session = token_for_session(now, sim.config.admin_token_ttl);
    // The same token is the Actions service's (a scale set client's admin token).
    world.admin_tokens.insert(session.clone(), (scope.clone(), now + sim.config.admin_token_ttl));
    world.registration_sessions.insert(session.clone(), scope);
    Ok(axum::Json(json!({
        "url": format!("{}/_runner", sim.base_url),
        "token": session,
        "token_schema": "OAuthAccessToken",
    }))
    .into_response())
}

/// A JWT as the service issues (unsigned here: nobody checks it but the simulator, by
/// value): clients read when it expires from it.
fn token_for_session(now: SystemTime, ttl: Duration) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let iat = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
    let claims = json!({"iat": iat, "exp": iat + ttl.as_secs().max(1), "jti": token("", 24)});
    format!("{}.{}.{}", b64.encode(r#"{"alg":"none","typ":"JWT"}"#), b64.encode(claims.to_string()), token("", 16))
}

#[derive(Deserialize)]
struct RegisterRequest {
    name: String,
    labels: Vec<String>,
    #[serde(default)]
    ephemeral: bool,
    #[serde(default)]
    runner_group: Option<String>,
    #[serde(default)]
    replace: bool,
}

async fn register(State(sim): S, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let session = bearer(&headers, "Bearer ").ok_or_else(ApiError::bad_credentials)?;
    let req: RegisterRequest = parse_body(&body)?;
    let now = SystemTime::now();
    let mut world = sim.world();
    let scope: Scope = world.registration_sessions.remove(&session).ok_or_else(ApiError::bad_credentials)?;
    let group_id = match req.runner_group.as_deref() {
        None | Some("") => world.groups.iter().find(|g| g.default).map(|g| g.id).unwrap_or(1),
        Some(name) => {
            world.groups.iter().find(|g| g.name.eq_ignore_ascii_case(name)).map(|g| g.id).ok_or_else(|| {
                ApiError::not_found_msg(format!("Could not find any self-hosted runner group named \"{name}\"."))
            })?
        }
    };
    let id = world
        .add_runner(
            NewRunner {
                name: req.name.clone(),
                scope,
                labels: req.labels,
                group_id,
                ephemeral: req.ephemeral,
                jit: false,
                replace: req.replace,
                scale_set: None,
            },
            now,
        )
        .map_err(|e| match e {
            WorldError::RunnerNameTaken(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            other => ApiError::invalid(other.to_string()),
        })?;
    let credential = world.runners[&id].credential.clone();
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "id": id, "name": req.name, "credential": credential, "runner_group_id": group_id,
            "server_url": format!("{}/_runner", sim.base_url),
        })),
    )
        .into_response())
}

impl ApiError {
    fn not_found_msg(m: String) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, m)
    }
}

fn runner_id(sim: &Sim, headers: &HeaderMap) -> Result<u64, ApiError> {
    let cred = bearer(headers, "Bearer ").ok_or_else(ApiError::bad_credentials)?;
    sim.world().runner_by_credential(&cred).ok_or_else(ApiError::bad_credentials)
}

#[derive(Deserialize)]
struct Wait {
    wait: Option<u64>,
}

/// Long-poll for a job. 200 with the job, or 204 after `wait` seconds (max 50).
async fn next_job(State(sim): S, headers: HeaderMap, Query(q): Query<Wait>) -> Result<Response, ApiError> {
    let id = runner_id(&sim, &headers)?;
    let (first_contact, stalled) =
        sim.world().runners.get(&id).map(|r| (r.last_seen.is_none(), r.stalled)).unwrap_or_default();
    // A stalled runner stays stalled (its retries hang too): it never comes online.
    if stalled || (first_contact && sim.faults().on_runner_first_contact()) {
        if let Some(r) = sim.world().runners.get_mut(&id) {
            r.stalled = true;
        }
        std::future::pending::<()>().await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(q.wait.unwrap_or(20).min(50));
    let _polling = PollGuard::new(&sim, id);
    loop {
        let notified = sim.jobs_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let now = SystemTime::now();
            let mut world = sim.world();
            if !world.runners.contains_key(&id) {
                return Err(ApiError::bad_credentials());
            }
            let busy_before = world.runners[&id].job;
            if let Some(job_id) = world.assign(id, now) {
                let job = world.jobs[&job_id].clone();
                drop(world);
                if busy_before.is_none() {
                    crate::webhook::job_event(&sim, &job, "in_progress", &sim.base_url);
                }
                let mut body = serde_json::to_value(&job.behaviour).expect("json");
                body["id"] = json!(job.id);
                body["name"] = json!(job.name);
                body["repository"] = json!(job.repo);
                return Ok(axum::Json(body).into_response());
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

/// Counts an open long-poll on the runner (it is "online" while polling).
struct PollGuard<'a> {
    sim: &'a Sim,
    id: u64,
}

impl<'a> PollGuard<'a> {
    fn new(sim: &'a Sim, id: u64) -> Self {
        if let Some(r) = sim.world().runners.get_mut(&id) {
            r.polling += 1;
        }
        PollGuard { sim, id }
    }
}

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        let mut world = self.sim.world();
        if let Some(r) = world.runners.get_mut(&self.id) {
            r.polling = r.polling.saturating_sub(1);
            r.last_seen = Some(SystemTime::now());
        }
    }
}

async fn heartbeat(State(sim): S, headers: HeaderMap, Path(job): Path<String>) -> Result<Response, ApiError> {
    let id = runner_id(&sim, &headers)?;
    let job = parse_id(&job)?;
    let alive = sim.world().heartbeat(id, job, SystemTime::now()).map_err(|_| ApiError::not_found())?;
    Ok(if alive {
        axum::Json(json!({})).into_response()
    } else {
        ApiError::new(StatusCode::GONE, "The job was cancelled").into_response()
    })
}

#[derive(Deserialize)]
struct Completion {
    conclusion: String,
}

async fn complete(
    State(sim): S,
    headers: HeaderMap,
    Path(job): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = runner_id(&sim, &headers)?;
    let job_id = parse_id(&job)?;
    let c: Completion = parse_body(&body)?;
    if !["success", "failure", "cancelled"].contains(&c.conclusion.as_str()) {
        return Err(ApiError::invalid(format!("unknown conclusion {:?}", c.conclusion)));
    }
    let now = SystemTime::now();
    let job = {
        let mut world = sim.world();
        let already_done = world.jobs.get(&job_id).is_some_and(|j| j.status == crate::model::JobStatus::Completed);
        world.complete(id, job_id, &c.conclusion, now).map_err(|_| ApiError::not_found())?;
        (!already_done).then(|| world.jobs[&job_id].clone())
    };
    match job {
        Some(job) => crate::webhook::job_event(&sim, &job, "completed", &sim.base_url),
        None => return Ok(ApiError::new(StatusCode::GONE, "The job was cancelled").into_response()),
    }
    Ok(axum::Json(json!({})).into_response())
}

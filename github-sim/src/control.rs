//! `/_sim/...`: the control API tests and the demo drive the simulator with.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Sim;
use crate::error::{ApiError, parse_body, parse_id};
use crate::faults::Fault;
use crate::model::{Job, JobBehaviour, NewJob};

type S = State<Arc<Sim>>;

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/_sim/jobs", post(create_job).get(list_jobs))
        .route("/_sim/jobs/{id}", get(get_job))
        .route("/_sim/jobs/{id}/cancel", post(cancel_job))
        .route("/_sim/runners", get(list_runners))
        .route("/_sim/runners/{id}/lost", post(runner_lost))
        .route("/_sim/runner-history", get(runner_history))
        .route("/_sim/faults", post(add_faults).get(list_faults).delete(clear_faults))
        .route("/_sim/deliveries", get(deliveries))
        .route("/_sim/ping", post(ping))
        .route("/_sim/stats", get(stats))
        .route("/_sim/reports", post(add_report).get(list_reports))
        .with_state(sim)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateJob {
    repo: String,
    labels: Vec<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    workflow_name: Option<String>,
    #[serde(default)]
    run_id: Option<u64>,
    #[serde(default)]
    duration_secs: f64,
    #[serde(default)]
    script: Option<String>,
    #[serde(default)]
    conclusion: Option<String>,
    #[serde(default)]
    runner_hangs_after: bool,
}

fn job_summary(j: &Job) -> Value {
    json!({
        "id": j.id,
        "run_id": j.run_id,
        "repo": j.repo,
        "labels": j.labels,
        "status": j.status,
        "conclusion": j.conclusion,
        "runner_name": j.runner.as_ref().map(|r| r.name.clone()),
        "created_at": crate::time::rfc3339(j.created_at),
        "started_at": j.started_at.map(crate::time::rfc3339),
        "completed_at": j.completed_at.map(crate::time::rfc3339),
        "created_unix_ms": unix_ms(j.created_at),
        "started_unix_ms": j.started_at.map(unix_ms),
        "completed_unix_ms": j.completed_at.map(unix_ms),
    })
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Queues a job and sends its `queued` delivery.
async fn create_job(State(sim): S, body: Bytes) -> Result<Response, ApiError> {
    let req: CreateJob = parse_body(&body)?;
    let valid_repo = req.repo.split_once('/').is_some_and(|(o, r)| !o.is_empty() && !r.is_empty() && !r.contains('/'));
    if !valid_repo {
        return Err(ApiError::invalid(format!("repo must be \"owner/name\", got {:?}", req.repo)));
    }
    if req.duration_secs < 0.0 || !req.duration_secs.is_finite() {
        return Err(ApiError::invalid("duration_secs must be a non-negative number"));
    }
    let job = {
        let mut world = sim.world();
        let id = world.add_job(
            NewJob {
                repo: req.repo,
                labels: req.labels,
                name: req.name,
                workflow_name: req.workflow_name,
                run_id: req.run_id,
                behaviour: JobBehaviour {
                    duration_secs: req.duration_secs,
                    script: req.script,
                    conclusion: req.conclusion,
                    runner_hangs_after: req.runner_hangs_after,
                },
            },
            SystemTime::now(),
        );
        world.jobs[&id].clone()
    };
    crate::webhook::job_event(&sim, &job, "queued", &sim.base_url);
    sim.jobs_changed.notify_waiters();
    Ok((StatusCode::CREATED, axum::Json(json!({"id": job.id, "run_id": job.run_id}))).into_response())
}

async fn list_jobs(State(sim): S) -> Response {
    let jobs: Vec<Value> = sim.world().jobs.values().map(job_summary).collect();
    axum::Json(jobs).into_response()
}

async fn get_job(State(sim): S, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let world = sim.world();
    let job = world.jobs.get(&id).ok_or_else(ApiError::not_found)?;
    Ok(axum::Json(job_summary(job)).into_response())
}

/// Cancels a job: `completed` with conclusion `cancelled` (and a null runner if it never started).
async fn cancel_job(State(sim): S, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let job = {
        let mut world = sim.world();
        world.cancel(id, SystemTime::now()).map_err(|e| match e {
            crate::model::WorldError::NotFound => ApiError::not_found(),
            other => ApiError::new(StatusCode::CONFLICT, other.to_string()),
        })?;
        world.jobs[&id].clone()
    };
    crate::webhook::job_event(&sim, &job, "completed", &sim.base_url);
    Ok((StatusCode::ACCEPTED, axum::Json(job_summary(&job))).into_response())
}

/// The runner's machine died: its job fails (with a `completed` delivery), as on GitHub.
async fn runner_lost(State(sim): S, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let job = {
        let mut world = sim.world();
        let job = world.runner_lost(id, SystemTime::now()).map_err(|_| ApiError::not_found())?;
        job.and_then(|j| world.jobs.get(&j).cloned())
    };
    if let Some(job) = &job {
        crate::webhook::job_event(&sim, job, "completed", &sim.base_url);
    }
    Ok(axum::Json(json!({ "job": job.map(|j| j.id) })).into_response())
}

async fn list_runners(State(sim): S) -> Response {
    let now = SystemTime::now();
    let runners: Vec<Value> = sim
        .world()
        .runners
        .values()
        .map(|r| {
            let mut v = r.to_json(now);
            v["scope"] = json!(format!("{:?}", r.scope));
            v["jit"] = json!(r.jit);
            v["job"] = json!(r.job);
            v
        })
        .collect();
    axum::Json(runners).into_response()
}

async fn runner_history(State(sim): S) -> Response {
    axum::Json(json!(sim.world().runner_history)).into_response()
}

/// Arms one fault (an object) or several (an array).
async fn add_faults(State(sim): S, body: Bytes) -> Result<Response, ApiError> {
    let v: Value = parse_body(&body)?;
    let list = match v {
        Value::Array(a) => a,
        other => vec![other],
    };
    let mut faults = Vec::new();
    for f in list {
        let fault: Fault = serde_json::from_value(f).map_err(|e| ApiError::invalid(format!("Invalid fault: {e}")))?;
        fault.validate().map_err(ApiError::invalid)?;
        faults.push(fault);
    }
    let mut armed = sim.faults();
    for f in faults {
        armed.arm(f);
    }
    Ok((StatusCode::CREATED, axum::Json(json!(armed.list()))).into_response())
}

async fn list_faults(State(sim): S) -> Response {
    axum::Json(json!(sim.faults().list())).into_response()
}

async fn clear_faults(State(sim): S) -> Response {
    sim.faults().clear();
    StatusCode::NO_CONTENT.into_response()
}

async fn deliveries(State(sim): S) -> Response {
    let list: Vec<Value> = sim.world().deliveries.iter().map(|d| d.summary_json()).collect();
    axum::Json(list).into_response()
}

async fn ping(State(sim): S) -> Response {
    crate::webhook::ping(&sim);
    StatusCode::ACCEPTED.into_response()
}

async fn stats(State(sim): S) -> Response {
    axum::Json(json!({"api_calls": sim.api_calls()})).into_response()
}

/// What a job's script inside a VM reports back to its test (e.g. probe results): any
/// JSON object, kept in arrival order.
async fn add_report(State(sim): S, body: Bytes) -> Result<Response, ApiError> {
    let v: Value = parse_body(&body)?;
    if !v.is_object() {
        return Err(ApiError::invalid("a report is a JSON object"));
    }
    sim.world().reports.push(v);
    Ok(StatusCode::CREATED.into_response())
}

async fn list_reports(State(sim): S) -> Response {
    axum::Json(json!(sim.world().reports)).into_response()
}

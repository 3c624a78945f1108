//! GitHub's REST API, the parts runnervisor uses, at GitHub's paths (and under `/api/v3`
//! as on GHES). Every response carries `x-ratelimit-*`; errors are GitHub-style JSON.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{MatchedPath, OriginalUri, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Sim;
use crate::auth::{Credential, parse_authorization};
use crate::error::{ApiError, parse_body, parse_id};
use crate::faults::Fault;
use crate::model::{JobStatus, NewRunner, RegistrationToken, Scope, WorldError, token};

pub const RATE_LIMIT: u64 = 5000;
pub const API_VERSIONS: &[&str] = &["2022-11-28", "2026-03-10"];

#[derive(Debug, Clone)]
pub struct RateBucket {
    pub used: u64,
    pub reset: SystemTime,
}

type P = Path<HashMap<String, String>>;
type S = State<Arc<Sim>>;

/// The scope named by a route's parameters.
fn scope(p: &HashMap<String, String>) -> Scope {
    if let (Some(o), Some(r)) = (p.get("owner"), p.get("repo")) {
        Scope::Repo(format!("{o}/{r}"))
    } else if let Some(o) = p.get("org") {
        Scope::Org(o.clone())
    } else {
        Scope::Enterprise(p.get("enterprise").cloned().unwrap_or_default())
    }
}

fn routes() -> Router<Arc<Sim>> {
    let mut r = Router::new();
    for prefix in ["/repos/{owner}/{repo}", "/orgs/{org}", "/enterprises/{enterprise}"] {
        r = r
            .route(&format!("{prefix}/actions/runners/registration-token"), post(registration_token))
            .route(&format!("{prefix}/actions/runners/remove-token"), post(registration_token))
            .route(&format!("{prefix}/actions/runners/generate-jitconfig"), post(generate_jitconfig))
            .route(&format!("{prefix}/actions/runners"), get(list_runners))
            .route(&format!("{prefix}/actions/runners/{{runner_id}}"), get(get_runner).delete(delete_runner));
    }
    for prefix in ["/orgs/{org}", "/enterprises/{enterprise}"] {
        r = r.route(&format!("{prefix}/actions/runner-groups"), get(runner_groups));
    }
    for prefix in ["/repos/{owner}/{repo}/hooks/{hook_id}", "/orgs/{org}/hooks/{hook_id}", "/app/hook"] {
        r = r
            .route(&format!("{prefix}/deliveries"), get(list_deliveries))
            .route(&format!("{prefix}/deliveries/{{delivery_id}}"), get(get_delivery))
            .route(&format!("{prefix}/deliveries/{{delivery_id}}/attempts"), post(redeliver));
    }
    r.route("/repos/{owner}/{repo}/actions/runs", get(list_runs))
        .route("/repos/{owner}/{repo}/actions/runs/{run_id}/jobs", get(run_jobs))
        .route("/repos/{owner}/{repo}/actions/jobs/{job_id}", get(get_job))
        .route("/repos/{owner}/{repo}", get(get_repo))
        .route("/orgs/{org}", get(get_org))
        .route("/app", get(get_app))
        .route("/app/installations", get(list_installations))
        .route("/app/installations/{installation_id}/access_tokens", post(installation_token))
        .route("/rate_limit", get(rate_limit))
        .route("/meta", get(meta))
}

pub fn router(sim: Arc<Sim>) -> Router {
    let api = routes().route_layer(middleware::from_fn_with_state(sim.clone(), rest_layer));
    Router::new().merge(api.clone()).nest("/api/v3", api).with_state(sim)
}

/// Auth, API version check, fault injection, call counting and rate-limit headers.
async fn rest_layer(State(sim): S, matched: MatchedPath, req: Request, next: Next) -> Response {
    let path = req.uri().path().trim_start_matches("/api/v3").to_string();
    let route = matched.as_str().trim_start_matches("/api/v3").to_string();
    sim.count_call(format!("{} {route}", req.method()));
    let credential = parse_authorization(req.headers().get("authorization").and_then(|v| v.to_str().ok()));
    let bucket_key = match &credential {
        Credential::Token(t) | Credential::Jwt(t) => t.clone(),
        Credential::None => "anonymous".into(),
    };
    let limit = if bucket_key == "anonymous" { 60 } else { RATE_LIMIT };

    let verdict = sim.faults().on_api_call(&path);
    if verdict.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(verdict.latency_ms)).await;
    }
    let (remaining, reset) = consume(&sim, &bucket_key, limit, route != "/rate_limit");

    let mut resp = if let Some(version) = req.headers().get("x-github-api-version") {
        if API_VERSIONS.iter().any(|v| version.as_bytes() == v.as_bytes()) {
            None
        } else {
            Some(
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "Unsupported 'X-GitHub-Api-Version' header: {}",
                        String::from_utf8_lossy(version.as_bytes())
                    ),
                )
                .into_response(),
            )
        }
    } else {
        None
    };
    let mut remaining_header = remaining;
    let mut reset_header = reset;
    if resp.is_none() {
        resp = match verdict.error {
            Some(Fault::ApiError { status, .. }) => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                Some(ApiError::new(status, "Server Error (injected by github-sim)").into_response())
            }
            Some(Fault::RateLimit { status, retry_after, primary, reset_in, .. }) => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
                let mut r = if primary {
                    remaining_header = 0;
                    reset_header = crate::time::unix(SystemTime::now()) + reset_in.unwrap_or(60);
                    ApiError::new(status, "API rate limit exceeded for installation. If you reach out to GitHub Support for help, please include the request ID.").into_response()
                } else {
                    ApiError::new(
                        status,
                        "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
                    )
                    .into_response()
                };
                if let Some(s) = retry_after {
                    r.headers_mut().insert("retry-after", HeaderValue::from(s));
                }
                Some(r)
            }
            _ => None,
        };
    }
    if resp.is_none() && remaining == 0 && route != "/rate_limit" {
        resp = Some(ApiError::new(StatusCode::FORBIDDEN, "API rate limit exceeded").into_response());
    }
    if resp.is_none() && !enterprise_known(&sim, &path) {
        resp = Some(ApiError::new(StatusCode::NOT_FOUND, "Not Found").into_response());
    }
    if resp.is_none() {
        resp = Some(match authenticate(&sim, &route, &credential) {
            Ok(()) => next.run(req).await,
            Err(e) => e.into_response(),
        });
    }
    let mut resp = resp.expect("set above");
    let h = resp.headers_mut();
    h.insert("x-ratelimit-limit", HeaderValue::from(limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(remaining_header));
    h.insert("x-ratelimit-used", HeaderValue::from(limit - remaining));
    h.insert("x-ratelimit-reset", HeaderValue::from(reset_header));
    h.insert("x-ratelimit-resource", HeaderValue::from_static("core"));
    h.insert("x-github-api-version-selected", HeaderValue::from_static("2022-11-28"));
    h.insert("x-github-request-id", HeaderValue::from_str(&crate::model::guid()).expect("ascii"));
    resp
}

/// `/enterprises/{slug}/...` exists only for the configured enterprise (any, if none is).
fn enterprise_known(sim: &Sim, path: &str) -> bool {
    match (path.strip_prefix("/enterprises/"), &sim.config.enterprise) {
        (Some(rest), Some(slug)) => rest.split('/').next().is_some_and(|s| s.eq_ignore_ascii_case(slug)),
        _ => true,
    }
}

/// Uses one call of `key`'s hourly budget; returns (remaining, reset epoch seconds).
fn consume(sim: &Sim, key: &str, limit: u64, counts: bool) -> (u64, u64) {
    let now = SystemTime::now();
    let mut rate = sim.rate();
    let b = rate.entry(key.to_string()).or_insert(RateBucket { used: 0, reset: now + Duration::from_secs(3600) });
    if b.reset <= now {
        *b = RateBucket { used: 0, reset: now + Duration::from_secs(3600) };
    }
    let remaining_before = limit.saturating_sub(b.used);
    if counts && remaining_before > 0 {
        b.used += 1;
    }
    let remaining = if remaining_before == 0 { 0 } else { limit.saturating_sub(b.used) };
    (remaining, crate::time::unix(b.reset))
}

/// GitHub App routes take a JWT; everything else a PAT or an unexpired installation token.
fn authenticate(sim: &Sim, route: &str, credential: &Credential) -> Result<(), ApiError> {
    let app_route = route.starts_with("/app");
    match credential {
        Credential::None if route == "/rate_limit" => Ok(()),
        Credential::None => Err(ApiError::requires_auth()),
        Credential::Jwt(jwt) => {
            let app = sim.config.app.as_ref().ok_or_else(ApiError::bad_credentials)?;
            app.verify(jwt, SystemTime::now()).map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()))?;
            if app_route {
                Ok(())
            } else {
                Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "A JSON web token cannot be used to access this resource: use an installation access token",
                ))
            }
        }
        Credential::Token(t) => {
            let valid = *t == sim.config.pat
                || sim.installation_tokens.lock().map(|m| m.valid(t, SystemTime::now())).unwrap_or(false);
            if !valid {
                Err(ApiError::bad_credentials())
            } else if app_route {
                Err(ApiError::new(StatusCode::UNAUTHORIZED, "A JSON web token could not be decoded"))
            } else {
                Ok(())
            }
        }
    }
}

async fn registration_token(State(sim): S, Path(p): P, OriginalUri(uri): OriginalUri) -> Response {
    let scope = scope(&p);
    let prefix = &sim.config.registration_token_prefix;
    let tok = format!("{prefix}{}", token("", 29usize.saturating_sub(prefix.len())).to_ascii_uppercase());
    let expires = SystemTime::now() + sim.config.registration_token_ttl;
    if uri.path().ends_with("/registration-token") {
        sim.world().registration_tokens.insert(tok.clone(), RegistrationToken { scope, expires_at: expires });
    }
    (StatusCode::CREATED, axum::Json(json!({"token": tok, "expires_at": crate::time::rfc3339(expires)})))
        .into_response()
}

#[derive(Deserialize)]
struct JitRequest {
    name: Option<String>,
    runner_group_id: Option<u64>,
    labels: Option<Vec<String>>,
    #[serde(default)]
    work_folder: Option<String>,
}

/// A JIT config as GitHub encodes it: base64 of a JSON map of the runner's files
/// (`.runner`, `.credentials`, `.credentials_rsaparams`) to their base64 contents.
pub fn encode_jit_config(runner_file: &Value, credentials: &Value) -> String {
    let files = json!({
        ".runner": STANDARD.encode(runner_file.to_string()),
        ".credentials": STANDARD.encode(credentials.to_string()),
        ".credentials_rsaparams": STANDARD.encode("{}"),
    });
    STANDARD.encode(files.to_string())
}

/// The characters every JIT config [`encode_jit_config`] makes begins with (the map's
/// fixed opening): what a test searches a guest for to find a JIT config anywhere.
pub fn jit_config_fingerprint() -> String {
    encode_jit_config(&json!({}), &json!({}))[..16].to_string()
}

async fn generate_jitconfig(State(sim): S, Path(p): P, body: Bytes) -> Result<Response, ApiError> {
    let req: JitRequest = parse_body(&body)?;
    let missing = |f: &str| ApiError::invalid(format!("Invalid request.\n\n\"{f}\" wasn't supplied."));
    let name = req.name.filter(|n| !n.is_empty()).ok_or_else(|| missing("name"))?;
    let group_id = req.runner_group_id.ok_or_else(|| missing("runner_group_id"))?;
    let labels = req.labels.ok_or_else(|| missing("labels"))?;
    if labels.is_empty() || labels.len() > 100 {
        return Err(ApiError::invalid("Invalid request.\n\nlabels must have between 1 and 100 items."));
    }
    if labels.iter().any(|l| l.trim().is_empty() || l.len() > 256) {
        return Err(ApiError::invalid("Invalid request.\n\nlabels must be non-empty strings."));
    }
    let scope = scope(&p);
    let now = SystemTime::now();
    let mut world = sim.world();
    let group = world
        .group(group_id)
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("Runner group {group_id} not found")))?;
    let id = world
        .add_runner(
            NewRunner {
                name: name.clone(),
                scope: scope.clone(),
                labels,
                group_id,
                ephemeral: true,
                jit: true,
                replace: false,
                scale_set: None,
            },
            now,
        )
        .map_err(world_error)?;
    let runner = world.runners[&id].clone();
    drop(world);
    let base = &sim.base_url;
    let runner_file = json!({
        "agentId": id, "agentName": name, "poolId": group.id, "poolName": group.name,
        "serverUrl": format!("{base}/_runner"), "gitHubUrl": format!("{base}/{}", scope.web_path()),
        "workFolder": req.work_folder.unwrap_or_else(|| "_work".into()), "ephemeral": true,
    });
    let credentials =
        json!({"scheme": "OAuth", "data": {"clientId": crate::model::guid(), "token": runner.credential}});
    let body =
        json!({"runner": runner.to_json(now), "encoded_jit_config": encode_jit_config(&runner_file, &credentials)});
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

fn world_error(e: WorldError) -> ApiError {
    match e {
        WorldError::RunnerNameTaken(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        WorldError::RunnerBusy(_) | WorldError::Invalid(_) => ApiError::invalid(e.to_string()),
        WorldError::NotFound => ApiError::not_found(),
    }
}

#[derive(Deserialize)]
struct PageQuery {
    per_page: Option<String>,
    page: Option<String>,
    name: Option<String>,
    status: Option<String>,
    cursor: Option<String>,
}

impl PageQuery {
    fn per_page(&self) -> usize {
        self.per_page.as_deref().and_then(|s| s.parse().ok()).unwrap_or(30).clamp(1, 100)
    }
    fn page(&self) -> usize {
        self.page.as_deref().and_then(|s| s.parse().ok()).unwrap_or(1).max(1)
    }
}

/// `Link` header for page-numbered lists, with absolute URLs as GitHub gives them.
fn page_links(
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    per_page: usize,
    page: usize,
    total: usize,
) -> Option<String> {
    let last = total.div_ceil(per_page).max(1);
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    let url = |p: usize| format!("<http://{host}{}?per_page={per_page}&page={p}>", uri.path());
    let mut links = Vec::new();
    if page < last {
        links.push(format!("{}; rel=\"next\"", url(page + 1)));
        links.push(format!("{}; rel=\"last\"", url(last)));
    }
    if page > 1 {
        links.push(format!("{}; rel=\"prev\"", url(page - 1)));
        links.push(format!("{}; rel=\"first\"", url(1)));
    }
    (!links.is_empty()).then(|| links.join(", "))
}

fn with_link(mut resp: Response, link: Option<String>) -> Response {
    if let Some(l) = link.and_then(|l| HeaderValue::from_str(&l).ok()) {
        resp.headers_mut().insert("link", l);
    }
    resp
}

async fn list_runners(
    State(sim): S,
    Path(p): P,
    Query(q): Query<PageQuery>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Response {
    let now = SystemTime::now();
    let world = sim.world();
    let all: Vec<Value> = world
        .runners_at(&scope(&p))
        .into_iter()
        .filter(|r| q.name.as_deref().is_none_or(|n| r.name == n))
        .map(|r| r.to_json(now))
        .collect();
    let (per_page, page) = (q.per_page(), q.page());
    let items: Vec<Value> = all.iter().skip((page - 1) * per_page).take(per_page).cloned().collect();
    let link = page_links(&headers, &uri, per_page, page, all.len());
    with_link(axum::Json(json!({"total_count": all.len(), "runners": items})).into_response(), link)
}

async fn get_runner(State(sim): S, Path(p): P) -> Result<Response, ApiError> {
    let id = parse_id(p.get("runner_id").map(String::as_str).unwrap_or(""))?;
    let world = sim.world();
    let runner = world.runners.get(&id).filter(|r| r.scope == scope(&p)).ok_or_else(ApiError::not_found)?;
    Ok(axum::Json(runner.to_json(SystemTime::now())).into_response())
}

async fn delete_runner(State(sim): S, Path(p): P) -> Result<Response, ApiError> {
    let id = parse_id(p.get("runner_id").map(String::as_str).unwrap_or(""))?;
    sim.world().delete_runner(&scope(&p), id).map_err(world_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn runner_groups(State(sim): S, Path(p): P) -> Response {
    let base = &sim.base_url;
    let s = scope(&p).web_path();
    let groups: Vec<Value> = sim
        .world()
        .groups
        .iter()
        .map(|g| {
            json!({
                "id": g.id, "name": g.name, "visibility": "all", "default": g.default,
                "runners_url": format!("{base}/api/v3/orgs/{s}/actions/runner-groups/{}/runners", g.id),
                "inherited": false, "allows_public_repositories": false,
                "restricted_to_workflows": false, "selected_workflows": [],
            })
        })
        .collect();
    axum::Json(json!({"total_count": groups.len(), "runner_groups": groups})).into_response()
}

fn run_status(statuses: impl Iterator<Item = JobStatus>) -> &'static str {
    let all: Vec<JobStatus> = statuses.collect();
    if all.iter().all(|s| *s == JobStatus::Completed) {
        "completed"
    } else if all.contains(&JobStatus::InProgress) {
        "in_progress"
    } else {
        "queued"
    }
}

async fn list_runs(State(sim): S, Path(p): P, Query(q): Query<PageQuery>) -> Response {
    let Scope::Repo(repo) = scope(&p) else {
        return ApiError::not_found().into_response();
    };
    let world = sim.world();
    let mut runs: HashMap<u64, Vec<&crate::model::Job>> = HashMap::new();
    for j in world.jobs.values().filter(|j| j.repo.eq_ignore_ascii_case(&repo)) {
        runs.entry(j.run_id).or_default().push(j);
    }
    let base = &sim.base_url;
    let mut list: Vec<Value> = runs
        .iter()
        .map(|(id, jobs)| {
            let status = run_status(jobs.iter().map(|j| j.status));
            json!({
                "id": id, "name": jobs[0].workflow_name, "status": status, "run_attempt": 1,
                "conclusion": if status == "completed" { json!("success") } else { Value::Null },
                "created_at": crate::time::rfc3339(jobs[0].created_at),
                "jobs_url": format!("{base}/api/v3/repos/{repo}/actions/runs/{id}/jobs"),
                "html_url": format!("{base}/{repo}/actions/runs/{id}"),
            })
        })
        .filter(|r| q.status.as_deref().is_none_or(|s| r["status"] == s))
        .collect();
    list.sort_by_key(|r| std::cmp::Reverse(r["id"].as_u64()));
    let per_page = q.per_page();
    let total = list.len();
    let items: Vec<Value> = list.into_iter().skip((q.page() - 1) * per_page).take(per_page).collect();
    axum::Json(json!({"total_count": total, "workflow_runs": items})).into_response()
}

async fn run_jobs(State(sim): S, Path(p): P) -> Result<Response, ApiError> {
    let Scope::Repo(repo) = scope(&p) else {
        return Err(ApiError::not_found());
    };
    let run_id = parse_id(p.get("run_id").map(String::as_str).unwrap_or(""))?;
    let world = sim.world();
    let jobs: Vec<Value> = world
        .jobs
        .values()
        .filter(|j| j.run_id == run_id && j.repo.eq_ignore_ascii_case(&repo))
        .map(|j| crate::webhook::job_json(j, &sim.base_url))
        .collect();
    if jobs.is_empty() {
        return Err(ApiError::not_found());
    }
    Ok(axum::Json(json!({"total_count": jobs.len(), "jobs": jobs})).into_response())
}

async fn get_job(State(sim): S, Path(p): P) -> Result<Response, ApiError> {
    let Scope::Repo(repo) = scope(&p) else {
        return Err(ApiError::not_found());
    };
    let id = parse_id(p.get("job_id").map(String::as_str).unwrap_or(""))?;
    let world = sim.world();
    let job = world.jobs.get(&id).filter(|j| j.repo.eq_ignore_ascii_case(&repo)).ok_or_else(ApiError::not_found)?;
    Ok(axum::Json(crate::webhook::job_json(job, &sim.base_url)).into_response())
}

async fn get_repo(State(sim): S, Path(p): P) -> Response {
    let Scope::Repo(repo) = scope(&p) else {
        return ApiError::not_found().into_response();
    };
    let (owner, name) = repo.split_once('/').unwrap_or_default();
    axum::Json(json!({
        "id": crate::webhook::repo_id(&repo), "name": name, "full_name": repo, "private": true,
        "owner": {"login": owner, "type": "Organization"},
        "html_url": format!("{}/{repo}", sim.base_url),
        "permissions": {"admin": true, "maintain": true, "push": true, "triage": true, "pull": true},
    }))
    .into_response()
}

async fn get_org(State(sim): S, Path(p): P) -> Response {
    let org = p.get("org").cloned().unwrap_or_default();
    axum::Json(
        json!({"login": org, "id": crate::webhook::repo_id(&org), "html_url": format!("{}/{org}", sim.base_url)}),
    )
    .into_response()
}

async fn get_app(State(sim): S) -> Response {
    let app = sim.config.app.as_ref();
    axum::Json(json!({
        "id": app.map(|a| a.app_id), "client_id": app.and_then(|a| a.client_id.clone()),
        "slug": "runnervisor-sim", "name": "runnervisor (github-sim)",
        "permissions": {"administration": "write", "organization_self_hosted_runners": "write", "actions": "read"},
        "events": ["workflow_job"],
    }))
    .into_response()
}

async fn list_installations(State(sim): S) -> Response {
    axum::Json(json!([{"id": sim.config.installation_id, "account": {"login": "octo-org", "type": "Organization"}}]))
        .into_response()
}

async fn installation_token(State(sim): S, Path(p): P) -> Result<Response, ApiError> {
    let id = parse_id(p.get("installation_id").map(String::as_str).unwrap_or(""))?;
    if id != sim.config.installation_id {
        return Err(ApiError::not_found());
    }
    let now = SystemTime::now();
    let (token, expires) = sim
        .installation_tokens
        .lock()
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "lock"))?
        .issue(sim.config.installation_token_ttl, now);
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "token": token, "expires_at": crate::time::rfc3339(expires),
            "permissions": {"administration": "write", "organization_self_hosted_runners": "write", "actions": "read"},
            "repository_selection": "all",
        })),
    )
        .into_response())
}

async fn rate_limit(State(sim): S, headers: HeaderMap) -> Response {
    let key = match parse_authorization(headers.get("authorization").and_then(|v| v.to_str().ok())) {
        Credential::Token(t) | Credential::Jwt(t) => t,
        Credential::None => "anonymous".into(),
    };
    let limit = if key == "anonymous" { 60 } else { RATE_LIMIT };
    let (remaining, reset) = consume(&sim, &key, limit, false);
    let core =
        json!({"limit": limit, "remaining": remaining, "used": limit - remaining, "reset": reset, "resource": "core"});
    axum::Json(json!({"resources": {"core": core}, "rate": core})).into_response()
}

/// `GET /meta`: GitHub's published networks; `hooks` is what deliveries come from.
async fn meta(State(sim): S) -> Response {
    axum::Json(json!({"verifiable_password_authentication": false, "hooks": sim.config.hook_ranges})).into_response()
}

/// The hook id in the path must be the simulator's hook (app hooks have none in the path).
fn check_hook(sim: &Sim, p: &HashMap<String, String>) -> Result<(), ApiError> {
    match p.get("hook_id") {
        Some(h) if parse_id(h)? != sim.config.hook_id => Err(ApiError::not_found()),
        _ => Ok(()),
    }
}

/// Newest first, cursor-paginated like GitHub (`cursor` = opaque; here the next delivery id).
async fn list_deliveries(
    State(sim): S,
    Path(p): P,
    Query(q): Query<PageQuery>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_hook(&sim, &p)?;
    let per_page = q.per_page();
    let below: Option<u64> = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(c.trim_start_matches('v').parse().map_err(|_| ApiError::invalid("Invalid cursor"))?),
    };
    let world = sim.world();
    let mut items: Vec<&crate::model::Delivery> =
        world.deliveries.iter().rev().filter(|d| below.is_none_or(|b| d.id <= b)).take(per_page + 1).collect();
    let next = (items.len() > per_page).then(|| items.pop().map(|d| d.id)).flatten();
    let body: Vec<Value> = items.iter().map(|d| d.summary_json()).collect();
    let link = next.map(|n| {
        let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost");
        format!("<http://{host}{}?per_page={per_page}&cursor=v{n}>; rel=\"next\"", uri.path())
    });
    Ok(with_link(axum::Json(body).into_response(), link))
}

async fn get_delivery(State(sim): S, Path(p): P) -> Result<Response, ApiError> {
    check_hook(&sim, &p)?;
    let id = parse_id(p.get("delivery_id").map(String::as_str).unwrap_or(""))?;
    let world = sim.world();
    let d = world.deliveries.iter().find(|d| d.id == id).ok_or_else(ApiError::not_found)?;
    Ok(axum::Json(d.full_json()).into_response())
}

/// Redelivers with the original GUID and payload, as GitHub does.
async fn redeliver(State(sim): S, Path(p): P) -> Result<Response, ApiError> {
    check_hook(&sim, &p)?;
    let id = parse_id(p.get("delivery_id").map(String::as_str).unwrap_or(""))?;
    let out = {
        let world = sim.world();
        let d = world.deliveries.iter().find(|d| d.id == id).ok_or_else(ApiError::not_found)?;
        if SystemTime::now().duration_since(d.delivered_at).unwrap_or_default() > Duration::from_secs(3 * 86400) {
            return Err(ApiError::invalid("Delivery is too old to be redelivered"));
        }
        crate::webhook::Outgoing {
            guid: d.guid.clone(),
            event: d.event.clone(),
            action: d.action.clone(),
            payload: d.payload.clone(),
            redelivery: true,
        }
    };
    sim.send_webhook(out);
    Ok((StatusCode::ACCEPTED, axum::Json(json!({}))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header_pages() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("sim:1"));
        let uri: axum::http::Uri = "/orgs/o/actions/runners?page=2".parse().unwrap();
        let l = page_links(&h, &uri, 2, 2, 5).unwrap();
        assert!(l.contains("<http://sim:1/orgs/o/actions/runners?per_page=2&page=3>; rel=\"next\""));
        assert!(l.contains("page=3>; rel=\"last\""));
        assert!(l.contains("page=1>; rel=\"prev\""));
        assert_eq!(page_links(&h, &uri, 30, 1, 5), None);
    }

    #[test]
    fn run_status_from_jobs() {
        use JobStatus::*;
        assert_eq!(run_status([Completed, Completed].into_iter()), "completed");
        assert_eq!(run_status([Queued, InProgress].into_iter()), "in_progress");
        assert_eq!(run_status([Queued, Completed].into_iter()), "queued");
    }
}

//! The Runner Scale Set client: what GitHub recommends custom autoscalers use instead of
//! webhooks (its official Go client is `actions/scaleset`; ARC's listener uses it). The
//! endpoints are the Actions service's, not in the REST reference; the shapes follow the
//! Go client (see `github-sim/src/scaleset.rs`, which plays them).
//!
//! - **Admin connection**: a registration token (REST, [`GitHub::registration_token`]) is
//!   exchanged at `{api}/actions/runner-registration` (`Authorization: RemoteAuth …`,
//!   `{"url": <scope's web URL>, "runner_event": "register"}`) for the service's URL and
//!   token. The token is a JWT: it is exchanged again a minute before its `exp`, and at
//!   once when the service answers 401 (the call is then made once more). The service's
//!   URL may change with it.
//! - **Scale sets** (`_apis/runtime/runnerscalesets`): found by name in their runner
//!   group, made when missing, their labels brought to the config's (the set's name is
//!   always one, as GitHub's client makes it).
//! - **Sessions** (`…/{id}/sessions`): one client at a time holds a set's session (409
//!   `RunnerScaleSetSessionConflictException` otherwise: [`SsError::Conflict`]); a refresh
//!   renews the queue token; a session the service lost answers 404
//!   ([`SsError::SessionGone`]).
//! - **The message queue**: a long poll (`lastMessageId`, `X-ScaleSetMaxCapacity`; 200
//!   with one message, 202 with none after ~50 s, 401 once the queue token expired:
//!   [`SsError::QueueToken`]), `DELETE …/{messageId}` to acknowledge; a message's `body`
//!   is a JSON array *in a string* of job messages. Bodies may begin with a UTF-8 BOM.
//! - `acquirejobs` (with the queue token), `generatejitconfig`, and runners at
//!   `_apis/distributedtask/pools/0/agents`.
//!
//! No call to the service is retried here: the listener owns the back-off (a session
//! create retried after an ambiguous failure would conflict with the session the first
//! attempt made). The exchange is, a few times: GitHub's client does so, as a
//! registration token just made is refused for a moment at times. Every call is bounded
//! by the client's timeout, the long poll by [`POLL_TIMEOUT`]; error answers that are not
//! JSON (a proxy's page) keep their status.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::{Deleted, GhError, GitHub, JitRunner};
use crate::secret::Secret;

const API_VERSION: &str = "6.0-preview";
const SETS: &str = "_apis/runtime/runnerscalesets";
const AGENTS: &str = "_apis/distributedtask/pools/0/agents";
const EXCHANGE: &str = "actions/runner-registration";
const EXCHANGE_ATTEMPTS: u32 = 4;
/// What `X-ScaleSetMaxCapacity` may say (the service reads a 32-bit integer).
const MAX_CAPACITY: u64 = i32::MAX as u64;
/// The long poll is held ~50 s by the service: a call waits longer than that.
const POLL_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum SsError {
    /// Another client holds the scale set's session.
    #[error("another client holds the scale set's session: {0}")]
    Conflict(String),
    /// The service no longer knows the session: make a new one.
    #[error("the service no longer knows the session: {0}")]
    SessionGone(String),
    /// The message queue's token expired: refresh the session.
    #[error("the message queue's token expired")]
    QueueToken,
    #[error("{method} {path}: HTTP {status}: {type_name} {message}")]
    Status { method: String, path: String, status: u16, type_name: String, message: String },
    #[error("{method} {path}: {message}")]
    Transport { method: String, path: String, message: String },
    #[error("{path}: unexpected response: {message}")]
    Decode { path: String, message: String },
    #[error("the registration token for the Actions service: {0}")]
    GitHub(#[from] GhError),
}

impl SsError {
    /// The HTTP status the service answered, if it answered one.
    pub fn status(&self) -> Option<u16> {
        match self {
            SsError::Status { status, .. } => Some(*status),
            SsError::GitHub(e) => e.status(),
            _ => None,
        }
    }

    /// As the REST client's error (what provisioning handles): a runner name the set has
    /// already is a 409, as `generate-jitconfig` answers.
    pub fn into_gh(self) -> GhError {
        match self {
            SsError::GitHub(e) => e,
            SsError::Status { method, path, status, type_name, message } => {
                let status = if type_name.contains("AgentExistsException") { 409 } else { status };
                GhError::Status { method, path, status, message: format!("{type_name} {message}") }
            }
            SsError::Transport { method, path, message } => GhError::Transport { method, path, message },
            other => GhError::Decode { path: "scale set".into(), message: other.to_string() },
        }
    }
}

/// What the config says a pool's scale set is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleSetSpec {
    pub name: String,
    pub labels: Vec<String>,
    pub runner_group: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleSetInfo {
    pub id: u64,
    pub name: String,
    pub runner_group_id: u64,
    pub labels: Vec<String>,
}

/// A scale set's counts, as the service reports them with every message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Statistics {
    #[serde(rename = "totalAvailableJobs")]
    pub available: u64,
    #[serde(rename = "totalAcquiredJobs")]
    pub acquired: u64,
    /// Jobs assigned to the set: waiting for a runner or running.
    #[serde(rename = "totalAssignedJobs")]
    pub assigned: u64,
    #[serde(rename = "totalRunningJobs")]
    pub running: u64,
    #[serde(rename = "totalRegisteredRunners")]
    pub registered: u64,
    #[serde(rename = "totalBusyRunners")]
    pub busy: u64,
    #[serde(rename = "totalIdleRunners")]
    pub idle: u64,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub queue_url: String,
    pub queue_token: Secret,
    pub statistics: Statistics,
}

/// A job as a scale set's messages describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRef {
    /// The request's id: what `acquirejobs` takes (a job offered again gets a new one).
    pub request_id: u64,
    /// "owner/name" ("" when the message does not say).
    pub repository: String,
    /// The workflow job's id as the service spells it (the same across requests).
    pub job_id: String,
    pub run_id: u64,
    pub display_name: String,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobMessage {
    Available(JobRef),
    Assigned(JobRef),
    Started {
        job: JobRef,
        runner_name: Option<String>,
    },
    /// `result`: `succeeded`, `failed`, `canceled` (a job offered again is first
    /// `canceled` for the set, without a runner).
    Completed {
        job: JobRef,
        result: String,
        runner_name: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: u64,
    /// `None`: the message carried none (the last ones seen still hold).
    pub statistics: Option<Statistics>,
    pub jobs: Vec<JobMessage>,
    /// Why the message (or some of its jobs) could not be read: it is acknowledged anyway
    /// (read again, it would be as unreadable, and hold up every message after it).
    pub unreadable: Option<String>,
}

/// The seam to a scale set (the real client below; fakes in tests).
pub trait ScaleSets: Send + Sync + 'static {
    /// The set of `spec.name` in its runner group, made when missing; its labels brought
    /// to `spec`'s (its name always among them). One of that name in another group is an
    /// error that says so.
    fn ensure(&self, spec: &ScaleSetSpec) -> impl Future<Output = Result<ScaleSetInfo, SsError>> + Send;
    /// The set of `spec.name` in its runner group, if there is one.
    fn find(&self, spec: &ScaleSetSpec) -> impl Future<Output = Result<Option<ScaleSetInfo>, SsError>> + Send;
    /// Deletes the set (an operator's command; never a restart).
    fn delete(&self, set_id: u64) -> impl Future<Output = Result<(), SsError>> + Send;
    fn create_session(&self, set_id: u64, owner: &str) -> impl Future<Output = Result<Session, SsError>> + Send;
    fn refresh_session(&self, set_id: u64, session_id: &str) -> impl Future<Output = Result<Session, SsError>> + Send;
    fn delete_session(&self, set_id: u64, session_id: &str) -> impl Future<Output = Result<(), SsError>> + Send;
    /// The next message after `last`, waiting up to the service's window; `None`: none came.
    fn poll(
        &self,
        session: &Session,
        last: u64,
        capacity: u64,
    ) -> impl Future<Output = Result<Option<Message>, SsError>> + Send;
    fn ack(&self, session: &Session, message_id: u64) -> impl Future<Output = Result<(), SsError>> + Send;
    /// The requests the set now has (a subset of `requests`).
    fn acquire(
        &self,
        set_id: u64,
        session: &Session,
        requests: &[u64],
    ) -> impl Future<Output = Result<Vec<u64>, SsError>> + Send;
    fn generate_jit_config(&self, set_id: u64, name: &str) -> impl Future<Output = Result<JitRunner, SsError>> + Send;
    fn delete_runner(&self, runner_id: u64) -> impl Future<Output = Result<Deleted, SsError>> + Send;
}

/// The service's URL and token (from the registration exchange).
#[derive(Clone)]
struct Admin {
    url: String,
    token: Secret,
    /// When to exchange again (a minute before the token's `exp`); `None`: on a 401 only.
    renew_at: Option<SystemTime>,
}

/// When to exchange a token again that was received `now` and expires at `exp` (by the
/// service's clock): a minute before, by its lifetime as received (`exp − iat` when the
/// token says when it was issued), so that a skewed clock here neither renews it at
/// every call nor lets it lapse; at least a minute on.
pub fn renew_at(now: SystemTime, iat: Option<SystemTime>, exp: SystemTime) -> SystemTime {
    let lifetime = match iat {
        Some(iat) => exp.duration_since(iat).unwrap_or_default(),
        None => exp.duration_since(now).unwrap_or_default(),
    };
    now + lifetime.saturating_sub(Duration::from_secs(60)).max(Duration::from_secs(60))
}

pub struct HttpScaleSets<G> {
    client: reqwest::Client,
    /// Every call's deadline but the long poll's.
    timeout: Duration,
    api: String,
    /// The scope's web URL (`https://github.com/octo-org`): what the exchange names.
    scope_url: String,
    github: Arc<G>,
    admin: Mutex<Option<Admin>>,
    /// Calls by endpoint and status (`runnervisor_github_api_calls_total`), when served.
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// `iat` and `exp` of a JWT, read without checking its signature (the service checks it).
pub fn jwt_times(token: &str) -> Option<(Option<SystemTime>, SystemTime)> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims = serde_json::from_slice::<Value>(&bytes).ok()?;
    let at = |k: &str| claims.get(k)?.as_u64().map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
    Some((at("iat"), at("exp")?))
}

/// A body as JSON, past a UTF-8 byte-order mark; an empty body is `null`.
fn json_of(bytes: &[u8]) -> Result<Value, String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// An error answer's body: JSON (`typeName`, `message`), or text (a proxy's page, the
/// service's `text/plain`) as its message.
fn error_body(bytes: &[u8]) -> Value {
    json_of(bytes).unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(bytes);
        json!({"message": text.trim().chars().take(300).collect::<String>()})
    })
}

/// A call's name in the metrics: `scale set` and its method and route, ids (numbers,
/// GUIDs) replaced by `{id}`.
fn endpoint(method: &Method, name: &str) -> String {
    let parts: Vec<&str> = name
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s.bytes().any(|b| b.is_ascii_digit()) && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
                "{id}"
            } else {
                s
            }
        })
        .collect();
    format!("{method} scale set {}", parts.join("/"))
}

/// What a call with the queue's token is, by its method and URL: its name in errors and
/// metrics, and whether it is the long poll (held by the service ~50 s: [`POLL_TIMEOUT`],
/// not the API timeout). By the method and the URL's last segment, not by a path it may
/// share: GHES's queue URL lies under `_apis/runtime/runnerscalesets` too, where every
/// poll was taken for `acquirejobs` and cut at the API timeout (an independent read).
fn queue_call(method: &Method, url: &str) -> (&'static str, bool) {
    let path = url.split('?').next().unwrap_or(url);
    if *method == Method::POST && path.ends_with("/acquirejobs") {
        ("acquirejobs", false)
    } else {
        ("message queue", *method == Method::GET)
    }
}

/// The message that goes with a path: its query (which may carry ids) left out.
fn route(path: &str) -> String {
    path.split('?').next().unwrap_or("").to_string()
}

/// Whose token a call carries.
enum As<'a> {
    Admin,
    Queue(&'a Secret),
}

impl<G: GitHub> HttpScaleSets<G> {
    /// `api`: the REST base; `scope_url`: the scope's web URL (`web_url/web_path`).
    pub fn new(api: &str, scope_url: &str, github: Arc<G>, timeout: Duration) -> Result<Self, SsError> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(30)))
            .user_agent(concat!("runnervisor/", env!("CARGO_PKG_VERSION"), " (scale set client)"))
            .build()
            .map_err(|e| SsError::Transport { method: "-".into(), path: "-".into(), message: e.to_string() })?;
        Ok(HttpScaleSets {
            client,
            timeout,
            api: api.trim_end_matches('/').to_string(),
            scope_url: scope_url.trim_end_matches('/').to_string(),
            github,
            admin: Mutex::new(None),
            metrics: None,
        })
    }

    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Counts a call (`status` 0: no answer) under `endpoint` (see [`endpoint`]).
    fn observe(&self, endpoint: &str, status: u16) {
        if let Some(m) = &self.metrics {
            m.github_api_calls.get_or_create(&crate::metrics::ApiCallLabels::new(endpoint, status)).inc();
        }
    }

    /// The admin connection, exchanged again when due or when `stale` (a 401) names it.
    async fn admin(&self, stale: Option<&Secret>) -> Result<Admin, SsError> {
        let mut held = self.admin.lock().await;
        if let Some(a) = held.as_ref()
            && stale.is_none_or(|s| s.expose() != a.token.expose())
            && a.renew_at.is_none_or(|t| SystemTime::now() < t)
        {
            return Ok(a.clone());
        }
        // A registration token just made is refused for a moment at times (GitHub's own
        // client tries the exchange five times, on 401 and 403 too): tried a few times here,
        // each bounded, so that the lock held meanwhile is held for a bounded time.
        let mut attempt = 0;
        let v = loop {
            let tried = tokio::time::timeout(self.timeout, self.exchange()).await.unwrap_or_else(|_| {
                Err(SsError::Transport { method: "POST".into(), path: EXCHANGE.into(), message: "timed out".into() })
            });
            let retry = match &tried {
                Err(SsError::Transport { .. }) => true,
                Err(SsError::Status { status, .. }) => matches!(status, 401 | 403 | 429 | 500..=599),
                _ => false,
            };
            attempt += 1;
            if !retry || attempt >= EXCHANGE_ATTEMPTS {
                break tried?;
            }
            let policy = super::http::RetryPolicy::default();
            tokio::time::sleep(super::http::backoff(&policy, attempt)).await;
        };
        let (Some(url), Some(token)) = (v["url"].as_str(), v["token"].as_str()) else {
            return Err(SsError::Decode { path: EXCHANGE.into(), message: "no url or token in the answer".into() });
        };
        let renew_at = jwt_times(token).map(|(iat, exp)| renew_at(SystemTime::now(), iat, exp));
        let admin = Admin { url: url.trim_end_matches('/').to_string(), token: Secret::new(token), renew_at };
        *held = Some(admin.clone());
        Ok(admin)
    }

    /// One registration exchange: its answer's body.
    async fn exchange(&self) -> Result<Value, SsError> {
        let registration = self.github.registration_token().await?;
        let resp = self
            .client
            .post(format!("{}/{EXCHANGE}", self.api))
            .header("authorization", format!("RemoteAuth {}", registration.expose()))
            .json(&json!({"url": self.scope_url, "runner_event": "register"}))
            .send()
            .await
            .map_err(|e| transport("POST", EXCHANGE, &e))?;
        let status = resp.status();
        self.observe(&endpoint(&Method::POST, EXCHANGE), status.as_u16());
        let body = resp.bytes().await.map_err(|e| transport("POST", EXCHANGE, &e))?;
        if !status.is_success() {
            return Err(status_error("POST", EXCHANGE, status, &error_body(&body)));
        }
        json_of(&body).map_err(|message| SsError::Decode { path: EXCHANGE.into(), message })
    }

    /// One call to the service (`path` under its URL, or a whole URL: the message queue's;
    /// `name`: what errors call it). A 401 with the admin token exchanges it again and calls
    /// once more; a 401 with the queue's is [`SsError::QueueToken`]. The body is read as
    /// JSON when the call succeeded, as [`error_body`] when not.
    async fn call(
        &self,
        method: Method,
        path: &str,
        who: As<'_>,
        body: Option<&Value>,
        extra: &[(&str, String)],
    ) -> Result<(StatusCode, Value), SsError> {
        let (name, deadline) = match &who {
            As::Admin => (route(path), self.timeout),
            As::Queue(_) => {
                let (name, polls) = queue_call(&method, path);
                (name.to_string(), if polls { POLL_TIMEOUT } else { self.timeout })
            }
        };
        let mut stale = None;
        loop {
            let (url, token) = match &who {
                As::Admin => {
                    let a = self.admin(stale.as_ref()).await?;
                    let sep = if path.contains('?') { '&' } else { '?' };
                    (format!("{}/{path}{sep}api-version={API_VERSION}", a.url), a.token)
                }
                As::Queue(t) => (path.to_string(), (*t).clone()),
            };
            let mut req = self
                .client
                .request(method.clone(), &url)
                .header("authorization", format!("Bearer {}", token.expose()))
                .header("accept", format!("application/json; api-version={API_VERSION}"))
                .timeout(deadline);
            for (k, v) in extra {
                req = req.header(*k, v);
            }
            req = match body {
                Some(b) => req.json(b),
                // Front ends of the service answer 411 to a PATCH or POST without a length.
                None if method == Method::PATCH || method == Method::POST => {
                    req.header("content-type", "application/json").header("content-length", "0")
                }
                None => req,
            };
            let counted = endpoint(&method, &name);
            let resp = req.send().await.map_err(|e| {
                self.observe(&counted, 0);
                transport(method.as_str(), &name, &e)
            })?;
            let status = resp.status();
            self.observe(&counted, status.as_u16());
            let bytes = resp.bytes().await.map_err(|e| transport(method.as_str(), &name, &e))?;
            let v = if status.is_success() {
                json_of(&bytes).map_err(|message| SsError::Decode { path: name.clone(), message })?
            } else {
                error_body(&bytes)
            };
            if status == StatusCode::UNAUTHORIZED {
                match &who {
                    As::Admin if stale.is_none() => {
                        stale = Some(token);
                        continue;
                    }
                    As::Queue(_) => return Err(SsError::QueueToken),
                    As::Admin => {}
                }
            }
            return Ok((status, v));
        }
    }

    async fn expect(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        ok: &[StatusCode],
    ) -> Result<Value, SsError> {
        let (status, v) = self.call(method.clone(), path, As::Admin, body, &[]).await?;
        if ok.contains(&status) {
            return Ok(v);
        }
        Err(status_error(method.as_str(), &route(path), status, &v))
    }

    async fn runner_group_id(&self, name: &str) -> Result<u64, SsError> {
        if name.eq_ignore_ascii_case("default") {
            return Ok(1);
        }
        let path = format!("_apis/runtime/runnergroups/?groupName={}", query_value(name));
        let v = self.expect(Method::GET, &path, None, &[StatusCode::OK]).await?;
        v["value"]
            .as_array()
            .and_then(|groups| groups.iter().find(|g| g["name"].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name))))
            .and_then(|g| g["id"].as_u64())
            .ok_or_else(|| SsError::Status {
                method: "GET".into(),
                path: route(&path),
                status: 404,
                type_name: String::new(),
                message: format!("no runner group named {name:?} (github.runner_group)"),
            })
    }
}

fn transport(method: &str, path: &str, e: &reqwest::Error) -> SsError {
    SsError::Transport { method: method.into(), path: path.into(), message: super::http::without_url(e) }
}

fn status_error(method: &str, path: &str, status: StatusCode, v: &Value) -> SsError {
    let type_name = v["typeName"].as_str().unwrap_or("").to_string();
    let message: String = v["message"].as_str().unwrap_or("").chars().take(300).collect();
    if type_name.contains("RunnerScaleSetSessionConflictException")
        || (status == StatusCode::CONFLICT && path.ends_with("/sessions"))
    {
        return SsError::Conflict(message);
    }
    // The session the service lost (`RunnerAdminException`, "session ID doesn't exist"),
    // or let expire (a 400 `RunnerScaleSetSessionExpiredException`, as actions-runner-
    // controller's users have seen it answered); a 404 of a set that is gone is no such
    // thing.
    if path.contains("/sessions/")
        && ((status == StatusCode::NOT_FOUND
            && (type_name.contains("RunnerAdminException") || message.to_ascii_lowercase().contains("session")))
            || type_name.contains("SessionExpiredException"))
    {
        return SsError::SessionGone(message);
    }
    SsError::Status { method: method.into(), path: path.into(), status: status.as_u16(), type_name, message }
}

/// A query value, percent-encoded.
fn query_value(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn decode(path: &str) -> impl Fn(String) -> SsError + '_ {
    move |message| SsError::Decode { path: path.to_string(), message }
}

fn set_info(v: &Value) -> Result<ScaleSetInfo, String> {
    let labels = v["labels"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l["name"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    Ok(ScaleSetInfo {
        id: v["id"].as_u64().ok_or("no id")?,
        name: v["name"].as_str().ok_or("no name")?.to_string(),
        runner_group_id: v["runnerGroupId"].as_u64().unwrap_or(1),
        labels,
    })
}

fn session_of(v: &Value) -> Result<Session, String> {
    Ok(Session {
        id: v["sessionId"].as_str().ok_or("no sessionId")?.to_string(),
        queue_url: v["messageQueueUrl"].as_str().ok_or("no messageQueueUrl")?.to_string(),
        queue_token: Secret::new(v["messageQueueAccessToken"].as_str().ok_or("no messageQueueAccessToken")?),
        // Absent or null (GitHub's own listener allows for it): none known yet. The session
        // is made by now: refusing the answer would leave it to block every later create.
        statistics: match &v["statistics"] {
            Value::Null => Statistics::default(),
            s => serde_json::from_value(s.clone()).map_err(|e| format!("statistics: {e}"))?,
        },
    })
}

/// A field of a message, by its name as the Go client spells it, or with its first
/// letter capitalized (Go reads names regardless of case: the service's casing is not
/// pinned by its client).
fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
    match v.get(name) {
        Some(f) => f,
        None => {
            let mut upper = name.to_string();
            upper[..1].make_ascii_uppercase();
            &v[upper.as_str()]
        }
    }
}

/// A job message of a message's body; `None` for a type this client does not know.
pub fn job_message(v: &Value) -> Result<Option<JobMessage>, String> {
    let text = |k: &str| field(v, k).as_str().unwrap_or("").to_string();
    let kind = text("messageType");
    if !matches!(kind.as_str(), "JobAvailable" | "JobAssigned" | "JobStarted" | "JobCompleted") {
        return Ok(None);
    }
    let request_id = field(v, "runnerRequestId").as_u64().ok_or_else(|| format!("{kind} without a runnerRequestId"))?;
    let (owner, repo) = (text("ownerName"), text("repositoryName"));
    let job = JobRef {
        request_id,
        repository: if owner.is_empty() || repo.is_empty() { String::new() } else { format!("{owner}/{repo}") },
        job_id: match field(v, "jobId") {
            Value::Number(n) => n.to_string(),
            other => other.as_str().unwrap_or("").to_string(),
        },
        run_id: field(v, "workflowRunId").as_u64().unwrap_or(0),
        display_name: text("jobDisplayName"),
        labels: field(v, "requestLabels")
            .as_array()
            .map(|a| a.iter().filter_map(|l| l.as_str().map(str::to_string)).collect())
            .unwrap_or_default(),
    };
    let runner = Some(text("runnerName")).filter(|n| !n.is_empty());
    Ok(Some(match kind.as_str() {
        "JobAvailable" => JobMessage::Available(job),
        "JobAssigned" => JobMessage::Assigned(job),
        "JobStarted" => JobMessage::Started { job, runner_name: runner },
        _ => JobMessage::Completed { job, result: text("result"), runner_name: runner },
    }))
}

/// A message of the queue: its body is a JSON array in a string. What cannot be read is
/// said in [`Message::unreadable`], and the rest is kept (an error here would leave the
/// message unacknowledged, to come again as unreadable, for good).
pub fn message_of(v: &Value) -> Result<Message, String> {
    let id = field(v, "messageId").as_u64().ok_or("a message without a messageId")?;
    let statistics = match field(v, "statistics") {
        Value::Object(_) => serde_json::from_value(field(v, "statistics").clone()).ok(),
        _ => None,
    };
    let mut m = Message { id, statistics, jobs: Vec::new(), unreadable: None };
    match field(v, "messageType").as_str() {
        Some("RunnerScaleSetJobMessages") => {}
        other => {
            m.unreadable = Some(format!("unknown messageType {other:?}"));
            return Ok(m);
        }
    }
    let body = field(v, "body").as_str().unwrap_or("");
    if body.is_empty() {
        return Ok(m);
    }
    let items: Vec<Value> = match serde_json::from_str(body) {
        Ok(items) => items,
        Err(e) => {
            m.unreadable = Some(format!("its body is no JSON array: {e}"));
            return Ok(m);
        }
    };
    let mut bad = Vec::new();
    for item in &items {
        match job_message(item) {
            Ok(Some(j)) => m.jobs.push(j),
            // Types the service may add are skipped.
            Ok(None) => {}
            Err(e) => bad.push(e),
        }
    }
    if !bad.is_empty() {
        m.unreadable = Some(bad.join("; "));
    }
    Ok(m)
}

impl<G: GitHub> ScaleSets for HttpScaleSets<G> {
    async fn find(&self, spec: &ScaleSetSpec) -> Result<Option<ScaleSetInfo>, SsError> {
        let group = self.runner_group_id(&spec.runner_group).await?;
        let path = format!("{SETS}?runnerGroupId={group}&name={}", query_value(&spec.name));
        let v = self.expect(Method::GET, &path, None, &[StatusCode::OK]).await?;
        let sets = v["value"].as_array().cloned().unwrap_or_default();
        if sets.len() > 1 {
            return Err(decode(SETS)(format!("{} scale sets are called {:?}", sets.len(), spec.name)));
        }
        sets.first().map(set_info).transpose().map_err(decode(SETS))
    }

    async fn ensure(&self, spec: &ScaleSetSpec) -> Result<ScaleSetInfo, SsError> {
        let group = self.runner_group_id(&spec.runner_group).await?;
        let found = self.find(spec).await?;
        // The set's name is one of its labels, as GitHub's client makes it (`runs-on: <name>`).
        let mut names = vec![spec.name.clone()];
        for l in &spec.labels {
            if !names.iter().any(|n| n.eq_ignore_ascii_case(l)) {
                names.push(l.clone());
            }
        }
        let labels: Vec<Value> = names.iter().map(|l| json!({"name": l, "type": "System"})).collect();
        let Some(found) = found else {
            let body = json!({
                "name": spec.name, "runnerGroupId": group, "labels": labels,
                "RunnerSetting": {"disableUpdate": true},
            });
            let made = self.expect(Method::POST, SETS, Some(&body), &[StatusCode::OK, StatusCode::CREATED]).await;
            return match made {
                Ok(v) => set_info(&v).map_err(decode(SETS)),
                // Not in this group, yet its name is taken: in another group.
                Err(SsError::Status { status: 400 | 409, message, .. }) if message.contains("exists") => {
                    Err(decode(SETS)(format!(
                        "a scale set called {:?} exists outside runner group {:?} (github.runner_group): move it back, or delete it (`runnervisor scale-set delete`) to have it made again",
                        spec.name, spec.runner_group
                    )))
                }
                Err(e) => Err(e),
            };
        };
        let info = found;
        let mut want: Vec<String> = names.iter().map(|l| l.to_lowercase()).collect();
        let mut have: Vec<String> = info.labels.iter().map(|l| l.to_lowercase()).collect();
        want.sort();
        have.sort();
        if want == have && info.runner_group_id == group {
            return Ok(info);
        }
        let path = format!("{SETS}/{}", info.id);
        let body = json!({"name": spec.name, "runnerGroupId": group, "labels": labels});
        let v = self.expect(Method::PATCH, &path, Some(&body), &[StatusCode::OK]).await?;
        set_info(&v).map_err(decode(SETS))
    }

    async fn delete(&self, set_id: u64) -> Result<(), SsError> {
        let path = format!("{SETS}/{set_id}");
        self.expect(Method::DELETE, &path, None, &[StatusCode::NO_CONTENT, StatusCode::OK, StatusCode::NOT_FOUND])
            .await
            .map(drop)
    }

    async fn create_session(&self, set_id: u64, owner: &str) -> Result<Session, SsError> {
        let path = format!("{SETS}/{set_id}/sessions");
        let v = self.expect(Method::POST, &path, Some(&json!({"ownerName": owner})), &[StatusCode::OK]).await?;
        session_of(&v).map_err(decode(&path))
    }

    async fn refresh_session(&self, set_id: u64, session_id: &str) -> Result<Session, SsError> {
        let path = format!("{SETS}/{set_id}/sessions/{session_id}");
        let v = self.expect(Method::PATCH, &path, None, &[StatusCode::OK]).await?;
        session_of(&v).map_err(decode(&path))
    }

    async fn delete_session(&self, set_id: u64, session_id: &str) -> Result<(), SsError> {
        let path = format!("{SETS}/{set_id}/sessions/{session_id}");
        match self
            .expect(Method::DELETE, &path, None, &[StatusCode::NO_CONTENT, StatusCode::OK, StatusCode::NOT_FOUND])
            .await
        {
            // Expired already: as gone as deleted.
            Ok(_) | Err(SsError::SessionGone(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn poll(&self, session: &Session, last: u64, capacity: u64) -> Result<Option<Message>, SsError> {
        let url = match last {
            0 => session.queue_url.clone(),
            n => {
                let sep = if session.queue_url.contains('?') { '&' } else { '?' };
                format!("{}{sep}lastMessageId={n}", session.queue_url)
            }
        };
        let extra = [("x-scalesetmaxcapacity", capacity.min(MAX_CAPACITY).to_string())];
        let (status, v) = self.call(Method::GET, &url, As::Queue(&session.queue_token), None, &extra).await?;
        match status {
            // An empty 200 has been seen from the service: nothing came.
            StatusCode::ACCEPTED | StatusCode::NO_CONTENT => Ok(None),
            StatusCode::OK if v.is_null() => Ok(None),
            StatusCode::OK => message_of(&v).map(Some).map_err(decode("message queue")),
            s => Err(status_error("GET", "message queue", s, &v)),
        }
    }

    async fn ack(&self, session: &Session, message_id: u64) -> Result<(), SsError> {
        let (base, query) = session.queue_url.split_once('?').unwrap_or((&session.queue_url, ""));
        let url =
            if query.is_empty() { format!("{base}/{message_id}") } else { format!("{base}/{message_id}?{query}") };
        let (status, v) = self.call(Method::DELETE, &url, As::Queue(&session.queue_token), None, &[]).await?;
        match status {
            StatusCode::NO_CONTENT | StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
            s => Err(status_error("DELETE", "message queue", s, &v)),
        }
    }

    async fn acquire(&self, set_id: u64, session: &Session, requests: &[u64]) -> Result<Vec<u64>, SsError> {
        let path = format!("{SETS}/{set_id}/acquirejobs");
        let admin = self.admin(None).await?;
        let url = format!("{}/{path}?api-version={API_VERSION}", admin.url);
        let (status, v) =
            self.call(Method::POST, &url, As::Queue(&session.queue_token), Some(&json!(requests)), &[]).await?;
        if status != StatusCode::OK {
            return Err(status_error("POST", &path, status, &v));
        }
        Ok(v["value"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default())
    }

    async fn generate_jit_config(&self, set_id: u64, name: &str) -> Result<JitRunner, SsError> {
        let path = format!("{SETS}/{set_id}/generatejitconfig");
        let body = json!({"name": name, "workFolder": ""});
        let v = self.expect(Method::POST, &path, Some(&body), &[StatusCode::OK, StatusCode::CREATED]).await?;
        let runner_id = v["runner"]["id"].as_u64().ok_or_else(|| decode(&path)("no runner.id".into()))?;
        let encoded = v["encodedJITConfig"].as_str().ok_or_else(|| decode(&path)("no encodedJITConfig".into()))?;
        Ok(JitRunner { runner_id, encoded: Secret::new(encoded) })
    }

    async fn delete_runner(&self, runner_id: u64) -> Result<Deleted, SsError> {
        let path = format!("{AGENTS}/{runner_id}");
        let (status, v) = self.call(Method::DELETE, &path, As::Admin, None, &[]).await?;
        let type_name = v["typeName"].as_str().unwrap_or("");
        match status {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(Deleted::Deleted),
            _ if type_name.contains("AgentNotFoundException") || status == StatusCode::NOT_FOUND => {
                Ok(Deleted::NotFound)
            }
            _ if type_name.contains("JobStillRunningException") => Ok(Deleted::Busy),
            s => Err(status_error("DELETE", &route(&path), s, &v)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;

//! Webhook intake: `POST /webhook`. Verifies `X-Hub-Signature-256` in constant time over
//! the raw body, parses `workflow_job`, persists it (delivery id + event, atomically)
//! and wakes the scheduler. It never provisions: it answers within milliseconds.
//!
//! | request                                   | answer |
//! |-------------------------------------------|--------|
//! | no/malformed signature header             | 401, before the body is read |
//! | body over `server.max_body_bytes`         | 413 (unread when Content-Length says so) |
//! | body not in within `server.body_timeout`  | 408    |
//! | signature does not match the body         | 401    |
//! | bad JSON or missing fields                | 400, naming what is wrong |
//! | `ping`                                    | 200    |
//! | other events, unknown actions             | 202, ignored |
//! | repository outside the configured scope   | 202, ignored, counted (`outcome="out_of_scope"`) |
//! | `workflow_job` a scale-set pool's set takes, no runner named | 202, ignored, counted (`outcome="scale_set"`) |
//! | `workflow_job`, new delivery id           | 202, accepted |
//! | `workflow_job`, delivery id already seen  | 200, duplicate |
//! | `workflow_job` body taken before under another delivery id | 200, duplicate: a replay, not written, counted (`outcome="replayed"`) |
//! | the store cannot write                    | 503 (GitHub records a failed delivery; the reconciler redelivers it) |

use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Extensions, HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;
use tokio::sync::Notify;

use crate::config::Scope;
use crate::logging::Throttle;
use crate::metrics::{Metrics, WebhookLabels};
use crate::server::Peer;

/// Requests anyone can send at will (no or a wrong signature, a body never finished) are
/// counted each, and logged once per period with how many were left out: the journal
/// must not grow with an attacker's rate, nor carry what they chose to put in a header.
static REJECTED: Throttle = Throttle::new(std::time::Duration::from_secs(10));
static BODY_TIMEOUTS: Throttle = Throttle::new(std::time::Duration::from_secs(10));
/// Signed requests refused or left out (bad JSON, outside the scope): GitHub sends few,
/// but whoever holds one signed body can replay it at will (the signature covers the body
/// alone), so they are logged as rejected ones are.
static SIGNED_REFUSED: Throttle = Throttle::new(std::time::Duration::from_secs(10));

fn source(extensions: &Extensions) -> String {
    extensions.get::<Peer>().map(|p| p.0.ip().to_string()).unwrap_or_else(|| "-".into())
}

fn job_outcome(outcome: &str) -> WebhookLabels {
    WebhookLabels::new("workflow_job", outcome)
}
use crate::model::{JobAction, JobEvent, JobInfo};
use crate::secret::Secret;
use crate::store::Writer;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("missing X-Hub-Signature-256 header")]
    Missing,
    #[error("malformed X-Hub-Signature-256 header (expected sha256=<64 hex digits>)")]
    Malformed,
    #[error("X-Hub-Signature-256 does not match the body")]
    Mismatch,
}

/// Checks `sha256=<hex>` against HMAC-SHA256(secret, body), in constant time.
pub fn verify_signature(secret: &[u8], body: &[u8], header: Option<&str>) -> Result<(), SignatureError> {
    let sig = parse_signature(header)?;
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&sig).map_err(|_| SignatureError::Mismatch)
}

/// The digest of a `sha256=<64 hex digits>` header: checked before the body is read, so
/// that requests without one cost nothing.
fn parse_signature(header: Option<&str>) -> Result<[u8; 32], SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let hex = header.trim().strip_prefix("sha256=").ok_or(SignatureError::Malformed)?;
    if hex.len() != 64 {
        return Err(SignatureError::Malformed);
    }
    let mut sig = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).map_err(|_| SignatureError::Malformed)?;
        sig[i] = u8::from_str_radix(s, 16).map_err(|_| SignatureError::Malformed)?;
    }
    Ok(sig)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("invalid workflow_job payload: {0}")]
    Invalid(String),
    #[error("unknown workflow_job action {0:?}")]
    UnknownAction(String),
}

#[derive(Deserialize)]
struct Payload {
    action: String,
    workflow_job: WorkflowJob,
    repository: Repository,
    #[serde(default)]
    enterprise: Option<Enterprise>,
}

#[derive(Deserialize)]
struct Enterprise {
    slug: String,
}

/// A parsed delivery: the event, and where it comes from (for the scope check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub event: JobEvent,
    /// The enterprise account's slug, when the payload names one.
    pub enterprise: Option<String>,
}

#[derive(Deserialize)]
struct WorkflowJob {
    id: u64,
    run_id: u64,
    #[serde(default)]
    run_attempt: Option<u32>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    workflow_name: Option<String>,
    labels: Vec<String>,
    #[serde(default)]
    html_url: Option<String>,
    #[serde(default)]
    runner_name: Option<String>,
    #[serde(default)]
    conclusion: Option<String>,
}

#[derive(Deserialize)]
struct Repository {
    full_name: String,
}

/// Parses a `workflow_job` payload.
pub fn parse_job_event(body: &[u8], delivery: &str, received_at: SystemTime) -> Result<Parsed, ParseError> {
    let p: Payload = serde_json::from_slice(body).map_err(|e| ParseError::Invalid(e.to_string()))?;
    let action = match p.action.as_str() {
        "queued" => JobAction::Queued,
        "waiting" => JobAction::Waiting,
        "in_progress" => JobAction::InProgress,
        "completed" => JobAction::Completed,
        other => return Err(ParseError::UnknownAction(other.to_string())),
    };
    if !p.repository.full_name.contains('/') {
        return Err(ParseError::Invalid(format!(
            "repository.full_name {:?} is not owner/name",
            p.repository.full_name
        )));
    }
    let wj = p.workflow_job;
    let event = JobEvent {
        delivery: delivery.to_string(),
        action,
        job: JobInfo {
            id: wj.id,
            run_id: wj.run_id,
            run_attempt: wj.run_attempt.unwrap_or(1),
            name: wj.name.unwrap_or_default(),
            workflow_name: wj.workflow_name.unwrap_or_default(),
            labels: wj.labels,
            repository: p.repository.full_name,
            html_url: wj.html_url.unwrap_or_default(),
            runner_name: wj.runner_name.filter(|n| !n.is_empty()),
            conclusion: wj.conclusion,
            scale_set: None,
        },
        received_at,
    };
    Ok(Parsed { event, enterprise: p.enterprise.map(|e| e.slug) })
}

/// Where an accepted delivery is written before it is answered: this host's store, or,
/// in fleet mode, the fleet's database (whose log each member mirrors into its store).
#[derive(Clone)]
pub enum Persist {
    Local(Arc<Writer>),
    Fleet(crate::fleet::intake::FleetIntake),
}

impl From<Writer> for Persist {
    fn from(w: Writer) -> Persist {
        Persist::Local(Arc::new(w))
    }
}

impl Persist {
    /// `false`: this delivery id was accepted before. An error is answered 503.
    pub async fn accept(&self, event: JobEvent) -> Result<bool, String> {
        match self {
            Persist::Local(a) => a.accept(event).await.map_err(|e| e.to_string()),
            Persist::Fleet(f) => f.accept(event).await.map_err(|e| e.to_string()),
        }
    }
}

pub struct Intake {
    pub secret: Secret,
    /// Writes deliveries durably, many to a commit under load.
    pub accepter: Persist,
    /// Woken when the inbox has something new.
    pub inbox_ready: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    /// Deliveries about repositories outside it are answered 202 and ignored.
    pub scope: Scope,
    /// Largest body read (`server.max_body_bytes`); larger ones get 413 unread.
    pub max_body_bytes: usize,
    /// Deadline for reading the body once the headers are in (`server.body_timeout`).
    pub body_timeout: std::time::Duration,
    /// When a delivery is received (the scheduler's clock).
    pub clock: Arc<dyn crate::clock::Clock>,
    /// The pools that are runner scale sets (as started: a change waits for a restart): a
    /// delivery about a job one of their sets takes, no runner named, is answered 202 and
    /// not written. The hook hears of every job, but a set's news is its messages (under
    /// the request's id); in a fleet its row, filed under its labels, no member would read.
    pub scale_sets: Vec<crate::config::PoolConfig>,
    /// The latest `workflow_job` bodies accepted, to tell a replay from a delivery.
    pub replays: Replays,
}

/// How many of the latest `workflow_job` bodies [`Replays`] remembers (~60 bytes each).
const REPLAY_WINDOW: usize = 65_536;

/// The latest `workflow_job` bodies this intake wrote, each with its delivery id (hashed).
/// GitHub sends an event's body under one delivery id, for every hook and every
/// redelivery (the id names the event, not the attempt); the signature covers the body
/// alone, so whoever holds one signed body (a proxy's log, the hook's "Recent
/// deliveries" page) could send it again under fresh ids, and each would be a new entry
/// in the store's delivery log and inbox, kept for days. A body seen under another id is
/// a replay: answered as a duplicate, and not written. In memory only, the latest
/// [`REPLAY_WINDOW`]: a replay after a restart, or of a body that old, costs one
/// inbox entry, which the job's state (it only moves forward) makes harmless.
#[derive(Default)]
pub struct Replays {
    seen: std::sync::Mutex<ReplayWindow>,
}

#[derive(Default)]
struct ReplayWindow {
    /// The first 16 bytes of a body's SHA-256 → the hash of the delivery id it came under.
    by_body: std::collections::HashMap<[u8; 16], u64>,
    order: std::collections::VecDeque<[u8; 16]>,
    hasher: std::hash::RandomState,
}

impl Replays {
    /// What a body is remembered by: the first 16 bytes of its SHA-256.
    pub fn key(body: &[u8]) -> BodyKey {
        let digest = <Sha256 as sha2::Digest>::digest(body);
        BodyKey(digest[..16].try_into().expect("a SHA-256 has 32 bytes"))
    }

    /// Whether the body of `key` was written before under another delivery id than
    /// `delivery`.
    pub fn replayed(&self, key: &BodyKey, delivery: &str) -> bool {
        use std::hash::BuildHasher;
        let w = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        w.by_body.get(&key.0).is_some_and(|seen| *seen != w.hasher.hash_one(delivery))
    }

    /// Remembers the body of `key` as written under `delivery` (after the write, not
    /// before: a body whose write failed may come again under any id, and is taken).
    pub fn remember(&self, key: BodyKey, delivery: &str) {
        use std::hash::BuildHasher;
        let mut w = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let id = w.hasher.hash_one(delivery);
        if w.by_body.insert(key.0, id).is_none() {
            if w.order.len() == REPLAY_WINDOW
                && let Some(oldest) = w.order.pop_front()
            {
                w.by_body.remove(&oldest);
            }
            w.order.push_back(key.0);
        }
    }
}

/// A body as [`Replays`] knows it.
pub struct BodyKey([u8; 16]);

/// Whether a delivery's job is left to a scale set's messages: no runner named (news of a
/// job a runner took is the scheduler's to weigh: the runner may be a webhook pool's VM,
/// whose labels a set's may cover too, and the book must follow its job) and labels one of
/// `scale_sets` covers.
pub fn a_scale_sets(scale_sets: &[crate::config::PoolConfig], job: &JobInfo) -> bool {
    job.runner_name.is_none() && !job.labels.is_empty() && scale_sets.iter().any(|p| p.scale_set_covers(&job.labels))
}

pub fn router(intake: Arc<Intake>) -> Router {
    Router::new().route("/webhook", post(handle)).with_state(intake)
}

fn reply(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"message": message}))).into_response()
}

/// [`reply`] for the answers given thousands of times a second, without building them.
fn reply_static(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Reads the body within the size cap and the deadline, after cheap checks of the headers:
/// an unsigned or oversized request is answered before any of its body is read.
async fn read_body(
    intake: &Intake,
    headers: &HeaderMap,
    extensions: &Extensions,
    body: Body,
) -> Result<Bytes, Response> {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if let Err(e) = parse_signature(header("x-hub-signature-256")) {
        intake.metrics.webhook_signature_failures.inc();
        if let Some(suppressed) = REJECTED.check() {
            tracing::warn!(error = %e, source = %source(extensions), suppressed, "webhook rejected");
        }
        return Err(reply(StatusCode::UNAUTHORIZED, &e.to_string()));
    }
    let too_large = || {
        reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than server.max_body_bytes = {}", intake.max_body_bytes),
        )
    };
    if header("content-length").and_then(|l| l.parse::<usize>().ok()).is_some_and(|l| l > intake.max_body_bytes) {
        return Err(too_large());
    }
    match tokio::time::timeout(intake.body_timeout, axum::body::to_bytes(body, intake.max_body_bytes)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(_)) => Err(too_large()),
        Err(_) => {
            if let Some(suppressed) = BODY_TIMEOUTS.check() {
                tracing::warn!(source = %source(extensions), suppressed, "webhook body not received in time");
            }
            Err(reply(StatusCode::REQUEST_TIMEOUT, "body not received within server.body_timeout"))
        }
    }
}

/// What the intake makes of a request whose body has been read, before any store work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answered at once, persisting nothing.
    Answer { status: StatusCode, message: String, counted: Counted },
    /// A `workflow_job` event within the scope, to persist before the answer.
    Persist(JobEvent),
}

/// Which metric an answer counts in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Counted {
    BadSignature,
    /// `event`: `workflow_job`, or `other` for any other event: its name is the sender's
    /// choice, and a label per name would let whoever replays a signed body grow the
    /// metric without bound.
    Webhook {
        event: &'static str,
        outcome: &'static str,
    },
    Nothing,
}

/// The intake's decision: signature, event type, delivery id, payload, scope. Pure (no
/// store, no clock of its own), so that it is table-tested and fuzzed.
pub fn decide(secret: &[u8], scope: &Scope, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Decision {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let answer = |status, message: String, counted| Decision::Answer { status, message, counted };
    let counted = |event: &'static str, outcome| Counted::Webhook { event, outcome };
    if let Err(e) = verify_signature(secret, body, header("x-hub-signature-256")) {
        return answer(StatusCode::UNAUTHORIZED, e.to_string(), Counted::BadSignature);
    }
    let Some(event) = header("x-github-event") else {
        return answer(StatusCode::BAD_REQUEST, "missing X-GitHub-Event header".into(), Counted::Nothing);
    };
    match event {
        "ping" => return answer(StatusCode::OK, "pong".into(), Counted::Nothing),
        "workflow_job" => {}
        other => {
            let other: String = other.chars().take(64).collect();
            return answer(StatusCode::ACCEPTED, format!("event {other} ignored"), counted("other", "ignored"));
        }
    }
    let Some(delivery) = header("x-github-delivery").filter(|d| !d.is_empty() && d.len() <= 100) else {
        return answer(StatusCode::BAD_REQUEST, "missing or invalid X-GitHub-Delivery header".into(), Counted::Nothing);
    };
    match parse_job_event(body, delivery, now) {
        Ok(Parsed { event, enterprise }) if scope.admits(&event.job.repository, enterprise.as_deref()) => {
            Decision::Persist(event)
        }
        Ok(Parsed { event, .. }) => answer(
            StatusCode::ACCEPTED,
            format!("outside the configured scope (repository {}); ignored", event.job.repository),
            counted("workflow_job", "out_of_scope"),
        ),
        Err(ParseError::UnknownAction(a)) => {
            answer(StatusCode::ACCEPTED, format!("action {a:?} ignored"), counted("workflow_job", "ignored"))
        }
        Err(e) => answer(StatusCode::BAD_REQUEST, e.to_string(), counted("workflow_job", "invalid")),
    }
}

async fn handle(State(intake): State<Arc<Intake>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let body = match read_body(&intake, &headers, &parts.extensions, body).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    // A header's text is visible ASCII: any byte is a char boundary.
    let delivery = headers.get("x-github-delivery").and_then(|v| v.to_str().ok()).map(|d| &d[..d.len().min(100)]);
    let delivery = delivery.unwrap_or("-");
    let job_event = match decide(intake.secret.expose().as_bytes(), &intake.scope, &headers, &body, intake.clock.now())
    {
        Decision::Persist(ev) => ev,
        Decision::Answer { status, message, counted } => {
            match counted {
                Counted::BadSignature => {
                    intake.metrics.webhook_signature_failures.inc();
                    if let Some(suppressed) = REJECTED.check() {
                        tracing::warn!(error = %message, source = %source(&parts.extensions), suppressed, "webhook rejected");
                    }
                }
                Counted::Webhook { event, outcome } => {
                    intake.metrics.webhooks.get_or_create(&WebhookLabels::new(event, outcome)).inc();
                    if outcome != "ignored"
                        && let Some(suppressed) = SIGNED_REFUSED.check()
                    {
                        tracing::warn!(delivery, outcome, suppressed, "webhook {message}");
                    }
                }
                Counted::Nothing => {}
            }
            return reply(status, &message);
        }
    };
    let (job_id, run_id, action) = (job_event.job.id, job_event.job.run_id, job_event.action);
    let body_key = Replays::key(&body);
    if intake.replays.replayed(&body_key, delivery) {
        intake.metrics.webhooks.get_or_create(&job_outcome("replayed")).inc();
        if let Some(suppressed) = SIGNED_REFUSED.check() {
            tracing::warn!(delivery, job_id, source = %source(&parts.extensions), suppressed, "a workflow_job body came again under another delivery id (GitHub sends a body under one id): a replay, not written");
        }
        return reply_static(StatusCode::OK, r#"{"message":"duplicate delivery"}"#);
    }
    if a_scale_sets(&intake.scale_sets, &job_event.job) {
        intake.metrics.webhooks.get_or_create(&job_outcome("scale_set")).inc();
        tracing::debug!(delivery, job_id, labels = ?job_event.job.labels, "a webhook about a scale set's job: its set's messages say it");
        return reply_static(StatusCode::ACCEPTED, r#"{"message":"a scale set's job: ignored"}"#);
    }
    let repository = tracing::enabled!(tracing::Level::DEBUG).then(|| job_event.job.repository.clone());
    let accepted = intake.accepter.accept(job_event).await;
    if accepted.is_ok() {
        intake.replays.remember(body_key, delivery);
    }
    match accepted {
        Ok(true) => {
            intake.metrics.webhooks.get_or_create(&job_outcome("accepted")).inc();
            // Per delivery, so debug: at thousands a second the journal would take more than
            // the intake. The scheduler logs each job of ours once ("job queued").
            tracing::debug!(delivery, job_id, run_id, repository, action = ?action, "workflow_job accepted");
            intake.inbox_ready.notify_one();
            reply_static(StatusCode::ACCEPTED, r#"{"message":"accepted"}"#)
        }
        Ok(false) => {
            intake.metrics.webhooks.get_or_create(&job_outcome("duplicate")).inc();
            tracing::debug!(delivery, job_id, "duplicate delivery ignored");
            reply_static(StatusCode::OK, r#"{"message":"duplicate delivery"}"#)
        }
        Err(e) => {
            tracing::error!(delivery, error = %e, "cannot persist webhook");
            reply(StatusCode::SERVICE_UNAVAILABLE, "cannot persist the event")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_a_scale_set_takes_is_left_to_its_messages_unless_a_runner_is_named() {
        let config = crate::config::Config::parse(
            "[server]\nlisten = \"127.0.0.1:0\"\n[github]\norganization = \"o\"\n\
             auth = { type = \"pat\", token = { file = \"/x\" } }\nwebhook_secret = { file = \"/y\" }\n\
             [[pool]]\nname = \"set\"\nlabels = [\"linux\"]\nimage = \"/x.qcow2\"\nintake = \"scale_set\"\n\
             [[pool]]\nname = \"hooked\"\nlabels = [\"linux\", \"x64\"]\nimage = \"/x.qcow2\"\n",
        )
        .unwrap();
        let sets: Vec<_> = config.pools.iter().filter(|p| p.scale_set().is_some()).cloned().collect();
        let job = |labels: &[&str], runner: Option<&str>| JobInfo {
            labels: labels.iter().map(|l| l.to_string()).collect(),
            runner_name: runner.map(str::to_string),
            ..crate::scheduler::fixtures::job_info(1, &[], None)
        };
        for (labels, runner, want) in [
            (&["set"][..], None, true),
            (&["Linux", "SET"][..], None, true),
            (&["linux", "x64"][..], None, false),
            (&[][..], None, false),
            // The set's labels cover it, but a webhook pool's runner took it.
            (&["linux"][..], Some("rv-hooked-7"), false),
        ] {
            assert_eq!(a_scale_sets(&sets, &job(labels, runner)), want, "{labels:?} {runner:?}");
        }
    }

    /// GitHub's published example for validating deliveries.
    #[test]
    fn githubs_test_vector_verifies() {
        let secret = b"It's a Secret to Everybody";
        let good = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(verify_signature(secret, b"Hello, World!", Some(good)), Ok(()));
        assert_eq!(verify_signature(secret, b"Hello, World?", Some(good)), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature(b"other", b"Hello, World!", Some(good)), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature(secret, b"x", None), Err(SignatureError::Missing));
        assert_eq!(verify_signature(secret, b"x", Some("sha1=abc")), Err(SignatureError::Malformed));
        assert_eq!(verify_signature(secret, b"x", Some("sha256=zz")), Err(SignatureError::Malformed));
        let not_hex = format!("sha256={}", "g".repeat(64));
        assert_eq!(verify_signature(secret, b"x", Some(&not_hex)), Err(SignatureError::Malformed));
    }

    #[test]
    fn decisions() {
        let secret = b"s3cret";
        let scope = Scope::Organization("octo-org".into());
        let body = |repo: &str, action: &str| {
            serde_json::json!({"action": action, "workflow_job": {"id": 1, "run_id": 2, "labels": ["x"]},
                               "repository": {"full_name": repo}})
            .to_string()
        };
        let sign = |b: &str| {
            let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).unwrap();
            mac.update(b.as_bytes());
            format!("sha256={}", mac.finalize().into_bytes().iter().map(|x| format!("{x:02x}")).collect::<String>())
        };
        let headers = |event: Option<&str>, sig: Option<String>, delivery: Option<&str>| {
            let mut h = HeaderMap::new();
            for (k, v) in [
                ("x-github-event", event.map(String::from)),
                ("x-hub-signature-256", sig),
                ("x-github-delivery", delivery.map(String::from)),
            ] {
                if let Some(v) = v {
                    h.insert(k, v.parse().unwrap());
                }
            }
            h
        };
        let ok = body("octo-org/app", "queued");
        let status = |d: Decision| match d {
            Decision::Answer { status, .. } => status.as_u16(),
            Decision::Persist(_) => 0,
        };
        let now = SystemTime::UNIX_EPOCH;
        let table: Vec<(&str, HeaderMap, String, u16)> = vec![
            ("accepted", headers(Some("workflow_job"), Some(sign(&ok)), Some("g1")), ok.clone(), 0),
            ("no signature", headers(Some("workflow_job"), None, Some("g1")), ok.clone(), 401),
            ("wrong signature", headers(Some("workflow_job"), Some(sign("other")), Some("g1")), ok.clone(), 401),
            ("no event", headers(None, Some(sign(&ok)), Some("g1")), ok.clone(), 400),
            ("ping", headers(Some("ping"), Some(sign(&ok)), None), ok.clone(), 200),
            ("other event", headers(Some("push"), Some(sign(&ok)), Some("g1")), ok.clone(), 202),
            ("no delivery id", headers(Some("workflow_job"), Some(sign(&ok)), None), ok.clone(), 400),
        ];
        for (what, h, b, want) in table {
            assert_eq!(status(decide(secret, &scope, &h, b.as_bytes(), now)), want, "{what}");
        }
        let out = body("evil/app", "queued");
        let d =
            decide(secret, &scope, &headers(Some("workflow_job"), Some(sign(&out)), Some("g")), out.as_bytes(), now);
        assert!(
            matches!(&d, Decision::Answer { counted: Counted::Webhook { outcome: "out_of_scope", .. }, .. }),
            "{d:?}"
        );
        let odd = body("octo-org/app", "requested");
        let d =
            decide(secret, &scope, &headers(Some("workflow_job"), Some(sign(&odd)), Some("g")), odd.as_bytes(), now);
        assert_eq!(status(d), 202);
        let bad = "{\"action\": \"queued\"}";
        let d = decide(secret, &scope, &headers(Some("workflow_job"), Some(sign(bad)), Some("g")), bad.as_bytes(), now);
        assert!(matches!(&d, Decision::Answer { counted: Counted::Webhook { outcome: "invalid", .. }, .. }), "{d:?}");
        // Any other event counts under one label, whatever name the sender chose.
        for event in ["push", "x-1", "x-2"] {
            let d = decide(secret, &scope, &headers(Some(event), Some(sign(&ok)), Some("g")), ok.as_bytes(), now);
            assert!(
                matches!(&d, Decision::Answer { counted: Counted::Webhook { event: "other", outcome: "ignored" }, message, .. } if message.contains(event)),
                "{d:?}"
            );
        }
    }

    #[test]
    fn a_body_seen_under_another_delivery_id_is_a_replay() {
        let r = Replays::default();
        let seen = |body: &str, id: &str| r.replayed(&Replays::key(body.as_bytes()), id);
        assert!(!seen("job 1", "g1"), "never written");
        assert!(!seen("job 1", "g2"), "not written yet (its write failed, say): taken under any id");
        r.remember(Replays::key(b"job 1"), "g1");
        assert!(!seen("job 1", "g1"), "its own id again: GitHub's redelivery");
        assert!(seen("job 1", "g2"), "another id: a replay");
        assert!(!seen("job 2", "g2"), "another body under that id: the store's to judge");
        // The window keeps the latest bodies only.
        for i in 0..REPLAY_WINDOW {
            r.remember(Replays::key(format!("filler {i}").as_bytes()), "f");
        }
        assert!(!seen("job 1", "g3"), "forgotten after REPLAY_WINDOW newer bodies");
        r.remember(Replays::key(b"filler 7"), "f");
        let w = r.seen.lock().unwrap();
        assert_eq!(
            (w.by_body.len(), w.order.len()),
            (REPLAY_WINDOW, REPLAY_WINDOW),
            "a body remembered again is one entry"
        );
    }

    #[test]
    fn parses_workflow_job_with_u64_ids_and_null_runner() {
        let body = serde_json::json!({
            "action": "queued",
            "workflow_job": {"id": 30000000001u64, "run_id": 20000000001u64, "run_attempt": 2, "name": "build",
                "workflow_name": "CI", "labels": ["self-hosted", "Linux"], "html_url": "https://x",
                "runner_name": null, "runner_id": null, "conclusion": null, "status": "queued"},
            "repository": {"full_name": "octo-org/app"},
        });
        let Parsed { event: e, enterprise } =
            parse_job_event(body.to_string().as_bytes(), "guid", SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(enterprise, None);
        assert_eq!(e.action, JobAction::Queued);
        assert_eq!(e.job.id, 30_000_000_001);
        assert_eq!(e.job.run_attempt, 2);
        assert_eq!(e.job.runner_name, None);
        assert_eq!(e.job.repository, "octo-org/app");
    }

    #[test]
    fn bad_payloads_name_what_is_wrong() {
        let e = parse_job_event(b"{not json", "g", SystemTime::UNIX_EPOCH).unwrap_err();
        assert!(matches!(e, ParseError::Invalid(_)));
        let missing = r#"{"action":"queued","workflow_job":{"run_id":1,"labels":[]},"repository":{"full_name":"o/r"}}"#;
        let e = parse_job_event(missing.as_bytes(), "g", SystemTime::UNIX_EPOCH).unwrap_err();
        assert!(e.to_string().contains("missing field `id`"), "{e}");
        let big =
            r#"{"action":"queued","workflow_job":{"id":-1,"run_id":1,"labels":[]},"repository":{"full_name":"o/r"}}"#;
        assert!(parse_job_event(big.as_bytes(), "g", SystemTime::UNIX_EPOCH).is_err());
        let action = r#"{"action":"teleported","workflow_job":{"id":1,"run_id":1,"labels":[]},"repository":{"full_name":"o/r"}}"#;
        assert_eq!(
            parse_job_event(action.as_bytes(), "g", SystemTime::UNIX_EPOCH),
            Err(ParseError::UnknownAction("teleported".into()))
        );
    }
}

//! The real GitHub client.
//!
//! Every call: `X-GitHub-Api-Version: 2022-11-28`, a PAT or a cached installation token
//! (refreshed 5 minutes before expiry), retries on network errors and 5xx with exponential
//! backoff and jitter, and rate limits honoured: `retry-after`, or `x-ratelimit-reset` when
//! `x-ratelimit-remaining` is 0. A wait longer than `max_wait` is not slept through: the
//! call fails with [`GhError::RateLimited`] and the caller tries again later (jobs stay queued).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::app::AppSigner;
use super::responses;
use super::{Deleted, DeliveryInfo, GhError, GitHub, JitRunner, JobStatus, RunnerInfo};
use crate::config::{HookConfig, Scope};
use crate::metrics::{ApiCallLabels, Metrics};
use crate::model::JobInfo;
use crate::secret::Secret;

pub const API_VERSION: &str = "2022-11-28";

pub enum Auth {
    Pat(Secret),
    // Boxed: an RSA key is large next to a token.
    App { signer: Box<AppSigner>, installation_id: u64 },
}

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base: Duration,
    pub cap: Duration,
    /// Longest rate-limit wait slept through inside one call.
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(8),
            max_wait: Duration::from_secs(20),
        }
    }
}

pub struct HttpGitHub {
    client: reqwest::Client,
    api: String,
    scope: Scope,
    hook: Option<HookConfig>,
    auth: Auth,
    token: Mutex<Option<(Secret, SystemTime)>>,
    retry: RetryPolicy,
    pub rate_remaining: AtomicI64,
    /// Until when GitHub said to send nothing (its last rate limit's reset or
    /// `retry-after`), by bucket ([`INSTALLATION`], [`APP`]): every call waits for it or
    /// fails at once, without a request. GitHub may ban an integration that keeps calling
    /// while it is rate limited, and the agent's other calls (syncs, teardown retries,
    /// credentials) went on meanwhile.
    blocked_until: std::sync::Mutex<[Option<tokio::time::Instant>; 2]>,
    /// Calls by endpoint and status, and the rate limit left, when metrics are served.
    metrics: Option<Arc<Metrics>>,
}

enum Cred {
    Installation,
    Jwt,
}

/// The rate limits GitHub counts apart ([`HttpGitHub::blocked_until`]'s index): an App
/// installation's calls, and the App's own (with its JWT: the token exchange, the App's
/// hook). A PAT's calls all count in the first.
const INSTALLATION: usize = 0;
const APP: usize = 1;

/// Longest rate-limit wait taken from GitHub's headers (a primary limit resets within the
/// hour): a wild `retry-after` neither holds the client for days nor overflows a clock.
const MAX_RATE_WAIT: Duration = Duration::from_secs(3600);

/// The limits a rate-limit answer holds back: a primary limit (`x-ratelimit-remaining: 0`
/// and no `retry-after`) is its own bucket's; a secondary limit holds both (GitHub counts
/// it per integration, and may ban one that keeps calling).
fn held_buckets(bucket: usize, headers: &reqwest::header::HeaderMap) -> [bool; 2] {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    let primary = header("retry-after").is_none() && header("x-ratelimit-remaining") == Some("0");
    match primary {
        true => [bucket == INSTALLATION, bucket == APP],
        false => [true, true],
    }
}

/// `delay * 2^n`, capped, with "equal jitter" (half fixed, half random).
pub fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exp = policy.base.saturating_mul(1u32 << attempt.min(16)).min(policy.cap);
    let half = exp / 2;
    half + Duration::from_secs_f64(half.as_secs_f64() * fastrand::f64())
}

/// The time to wait before calling again, from a 403/429 response; `None` if it is not a rate limit.
pub fn rate_limit_wait(status: StatusCode, headers: &reqwest::header::HeaderMap, now: SystemTime) -> Option<Duration> {
    if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::FORBIDDEN {
        return None;
    }
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(s) = header("retry-after") {
        return Some(Duration::from_secs(s).min(MAX_RATE_WAIT));
    }
    if header("x-ratelimit-remaining") == Some(0) {
        let reset = header("x-ratelimit-reset").unwrap_or(0);
        // The reset is a time on GitHub's clock, which its `Date` says: a clock here behind
        // GitHub's would hold calls back that much longer (ahead, let them go early).
        let date = headers.get("date").and_then(|v| v.to_str().ok()).and_then(|d| httpdate::parse_http_date(d).ok());
        let now = date.unwrap_or(now).duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        return Some(Duration::from_secs(reset.saturating_sub(now).max(1)).min(MAX_RATE_WAIT));
    }
    // A secondary limit without headers: GitHub says to wait at least a minute.
    (status == StatusCode::TOO_MANY_REQUESTS).then_some(Duration::from_secs(60))
}

/// A short route name for metrics: ids replaced by `{id}`.
pub fn endpoint_name(method: &Method, path: &str) -> String {
    let path = path.split('?').next().unwrap_or("");
    let mut parts: Vec<&str> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| if s.bytes().all(|b| b.is_ascii_digit()) { "{id}" } else { s })
        .collect();
    // A repository's name (a private one's too) is not the metric's to show, and a series
    // per repository asked about would grow without bound.
    if let Some(i) = parts.iter().position(|p| *p == "repos") {
        for (part, name) in parts.iter_mut().skip(i + 1).zip(["{owner}", "{repo}"]) {
            *part = name;
        }
    }
    format!("{method} /{}", parts.join("/"))
}

impl HttpGitHub {
    pub fn new(
        api_url: &str,
        scope: Scope,
        hook: Option<HookConfig>,
        auth: Auth,
        timeout: Duration,
    ) -> Result<Self, GhError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("runnervisor/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| GhError::Transport { method: "-".into(), path: "-".into(), message: e.to_string() })?;
        Ok(HttpGitHub {
            client,
            api: api_url.trim_end_matches('/').to_string(),
            scope,
            hook,
            auth,
            token: Mutex::new(None),
            retry: RetryPolicy::default(),
            rate_remaining: AtomicI64::new(-1),
            blocked_until: std::sync::Mutex::new([None; 2]),
            metrics: None,
        })
    }

    /// How long GitHub's last rate limit still holds back the calls of `bucket`.
    fn blocked_for(&self, bucket: usize) -> Option<Duration> {
        let until = self.blocked_until.lock().unwrap_or_else(|p| p.into_inner())[bucket]?;
        Some(until.checked_duration_since(tokio::time::Instant::now())?).filter(|d| !d.is_zero())
    }

    /// GitHub answered a call of `bucket` a rate limit: nothing it holds is sent for `wait`.
    fn block_for(&self, bucket: usize, headers: &reqwest::header::HeaderMap, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        let mut blocked = self.blocked_until.lock().unwrap_or_else(|p| p.into_inner());
        for (b, held) in blocked.iter_mut().zip(held_buckets(bucket, headers)) {
            if held {
                *b = Some(b.map_or(until, |b| b.max(until)));
            }
        }
    }

    fn bucket(&self, cred: &Cred) -> usize {
        match (&self.auth, cred) {
            (Auth::App { .. }, Cred::Jwt) => APP,
            _ => INSTALLATION,
        }
    }

    /// The error of a call GitHub's rate limit holds back for `wait` more.
    fn held(method: &Method, path: &str, wait: Duration) -> GhError {
        GhError::RateLimited { method: method.to_string(), path: path.into(), wait }
    }

    /// [`Self::held`] for a call not sent at all (`runnervisor_github_api_calls_held`).
    fn held_back(&self, method: &Method, path: &str, wait: Duration) -> GhError {
        if let Some(m) = &self.metrics {
            let endpoint = endpoint_name(method, path.strip_prefix(&self.api).unwrap_or(path));
            m.github_api_calls_held.get_or_create(&crate::metrics::EndpointLabels::new(&endpoint)).inc();
        }
        Self::held(method, path, wait)
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    fn observe(&self, endpoint: &str, status: u16) {
        if let Some(m) = &self.metrics {
            m.github_api_calls.get_or_create(&ApiCallLabels::new(endpoint, status)).inc();
        }
    }

    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    async fn bearer(&self, cred: &Cred) -> Result<Secret, GhError> {
        match (&self.auth, cred) {
            (Auth::Pat(t), _) => Ok(t.clone()),
            (Auth::App { signer, .. }, Cred::Jwt) => Ok(signer.jwt(SystemTime::now())),
            (Auth::App { signer, installation_id }, Cred::Installation) => {
                let mut cached = self.token.lock().await;
                if let Some((t, exp)) = cached.as_ref()
                    && exp.duration_since(SystemTime::now()).unwrap_or_default() > Duration::from_secs(300)
                {
                    return Ok(t.clone());
                }
                let path = format!("app/installations/{installation_id}/access_tokens");
                // The exchange counts in the App's limit: not sent while that holds.
                if let Some(wait) = self.blocked_for(APP) {
                    return Err(self.held_back(&Method::POST, &path, wait));
                }
                let jwt = signer.jwt(SystemTime::now());
                let (status, headers, body) = self.send_once(Method::POST, &path, None, &jwt).await?;
                if let Some(wait) = rate_limit_wait(status, &headers, SystemTime::now()) {
                    self.block_for(APP, &headers, wait);
                    return Err(Self::held(&Method::POST, &path, wait));
                }
                if status != StatusCode::CREATED {
                    return Err(GhError::Auth(format!("{path}: HTTP {status}: {}", message(&body))));
                }
                let token = body["token"].as_str().ok_or_else(|| GhError::Auth("no token in the response".into()))?;
                let expires = body["expires_at"]
                    .as_str()
                    .and_then(|s| humantime::parse_rfc3339(s).ok())
                    .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(3600));
                let token = Secret::new(token);
                *cached = Some((token.clone(), expires));
                tracing::debug!(expires = %humantime::format_rfc3339_seconds(expires), "GitHub App installation token refreshed");
                Ok(token)
            }
        }
    }

    async fn send_once(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        bearer: &Secret,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, Value), GhError> {
        let url = if path.starts_with("http") { path.to_string() } else { format!("{}/{path}", self.api) };
        let mut req = self
            .client
            .request(method.clone(), &url)
            .header("accept", "application/vnd.github+json")
            .header("x-github-api-version", API_VERSION)
            .header("authorization", format!("Bearer {}", bearer.expose()));
        if let Some(b) = body {
            req = req.json(b);
        }
        let endpoint = endpoint_name(&method, url.strip_prefix(&self.api).unwrap_or(path));
        let resp = req.send().await.map_err(|e| {
            self.observe(&endpoint, 0);
            GhError::Transport { method: method.to_string(), path: path.to_string(), message: without_url(&e) }
        })?;
        let status = resp.status();
        self.observe(&endpoint, status.as_u16());
        let headers = resp.headers().clone();
        if let Some(r) =
            headers.get("x-ratelimit-remaining").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i64>().ok())
        {
            self.rate_remaining.store(r, Ordering::Relaxed);
            if let Some(m) = &self.metrics {
                m.github_rate_limit_remaining.set(r);
            }
        }
        let text = resp.text().await.unwrap_or_default();
        let value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        Ok((status, headers, value))
    }

    /// One API call with retries, backoff and rate-limit handling.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        cred: Cred,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, Value), GhError> {
        let mut attempt = 0;
        let mut reauthed = false;
        // Rate-limit waits are bounded too, in number and in total time: a server that
        // answers "retry in 0 s" for ever must not hold the call for ever.
        let mut rate_waits = 0;
        let mut rate_waited = Duration::ZERO;
        let bucket = self.bucket(&cred);
        loop {
            // A rate limit another call was answered holds this one back too (looked at
            // again after the wait: a call answered meanwhile may have made it longer).
            while let Some(wait) = self.blocked_for(bucket) {
                if rate_waited + wait > self.retry.max_wait || rate_waits + 1 >= self.retry.attempts {
                    return Err(self.held_back(&method, path, wait));
                }
                rate_waits += 1;
                rate_waited += wait;
                // Not all at once when it runs out (a burst is a secondary limit's cause).
                tokio::time::sleep(wait + Duration::from_millis(fastrand::u64(0..1000))).await;
            }
            let bearer = self.bearer(&cred).await?;
            let result = self.send_once(method.clone(), path, body, &bearer).await;
            let retry_in = match &result {
                Err(GhError::Transport { .. }) => Some(backoff(&self.retry, attempt)),
                Ok((status, _, _)) if status.is_server_error() => Some(backoff(&self.retry, attempt)),
                Ok((status, headers, _)) => match rate_limit_wait(*status, headers, SystemTime::now()) {
                    Some(wait) if rate_waited + wait > self.retry.max_wait || rate_waits + 1 >= self.retry.attempts => {
                        self.block_for(bucket, headers, wait);
                        tracing::warn!(%method, path, wait_secs = wait.as_secs(), waits = rate_waits, "GitHub rate limit: deferring");
                        return Err(Self::held(&method, path, wait));
                    }
                    Some(wait) => {
                        tracing::warn!(%method, path, wait_ms = wait.as_millis() as u64, "GitHub rate limit: waiting");
                        self.block_for(bucket, headers, wait);
                        rate_waits += 1;
                        rate_waited += wait;
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    None if *status == StatusCode::UNAUTHORIZED
                        && matches!(self.auth, Auth::App { .. })
                        && !reauthed =>
                    {
                        reauthed = true;
                        *self.token.lock().await = None;
                        continue;
                    }
                    None => None,
                },
                Err(_) => None,
            };
            match retry_in {
                Some(delay) if attempt + 1 < self.retry.attempts => {
                    tracing::debug!(%method, path, attempt, delay_ms = delay.as_millis() as u64, "retrying GitHub call");
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                }
                _ => return result,
            }
        }
    }

    /// A call whose success is `ok`; anything else becomes [`GhError::Status`].
    async fn expect(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        ok: &[StatusCode],
    ) -> Result<(reqwest::header::HeaderMap, Value), GhError> {
        let (status, headers, value) = self.call(method.clone(), path, body, Cred::Installation).await?;
        if ok.contains(&status) {
            Ok((headers, value))
        } else {
            Err(GhError::Status {
                method: method.to_string(),
                path: path.into(),
                status: status.as_u16(),
                message: message(&value),
            })
        }
    }

    fn hook_path(&self) -> Option<(String, Cred)> {
        match (&self.hook, &self.scope) {
            (Some(HookConfig::Repository { id }), Scope::Repository { owner, name }) => {
                Some((format!("repos/{owner}/{name}/hooks/{id}/deliveries"), Cred::Installation))
            }
            (Some(HookConfig::Organization { id }), Scope::Organization(o)) => {
                Some((format!("orgs/{o}/hooks/{id}/deliveries"), Cred::Installation))
            }
            (Some(HookConfig::App), _) => Some(("app/hook/deliveries".into(), Cred::Jwt)),
            _ => None,
        }
    }
}

fn message(v: &Value) -> String {
    match v {
        Value::Object(_) => v["message"].as_str().unwrap_or("").to_string(),
        Value::String(s) => s.chars().take(200).collect(),
        _ => String::new(),
    }
}

/// reqwest errors print the URL; ours carry no secrets, but keep messages short.
pub(super) fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() { kind.to_string() } else { format!("{kind}: {detail}") }
}

/// The `rel="next"` URL of a `Link` header.
pub fn next_link(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let link = headers.get("link")?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (url, rel) = part.split_once(';')?;
        rel.contains("rel=\"next\"").then(|| url.trim().trim_start_matches('<').trim_end_matches('>').to_string())
    })
}

fn decode(path: &str) -> impl Fn(responses::ParseError) -> GhError + '_ {
    move |e| GhError::Decode { path: path.into(), message: e.0 }
}

impl GitHub for HttpGitHub {
    async fn generate_jit_config(
        &self,
        name: &str,
        labels: &[String],
        runner_group_id: u64,
    ) -> Result<JitRunner, GhError> {
        let path = format!("{}/actions/runners/generate-jitconfig", self.scope.api_path());
        let body = json!({"name": name, "runner_group_id": runner_group_id, "labels": labels, "work_folder": "_work"});
        let (_, v) = self.expect(Method::POST, &path, Some(&body), &[StatusCode::CREATED]).await?;
        let (runner_id, encoded) = responses::jit_config(v).map_err(decode(&path))?;
        Ok(JitRunner { runner_id, encoded: Secret::new(encoded) })
    }

    async fn registration_token(&self) -> Result<Secret, GhError> {
        let path = format!("{}/actions/runners/registration-token", self.scope.api_path());
        let (_, v) = self.expect(Method::POST, &path, None, &[StatusCode::CREATED]).await?;
        Ok(Secret::new(responses::registration_token(v).map_err(decode(&path))?))
    }

    async fn runner_group_id(&self, name: &str) -> Result<u64, GhError> {
        if matches!(self.scope, Scope::Repository { .. }) {
            return Ok(1);
        }
        let path = format!("{}/actions/runner-groups?per_page=100", self.scope.api_path());
        let (_, v) = self.expect(Method::GET, &path, None, &[StatusCode::OK]).await?;
        responses::runner_group_id(v, name).map_err(decode(&path))?.ok_or_else(|| GhError::Status {
            method: "GET".into(),
            path,
            status: 404,
            message: format!("no runner group named {name:?}"),
        })
    }

    async fn list_runners(&self) -> Result<Vec<RunnerInfo>, GhError> {
        let mut out = Vec::new();
        let mut next = Some(format!("{}/actions/runners?per_page=100", self.scope.api_path()));
        let mut pages = 0;
        while let Some(path) = next.take() {
            let (headers, v) = self.expect(Method::GET, &path, None, &[StatusCode::OK]).await?;
            out.extend(responses::runners(v).map_err(decode(&path))?);
            pages += 1;
            // Follow only links to our own API (never send the token elsewhere).
            next = next_link(&headers).filter(|u| u.starts_with(&self.api) && pages < 1000);
        }
        Ok(out)
    }

    async fn find_runner(&self, name: &str) -> Result<Option<RunnerInfo>, GhError> {
        let mut url = reqwest::Url::parse(&format!("{}/{}/actions/runners", self.api, self.scope.api_path()))
            .map_err(|e| GhError::Decode { path: "runners".into(), message: e.to_string() })?;
        url.query_pairs_mut().append_pair("name", name).append_pair("per_page", "100");
        let (_, v) = self.expect(Method::GET, url.as_str(), None, &[StatusCode::OK]).await?;
        Ok(responses::runners(v).map_err(decode("runners?name="))?.into_iter().find(|r| r.name == name))
    }

    async fn delete_runner(&self, id: u64) -> Result<Deleted, GhError> {
        let path = format!("{}/actions/runners/{id}", self.scope.api_path());
        let (status, _, v) = self.call(Method::DELETE, &path, None, Cred::Installation).await?;
        match status {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(Deleted::Deleted),
            StatusCode::NOT_FOUND => Ok(Deleted::NotFound),
            StatusCode::UNPROCESSABLE_ENTITY => Ok(Deleted::Busy),
            s => Err(GhError::Status { method: "DELETE".into(), path, status: s.as_u16(), message: message(&v) }),
        }
    }

    async fn job_status(&self, repo: &str, job_id: u64) -> Result<Option<JobStatus>, GhError> {
        let path = format!("repos/{repo}/actions/jobs/{job_id}");
        let (status, _, v) = self.call(Method::GET, &path, None, Cred::Installation).await?;
        match status {
            StatusCode::OK => Ok(Some(responses::job_status(v).map_err(decode(&path))?)),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(GhError::Status { method: "GET".into(), path, status: s.as_u16(), message: message(&v) }),
        }
    }

    async fn queued_jobs(&self, repo: &str) -> Result<Vec<JobInfo>, GhError> {
        let path = format!("repos/{repo}/actions/runs?status=queued&per_page=50");
        let (_, v) = self.expect(Method::GET, &path, None, &[StatusCode::OK]).await?;
        let mut out = Vec::new();
        for run_id in responses::run_ids(v).map_err(decode(&path))? {
            let jobs_path = format!("repos/{repo}/actions/runs/{run_id}/jobs?filter=latest&per_page=100");
            let (_, jobs) = self.expect(Method::GET, &jobs_path, None, &[StatusCode::OK]).await?;
            out.extend(responses::queued_jobs_of_run(jobs, repo, run_id).map_err(decode(&jobs_path))?);
        }
        Ok(out)
    }

    async fn list_deliveries(&self, since: SystemTime, max: usize) -> Result<Vec<DeliveryInfo>, GhError> {
        let Some((base, cred)) = self.hook_path() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut next = Some(format!("{base}?per_page=100"));
        while let Some(path) = next.take() {
            let is_jwt = matches!(cred, Cred::Jwt);
            let (status, headers, v) =
                self.call(Method::GET, &path, None, if is_jwt { Cred::Jwt } else { Cred::Installation }).await?;
            if status != StatusCode::OK {
                return Err(GhError::Status {
                    method: "GET".into(),
                    path,
                    status: status.as_u16(),
                    message: message(&v),
                });
            }
            out.extend(responses::deliveries(v).map_err(decode(&path))?);
            // Newest first: a page reaching past `since` is the last one needed.
            if out.len() < max && out.last().is_some_and(|d| d.delivered_at >= since) {
                next = next_link(&headers).filter(|u| u.starts_with(&self.api));
            }
        }
        out.retain(|d| d.delivered_at >= since);
        out.truncate(max);
        Ok(out)
    }

    async fn redeliver(&self, delivery_id: u64) -> Result<(), GhError> {
        let Some((base, cred)) = self.hook_path() else {
            return Ok(());
        };
        let path = format!("{base}/{delivery_id}/attempts");
        let (status, _, v) = self.call(Method::POST, &path, None, cred).await?;
        if status == StatusCode::ACCEPTED || status == StatusCode::OK {
            Ok(())
        } else {
            Err(GhError::Status { method: "POST".into(), path, status: status.as_u16(), message: message(&v) })
        }
    }

    async fn hook_ranges(&self) -> Result<Vec<ipnet::IpNet>, GhError> {
        let (_, v) = self.expect(Method::GET, "meta", None, &[StatusCode::OK]).await?;
        responses::hook_ranges(v).map_err(decode("meta"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let p = RetryPolicy {
            attempts: 5,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            max_wait: Duration::ZERO,
        };
        for (n, lo, hi) in [(0, 50, 100), (1, 100, 200), (3, 400, 800), (10, 500, 1000)] {
            let d = backoff(&p, n).as_millis() as u64;
            assert!((lo..=hi).contains(&d), "attempt {n}: {d}ms not in {lo}..={hi}");
        }
    }

    #[test]
    fn rate_limit_waits() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut h = HeaderMap::new();
        assert_eq!(rate_limit_wait(StatusCode::OK, &h, now), None);
        assert_eq!(rate_limit_wait(StatusCode::FORBIDDEN, &h, now), None, "a plain 403 is a permission problem");
        assert_eq!(rate_limit_wait(StatusCode::TOO_MANY_REQUESTS, &h, now), Some(Duration::from_secs(60)));
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(rate_limit_wait(StatusCode::FORBIDDEN, &h, now), Some(Duration::from_secs(7)));
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
        h.insert("x-ratelimit-reset", HeaderValue::from_static("1030"));
        assert_eq!(rate_limit_wait(StatusCode::FORBIDDEN, &h, now), Some(Duration::from_secs(30)));
        // Counted from GitHub's clock when its `Date` says it (here 20 s ahead of ours, then
        // 50 s behind); an unreadable one is ignored.
        let date = |d: &str| HeaderValue::from_str(d).unwrap();
        h.insert("date", date(&httpdate::fmt_http_date(now + Duration::from_secs(20))));
        assert_eq!(rate_limit_wait(StatusCode::FORBIDDEN, &h, now), Some(Duration::from_secs(10)));
        h.insert("date", date(&httpdate::fmt_http_date(now - Duration::from_secs(50))));
        assert_eq!(rate_limit_wait(StatusCode::FORBIDDEN, &h, now), Some(Duration::from_secs(80)));
        h.insert("date", date("yesterday"));
        assert_eq!(rate_limit_wait(StatusCode::FORBIDDEN, &h, now), Some(Duration::from_secs(30)));
        h.remove("date");
        // A primary limit holds its own bucket back; a secondary one (or a bare 429) both.
        assert_eq!(held_buckets(INSTALLATION, &h), [true, false]);
        assert_eq!(held_buckets(APP, &h), [false, true]);
        assert_eq!(held_buckets(APP, &HeaderMap::new()), [true, true]);
        // Wild values are capped (nor do they overflow a clock).
        h.insert("x-ratelimit-reset", HeaderValue::from_static("99999999999999"));
        assert_eq!(rate_limit_wait(StatusCode::FORBIDDEN, &h, now), Some(MAX_RATE_WAIT));
        h.insert("retry-after", HeaderValue::from_static("18446744073709551615"));
        assert_eq!(rate_limit_wait(StatusCode::TOO_MANY_REQUESTS, &h, now), Some(MAX_RATE_WAIT));
        assert_eq!(held_buckets(APP, &h), [true, true], "retry-after: a secondary limit");
    }

    /// A local API whose `n`-th request (from 0) gets `answer(n)`; when each arrived.
    async fn canned_api(
        answer: impl Fn(usize) -> &'static str + Send + Sync + 'static,
    ) -> (HttpGitHub, Arc<std::sync::Mutex<Vec<std::time::Instant>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let arrived = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (answer, seen_by) = (Arc::new(answer), arrived.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else { return };
                let (answer, seen_by) = (answer.clone(), seen_by.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(n) = conn.read(&mut buf).await else { return };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let n = {
                                let mut a = seen_by.lock().unwrap();
                                a.push(std::time::Instant::now());
                                a.len() - 1
                            };
                            if conn.write_all(answer(n).as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        let gh = HttpGitHub::new(
            &format!("http://{addr}"),
            Scope::Organization("o".into()),
            None,
            Auth::Pat(Secret::new("t")),
            Duration::from_secs(5),
        )
        .unwrap();
        (gh, arrived)
    }

    const NO_RUNNERS: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 30\r\n\r\n{\"total_count\":0,\"runners\":[]}";

    /// A server that answers every call with a short rate limit: the client gives up after
    /// a bounded number of waits instead of looping for ever.
    #[tokio::test]
    async fn endless_short_rate_limits_are_bounded() {
        let (gh, arrived) = canned_api(|_| {
            "HTTP/1.1 429 Too Many Requests\r\nretry-after: 0\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        })
        .await;
        let result = tokio::time::timeout(Duration::from_secs(20), gh.list_runners())
            .await
            .expect("the client must give up on a server that rate-limits for ever");
        assert!(matches!(result, Err(GhError::RateLimited { .. })), "{result:?}");
        let n = arrived.lock().unwrap().len() as u32;
        assert!(n <= RetryPolicy::default().attempts, "{n} calls for one request");
    }

    /// Once GitHub answered a rate limit, no call is sent until it runs out: the next ones
    /// fail at once (the caller tries again later; an hour's limit is longer than a call
    /// waits), then calls go through again.
    #[tokio::test]
    async fn nothing_is_sent_while_github_says_the_rate_limit_holds() {
        let (gh, arrived) = canned_api(|n| match n {
            0 => "HTTP/1.1 429 Too Many Requests\r\nretry-after: 3600\r\ncontent-length: 2\r\n\r\n{}",
            _ => NO_RUNNERS,
        })
        .await;
        let metrics = Arc::new(Metrics::default());
        let gh = gh.with_metrics(metrics.clone());
        let first = gh.list_runners().await;
        let Err(GhError::RateLimited { wait, .. }) = first else { panic!("{first:?}") };
        assert!(wait >= Duration::from_secs(3599), "{wait:?}");
        for _ in 0..3 {
            let again = gh.list_runners().await;
            let Err(GhError::RateLimited { wait: held, .. }) = again else { panic!("{again:?}") };
            assert!(held <= wait, "held for {held:?}, GitHub said {wait:?}");
            assert!(gh.delete_runner(7).await.is_err_and(|e| matches!(e, GhError::RateLimited { .. })));
        }
        assert_eq!(arrived.lock().unwrap().len(), 1, "one request: the rest waited for the limit to run out");
        let m = metrics.render();
        for held in [
            r#"runnervisor_github_api_calls_held_total{endpoint="GET /orgs/o/actions/runners"} 3"#,
            r#"runnervisor_github_api_calls_held_total{endpoint="DELETE /orgs/o/actions/runners/{id}"} 3"#,
        ] {
            assert!(m.contains(held), "{m}");
        }
        // Once it has run out, calls are sent again.
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(3601)).await;
        tokio::time::resume();
        assert_eq!(gh.list_runners().await.unwrap(), Vec::new());
        assert_eq!(arrived.lock().unwrap().len(), 2);
    }

    /// A short limit (within what a call waits) holds another call back until it runs out:
    /// that call waits, then is sent; the call that was answered it is sent again after it.
    #[tokio::test]
    async fn a_call_waits_out_a_short_limit_another_was_answered() {
        let (gh, arrived) = canned_api(|n| match n {
            0 => "HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 2\r\n\r\n{}",
            _ => NO_RUNNERS,
        })
        .await;
        let gh = Arc::new(gh);
        let answered = tokio::spawn({
            let gh = gh.clone();
            async move { gh.list_runners().await }
        });
        while gh.blocked_for(INSTALLATION).is_none() {
            assert!(!answered.is_finished(), "the first call waits out its limit");
            tokio::task::yield_now().await;
        }
        assert_eq!(gh.list_runners().await.unwrap(), Vec::new());
        assert_eq!(answered.await.unwrap().unwrap(), Vec::new());
        let arrived = arrived.lock().unwrap().clone();
        assert_eq!(arrived.len(), 3);
        for later in &arrived[1..] {
            let after = later.duration_since(arrived[0]);
            assert!(after >= Duration::from_millis(990), "a request sent {after:?} after the limit of 1 s");
        }
    }

    #[test]
    fn link_and_endpoint_names() {
        let mut h = HeaderMap::new();
        h.insert(
            "link",
            HeaderValue::from_static("<https://api/x?page=2>; rel=\"next\", <https://api/x?page=5>; rel=\"last\""),
        );
        assert_eq!(next_link(&h).as_deref(), Some("https://api/x?page=2"));
        assert_eq!(
            endpoint_name(&Method::DELETE, "/orgs/o/actions/runners/123"),
            "DELETE /orgs/o/actions/runners/{id}"
        );
        assert_eq!(
            endpoint_name(&Method::GET, "/repos/acme/secret-merger/actions/jobs/7?x=1"),
            "GET /repos/{owner}/{repo}/actions/jobs/{id}"
        );
    }
}

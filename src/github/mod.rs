//! The seam to GitHub's REST API. [`http::HttpGitHub`] is the real client (PAT or
//! GitHub App, retries with backoff and jitter, rate limits honoured); [`fake::FakeGitHub`]
//! is an in-memory one for unit tests. Only this module talks to GitHub.

pub mod app;
pub mod fake;
pub mod http;
pub mod responses;
pub mod scaleset;

use std::future::Future;
use std::time::{Duration, SystemTime};

use crate::model::JobInfo;
use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct JitRunner {
    pub runner_id: u64,
    pub encoded: Secret,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunnerInfo {
    pub id: u64,
    pub name: String,
    pub online: bool,
    pub busy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Deleted,
    NotFound,
    /// GitHub refuses (422) to delete a runner that is running a job.
    Busy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    /// `queued`, `in_progress`, `completed`, `waiting`, ...
    pub status: String,
    pub conclusion: Option<String>,
    pub runner_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryInfo {
    pub id: u64,
    pub guid: String,
    pub delivered_at: SystemTime,
    pub status_code: u16,
    pub redelivery: bool,
    pub event: String,
    pub action: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum GhError {
    #[error("{method} {path}: HTTP {status}: {message}")]
    Status { method: String, path: String, status: u16, message: String },
    /// GitHub's rate limit holds the call back for `wait` more (from when the error was
    /// made: a span, not a time of day, so that a stepped wall clock does not move it).
    #[error("{method} {path}: rate limited for {}s more", whole_secs(*wait))]
    RateLimited { method: String, path: String, wait: Duration },
    #[error("{method} {path}: {message}")]
    Transport { method: String, path: String, message: String },
    #[error("GitHub App authentication: {0}")]
    Auth(String),
    #[error("{path}: unexpected response: {message}")]
    Decode { path: String, message: String },
}

/// `d` in whole seconds, rounded up (a wait under a second is not "0s").
pub fn whole_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl GhError {
    pub fn status(&self) -> Option<u16> {
        match self {
            GhError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What runnervisor needs from GitHub, for the configured scope.
pub trait GitHub: Send + Sync + 'static {
    /// `POST .../actions/runners/generate-jitconfig`.
    fn generate_jit_config(
        &self,
        name: &str,
        labels: &[String],
        runner_group_id: u64,
    ) -> impl Future<Output = Result<JitRunner, GhError>> + Send;
    /// `POST .../actions/runners/registration-token`.
    fn registration_token(&self) -> impl Future<Output = Result<Secret, GhError>> + Send;
    /// The id of the runner group called `name` (1, the default group, at repository scope).
    fn runner_group_id(&self, name: &str) -> impl Future<Output = Result<u64, GhError>> + Send;
    /// Every runner of the scope (all pages).
    fn list_runners(&self) -> impl Future<Output = Result<Vec<RunnerInfo>, GhError>> + Send;
    /// The runner called `name`, if registered (`GET .../actions/runners?name=`).
    fn find_runner(&self, name: &str) -> impl Future<Output = Result<Option<RunnerInfo>, GhError>> + Send;
    /// `DELETE .../actions/runners/{id}`.
    fn delete_runner(&self, id: u64) -> impl Future<Output = Result<Deleted, GhError>> + Send;
    /// `GET /repos/{repo}/actions/jobs/{id}`; `None` when GitHub does not know it.
    fn job_status(&self, repo: &str, job_id: u64) -> impl Future<Output = Result<Option<JobStatus>, GhError>> + Send;
    /// Queued jobs of the repository's recent workflow runs (repository scope only).
    fn queued_jobs(&self, repo: &str) -> impl Future<Output = Result<Vec<JobInfo>, GhError>> + Send;
    /// The hook's deliveries made at or after `since`, newest first, at most `max` (paged
    /// back until one older than `since` or `max` of them).
    fn list_deliveries(
        &self,
        since: SystemTime,
        max: usize,
    ) -> impl Future<Output = Result<Vec<DeliveryInfo>, GhError>> + Send;
    /// `POST .../deliveries/{id}/attempts`.
    fn redeliver(&self, delivery_id: u64) -> impl Future<Output = Result<(), GhError>> + Send;
    /// `GET /meta`: the networks GitHub sends webhooks from (`server.allow_sources = ["github"]`).
    fn hook_ranges(&self) -> impl Future<Output = Result<Vec<ipnet::IpNet>, GhError>> + Send;
}

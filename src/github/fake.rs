//! An in-memory [`GitHub`] for unit tests: runners in a map, failures on demand.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use super::{Deleted, DeliveryInfo, GhError, GitHub, JitRunner, JobStatus, RunnerInfo};
use crate::model::JobInfo;
use crate::secret::Secret;

#[derive(Default)]
pub struct FakeState {
    pub runners: BTreeMap<u64, RunnerInfo>,
    pub next_id: u64,
    /// Fail the next N calls of any kind with a 502.
    pub fail_next: u32,
    /// Fail the next N calls of one kind (`"jit"`, `"list"`, ...) with a 502.
    pub fail_calls: BTreeMap<&'static str, u32>,
    /// Until then every call fails on GitHub's rate limit (not counted in `calls`: the
    /// real client sends none while a limit it was answered holds).
    pub rate_limited_until: Option<tokio::time::Instant>,
    /// When each call was made, in order (as `calls`).
    pub call_times: Vec<tokio::time::Instant>,
    pub jobs: BTreeMap<u64, JobStatus>,
    pub deleted: Vec<String>,
    pub calls: Vec<String>,
    /// What `queued_jobs` finds (jobs whose webhooks never arrived).
    pub queued: Vec<JobInfo>,
    /// What `hook_ranges` answers (`GET /meta`).
    pub hook_ranges: Vec<ipnet::IpNet>,
    /// The hook's delivery log (any order), and the deliveries asked to be redelivered.
    pub deliveries: Vec<DeliveryInfo>,
    pub redelivered: Vec<u64>,
    /// How far back each read of the delivery log asked for.
    pub deliveries_since: Vec<SystemTime>,
}

#[derive(Default)]
pub struct FakeGitHub {
    pub state: Mutex<FakeState>,
}

impl FakeGitHub {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enter(&self, call: &str) -> Result<std::sync::MutexGuard<'_, FakeState>, GhError> {
        let mut s = self.lock();
        let now = tokio::time::Instant::now();
        if let Some(until) = s.rate_limited_until.filter(|u| now < *u) {
            return Err(GhError::RateLimited { method: "X".into(), path: call.into(), wait: until - now });
        }
        s.calls.push(call.to_string());
        s.call_times.push(now);
        let targeted = s.fail_calls.get_mut(call).filter(|n| **n > 0).map(|n| *n -= 1).is_some();
        if targeted || s.fail_next > 0 {
            if !targeted {
                s.fail_next -= 1;
            }
            return Err(GhError::Status {
                method: "X".into(),
                path: call.into(),
                status: 502,
                message: "injected".into(),
            });
        }
        Ok(s)
    }

    /// A runner connects (what the runner in the VM would do).
    pub fn set_runner(&self, name: &str, online: bool, busy: bool) {
        let mut s = self.lock();
        if let Some(r) = s.runners.values_mut().find(|r| r.name == name) {
            r.online = online;
            r.busy = busy;
        }
    }

    /// A runner registers itself (a guest's `config.sh` with a registration token),
    /// offline and idle; its id.
    pub fn add_runner(&self, name: &str) -> u64 {
        let mut s = self.lock();
        s.next_id += 1;
        let id = s.next_id;
        s.runners.insert(id, RunnerInfo { id, name: name.into(), online: false, busy: false });
        id
    }

    /// GitHub knows job `id` as queued (what `job_status` answers).
    pub fn set_job_queued(&self, id: u64) {
        let queued = JobStatus { status: "queued".into(), conclusion: None, runner_name: None };
        self.lock().jobs.insert(id, queued);
    }

    pub fn runner_names(&self) -> Vec<String> {
        self.lock().runners.values().map(|r| r.name.clone()).collect()
    }
}

/// A JIT config in GitHub's form (base64 of a JSON map of runner files to base64), for
/// runner `id` called `name`.
pub fn encoded_jit_config(id: u64, name: &str) -> String {
    use base64::Engine;
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    let files = serde_json::json!({
        ".runner": b64(serde_json::json!({"agentId": id, "agentName": name, "ephemeral": true}).to_string()),
        ".credentials": b64(serde_json::json!({"scheme": "OAuth", "data": {"token": format!("jit-{name}")}}).to_string()),
    });
    b64(files.to_string())
}

impl GitHub for FakeGitHub {
    async fn generate_jit_config(&self, name: &str, _labels: &[String], _group: u64) -> Result<JitRunner, GhError> {
        let mut s = self.enter("jit")?;
        if s.runners.values().any(|r| r.name == name) {
            return Err(GhError::Status {
                method: "POST".into(),
                path: "jit".into(),
                status: 409,
                message: "exists".into(),
            });
        }
        s.next_id += 1;
        let id = s.next_id;
        s.runners.insert(id, RunnerInfo { id, name: name.into(), online: false, busy: false });
        Ok(JitRunner { runner_id: id, encoded: Secret::new(encoded_jit_config(id, name)) })
    }

    async fn registration_token(&self) -> Result<Secret, GhError> {
        drop(self.enter("token")?);
        Ok(Secret::new("REGTOKEN"))
    }

    async fn runner_group_id(&self, _name: &str) -> Result<u64, GhError> {
        drop(self.enter("group")?);
        Ok(1)
    }

    async fn list_runners(&self) -> Result<Vec<RunnerInfo>, GhError> {
        Ok(self.enter("list")?.runners.values().cloned().collect())
    }

    async fn find_runner(&self, name: &str) -> Result<Option<RunnerInfo>, GhError> {
        Ok(self.enter("find")?.runners.values().find(|r| r.name == name).cloned())
    }

    async fn delete_runner(&self, id: u64) -> Result<Deleted, GhError> {
        let mut s = self.enter("delete")?;
        match s.runners.get(&id).cloned() {
            None => Ok(Deleted::NotFound),
            Some(r) if r.busy => Ok(Deleted::Busy),
            Some(r) => {
                s.runners.remove(&id);
                s.deleted.push(r.name);
                Ok(Deleted::Deleted)
            }
        }
    }

    async fn job_status(&self, _repo: &str, job_id: u64) -> Result<Option<JobStatus>, GhError> {
        let s = self.enter("job")?;
        // A job it lists as queued, it knows as queued.
        let queued = s.queued.iter().any(|j| j.id == job_id).then(|| JobStatus {
            status: "queued".into(),
            conclusion: None,
            runner_name: None,
        });
        Ok(s.jobs.get(&job_id).cloned().or(queued))
    }

    async fn queued_jobs(&self, _repo: &str) -> Result<Vec<JobInfo>, GhError> {
        Ok(self.enter("queued")?.queued.clone())
    }

    async fn list_deliveries(&self, since: SystemTime, max: usize) -> Result<Vec<DeliveryInfo>, GhError> {
        let mut s = self.enter("deliveries")?;
        s.deliveries_since.push(since);
        let mut out: Vec<_> = s.deliveries.iter().filter(|d| d.delivered_at >= since).cloned().collect();
        out.sort_by_key(|d| std::cmp::Reverse(d.delivered_at));
        out.truncate(max);
        Ok(out)
    }

    async fn redeliver(&self, id: u64) -> Result<(), GhError> {
        self.enter("redeliver")?.redelivered.push(id);
        Ok(())
    }

    async fn hook_ranges(&self) -> Result<Vec<ipnet::IpNet>, GhError> {
        Ok(self.enter("meta")?.hook_ranges.clone())
    }
}

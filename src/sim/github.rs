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
}

/// One delivery of the hook (a redelivery is a delivery of its own, with the same guid).
#[derive(Debug, Clone)]
pub struct Hook {
    pub id: u64,
    pub guid: String,
    pub action: String,
    pub body: String,
    pub redelivery: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 502 from the API.
    ServerError,
    /// No answer: the client's timeout passes.
    Timeout,
    /// 403 with the rate limit spent, for a while.
    RateLimit,
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
        }
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
    pub fn emit(&mut self, id: u64, action: &str, delay: Duration) {
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
        let hook = Hook { id: self.next_delivery, guid, action: action.into(), body, redelivery: false };
        self.outbox.push((self.time.now() + delay, hook));
    }

    /// Notes that the agent answered a post of this delivery (`code`), whatever GitHub's log
    /// says of it (a delivery lost after the agent took it is logged as failed).
    pub fn answered(&mut self, hook: &Hook, code: u16) {
        let job = hook.guid.strip_prefix('g').and_then(|g| g.split('-').next()?.parse().ok());
        if let Some(job) = job.filter(|_| (200..300).contains(&code)) {
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

    /// Whether a call fails, and how (drawn before the call's effect).
    fn fault(&mut self, path: &str) -> Result<(), (GhError, Duration)> {
        let now = self.time.now();
        if let Some(until) = self.rate_limited_until {
            // Not a call GitHub counts: the agent's HTTP client sends none while the limit
            // it was answered holds (`github::http`), and fails it at once.
            if now < until {
                let until = self.time.wall() + (until - now);
                return Err((GhError::RateLimited { method: "X".into(), path: path.into(), until }, Duration::ZERO));
            }
            self.rate_limited_until = None;
        }
        self.calls += 1;
        *self.calls_by.entry(path.to_string()).or_default() += 1;
        let Some((kind, left)) = self.fault.as_mut() else { return Ok(()) };
        *left -= 1;
        let kind = *kind;
        if *left == 0 {
            self.fault = None;
        }
        Err(match kind {
            Fault::ServerError => (
                GhError::Status { method: "X".into(), path: path.into(), status: 502, message: "injected".into() },
                Duration::ZERO,
            ),
            Fault::Timeout => (
                GhError::Transport { method: "X".into(), path: path.into(), message: "timed out".into() },
                self.api_timeout,
            ),
            Fault::RateLimit => {
                self.rate_limited_until = Some(now + Duration::from_secs(120));
                let until = self.time.wall() + Duration::from_secs(120);
                (GhError::RateLimited { method: "X".into(), path: path.into(), until }, Duration::ZERO)
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
        if self.disk.dead() {
            std::future::pending::<()>().await;
        }
        let fault = self.lock().fault(path);
        match fault {
            Ok(()) => Ok(self.lock()),
            Err((e, delay)) => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Err(e)
            }
        }
    }
}

impl GitHub for SimGitHub {
    async fn generate_jit_config(&self, name: &str, labels: &[String], _group: u64) -> Result<JitRunner, GhError> {
        let mut hub = self.enter("jit").await?;
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
            Runner { id, name: name.into(), labels: label_set(labels), online: false, job: None, by_token: false },
        );
        Ok(JitRunner { runner_id: id, encoded: Secret::new(crate::github::fake::encoded_jit_config(id, name)) })
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
        let mut hub = self.enter("delete runner").await?;
        match hub.runners.get(&id) {
            None => Ok(Deleted::NotFound),
            Some(r) if r.job.is_some() => Ok(Deleted::Busy),
            Some(_) => {
                hub.runners.remove(&id);
                Ok(Deleted::Deleted)
            }
        }
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
        let mut hub = self.enter("redeliver").await?;
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
        let hook =
            Hook { id: hub.next_delivery, guid: d.guid, action: d.action.unwrap_or_default(), body, redelivery: true };
        let due = hub.time.now() + Duration::from_millis(500);
        hub.outbox.push((due, hook));
        Ok(())
    }

    async fn hook_ranges(&self) -> Result<Vec<ipnet::IpNet>, GhError> {
        drop(self.enter("meta").await?);
        Ok(Vec::new())
    }
}

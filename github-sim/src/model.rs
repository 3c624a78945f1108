//! The simulated world: jobs, runners, tokens, webhook deliveries. Pure data and rules,
//! no I/O; the HTTP layers lock [`World`] briefly and call into it.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};

/// Ids GitHub hands out are 64-bit; start above `u32::MAX` so a client that truncates fails.
const FIRST_JOB_ID: u64 = 30_000_000_001;
const FIRST_RUN_ID: u64 = 20_000_000_001;
const FIRST_RUNNER_ID: u64 = 5_000_000_001;
const FIRST_DELIVERY_ID: u64 = 90_000_000_001;

/// A runner is "online" while it polled within this window (GitHub uses about a minute).
pub const ONLINE_WINDOW: Duration = Duration::from_secs(45);

/// Where a runner or a token belongs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Repo(String), // "owner/name"
    Org(String),
    Enterprise(String),
}

impl Scope {
    /// Whether a runner registered at `self` may run a job of `repo` ("owner/name").
    pub fn covers_repo(&self, repo: &str) -> bool {
        match self {
            Scope::Repo(r) => r.eq_ignore_ascii_case(repo),
            Scope::Org(o) => repo.split_once('/').is_some_and(|(owner, _)| owner.eq_ignore_ascii_case(o)),
            Scope::Enterprise(_) => true,
        }
    }

    /// The web URL a runner is configured with (`config.sh --url`).
    pub fn web_path(&self) -> String {
        match self {
            Scope::Repo(r) => r.clone(),
            Scope::Org(o) => o.clone(),
            Scope::Enterprise(e) => format!("enterprises/{e}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    InProgress,
    Completed,
}

/// What the fake runner does with a job; set by the test that queues it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct JobBehaviour {
    #[serde(default)]
    pub duration_secs: f64,
    /// Shell script the runner executes instead of sleeping; exit status decides the conclusion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// Conclusion the runner reports (default success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conclusion: Option<String>,
    /// The runner completes the job, then hangs instead of exiting (a "ghost runner").
    #[serde(default)]
    pub runner_hangs_after: bool,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: u64,
    pub run_id: u64,
    pub run_attempt: u32,
    pub repo: String,
    pub name: String,
    pub workflow_name: String,
    pub head_branch: String,
    pub labels: Vec<String>,
    pub status: JobStatus,
    pub conclusion: Option<String>,
    pub runner: Option<RunnerRef>,
    pub created_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub completed_at: Option<SystemTime>,
    pub behaviour: JobBehaviour,
    /// The runner scale set it is offered to (`None`: to runners registered the classic way).
    pub routed: Option<crate::scaleset::Routed>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerRef {
    pub id: u64,
    pub name: String,
    pub group_id: u64,
    pub group_name: String,
}

#[derive(Debug, Clone)]
pub struct Runner {
    pub id: u64,
    pub name: String,
    pub scope: Scope,
    pub labels: Vec<String>,
    pub group_id: u64,
    pub ephemeral: bool,
    pub jit: bool,
    /// Bearer credential the runner uses on the runner protocol.
    pub credential: String,
    pub last_seen: Option<SystemTime>,
    /// Long-polls currently open (a runner waiting in a poll is online).
    pub polling: u32,
    pub job: Option<u64>,
    pub jobs_run: u32,
    pub created_at: SystemTime,
    /// Hit by a `runner_stall` fault: none of its requests is ever answered.
    pub stalled: bool,
    /// The scale set whose JIT config made it: it takes that set's jobs only.
    pub scale_set: Option<u64>,
}

impl Runner {
    pub fn online(&self, now: SystemTime) -> bool {
        self.polling > 0
            || self.job.is_some()
            || self.last_seen.is_some_and(|t| now.duration_since(t).unwrap_or_default() < ONLINE_WINDOW)
    }

    /// GitHub's REST shape of a runner.
    pub fn to_json(&self, now: SystemTime) -> Value {
        let labels: Vec<Value> = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let default = ["self-hosted", "linux", "x64"].contains(&l.to_ascii_lowercase().as_str());
                json!({"id": i as u64 + 1, "name": l, "type": if default { "read-only" } else { "custom" }})
            })
            .collect();
        json!({
            "id": self.id,
            "name": self.name,
            "os": "Linux",
            "status": if self.online(now) { "online" } else { "offline" },
            "busy": self.job.is_some(),
            "ephemeral": self.ephemeral,
            "runner_group_id": self.group_id,
            "labels": labels,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunnerGroup {
    pub id: u64,
    pub name: String,
    pub default: bool,
}

/// One attempt to deliver a webhook, as GitHub's delivery API shows it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: u64,
    pub guid: String,
    pub event: String,
    pub action: Option<String>,
    pub redelivery: bool,
    pub delivered_at: SystemTime,
    pub duration: f64,
    /// "OK", "Invalid HTTP Response: 401", "timed out", ...
    pub status: String,
    /// 0 when there was no HTTP response.
    pub status_code: u16,
    pub repository_id: Option<u64>,
    pub installation_id: Option<u64>,
    pub request_headers: BTreeMap<String, String>,
    pub payload: Value,
    pub response_body: String,
}

impl Delivery {
    pub fn summary_json(&self) -> Value {
        json!({
            "id": self.id,
            "guid": self.guid,
            "delivered_at": crate::time::rfc3339(self.delivered_at),
            "redelivery": self.redelivery,
            "duration": self.duration,
            "status": self.status,
            "status_code": self.status_code,
            "event": self.event,
            "action": self.action,
            "installation_id": self.installation_id,
            "repository_id": self.repository_id,
            "throttled_at": null,
        })
    }

    pub fn full_json(&self) -> Value {
        let mut v = self.summary_json();
        v["url"] = json!("");
        v["request"] = json!({"headers": self.request_headers, "payload": self.payload});
        v["response"] = json!({"headers": {}, "payload": self.response_body});
        v
    }
}

#[derive(Debug)]
pub struct RegistrationToken {
    pub scope: Scope,
    pub expires_at: SystemTime,
}

/// Everything the simulator knows. Locked briefly by each request.
#[derive(Debug)]
pub struct World {
    pub jobs: BTreeMap<u64, Job>,
    pub runners: BTreeMap<u64, Runner>,
    pub groups: Vec<RunnerGroup>,
    pub registration_tokens: HashMap<String, RegistrationToken>,
    /// Session tokens issued by `actions/runner-registration`, valid for registering once.
    pub registration_sessions: HashMap<String, Scope>,
    pub deliveries: Vec<Delivery>,
    next_job: u64,
    next_run: u64,
    next_runner: u64,
    next_delivery: u64,
    /// Every runner name that ever registered, with how many jobs it ran (for tests).
    pub runner_history: BTreeMap<String, RunnerHistory>,
    /// What every runner's credential begins with (`SimConfig::runner_credential_prefix`).
    pub runner_credential_prefix: String,
    /// Reports posted to `/_sim/reports` by jobs' scripts.
    pub reports: Vec<Value>,
    /// Runner scale sets by id (see [`crate::scaleset`]).
    pub scale_sets: BTreeMap<u64, crate::scaleset::ScaleSet>,
    pub(crate) next_scale_set: u64,
    pub(crate) next_request: u64,
    pub(crate) next_message: u64,
    /// Tokens of the Actions service (the registration exchange's): their scope and expiry.
    pub admin_tokens: HashMap<String, (Scope, SystemTime)>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RunnerHistory {
    pub id: u64,
    /// Where it registered (`enterprises/octo-ent`, `octo-org`, `octo-org/app`).
    pub scope: String,
    pub registered: bool,
    pub came_online: bool,
    pub registered_unix_ms: u64,
    pub online_unix_ms: Option<u64>,
    pub jobs: Vec<u64>,
    pub deleted_by_api: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorldError {
    #[error("Already exists - A runner with the name {0} already exists.")]
    RunnerNameTaken(String),
    #[error("Bad request - Runner \"{0}\" is still running a job\"")]
    RunnerBusy(String),
    #[error("Not Found")]
    NotFound,
    #[error("{0}")]
    Invalid(String),
}

pub struct NewJob {
    pub repo: String,
    pub labels: Vec<String>,
    pub name: Option<String>,
    pub workflow_name: Option<String>,
    pub run_id: Option<u64>,
    pub behaviour: JobBehaviour,
}

pub struct NewRunner {
    pub name: String,
    pub scope: Scope,
    pub labels: Vec<String>,
    pub group_id: u64,
    pub ephemeral: bool,
    pub jit: bool,
    pub replace: bool,
    pub scale_set: Option<u64>,
}

impl Default for World {
    fn default() -> Self {
        World {
            jobs: BTreeMap::new(),
            runners: BTreeMap::new(),
            groups: vec![
                RunnerGroup { id: 1, name: "Default".into(), default: true },
                RunnerGroup { id: 2, name: "ci-vms".into(), default: false },
            ],
            registration_tokens: HashMap::new(),
            registration_sessions: HashMap::new(),
            deliveries: Vec::new(),
            next_job: FIRST_JOB_ID,
            next_run: FIRST_RUN_ID,
            next_runner: FIRST_RUNNER_ID,
            next_delivery: FIRST_DELIVERY_ID,
            runner_history: BTreeMap::new(),
            runner_credential_prefix: "rc_".into(),
            reports: Vec::new(),
            scale_sets: BTreeMap::new(),
            next_scale_set: 0,
            next_request: 7_000_000_000,
            next_message: 0,
            admin_tokens: HashMap::new(),
        }
    }
}

/// A conclusion as the Actions service's messages spell it.
fn result_of(conclusion: &str) -> &str {
    match conclusion {
        "success" => "succeeded",
        "failure" => "failed",
        "cancelled" => "canceled",
        other => other,
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Labels match as on GitHub: every job label must be among the runner's, case-insensitively.
pub fn labels_cover(runner_labels: &[String], job_labels: &[String]) -> bool {
    job_labels.iter().all(|j| runner_labels.iter().any(|r| r.eq_ignore_ascii_case(j)))
}

/// A random-looking token with GitHub's prefixes (`ghs_`, registration tokens are 29 upper-case chars).
pub fn token(prefix: &str, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyz";
    let body: String = (0..len).map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char).collect();
    format!("{prefix}{body}")
}

pub fn guid() -> String {
    let b: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

impl World {
    pub fn group(&self, id: u64) -> Option<&RunnerGroup> {
        self.groups.iter().find(|g| g.id == id)
    }

    pub fn add_job(&mut self, new: NewJob, now: SystemTime) -> u64 {
        let id = self.next_job;
        self.next_job += 1;
        let run_id = new.run_id.unwrap_or_else(|| {
            let r = self.next_run;
            self.next_run += 1;
            r
        });
        self.jobs.insert(
            id,
            Job {
                id,
                run_id,
                run_attempt: 1,
                name: new.name.unwrap_or_else(|| format!("build-{id}")),
                workflow_name: new.workflow_name.unwrap_or_else(|| "CI".into()),
                head_branch: "main".into(),
                repo: new.repo,
                labels: new.labels,
                status: JobStatus::Queued,
                conclusion: None,
                runner: None,
                created_at: now,
                started_at: None,
                completed_at: None,
                behaviour: new.behaviour,
                routed: None,
            },
        );
        self.route(id, now);
        id
    }

    pub fn add_runner(&mut self, new: NewRunner, now: SystemTime) -> Result<u64, WorldError> {
        if self.group(new.group_id).is_none() {
            return Err(WorldError::Invalid(format!("Runner group {} does not exist", new.group_id)));
        }
        if let Some(existing) =
            self.runners.values().find(|r| r.scope == new.scope && r.name.eq_ignore_ascii_case(&new.name)).map(|r| r.id)
        {
            if !new.replace {
                return Err(WorldError::RunnerNameTaken(new.name));
            }
            self.runners.remove(&existing);
        }
        let id = self.next_runner;
        self.next_runner += 1;
        self.runners.insert(
            id,
            Runner {
                id,
                name: new.name.clone(),
                scope: new.scope,
                labels: new.labels,
                group_id: new.group_id,
                ephemeral: new.ephemeral,
                jit: new.jit,
                credential: token(&self.runner_credential_prefix, 40),
                last_seen: None,
                polling: 0,
                job: None,
                jobs_run: 0,
                created_at: now,
                stalled: false,
                scale_set: new.scale_set,
            },
        );
        let scope = self.runners[&id].scope.web_path();
        self.runner_history.insert(new.name, RunnerHistory { id, scope, registered: true, ..Default::default() });
        Ok(id)
    }

    pub fn runner_by_credential(&self, credential: &str) -> Option<u64> {
        self.runners.values().find(|r| r.credential == credential).map(|r| r.id)
    }

    /// DELETE .../runners/{id}: refused while the runner runs a job, as on GitHub.
    pub fn delete_runner(&mut self, scope: &Scope, id: u64) -> Result<(), WorldError> {
        let runner = self.runners.get(&id).filter(|r| &r.scope == scope).ok_or(WorldError::NotFound)?;
        if runner.job.is_some() {
            return Err(WorldError::RunnerBusy(runner.name.clone()));
        }
        let name = runner.name.clone();
        self.runners.remove(&id);
        if let Some(h) = self.runner_history.get_mut(&name) {
            h.deleted_by_api = true;
        }
        Ok(())
    }

    /// A runner polls: if it is idle, hand it the oldest queued job it may run.
    /// Returns the job it now runs, if any.
    pub fn assign(&mut self, runner_id: u64, now: SystemTime) -> Option<u64> {
        let runner = self.runners.get_mut(&runner_id)?;
        runner.last_seen = Some(now);
        if let Some(h) = self.runner_history.get_mut(&runner.name) {
            h.came_online = true;
            h.online_unix_ms.get_or_insert(unix_ms(now));
        }
        if let Some(job) = runner.job {
            return Some(job);
        }
        // A scale set's runner takes the jobs assigned to its set; any other runner, jobs
        // no scale set was offered.
        let set = runner.scale_set;
        let job =
            self.jobs.values_mut().filter(|j| j.status == JobStatus::Queued).find(|j| match (set, &j.routed) {
                (Some(set), Some(r)) => r.scale_set == set && r.acquired_at.is_some(),
                (None, None) => runner.scope.covers_repo(&j.repo) && labels_cover(&runner.labels, &j.labels),
                _ => false,
            })?;
        let group = self.groups.iter().find(|g| g.id == runner.group_id).map(|g| g.name.clone()).unwrap_or_default();
        job.status = JobStatus::InProgress;
        job.started_at = Some(now);
        job.runner =
            Some(RunnerRef { id: runner.id, name: runner.name.clone(), group_id: runner.group_id, group_name: group });
        runner.job = Some(job.id);
        let id = job.id;
        if let Some(h) = self.runner_history.get_mut(&runner.name) {
            h.jobs.push(id);
        }
        self.post_message(id, "JobStarted", None, now);
        Some(id)
    }

    /// The runner reports its job done. Ephemeral runners are removed, as GitHub does.
    pub fn complete(
        &mut self,
        runner_id: u64,
        job_id: u64,
        conclusion: &str,
        now: SystemTime,
    ) -> Result<(), WorldError> {
        let runner = self.runners.get_mut(&runner_id).ok_or(WorldError::NotFound)?;
        if runner.job != Some(job_id) {
            return Err(WorldError::NotFound);
        }
        runner.job = None;
        runner.jobs_run += 1;
        let ephemeral = runner.ephemeral;
        if let Some(job) = self.jobs.get_mut(&job_id)
            && job.status != JobStatus::Completed
        {
            job.status = JobStatus::Completed;
            job.conclusion = Some(conclusion.to_string());
            job.completed_at = Some(now);
            self.post_message(job_id, "JobCompleted", Some(result_of(conclusion)), now);
        }
        if ephemeral {
            self.runners.remove(&runner_id);
        }
        Ok(())
    }

    /// Cancels a job. A queued job completes as cancelled with no runner; a running job
    /// completes as cancelled and its runner learns it on the next heartbeat.
    pub fn cancel(&mut self, job_id: u64, now: SystemTime) -> Result<(), WorldError> {
        let job = self.jobs.get_mut(&job_id).ok_or(WorldError::NotFound)?;
        if job.status == JobStatus::Completed {
            return Err(WorldError::Invalid("Cannot cancel a completed job".into()));
        }
        job.status = JobStatus::Completed;
        job.conclusion = Some("cancelled".into());
        job.completed_at = Some(now);
        self.post_message(job_id, "JobCompleted", Some("canceled"), now);
        Ok(())
    }

    /// The runner's machine died (a host crash): as GitHub does once it stops hearing from
    /// a runner, its job (if any) fails and the runner is no longer busy; it stays
    /// registered, offline, until deleted. Returns the job that failed (none: it had none,
    /// or its job was over).
    pub fn runner_lost(&mut self, runner_id: u64, now: SystemTime) -> Result<Option<u64>, WorldError> {
        let runner = self.runners.get_mut(&runner_id).ok_or(WorldError::NotFound)?;
        runner.last_seen = None;
        runner.polling = 0;
        let Some(job) = runner.job.take().and_then(|id| self.jobs.get_mut(&id)) else { return Ok(None) };
        if job.status == JobStatus::Completed {
            return Ok(None);
        }
        job.status = JobStatus::Completed;
        job.conclusion = Some("failure".into());
        job.completed_at = Some(now);
        let id = job.id;
        self.post_message(id, "JobCompleted", Some("failed"), now);
        Ok(Some(id))
    }

    /// A heartbeat of a running job; `false` when the job was cancelled meanwhile.
    /// A cancelled job frees its runner (which then exits; ephemeral ones are removed).
    pub fn heartbeat(&mut self, runner_id: u64, job_id: u64, now: SystemTime) -> Result<bool, WorldError> {
        let runner = self.runners.get_mut(&runner_id).ok_or(WorldError::NotFound)?;
        runner.last_seen = Some(now);
        let cancelled = self.jobs.get(&job_id).is_none_or(|j| j.status == JobStatus::Completed);
        if cancelled && runner.job == Some(job_id) {
            runner.job = None;
            if runner.ephemeral {
                self.runners.remove(&runner_id);
            }
        }
        Ok(!cancelled)
    }

    pub fn next_delivery_id(&mut self) -> u64 {
        let id = self.next_delivery;
        self.next_delivery += 1;
        id
    }

    /// Runners visible at a scope, for the list API.
    pub fn runners_at(&self, scope: &Scope) -> Vec<&Runner> {
        self.runners.values().filter(|r| &r.scope == scope).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world_with_job(labels: &[&str]) -> (World, u64) {
        let mut w = World::default();
        let id = w.add_job(
            NewJob {
                repo: "octo-org/app".into(),
                labels: labels.iter().map(|s| s.to_string()).collect(),
                name: None,
                workflow_name: None,
                run_id: None,
                behaviour: JobBehaviour::default(),
            },
            SystemTime::now(),
        );
        (w, id)
    }

    fn runner(w: &mut World, name: &str, scope: Scope, labels: &[&str], ephemeral: bool) -> u64 {
        w.add_runner(
            NewRunner {
                name: name.into(),
                scope,
                labels: labels.iter().map(|s| s.to_string()).collect(),
                group_id: 1,
                ephemeral,
                jit: true,
                replace: false,
                scale_set: None,
            },
            SystemTime::now(),
        )
        .unwrap()
    }

    #[test]
    fn ids_do_not_fit_u32() {
        let (_, id) = world_with_job(&["self-hosted"]);
        assert!(id > u64::from(u32::MAX));
    }

    #[test]
    fn labels_match_as_superset_case_insensitively() {
        let r = vec!["self-hosted".to_string(), "Linux".into(), "big".into()];
        assert!(labels_cover(&r, &["self-hosted".into(), "linux".into()]));
        assert!(labels_cover(&r, &[]));
        assert!(!labels_cover(&r, &["gpu".into()]));
    }

    #[test]
    fn any_idle_covering_runner_takes_the_oldest_job() {
        let (mut w, first) = world_with_job(&["self-hosted", "linux"]);
        let now = SystemTime::now();
        let a = runner(&mut w, "a", Scope::Org("octo-org".into()), &["self-hosted", "linux"], true);
        let wrong = runner(&mut w, "w", Scope::Org("other".into()), &["self-hosted", "linux"], true);
        assert_eq!(w.assign(wrong, now), None, "other org's runner may not take it");
        assert_eq!(w.assign(a, now), Some(first));
        assert_eq!(w.jobs[&first].status, JobStatus::InProgress);
        assert_eq!(w.jobs[&first].runner.as_ref().unwrap().name, "a");
        // Busy runners cannot be deleted; ephemeral runners vanish after their job.
        let scope = Scope::Org("octo-org".into());
        assert_eq!(w.delete_runner(&scope, a), Err(WorldError::RunnerBusy("a".into())));
        w.complete(a, first, "success", now).unwrap();
        assert!(!w.runners.contains_key(&a));
        assert_eq!(w.jobs[&first].conclusion.as_deref(), Some("success"));
    }

    #[test]
    fn runner_names_are_unique_per_scope_unless_replaced() {
        let mut w = World::default();
        let scope = Scope::Repo("octo-org/app".into());
        runner(&mut w, "x", scope.clone(), &["self-hosted"], true);
        let err = w
            .add_runner(
                NewRunner {
                    name: "X".into(),
                    scope: scope.clone(),
                    labels: vec![],
                    group_id: 1,
                    ephemeral: true,
                    jit: false,
                    replace: false,
                    scale_set: None,
                },
                SystemTime::now(),
            )
            .unwrap_err();
        assert!(matches!(err, WorldError::RunnerNameTaken(_)));
        let replaced = w
            .add_runner(
                NewRunner {
                    name: "x".into(),
                    scope,
                    labels: vec![],
                    group_id: 1,
                    ephemeral: true,
                    jit: false,
                    replace: true,
                    scale_set: None,
                },
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!(w.runners.len(), 1);
        assert!(w.runners.contains_key(&replaced));
    }

    #[test]
    fn a_lost_runners_job_fails_and_the_runner_may_be_deleted() {
        let (mut w, job) = world_with_job(&["self-hosted"]);
        let now = SystemTime::now();
        let scope = Scope::Repo("octo-org/app".into());
        let r = runner(&mut w, "r", scope.clone(), &["self-hosted"], true);
        w.assign(r, now);
        assert!(w.delete_runner(&scope, r).is_err(), "busy");
        assert_eq!(w.runner_lost(r, now), Ok(Some(job)));
        assert_eq!((w.jobs[&job].status, w.jobs[&job].conclusion.as_deref()), (JobStatus::Completed, Some("failure")));
        assert!(!w.runners[&r].online(now));
        assert_eq!(w.delete_runner(&scope, r), Ok(()));
    }

    #[test]
    fn cancelling_a_running_job_stops_its_runner_on_heartbeat() {
        let (mut w, job) = world_with_job(&["self-hosted"]);
        let now = SystemTime::now();
        let r = runner(&mut w, "r", Scope::Repo("octo-org/app".into()), &["self-hosted"], true);
        w.assign(r, now);
        assert_eq!(w.heartbeat(r, job, now), Ok(true));
        w.cancel(job, now).unwrap();
        assert_eq!(w.heartbeat(r, job, now), Ok(false));
        assert!(!w.runners.contains_key(&r));
        assert!(w.cancel(job, now).is_err(), "completed jobs cannot be cancelled");
    }

    #[test]
    fn scopes_cover_repos() {
        assert!(Scope::Repo("o/r".into()).covers_repo("O/R"));
        assert!(!Scope::Repo("o/r".into()).covers_repo("o/s"));
        assert!(Scope::Org("o".into()).covers_repo("o/anything"));
        assert!(!Scope::Org("o".into()).covers_repo("other/r"));
        assert!(Scope::Enterprise("e".into()).covers_repo("x/y"));
    }
}

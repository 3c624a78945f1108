//! GitHub's REST responses, parsed into typed structs: a field we rely on that is missing
//! or of the wrong type is an error naming it, never a silent default. Pure functions of
//! the response body, so they are unit-tested and fuzzed without a network.

use std::time::SystemTime;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{DeliveryInfo, JobStatus, RunnerInfo};
use crate::model::JobInfo;

/// What was wrong with a response body (the caller adds the path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn typed<T: DeserializeOwned>(v: Value) -> Result<T, ParseError> {
    serde_json::from_value(v).map_err(|e| ParseError(e.to_string()))
}

#[derive(Deserialize)]
struct IdOnly {
    id: u64,
}

#[derive(Deserialize)]
struct JitConfig {
    runner: IdOnly,
    encoded_jit_config: String,
}

/// `POST .../generate-jitconfig` (201): the runner id and the encoded config.
pub fn jit_config(v: Value) -> Result<(u64, String), ParseError> {
    let c: JitConfig = typed(v)?;
    Ok((c.runner.id, c.encoded_jit_config))
}

#[derive(Deserialize)]
struct Token {
    token: String,
}

/// `POST .../registration-token` (201).
pub fn registration_token(v: Value) -> Result<String, ParseError> {
    Ok(typed::<Token>(v)?.token)
}

#[derive(Deserialize)]
struct Meta {
    hooks: Vec<String>,
}

/// `GET /meta` (200): the networks GitHub sends webhooks from (`hooks`). GitHub Enterprise
/// Server publishes none: that is an error naming the field.
pub fn hook_ranges(v: Value) -> Result<Vec<ipnet::IpNet>, ParseError> {
    let m: Meta = typed(v)?;
    m.hooks.iter().map(|h| h.parse().map_err(|_| ParseError(format!("hooks: {h:?} is not a CIDR")))).collect()
}

#[derive(Deserialize)]
struct Group {
    id: u64,
    name: String,
}

#[derive(Deserialize)]
struct Groups {
    runner_groups: Vec<Group>,
}

/// `GET .../runner-groups`: the id of the group named `name` (case-insensitively).
pub fn runner_group_id(v: Value, name: &str) -> Result<Option<u64>, ParseError> {
    let g: Groups = typed(v)?;
    Ok(g.runner_groups.into_iter().find(|g| g.name.eq_ignore_ascii_case(name)).map(|g| g.id))
}

#[derive(Deserialize)]
struct Runner {
    id: u64,
    name: String,
    status: String,
    busy: bool,
}

#[derive(Deserialize)]
struct Runners {
    runners: Vec<Runner>,
}

/// `GET .../actions/runners` (one page).
pub fn runners(v: Value) -> Result<Vec<RunnerInfo>, ParseError> {
    let r: Runners = typed(v)?;
    Ok(r.runners
        .into_iter()
        .map(|r| RunnerInfo { id: r.id, name: r.name, online: r.status == "online", busy: r.busy })
        .collect())
}

#[derive(Deserialize)]
struct Job {
    status: String,
    conclusion: Option<String>,
    runner_name: Option<String>,
}

/// `GET /repos/{repo}/actions/jobs/{id}` (200).
pub fn job_status(v: Value) -> Result<JobStatus, ParseError> {
    let j: Job = typed(v)?;
    Ok(JobStatus { status: j.status, conclusion: j.conclusion, runner_name: j.runner_name.filter(|n| !n.is_empty()) })
}

#[derive(Deserialize)]
struct Runs {
    workflow_runs: Vec<IdOnly>,
}

/// `GET /repos/{repo}/actions/runs?status=queued`: the run ids.
pub fn run_ids(v: Value) -> Result<Vec<u64>, ParseError> {
    Ok(typed::<Runs>(v)?.workflow_runs.into_iter().map(|r| r.id).collect())
}

#[derive(Deserialize)]
struct RunJob {
    id: u64,
    status: String,
    run_attempt: Option<u32>,
    name: String,
    workflow_name: Option<String>,
    labels: Vec<String>,
    html_url: Option<String>,
}

#[derive(Deserialize)]
struct RunJobs {
    jobs: Vec<RunJob>,
}

/// `GET /repos/{repo}/actions/runs/{run}/jobs`: the jobs still queued.
pub fn queued_jobs_of_run(v: Value, repo: &str, run_id: u64) -> Result<Vec<JobInfo>, ParseError> {
    let r: RunJobs = typed(v)?;
    Ok(r.jobs
        .into_iter()
        .filter(|j| j.status == "queued")
        .map(|j| JobInfo {
            id: j.id,
            run_id,
            run_attempt: j.run_attempt.unwrap_or(1),
            name: j.name,
            workflow_name: j.workflow_name.unwrap_or_default(),
            labels: j.labels,
            repository: repo.to_string(),
            html_url: j.html_url.unwrap_or_default(),
            runner_name: None,
            conclusion: None,
            scale_set: None,
        })
        .collect())
}

#[derive(Deserialize)]
struct Delivery {
    id: u64,
    guid: String,
    delivered_at: String,
    status_code: u16,
    redelivery: bool,
    event: String,
    action: Option<String>,
}

/// `GET .../hooks/{id}/deliveries` (one page).
pub fn deliveries(v: Value) -> Result<Vec<DeliveryInfo>, ParseError> {
    let list: Vec<Delivery> = typed(v)?;
    list.into_iter()
        .map(|d| {
            let delivered_at: SystemTime = humantime::parse_rfc3339_weak(&d.delivered_at)
                .map_err(|e| ParseError(format!("delivery {}: delivered_at {:?}: {e}", d.id, d.delivered_at)))?;
            Ok(DeliveryInfo {
                id: d.id,
                guid: d.guid,
                delivered_at,
                status_code: d.status_code,
                redelivery: d.redelivery,
                event: d.event,
                action: d.action,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_ranges_are_cidrs_and_required() {
        let v = serde_json::json!({"verifiable_password_authentication": false,
            "hooks": ["192.30.252.0/22", "2a0a:a440::/29"], "web": ["140.82.112.0/20"]});
        let r = hook_ranges(v).unwrap();
        assert_eq!(r, vec!["192.30.252.0/22".parse::<ipnet::IpNet>().unwrap(), "2a0a:a440::/29".parse().unwrap()]);
        let e = hook_ranges(serde_json::json!({"installed_version": "3.14"})).unwrap_err();
        assert!(e.0.contains("missing field `hooks`"), "{e}");
        let e = hook_ranges(serde_json::json!({"hooks": ["github.com"]})).unwrap_err();
        assert!(e.0.contains("\"github.com\" is not a CIDR"), "{e}");
    }
    use serde_json::json;

    #[test]
    fn jit_and_token() {
        let v = json!({"runner": {"id": 7, "name": "rv-x"}, "encoded_jit_config": "abc"});
        assert_eq!(jit_config(v).unwrap(), (7, "abc".to_string()));
        let e = jit_config(json!({"runner": {"name": "x"}, "encoded_jit_config": "abc"})).unwrap_err();
        assert!(e.0.contains("id"), "{e}");
        assert!(jit_config(json!({"runner": {"id": 7}})).unwrap_err().0.contains("encoded_jit_config"));
        assert_eq!(registration_token(json!({"token": "t", "expires_at": "x"})).unwrap(), "t");
        assert!(registration_token(json!({"token": 5})).is_err());
    }

    #[test]
    fn runners_and_groups() {
        let v = json!({"total_count": 2, "runners": [
            {"id": 1, "name": "a", "os": "linux", "status": "online", "busy": true, "labels": []},
            {"id": 2, "name": "b", "os": "linux", "status": "offline", "busy": false, "labels": []}]});
        let r = runners(v).unwrap();
        assert_eq!((r[0].online, r[0].busy, r[1].online, r[1].busy), (true, true, false, false));
        assert!(
            runners(json!({"runners": [{"id": 1, "name": "a", "status": "online"}]})).unwrap_err().0.contains("busy")
        );
        let g = json!({"runner_groups": [{"id": 1, "name": "Default"}, {"id": 2, "name": "ci-vms"}]});
        assert_eq!(runner_group_id(g.clone(), "CI-VMS").unwrap(), Some(2));
        assert_eq!(runner_group_id(g, "none").unwrap(), None);
    }

    #[test]
    fn jobs_and_runs() {
        let j =
            job_status(json!({"id": 1, "status": "completed", "conclusion": "success", "runner_name": ""})).unwrap();
        assert_eq!((j.status.as_str(), j.conclusion.as_deref(), j.runner_name), ("completed", Some("success"), None));
        assert!(job_status(json!({"id": 1})).unwrap_err().0.contains("status"));
        assert_eq!(run_ids(json!({"total_count": 1, "workflow_runs": [{"id": 9}]})).unwrap(), [9]);
        let jobs = json!({"jobs": [
            {"id": 1, "status": "queued", "name": "build", "labels": ["self-hosted"], "run_attempt": 2},
            {"id": 2, "status": "completed", "name": "test", "labels": []}]});
        let q = queued_jobs_of_run(jobs, "o/r", 9).unwrap();
        assert_eq!(q.len(), 1);
        assert_eq!((q[0].id, q[0].run_id, q[0].run_attempt, q[0].repository.as_str()), (1, 9, 2, "o/r"));
    }

    #[test]
    fn deliveries_need_every_field_they_are_judged_by() {
        let ok = json!([{"id": 5, "guid": "g", "delivered_at": "2026-11-29T12:00:00Z", "status_code": 502,
                         "redelivery": false, "event": "workflow_job", "action": "queued"}]);
        let d = deliveries(ok).unwrap();
        assert_eq!((d[0].id, d[0].status_code, d[0].action.as_deref()), (5, 502, Some("queued")));
        // A delivery without status_code must not look failed (0) and get redelivered.
        let no_code = json!([{"id": 5, "guid": "g", "delivered_at": "2026-11-29T12:00:00Z",
                              "redelivery": false, "event": "workflow_job", "action": null}]);
        assert!(deliveries(no_code).unwrap_err().0.contains("status_code"));
        let bad_time = json!([{"id": 5, "guid": "g", "delivered_at": "yesterday", "status_code": 200,
                               "redelivery": false, "event": "workflow_job", "action": null}]);
        assert!(deliveries(bad_time).unwrap_err().0.contains("delivered_at"));
    }
}

//! Records and configs for the scheduler's unit tests, built in one place.

use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::model::{JobInfo, JobRec, JobState, VmRec, VmState};

/// A `workflow_job` of `octo-org/app`.
pub fn job_info(id: u64, labels: &[&str], runner: Option<&str>) -> JobInfo {
    JobInfo {
        id,
        run_id: 1,
        run_attempt: 1,
        name: "build".into(),
        workflow_name: "CI".into(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        repository: "octo-org/app".into(),
        html_url: String::new(),
        runner_name: runner.map(str::to_string),
        conclusion: None,
        scale_set: None,
    }
}

/// Job `id` of `pool`, from `repository`, received `received` seconds after the epoch.
pub fn job(id: u64, pool: &str, repository: &str, state: JobState, received: u64) -> JobRec {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(received);
    JobRec {
        info: JobInfo { repository: repository.into(), ..job_info(id, &[], None) },
        pool: Some(pool.into()),
        state,
        received_at: at,
        vms_made: 0,
        failed_vms: 0,
        updated_at: at,
    }
}

/// VM `name` of `pool`, made for job `job_id`, created and in `state` since `at`.
pub fn vm(name: &str, pool: &str, job_id: u64, state: VmState, at: SystemTime) -> VmRec {
    VmRec { job_id, run_id: 1, repository: "octo-org/app".into(), state, ..VmRec::new(name.into(), pool, false, at) }
}

/// A valid config of one pool `p` with `pool_extra` lines added to it.
pub fn config(pool_extra: &str) -> Config {
    let text = format!(
        r#"
        [server]
        listen = "127.0.0.1:1"
        [github]
        organization = "o"
        auth = {{ type = "pat", token = {{ file = "/x" }} }}
        webhook_secret = {{ file = "/y" }}
        [[pool]]
        name = "p"
        labels = ["self-hosted"]
        image = "/i.qcow2"
        {pool_extra}
        "#
    );
    Config::parse(&text).unwrap()
}

//! A VM's life as a pure state machine, and its timers. Tested from a table.
//!
//! ```text
//! Provisioning ──provisioned──▶ Booting ──runner online──▶ Idle
//!      │                          │  └──────took job──────┐  │
//!      │ failed                   ▼                       ▼  ▼ took job
//!      └────────▶ TearingDown ◀── stopped / reaped ──── Busy ──job completed──▶ Finishing
//!                      │                                                        │
//!                  torn down ──▶ (record removed)          stopped / grace over ┘
//! ```

use std::time::{Duration, SystemTime};

use crate::config::PoolConfig;
use crate::model::{Reason, VmRec, VmState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Provisioned,
    ProvisionFailed,
    RunnerOnline,
    TookJob,
    JobCompleted,
    DomainStopped,
    Reap,
}

/// The next state, or `None` when the input does not change this state.
pub fn next(state: VmState, input: Input) -> Option<VmState> {
    use Input::*;
    use VmState::*;
    match (state, input) {
        (Provisioning, Provisioned) => Some(Booting),
        (Provisioning, ProvisionFailed) => Some(TearingDown),
        // A runner cannot take a job before its VM started; if the news overtakes the
        // provisioning report, believe it.
        (Provisioning | Booting | Idle, TookJob) => Some(Busy),
        (Booting, RunnerOnline) => Some(Idle),
        (Booting | Idle | Busy, JobCompleted) => Some(Finishing),
        // Provisioning finishes its own steps first; teardown follows the report.
        (Provisioning, DomainStopped | Reap) => None,
        (Booting | Idle | Busy | Finishing, DomainStopped | Reap) => Some(TearingDown),
        _ => None,
    }
}

/// Whether tearing down a VM for `reason` counts as a failed attempt of the job it was
/// made for: the VM died or stalled before any runner on it took a job.
pub fn counts_as_failure(vm: &VmRec, reason: Reason) -> bool {
    vm.took_job.is_none()
        && matches!(vm.state, VmState::Booting | VmState::Idle | VmState::TearingDown)
        && matches!(reason, Reason::Stopped | Reason::RegistrationTimeout | Reason::MaxLifetime)
}

/// The timer that has run out for this VM, if any.
pub fn expired(vm: &VmRec, pool: &PoolConfig, stop_grace: Duration, now: SystemTime) -> Option<Reason> {
    let age = |t: SystemTime| now.duration_since(t).unwrap_or_default();
    if vm.state == VmState::TearingDown || vm.state == VmState::Provisioning {
        return None;
    }
    if age(vm.created_at) >= pool.max_lifetime {
        return Some(Reason::MaxLifetime);
    }
    match vm.state {
        VmState::Booting if age(vm.state_since) >= pool.registration_timeout => Some(Reason::RegistrationTimeout),
        VmState::Finishing if age(vm.state_since) >= stop_grace => Some(Reason::FinishGrace),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Input::*;
    use VmState::*;

    #[test]
    fn transition_table() {
        let table: &[(VmState, Input, Option<VmState>)] = &[
            (Provisioning, Provisioned, Some(Booting)),
            (Provisioning, ProvisionFailed, Some(TearingDown)),
            (Provisioning, TookJob, Some(Busy)),
            (Provisioning, DomainStopped, None),
            (Provisioning, Reap, None),
            (Provisioning, RunnerOnline, None),
            (Booting, RunnerOnline, Some(Idle)),
            (Booting, TookJob, Some(Busy)),
            (Booting, JobCompleted, Some(Finishing)),
            (Booting, DomainStopped, Some(TearingDown)),
            (Booting, Reap, Some(TearingDown)),
            (Booting, Provisioned, None),
            (Idle, TookJob, Some(Busy)),
            (Idle, RunnerOnline, None),
            (Idle, Reap, Some(TearingDown)),
            (Busy, TookJob, None),
            (Busy, RunnerOnline, None),
            (Busy, Provisioned, None),
            (Busy, JobCompleted, Some(Finishing)),
            (Busy, DomainStopped, Some(TearingDown)),
            (Finishing, JobCompleted, None),
            (Finishing, TookJob, None),
            (Finishing, DomainStopped, Some(TearingDown)),
            (Finishing, Reap, Some(TearingDown)),
            (TearingDown, DomainStopped, None),
            (TearingDown, Reap, None),
            (TearingDown, TookJob, None),
            (TearingDown, Provisioned, None),
        ];
        for (state, input, want) in table {
            assert_eq!(next(*state, *input), *want, "{state:?} + {input:?}");
        }
    }

    fn vm(state: VmState, created_ago: u64, since_ago: u64, now: SystemTime) -> VmRec {
        VmRec {
            name: "rv-p-1".into(),
            pool: "p".into(),
            job_id: 1,
            run_id: 1,
            repository: "o/r".into(),
            job_url: String::new(),
            runner_id: None,
            state,
            created_at: now - Duration::from_secs(created_ago),
            state_since: now - Duration::from_secs(since_ago),
            took_job: None,
            seed_removed: false,
            reap: None,
        }
    }

    #[test]
    fn timers() {
        let text = r#"
            [server]
            listen = "127.0.0.1:1"
            [github]
            organization = "o"
            auth = { type = "pat", token = { file = "/x" } }
            webhook_secret = { file = "/y" }
            [[pool]]
            name = "p"
            labels = ["self-hosted"]
            image = "/i.qcow2"
            registration_timeout = "5m"
            max_lifetime = "1h"
        "#;
        let cfg = crate::config::Config::parse(text).unwrap();
        let pool = &cfg.pools[0];
        let now = SystemTime::now();
        let grace = Duration::from_secs(60);
        assert_eq!(expired(&vm(Booting, 299, 299, now), pool, grace, now), None);
        assert_eq!(expired(&vm(Booting, 300, 300, now), pool, grace, now), Some(Reason::RegistrationTimeout));
        assert_eq!(expired(&vm(Busy, 3599, 3000, now), pool, grace, now), None);
        assert_eq!(expired(&vm(Busy, 3600, 10, now), pool, grace, now), Some(Reason::MaxLifetime));
        assert_eq!(expired(&vm(Idle, 3600, 10, now), pool, grace, now), Some(Reason::MaxLifetime));
        assert_eq!(expired(&vm(Finishing, 100, 59, now), pool, grace, now), None);
        assert_eq!(expired(&vm(Finishing, 100, 60, now), pool, grace, now), Some(Reason::FinishGrace));
        assert_eq!(expired(&vm(Provisioning, 7200, 7200, now), pool, grace, now), None, "provisioning reports first");
        assert_eq!(expired(&vm(TearingDown, 7200, 7200, now), pool, grace, now), None);
    }

    #[test]
    fn failures_count_only_before_a_job() {
        let now = SystemTime::now();
        let booting = vm(Booting, 10, 10, now);
        assert!(counts_as_failure(&booting, Reason::Stopped));
        assert!(counts_as_failure(&booting, Reason::RegistrationTimeout));
        assert!(!counts_as_failure(&booting, Reason::Surplus));
        assert!(!counts_as_failure(&booting, Reason::ProvisionFailed));
        assert!(!counts_as_failure(&booting, Reason::DiskError), "a full disk is the host's fault");
        let mut busy = vm(Busy, 10, 10, now);
        busy.took_job = Some(5);
        assert!(!counts_as_failure(&busy, Reason::Stopped));
    }
}

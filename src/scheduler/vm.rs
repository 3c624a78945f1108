//! A VM's life as a pure state machine, and its timers. Tested from a table.
//!
//! Every VM boots without a credential and waits on its bind port; a cold VM (made for a
//! job) is bound to its job as soon as its guest waits, a warm VM when a job arrives:
//!
//! ```text
//! Provisioning ──provisioned──▶ Warming ──guest ready──▶ Waiting ──bind──▶ Binding
//!      │                           │                        │ ◀─no credential─┤
//!      │                           │                        │                │
//!      │ failed / timed out        └── stopped / reaped ────┴──▶ TearingDown ◀┤ failed
//!      ▼                                                                      │ delivered
//!  TearingDown                                                                ▼
//!                            Booting ──runner online──▶ Idle
//!                              │  └──────took job──────┐  │
//!                              ▼                       ▼  ▼ took job
//!   TearingDown ◀── stopped / reaped ──────────────── Busy ──job completed──▶ Finishing
//!     │    │                                           ▲                          │
//!     │    └── kept busy (the "surplus" runner had taken a job) ──┘               │
//!  torn down ──▶ (record removed)                    stopped / grace over ────────┘
//! ```
//!
//! A VM booted to become a snapshot slot goes `Waiting ──save──▶ Saving`, and its record
//! is replaced by the slot's once saved (or it is torn down).
//!
//! [`next`] is the only way a VM's state changes: the scheduler's `transition` applies it
//! and nothing else writes `VmRec::state`.

use std::time::{Duration, SystemTime};

use crate::config::PoolConfig;
use crate::model::{Reason, VmRec, VmState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The VM's domain started (no credential in it).
    Provisioned,
    /// Its guest opened the port the host delivers a job's runner command on.
    GuestReady,
    /// A job's credential is being made and delivered into the waiting VM.
    Bind,
    /// The guest acknowledged its runner command: it starts its runner now.
    Bound,
    /// Its credential could not be made (GitHub failed): nothing reached the guest, which
    /// still waits; the binding is tried again after the pool's back-off.
    BindDeferred,
    ProvisionFailed,
    RunnerOnline,
    TookJob,
    JobCompleted,
    DomainStopped,
    Reap,
    /// A teardown that deletes the runner first found it busy: the VM keeps its job.
    KeptBusy,
    /// A VM made for a snapshot slot, whose guest waits, is being saved.
    Save,
}

/// The next state, or `None` when the input does not change this state.
pub fn next(state: VmState, input: Input) -> Option<VmState> {
    use Input::*;
    use VmState::*;
    match (state, input) {
        (Provisioning, Provisioned) => Some(Warming),
        (Provisioning, ProvisionFailed) => Some(TearingDown),
        (Warming, GuestReady) => Some(Waiting),
        (Waiting, Bind) => Some(Binding),
        (Binding, Bound) => Some(Booting),
        (Binding, BindDeferred) => Some(Waiting),
        (Waiting, Save) => Some(Saving),
        // Saving stops the domain: that is no end of it, a failed save is.
        (Saving, Reap) => Some(TearingDown),
        // The runner's news may overtake the delivery's report.
        (Binding, RunnerOnline) => Some(Idle),
        (Binding, TookJob) => Some(Busy),
        (Binding, JobCompleted) => Some(Finishing),
        (Warming | Waiting | Binding, DomainStopped | Reap) => Some(TearingDown),
        (Booting | Idle, TookJob) => Some(Busy),
        (Booting, RunnerOnline) => Some(Idle),
        (Booting | Idle | Busy, JobCompleted) => Some(Finishing),
        // Provisioning finishes its own steps first; teardown follows the report.
        (Provisioning, DomainStopped | Reap) => None,
        (Booting | Idle | Busy | Finishing, DomainStopped | Reap) => Some(TearingDown),
        (TearingDown, KeptBusy) => Some(Busy),
        _ => None,
    }
}

/// Whether tearing down a VM for `reason` counts as a failed attempt of the job it was
/// made for: the VM died, stalled or did not take its runner's command before any runner
/// on it took a job. A warm VM that fails before or while it is bound costs no job an
/// attempt (the job goes the cold path).
pub fn counts_as_failure(vm: &VmRec, reason: Reason) -> bool {
    let before_a_job = match vm.state {
        VmState::Booting | VmState::Idle | VmState::TearingDown => true,
        // A restored VM failing here is its slot's fault (the slot is made again).
        VmState::Warming | VmState::Waiting | VmState::Binding => !vm.warm && vm.slot.is_none(),
        _ => false,
    };
    vm.took_job.is_none()
        && before_a_job
        && matches!(reason, Reason::Stopped | Reason::RegistrationTimeout | Reason::MaxLifetime | Reason::BindFailed)
}

/// The scheduler-wide timers (`[reconcile]`).
#[derive(Debug, Clone, Copy)]
pub struct Timers {
    pub stop_grace: Duration,
    pub provision_timeout: Duration,
}

/// The timer that has run out for this VM, if any.
pub fn expired(vm: &VmRec, pool: &PoolConfig, timers: Timers, now: SystemTime) -> Option<Reason> {
    let age = |t: SystemTime| now.duration_since(t).unwrap_or_default();
    match vm.state {
        VmState::TearingDown => return None,
        // A provisioning that does not report in time (a hung libvirt call) has failed;
        // the VM goes once the call returns (it holds its place until then: the call may
        // still make its domain).
        VmState::Provisioning if age(vm.state_since) >= timers.provision_timeout => {
            return Some(Reason::ProvisionTimeout);
        }
        VmState::Provisioning => return None,
        // A delivery is bounded by `bind_timeout`, its credential by GitHub's retries; this
        // is the backstop for a call that never returns.
        VmState::Binding if age(vm.state_since) >= timers.provision_timeout => return Some(Reason::BindFailed),
        // The backstop for a save that never returns.
        VmState::Saving if age(vm.state_since) >= timers.provision_timeout => return Some(Reason::ProvisionTimeout),
        VmState::Saving => return None,
        VmState::Warming | VmState::Waiting if vm.warm && age(vm.created_at) >= pool.warm_max_age => {
            return Some(Reason::WarmRecycled);
        }
        _ => {}
    }
    if age(vm.created_at) >= pool.max_lifetime {
        return Some(Reason::MaxLifetime);
    }
    match vm.state {
        VmState::Booting | VmState::Warming if age(vm.state_since) >= pool.registration_timeout => {
            Some(Reason::RegistrationTimeout)
        }
        VmState::Finishing if age(vm.state_since) >= timers.stop_grace => Some(Reason::FinishGrace),
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
            (Provisioning, Provisioned, Some(Warming)),
            (Provisioning, ProvisionFailed, Some(TearingDown)),
            (Provisioning, TookJob, None),
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
            (TearingDown, KeptBusy, Some(Busy)),
            (Busy, KeptBusy, None),
            (Idle, KeptBusy, None),
            (Warming, Provisioned, None),
            (Warming, GuestReady, Some(Waiting)),
            (Warming, Bind, None),
            (Warming, TookJob, None),
            (Warming, DomainStopped, Some(TearingDown)),
            (Warming, Reap, Some(TearingDown)),
            (Waiting, GuestReady, None),
            (Waiting, Bind, Some(Binding)),
            (Waiting, TookJob, None),
            (Waiting, RunnerOnline, None),
            (Waiting, DomainStopped, Some(TearingDown)),
            (Waiting, Reap, Some(TearingDown)),
            (Binding, Bound, Some(Booting)),
            (Binding, BindDeferred, Some(Waiting)),
            (Waiting, BindDeferred, None),
            (Booting, BindDeferred, None),
            (Binding, Bind, None),
            (Binding, RunnerOnline, Some(Idle)),
            (Binding, TookJob, Some(Busy)),
            (Binding, JobCompleted, Some(Finishing)),
            (Binding, Reap, Some(TearingDown)),
            (Binding, DomainStopped, Some(TearingDown)),
            (Booting, Bound, None),
            (Idle, Bound, None),
            (TearingDown, Bound, None),
            (TearingDown, GuestReady, None),
            (Waiting, Save, Some(Saving)),
            (Warming, Save, None),
            (Saving, DomainStopped, None),
            (Saving, Reap, Some(TearingDown)),
            (Saving, Bind, None),
            (Saving, GuestReady, None),
        ];
        for (state, input, want) in table {
            assert_eq!(next(*state, *input), *want, "{state:?} + {input:?}");
        }
    }

    fn vm(state: VmState, created_ago: u64, since_ago: u64, now: SystemTime) -> VmRec {
        let mut v = crate::scheduler::fixtures::vm("rv-p-1", "p", 1, state, now - Duration::from_secs(created_ago));
        v.state_since = now - Duration::from_secs(since_ago);
        v
    }

    #[test]
    fn timers() {
        let cfg = crate::scheduler::fixtures::config(
            "registration_timeout = \"5m\"\nmax_lifetime = \"1h\"\nwarm_max_age = \"30m\"",
        );
        let pool = &cfg.pools[0];
        let now = SystemTime::now();
        let grace = Timers { stop_grace: Duration::from_secs(60), provision_timeout: Duration::from_secs(600) };
        assert_eq!(expired(&vm(Booting, 299, 299, now), pool, grace, now), None);
        assert_eq!(expired(&vm(Booting, 300, 300, now), pool, grace, now), Some(Reason::RegistrationTimeout));
        assert_eq!(expired(&vm(Busy, 3599, 3000, now), pool, grace, now), None);
        assert_eq!(expired(&vm(Busy, 3600, 10, now), pool, grace, now), Some(Reason::MaxLifetime));
        assert_eq!(expired(&vm(Idle, 3600, 10, now), pool, grace, now), Some(Reason::MaxLifetime));
        assert_eq!(expired(&vm(Finishing, 100, 59, now), pool, grace, now), None);
        assert_eq!(expired(&vm(Finishing, 100, 60, now), pool, grace, now), Some(Reason::FinishGrace));
        assert_eq!(expired(&vm(Provisioning, 7200, 599, now), pool, grace, now), None, "provisioning reports first");
        assert_eq!(
            expired(&vm(Provisioning, 7200, 600, now), pool, grace, now),
            Some(Reason::ProvisionTimeout),
            "unless it never does"
        );
        assert_eq!(expired(&vm(TearingDown, 7200, 7200, now), pool, grace, now), None);
        // Every VM boots within the registration timeout; a warm one waits at most
        // warm_max_age (30m).
        let warm = |state, created_ago, since_ago| VmRec { warm: true, ..vm(state, created_ago, since_ago, now) };
        assert_eq!(expired(&vm(Warming, 299, 299, now), pool, grace, now), None);
        assert_eq!(expired(&vm(Warming, 300, 300, now), pool, grace, now), Some(Reason::RegistrationTimeout));
        assert_eq!(expired(&warm(Warming, 300, 300), pool, grace, now), Some(Reason::RegistrationTimeout));
        assert_eq!(expired(&warm(Waiting, 1799, 1000), pool, grace, now), None);
        assert_eq!(expired(&warm(Waiting, 1800, 1000), pool, grace, now), Some(Reason::WarmRecycled));
        assert_eq!(expired(&vm(Binding, 3000, 599, now), pool, grace, now), None);
        assert_eq!(expired(&vm(Binding, 3000, 600, now), pool, grace, now), Some(Reason::BindFailed));
        assert_eq!(expired(&vm(Saving, 7200, 599, now), pool, grace, now), None, "a save reports first");
        assert_eq!(expired(&vm(Saving, 7200, 600, now), pool, grace, now), Some(Reason::ProvisionTimeout));
    }

    #[test]
    fn failures_count_only_before_a_job() {
        let now = SystemTime::now();
        let booting = vm(Booting, 10, 10, now);
        assert!(counts_as_failure(&booting, Reason::Stopped));
        assert!(counts_as_failure(&booting, Reason::RegistrationTimeout));
        assert!(counts_as_failure(&booting, Reason::BindFailed));
        // A cold VM that never waits, or never takes its command, costs its job an attempt;
        // a warm VM does not (its job goes the cold path).
        for state in [Warming, Waiting, Binding] {
            let cold = vm(state, 10, 10, now);
            assert!(counts_as_failure(&cold, Reason::RegistrationTimeout), "{state:?}");
            assert!(counts_as_failure(&cold, Reason::BindFailed), "{state:?}");
            let warm = VmRec { warm: true, ..cold };
            assert!(!counts_as_failure(&warm, Reason::RegistrationTimeout), "{state:?}");
            assert!(!counts_as_failure(&warm, Reason::BindFailed), "{state:?}");
        }
        assert!(!counts_as_failure(&booting, Reason::Surplus));
        assert!(!counts_as_failure(&booting, Reason::ProvisionFailed));
        assert!(!counts_as_failure(&booting, Reason::DiskError), "a full disk is the host's fault");
        let mut busy = vm(Busy, 10, 10, now);
        busy.took_job = Some(5);
        assert!(!counts_as_failure(&busy, Reason::Stopped));
    }
}

//! Demand: per pool, the available runners (provisioning, booting or idle) should equal
//! the unserved jobs, within capacity. [`plan`] decides which jobs get a new VM and which
//! surplus runners go; [`pick`] chooses among queued jobs. Both are pure functions of the
//! queue, the VMs and the clock, tested from tables.
//!
//! Counting, not binding: GitHub gives a job to any idle runner whose labels cover it, so a
//! runner is never reserved for the job it was made for.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::PoolConfig;
use crate::model::{JobRec, VmRec};

/// A pool's limits, as [`plan`] uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_vms: usize,
    /// How long a runner may be surplus before it is removed.
    pub idle_timeout: Duration,
    pub per_repository: Option<usize>,
}

impl Limits {
    pub fn of(pool: &PoolConfig) -> Limits {
        Limits { max_vms: pool.max_vms, idle_timeout: pool.idle_timeout, per_repository: pool.max_vms_per_repository }
    }
}

/// What holds new VMs back, from outside the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    /// Draining, or the pool backs off after failures: no new VMs (surplus still goes).
    pub hold: bool,
    /// New VMs the host may still start across pools (`capacity.max_vms`).
    pub host_room: usize,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Jobs to make a VM for, oldest first.
    pub provision: Vec<u64>,
    /// Every available runner beyond the unserved jobs now (the caller remembers since when).
    pub surplus: Vec<String>,
    /// Surplus runners that have been surplus for `idle_timeout`: tear them down.
    pub reap: Vec<String>,
}

/// One pool's decision. `unserved`: its jobs that need a runner, oldest first; `vms`: all
/// its VMs; `surplus_since`: when each runner became surplus.
pub fn plan(
    limits: Limits,
    unserved: &[&JobRec],
    vms: &[&VmRec],
    surplus_since: &HashMap<String, Instant>,
    gate: Gate,
    now: Instant,
) -> Decision {
    let mut available: Vec<&VmRec> =
        vms.iter().copied().filter(|v| v.state.is_available() && v.reap.is_none()).collect();
    // More available runners than unserved jobs (cancelled, served elsewhere): the surplus
    // are those whose own job is served, newest first.
    let unserved_ids: BTreeSet<u64> = unserved.iter().map(|j| j.info.id).collect();
    available.sort_by_key(|v| (unserved_ids.contains(&v.job_id), std::cmp::Reverse(v.created_at)));
    let surplus_n = available.len().saturating_sub(unserved.len());
    let surplus: Vec<String> = available.iter().take(surplus_n).map(|v| v.name.clone()).collect();
    let reap = surplus
        .iter()
        .filter(|n| now.duration_since(*surplus_since.get(*n).unwrap_or(&now)) >= limits.idle_timeout)
        .cloned()
        .collect();
    let mut decision = Decision { provision: Vec::new(), surplus, reap };
    if gate.hold {
        return decision;
    }
    let deficit = unserved.len().saturating_sub(available.len());
    let room = Room {
        pool: deficit.min(limits.max_vms.saturating_sub(vms.len())),
        host: gate.host_room,
        per_repository: limits.per_repository,
    };
    let covered: BTreeSet<u64> = available.iter().map(|v| v.job_id).collect();
    let mut by_repo: BTreeMap<String, usize> = BTreeMap::new();
    for v in vms {
        *by_repo.entry(v.repository.clone()).or_insert(0) += 1;
    }
    let queue: Vec<(u64, &str)> = unserved.iter().map(|j| (j.info.id, j.info.repository.as_str())).collect();
    decision.provision = pick(&queue, &covered, &by_repo, room);
    decision
}

/// The limits a pick respects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// New VMs this pool may start (its deficit within its `max_vms`).
    pub pool: usize,
    /// New VMs this host may start across pools (`capacity.max_vms`); `usize::MAX`: no cap.
    pub host: usize,
    /// VMs of this pool one repository may have at once (`max_vms_per_repository`).
    pub per_repository: Option<usize>,
}

/// Oldest first, `unserved` jobs (id, repository) not already `covered` by an available
/// runner, within `room`; `alive_by_repo` counts the pool's VMs per repository now.
pub fn pick(
    unserved: &[(u64, &str)],
    covered: &BTreeSet<u64>,
    alive_by_repo: &BTreeMap<String, usize>,
    room: Room,
) -> Vec<u64> {
    let mut by_repo = alive_by_repo.clone();
    let mut picks = Vec::new();
    for (id, repo) in unserved {
        if picks.len() >= room.pool.min(room.host) {
            break;
        }
        if covered.contains(id) {
            continue;
        }
        let n = by_repo.entry(repo.to_string()).or_insert(0);
        if room.per_repository.is_some_and(|cap| *n >= cap) {
            continue;
        }
        *n += 1;
        picks.push(*id);
    }
    picks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobState, VmState};
    use crate::scheduler::fixtures::{job, vm};
    use std::time::SystemTime;

    #[test]
    fn plans() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let now = Instant::now();
        let limits = Limits { max_vms: 3, idle_timeout: Duration::from_secs(60), per_repository: None };
        let open = Gate { hold: false, host_room: usize::MAX };
        let q = |id| job(id, "p", "o/r", JobState::Queued, id);
        let v = |name: &str, job_id, state, age: u64| vm(name, "p", job_id, state, t0 + Duration::from_secs(age));
        use VmState::*;
        struct Case {
            what: &'static str,
            jobs: Vec<JobRec>,
            vms: Vec<VmRec>,
            since: Vec<(&'static str, u64)>,
            limits: Limits,
            gate: Gate,
            provision: Vec<u64>,
            surplus: Vec<&'static str>,
            reap: Vec<&'static str>,
        }
        #[rustfmt::skip]
        let cases = vec![
            Case { what: "a VM per job within max_vms", jobs: vec![q(1), q(2), q(3), q(4)], vms: vec![], since: vec![],
                   limits, gate: open, provision: vec![1, 2, 3], surplus: vec![], reap: vec![] },
            Case { what: "an available runner covers a job: no second VM", jobs: vec![q(1), q(2)],
                   vms: vec![v("rv-p-1", 1, Booting, 0)], since: vec![], limits, gate: open,
                   provision: vec![2], surplus: vec![], reap: vec![] },
            Case { what: "busy and finishing VMs hold slots but cover nothing", jobs: vec![q(5), q(6)],
                   vms: vec![v("rv-p-1", 1, Busy, 0), v("rv-p-2", 2, Finishing, 0)], since: vec![], limits, gate: open,
                   provision: vec![5], surplus: vec![], reap: vec![] },
            Case { what: "a runner being reaped covers nothing", jobs: vec![q(1)],
                   vms: vec![VmRec { reap: Some(crate::model::Reason::Operator), ..v("rv-p-1", 1, Idle, 0) }],
                   since: vec![], limits, gate: open, provision: vec![1], surplus: vec![], reap: vec![] },
            Case { what: "hold: no new VM, yet surplus still goes", jobs: vec![q(1)],
                   vms: vec![v("rv-p-7", 7, Idle, 0), v("rv-p-8", 8, Idle, 5)], since: vec![("rv-p-8", 61)],
                   limits, gate: Gate { hold: true, ..open }, provision: vec![], surplus: vec!["rv-p-8"], reap: vec!["rv-p-8"] },
            Case { what: "surplus: newest runner whose own job is served goes, after idle_timeout", jobs: vec![q(1)],
                   vms: vec![v("rv-p-1", 1, Idle, 0), v("rv-p-7", 7, Idle, 9), v("rv-p-8", 8, Booting, 5)],
                   since: vec![("rv-p-7", 60), ("rv-p-8", 30)], limits, gate: open,
                   provision: vec![], surplus: vec!["rv-p-7", "rv-p-8"], reap: vec!["rv-p-7"] },
            Case { what: "newly surplus: kept until it has been surplus for idle_timeout", jobs: vec![],
                   vms: vec![v("rv-p-1", 1, Idle, 0)], since: vec![], limits, gate: open,
                   provision: vec![], surplus: vec!["rv-p-1"], reap: vec![] },
            Case { what: "the host cap", jobs: vec![q(1), q(2)], vms: vec![], since: vec![], limits,
                   gate: Gate { host_room: 1, ..open }, provision: vec![1], surplus: vec![], reap: vec![] },
            Case { what: "per repository: the VMs it has count", jobs: vec![q(1), q(2), job(3, "p", "o/other", JobState::Queued, 3)],
                   vms: vec![VmRec { repository: "o/r".into(), ..v("rv-p-9", 9, Busy, 0) }], since: vec![],
                   limits: Limits { per_repository: Some(1), ..limits }, gate: open,
                   provision: vec![3], surplus: vec![], reap: vec![] },
        ];
        for c in cases {
            let jobs: Vec<&JobRec> = c.jobs.iter().collect();
            let vms: Vec<&VmRec> = c.vms.iter().collect();
            let since = c.since.iter().map(|(n, ago)| (n.to_string(), now - Duration::from_secs(*ago))).collect();
            let d = plan(c.limits, &jobs, &vms, &since, c.gate, now);
            assert_eq!(d.provision, c.provision, "{}: provision", c.what);
            assert_eq!(d.surplus, c.surplus, "{}: surplus", c.what);
            assert_eq!(d.reap, c.reap, "{}: reap", c.what);
        }
    }

    #[test]
    fn picks() {
        let q = [(1, "a/x"), (2, "a/x"), (3, "a/x"), (4, "b/y"), (5, "c/z")];
        let none = BTreeSet::new();
        let alive = |list: &[(&str, usize)]| list.iter().map(|(r, n)| (r.to_string(), *n)).collect();
        let room = |pool, host, per| Room { pool, host, per_repository: per };
        #[rustfmt::skip]
        let table: Vec<(&str, BTreeSet<u64>, BTreeMap<String, usize>, Room, Vec<u64>)> = vec![
            ("oldest first within the pool's room", none.clone(), alive(&[]), room(2, usize::MAX, None), vec![1, 2]),
            ("the host cap binds first", none.clone(), alive(&[]), room(5, 1, None), vec![1]),
            ("no room, no pick", none.clone(), alive(&[]), room(0, 5, None), vec![]),
            ("covered jobs are skipped", [1, 2].into(), alive(&[]), room(2, 9, None), vec![3, 4]),
            ("one repository cannot take every slot", none.clone(), alive(&[]), room(4, 9, Some(1)), vec![1, 4, 5]),
            ("VMs it already has count", none.clone(), alive(&[("a/x", 2)]), room(4, 9, Some(2)), vec![4, 5]),
            ("cap 2: two of a/x, then others", none.clone(), alive(&[]), room(5, 9, Some(2)), vec![1, 2, 4, 5]),
        ];
        for (what, covered, alive, room, want) in table {
            assert_eq!(pick(&q, &covered, &alive, room), want, "{what}");
        }
    }
}

//! Demand: per pool, the available runners (provisioning, booting or idle) should equal
//! the unserved jobs, within capacity. [`plan`] decides which jobs get a new VM and which
//! surplus runners go; [`pick`] chooses among queued jobs. Both are pure functions of the
//! queue, the VMs and the clock, tested from tables.
//!
//! Counting, not binding: GitHub gives a job to any idle runner whose labels cover it, so a
//! runner is never reserved for the job it was made for. A warm VM becomes a runner (with
//! the pool's labels) when a job arrives for its pool; until then it is no runner at all.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::PoolConfig;
use crate::model::{JobRec, VmRec, VmState};

/// A pool's limits, as [`plan`] uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_vms: usize,
    /// How long a runner may be surplus before it is removed.
    pub idle_timeout: Duration,
    pub per_repository: Option<usize>,
    /// Warm VMs to keep waiting (within `max_vms`).
    pub warm: usize,
    /// Snapshot slots the pool lacks (neither saved nor being made): each is made by
    /// booting a VM, which holds a place of `max_vms` until it is saved.
    pub slots_missing: usize,
    /// Saved slots free to restore a job's VM from now: a restore (seconds) serves a job
    /// sooner than a warm VM still booting, so such jobs do not wait for one.
    pub slots_free: usize,
}

impl Limits {
    pub fn of(pool: &PoolConfig) -> Limits {
        Limits {
            max_vms: pool.max_vms,
            idle_timeout: pool.idle_timeout,
            per_repository: pool.max_vms_per_repository,
            warm: pool.warm,
            slots_missing: 0,
            slots_free: 0,
        }
    }
}

/// What holds new VMs back, from outside the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    /// The pool backs off after failures: no new VMs (surplus still goes, warm VMs still
    /// serve jobs).
    pub hold: bool,
    /// The agent drains: no new VMs, no bindings, and every unbound warm VM goes.
    pub draining: bool,
    /// New VMs the host may still start across pools (`capacity.max_vms`).
    pub host_room: usize,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Jobs to make a (cold) VM for, oldest first.
    pub provision: Vec<u64>,
    /// Every available runner beyond the unserved jobs now (the caller remembers since when).
    pub surplus: Vec<String>,
    /// Surplus runners that have been surplus for `idle_timeout`: tear them down.
    pub reap: Vec<String>,
    /// Waiting warm VMs to give a job now: (job, VM), oldest of each first.
    pub bind: Vec<(u64, String)>,
    /// New warm VMs to make.
    pub warm: usize,
    /// New snapshot slots to make (after jobs and warm VMs).
    pub slots: usize,
    /// Unbound warm VMs no longer wanted (draining, or more than `warm` spare).
    pub unwarm: Vec<String>,
}

/// One pool's decision. `unserved`: its jobs that need a runner, oldest first; `vms`: all
/// its VMs; `surplus_since`: when each runner became surplus; `cold_only`: jobs a warm VM
/// failed to take, which go the cold path.
///
/// Order of service: a waiting warm VM takes the oldest uncovered job; a free snapshot
/// slot the next (its VM is among `provision`: a restore takes seconds); a warm VM still
/// booting counts as a runner coming (it waits sooner than a new VM would boot); the rest
/// get cold VMs; then the warm VMs are topped up with the places left.
pub fn plan(
    limits: Limits,
    unserved: &[&JobRec],
    vms: &[&VmRec],
    surplus_since: &BTreeMap<String, Instant>,
    cold_only: &BTreeSet<u64>,
    gate: Gate,
    now: Instant,
) -> Decision {
    let live = |v: &&&VmRec| v.reap.is_none();
    let mut available: Vec<&VmRec> =
        vms.iter().filter(live).copied().filter(|v| v.is_available() && !v.is_unbound_warm()).collect();
    let mut waiting: Vec<&VmRec> =
        vms.iter().filter(live).copied().filter(|v| v.is_unbound_warm() && v.state == VmState::Waiting).collect();
    waiting.sort_by_key(|v| (v.created_at, v.name.clone()));
    let warming = vms.iter().filter(live).filter(|v| v.is_unbound_warm() && v.state != VmState::Waiting).count();
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
    let mut decision = Decision { surplus, reap, ..Decision::default() };
    if gate.draining {
        let mut unbound: Vec<&VmRec> = vms.iter().filter(live).copied().filter(|v| v.is_unbound_warm()).collect();
        unbound.sort_by_key(|v| v.name.clone());
        decision.unwarm = unbound.into_iter().map(|v| v.name.clone()).collect();
        return decision;
    }
    let mut deficit = unserved.len().saturating_sub(available.len());
    let mut covered: BTreeSet<u64> = available.iter().map(|v| v.job_id).collect();
    let mut by_repo: BTreeMap<String, usize> = BTreeMap::new();
    for v in vms.iter().filter(|v| !v.is_unbound_warm() && !v.for_slot) {
        *by_repo.entry(v.repository.clone()).or_insert(0) += 1;
    }
    let queue = |cold_first: bool| {
        let mut q: Vec<(u64, &str)> = unserved
            .iter()
            .filter(|j| cold_first || !cold_only.contains(&j.info.id))
            .map(|j| (j.info.id, j.info.repository.as_str()))
            .collect();
        if cold_first {
            q.sort_by_key(|(id, _)| !cold_only.contains(id));
        }
        q
    };
    let room = |pool| Room { pool, host: usize::MAX, per_repository: limits.per_repository };
    let binds = pick(&queue(false), &covered, &by_repo, room(deficit.min(waiting.len())));
    for (job, vm) in binds.iter().zip(&waiting) {
        decision.bind.push((*job, vm.name.clone()));
        covered.insert(*job);
        let repo = unserved.iter().find(|j| j.info.id == *job).map(|j| j.info.repository.clone()).unwrap_or_default();
        *by_repo.entry(repo).or_insert(0) += 1;
    }
    deficit -= binds.len();
    let spare_waiting = waiting.len() - binds.len();
    // Free slots serve the next jobs, then booting warm VMs, except jobs a warm VM or a
    // restore already failed (those boot).
    let uncovered_cold_only =
        unserved.iter().filter(|j| cold_only.contains(&j.info.id) && !covered.contains(&j.info.id)).count();
    let may_wait = deficit - uncovered_cold_only.min(deficit);
    // Only the restores that can start now (no back-off, a place in the pool and host).
    let places = limits.max_vms.saturating_sub(vms.len());
    let restorable = if gate.hold { 0 } else { limits.slots_free.min(places).min(gate.host_room) };
    let reserved = warming.min(may_wait - restorable.min(may_wait));
    let spare_warm = spare_waiting + warming - reserved;
    // A new warm VM is made only for jobs a warm VM could be bound to once it waits: within
    // their repository's room (`max_vms_per_repository`). One made in place of a warming VM
    // reserved for a job its repository's cap holds back was bound to nothing, and reaped
    // as surplus when it waited; then made again, and again (found by the simulator).
    let bindable = pick(&queue(false), &covered, &by_repo, room(deficit)).len();
    let reserved_bindable = reserved.min(bindable.saturating_sub(restorable.min(bindable)));
    let spare_for_making = spare_waiting + warming - reserved_bindable;
    if spare_warm > limits.warm {
        // `warm` was lowered: the newest waiting ones go.
        decision.unwarm =
            waiting[binds.len()..].iter().rev().take(spare_warm - limits.warm).map(|v| v.name.clone()).collect();
    }
    if gate.hold {
        return decision;
    }
    let cold_room =
        Room { pool: (deficit - reserved).min(places), host: gate.host_room, per_repository: limits.per_repository };
    decision.provision = pick(&queue(true), &covered, &by_repo, cold_room);
    let made = decision.provision.len();
    decision.warm =
        limits.warm.saturating_sub(spare_for_making).min(places - made).min(gate.host_room.saturating_sub(made));
    let made = made + decision.warm;
    decision.slots = limits.slots_missing.min(places - made).min(gate.host_room.saturating_sub(made));
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

    const OPEN: Gate = Gate { hold: false, draining: false, host_room: usize::MAX };

    /// A pool of 3 VMs, surplus for a minute, `warm` warm VMs, lacking `slots_missing` slots.
    fn limits(warm: usize, slots_missing: usize) -> Limits {
        Limits {
            max_vms: 3,
            idle_timeout: Duration::from_secs(60),
            per_repository: None,
            warm,
            slots_missing,
            slots_free: 0,
        }
    }

    #[test]
    fn plans() {
        let (t0, now) = (SystemTime::UNIX_EPOCH + Duration::from_secs(1000), Instant::now());
        let (limits, open) = (limits(0, 0), OPEN);
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
            let d = plan(c.limits, &jobs, &vms, &since, &BTreeSet::new(), c.gate, now);
            assert_eq!(d.provision, c.provision, "{}: provision", c.what);
            assert_eq!(d.surplus, c.surplus, "{}: surplus", c.what);
            assert_eq!(d.reap, c.reap, "{}: reap", c.what);
            assert_eq!((d.bind, d.warm, d.unwarm), (vec![], 0, vec![]), "{}: no warm pool", c.what);
        }
    }

    #[test]
    fn warm_plans() {
        let (t0, now) = (SystemTime::UNIX_EPOCH + Duration::from_secs(1000), Instant::now());
        let (limits, open) = (limits(2, 0), OPEN);
        let q = |id| job(id, "p", "o/r", JobState::Queued, id);
        let v = |name: &str, job_id, state, age: u64| vm(name, "p", job_id, state, t0 + Duration::from_secs(age));
        let w = |name: &str, state, age: u64| VmRec { warm: true, repository: String::new(), ..v(name, 0, state, age) };
        use VmState::*;
        struct Case {
            what: &'static str,
            jobs: Vec<JobRec>,
            vms: Vec<VmRec>,
            cold_only: Vec<u64>,
            limits: Limits,
            gate: Gate,
            bind: Vec<(u64, &'static str)>,
            provision: Vec<u64>,
            warm: usize,
            unwarm: Vec<&'static str>,
        }
        #[rustfmt::skip]
        let cases = vec![
            Case { what: "an idle pool fills its warm VMs", jobs: vec![], vms: vec![], cold_only: vec![], limits, gate: open,
                   bind: vec![], provision: vec![], warm: 2, unwarm: vec![] },
            Case { what: "warm VMs are not surplus runners and are kept", jobs: vec![],
                   vms: vec![w("rv-p-w1", Waiting, 0), w("rv-p-w2", Warming, 1)], cold_only: vec![], limits, gate: open,
                   bind: vec![], provision: vec![], warm: 0, unwarm: vec![] },
            Case { what: "a job takes the oldest waiting VM, which is then replaced", jobs: vec![q(7)],
                   vms: vec![w("rv-p-w2", Waiting, 5), w("rv-p-w1", Waiting, 0)], cold_only: vec![], limits, gate: open,
                   bind: vec![(7, "rv-p-w1")], provision: vec![], warm: 1, unwarm: vec![] },
            Case { what: "more jobs than warm VMs: the rest go cold, within max_vms", jobs: vec![q(1), q(2), q(3)],
                   vms: vec![w("rv-p-w1", Waiting, 0)], cold_only: vec![], limits, gate: open,
                   bind: vec![(1, "rv-p-w1")], provision: vec![2, 3], warm: 0, unwarm: vec![] },
            Case { what: "a booting warm VM counts as a runner coming; no slot is left to top up", jobs: vec![q(1)],
                   vms: vec![w("rv-p-w1", Warming, 0), w("rv-p-w2", Warming, 1), v("rv-p-9", 9, Busy, 0)],
                   cold_only: vec![], limits, gate: open, bind: vec![], provision: vec![], warm: 0, unwarm: vec![] },
            Case { what: "a job a warm VM failed goes cold, not to the next warm VM", jobs: vec![q(1)],
                   vms: vec![w("rv-p-w1", Waiting, 0)], cold_only: vec![1], limits, gate: open,
                   bind: vec![], provision: vec![1], warm: 1, unwarm: vec![] },
            Case { what: "a bound warm VM is a runner: it covers its job", jobs: vec![q(1)],
                   vms: vec![VmRec { warm: true, ..v("rv-p-w1", 1, Binding, 0) }], cold_only: vec![], limits, gate: open,
                   bind: vec![], provision: vec![], warm: 2, unwarm: vec![] },
            Case { what: "back-off: warm VMs still serve, nothing new is made", jobs: vec![q(1), q(2)],
                   vms: vec![w("rv-p-w1", Waiting, 0)], cold_only: vec![], limits, gate: Gate { hold: true, ..open },
                   bind: vec![(1, "rv-p-w1")], provision: vec![], warm: 0, unwarm: vec![] },
            Case { what: "draining: no binding, no topping up, unbound warm VMs go", jobs: vec![q(1)],
                   vms: vec![w("rv-p-w1", Waiting, 0), w("rv-p-w2", Provisioning, 1), VmRec { warm: true, ..v("rv-p-w3", 4, Booting, 0) }],
                   cold_only: vec![], limits, gate: Gate { draining: true, ..open },
                   bind: vec![], provision: vec![], warm: 0, unwarm: vec!["rv-p-w1", "rv-p-w2"] },
            Case { what: "warm lowered: the newest spare waiting VM goes", jobs: vec![],
                   vms: vec![w("rv-p-w1", Waiting, 0), w("rv-p-w2", Waiting, 1)], cold_only: vec![],
                   limits: Limits { warm: 1, ..limits }, gate: open, bind: vec![], provision: vec![], warm: 0, unwarm: vec!["rv-p-w2"] },
            Case { what: "the host cap limits topping up", jobs: vec![], vms: vec![], cold_only: vec![], limits,
                   gate: Gate { host_room: 1, ..open }, bind: vec![], provision: vec![], warm: 1, unwarm: vec![] },
            Case { what: "cold VMs before topping up", jobs: vec![q(1), q(2)], vms: vec![], cold_only: vec![], limits,
                   gate: open, bind: vec![], provision: vec![1, 2], warm: 1, unwarm: vec![] },
            Case { what: "a free slot no restore can use now (no place) leaves the booting warm VM to the job: no waiting one goes",
                   jobs: vec![q(1)],
                   vms: vec![w("rv-p-w0", Waiting, 0), w("rv-p-w1", Warming, 1), VmRec { repository: "o/r".into(), ..v("rv-p-9", 9, Busy, 0) }],
                   cold_only: vec![], limits: Limits { warm: 1, per_repository: Some(1), slots_free: 1, ..limits }, gate: open,
                   bind: vec![], provision: vec![], warm: 0, unwarm: vec![] },
            Case { what: "a job its repository's cap holds back gets no warm VM made for it (one made was reaped when it waited, again and again)",
                   jobs: vec![q(1)],
                   vms: vec![w("rv-p-w1", Warming, 1), VmRec { repository: "o/r".into(), ..v("rv-p-9", 9, Busy, 0) }],
                   cold_only: vec![], limits: Limits { warm: 1, per_repository: Some(1), max_vms: 4, ..limits }, gate: open,
                   bind: vec![], provision: vec![], warm: 0, unwarm: vec![] },
        ];
        for c in cases {
            let jobs: Vec<&JobRec> = c.jobs.iter().collect();
            let vms: Vec<&VmRec> = c.vms.iter().collect();
            let cold_only = c.cold_only.iter().copied().collect();
            let d = plan(c.limits, &jobs, &vms, &BTreeMap::new(), &cold_only, c.gate, now);
            let bind: Vec<(u64, String)> = c.bind.iter().map(|(j, n)| (*j, n.to_string())).collect();
            assert_eq!(d.bind, bind, "{}: bind", c.what);
            assert_eq!(d.provision, c.provision, "{}: provision", c.what);
            assert_eq!(d.warm, c.warm, "{}: warm", c.what);
            assert_eq!(d.unwarm, c.unwarm, "{}: unwarm", c.what);
            let unbound: Vec<&str> = c.vms.iter().filter(|v| v.is_unbound_warm()).map(|v| v.name.as_str()).collect();
            assert!(d.surplus.iter().all(|n| !unbound.contains(&n.as_str())), "{}: surplus {:?}", c.what, d.surplus);
        }
    }

    #[test]
    fn slot_plans() {
        let (t0, now) = (SystemTime::UNIX_EPOCH + Duration::from_secs(1000), Instant::now());
        let (limits, open) = (limits(0, 2), OPEN);
        let q = |id| job(id, "p", "o/r", JobState::Queued, id);
        let making = |name: &str, state| VmRec {
            warm: true,
            for_slot: true,
            repository: String::new(),
            ..vm(name, "p", 0, state, t0)
        };
        use VmState::*;
        let warming = |name: &str| VmRec { for_slot: false, ..making(name, Warming) };
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<JobRec>, Vec<VmRec>, Limits, Gate, Vec<u64>, usize, usize)> = vec![
            ("an idle pool makes its missing slots", vec![], vec![], limits, open, vec![], 0, 2),
            ("jobs first, then warm VMs, then slots, within max_vms", vec![q(1)], vec![],
             Limits { warm: 1, ..limits }, open, vec![1], 1, 1),
            ("a VM being made into a slot is no runner: the job gets a VM; it holds a place",
             vec![q(1)], vec![making("rv-p-s0", Waiting), making("rv-p-s1", Saving)], limits, open, vec![1], 0, 0),
            ("back-off: no slot is made", vec![], vec![], limits, Gate { hold: true, ..open }, vec![], 0, 0),
            ("a free slot serves a job before a warm VM still booting; the next job waits for that one (replaced)",
             vec![q(1), q(2)], vec![warming("rv-p-w1")], Limits { warm: 1, slots_missing: 0, slots_free: 1, ..limits },
             open, vec![1], 1, 0),
            ("two free slots, one booting warm VM: both jobs restored, the warm VM stays spare",
             vec![q(1), q(2)], vec![warming("rv-p-w1")], Limits { warm: 1, slots_missing: 0, slots_free: 2, ..limits },
             open, vec![1, 2], 0, 0),
            ("the host cap limits slots too", vec![], vec![], limits, Gate { host_room: 1, ..open }, vec![], 0, 1),
        ];
        for (what, jobs, vms, limits, gate, provision, warm, slots) in cases {
            let jobs: Vec<&JobRec> = jobs.iter().collect();
            let vms: Vec<&VmRec> = vms.iter().collect();
            let d = plan(limits, &jobs, &vms, &BTreeMap::new(), &BTreeSet::new(), gate, now);
            assert_eq!((d.provision, d.warm, d.slots), (provision, warm, slots), "{what}");
            assert!(d.surplus.is_empty() && d.reap.is_empty() && d.unwarm.is_empty(), "{what}");
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

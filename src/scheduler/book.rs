//! The scheduler's book: jobs and VMs, what changed since the last commit, and the
//! queries every part of the scheduler asks (unserved jobs, a pool's VMs, available
//! runners). Owned by the scheduler task alone.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use crate::clock::Step;
use crate::model::{JobRec, JobState, SlotRec, VmRec};
use crate::store::Batch;

#[derive(Default)]
pub struct Book {
    pub jobs: BTreeMap<u64, JobRec>,
    pub vms: BTreeMap<String, VmRec>,
    /// Snapshot slots saved and ready (one being made is a VM `for_slot`; one in use is
    /// the `slot` of the VM restored from it).
    pub slots: BTreeMap<String, SlotRec>,
    /// Jobs that may still need a runner: every queued job, and jobs changed since the
    /// last commit (a cache of `jobs`, whose finished jobs stay for days: the queries
    /// below read this instead of every job, and check each job's state).
    open: BTreeSet<u64>,
    dirty_jobs: BTreeSet<u64>,
    dirty_vms: BTreeSet<String>,
    removed_jobs: BTreeSet<u64>,
    removed_vms: BTreeSet<String>,
    dirty_slots: BTreeSet<String>,
    removed_slots: BTreeSet<String>,
    inbox_done: BTreeSet<u64>,
    /// Settings to commit (key, value).
    meta: BTreeMap<String, Vec<u8>>,
    /// Changes made, ever (what the gauges last counted is compared with it).
    changes: u64,
}

impl Book {
    pub fn new(jobs: BTreeMap<u64, JobRec>, vms: BTreeMap<String, VmRec>) -> Book {
        let open = jobs.values().filter(|j| j.state == JobState::Queued).map(|j| j.info.id).collect();
        Book { jobs, vms, open, ..Book::default() }
    }

    pub fn with_slots(self, slots: BTreeMap<String, SlotRec>) -> Book {
        Book { slots, ..self }
    }

    pub fn insert_slot(&mut self, slot: SlotRec) {
        self.changes += 1;
        self.removed_slots.remove(&slot.name);
        self.dirty_slots.insert(slot.name.clone());
        self.slots.insert(slot.name.clone(), slot);
    }

    pub fn remove_slot(&mut self, name: &str) -> Option<SlotRec> {
        self.changes += 1;
        self.dirty_slots.remove(name);
        self.removed_slots.insert(name.to_string());
        self.slots.remove(name)
    }

    /// The record of the VM whose libvirt domain is `domain`: the VM of that name, or the
    /// one restored from the slot of that name.
    pub fn vm_of_domain(&self, domain: &str) -> Option<&str> {
        if self.vms.contains_key(domain) {
            return Some(self.vms.get_key_value(domain)?.0);
        }
        self.vms.values().find(|v| v.slot.as_deref() == Some(domain)).map(|v| v.name.as_str())
    }

    /// The VM restored from `slot`, if one is.
    pub fn restored_from(&self, slot: &str) -> Option<&VmRec> {
        self.vms.values().find(|v| v.slot.as_deref() == Some(slot))
    }

    /// Job `id` changed (or is new): it goes into the next commit.
    pub fn touch_job(&mut self, id: u64) {
        self.changes += 1;
        self.dirty_jobs.insert(id);
        self.open.insert(id);
    }

    pub fn touch_vm(&mut self, name: &str) {
        self.changes += 1;
        self.dirty_vms.insert(name.to_string());
    }

    pub fn insert_vm(&mut self, vm: VmRec) {
        self.changes += 1;
        // A name may come back (a slot's) within one commit: the new record stands.
        self.removed_vms.remove(&vm.name);
        self.dirty_vms.insert(vm.name.clone());
        self.vms.insert(vm.name.clone(), vm);
    }

    /// The VM is gone for good, or its record was never committed: the name is deleted at
    /// the next commit either way (deleting a name the store lacks does nothing; a slot's
    /// name may be removed, made again and dropped within one commit, and its older
    /// record still needs that deletion).
    pub fn remove_vm(&mut self, name: &str) -> Option<VmRec> {
        self.changes += 1;
        self.dirty_vms.remove(name);
        self.removed_vms.insert(name.to_string());
        self.vms.remove(name)
    }

    pub fn remove_job(&mut self, id: u64) {
        self.changes += 1;
        self.dirty_jobs.remove(&id);
        self.open.remove(&id);
        self.removed_jobs.insert(id);
        self.jobs.remove(&id);
    }

    /// Inbox entry `seq` is applied: it leaves the inbox with the next commit.
    pub fn applied(&mut self, seq: u64) {
        self.inbox_done.insert(seq);
    }

    /// How many changes were made to jobs, VMs and slots, ever (commits included): equal
    /// at two points, nothing changed between them.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Everything changed since the last commit.
    pub fn batch(&self) -> Batch {
        Batch {
            jobs: self.dirty_jobs.iter().filter_map(|id| self.jobs.get(id).cloned()).collect(),
            remove_jobs: self.removed_jobs.iter().copied().collect(),
            vms: self.dirty_vms.iter().filter_map(|n| self.vms.get(n).cloned()).collect(),
            remove_vms: self.removed_vms.iter().cloned().collect(),
            slots: self.dirty_slots.iter().filter_map(|n| self.slots.get(n).cloned()).collect(),
            remove_slots: self.removed_slots.iter().cloned().collect(),
            inbox_done: self.inbox_done.iter().copied().collect(),
            meta: self.meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }

    /// The last [`Book::batch`] is durable.
    pub fn committed(&mut self) {
        let jobs = &self.jobs;
        for id in &self.dirty_jobs {
            if jobs.get(id).is_none_or(|j| j.state != JobState::Queued) {
                self.open.remove(id);
            }
        }
        self.dirty_jobs.clear();
        self.dirty_vms.clear();
        self.removed_jobs.clear();
        self.removed_vms.clear();
        self.dirty_slots.clear();
        self.removed_slots.clear();
        self.inbox_done.clear();
        self.meta.clear();
    }

    /// A setting, committed with the next batch.
    pub fn set_meta(&mut self, key: &str, value: Vec<u8>) {
        self.changes += 1;
        self.meta.insert(key.to_string(), value);
    }

    /// The wall clock was stepped by `step`: every timestamp of the book (the VMs', the
    /// jobs', the slots') moves by it, so that the step ages nothing and holds nothing back.
    pub fn shift(&mut self, step: Step) {
        self.retime(|t| step.apply(t));
    }

    /// After a reboot, nothing to measure a step against: no timestamp stays later than
    /// `now` (one of the last boot's, on a clock set wrong then, would hold timers back).
    pub fn clamp(&mut self, now: SystemTime) {
        let later = |t: &SystemTime| *t > now;
        let vms = self.vms.values().any(|v| later(&v.created_at) || later(&v.state_since));
        let jobs = self.jobs.values().any(|j| later(&j.received_at) || later(&j.updated_at));
        if vms || jobs || self.slots.values().any(|s| later(&s.saved_at)) {
            self.retime(|t| t.min(now));
        }
    }

    fn retime(&mut self, f: impl Fn(SystemTime) -> SystemTime) {
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for name in names {
            let vm = self.vms.get_mut(&name).expect("listed");
            (vm.created_at, vm.state_since) = (f(vm.created_at), f(vm.state_since));
            self.touch_vm(&name);
        }
        let ids: Vec<u64> = self.jobs.keys().copied().collect();
        for id in ids {
            let job = self.jobs.get_mut(&id).expect("listed");
            (job.received_at, job.updated_at) = (f(job.received_at), f(job.updated_at));
            self.touch_job(id);
        }
        let slots: Vec<String> = self.slots.keys().cloned().collect();
        for name in slots {
            let slot = self.slots.get_mut(&name).expect("listed");
            slot.saved_at = f(slot.saved_at);
            self.changes += 1;
            self.dirty_slots.insert(name);
        }
    }

    /// The pool's jobs that still need a runner, oldest first.
    pub fn unserved(&self, pool: &str) -> Vec<&JobRec> {
        let mut jobs: Vec<&JobRec> = self.all_unserved().filter(|j| j.pool.as_deref() == Some(pool)).collect();
        jobs.sort_by_key(|j| (j.received_at, j.info.id));
        jobs
    }

    /// How many jobs each pool has that still need a runner.
    pub fn unserved_counts(&self) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for pool in self.all_unserved().filter_map(|j| j.pool.as_deref()) {
            *counts.entry(pool).or_default() += 1;
        }
        counts
    }

    /// Every job that still needs a runner, in any pool, by id.
    pub fn all_unserved(&self) -> impl Iterator<Item = &JobRec> {
        self.open.iter().filter_map(|id| self.jobs.get(id)).filter(|j| j.is_unserved())
    }

    /// Whether a VM charged to job `id` is still being asked about (`VmRec::charged`): its
    /// runner may be running the job.
    pub fn charged_to(&self, id: u64) -> bool {
        self.vms.values().any(|v| v.charged && v.job_id == id)
    }

    /// The jobs whose own VM's runner went busy with a job nothing named yet less than
    /// `within` before `now` (its age counted from the later of that and the agent's start,
    /// `running_for` ago): GitHub's runner list said so before the job's `in_progress`
    /// webhook or message came (lost, late, or sent while the agent restarted). Most likely
    /// the runner took its own job, which needs no other VM meanwhile. (One that took
    /// another is named by that job's news; none coming, its own job gets a VM once
    /// `within` passed.) Not a job with another VM coming (one made once an earlier hold
    /// passed): held, the job would leave that VM surplus.
    pub fn taken_unheard(&self, now: SystemTime, running_for: Duration, within: Duration) -> BTreeSet<u64> {
        let coming: BTreeSet<u64> =
            self.vms.values().filter(|v| v.reap.is_none() && v.is_available()).map(|v| v.job_id).collect();
        self.vms
            .values()
            .filter(|v| v.is_busy_unnamed() && !coming.contains(&v.job_id))
            .filter(|v| now.duration_since(v.state_since).unwrap_or_default().min(running_for) < within)
            .map(|v| v.job_id)
            .collect()
    }

    /// Whether the job `j` waits on its last attempt (of `max_attempts`), whose VM's
    /// teardown still asks GitHub about its runner: it needs no VM meanwhile, the attempt
    /// stands (the job is given up) or is given back.
    pub fn last_attempt_in_question(&self, j: &JobRec, max_attempts: u32) -> bool {
        j.failed_vms >= max_attempts && self.charged_to(j.info.id)
    }

    /// The pool's VMs, in every state (each holds a slot of its `max_vms`).
    pub fn vms_of<'a>(&'a self, pool: &'a str) -> impl Iterator<Item = &'a VmRec> + 'a {
        self.vms.values().filter(move |v| v.pool == pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobState, VmState};
    use crate::scheduler::fixtures::{job, vm};

    /// Only a busy VM with no job named covers its own job, for `within` from the later of
    /// its state's change and the agent's start, and only while no other VM is coming for
    /// it.
    #[test]
    fn a_runner_busy_with_a_job_nothing_named_covers_its_own_job_for_a_while() {
        use std::time::Duration;
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let within = Duration::from_secs(60);
        let long = Duration::from_secs(3600);
        let at = |state: VmState, since: u64, took: Option<u64>| {
            let mut v = vm("rv-a-1", "a", 1, state, t(since));
            v.took_job = took;
            v
        };
        let table = [
            ("busy, unnamed, 59 s", at(VmState::Busy, 1041, None), long, true),
            ("busy, unnamed, 60 s", at(VmState::Busy, 1040, None), long, false),
            ("busy since after now (a clock step)", at(VmState::Busy, 1200, None), long, true),
            ("busy long, but the agent started 10 s ago", at(VmState::Busy, 100, None), Duration::from_secs(10), true),
            ("finishing, unnamed", at(VmState::Finishing, 1090, None), long, false),
            ("busy with its job named", at(VmState::Busy, 1090, Some(1)), long, false),
            ("busy with another job named", at(VmState::Busy, 1090, Some(2)), long, false),
            ("idle", at(VmState::Idle, 1090, None), long, false),
            ("booting", at(VmState::Booting, 1090, None), long, false),
        ];
        for (what, v, running_for, covered) in table {
            let book = Book::new(BTreeMap::new(), [(v.name.clone(), v)].into());
            let got = book.taken_unheard(t(1100), running_for, within);
            assert_eq!(got.contains(&1), covered, "{what}");
        }
        // Its next VM already coming (booting, say: made once an earlier hold passed), a
        // fresh hold (the agent restarted) would leave that one surplus: none.
        let busy = at(VmState::Busy, 100, None);
        let next = vm("rv-a-1-2", "a", 1, VmState::Booting, t(1090));
        let book = Book::new(BTreeMap::new(), [(busy.name.clone(), busy), (next.name.clone(), next)].into());
        assert!(book.taken_unheard(t(1100), Duration::from_secs(10), within).is_empty());
    }

    /// A step moves every timestamp of the book by it, and commits them; after a reboot
    /// none stays later than now.
    #[test]
    fn a_step_moves_every_timestamp_and_a_reboot_clamps_the_future() {
        use std::time::Duration;
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let jobs = [
            job(1, "a", "o/r", JobState::Queued, 100),
            job(2, "a", "o/r", JobState::InProgress { runner: Some("rv-a-2".into()) }, 200),
            job(3, "a", "o/r", JobState::Completed { conclusion: None, runner: None }, 300),
        ];
        let vms = [vm("rv-a-1", "a", 1, VmState::Busy, t(150))];
        let mut book = Book::new(
            jobs.into_iter().map(|j| (j.info.id, j)).collect(),
            vms.into_iter().map(|v| (v.name.clone(), v)).collect(),
        );
        book.committed();
        book.shift(Step(-50 * 1_000_000_000));
        assert_eq!(book.vms["rv-a-1"].created_at, t(100));
        assert_eq!(book.vms["rv-a-1"].state_since, t(100));
        let received: Vec<SystemTime> = book.jobs.values().map(|j| j.received_at).collect();
        assert_eq!(received, [t(50), t(150), t(250)], "every job, running and finished too");
        let batch = book.batch();
        assert_eq!((batch.jobs.len(), batch.vms.len()), (3, 1), "all of it committed");
        book.committed();
        book.clamp(t(120));
        assert_eq!(book.jobs.values().map(|j| j.received_at).collect::<Vec<_>>(), [t(50), t(120), t(120)]);
        assert_eq!(book.vms["rv-a-1"].created_at, t(100), "earlier times stay");
        book.committed();
        book.clamp(t(1000));
        assert!(book.batch().is_empty(), "nothing later than now: nothing written");
    }

    #[test]
    fn unserved_oldest_first_and_commits_carry_changes_once() {
        let jobs = [
            job(3, "a", "o/r", JobState::Queued, 10),
            job(1, "a", "o/r", JobState::Queued, 20),
            job(2, "a", "o/r", JobState::Completed { conclusion: Some("success".into()), runner: None }, 5),
            job(4, "b", "o/r", JobState::Queued, 1),
        ];
        let mut book = Book::new(jobs.into_iter().map(|j| (j.info.id, j)).collect(), BTreeMap::new());
        assert_eq!(book.unserved("a").iter().map(|j| j.info.id).collect::<Vec<_>>(), [3, 1]);
        assert_eq!(book.all_unserved().count(), 3);

        book.touch_job(3);
        book.remove_job(4);
        book.applied(7);
        let now = SystemTime::now();
        book.insert_vm(vm("rv-a-3", "a", 3, VmState::Provisioning, now));
        book.insert_vm(vm("rv-a-9", "a", 9, VmState::Provisioning, now));
        book.remove_vm("rv-a-9");
        let b = book.batch();
        assert_eq!(b.jobs.iter().map(|j| j.info.id).collect::<Vec<_>>(), [3]);
        assert_eq!(b.remove_jobs, [4]);
        assert_eq!(b.vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["rv-a-3"], "dropped: never written");
        assert_eq!(b.inbox_done, [7]);
        book.committed();
        assert!(book.batch().is_empty());
        assert_eq!(book.vms_of("a").count(), 1);
        book.remove_vm("rv-a-3");
        assert_eq!(book.batch().remove_vms, ["rv-a-3"]);
    }

    /// A slot's VM torn down, its name made again and that record dropped (its commit
    /// failed), all before a commit: the first record is still deleted. (Dropping the
    /// second lost the deletion, and the store reloaded a VM whose domain was gone:
    /// simulator seed 638 of 1,000 steps, on a full disk.)
    #[test]
    fn a_name_dropped_after_coming_back_is_still_deleted() {
        let now = SystemTime::now();
        let mut book = Book::new(BTreeMap::new(), BTreeMap::new());
        book.insert_vm(vm("rv-a-s0", "a", 0, VmState::Waiting, now));
        book.committed();
        book.remove_vm("rv-a-s0");
        book.insert_vm(vm("rv-a-s0", "a", 0, VmState::Provisioning, now));
        assert!(book.batch().remove_vms.is_empty(), "the new record stands");
        book.remove_vm("rv-a-s0");
        let b = book.batch();
        assert!(b.vms.is_empty());
        assert_eq!(b.remove_vms, ["rv-a-s0"], "the committed record goes");
    }

    /// A job waits on its last attempt only while it has none left and a VM charged to it
    /// is being asked about (not a VM of its that is charged with no attempt spent).
    #[test]
    fn a_job_waits_on_its_last_attempt_only_when_spent_with_a_charged_vm() {
        let t = SystemTime::UNIX_EPOCH;
        let mut jobs = [job(1, "a", "o/r", JobState::Queued, 10), job(2, "a", "o/r", JobState::Queued, 10)];
        jobs[0].failed_vms = 2;
        jobs[1].failed_vms = 2;
        let mut asked = vm("rv-a-1-1", "a", 1, VmState::TearingDown, t);
        asked.charged = true;
        let mut other = vm("rv-a-2-1", "a", 2, VmState::TearingDown, t);
        other.charged = false;
        let book = Book::new(
            jobs.iter().cloned().map(|j| (j.info.id, j)).collect(),
            [asked, other].into_iter().map(|v| (v.name.clone(), v)).collect(),
        );
        let cases = [(1, 2, true), (1, 3, false), (1, 1, true), (2, 2, false)];
        for (id, max, waits) in cases {
            assert_eq!(
                book.last_attempt_in_question(&jobs[id as usize - 1], max),
                waits,
                "job {id}, max_attempts {max}"
            );
        }
    }
}

//! Intake: job events from the inbox (webhooks) and from GitHub polling, applied to the
//! book through [`super::job::next`].

use std::collections::BTreeSet;
use std::time::SystemTime;

use tracing::{debug, error, info};

use super::Scheduler;
use super::job;
use super::vm::Input;
use crate::github::GitHub;
use crate::hypervisor::Hypervisor;
use crate::metrics::{self, ConclusionLabels};
use crate::model::{JobAction, JobEvent, JobInfo, JobRec, JobState, VmState, label_set};

/// Inbox entries applied per commit.
const INBOX_CHUNK: usize = 1024;

/// Label sets of unmatched jobs remembered as already logged; beyond it, the set restarts.
const UNMATCHED_LOGGED_MAX: usize = 256;

#[derive(Default)]
pub struct State {
    /// Label sets of jobs no pool serves, already logged at info: each set is logged once
    /// (then at debug), so that an organization's GitHub-hosted jobs do not fill the journal.
    unmatched_logged: BTreeSet<Vec<String>>,
    /// When a webhook last brought a job event (the scheduler's clock).
    pub last_webhook: Option<SystemTime>,
    /// Each pool that takes jobs, by its label set (see [`Scheduler::index_pools`]).
    pools_by_labels: Vec<(Vec<String>, String)>,
    /// The last inbox entry applied (entries are numbered in commit order): everything up
    /// to it is applied, whether or not its removal is committed.
    inbox_read: u64,
}

impl<G: GitHub, H: Hypervisor> Scheduler<G, H> {
    /// Applies the inbox, [`INBOX_CHUNK`] entries to a commit, so that a backlog (a burst
    /// of deliveries the scheduler has not kept up with) never sits in memory at once.
    pub(super) fn drain_inbox(&mut self) {
        loop {
            let inbox = match self.store.inbox(self.intake.inbox_read, INBOX_CHUNK) {
                Ok(i) => i,
                Err(e) => {
                    error!(error = %e, "cannot read the inbox");
                    return;
                }
            };
            let full = inbox.len() == INBOX_CHUNK;
            for (seq, ev) in inbox {
                // Read on from here next time: an applied entry whose removal is not
                // committed yet (see `flush`) is not applied twice.
                self.intake.inbox_read = seq;
                self.intake.last_webhook = Some(self.now());
                self.apply(ev);
                self.book.applied(seq);
            }
            // A failed commit keeps the entries in the inbox (and marked applied): they
            // leave with the next commit that succeeds.
            if self.flush().is_err() || !full {
                return;
            }
        }
    }

    /// Indexes the installed config's pools by label set (at start and after a reload),
    /// so that matching a job does not recompute every pool's set.
    pub(super) fn index_pools(&mut self) {
        // A scale set's jobs are those GitHub assigns to it (its listener names the set):
        // a webhook about one (the hook hears of every job) matches no pool.
        self.intake.pools_by_labels = self
            .config
            .pools
            .iter()
            .filter(|p| !p.retiring && p.scale_set().is_none())
            .map(|p| (label_set(&p.labels), p.name.clone()))
            .collect();
    }

    pub(super) fn match_pool(&self, labels: &[String]) -> Option<String> {
        let want = label_set(labels);
        self.intake.pools_by_labels.iter().find(|(set, _)| *set == want).map(|(_, name)| name.clone())
    }

    /// The pool that takes `ev`'s job: the one whose scale set GitHub assigned it to, or the
    /// one whose labels are exactly the job's.
    pub(super) fn pool_for(&self, ev: &JobEvent) -> Option<String> {
        match &ev.job.scale_set {
            Some(set) => self
                .config
                .pools
                .iter()
                .find(|c| !c.retiring && c.scale_set().is_some_and(|s| s.eq_ignore_ascii_case(set)))
                .map(|c| c.name.clone()),
            None => self.match_pool(&ev.job.labels),
        }
    }

    /// Whether a webhook's job is a scale set's: its runner is a VM of a scale-set pool, or
    /// its labels are among a scale set's (its name and labels: GitHub routes a job to the
    /// set whose labels cover it).
    fn a_scale_sets(&self, ev: &JobEvent) -> bool {
        let sets = || self.config.pools.iter().filter(|p| p.scale_set().is_some());
        let runner_pool = ev.job.runner_name.as_ref().and_then(|r| self.book.vms.get(r)).map(|v| v.pool.as_str());
        if let Some(pool) = runner_pool {
            return sets().any(|p| p.name == pool);
        }
        !ev.job.labels.is_empty() && sets().any(|p| p.scale_set_covers(&ev.job.labels))
    }

    pub(super) fn new_job(&self, info: &JobInfo, pool: Option<String>, received_at: SystemTime) -> JobRec {
        JobRec {
            pool,
            info: JobInfo { runner_name: None, conclusion: None, ..info.clone() },
            state: JobState::Queued,
            received_at,
            vms_made: 0,
            failed_vms: 0,
            updated_at: self.now(),
        }
    }

    /// Applies one job event (see [`job::next`]): duplicates, redeliveries and reordering
    /// (e.g. `completed` before `queued`) change nothing once a later state is known. The
    /// runner named in the event, if it is one of our VMs, moves that VM along.
    pub(super) fn apply(&mut self, ev: JobEvent) {
        let id = ev.job.id;
        if ev.job.scale_set.is_none() && self.a_scale_sets(&ev) {
            // The hook hears of every job, a scale set's too: its news is the set's messages
            // (under the request's id), and taken from a webhook as well it would be counted
            // twice, or make its VM look busy with a job its pool does not know.
            debug!(job_id = id, labels = ?ev.job.labels, runner = ?ev.job.runner_name, "a webhook about a scale set's job: its set's messages say it");
            return;
        }
        let pool = self.pool_for(&ev);
        if !self.book.jobs.contains_key(&id) && pool.is_none() {
            // No pool serves it: a counter, not a record — unless it names one of our
            // runners (a runner may take any job its labels cover), which must be tracked.
            let names_ours = ev.job.runner_name.as_ref().is_some_and(|r| self.book.vms.contains_key(r));
            if !names_ours {
                if ev.action == JobAction::Queued {
                    self.metrics.jobs_unmatched.inc();
                    let set = label_set(&ev.job.labels);
                    if self.intake.unmatched_logged.contains(&set) {
                        debug!(job_id = id, repository = %ev.job.repository, labels = ?ev.job.labels, "no pool has exactly these labels; job ignored");
                    } else {
                        info!(job_id = id, repository = %ev.job.repository, labels = ?ev.job.labels, "no pool has exactly these labels; job ignored (further jobs with these labels are only counted: runnervisor_jobs_unmatched_total)");
                        if self.intake.unmatched_logged.len() >= UNMATCHED_LOGGED_MAX {
                            self.intake.unmatched_logged.clear();
                        }
                        self.intake.unmatched_logged.insert(set);
                    }
                }
                return;
            }
        }
        let current = self.book.jobs.get(&id).map(|j| j.state.clone());
        let changed = job::next(current.as_ref(), ev.action, &ev.job, ev.job.scale_set.is_some());
        if let Some(state) = changed.clone() {
            let now = self.now();
            let fresh = current.is_none().then(|| self.new_job(&ev.job, pool, ev.received_at));
            let job = match fresh {
                Some(j) => self.book.jobs.entry(id).or_insert(j),
                None => self.book.jobs.get_mut(&id).expect("known"),
            };
            job.state = state;
            job.updated_at = now;
            self.book.touch_job(id);
        } else {
            debug!(job_id = id, delivery = %ev.delivery, action = ?ev.action, "event changes nothing (duplicate, late or reordered)");
        }
        let Some(job) = self.book.jobs.get(&id) else { return };
        let (pool, received) = (job.pool.clone(), job.received_at);
        // The runner the event names; for an end that names none, the one the job started on
        // (`JobState::Completed`'s: a scale set's job cancelled once its runner took it).
        let named = ev.job.runner_name.clone().or_else(|| match &changed {
            Some(JobState::Completed { runner, .. }) => runner.clone(),
            _ => None,
        });
        let ours = named.clone().filter(|r| self.book.vms.contains_key(r));
        match (ev.action, changed.is_some()) {
            (JobAction::Queued, true) => {
                if let Some(pool) = &pool {
                    self.metrics.jobs_received.get_or_create(&metrics::pool(pool)).inc();
                    info!(job_id = id, run_id = ev.job.run_id, repository = %ev.job.repository, pool = %pool, workflow = %ev.job.workflow_name, "job queued");
                }
            }
            (JobAction::InProgress, changed) => match &ours {
                Some(vm) => {
                    self.runner_took(vm, id, changed);
                    self.transition(vm, Input::TookJob);
                    if changed {
                        let vm_pool = self.book.vms[vm].pool.clone();
                        self.metrics.jobs_started.get_or_create(&metrics::pool(&vm_pool)).inc();
                        let waited = self.now().duration_since(received).unwrap_or_default();
                        self.metrics
                            .queued_to_runner_online_seconds
                            .get_or_create(&metrics::pool(&vm_pool))
                            .observe(waited.as_secs_f64());
                        info!(job_id = id, run_id = ev.job.run_id, repository = %ev.job.repository, pool = %vm_pool, vm = %vm, runner_name = %vm, "job started on our runner");
                    }
                }
                None if changed => {
                    debug!(job_id = id, runner_name = ?ev.job.runner_name, pool = ?pool, "job started on a runner that is not ours")
                }
                None => {}
            },
            (JobAction::Completed, changed) => {
                let conclusion = ev.job.conclusion.clone().unwrap_or_default();
                match &ours {
                    Some(vm) => {
                        // The job's `in_progress` lost or not come yet: its end names
                        // the job the runner took as well. (No swap in a fleet: the job
                        // ran its course, a VM the other member made for it long gone or
                        // taken, and another VM of ours may be on its way for ours.)
                        if self.book.vms[vm].took_job.is_none() {
                            self.runner_took(vm, id, false);
                        }
                        if changed {
                            let vm_pool = self.book.vms[vm].pool.clone();
                            self.metrics
                                .jobs_completed
                                .get_or_create(&ConclusionLabels::new(&vm_pool, &conclusion))
                                .inc();
                            info!(job_id = id, repository = %ev.job.repository, pool = %vm_pool, vm = %vm, runner_name = %vm, conclusion = %conclusion, "job completed on our runner");
                        }
                        // The runner ran its one job (it is ephemeral): GitHub removes it,
                        // unless the runner died with its VM (`VmRec::runner_done`): a job that
                        // did not succeed (failed, cancelled, timed out), or whose VM was
                        // going, may be such a one's.
                        let unsuccessful = conclusion != "success";
                        if let Some(v) =
                            self.book.vms.get_mut(vm).filter(|v| !unsuccessful && v.state != VmState::TearingDown)
                        {
                            v.runner_done = true;
                        }
                        // A teardown waiting out its back-off (GitHub kept the dead VM's runner
                        // busy) goes on now: the job's end is what frees the runner.
                        self.retry_teardowns_now(Some(vm));
                        self.book.touch_vm(vm);
                        self.transition(vm, Input::JobCompleted);
                    }
                    None if changed && named.is_none() => {
                        info!(job_id = id, repository = %ev.job.repository, conclusion = %conclusion, "job completed before any runner took it")
                    }
                    None if changed => debug!(job_id = id, "job completed on a runner that is not ours"),
                    None => {}
                }
            }
            _ => {}
        }
    }

    /// Our VM `vm`'s runner took job `id`; `swap`: a fleet's member is told (a job's start,
    /// news not a repeat: `Claims::runner_swapped`).
    fn runner_took(&mut self, vm: &str, id: u64, swap: bool) {
        let made_for = self.book.vms[vm].job_id;
        if let Some(fleet) = self.fleet.as_mut().filter(|_| swap) {
            fleet.runner_swapped(made_for, id, tokio::time::Instant::now());
        }
        self.book.vms.get_mut(vm).expect("ours").took_job = Some(id);
        self.book.touch_vm(vm);
    }
}

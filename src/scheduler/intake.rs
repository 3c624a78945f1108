//! Intake: job events from the inbox (webhooks) and from GitHub polling, applied to the
//! book through [`super::job::next`].

use std::time::SystemTime;

use tracing::{debug, error, info};

use super::Scheduler;
use super::job;
use super::vm::Input;
use crate::github::GitHub;
use crate::hypervisor::Hypervisor;
use crate::metrics::{self, ConclusionLabels};
use crate::model::{JobAction, JobEvent, JobInfo, JobRec, JobState};

impl<G: GitHub, H: Hypervisor> Scheduler<G, H> {
    pub(super) fn drain_inbox(&mut self) {
        let inbox = match self.store.inbox() {
            Ok(i) => i,
            Err(e) => {
                error!(error = %e, "cannot read the inbox");
                return;
            }
        };
        for (seq, ev) in inbox {
            if self.book.is_applied(seq) {
                continue;
            }
            self.apply(ev);
            self.book.applied(seq);
        }
        let _ = self.flush();
    }

    pub(super) fn match_pool(&self, labels: &[String]) -> Option<String> {
        let mut want: Vec<String> = labels.iter().map(|l| l.to_lowercase()).collect();
        want.sort();
        want.dedup();
        self.config
            .pools
            .iter()
            .find(|p| {
                let mut have: Vec<String> = p.labels.iter().map(|l| l.to_lowercase()).collect();
                have.sort();
                have == want
            })
            .map(|p| p.name.clone())
    }

    pub(super) fn new_job(&self, info: &JobInfo, received_at: SystemTime) -> JobRec {
        JobRec {
            pool: self.match_pool(&info.labels),
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
        if !self.book.jobs.contains_key(&id) && self.match_pool(&ev.job.labels).is_none() {
            // No pool serves it: a counter, not a record — unless it names one of our
            // runners (a runner may take any job its labels cover), which must be tracked.
            let names_ours = ev.job.runner_name.as_ref().is_some_and(|r| self.book.vms.contains_key(r));
            if !names_ours {
                if ev.action == JobAction::Queued {
                    self.metrics.jobs_unmatched.inc();
                    info!(job_id = id, repository = %ev.job.repository, labels = ?ev.job.labels, "no pool has exactly these labels; job ignored");
                }
                return;
            }
        }
        let current = self.book.jobs.get(&id).map(|j| j.state.clone());
        let changed = job::next(current.as_ref(), ev.action, &ev.job);
        if let Some(state) = changed.clone() {
            let now = self.now();
            let fresh = current.is_none().then(|| self.new_job(&ev.job, ev.received_at));
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
        let ours = ev.job.runner_name.clone().filter(|r| self.book.vms.contains_key(r));
        match (ev.action, changed.is_some()) {
            (JobAction::Queued, true) => {
                if let Some(pool) = &pool {
                    self.metrics.jobs_received.get_or_create(&metrics::pool(pool)).inc();
                    info!(job_id = id, run_id = ev.job.run_id, repository = %ev.job.repository, pool = %pool, workflow = %ev.job.workflow_name, "job queued");
                }
            }
            (JobAction::InProgress, changed) => match &ours {
                Some(vm) => {
                    self.book.vms.get_mut(vm).expect("ours").took_job = Some(id);
                    self.book.touch_vm(vm);
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
                        if changed {
                            let vm_pool = self.book.vms[vm].pool.clone();
                            self.metrics
                                .jobs_completed
                                .get_or_create(&ConclusionLabels::new(&vm_pool, &conclusion))
                                .inc();
                            info!(job_id = id, repository = %ev.job.repository, pool = %vm_pool, vm = %vm, runner_name = %vm, conclusion = %conclusion, "job completed on our runner");
                        }
                        self.transition(vm, Input::JobCompleted);
                    }
                    None if changed && ev.job.runner_name.is_none() => {
                        info!(job_id = id, repository = %ev.job.repository, conclusion = %conclusion, "job completed before any runner took it")
                    }
                    None if changed => debug!(job_id = id, "job completed on a runner that is not ours"),
                    None => {}
                }
            }
            _ => {}
        }
    }
}

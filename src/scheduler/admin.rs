//! The admin socket's commands: status, drain, destroying a VM.

use std::time::SystemTime;

use tracing::info;

use super::{AdminCommand, Scheduler};
use crate::admin::proto::{FleetStatus, PoolStatus, QueuedStatus, Reply, Status, VmStatus};
use crate::github::GitHub;
use crate::hypervisor::Hypervisor;
use crate::model::Reason;
use crate::store::Batch;

impl<G: GitHub, H: Hypervisor> Scheduler<G, H> {
    pub(super) fn on_admin(&mut self, cmd: AdminCommand) -> Reply {
        match cmd {
            AdminCommand::Status => Reply::Status(self.status()),
            AdminCommand::Timeline => Reply::Timeline(self.timeline.traces()),
            AdminCommand::Drain(on) => {
                if let Err(e) = self.store.commit(&Batch {
                    meta: vec![("draining".into(), if on { b"1".to_vec() } else { b"0".to_vec() })],
                    ..Default::default()
                }) {
                    // The store may still have kept it (an error after its last write): what it
                    // holds is applied at the next start, and the command is safe to repeat.
                    let now = if self.draining { "draining" } else { "taking jobs" };
                    return Reply::Error(format!(
                        "cannot persist drain state: {e}; the agent goes on {now} (run the command again once its store works: whether the store kept it shows in `runnervisor status` after a restart)"
                    ));
                }
                self.draining = on;
                self.metrics.draining.set(on as i64);
                info!(draining = on, "drain state changed");
                Reply::Ok(if on {
                    "draining: no new jobs are taken; running VMs finish".into()
                } else {
                    "taking jobs again".into()
                })
            }
            AdminCommand::DestroyVm(name) => match self.book.vms.get(&name) {
                None => Reply::Error(format!("no vm named {name:?} (see runnervisor status)")),
                Some(_) => {
                    self.reap(&name, Reason::Operator);
                    Reply::Ok(format!("{name}: teardown started (domain, volumes, runner registration)"))
                }
            },
        }
    }

    pub(super) fn status(&self) -> Status {
        let now = self.now();
        let age = |t: SystemTime| now.duration_since(t).unwrap_or_default().as_secs();
        Status {
            draining: self.draining,
            libvirt_connected: self.hv.ready,
            hypervisor_problem: if self.hv.ready { None } else { self.hv.problem.clone() },
            pools: self
                .config
                .pools
                .iter()
                .map(|p| PoolStatus {
                    name: p.name.clone(),
                    vms: self.book.vms_of(&p.name).count(),
                    max_vms: p.max_vms,
                    queued: self.book.unserved(&p.name).len(),
                    warm: p.warm,
                    warm_waiting: self
                        .book
                        .vms_of(&p.name)
                        .filter(|v| v.is_unbound_warm() && v.state == crate::model::VmState::Waiting)
                        .count(),
                    retiring: p.retiring,
                    slots: p.snapshot_slots,
                    slots_ready: self.free_slots(&p.name).len(),
                    scale_set: match (&self.scale_sets, p.scale_set()) {
                        (Some(registry), Some(name)) => Some(registry.status(&p.name, name)),
                        (None, Some(name)) => Some(crate::admin::proto::ScaleSetStatus {
                            name: name.to_string(),
                            id: None,
                            session: false,
                            capacity: 0,
                        }),
                        _ => None,
                    },
                })
                .collect(),
            queued: self
                .book
                .all_unserved()
                .map(|j| QueuedStatus {
                    job_id: j.info.id,
                    pool: j.pool.clone().unwrap_or_default(),
                    repository: j.info.repository.clone(),
                    age_secs: age(j.received_at),
                })
                .collect(),
            vms: self
                .book
                .vms
                .values()
                .map(|v| VmStatus {
                    name: v.name.clone(),
                    pool: v.pool.clone(),
                    state: v.state.as_str().into(),
                    age_secs: age(v.created_at),
                    job_id: v.job_id,
                    took_job: v.took_job,
                    runner_id: v.runner_id,
                    repository: v.repository.clone(),
                    warm: v.warm,
                    slot: v.slot.clone(),
                    for_slot: v.for_slot,
                    going: v.reap.filter(|_| self.in_call(&v.name)).map(|r| r.as_str().into()),
                })
                .collect(),
            fleet: self.fleet.as_ref().map(|f| FleetStatus {
                host_id: f.host.clone(),
                held: f.held(),
                members: f.members.clone(),
            }),
        }
    }
}

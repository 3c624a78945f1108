//! A reloaded configuration installed (see [`crate::config::reload`]), and pools a reload
//! removed forgotten once their last VM is gone.

use std::sync::Arc;

use tracing::{info, warn};

use super::Scheduler;
use crate::config::{Config, PoolConfig, ReloadReport};
use crate::github::GitHub;
use crate::hypervisor::Hypervisor;
use crate::model::JobState;

impl<G: GitHub, H: Hypervisor> Scheduler<G, H> {
    pub(super) fn on_reload(&mut self, new: &Config) -> ReloadReport {
        let reloaded = crate::config::reload(&self.config, new.clone());
        self.install(reloaded.config);
        self.drop_retiring_jobs();
        reloaded.report
    }

    /// A removed pool's queued jobs are dropped (nothing will serve them here).
    fn drop_retiring_jobs(&mut self) {
        let dropped: Vec<(u64, String)> = self
            .book
            .jobs
            .values()
            .filter(|j| j.state == JobState::Queued)
            .filter_map(|j| {
                let pool = j.pool.as_deref()?;
                self.config.pool(pool).is_some_and(|p| p.retiring).then(|| (j.info.id, pool.to_string()))
            })
            .collect();
        for (id, pool) in dropped {
            info!(job_id = id, pool = %pool, "queued job dropped: its pool was removed from the configuration");
            self.book.remove_job(id);
        }
    }

    /// At start: the store's VMs and queued jobs of a pool the configuration no longer has
    /// (removed while the agent was stopped, or by a reload it did not live to finish) are
    /// a retiring pool's, as after a reload that removed it: its VMs finish and go by the
    /// default timers (the pool's own are not known), its queued jobs are dropped, and it
    /// makes none. Without it its VMs had no timer at all, and held their places for good.
    pub(super) fn retire_unknown_pools(&mut self) {
        let vms = self.book.vms.values().map(|v| v.pool.as_str());
        let jobs = self.book.jobs.values().filter(|j| j.state == JobState::Queued).filter_map(|j| j.pool.as_deref());
        let unknown: std::collections::BTreeSet<String> =
            vms.chain(jobs).filter(|p| self.config.pool(p).is_none()).map(str::to_string).collect();
        if unknown.is_empty() {
            return;
        }
        let mut config = (*self.config).clone();
        for name in unknown {
            let vms = self.book.vms_of(&name).count();
            match PoolConfig::retiring(&name) {
                Ok(pool) => {
                    warn!(pool = %name, vms, max_lifetime_secs = pool.max_lifetime.as_secs(), "the store has VMs or jobs of a pool the configuration does not: as after a reload that removed the pool, its queued jobs are dropped and its VMs finish (by the default timers)");
                    config.pools.push(pool);
                }
                Err(e) => warn!(pool = %name, vms, error = %e, "cannot retire a pool the configuration does not have"),
            }
        }
        self.install(config);
        self.drop_retiring_jobs();
    }

    fn install(&mut self, config: Config) {
        let config = Arc::new(config);
        self.config = config.clone();
        self.ctx.config = config;
        self.index_pools();
        self.refresh_slot_sources();
    }

    /// Pools a reload removed whose last VM is gone are forgotten, with their gauges.
    pub(super) fn forget_retired_pools(&mut self) {
        let done: Vec<String> = self
            .config
            .pools
            .iter()
            .filter(|p| p.retiring && self.book.vms_of(&p.name).next().is_none())
            .map(|p| p.name.clone())
            .collect();
        if done.is_empty() {
            return;
        }
        let mut config = (*self.config).clone();
        config.pools.retain(|p| !done.contains(&p.name));
        self.install(config);
        for name in done {
            self.metrics.forget_pool(&name);
            self.gauges.remove(&name);
            info!(pool = %name, "pool removed: its last VM is gone");
        }
    }
}

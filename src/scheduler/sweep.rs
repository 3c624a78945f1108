//! The hypervisor against the book: libvirt's events, and the periodic sweep that lists
//! domains and volumes to adopt, re-adopt or remove what the events missed. Also the
//! housekeeping that rides on the sweep (pruning old jobs, image checks).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use tracing::{error, info, warn};

use super::event::{Event, Sweep, spawn_blocking_reporting};
use super::vm::Input;
use super::{JOB_RETENTION, Scheduler};
use crate::clock::Step;
use crate::github::GitHub;
use crate::hypervisor::{self, DomainState, HvError, HvEvent, Hypervisor, VmInfo};

/// A domain libvirt cannot say the state or metadata of, warned of at most this often.
static UNREADABLE: crate::logging::Throttle = crate::logging::Throttle::new(Duration::from_secs(600));
use crate::metrics;
use crate::model::{Reason, VmRec, VmState};

/// A sweep unanswered this long: libvirt's calls hang (see `Scheduler::sweep_overdue`). A
/// sweep lists and refreshes in seconds; the simulator's hung calls last up to 5 minutes.
pub const SWEEP_OVERDUE: Duration = Duration::from_secs(600);

pub struct State {
    /// A sweep's result is awaited.
    running: bool,
    /// When the sweep whose result is awaited started listing, on the scheduler's clock:
    /// what changed later (a VM started, one torn down) the listing cannot tell about.
    started: SystemTime,
    /// The same on the monotonic clock, for how long it has been awaited.
    started_at: Instant,
    /// The sweep awaited was found overdue (said once).
    overdue: bool,
    /// VMs torn down recently, and when: a sweep that listed before that is stale for them.
    torn_down_at: BTreeMap<String, SystemTime>,
    /// Addresses reserved for VMs that neither the book nor libvirt knows, and since when
    /// the sweeps have found them so.
    stray_addresses: BTreeMap<String, SystemTime>,
    last_prune: Instant,
    last_image_check: Option<Instant>,
}

impl Default for State {
    fn default() -> State {
        State {
            running: false,
            started: SystemTime::UNIX_EPOCH,
            started_at: Instant::now(),
            overdue: false,
            torn_down_at: BTreeMap::new(),
            stray_addresses: BTreeMap::new(),
            last_prune: Instant::now(),
            last_image_check: None,
        }
    }
}

impl State {
    /// `name` is gone from the hypervisor since `at`, whatever a sweep listed earlier says.
    pub fn torn_down(&mut self, name: &str, at: SystemTime) {
        self.torn_down_at.insert(name.to_string(), at);
    }

    /// The wall clock was stepped (see `Book::shift`).
    pub fn shift(&mut self, step: Step) {
        self.started = step.apply(self.started);
        self.torn_down_at.values_mut().chain(self.stray_addresses.values_mut()).for_each(|t| *t = step.apply(*t));
    }
}

impl<G: GitHub, H: Hypervisor> Scheduler<G, H> {
    pub(super) fn on_hv(&mut self, ev: HvEvent) {
        match ev {
            HvEvent::Stopped(domain) => {
                // Webhooks already accepted may say its runner took (and finished) a job:
                // apply them first, or the VM would look like it died before taking one.
                self.drain_inbox();
                let Some(name) = self.book.vm_of_domain(&domain).map(str::to_string) else { return };
                if self.domain_stop_ends(&name) {
                    info!(vm = %name, domain = %domain, "domain stopped");
                    self.reap(&name, Reason::Stopped);
                }
            }
            HvEvent::IoPaused(domain) => {
                if let Some(name) = self.book.vm_of_domain(&domain).map(str::to_string) {
                    self.on_disk_error(&name);
                }
            }
            HvEvent::Started(_) => {}
            HvEvent::Disconnected => {
                warn!("libvirt connection lost: no provisioning until it is back");
                self.hv.ready = false;
                self.hv.problem = Some("the connection to libvirt is lost".into());
            }
            HvEvent::Reconnected => {
                if self.hv.connected_once {
                    self.metrics.libvirt_reconnects.inc();
                    info!("libvirt connection back: full sweep");
                } else {
                    self.report_capacity();
                }
                self.hv.connected_once = true;
                // Teardowns that failed while libvirt was away are tried again now, not
                // after their back-off (which is for what keeps failing).
                self.retry_teardowns_now(None);
                self.start_sweep();
            }
        }
    }

    pub(super) fn start_sweep(&mut self) {
        if self.sweep.running {
            self.sweep_overdue();
            return;
        }
        self.sweep.running = true;
        self.sweep.started = self.now();
        self.sweep.started_at = Instant::now();
        self.sweep.overdue = false;
        let hv = self.ctx.hv.clone();
        let network = self.config.libvirt.network.libvirt_network().map(str::to_string);
        spawn_blocking_reporting(
            &self.ctx.events,
            move || {
                Event::Swept(Box::new(Sweep {
                    vms: hv.list_vms(),
                    volumes: hv.list_volumes(),
                    pool: hv.check_pool(),
                    addresses: match network {
                        Some(net) => hv.network_dhcp(&net).map(|d| d.hosts.into_iter().map(|h| h.vm).collect()),
                        None => Ok(Vec::new()),
                    },
                }))
            },
            |message| {
                let failed = || HvError::Libvirt { op: "sweep", name: String::new(), message: message.clone() };
                Event::Swept(Box::new(Sweep {
                    vms: Err(failed()),
                    volumes: Err(failed()),
                    pool: Err(failed()),
                    addresses: Err(failed()),
                }))
            },
        );
    }

    /// A sweep still unanswered [`SWEEP_OVERDUE`] after it started: libvirt's calls hang (a
    /// daemon stuck on a storage pool, say), while its connection may look alive. The
    /// hypervisor is then not ready, as when libvirt is lost: no VM is made (a scale set is
    /// given no capacity) until a sweep answers, and `status` and the log say why (the
    /// agent looked connected and did nothing). No second sweep starts beside the hung one:
    /// it would hang too, a thread each time.
    fn sweep_overdue(&mut self) {
        let waited = self.sweep.started_at.elapsed();
        if self.sweep.overdue || waited < SWEEP_OVERDUE {
            return;
        }
        self.sweep.overdue = true;
        let problem = format!(
            "libvirt has not answered a sweep (domains, volumes, storage pool, DHCP leases) for over {} s: its calls hang (does `virsh list` answer? is a storage pool stuck?)",
            waited.as_secs()
        );
        error!(waited_s = waited.as_secs(), "{problem}; no provisioning until it answers");
        self.hv.ready = false;
        self.hv.problem = Some(problem);
    }

    /// Compares the hypervisor with the records: stopped or vanished domains are torn down,
    /// running unknown domains of ours are adopted, the rest (and stray volumes and
    /// addresses) removed.
    pub(super) fn on_swept(&mut self, Sweep { vms, volumes, pool, addresses }: Sweep) {
        self.sweep.running = false;
        let overdue = std::mem::take(&mut self.sweep.overdue);
        // What was torn down after this sweep listed is gone, whatever the listing says
        // (also when the sweep answers long after: an overdue one).
        let listed_at = self.sweep.started;
        let now = self.now();
        self.sweep
            .torn_down_at
            .retain(|_, t| *t >= listed_at || now.duration_since(*t).unwrap_or_default() < Duration::from_secs(600));
        let mut stale: BTreeSet<String> =
            self.sweep.torn_down_at.iter().filter(|(_, t)| **t >= listed_at).map(|(n, _)| n.clone()).collect();
        let found = match vms {
            Ok(v) => v,
            Err(e) => {
                if self.hv.ready || overdue {
                    warn!(error = %e, "hypervisor sweep failed");
                }
                // One failed listing of a connected libvirt does not stop provisioning.
                if matches!(e, HvError::Unavailable { .. }) || !self.hv.ready {
                    self.hv.ready = false;
                    self.hv.problem = Some(e.to_string());
                }
                return;
            }
        };
        if let Err(e) = pool {
            warn!(error = %e, "job storage pool unavailable: no provisioning");
            self.hv.ready = false;
            self.hv.problem = Some(e.to_string());
            return;
        }
        if overdue {
            info!("the sweep that hung has answered: libvirt is ready again");
        }
        self.hv.ready = true;
        self.hv.problem = None;
        // A domain whose state or metadata libvirt could not tell is left alone, with its
        // volumes and address (as one torn down after the listing is): nothing is known.
        for v in found.iter().filter(|v| v.unreadable.is_some()) {
            if UNREADABLE.check().is_some() {
                warn!(domain = %v.name, problem = ?v.unreadable, "libvirt cannot say a domain's state or metadata: it is left alone until it can");
            }
            stale.insert(v.name.clone());
        }
        let by_name: BTreeMap<&str, &VmInfo> = found.iter().map(|v| (v.name.as_str(), v)).collect();
        let names: Vec<String> = self.book.vms.keys().cloned().collect();
        for name in names {
            let vm = &self.book.vms[&name];
            let (state, since) = (vm.state, vm.state_since);
            let domain = by_name.get(vm.domain()).map(|d| d.state.clone());
            match state {
                // A save a restart cut short: the slot is made again.
                VmState::Saving if !self.work.contains_key(&name) => {
                    info!(vm = %name, "a snapshot slot's save was cut short by a restart: making it again");
                    self.begin_teardown(&name, Reason::Interrupted);
                }
                VmState::Saving => {}
                // On a domain libvirt cannot describe: left as it is (not re-adopted as
                // provisioned, nor reaped) until it can.
                _ if by_name.get(vm.domain()).is_some_and(|d| d.unreadable.is_some()) => {}
                // Provisioning that a restart cut short (no task runs for it).
                VmState::Provisioning if !self.work.contains_key(&name) => {
                    if domain == Some(DomainState::Running) {
                        info!(vm = %name, "re-adopting a vm whose provisioning finished before the restart");
                        let reap = self.book.vms[&name].reap;
                        self.transition(&name, Input::Provisioned);
                        // Doomed before the restart (its provisioning timed out, its job left):
                        // it goes now, as its report would have had it.
                        if let Some(reason) = reap {
                            self.reap(&name, reason);
                        }
                    } else {
                        self.begin_teardown(&name, Reason::Interrupted);
                    }
                }
                VmState::Provisioning | VmState::TearingDown => {}
                _ if domain == Some(DomainState::Running) => {}
                // Its domain started (or its state changed) after this sweep listed: the
                // listing cannot tell about it.
                _ if since >= listed_at => {}
                _ if domain == Some(DomainState::IoPaused) => self.on_disk_error(&name),
                _ => {
                    info!(vm = %name, domain = ?domain, "domain not running");
                    self.reap(&name, Reason::Stopped);
                }
            }
        }
        // In a fleet, members sharing a libvirtd touch only their own domains (by the host
        // id in the metadata); a single host leaves any fleet member's alone.
        let host = self.config.fleet.as_ref().map(|f| f.host_id());
        for info in &found {
            // Only names of our pools: other `rv-` domains on this host are not ours to touch.
            if self.book.vm_of_domain(&info.name).is_some() || !self.is_ours(&info.name) || stale.contains(&info.name) {
                continue;
            }
            if info.metadata.as_ref().is_some_and(|m| m.host != host) {
                continue;
            }
            if self.book.slots.contains_key(&info.name) {
                // A saved slot has no domain; one of its name without a record of a VM
                // restored from it goes, and the slot (its disk, its saved state) stays.
                self.destroy_slot_domain(&info.name);
                continue;
            }
            self.adopt(info);
        }
        match volumes {
            Ok(vols) => {
                self.drop_slots_without_state(&vols, listed_at);
                self.delete_stray_volumes(vols, &stale);
            }
            Err(e) => warn!(error = %e, "cannot list volumes"),
        }
        match addresses {
            Ok(holders) => {
                let domains: BTreeSet<&str> = found.iter().map(|v| v.name.as_str()).collect();
                self.release_stray_addresses(holders, &domains, &stale);
            }
            Err(e) => warn!(error = %e, "cannot list the network's reserved addresses"),
        }
        self.prune();
        self.check_images();
        self.refresh_slot_sources();
    }

    /// A domain of ours without a record: a running one described by its metadata is
    /// adopted as booting (a warm one as warming: it holds no credential); anything else
    /// is removed.
    fn adopt(&mut self, info: &VmInfo) {
        let now = self.now();
        let adoptable = info.state == DomainState::Running
            && info.metadata.as_ref().is_some_and(|m| self.config.pool(&m.pool).is_some());
        let meta = info.metadata.as_ref();
        let warm = meta.is_some_and(|m| m.warm);
        self.book.insert_vm(VmRec {
            job_id: meta.map(|m| m.job_id).unwrap_or(0),
            run_id: meta.map(|m| m.run_id).unwrap_or(0),
            repository: meta.map(|m| m.repository.clone()).unwrap_or_default(),
            job_url: meta.map(|m| m.job_url.clone()).unwrap_or_default(),
            state: if warm { VmState::Warming } else { VmState::Booting },
            created_at: meta.map(|m| m.created).unwrap_or(now),
            ..VmRec::new(info.name.clone(), meta.map(|m| m.pool.as_str()).unwrap_or_default(), warm, now)
        });
        if adoptable {
            info!(vm = %info.name, "adopted a running vm found without a record");
        } else {
            info!(vm = %info.name, running = info.state == DomainState::Running, "removing a domain of ours that has no record");
            self.reap(&info.name, Reason::Orphan);
        }
    }

    fn delete_stray_volumes(&mut self, volumes: Vec<String>, stale: &BTreeSet<String>) {
        // A slot's saved state without a record (the store lost, or a slot made by another
        // agent on this host for the same pool): kept if it is right for the pool now.
        let saved: BTreeSet<&str> = volumes.iter().filter_map(|v| hypervisor::slot_of_save_volume(v)).collect();
        let found: Vec<String> = saved
            .iter()
            .filter(|s| !self.book.vms.contains_key(**s) && !self.book.slots.contains_key(**s))
            .filter(|s| self.is_ours(s) && !self.foreign_slot(s) && !stale.contains(**s))
            .filter(|s| self.config.pools.iter().any(|p| hypervisor::slot_of_pool(s, &p.name).is_some()))
            .map(|s| s.to_string())
            .collect();
        for slot in &found {
            self.slot_found(slot);
        }
        for vol in volumes {
            let Some(owner) = hypervisor::vm_of_volume(&vol) else {
                continue;
            };
            if self.book.vms.contains_key(owner)
                || self.book.slots.contains_key(owner)
                || !self.is_ours(owner)
                || self.foreign_slot(owner)
                || self.slot_pending(owner)
                || stale.contains(owner)
            {
                continue;
            }
            info!(volume = %vol, "deleting a volume of ours that belongs to no vm");
            let hv = self.ctx.hv.clone();
            // Fire and forget: the next sweep finds it again if this fails.
            crate::offload::spawn(move || {
                if let Err(e) = hv.delete_volume(&vol) {
                    warn!(volume = %vol, error = %e, "cannot delete stray volume");
                }
            });
        }
    }

    /// Addresses reserved for VMs of ours that are neither recorded nor defined (a
    /// provisioning cut short between its reservation and its domain's definition, a VM
    /// removed by hand): given back to the network once they have been so for longer than
    /// a provisioning may take (another agent on this libvirt may be between the two steps
    /// for a VM of the same pools, which this one has no record of).
    fn release_stray_addresses(&mut self, holders: Vec<String>, domains: &BTreeSet<&str>, stale: &BTreeSet<String>) {
        let Some(network) = self.config.libvirt.network.libvirt_network().map(str::to_string) else { return };
        let now = self.now();
        let strays: Vec<String> = holders
            .into_iter()
            .filter(|vm| !self.book.vms.contains_key(vm) && !self.book.slots.contains_key(vm))
            .filter(|vm| self.is_ours(vm) && !self.foreign_slot(vm) && !self.slot_pending(vm))
            .filter(|vm| !domains.contains(vm.as_str()))
            .filter(|vm| !stale.contains(vm))
            .collect();
        let since = &mut self.sweep.stray_addresses;
        since.retain(|vm, _| strays.contains(vm));
        for vm in strays {
            let first = *since.entry(vm.clone()).or_insert(now);
            if now.duration_since(first).unwrap_or_default() < self.config.reconcile.provision_timeout {
                continue;
            }
            since.remove(&vm);
            info!(vm = %vm, network = %network, "releasing an address reserved for a vm that is gone");
            let (hv, net) = (self.ctx.hv.clone(), network.clone());
            // Fire and forget: the next sweep finds it again if this fails.
            crate::offload::spawn(move || {
                if let Err(e) = hv.release_address(&net, &vm) {
                    warn!(vm = %vm, error = %e, "cannot release a stray address");
                }
            });
        }
    }

    /// A domain, volume owner or runner name of one of our pools.
    pub(super) fn is_ours(&self, name: &str) -> bool {
        self.config.pools.iter().any(|p| hypervisor::is_vm_of_pool(name, &p.name))
    }

    /// Warns when a pool's image declares a runner too old for GitHub (at start, then hourly).
    fn check_images(&mut self) {
        if self.sweep.last_image_check.is_some_and(|t| t.elapsed() < Duration::from_secs(3600)) {
            return;
        }
        self.sweep.last_image_check = Some(Instant::now());
        for pool in &self.config.pools {
            let manifest = crate::images::read_manifest(&pool.image);
            let problem =
                manifest.as_ref().and_then(|m| crate::images::runner_age_problem(m, pool.runner_max_age, self.now()));
            self.metrics.image_runner_outdated.get_or_create(&metrics::pool(&pool.name)).set(problem.is_some() as i64);
            if let Some(p) = problem {
                warn!(pool = %pool.name, image = %pool.image.display(), "{p}; rebuild the image with a current runner");
            }
            if let Some(p) = manifest.as_ref().and_then(crate::images::bind_protocol_problem) {
                error!(pool = %pool.name, image = %pool.image.display(), "{p}; rebuild the image (images/production/build)");
            }
        }
    }

    /// Forgets finished jobs and old delivery ids after the redelivery window.
    fn prune(&mut self) {
        if self.sweep.last_prune.elapsed() < Duration::from_secs(3600) {
            return;
        }
        self.sweep.last_prune = Instant::now();
        let now = self.now();
        let old: Vec<u64> = self
            .book
            .jobs
            .values()
            .filter(|j| !j.is_unserved() && now.duration_since(j.updated_at).unwrap_or_default() > JOB_RETENTION)
            .map(|j| j.info.id)
            .collect();
        for id in old {
            self.book.remove_job(id);
        }
        if let Err(e) = self.store.prune_deliveries(JOB_RETENTION, now) {
            warn!(error = %e, "cannot prune delivery ids");
        }
    }

    /// Once libvirt answers: the pools' worst case against the host, in the log.
    fn report_capacity(&self) {
        // A retiring pool makes no VM (its settings may be made up: `PoolConfig::retiring`).
        let pools: Vec<_> = self.config.pools.iter().filter(|p| !p.retiring).cloned().collect();
        let need = crate::capacity::worst_case(&pools, self.config.capacity.max_vms);
        let hv = self.ctx.hv.clone();
        // Only logs: nothing waits for it.
        crate::offload::spawn(move || match hv.host_resources() {
            Ok(host) => {
                let problems = crate::capacity::findings(&need, &host);
                for p in &problems {
                    warn!("capacity: {p}");
                }
                info!(
                    vms = need.vms,
                    vcpus = need.vcpus,
                    memory_mib = need.memory_mib,
                    disk_gib = need.disk_gib,
                    host_cpus = host.cpus,
                    host_memory_mib = host.memory_mib,
                    pool_gib = host.pool_gib,
                    fits = problems.is_empty(),
                    "capacity: the pools' worst case against this host"
                );
            }
            Err(e) => warn!(error = %e, "capacity: cannot read the host's resources"),
        });
    }
}

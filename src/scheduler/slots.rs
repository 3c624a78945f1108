//! Snapshot slots: VMs saved by libvirt once their guest waits (no credential anywhere),
//! restored for a job onto a fresh overlay of the saved disk instead of booting.
//!
//! - [`Scheduler::start_slot`]: a pool lacking slots (`snapshot_slots`) boots a VM named
//!   after the missing slot (`rv-<pool>-s<n>`, `for_slot`), exactly as a warm VM boots.
//! - [`Scheduler::start_save`]: once its guest waits, it is saved (`Hypervisor::save`: its
//!   memory into `<slot>.save`, its domain undefined, its overlay kept as the slot's base);
//!   [`Scheduler::on_saved`] replaces its record by the slot's ([`SlotRec`]).
//! - A job that finds no warm VM waiting takes a free slot ([`Scheduler::free_slots`]): its
//!   VM (named as a cold VM for the job, `slot` set) is restored from it by
//!   `provision::provision` and bound as a cold VM is. The slot is in use while that
//!   record exists (libvirt keeps the saved domain's name: one restore at a time). A job
//!   that finds every slot in use waits for one whose VM is on its way out
//!   ([`releasing`]: free in seconds) rather than boot cold ([`restore_or_boot`]).
//! - [`Scheduler::tend_slots`]: a slot no longer right for its pool (its image file or the
//!   VM's shape changed; `snapshot_slots` lowered; the pool removed) goes once no VM uses
//!   it, and is re-made; so does one whose restore failed (that job boots cold).
//!
//! One source of truth: a slot is its record; being made, the VM record of its name; in
//! use, the `slot` of the VM restored from it. Its resources carry its name (volumes
//! `<slot>.qcow2`, `<slot>-seed.img`, `<slot>.save`, its address on the network), so a
//! slot's teardown is a VM teardown of that name.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use tracing::{debug, error, info, warn};

use super::event::{Event, spawn_reporting};
use super::vm::Input;
use super::{Scheduler, Work};
use crate::config::{Config, PoolConfig};
use crate::github::GitHub;
use crate::hypervisor::{self, HvError, Hypervisor};
use crate::metrics::StepLabels;
use crate::model::{Reason, SlotRec, VmRec, VmState};

#[derive(Default)]
pub struct State {
    /// Per pool, what its slots must have been made from ([`made_from`]), as the last
    /// sweep, reload or start found it, and the files it names ([`files_of`]).
    made_from: BTreeMap<String, (String, String)>,
    /// Slot VMs being made by this process, and what they are made from. One a restart
    /// cut short is torn down and made again.
    making: BTreeMap<String, String>,
    /// Pools whose image cannot serve slots (said once).
    refused: BTreeSet<String>,
    /// Slots a restore failed from: removed once the VM that failed is gone.
    broken: BTreeSet<String>,
    /// Saved slots found without a record, whose saved state is being read.
    found: BTreeSet<String>,
    /// Slots whose domain no VM record holds, which the sweep is destroying: none is
    /// restored from until that reports (the destroy, late, would kill the VM restored
    /// into the slot's domain meanwhile; nor is a second destroy sent).
    destroying: BTreeSet<String>,
    /// Pools whose slots failed to save or restore: no slot of theirs is made before the
    /// back-off ends (their jobs boot cold meanwhile, and VMs restored from their other
    /// slots are bound as usual).
    pub(super) backoff: super::lifecycle::Backoffs,
}

/// How long a VM restored from a slot may stay in each of its last two states (Finishing:
/// its job done, the guest powering off; TearingDown) and still be waited for: a restored
/// VM's guest powers off once its runner exits and its teardown takes a second or two, a
/// cold boot 30 s to a minute (TCG). A job waits 2 x 20 s at the very most.
pub const RELEASE_WAIT: Duration = Duration::from_secs(20);

/// Whether the VM restored from a slot gives it back soon: its job is done (the guest
/// powers off as its runner exits) or its teardown runs, and for less than
/// [`RELEASE_WAIT`] (a guest that does not power off, a teardown that hangs: no slot to
/// wait for).
pub fn releasing(vm: &VmRec, now: SystemTime) -> bool {
    matches!(vm.state, VmState::Finishing | VmState::TearingDown)
        && now.duration_since(vm.state_since).is_ok_and(|d| d < RELEASE_WAIT)
}

/// For the jobs to make a VM for, oldest first, with `free` slots free and `releasing`
/// slots about to be: `(job, cold)` for each job that gets a VM now. A job a restore
/// failed for (`cold_only`) boots; the others take a free slot, else wait for one being
/// given back (left out: looked at again next pass), else boot.
pub fn restore_or_boot(jobs: Vec<u64>, cold_only: &BTreeSet<u64>, free: usize, releasing: usize) -> Vec<(u64, bool)> {
    let (mut free, mut releasing) = (free, releasing);
    jobs.into_iter()
        .filter_map(|j| {
            if cold_only.contains(&j) {
                Some((j, true))
            } else if free > 0 {
                free -= 1;
                Some((j, false))
            } else if releasing > 0 {
                releasing -= 1;
                None
            } else {
                Some((j, true))
            }
        })
        .collect()
}

/// What a pool's slots are made from with its files named by path alone: a reload that
/// changes it (other files, another VM shape) makes every slot wrong, even while the files
/// cannot be read.
fn files_of(config: &Config, pool: &PoolConfig) -> String {
    describe(config, pool, |p| Ok::<_, String>(p.display().to_string())).unwrap_or_default()
}

/// What a pool's saved VM depends on: the image file, the kernel and initrd files (each
/// path, size, modification time) and everything of the domain that a restore cannot
/// change. A slot made from anything else is re-made. `Err`: a file cannot be read now
/// (being replaced, a mount away): nothing can be said, and the slots already made stay
/// as they are.
pub fn made_from(config: &Config, pool: &PoolConfig) -> Result<String, String> {
    describe(config, pool, |path| match std::fs::metadata(path) {
        Ok(m) => {
            let mtime = m.modified().ok().and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
            Ok(format!("{} ({} bytes, modified {:?})", path.display(), m.len(), mtime.map(|d| d.as_nanos())))
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    })
}

/// [`made_from`]'s text, each file as `stamp` tells it.
fn describe(
    config: &Config,
    pool: &PoolConfig,
    stamp: impl Fn(&std::path::Path) -> Result<String, String>,
) -> Result<String, String> {
    let optional = |path: &Option<std::path::PathBuf>| path.as_deref().map(&stamp).transpose();
    Ok(format!(
        "image {}; {} vcpus, {} MiB, {} GiB disk; kernel {:?} initrd {:?} cmdline {:?}; {:?}; network {:?}",
        stamp(&pool.image)?,
        pool.vcpus,
        pool.memory_mib,
        pool.disk_gib,
        optional(&pool.kernel)?,
        optional(&pool.initrd)?,
        pool.cmdline,
        config.libvirt.domain_type,
        config.libvirt.network.libvirt_network(),
    ))
}

/// Why slots of an image whose manifest is `manifest` must not be made, if they must
/// not: a restored VM shares its slot's RNG state and clock until its guest freshens
/// itself at bind, which an image says it does by its bind protocol. An image without a
/// manifest says nothing: no slot (fail closed).
pub fn image_refusal(manifest: Option<&crate::images::Manifest>) -> Option<String> {
    let want = crate::cloudinit::GUEST_FRESHENS;
    match manifest.map(|m| m.bind_protocol.unwrap_or(1)) {
        None => Some(format!(
            "the image has no manifest (<image>.manifest.json) saying its guest makes a restored vm a fresh instance (bind_protocol {want} or later)"
        )),
        Some(has) if has < want => Some(format!(
            "the image's guest speaks bind protocol {has}; a restored vm is a fresh instance from bind protocol {want} on"
        )),
        Some(_) => None,
    }
}

/// The names of a pool's first `wanted` slots that neither exist nor are being made. In a
/// fleet, members sharing a libvirtd must not share a slot's name (its domain, volumes and
/// address): the slot number carries the member's three digits (`member`, 0–999) above
/// its index.
pub fn missing(pool: &str, wanted: usize, member: Option<u64>, taken: impl Fn(&str) -> bool) -> Vec<String> {
    let first = member.map_or(0, |m| m as usize * 1000);
    (first..first + wanted).map(|n| hypervisor::slot_name(pool, n)).filter(|s| !taken(s)).collect()
}

impl<G: GitHub, H: Hypervisor> Scheduler<G, H> {
    /// What `pool`'s slots must be made from now (`None`: its files were never readable).
    fn current_made_from(&mut self, pool: &PoolConfig) -> Option<String> {
        if !self.slots.made_from.contains_key(&pool.name) {
            self.refresh_slot_source(pool);
        }
        self.slots.made_from.get(&pool.name).map(|(made, _)| made.clone())
    }

    /// Looks at `pool`'s image again. Files that cannot be read leave what was known.
    pub(super) fn refresh_slot_source(&mut self, pool: &PoolConfig) {
        match made_from(&self.config, pool) {
            Ok(made) => {
                self.slots.made_from.insert(pool.name.clone(), (made, files_of(&self.config, pool)));
            }
            // A reload that names other files: no slot of the old ones is right, whether
            // or not the new ones can be read yet.
            Err(e)
                if self
                    .slots
                    .made_from
                    .get(&pool.name)
                    .is_some_and(|(_, files)| *files != files_of(&self.config, pool)) =>
            {
                self.slots.made_from.remove(&pool.name);
                if pool.snapshot_slots > 0 {
                    warn!(pool = %pool.name, error = %e, "cannot read the pool's new image files: no snapshot slot is made or restored until they can be read");
                }
            }
            Err(e) if pool.snapshot_slots > 0 && self.slots.made_from.contains_key(&pool.name) => {
                warn!(pool = %pool.name, error = %e, "cannot read the pool's image files: its snapshot slots stay as they are until they can be read");
            }
            Err(e) if pool.snapshot_slots > 0 => {
                debug!(pool = %pool.name, error = %e, "cannot read the pool's image files: no snapshot slot is made or restored until they can be read");
            }
            Err(_) => {}
        }
    }

    /// Looks at every pool's image again (a sweep, a reload).
    pub(super) fn refresh_slot_sources(&mut self) {
        let config = self.config.clone();
        self.slots.made_from.retain(|name, _| config.pool(name).is_some());
        for pool in &config.pools {
            self.refresh_slot_source(pool);
        }
    }

    /// The pool's slots that are saved and right (made from what the pool is now, no
    /// failed restore).
    fn usable_slots<'a>(&'a self, pool: &'a str) -> impl Iterator<Item = &'a SlotRec> + 'a {
        let current = self.slots.made_from.get(pool).map(|(made, _)| made);
        self.book
            .slots
            .values()
            .filter(move |s| s.pool == pool && Some(&s.made_from) == current && !self.slots.broken.contains(&s.name))
            .filter(|s| !self.slots.destroying.contains(&s.name))
    }

    /// The pool's slots that are saved, right and not in use, by name.
    pub(super) fn free_slots(&self, pool: &str) -> Vec<String> {
        self.usable_slots(pool).filter(|s| self.book.restored_from(&s.name).is_none()).map(|s| s.name.clone()).collect()
    }

    /// How many of the pool's right slots a VM on its way out holds ([`releasing`]); not
    /// one the pool no longer keeps (`snapshot_slots` lowered), which goes once free.
    pub(super) fn slots_releasing(&self, pool: &PoolConfig) -> usize {
        let now = self.now();
        let kept = missing(&pool.name, pool.snapshot_slots, self.member(), |_| false);
        self.usable_slots(&pool.name)
            .filter(|s| kept.contains(&s.name))
            .filter(|s| self.book.restored_from(&s.name).is_some_and(|v| releasing(v, now)))
            .count()
    }

    /// The member's number in its slots' numbers, in a fleet.
    fn member(&self) -> Option<u64> {
        self.fleet.as_ref().and_then(|f| f.number())
    }

    /// Whether this member knows its names: always on a single host; in a fleet, once its
    /// number is known (its first heartbeat). Until then it makes no warm VM or slot and
    /// judges no slot by its name.
    pub(super) fn names_known(&self) -> bool {
        self.fleet.as_ref().is_none_or(|f| f.number().is_some())
    }

    /// Whether `name` is a slot name this member does not make: another fleet member's
    /// on a shared libvirt (its saved state, disk and address are that member's, even
    /// with no domain running), or one of numbers this member no longer uses.
    pub(super) fn foreign_slot(&self, name: &str) -> bool {
        if self.book.slots.contains_key(name) {
            return false;
        }
        let Some(n) = self.config.pools.iter().find_map(|p| hypervisor::slot_of_pool(name, &p.name)) else {
            return false;
        };
        match (&self.fleet, self.member()) {
            (None, _) => n / 1000 != 0,
            (Some(_), Some(mine)) => n / 1000 != mine as usize,
            // This member's number is not known yet: any slot without a record may be
            // another member's.
            (Some(_), None) => true,
        }
    }

    /// The slots this member can keep for `pool` now (counted as warm capacity in a
    /// fleet): none until its names are known, none of an image refused for slots.
    pub(super) fn slot_target(&self, pool: &PoolConfig) -> usize {
        if pool.snapshot_slots == 0 || !self.names_known() {
            return 0;
        }
        if image_refusal(crate::images::read_manifest(&pool.image).as_ref()).is_some() {
            return 0;
        }
        pool.snapshot_slots
    }

    /// Slots the pool lacks and makes now (neither saved nor being made; none while the
    /// pool's slots back off or the member's names are not known yet).
    pub(super) fn slots_missing(&self, pool: &PoolConfig) -> usize {
        if !self.names_known() || self.slots.backoff.active(&pool.name, tokio::time::Instant::now()) {
            return 0;
        }
        self.missing_slots(pool).len()
    }

    /// A slot of `pool` failed to save or restore: its slots are made again only after a
    /// back-off (doubling with each failure until one is saved).
    fn slot_backoff(&mut self, pool: &str, step: &str) {
        self.metrics.slot_failures.get_or_create(&StepLabels::new(pool, step)).inc();
        let delay = self.slots.backoff.bump(pool, tokio::time::Instant::now());
        warn!(
            pool,
            step,
            retry_in_ms = delay.as_millis() as u64,
            "the pool's snapshot slots are made again after a back-off"
        );
    }

    /// The pool's slot names neither saved, nor being made, nor found and being looked at.
    fn missing_slots(&self, pool: &PoolConfig) -> Vec<String> {
        let (book, found) = (&self.book, &self.slots.found);
        missing(&pool.name, pool.snapshot_slots, self.member(), |s| {
            book.slots.contains_key(s) || book.vms.contains_key(s) || found.contains(s)
        })
    }

    /// Boots a VM to be saved as the pool's first missing slot.
    pub(super) fn start_slot(&mut self, pool: &PoolConfig) {
        let Some(name) = self.missing_slots(pool).into_iter().next() else {
            return;
        };
        // A restored VM shares its slot's RNG state and clock until its guest freshens
        // itself at bind: an image whose guest does not must not serve slots.
        if let Some(why) = image_refusal(crate::images::read_manifest(&pool.image).as_ref()) {
            if self.slots.refused.insert(pool.name.clone()) {
                self.metrics.slot_failures.get_or_create(&StepLabels::new(&pool.name, "image")).inc();
                error!(pool = %pool.name, image = %pool.image.display(), why = %why,
                    "snapshot_slots: no slot is made for this image (its jobs boot cold); rebuild the image with a current images/production/build");
            }
            return;
        }
        self.slots.refused.remove(&pool.name);
        let Some(made_from) = self.current_made_from(pool) else { return };
        let vm = VmRec { for_slot: true, ..VmRec::new(name.clone(), &pool.name, true, self.now()) };
        let mut plan = self.plan(vm.clone(), pool, String::new(), String::new());
        plan.made_from = Some(made_from.clone());
        info!(pool = %pool.name, vm = %name, "provisioning a vm for a snapshot slot (no credential)");
        self.slots.making.insert(name.clone(), made_from);
        if !self.launch(vm, plan) {
            self.slots.making.remove(&name);
        }
    }

    /// A slot VM this process did not start (a restart cut its making short) goes: it is
    /// made again from scratch.
    pub(super) fn adopted_slot_vm(&mut self, name: &str) -> bool {
        if self.slots.making.contains_key(name) {
            return false;
        }
        info!(vm = %name, "a snapshot slot's making was cut short by a restart: making it again");
        self.begin_teardown(name, Reason::Interrupted);
        true
    }

    /// Saves the slot VM `name`, whose guest waits.
    pub(super) fn start_save(&mut self, name: &str) {
        if !self.transition(name, Input::Save) {
            return;
        }
        if let Err(e) = self.flush() {
            error!(vm = %name, error = %e, "cannot persist the slot's saving: the vm goes");
            self.begin_teardown(name, Reason::SlotGone);
            return;
        }
        let hv = self.ctx.hv.clone();
        let network = self.config.libvirt.network.libvirt_network().map(str::to_string);
        let (n, failed) = (name.to_string(), name.to_string());
        let task = spawn_reporting(
            &self.ctx.events,
            async move {
                let vm = n.clone();
                let result = crate::offload::spawn(move || save(&*hv, &vm, network.as_deref()))
                    .await
                    .unwrap_or_else(|e| Err(HvError::Libvirt { op: "save", name: n.clone(), message: e.to_string() }));
                Event::Saved { vm: n, result }
            },
            move |message| Event::Saved {
                vm: failed.clone(),
                result: Err(HvError::Libvirt { op: "save", name: failed, message }),
            },
        );
        self.work.insert(name.to_string(), Work::Saving(task));
    }

    pub(super) fn on_saved(&mut self, name: String, result: Result<Option<Ipv4Addr>, HvError>) {
        if !matches!(self.work.get(&name), Some(Work::Saving(_))) {
            return;
        }
        self.work.remove(&name);
        let Some(vm) = self.book.vms.get(&name).cloned() else { return };
        let made_from = self.slots.making.remove(&name);
        if let Some(reason) = vm.reap {
            // Doomed while its save ran (past its deadline, say): saved or not, it goes.
            info!(vm = %name, reason = %reason.as_str(), saved = result.is_ok(), "the slot's save reported: the vm goes");
            self.begin_teardown(&name, reason);
            return;
        }
        match (result, made_from) {
            (Ok(address), Some(made_from)) => {
                let took = self.now().duration_since(vm.created_at).unwrap_or_default();
                self.book.remove_vm(&name);
                self.book.insert_slot(SlotRec {
                    name: name.clone(),
                    pool: vm.pool.clone(),
                    made_from,
                    address,
                    saved_at: self.now(),
                    network: vm.network.clone(),
                });
                self.timeline.gone(&vm, self.now());
                self.sweep.torn_down(&name, self.now());
                self.slots.backoff.clear(&vm.pool);
                info!(vm = %name, pool = %vm.pool, address = ?address, made_ms = took.as_millis() as u64, "snapshot slot saved: it serves the pool's next job");
            }
            (result, _) => {
                // A full storage pool is the host's: the pool's cold VMs would fill it too.
                let full = matches!(result, Err(HvError::PoolFull { .. }));
                let e = result.err().map(|e| e.to_string()).unwrap_or_else(|| "made before a restart".into());
                error!(vm = %name, pool = %vm.pool, error = %e, "cannot save the snapshot slot: it goes, and is made again after a back-off");
                self.slot_backoff(&vm.pool, "save");
                if full {
                    self.bump_backoff(&vm.pool);
                }
                self.begin_teardown(&name, Reason::SlotGone);
            }
        }
    }

    /// Destroys the domain of the saved slot `slot` that no VM record holds (a VM restored
    /// from it whose record a crash lost); the slot is not restored from until that reports.
    pub(super) fn destroy_slot_domain(&mut self, slot: &str) {
        if !self.slots.destroying.insert(slot.to_string()) {
            return;
        }
        warn!(domain = %slot, "destroying a domain of a snapshot slot that no vm record holds");
        let (hv, s, failed) = (self.ctx.hv.clone(), slot.to_string(), slot.to_string());
        super::event::spawn_blocking_reporting(
            &self.ctx.events,
            move || {
                let result = hv.destroy(&s).map_err(|e| e.to_string());
                Event::SlotDomainDestroyed { slot: s, result }
            },
            move |message| Event::SlotDomainDestroyed { slot: failed, result: Err(message) },
        );
    }

    pub(super) fn on_slot_domain_destroyed(&mut self, slot: String, result: Result<(), String>) {
        self.slots.destroying.remove(&slot);
        if let Err(e) = result {
            warn!(domain = %slot, error = %e, "cannot destroy the domain (the next sweep tries again)");
        }
    }

    /// Whether a saved slot of `pool` found without a record is being looked at.
    pub(super) fn slot_found_pending(&self, pool: &PoolConfig) -> bool {
        self.slots.found.iter().any(|s| hypervisor::slot_of_pool(s, &pool.name).is_some())
    }

    /// Whether the saved slot `name`, found without a record, is being looked at.
    pub(super) fn slot_pending(&self, name: &str) -> bool {
        self.slots.found.contains(name)
    }

    /// A slot's saved state found on the storage pool without a record: its saved state's
    /// metadata and its address are read, then it is kept or removed ([`Self::on_slot_found`]).
    pub(super) fn slot_found(&mut self, slot: &str) {
        if !self.slots.found.insert(slot.to_string()) {
            return;
        }
        let hv = self.ctx.hv.clone();
        let network = self.config.libvirt.network.libvirt_network().map(str::to_string);
        let (s, failed) = (slot.to_string(), slot.to_string());
        super::event::spawn_blocking_reporting(
            &self.ctx.events,
            move || {
                let result = hv.saved_metadata(&s).and_then(|md| {
                    let address = match &network {
                        Some(net) => hv.network_dhcp(net)?.hosts.into_iter().find(|h| h.vm == s).map(|h| h.ip),
                        None => None,
                    };
                    Ok((md, address))
                });
                Event::SlotFound { slot: s, result }
            },
            move |message| Event::SlotFound {
                slot: failed.clone(),
                result: Err(HvError::Libvirt { op: "read save image", name: failed, message }),
            },
        );
    }

    /// Keeps a saved slot found without a record if it is one this member makes, made for
    /// its pool by this host from what the pool is made from now, with its address;
    /// removes it otherwise.
    pub(super) fn on_slot_found(
        &mut self,
        slot: String,
        result: Result<(Option<hypervisor::VmMetadata>, Option<Ipv4Addr>), HvError>,
    ) {
        self.slots.found.remove(&slot);
        // Its name is judged once this member's number is known (a later sweep finds it).
        if self.book.vms.contains_key(&slot) || self.book.slots.contains_key(&slot) || !self.names_known() {
            return;
        }
        let member = self.member();
        let Some(pool) = self
            .config
            .pools
            .iter()
            .find(|p| missing(&p.name, p.snapshot_slots, member, |_| false).contains(&slot))
            .filter(|p| !p.retiring)
            .cloned()
        else {
            return self.drop_found_slot(&slot, "no pool makes a slot of that name");
        };
        let host = self.config.fleet.as_ref().map(|f| f.host_id());
        let Some(current) = self.current_made_from(&pool) else {
            // The pool's files cannot be read now: a later sweep finds it again.
            return;
        };
        let fixed = self.config.libvirt.network.libvirt_network().is_some();
        let why = match &result {
            Err(e) => format!("its saved state cannot be read: {e}"),
            Ok((None, _)) => "its saved state carries no metadata of ours".into(),
            Ok((Some(m), _)) if m.pool != pool.name || m.host != host => "it was made for another pool or host".into(),
            Ok((Some(m), _)) if m.made_from.as_deref() != Some(current.as_str()) => {
                "it was made from another image or vm shape".into()
            }
            Ok((_, None)) if fixed => "the network holds no address for it".into(),
            Ok((Some(_), address)) => {
                info!(slot = %slot, pool = %pool.name, address = ?address, "adopted a saved snapshot slot found without a record");
                let network = self.config.libvirt.network.libvirt_network().map(str::to_string);
                self.book.insert_slot(SlotRec {
                    name: slot.clone(),
                    pool: pool.name.clone(),
                    made_from: current,
                    address: *address,
                    saved_at: self.now(),
                    network: network.filter(|_| address.is_some()),
                });
                return;
            }
        };
        self.drop_found_slot(&slot, &why);
    }

    /// Removes a saved slot found without a record, with everything of it.
    fn drop_found_slot(&mut self, slot: &str, why: &str) {
        let Some(pool) = self.config.pools.iter().find(|p| hypervisor::slot_of_pool(slot, &p.name).is_some()) else {
            return;
        };
        info!(slot, why, "removing a saved snapshot slot found without a record");
        let vm = VmRec { for_slot: true, ..VmRec::new(slot.to_string(), &pool.name.clone(), true, self.now()) };
        self.book.insert_vm(vm);
        self.begin_teardown(slot, Reason::SlotGone);
    }

    /// Removes the slots whose saved state the hypervisor's `volumes` lack, to be made
    /// again: a crash lost the store's write that removed one (whose volumes its teardown
    /// deleted: simulator seed 15882), or an operator deleted it. A restore from one would
    /// fail, and `status` would count it ready. Only slots saved before the listing began
    /// (a later save's volume may be missing from it) and in use by no VM.
    pub(super) fn drop_slots_without_state(&mut self, volumes: &[String], listed_at: SystemTime) {
        let in_use = |slot: &str| self.book.restored_from(slot).is_some();
        for name in without_state(self.book.slots.values(), volumes, listed_at, in_use) {
            let Some(pool) = self.book.slots.get(&name).map(|s| s.pool.clone()) else { continue };
            warn!(slot = %name, pool = %pool, "a snapshot slot's saved state is gone from the storage pool: the slot is made again");
            // One whose saved state keeps vanishing is not made again at every sweep.
            self.slot_backoff(&pool, "saved_state");
            self.drop_slot(&name, "its saved state is gone");
        }
    }

    /// Removes the slot `name` (its saved state, disk, seed and address) through a VM
    /// teardown of its name. The slot must not be in use.
    fn drop_slot(&mut self, name: &str, why: &str) {
        let Some(slot) = self.book.remove_slot(name) else { return };
        info!(slot = %name, pool = %slot.pool, why, "removing a snapshot slot");
        let vm = VmRec {
            for_slot: true,
            network: slot.network.clone(),
            ..VmRec::new(name.to_string(), &slot.pool, true, self.now())
        };
        self.book.insert_vm(vm);
        self.begin_teardown(name, Reason::SlotGone);
    }

    /// A restore from `slot` failed for the VM `vm` (its job boots cold): the slot goes and
    /// is made again.
    pub(super) fn slot_failed(&mut self, vm: &VmRec, slot: &str) {
        self.warm.cold_only.insert(vm.job_id);
        if !self.slots.broken.insert(slot.to_string()) {
            return;
        }
        // A pool whose slots keep failing must not re-make them at the pace of its jobs;
        // its other slots serve meanwhile.
        self.slot_backoff(&vm.pool, "restore");
    }

    /// Removes the slots that are no longer right and not in use: made from another image
    /// or VM shape, beyond `snapshot_slots`, of a pool removed, or whose restore failed.
    pub(super) fn tend_slots(&mut self) {
        if !self.names_known() {
            // Which slots this member keeps depends on its number.
            return;
        }
        let mut gone = Vec::new();
        for slot in self.book.slots.values() {
            if self.book.restored_from(&slot.name).is_some() {
                continue;
            }
            let why = match self.config.pool(&slot.pool) {
                None => "its pool is removed",
                Some(p) if p.retiring => "its pool is removed",
                // Beyond `snapshot_slots`, or named for another member number (made before
                // a fleet or host id change): this member makes its own.
                Some(p) if !missing(&p.name, p.snapshot_slots, self.member(), |_| false).contains(&slot.name) => {
                    "snapshot_slots is lower"
                }
                Some(_) if self.slots.broken.contains(&slot.name) => "its restore failed",
                Some(_) if self.slots.made_from.get(&slot.pool).is_some_and(|(m, _)| *m != slot.made_from) => {
                    "its pool's image or vm shape changed"
                }
                Some(_) => continue,
            };
            gone.push((slot.name.clone(), why));
        }
        for (name, why) in gone {
            self.slots.broken.remove(&name);
            self.drop_slot(&name, why);
        }
    }
}

/// The slots whose saved state the listing `volumes` lacks, of those saved before the
/// listing began (a later save's volume may be missing from it) and not `in_use`.
pub fn without_state<'a>(
    slots: impl IntoIterator<Item = &'a SlotRec>,
    volumes: &[String],
    listed_at: SystemTime,
    in_use: impl Fn(&str) -> bool,
) -> Vec<String> {
    let saved: BTreeSet<&str> = volumes.iter().filter_map(|v| hypervisor::slot_of_save_volume(v)).collect();
    slots
        .into_iter()
        .filter(|s| s.saved_at < listed_at && !saved.contains(s.name.as_str()) && !in_use(&s.name))
        .map(|s| s.name.clone())
        .collect()
}

/// Saves the slot VM `vm` and reads the address the network holds for it.
fn save<H: Hypervisor>(hv: &H, vm: &str, network: Option<&str>) -> Result<Option<Ipv4Addr>, HvError> {
    let address = match network {
        Some(net) => hv.network_dhcp(net)?.hosts.into_iter().find(|h| h.vm == vm).map(|h| h.ip),
        None => None,
    };
    super::provision::crash_during("during-save");
    hv.save(vm)?;
    super::provision::crash_point("slot-after-save");
    Ok(address)
}

/// Whether a VM record is in a state a slot VM can be watched or saved from.
pub fn is_making(vm: &VmRec) -> bool {
    vm.for_slot && matches!(vm.state, VmState::Provisioning | VmState::Warming | VmState::Waiting | VmState::Saving)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_whose_saved_state_a_listing_lacks_goes_unless_in_use_or_saved_since() {
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let slot = |name: &str, saved: u64| SlotRec {
            name: name.into(),
            pool: "p".into(),
            made_from: String::new(),
            address: None,
            saved_at: at(saved),
            network: None,
        };
        let volumes = |v: &[&str]| v.iter().map(|v| v.to_string()).collect::<Vec<_>>();
        let listed = 100;
        // (slot saved at, volumes listed, in use, goes)
        let cases: [(u64, &[&str], bool, bool); 6] = [
            (50, &["rv-p-s0.save", "rv-p-s0.qcow2"], false, false),
            (50, &["rv-p-s0.qcow2", "rv-p-s0-seed.img"], false, true),
            (50, &[], false, true),
            // Another slot's saved state, or one whose name only begins like it, is not its.
            (50, &["rv-p-s1.save", "rv-p-s01.save"], false, true),
            (50, &[], true, false),
            // Saved as the listing began, or later: the listing may not show it.
            (100, &[], false, false),
        ];
        for (saved, listed_volumes, in_use, goes) in cases {
            let slots = [slot("rv-p-s0", saved)];
            let gone = without_state(&slots, &volumes(listed_volumes), at(listed), |_| in_use);
            assert_eq!(gone == ["rv-p-s0"], goes, "saved at {saved}, {listed_volumes:?}, in use {in_use}: {gone:?}");
        }
    }

    #[test]
    fn slot_names_are_per_member_in_a_fleet() {
        let none = |_: &str| false;
        assert_eq!(missing("small", 2, None, none), ["rv-small-s0", "rv-small-s1"]);
        assert_eq!(missing("small", 2, None, |s| s == "rv-small-s0"), ["rv-small-s1"]);
        // Two members on one libvirtd: no name in common.
        assert_eq!(missing("small", 2, Some(417), none), ["rv-small-s417000", "rv-small-s417001"]);
        assert_eq!(missing("small", 1, Some(0), none), ["rv-small-s0"]);
        assert!(hypervisor::is_vm_of_pool("rv-small-s417001", "small"));
    }

    #[test]
    fn jobs_take_free_slots_then_wait_for_slots_being_given_back_then_boot() {
        // (jobs, cold_only, free, releasing) -> (job, cold) of those that get a VM now.
        type Case = (&'static str, Vec<u64>, Vec<u64>, usize, usize, Vec<(u64, bool)>);
        let cases: Vec<Case> = vec![
            ("no slots: every job boots", vec![1, 2], vec![], 0, 0, vec![(1, true), (2, true)]),
            ("a free slot for the oldest", vec![1, 2], vec![], 1, 0, vec![(1, false), (2, true)]),
            ("the oldest waits for the slot being given back", vec![1, 2], vec![], 0, 1, vec![(2, true)]),
            ("free first, then one waits, then boot", vec![1, 2, 3], vec![], 1, 1, vec![(1, false), (3, true)]),
            ("both wait", vec![1, 2], vec![], 0, 2, vec![]),
            ("a job a restore failed boots, takes no slot", vec![1, 2], vec![1], 1, 0, vec![(1, true), (2, false)]),
            ("nor waits for one", vec![1], vec![1], 0, 1, vec![(1, true)]),
        ];
        for (what, jobs, cold_only, free, rel, want) in cases {
            let cold_only = cold_only.into_iter().collect();
            assert_eq!(restore_or_boot(jobs, &cold_only, free, rel), want, "{what}");
        }
    }

    #[test]
    fn a_slot_is_worth_waiting_for_while_its_vm_is_on_its_way_out_and_not_for_long() {
        use VmState::*;
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let secs = |s: u64| at + Duration::from_secs(s);
        let cases = [
            (Finishing, secs(0), true, "its job just completed"),
            (TearingDown, secs(19), true, "torn down for 19 s"),
            (TearingDown, secs(20), false, "a teardown that hangs"),
            (Finishing, secs(25), false, "a guest that does not power off"),
            (Busy, secs(1), false, "its job runs: minutes"),
            (Booting, secs(1), false, "its runner starts"),
            (Idle, secs(1), false, "its runner waits for a job"),
            (Provisioning, secs(1), false, "being restored"),
            (TearingDown, at - Duration::from_secs(5), false, "a clock set back: no wait"),
        ];
        for (state, now, want, what) in cases {
            let vm = crate::scheduler::fixtures::vm("rv-small-7", "small", 7, state, at);
            assert_eq!(releasing(&vm, now), want, "{what}");
        }
    }
}

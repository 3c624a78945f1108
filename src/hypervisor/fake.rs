//! An in-memory [`Hypervisor`] for unit tests of the scheduler: domains and volumes in
//! maps, failures on demand, and `stop(name)` to play a guest powering off.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokio::sync::mpsc::UnboundedSender;

use super::{
    DomainState, HvError, HvEvent, Hypervisor, VmInfo, domain_xml, overlay_volume_name, save_volume_name,
    seed_volume_name,
};

/// A golden image for fakes: `dir/golden.qcow2` holding only the qcow2 header that
/// [`super::check_image`] reads (magic, a 1 GiB virtual size), with a manifest.
pub fn golden_image(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join("golden.qcow2");
    let mut header = super::QCOW2_MAGIC.to_vec();
    header.resize(24, 0);
    header.extend_from_slice(&(1u64 << 30).to_be_bytes());
    std::fs::write(&path, header)?;
    // Its manifest, as images/production/build writes one: a current guest (snapshot
    // slots need one), a runner no check finds old.
    let manifest = format!(
        r#"{{"runner_version": "2.330.0", "runner_released": "2099-01-01", "bind_protocol": {}}}"#,
        crate::cloudinit::GUEST_FRESHENS
    );
    std::fs::write(crate::images::manifest_path(&path), manifest)?;
    Ok(path)
}

/// The fake network: 198.51.100.1/24, DHCP range 198.51.100.10–250, known clients only.
pub fn fake_dhcp() -> super::network::Dhcp {
    super::network::Dhcp {
        subnet: Some(super::network::Subnet { gateway: std::net::Ipv4Addr::new(198, 51, 100, 1), prefix: 24 }),
        range: Some((std::net::Ipv4Addr::new(198, 51, 100, 10), std::net::Ipv4Addr::new(198, 51, 100, 250))),
        hosts: Vec::new(),
        known_only: true,
        no_hosts: true,
    }
}

#[derive(Default)]
pub struct FakeState {
    pub domains: BTreeMap<String, (DomainState, String)>,
    /// When each domain was last defined (the wall clock of the call).
    pub defined_at: BTreeMap<String, std::time::SystemTime>,
    pub volumes: BTreeSet<String>,
    /// Saved domains (`save`), by name: their XML. A save volume without an entry here
    /// is a corrupt save file (its restore fails).
    pub saved: BTreeMap<String, String>,
    /// The next N saves fail as on a full storage pool.
    pub fail_saves: u32,
    pub restored_total: usize,
    /// Contents of seed volumes, by VM (unless `forget_seeds`).
    pub seeds: BTreeMap<String, Vec<u8>>,
    /// Keeps no copy of seed volumes (the simulator makes thousands and reads none).
    pub forget_seeds: bool,
    /// While set, every call fails as if libvirtd were away.
    pub unavailable: bool,
    /// While set, the job storage pool is missing.
    pub pool_missing: bool,
    /// While set, the libvirt network is missing (the fence cannot be put up).
    pub network_missing: bool,
    /// nwfilters defined, by name.
    pub filters: BTreeMap<String, String>,
    /// Fail the next N `define_and_start` calls.
    pub fail_starts: u32,
    /// Refuse the next N definitions.
    pub fail_defines: u32,
    /// Calls (`"start"`, `"teardown"`, `"list_vms"`, `"guest_waiting"`) that panic, and how
    /// many more times.
    pub panics: BTreeMap<&'static str, u32>,
    /// The next N `start` calls hang until `release_stalled` is set (a hung libvirt call).
    pub stall_starts: u32,
    /// The next N `teardown` calls hang the same way (a slow libvirt).
    pub stall_teardowns: u32,
    /// The next N `teardown` calls fail, the domain left running (libvirt refuses the
    /// destroy; its other calls answer).
    pub fail_teardowns: u32,
    /// The next N `resume` calls fail.
    pub fail_resumes: u32,
    /// The next N `describe` calls fail (libvirt refuses the metadata).
    pub fail_describes: u32,
    /// Deliveries into a domain whose metadata still said "warm, no job" (a binding must
    /// make it its job's first: `provision::bind`).
    pub delivered_unmarked: u32,
    /// Deliveries refused because their guest was paused ([`Hypervisor::suspend`]).
    pub refused_paused: u32,
    /// `suspend` calls made.
    pub suspends: u32,
    /// The next N `save` calls hang the same way.
    pub stall_saves: u32,
    /// The next N `destroy` calls hang the same way.
    pub stall_destroys: u32,
    /// The next N `list_vms` calls (a sweep's first) hang the same way once they have
    /// listed (their answer stale by the time it comes).
    pub stall_lists: u32,
    /// The next N deliveries hang the same way once the guest has the message.
    pub stall_deliveries: u32,
    /// The next N deliveries hang the same way before they look at the domain (libvirtd
    /// busy with another call on it).
    pub stall_deliveries_before: u32,
    /// Deliveries and descriptions refused: their domain ran another VM's disk.
    pub not_this_vm: u32,
    pub release_stalled: bool,
    /// While set, no booted warm VM's guest waits yet (otherwise they wait as soon as they
    /// run); a restored one does (it was saved waiting).
    pub guests_booting: bool,
    /// Warm VMs whose guest ignores deliveries (never acknowledges).
    pub guests_deaf: BTreeSet<String>,
    /// VMs whose guest takes its delivery but whose acknowledgement is lost (libvirtd
    /// restarted during the exchange): the message is delivered and the call fails.
    pub acks_lost: BTreeSet<String>,
    /// Running VMs whose guest took a command (its bind port closed, `guest_waiting` false).
    pub took_command: BTreeSet<String>,
    /// Runner commands delivered into warm VMs (VM, message), in order.
    pub delivered: Vec<(String, String)>,
    /// The boot (see `boots`) each of `delivered` went into: its runner lives as long as
    /// that boot, not as long as a domain of its name. (A vector beside `delivered`, pushed
    /// with it, not a third field of its pairs: the scheduler's tests read those.)
    pub delivered_boots: Vec<usize>,
    /// The boot each domain last started or was restored in, numbered across domains:
    /// a domain of the same name restored later is another boot.
    pub boots: BTreeMap<String, usize>,
    /// Boots (see `boots`) whose vCPUs `suspend` paused, until `resume`: the domain runs
    /// (listed as running, as libvirt's is), its guest does nothing.
    pub frozen: BTreeSet<usize>,
    /// Descriptions set on VMs, by VM.
    pub descriptions: BTreeMap<String, String>,
    /// The network's DHCP host entries, by VM (`reserve_address`); its range is
    /// `FAKE_DHCP_RANGE` unless set.
    pub dhcp: Option<super::network::Dhcp>,
    /// Domains whose state and metadata cannot be read ([`VmInfo::unreadable`]).
    pub unreadable: BTreeSet<String>,
    /// Addresses released, in order: (network, VM). (One network is modelled; the name
    /// says where a teardown released.)
    pub released: Vec<(String, String)>,
    /// Most VMs running at once, ever.
    pub peak_running: usize,
    pub started_total: usize,
    /// Of those, warm VMs' (their metadata says so).
    pub warm_started: usize,
    /// What each domain XML defined or listed says (by the XML: a domain's changes with
    /// it), so that a listing, a start or a delivery does not parse it again (the simulator
    /// lists and delivers often).
    parsed: std::collections::HashMap<String, Parsed>,
}

/// What the fake reads from a domain XML.
#[derive(Clone)]
struct Parsed {
    metadata: Option<super::VmMetadata>,
    /// Its disks' file names ([`domain_xml::disk_files`]).
    disks: Vec<String>,
}

impl Parsed {
    fn of(doc: &roxmltree::Document, xml: &str) -> Parsed {
        Parsed { metadata: domain_xml::metadata_of_doc(doc, xml), disks: domain_xml::disk_files(doc) }
    }
}

impl FakeState {
    /// What a domain XML's metadata says, parsed once per XML (see `parsed`).
    pub fn metadata_of(&mut self, xml: &str) -> Option<super::VmMetadata> {
        cached(&mut self.parsed, self.domains.len(), xml).metadata.clone()
    }

    /// Whether a domain of this name runs.
    pub fn runs(&self, name: &str) -> bool {
        self.domains.get(name).is_some_and(|d| d.0 == DomainState::Running)
    }

    /// The boot (see `boots`) a domain of this name runs in, if it runs.
    pub fn boot_of(&self, name: &str) -> Option<usize> {
        self.runs(name).then(|| *self.boots.get(name).expect("a running domain was started or restored"))
    }

    /// As libvirt's: `domain` (defined) has `vm`'s overlay as its disk
    /// ([`domain_xml::runs_vm`]), else [`HvError::NotThisVm`] (counted).
    fn runs_vm(&mut self, domain: &str, vm: &str) -> Result<(), HvError> {
        let (_, xml) = self.domains.get(domain).ok_or_else(|| missing("lookup domain", domain))?;
        // As domain_xml::runs_vm, on the XML parsed once.
        if domain_xml::disks_hold_vm(&cached(&mut self.parsed, self.domains.len(), xml).disks, vm) {
            return Ok(());
        }
        self.not_this_vm += 1;
        Err(HvError::NotThisVm { domain: domain.into(), vm: vm.into() })
    }

    /// Whether a domain of this name runs with its vCPUs paused ([`Hypervisor::suspend`]).
    pub fn frozen(&self, name: &str) -> bool {
        self.boot_of(name).is_some_and(|b| self.frozen.contains(&b))
    }

    /// The domain `name` (if it runs) is paused no more: resumed, or gone.
    fn thaw(&mut self, name: &str) {
        if let Some(boot) = self.boot_of(name) {
            self.frozen.remove(&boot);
        }
    }

    /// Whether a domain of this name runs, in this boot.
    pub fn runs_in(&self, name: &str, boot: usize) -> bool {
        self.boot_of(name) == Some(boot)
    }

    /// A domain of this name starts running (started or restored): a boot of its own.
    fn boot(&mut self, name: &str) {
        let boot = self.started_total + self.restored_total;
        self.boots.insert(name.to_string(), boot);
    }
}

/// What `xml` says, from `parsed`, or parsed and remembered (XML that does not parse
/// says nothing: no metadata, no disks).
fn cached<'p>(parsed: &'p mut std::collections::HashMap<String, Parsed>, domains: usize, xml: &str) -> &'p Parsed {
    if !parsed.contains_key(xml) {
        let p = match roxmltree::Document::parse(xml) {
            Ok(doc) => Parsed::of(&doc, xml),
            Err(_) => Parsed { metadata: None, disks: Vec::new() },
        };
        remember(parsed, domains, xml, p);
    }
    &parsed[xml]
}

/// Remembers what `xml` says; forgets all once far more XML is remembered than domains
/// are defined (their XML changed, or they went).
fn remember(parsed: &mut std::collections::HashMap<String, Parsed>, domains: usize, xml: &str, p: Parsed) {
    if parsed.len() > 4 * domains + 64 {
        parsed.clear();
    }
    parsed.insert(xml.to_string(), p);
}

pub struct FakeHypervisor {
    pub state: Mutex<FakeState>,
    events: Mutex<UnboundedSender<HvEvent>>,
}

impl FakeHypervisor {
    pub fn new(events: UnboundedSender<HvEvent>) -> Self {
        FakeHypervisor { state: Mutex::new(FakeState::default()), events: Mutex::new(events) }
    }

    /// Lifecycle events go to `events` from now on (an agent started again in the same
    /// process: the simulator's).
    pub fn set_events(&self, events: UnboundedSender<HvEvent>) {
        *self.events.lock().unwrap_or_else(|p| p.into_inner()) = events;
    }

    /// Sends a lifecycle event to whoever listens now.
    pub fn send(&self, event: HvEvent) {
        let _ = self.events.lock().unwrap_or_else(|p| p.into_inner()).send(event);
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The guest powers off: the domain stops and an event is sent.
    pub fn stop(&self, name: &str) {
        if let Some(d) = self.lock().domains.get_mut(name) {
            d.0 = DomainState::Stopped;
        }
        self.send(HvEvent::Stopped(name.to_string()));
    }

    /// QEMU pauses the guest on a failed disk write; `event` says whether libvirt's event
    /// gets through (else only the sweep finds it).
    pub fn io_pause(&self, name: &str, event: bool) {
        if let Some(d) = self.lock().domains.get_mut(name) {
            d.0 = DomainState::IoPaused;
        }
        if event {
            self.send(HvEvent::IoPaused(name.to_string()));
        }
    }

    pub fn running(&self) -> Vec<String> {
        self.lock().domains.iter().filter(|(_, (s, _))| *s == DomainState::Running).map(|(n, _)| n.clone()).collect()
    }

    /// Panics if `op` is armed to (see [`FakeState::panics`]).
    fn maybe_panic(&self, op: &'static str) {
        let mut s = self.lock();
        if let Some(n) = s.panics.get_mut(op).filter(|n| **n > 0) {
            *n -= 1;
            drop(s);
            panic!("injected panic in {op}");
        }
    }

    /// Hangs until `release_stalled` is set if the counter `count` picks is armed (see
    /// [`FakeState::stall_starts`]).
    fn maybe_stall(&self, count: fn(&mut FakeState) -> &mut u32) {
        let stalled = {
            let mut s = self.lock();
            let n = count(&mut s);
            let stall = *n > 0;
            *n = n.saturating_sub(1);
            stall
        };
        while stalled && !self.lock().release_stalled {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn up(&self) -> Result<std::sync::MutexGuard<'_, FakeState>, HvError> {
        let s = self.lock();
        if s.unavailable {
            return Err(HvError::Unavailable { uri: "fake:///".into(), message: "down".into() });
        }
        Ok(s)
    }

    /// [`Hypervisor::teardown`], but for the volumes `left` names (bits 0, 1, 2: overlay,
    /// seed, saved state), whose deletes fail as a busy volume's: a teardown cut short after
    /// its domain went (the simulator's fault; 0 leaves none). As libvirt's, each delete is
    /// tried whatever the others did, and what the fake keeps of a volume goes with it.
    pub fn teardown_leaving(&self, vm: &str, left: u8) -> Vec<HvError> {
        let mut s = match self.up() {
            Ok(s) => s,
            Err(e) => return vec![e],
        };
        s.thaw(vm);
        s.domains.remove(vm);
        let mut errors = Vec::new();
        for (bit, name) in [overlay_volume_name(vm), seed_volume_name(vm), save_volume_name(vm)].into_iter().enumerate()
        {
            if left & (1 << bit) != 0 {
                if s.volumes.contains(&name) {
                    errors.push(HvError::Libvirt {
                        op: "delete volume",
                        name,
                        message: "injected: volume busy".into(),
                    });
                }
                continue;
            }
            s.volumes.remove(&name);
            match bit {
                1 => drop(s.seeds.remove(vm)),
                2 => drop(s.saved.remove(vm)),
                _ => {}
            }
        }
        errors
    }
}

impl Hypervisor for FakeHypervisor {
    fn host_resources(&self) -> Result<crate::capacity::Host, HvError> {
        drop(self.up()?);
        Ok(crate::capacity::Host { cpus: 64, memory_mib: 256 * 1024, pool_gib: 10_000 })
    }

    /// Loopback's, and the fake network's gateway (as on a host with the network up).
    fn host_addresses(&self) -> Result<Vec<std::net::Ipv4Addr>, HvError> {
        drop(self.up()?);
        Ok(vec![std::net::Ipv4Addr::new(127, 0, 0, 1), std::net::Ipv4Addr::new(198, 51, 100, 1)])
    }

    fn reserve_address(&self, name: &str, vm: &str) -> Result<super::network::Reservation, HvError> {
        let mut s = self.up()?;
        if s.network_missing {
            return Err(HvError::NetworkMissing { name: name.into() });
        }
        let dhcp = s.dhcp.get_or_insert_with(fake_dhcp);
        if let Some(mine) = dhcp.hosts.iter().find(|h| h.vm == vm) {
            return Ok(mine.clone());
        }
        let ip =
            super::network::pick(dhcp, &[]).ok_or_else(|| HvError::NetworkFull { name: name.into(), vm: vm.into() })?;
        let r = super::network::Reservation { vm: vm.into(), mac: super::network::mac_for(ip), ip };
        dhcp.hosts.push(r.clone());
        Ok(r)
    }

    fn release_address(&self, name: &str, vm: &str) -> Result<(), HvError> {
        let mut s = self.up()?;
        s.released.push((name.to_string(), vm.to_string()));
        s.dhcp.get_or_insert_with(fake_dhcp).hosts.retain(|h| h.vm != vm);
        Ok(())
    }

    fn network_dhcp(&self, name: &str) -> Result<super::network::Dhcp, HvError> {
        let mut s = self.up()?;
        if s.network_missing {
            return Err(HvError::NetworkMissing { name: name.into() });
        }
        Ok(s.dhcp.get_or_insert_with(fake_dhcp).clone())
    }

    fn define_filter(&self, name: &str, xml: &str) -> Result<(), HvError> {
        self.up()?.filters.insert(name.into(), xml.into());
        Ok(())
    }

    fn check_pool(&self) -> Result<(), HvError> {
        if self.up()?.pool_missing {
            return Err(HvError::PoolNotFound { pool: "fake".into() });
        }
        Ok(())
    }

    fn create_overlay(&self, vm: &str, _backing: &Path, _capacity: u64) -> Result<PathBuf, HvError> {
        let name = overlay_volume_name(vm);
        self.up()?.volumes.insert(name.clone());
        Ok(PathBuf::from("/fake").join(name))
    }

    fn create_seed(&self, vm: &str, image: &[u8]) -> Result<PathBuf, HvError> {
        let name = seed_volume_name(vm);
        let mut s = self.up()?;
        s.volumes.insert(name.clone());
        if !s.forget_seeds {
            s.seeds.insert(vm.to_string(), image.to_vec());
        }
        Ok(PathBuf::from("/fake").join(name))
    }

    fn define(&self, name: &str, xml: &str) -> Result<(), HvError> {
        let mut s = self.up()?;
        let refuse = |message: &str| Err(HvError::Libvirt { op: "define", name: name.into(), message: message.into() });
        if s.fail_defines > 0 {
            s.fail_defines -= 1;
            return refuse("injected");
        }
        // As libvirt: XML it cannot parse, and a title with a newline, are refused.
        let Ok(doc) = roxmltree::Document::parse(xml) else { return refuse("XML error") };
        if doc.descendants().any(|n| n.has_tag_name("title") && n.text().is_some_and(|t| t.contains('\n'))) {
            return refuse("unsupported configuration: Domain title can't contain newlines");
        }
        let parsed = Parsed::of(&doc, xml);
        let s = &mut *s;
        remember(&mut s.parsed, s.domains.len(), xml, parsed);
        s.domains.insert(name.to_string(), (DomainState::Stopped, xml.to_string()));
        s.defined_at.insert(name.to_string(), std::time::SystemTime::now());
        Ok(())
    }

    fn start(&self, name: &str) -> Result<(), HvError> {
        self.maybe_panic("start");
        self.maybe_stall(|s| &mut s.stall_starts);
        let mut s = self.up()?;
        let xml = s.domains.get(name).map(|d| d.1.clone()).ok_or_else(|| HvError::Libvirt {
            op: "start",
            name: name.into(),
            message: "no such domain".into(),
        })?;
        if s.fail_starts > 0 {
            s.fail_starts -= 1;
            return Err(HvError::Libvirt { op: "start", name: name.into(), message: "injected".into() });
        }
        s.domains.insert(name.to_string(), (DomainState::Running, xml.to_string()));
        s.took_command.remove(name);
        s.started_total += 1;
        s.boot(name);
        if s.metadata_of(&xml).is_some_and(|m| m.warm) {
            s.warm_started += 1;
        }
        let running = s.domains.values().filter(|(st, _)| *st == DomainState::Running).count();
        s.peak_running = s.peak_running.max(running);
        Ok(())
    }

    fn teardown(&self, vm: &str) -> Vec<HvError> {
        self.maybe_panic("teardown");
        self.maybe_stall(|s| &mut s.stall_teardowns);
        {
            let mut s = self.lock();
            if s.fail_teardowns > 0 {
                s.fail_teardowns -= 1;
                return vec![HvError::Libvirt { op: "destroy", name: vm.into(), message: "injected".into() }];
            }
        }
        self.teardown_leaving(vm, 0)
    }

    fn destroy(&self, name: &str) -> Result<(), HvError> {
        self.maybe_stall(|s| &mut s.stall_destroys);
        let mut s = self.up()?;
        s.thaw(name);
        s.domains.remove(name);
        Ok(())
    }

    fn suspend(&self, name: &str) -> Result<(), HvError> {
        let mut s = self.up()?;
        s.suspends += 1;
        if let Some(boot) = s.boot_of(name) {
            s.frozen.insert(boot);
        }
        Ok(())
    }

    fn resume(&self, name: &str) -> Result<(), HvError> {
        let mut s = self.up()?;
        if s.fail_resumes > 0 {
            s.fail_resumes -= 1;
            return Err(HvError::Libvirt { op: "resume", name: name.into(), message: "injected".into() });
        }
        s.thaw(name);
        Ok(())
    }

    fn volume_path(&self, name: &str) -> Result<PathBuf, HvError> {
        match self.up()?.volumes.contains(name) {
            true => Ok(PathBuf::from("/fake").join(name)),
            false => Err(missing("lookup volume", name)),
        }
    }

    fn list_vms(&self) -> Result<Vec<VmInfo>, HvError> {
        self.maybe_panic("list_vms");
        let listed: Vec<VmInfo> = {
            let mut s = self.up()?;
            let s = &mut *s;
            s.domains
                .iter()
                .map(|(name, (state, xml))| {
                    let metadata = cached(&mut s.parsed, s.domains.len(), xml).metadata.clone();
                    match s.unreadable.contains(name) {
                        false => VmInfo { name: name.clone(), state: state.clone(), metadata, unreadable: None },
                        true => VmInfo::unreadable(name, "its metadata: injected".into()),
                    }
                })
                .collect()
        };
        self.maybe_stall(|s| &mut s.stall_lists);
        Ok(listed)
    }

    fn list_volumes(&self) -> Result<Vec<String>, HvError> {
        Ok(self.up()?.volumes.iter().cloned().collect())
    }

    fn guest_waiting(&self, vm: &str) -> Result<bool, HvError> {
        self.maybe_panic("guest_waiting");
        let s = self.up()?;
        let running = s.runs(vm);
        // A restored guest resumes where it was saved: waiting.
        let booting = s.guests_booting && !s.saved.contains_key(vm);
        Ok(running && !booting && !s.took_command.contains(vm))
    }

    fn deliver(
        &self,
        domain: &str,
        vm: &str,
        message: &[u8],
        ack: &str,
        _timeout: std::time::Duration,
    ) -> Result<(), HvError> {
        self.maybe_stall(|s| &mut s.stall_deliveries_before);
        let mut s = self.up()?;
        let fail = |m: &str| Err(HvError::Libvirt { op: "deliver", name: domain.into(), message: m.into() });
        if !s.runs(domain) {
            return fail("domain not running");
        }
        s.runs_vm(domain, vm)?;
        let xml = s.domains[domain].1.clone();
        if s.metadata_of(&xml).is_some_and(|m| m.warm) {
            s.delivered_unmarked += 1;
        }
        // The guest's faults, and what it took, are the domain's (a slot's domain: its VM's).
        // A paused guest cannot answer.
        if s.frozen(domain) {
            s.refused_paused += 1;
            return fail("the guest did not acknowledge its runner command in time (bind_timeout): paused");
        }
        if s.guests_deaf.contains(domain) {
            return fail("the guest did not acknowledge its runner command in time (bind_timeout)");
        }
        let message = String::from_utf8_lossy(message).into_owned();
        assert!(ack.starts_with("ACK ") && message.ends_with('\n'), "protocol: {ack:?}");
        s.delivered.push((domain.to_string(), message));
        let boot = s.boot_of(domain).expect("checked: it runs");
        s.delivered_boots.push(boot);
        s.took_command.insert(domain.to_string());
        let lost = s.acks_lost.contains(domain);
        drop(s);
        self.maybe_stall(|s| &mut s.stall_deliveries);
        if lost {
            return fail("libvirt at qemu:///system is not reachable: connection closed");
        }
        Ok(())
    }

    /// As libvirt: the domain's metadata is replaced (what a later listing reads).
    fn describe(
        &self,
        domain: &str,
        vm: &str,
        metadata: &domain_xml::VmMetadata,
        _title: &str,
        description: &str,
    ) -> Result<(), HvError> {
        let mut s = self.up()?;
        s.runs_vm(domain, vm)?;
        if s.fail_describes > 0 {
            s.fail_describes -= 1;
            return Err(HvError::Libvirt { op: "set metadata", name: domain.into(), message: "refused".into() });
        }
        let Some((_, xml)) = s.domains.get_mut(domain) else { return Err(missing("lookup domain", domain)) };
        if let Some(described) = domain_xml::with_metadata(xml, metadata) {
            *xml = described;
        }
        s.descriptions.insert(domain.to_string(), description.to_string());
        Ok(())
    }

    fn save(&self, vm: &str) -> Result<(), HvError> {
        self.maybe_stall(|s| &mut s.stall_saves);
        let mut s = self.up()?;
        if !s.runs(vm) {
            return Err(missing("save", vm));
        }
        s.volumes.insert(save_volume_name(vm));
        if s.fail_saves > 0 {
            s.fail_saves -= 1;
            return Err(HvError::PoolFull {
                pool: "fake".into(),
                op: "save",
                name: vm.into(),
                message: "No space left on device".into(),
            });
        }
        let (_, xml) = s.domains.remove(vm).expect("checked");
        s.saved.insert(vm.to_string(), xml);
        self.send(HvEvent::Stopped(vm.to_string()));
        Ok(())
    }

    fn restore(&self, saved: &str, disk: &Path, console_log: &Path) -> Result<(), HvError> {
        let mut s = self.up()?;
        if !s.volumes.contains(&save_volume_name(saved)) || !s.volumes.contains(&overlay_volume_name(saved)) {
            return Err(missing("lookup volume", &save_volume_name(saved)));
        }
        let Some(xml) = s.saved.get(saved).cloned() else {
            return Err(HvError::Libvirt {
                op: "restore",
                name: saved.into(),
                message: "failed to read qemu header".into(),
            });
        };
        if s.domains.contains_key(saved) {
            return Err(HvError::Libvirt {
                op: "restore",
                name: saved.into(),
                message: "domain is already active".into(),
            });
        }
        let base = PathBuf::from("/fake").join(overlay_volume_name(saved));
        let xml = domain_xml::for_restore(&xml, &base, disk, Some(console_log))
            .ok_or_else(|| missing("restore disk", saved))?;
        s.domains.insert(saved.to_string(), (DomainState::Running, xml));
        s.took_command.remove(saved);
        s.restored_total += 1;
        s.boot(saved);
        let running = s.domains.values().filter(|(st, _)| *st == DomainState::Running).count();
        s.peak_running = s.peak_running.max(running);
        Ok(())
    }

    fn saved_metadata(&self, saved: &str) -> Result<Option<super::VmMetadata>, HvError> {
        let s = self.up()?;
        if !s.volumes.contains(&save_volume_name(saved)) {
            return Err(missing("lookup volume", &save_volume_name(saved)));
        }
        match s.saved.get(saved) {
            Some(xml) => Ok(domain_xml::metadata_of_domain(xml)),
            None => {
                Err(HvError::Libvirt { op: "read save image", name: saved.into(), message: "failed to read".into() })
            }
        }
    }

    fn delete_volume(&self, name: &str) -> Result<(), HvError> {
        self.up()?.volumes.remove(name);
        Ok(())
    }
}

/// The fake's answer for an object that is not there.
fn missing(op: &'static str, name: &str) -> HvError {
    HvError::Libvirt { op, name: name.into(), message: "no such object".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_domain_restores_onto_another_disk_only() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let hv = FakeHypervisor::new(tx);
        hv.create_overlay("rv-s-1", Path::new("/g.qcow2"), 1).unwrap();
        let xml =
            "<domain><name>rv-s-1</name><devices><disk><source file='/fake/rv-s-1.qcow2'/></disk></devices></domain>";
        hv.define("rv-s-1", xml).unwrap();
        hv.start("rv-s-1").unwrap();
        hv.save("rv-s-1").unwrap();
        assert!(!hv.lock().domains.contains_key("rv-s-1"), "saved: undefined");
        hv.restore("rv-s-1", Path::new("/p/job.qcow2"), Path::new("/log/j.log")).unwrap();
        let (state, now) = hv.lock().domains["rv-s-1"].clone();
        assert_eq!(state, DomainState::Running);
        assert!(now.contains("/p/job.qcow2") && !now.contains("rv-s-1.qcow2"), "{now}");
        assert!(hv.restore("rv-s-1", Path::new("/p/job2.qcow2"), Path::new("/l")).is_err(), "one at a time");
        assert!(hv.restore("rv-none", Path::new("/b"), Path::new("/l")).is_err());
        hv.teardown("rv-s-1");
        assert!(hv.lock().volumes.is_empty() && hv.lock().saved.is_empty());
    }

    /// `describe` replaces the metadata a listing reads, as libvirt's; a domain that is
    /// gone cannot be described.
    #[test]
    fn a_described_domain_lists_with_its_new_metadata() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let hv = FakeHypervisor::new(tx);
        let m = |job_id, name: &str| domain_xml::VmMetadata {
            job_id,
            run_id: 1,
            repository: "o/r".into(),
            pool: "p".into(),
            runner_name: name.into(),
            created: std::time::SystemTime::UNIX_EPOCH,
            console_log: "/l".into(),
            job_url: String::new(),
            warm: job_id == 0,
            host: None,
            made_from: None,
        };
        let xml = format!(
            "<domain><name>rv-p-w1</name><metadata><rv:vm xmlns:rv=\"{}\"><rv:job-id>0</rv:job-id>\
             <rv:run-id>0</rv:run-id><rv:repository></rv:repository><rv:pool>p</rv:pool>\
             <rv:runner-name>rv-p-w1</rv:runner-name><rv:created>1970-01-01T00:00:00Z</rv:created>\
             <rv:console-log>/l</rv:console-log><rv:warm>true</rv:warm></rv:vm></metadata>\
             <devices><disk><source file='/fake/rv-p-w1.qcow2'/></disk></devices></domain>",
            domain_xml::METADATA_NS
        );
        hv.define("rv-p-w1", &xml).unwrap();
        let listed = |hv: &FakeHypervisor| hv.list_vms().unwrap()[0].metadata.clone().map(|m| (m.job_id, m.warm));
        assert_eq!(listed(&hv), Some((0, true)));
        hv.describe("rv-p-w1", "rv-p-w1", &m(42, "rv-p-w1"), "t", "d").unwrap();
        assert_eq!(listed(&hv), Some((42, false)));
        assert!(hv.describe("rv-p-gone", "rv-p-gone", &m(43, "rv-p-gone"), "t", "d").is_err());
        // A domain running another VM's disk (a slot's, restored for the next job) is not
        // described for this one.
        let e = hv.describe("rv-p-w1", "rv-p-44", &m(44, "rv-p-44"), "t", "d").unwrap_err();
        assert!(matches!(e, HvError::NotThisVm { .. }), "{e}");
        assert_eq!(listed(&hv), Some((42, false)));
    }
}

//! The simulator's hypervisor: the fake's domains, volumes and addresses, with libvirt's
//! faults drawn by the seed: calls that fail or panic, teardowns cut short (their latency,
//! hangs included, is drawn by [`crate::offload`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::hypervisor::fake::FakeHypervisor;
use crate::hypervisor::{HvError, Hypervisor, VmInfo, VmMetadata, network};

/// Faults armed by the simulator, taken by the next calls.
#[derive(Debug, Default)]
pub struct Armed {
    /// The next N calls (of any kind) fail as libvirt's errors do.
    pub fail: u32,
    /// The next call of this kind panics (as a binding's `Drop` may).
    pub panic: Option<&'static str>,
    /// The next teardowns (one per entry, last first) stop short after the domain goes:
    /// of its volumes (overlay, seed, saved state: bits 0, 1, 2 of the entry), those the
    /// entry has are left, their deletes failing (a volume busy, the pool's directory
    /// unwritable); as libvirt's, each delete is tried whatever the others did.
    pub partial: Vec<u8>,
    /// Calls made, by kind (for the trace's counts).
    pub calls: u64,
    /// Domains the agent tore down (or destroyed) while they ran, with the boot they ran
    /// in, in order: the world asks the agent why ([`super::Sim::check_reaps`]).
    pub torn_running: Vec<(String, usize)>,
    /// The VM each boot restored into a snapshot slot's domain is (by its disk's name): a
    /// slot's domain runs one VM after another, none of its name.
    pub restored_as: BTreeMap<usize, String>,
    /// When the VM of each boot restored into a slot was made (virtual time), as the
    /// metadata its binding describes it with says (its domain's is the slot's VM's;
    /// another boot's domain says it from its start).
    pub made: BTreeMap<usize, std::time::Duration>,
}

pub struct SimHv {
    pub fake: Arc<FakeHypervisor>,
    pub armed: Mutex<Armed>,
    /// The agent's disk: once its process died (mid-write), its calls reach nothing.
    pub disk: super::disk::Disk,
    /// The world's clock (a VM's metadata says when it was made on the host's clock).
    time: super::time::Time,
}

impl SimHv {
    pub fn new(fake: Arc<FakeHypervisor>, disk: super::disk::Disk, time: super::time::Time) -> SimHv {
        SimHv { fake, armed: Mutex::new(Armed::default()), disk, time }
    }

    pub fn arm(&self) -> std::sync::MutexGuard<'_, Armed> {
        self.armed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a domain about to be torn down if it runs.
    fn note_running(&self, name: &str) {
        let boot = self.fake.lock().boot_of(name);
        if let Some(boot) = boot {
            self.arm().torn_running.push((name.to_string(), boot));
        }
    }

    fn enter(&self, op: &'static str, name: &str) -> Result<(), HvError> {
        if self.disk.dead() {
            return Err(HvError::Unavailable { uri: "sim:///".into(), message: "the agent is dead".into() });
        }
        let mut a = self.arm();
        a.calls += 1;
        if a.panic == Some(op) {
            a.panic = None;
            drop(a);
            panic!("injected panic in {op}");
        }
        if a.fail > 0 {
            a.fail -= 1;
            return Err(HvError::Libvirt { op, name: name.into(), message: "injected: internal error".into() });
        }
        Ok(())
    }
}

impl Hypervisor for SimHv {
    fn check_pool(&self) -> Result<(), HvError> {
        self.enter("check_pool", "pool")?;
        self.fake.check_pool()
    }
    fn create_overlay(&self, vm: &str, backing: &Path, capacity: u64) -> Result<PathBuf, HvError> {
        self.enter("create_overlay", vm)?;
        self.fake.create_overlay(vm, backing, capacity)
    }
    fn create_seed(&self, vm: &str, image: &[u8]) -> Result<PathBuf, HvError> {
        self.enter("create_seed", vm)?;
        self.fake.create_seed(vm, image)
    }
    fn define_filter(&self, name: &str, xml: &str) -> Result<(), HvError> {
        self.enter("define_filter", name)?;
        self.fake.define_filter(name, xml)
    }
    fn reserve_address(&self, net: &str, vm: &str) -> Result<network::Reservation, HvError> {
        self.enter("reserve_address", vm)?;
        self.fake.reserve_address(net, vm)
    }
    fn release_address(&self, net: &str, vm: &str) -> Result<(), HvError> {
        self.enter("release_address", vm)?;
        self.fake.release_address(net, vm)
    }
    fn network_dhcp(&self, net: &str) -> Result<network::Dhcp, HvError> {
        self.enter("network_dhcp", net)?;
        self.fake.network_dhcp(net)
    }
    fn host_resources(&self) -> Result<crate::capacity::Host, HvError> {
        self.enter("host_resources", "host")?;
        self.fake.host_resources()
    }
    fn host_addresses(&self) -> Result<Vec<std::net::Ipv4Addr>, HvError> {
        self.enter("host_addresses", "host")?;
        self.fake.host_addresses()
    }
    fn define(&self, name: &str, xml: &str) -> Result<(), HvError> {
        self.enter("define", name)?;
        self.fake.define(name, xml)
    }
    fn start(&self, name: &str) -> Result<(), HvError> {
        self.enter("start", name)?;
        self.fake.start(name)
    }
    fn teardown(&self, vm: &str) -> Vec<HvError> {
        if let Err(e) = self.enter("teardown", vm) {
            return vec![e];
        }
        self.note_running(vm);
        // A cut is taken only by a teardown that reaches libvirt (one refused while it is
        // away would waste it).
        let away = self.fake.lock().unavailable;
        let cut = if away { None } else { self.arm().partial.pop() };
        match cut {
            Some(left) => self.fake.teardown_leaving(vm, left),
            None => self.fake.teardown(vm),
        }
    }
    fn destroy(&self, name: &str) -> Result<(), HvError> {
        self.enter("destroy", name)?;
        self.note_running(name);
        self.fake.destroy(name)
    }
    fn suspend(&self, name: &str) -> Result<(), HvError> {
        self.enter("suspend", name)?;
        self.fake.suspend(name)
    }
    fn resume(&self, name: &str) -> Result<(), HvError> {
        self.enter("resume", name)?;
        self.fake.resume(name)
    }
    fn volume_path(&self, name: &str) -> Result<PathBuf, HvError> {
        self.enter("volume_path", name)?;
        self.fake.volume_path(name)
    }
    fn list_vms(&self) -> Result<Vec<VmInfo>, HvError> {
        self.enter("list_vms", "-")?;
        self.fake.list_vms()
    }
    fn list_volumes(&self) -> Result<Vec<String>, HvError> {
        self.enter("list_volumes", "-")?;
        self.fake.list_volumes()
    }
    fn delete_volume(&self, name: &str) -> Result<(), HvError> {
        self.enter("delete_volume", name)?;
        self.fake.delete_volume(name)
    }
    fn guest_waiting(&self, vm: &str) -> Result<bool, HvError> {
        self.enter("guest_waiting", vm)?;
        self.fake.guest_waiting(vm)
    }
    fn deliver(
        &self,
        domain: &str,
        vm: &str,
        message: &[u8],
        ack: &str,
        timeout: std::time::Duration,
    ) -> Result<(), HvError> {
        self.enter("deliver", domain)?;
        self.fake.deliver(domain, vm, message, ack, timeout)
    }
    fn describe(
        &self,
        domain: &str,
        vm: &str,
        metadata: &VmMetadata,
        title: &str,
        description: &str,
    ) -> Result<(), HvError> {
        self.enter("describe", domain)?;
        self.fake.describe(domain, vm, metadata, title, description)?;
        // Read on the host's clock as it is now (in the runtime: no step between). Only
        // for a VM restored into a slot's domain (a domain of its own says when it was made
        // from its start; the fake refused a VM torn down since: `NotThisVm`). Its first
        // description says: a binding tried again after a step of the host's clock
        // describes it again with the time its record took before the step, which the
        // clock after it reads wrong (seeds 231224 and 245289 of 6a77fcd's long run: a VM
        // judged 2,000 s younger than it was, its max_lifetime teardown a job killed).
        let made = self.time.host_to_virtual(metadata.created);
        let boot = self.fake.lock().boot_of(domain);
        let mut a = self.arm();
        if let Some(boot) = boot.filter(|b| a.restored_as.get(b).is_some_and(|r| r == vm)) {
            a.made.entry(boot).or_insert(made);
        }
        Ok(())
    }
    fn save(&self, vm: &str) -> Result<(), HvError> {
        self.enter("save", vm)?;
        self.fake.save(vm)
    }
    fn restore(&self, saved: &str, disk: &Path, console_log: &Path) -> Result<(), HvError> {
        self.enter("restore", saved)?;
        self.fake.restore(saved, disk, console_log)?;
        let vm = disk.file_name().and_then(|f| crate::hypervisor::vm_of_volume(f.to_str()?));
        if let Some(vm) = vm {
            let boot = self.fake.lock().boot_of(saved).expect("restored: it runs");
            self.arm().restored_as.insert(boot, vm.to_string());
        }
        Ok(())
    }
    fn saved_metadata(&self, saved: &str) -> Result<Option<VmMetadata>, HvError> {
        self.enter("saved_metadata", saved)?;
        self.fake.saved_metadata(saved)
    }
}

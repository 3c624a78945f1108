//! The seam to the hypervisor. Only this module talks to libvirt.
//!
//! [`Hypervisor`] is synchronous (libvirt calls block); the scheduler calls it from
//! `spawn_blocking`. [`libvirt::Libvirt`] is the real implementation, [`fake::FakeHypervisor`]
//! an in-memory one for unit tests. Lifecycle events arrive as [`HvEvent`]s on a channel.

pub mod domain_xml;
pub mod fake;
pub mod libvirt;
pub mod network;
pub mod seed;

use std::io::Read;
use std::path::{Path, PathBuf};

pub use domain_xml::VmMetadata;

/// Every domain and volume runnervisor creates starts with this.
pub const PREFIX: &str = "rv-";

/// `rv-<pool>-<job id>`, and `-<n>` for the n-th VM made for the same job.
pub fn vm_name(pool: &str, job_id: u64, attempt: u32) -> String {
    if attempt <= 1 { format!("{PREFIX}{pool}-{job_id}") } else { format!("{PREFIX}{pool}-{job_id}-{attempt}") }
}

/// `rv-<pool>-w<seq>`: a warm VM, made before any job (`seq` grows with time).
pub fn warm_vm_name(pool: &str, seq: u64) -> String {
    format!("{PREFIX}{pool}-w{seq}")
}

/// `rv-<pool>-s<n>`: snapshot slot `n` of the pool (the VM booted to be saved, the saved
/// state, and the domain of every VM restored from it).
pub fn slot_name(pool: &str, n: usize) -> String {
    format!("{PREFIX}{pool}-s{n}")
}

/// The slot number of `name` if it is a slot of `pool`.
pub fn slot_of_pool(name: &str, pool: &str) -> Option<usize> {
    let n = name.strip_prefix(PREFIX)?.strip_prefix(pool)?.strip_prefix("-s")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    n.parse().ok()
}

/// A slot's saved state (memory and devices), a file in the job storage pool.
pub fn save_volume_name(slot: &str) -> String {
    format!("{slot}.save")
}

/// The slot whose saved state the volume `volume` is ([`save_volume_name`]).
pub fn slot_of_save_volume(volume: &str) -> Option<&str> {
    volume.strip_suffix(".save")
}

pub fn overlay_volume_name(vm: &str) -> String {
    format!("{vm}.qcow2")
}

pub fn seed_volume_name(vm: &str) -> String {
    format!("{vm}-seed.img")
}

/// The VM a volume belongs to, if it is one of ours.
pub fn vm_of_volume(volume: &str) -> Option<&str> {
    if !volume.starts_with(PREFIX) {
        return None;
    }
    volume.strip_suffix("-seed.img").or_else(|| volume.strip_suffix(".qcow2")).or_else(|| slot_of_save_volume(volume))
}

/// The most digits a VM's attempt has in its name ([`vm_name`]): no job is tried a million
/// times, and GitHub's job ids have ten digits and more, so that pool `ubuntu` does not
/// take `rv-ubuntu-22-31234567890` (pool `ubuntu-22`'s job) for its job 22's attempt: its
/// sync deleted another agent's idle runners of such a pool (helper-68).
const ATTEMPT_DIGITS: usize = 6;

/// Whether a runner or domain name has the shape of a VM of `pool`.
pub fn is_vm_of_pool(name: &str, pool: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix(PREFIX).and_then(|r| r.strip_prefix(pool)).and_then(|r| r.strip_prefix('-')).is_some_and(|rest| {
        if let Some(seq) = rest.strip_prefix('w') {
            return digits(seq);
        }
        if rest.starts_with('s') {
            return slot_of_pool(name, pool).is_some();
        }
        let mut parts = rest.split('-');
        let job_ok = parts.next().is_some_and(digits);
        let attempt_ok = parts.next().is_none_or(|a| digits(a) && a.len() <= ATTEMPT_DIGITS);
        job_ok && attempt_ok && parts.next().is_none()
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainState {
    Running,
    /// Defined but not running (shut off, crashed, ...).
    Stopped,
    /// Paused by QEMU on a disk I/O error (`werror=enospc`: its storage pool is full).
    IoPaused,
}

/// A domain of ours as found on the hypervisor.
#[derive(Debug, Clone)]
pub struct VmInfo {
    pub name: String,
    pub state: DomainState,
    pub metadata: Option<VmMetadata>,
    /// Its state or metadata could not be read (why): the sweep neither adopts nor reaps
    /// it, nor its volumes or address, and a VM of the book on it is left as it is.
    pub unreadable: Option<String>,
}

impl VmInfo {
    /// Domain `name`, whose state or metadata could not be read (`why`): listed running,
    /// without metadata, so that nothing takes it for stopped or for no VM's.
    pub fn unreadable(name: &str, why: String) -> VmInfo {
        VmInfo { name: name.to_string(), state: DomainState::Running, metadata: None, unreadable: Some(why) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub virtual_size: u64,
}

/// Lifecycle news from the hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HvEvent {
    Started(String),
    Stopped(String),
    /// QEMU paused the domain on a disk I/O error (see [`DomainState::IoPaused`]).
    IoPaused(String),
    /// The connection was lost; operations fail until [`HvEvent::Reconnected`].
    Disconnected,
    /// A new connection is up and events are registered again: time for a full sweep.
    Reconnected,
}

#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("libvirt at {uri} is not reachable: {message}")]
    Unavailable { uri: String, message: String },
    #[error("storage pool {pool:?} not found or not active (virsh pool-info {pool})")]
    PoolNotFound { pool: String },
    #[error("golden image {path} not found or unreadable: {message}")]
    ImageMissing { path: PathBuf, message: String },
    #[error("golden image {path} is not a qcow2 image")]
    ImageNotQcow2 { path: PathBuf },
    #[error("golden image {path} is {image_size} bytes, larger than the pool's disk of {disk_size} bytes")]
    ImageTooLarge { path: PathBuf, image_size: u64, disk_size: u64 },
    #[error("storage pool {pool:?} is full: {op} {name}: {message} (free space in it; virsh pool-info {pool})")]
    PoolFull { pool: String, op: &'static str, name: String, message: String },
    #[error(
        "libvirt network {name:?} not found or not active: job VMs are never started on an unfenced network (create it with scripts/setup-host, or: virsh net-start {name})"
    )]
    NetworkMissing { name: String },
    #[error("libvirt network {name:?} cannot take job VMs: {reason} (define it again with runnervisor-network)")]
    NetworkUnusable { name: String, reason: String },
    #[error(
        "cannot list this host's addresses, which the fence blocks: {message} (under systemd: RestrictAddressFamilies needs AF_NETLINK)"
    )]
    HostAddresses { message: String },
    #[error("host bridge {name:?} not found: job VMs are never started on an unfenced network")]
    BridgeMissing { name: String },
    #[error(
        "libvirt network {name:?} has no free address left in its DHCP range for {vm} (every address is held by a VM; virsh net-dumpxml {name})"
    )]
    NetworkFull { name: String, vm: String },
    #[error("{op} {name}: {message}")]
    Libvirt { op: &'static str, name: String, message: String },
    /// A snapshot slot's domain runs one VM after another under the slot's name: a call
    /// made for a VM torn down since (a binding cut short whose call was under way) finds
    /// the next VM's guest there, and must not act on it.
    #[error(
        "domain {domain} no longer runs vm {vm}: its disk is another vm's (torn down; its snapshot slot restored for another job)"
    )]
    NotThisVm { domain: String, vm: String },
}

impl HvError {
    /// A volume operation that failed for lack of space becomes [`HvError::PoolFull`],
    /// naming the pool (libvirt's message already names the path).
    pub fn in_pool(self, pool: &str) -> HvError {
        match self {
            HvError::Libvirt { op, name, message } if message.contains("No space left on device") => {
                HvError::PoolFull { pool: pool.into(), op, name, message }
            }
            e => e,
        }
    }
}

/// What runnervisor needs from a hypervisor. All methods block.
pub trait Hypervisor: Send + Sync + 'static {
    /// Checks that the storage pool is there and active.
    fn check_pool(&self) -> Result<(), HvError>;
    /// Creates the VM's qcow2 overlay over `backing`, through the storage API; returns its path.
    fn create_overlay(&self, vm: &str, backing: &Path, capacity: u64) -> Result<PathBuf, HvError>;
    /// Creates the VM's seed volume with `image` as content, through the storage API.
    fn create_seed(&self, vm: &str, image: &[u8]) -> Result<PathBuf, HvError>;
    /// Defines the nwfilter `name` from `xml`, or redefines it when it changed.
    fn define_filter(&self, name: &str, xml: &str) -> Result<(), HvError>;
    /// Gives `vm` a fixed address on the libvirt network `network` ([`network`]): its
    /// DHCP host entry if it has one, else a new one (live and persistent) at the lowest
    /// free address of the network's DHCP range.
    fn reserve_address(&self, network: &str, vm: &str) -> Result<network::Reservation, HvError>;
    /// Removes `vm`'s DHCP host entry from `network`. Idempotent.
    fn release_address(&self, network: &str, vm: &str) -> Result<(), HvError>;
    /// The libvirt network `network`, which must exist and be active: its IPv4 subnet (its
    /// address is the guests' gateway and DNS server), DHCP range, host entries, and whether
    /// its DHCP server serves known clients only.
    fn network_dhcp(&self, network: &str) -> Result<network::Dhcp, HvError>;
    /// This host's CPUs and memory and the job storage pool's size.
    fn host_resources(&self) -> Result<crate::capacity::Host, HvError>;
    /// This host's own IPv4 addresses, which the fence drops: its interfaces' (the agent
    /// runs on the hypervisor), read anew for each VM.
    fn host_addresses(&self) -> Result<Vec<std::net::Ipv4Addr>, HvError> {
        crate::fence::host_addresses().map_err(|e| HvError::HostAddresses { message: e.to_string() })
    }
    /// Defines the (persistent) domain.
    fn define(&self, name: &str, xml: &str) -> Result<(), HvError>;
    /// Starts a defined domain.
    fn start(&self, name: &str) -> Result<(), HvError>;
    /// Destroys, undefines, and deletes the VM's volumes (overlay, seed, saved state).
    /// Idempotent: what is already gone is not an error. Keeps going on errors and returns
    /// all of them.
    fn teardown(&self, vm: &str) -> Vec<HvError>;
    /// Destroys and undefines the domain `name`, leaving its volumes. Idempotent.
    fn destroy(&self, name: &str) -> Result<(), HvError>;
    /// Pauses the vCPUs of the domain `name`: nothing in its guest runs until
    /// [`Hypervisor::resume`] (a runner can neither register nor take a job). A domain that
    /// is not there, not running or paused already is not an error.
    fn suspend(&self, name: &str) -> Result<(), HvError>;
    /// Lets the domain `name` run on if [`Hypervisor::suspend`] paused it. Any other domain
    /// (running, not there, paused by QEMU on a disk error) is left as it is.
    fn resume(&self, name: &str) -> Result<(), HvError>;
    /// The path of one volume of ours in the job storage pool.
    fn volume_path(&self, name: &str) -> Result<PathBuf, HvError>;
    /// Domains of ours (by name prefix), with their metadata.
    fn list_vms(&self) -> Result<Vec<VmInfo>, HvError>;
    /// Volumes of ours in the job storage pool.
    fn list_volumes(&self) -> Result<Vec<String>, HvError>;
    /// Deletes one volume of ours; a missing volume is not an error.
    fn delete_volume(&self, name: &str) -> Result<(), HvError>;
    /// Whether a warm VM's guest has its bind port ([`domain_xml::BIND_CHANNEL`]) open,
    /// i.e. waits for a job. Read from libvirt's view of the port, not from the guest.
    fn guest_waiting(&self, vm: &str) -> Result<bool, HvError>;
    /// Writes `message` into the bind port of `domain`, which runs the waiting VM `vm`
    /// (its own, or a snapshot slot's it was restored into), and waits at most `timeout`
    /// for the guest to answer exactly `ack`. What the guest sends is read bounded and only
    /// compared with `ack`, never parsed, logged or kept. [`HvError::NotThisVm`], and
    /// nothing written, when `domain` runs another VM's disk (checked before its port is
    /// opened and again after: the port is then this VM's run's).
    fn deliver(
        &self,
        domain: &str,
        vm: &str,
        message: &[u8],
        ack: &str,
        timeout: std::time::Duration,
    ) -> Result<(), HvError>;
    /// Replaces the runnervisor metadata, title and description of `domain`, which runs
    /// `vm` (a warm VM given a job); [`HvError::NotThisVm`] when it runs another VM's disk
    /// (checked before only: a VM restored into a slot's domain in the instant between may
    /// get this VM's description, which its own binding then replaces).
    fn describe(
        &self,
        domain: &str,
        vm: &str,
        metadata: &VmMetadata,
        title: &str,
        description: &str,
    ) -> Result<(), HvError>;
    /// Saves the running `vm` (memory and device state) into the volume
    /// [`save_volume_name`]`(vm)` of the job storage pool (replaced if it exists), then
    /// undefines the stopped domain: its volumes stay, and its overlay, which must not
    /// change from then on, is the base of every restore.
    fn save(&self, vm: &str) -> Result<(), HvError>;
    /// Starts, running, the domain saved by [`Hypervisor::save`]`(saved)`, its disk now
    /// `disk` (a fresh overlay of the saved VM's overlay) and its serial console logged to
    /// `console_log`: libvirt allows other host paths, nothing else (the domain keeps the
    /// name `saved`), so one runs at a time.
    fn restore(&self, saved: &str, disk: &Path, console_log: &Path) -> Result<(), HvError>;
    /// The runnervisor metadata the domain saved by [`Hypervisor::save`]`(saved)` carries,
    /// read from its saved state (`None`: none of ours).
    fn saved_metadata(&self, saved: &str) -> Result<Option<VmMetadata>, HvError>;
}

/// Most bytes read from a guest's bind port while waiting for its acknowledgement.
pub const MAX_GUEST_REPLY: usize = 256;

/// What a guest's reply on its bind port amounts to so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Exactly the acknowledgement.
    Acked,
    /// A prefix of it: read on.
    Partial,
    /// Anything else (nothing of it is looked at further).
    Wrong,
}

/// How many bytes the next read of a guest's reply may take into its buffer of
/// [`MAX_GUEST_REPLY`], having `got` bytes of it: the rest of the buffer's room, at least 1
/// (an acknowledgement longer than the buffer is read on a byte at a time).
pub fn reply_room(got: usize) -> usize {
    MAX_GUEST_REPLY.saturating_sub(got).max(1)
}

/// Compares what a guest sent with the acknowledgement expected, and nothing more.
pub fn judge_reply(got: &[u8], ack: &str) -> Reply {
    let ack = ack.as_bytes();
    if got == ack {
        Reply::Acked
    } else if got.len() < ack.len() && ack.starts_with(got) {
        Reply::Partial
    } else {
        Reply::Wrong
    }
}

/// The first bytes of every qcow2 image.
pub const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Reads the qcow2 header of a golden image: magic and virtual size.
pub fn check_image(path: &Path) -> Result<ImageInfo, HvError> {
    let missing = |e: std::io::Error| HvError::ImageMissing { path: path.into(), message: e.to_string() };
    let mut f = std::fs::File::open(path).map_err(missing)?;
    let mut header = [0u8; 32];
    f.read_exact(&mut header).map_err(|_| HvError::ImageNotQcow2 { path: path.into() })?;
    if &header[0..4] != QCOW2_MAGIC {
        return Err(HvError::ImageNotQcow2 { path: path.into() });
    }
    let virtual_size = u64::from_be_bytes(header[24..32].try_into().expect("8 bytes"));
    Ok(ImageInfo { virtual_size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(vm_name("small", 30_000_000_001, 1), "rv-small-30000000001");
        assert_eq!(vm_name("small", 7, 2), "rv-small-7-2");
        assert_eq!(vm_of_volume("rv-small-7.qcow2"), Some("rv-small-7"));
        assert_eq!(vm_of_volume("rv-small-7-2-seed.img"), Some("rv-small-7-2"));
        assert_eq!(vm_of_volume("golden.qcow2"), None);
        assert!(is_vm_of_pool("rv-small-7", "small"));
        assert!(is_vm_of_pool("rv-small-7-3", "small"));
        assert!(!is_vm_of_pool("rv-small-big-7", "small"));
        assert!(!is_vm_of_pool("rv-small-", "small"));
        assert!(!is_vm_of_pool("rv-smaller-7", "small"));
        // A pool whose name is another's and a number: its jobs' VMs are not the other's.
        assert!(!is_vm_of_pool("rv-ubuntu-22-31234567890", "ubuntu"));
        assert!(is_vm_of_pool("rv-ubuntu-22-31234567890", "ubuntu-22"));
        assert!(is_vm_of_pool(&vm_name("ubuntu", 31234567890, 999_999), "ubuntu"));
        assert!(!is_vm_of_pool("rv-small-7-1000000", "small"));
        assert!(!is_vm_of_pool("other-small-7", "small"));
        assert_eq!(warm_vm_name("small", 1764600000123), "rv-small-w1764600000123");
        assert!(is_vm_of_pool("rv-small-w1764600000123", "small"));
        assert!(!is_vm_of_pool("rv-small-w", "small"));
        assert!(!is_vm_of_pool("rv-small-w12-3", "small"));
        assert!(!is_vm_of_pool("rv-small-wx", "small"));
        assert_eq!(slot_name("small", 3), "rv-small-s3");
        assert_eq!(slot_of_pool("rv-small-s3", "small"), Some(3));
        assert!(is_vm_of_pool("rv-small-s0", "small"));
        for not in ["rv-small-s", "rv-small-s03", "rv-small-sx", "rv-small-s1-2", "rv-smaller-s1"] {
            assert!(!is_vm_of_pool(not, "small"), "{not}");
        }
        assert_eq!(vm_of_volume("rv-small-s3.save"), Some("rv-small-s3"));
    }

    #[test]
    fn a_guest_reply_is_only_compared() {
        let ack = "ACK rv-p-w1\n";
        assert_eq!(judge_reply(b"", ack), Reply::Partial);
        assert_eq!(judge_reply(b"ACK rv", ack), Reply::Partial);
        assert_eq!(judge_reply(b"ACK rv-p-w1\n", ack), Reply::Acked);
        assert_eq!(judge_reply(b"ACK rv-p-w1\nmore", ack), Reply::Wrong);
        assert_eq!(judge_reply(b"ACK rv-p-w2\n", ack), Reply::Wrong);
        assert_eq!(judge_reply(b"\x1b[2J$(reboot)", ack), Reply::Wrong);
        // A read never takes more than the buffer holds, however much of a long ack came (the
        // buffer's size less what came wrapped past 256: an unchecked receive into 256 bytes).
        assert_eq!(reply_room(0), MAX_GUEST_REPLY);
        assert_eq!(reply_room(250), 6);
        assert_eq!(reply_room(MAX_GUEST_REPLY), 1);
        assert_eq!(reply_room(300), 1);
    }

    #[test]
    fn a_full_pool_is_named() {
        let enospc = HvError::Libvirt {
            op: "create volume",
            name: "rv-small-7.qcow2".into(),
            message: "internal error: Child process (/usr/bin/qemu-img create ...) unexpected exit status 1: \
                      qemu-img: /srv/jobs/rv-small-7.qcow2: Could not write qcow2 header: No space left on device"
                .into(),
        };
        let e = enospc.in_pool("jobs");
        assert!(matches!(e, HvError::PoolFull { .. }), "{e:?}");
        let shown = e.to_string();
        assert!(shown.starts_with("storage pool \"jobs\" is full: create volume rv-small-7.qcow2:"), "{shown}");
        assert!(
            shown.contains("/srv/jobs/rv-small-7.qcow2") && shown.ends_with("(free space in it; virsh pool-info jobs)")
        );
        let other = HvError::Libvirt { op: "define", name: "rv-small-7".into(), message: "XML error".into() };
        assert!(matches!(other.in_pool("jobs"), HvError::Libvirt { .. }));
    }

    #[test]
    fn image_check_reads_the_qcow2_header() {
        let dir = crate::test_support::tempdir();
        let img = dir.join("g.qcow2");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("3G")
            .status()
            .expect("qemu-img (qemu-utils, installed by scripts/setup-host) runs");
        assert!(st.success());
        assert_eq!(check_image(&img).unwrap().virtual_size, 3 << 30);
        std::fs::write(dir.join("raw.img"), vec![0u8; 4096]).unwrap();
        assert!(matches!(check_image(&dir.join("raw.img")), Err(HvError::ImageNotQcow2 { .. })));
        assert!(matches!(check_image(&dir.join("nope")), Err(HvError::ImageMissing { .. })));
    }
}

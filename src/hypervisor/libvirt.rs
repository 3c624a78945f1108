//! The real [`Hypervisor`]: libvirt through the `virt` crate.
//!
//! - One process-wide libvirt event loop thread (required for lifecycle events and
//!   keepalive); lifecycle events of `rv-` domains are forwarded as [`HvEvent`]s.
//! - A keeper thread owns the connection: it connects, registers the event and close
//!   callbacks, and when the connection breaks (libvirtd restarted) it reconnects with
//!   backoff and sends [`HvEvent::Reconnected`] so the scheduler sweeps everything again.
//!   While disconnected every call fails with [`HvError::Unavailable`]; nothing exits.

use std::ffi::{CStr, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;
use virt::sys;

use super::{
    DomainState, HvError, HvEvent, Hypervisor, PREFIX, VmInfo, domain_xml, network, overlay_volume_name,
    save_volume_name, seed_volume_name,
};

static EVENT_LOOP: Once = Once::new();

/// Registers libvirt's default event implementation and runs it on a dedicated thread.
/// Must happen before the first `Connect::open`.
fn start_event_loop() {
    EVENT_LOOP.call_once(|| {
        virt::error::clear_error_callback();
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::error!(error = %e, "cannot register libvirt's event loop implementation");
            return;
        }
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::warn!(error = %e, "libvirt event loop iteration failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .expect("spawn libvirt event thread");
    });
}

pub struct Libvirt {
    uri: String,
    pool: String,
    conn: Mutex<Option<Connect>>,
    /// Set by the close callback (or a failed call) when the connection is gone.
    broken: Arc<AtomicBool>,
    /// The nwfilter XML this process last defined, by name: unchanged filters are not
    /// redefined (a redefinition rebuilds the rules of every VM using it).
    filters: Mutex<std::collections::HashMap<String, String>>,
    /// Held while a free address is chosen and reserved: provisioning tasks run at once,
    /// and two must not pick the same one.
    reserving: Mutex<()>,
}

/// Options of the keeper thread.
const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

impl Libvirt {
    /// The libvirt network `name`, which must exist and be active, and its live XML.
    fn active_network(&self, name: &str) -> Result<(virt::network::Network, String), HvError> {
        let conn = self.conn()?;
        let net = conn.lookup_network_by_name(name).map_err(|e| match e.code() {
            Enum::Known(ErrorNumber::NoNetwork) => HvError::NetworkMissing { name: name.into() },
            _ => self.err("lookup network", name, e),
        })?;
        if !net.is_active().map_err(|e| self.err("network state", name, e))? {
            return Err(HvError::NetworkMissing { name: name.into() });
        }
        let xml = net.xml_desc(0).map_err(|e| self.err("network XML", name, e))?;
        Ok((net, xml))
    }

    /// The network's DHCP leases now: (address, MAC) of each IPv4 lease.
    fn leases(&self, net: &virt::network::Network, name: &str) -> Result<Vec<(std::net::Ipv4Addr, String)>, HvError> {
        let mut leases: *mut sys::virNetworkDHCPLeasePtr = std::ptr::null_mut();
        // SAFETY: `net` is a live network object; libvirt allocates the array and each lease,
        // which are freed below (every lease, then the array), whatever they hold.
        let n = unsafe { sys::virNetworkGetDHCPLeases(net.as_ptr(), std::ptr::null(), &mut leases, 0) };
        if n < 0 {
            return Err(HvError::Libvirt {
                op: "network leases",
                name: name.into(),
                message: virt::error::Error::last_error().to_string(),
            });
        }
        let mut out = Vec::new();
        for i in 0..n as usize {
            // SAFETY: libvirt returned `n` valid lease pointers; their strings are
            // NUL-terminated or null.
            unsafe {
                let lease = *leases.add(i);
                let text = |p: *mut std::os::raw::c_char| {
                    (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
                };
                if let (Some(ip), Some(mac)) = (text((*lease).ipaddr), text((*lease).mac))
                    && let Ok(ip) = ip.parse()
                {
                    out.push((ip, mac.to_ascii_lowercase()));
                }
                sys::virNetworkDHCPLeaseFree(lease);
            }
        }
        if !leases.is_null() {
            // SAFETY: the array libvirt allocated with malloc, its elements freed above.
            unsafe { libc::free(leases.cast()) };
        }
        Ok(out)
    }

    /// A network update applies to the running network and, for a persistent one, to its
    /// definition too (a restarted network keeps its reservations).
    fn update_flags(&self, net: &virt::network::Network, name: &str) -> Result<sys::virNetworkUpdateFlags, HvError> {
        let persistent = net.is_persistent().map_err(|e| self.err("network state", name, e))?;
        Ok(sys::VIR_NETWORK_UPDATE_AFFECT_LIVE | if persistent { sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG } else { 0 })
    }

    /// Connects to `uri` (retrying in the background while libvirtd is away) and forwards
    /// lifecycle events of our domains to `events`. Returns at once.
    pub fn start(uri: &str, pool: &str, events: UnboundedSender<HvEvent>) -> Arc<Libvirt> {
        start_event_loop();
        let lv = Arc::new(Libvirt {
            uri: uri.to_string(),
            pool: pool.to_string(),
            conn: Mutex::new(None),
            broken: Arc::new(AtomicBool::new(false)),
            filters: Mutex::new(std::collections::HashMap::new()),
            reserving: Mutex::new(()),
        });
        let keeper = Arc::downgrade(&lv);
        lv.try_connect(&events);
        std::thread::Builder::new()
            .name("libvirt-keeper".into())
            .spawn(move || {
                let mut delay = RECONNECT_MIN;
                loop {
                    std::thread::sleep(delay);
                    let Some(lv) = keeper.upgrade() else { return };
                    if lv.connected() {
                        delay = RECONNECT_MIN;
                        continue;
                    }
                    delay = if lv.try_connect(&events) { RECONNECT_MIN } else { (delay * 2).min(RECONNECT_MAX) };
                }
            })
            .expect("spawn libvirt keeper thread");
        lv
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Connect>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn connected(&self) -> bool {
        !self.broken.load(Ordering::SeqCst) && self.lock().is_some()
    }

    /// Opens a connection and registers callbacks. Returns whether it is connected now.
    fn try_connect(&self, events: &UnboundedSender<HvEvent>) -> bool {
        let mut guard = self.lock();
        let had = guard.is_some();
        if let Some(old) = guard.take() {
            // Closing a dead connection may fail, and virt's Drop panics on failure: leak it.
            std::mem::forget(old);
            tracing::warn!(uri = %self.uri, "libvirt connection lost; reconnecting");
            let _ = events.send(HvEvent::Disconnected);
        }
        match Connect::open(Some(&self.uri)) {
            Ok(conn) => {
                if let Err(e) = conn.set_keep_alive(5, 3) {
                    tracing::debug!(error = %e, "libvirt keepalive not enabled");
                }
                self.broken.store(false, Ordering::SeqCst);
                register_callbacks(&conn, events.clone(), self.broken.clone());
                *guard = Some(conn);
                drop(guard);
                if had {
                    tracing::info!(uri = %self.uri, "libvirt connection re-established");
                }
                let _ = events.send(HvEvent::Reconnected);
                true
            }
            Err(e) => {
                tracing::warn!(uri = %self.uri, error = %e.message(), "libvirt not reachable");
                false
            }
        }
    }

    fn conn(&self) -> Result<Connect, HvError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(self.unavailable("connection closed"));
        }
        self.lock().as_ref().cloned().ok_or_else(|| self.unavailable("not connected"))
    }

    fn unavailable(&self, message: &str) -> HvError {
        HvError::Unavailable { uri: self.uri.clone(), message: message.into() }
    }

    /// The domain `domain` if it runs the VM `vm` ([`domain_xml::runs_vm`]), read just
    /// before acting on it. The handle names the domain (name and UUID, which a slot's
    /// domain keeps across restores), not this run of it: what is done with it after this
    /// check may reach a VM restored into the domain since, unless checked again after (see
    /// [`Libvirt::still_runs`]).
    fn domain_of(&self, conn: &Connect, domain: &str, vm: &str) -> Result<Domain, HvError> {
        let dom = conn.lookup_domain_by_name(domain).map_err(|e| self.err("lookup domain", domain, e))?;
        self.still_runs(&dom, domain, vm)?;
        Ok(dom)
    }

    /// Whether `dom` (the domain `domain`) runs the VM `vm` now. Once a call bound to the
    /// domain's run (a channel opened on it) is followed by this check, the call reached
    /// `vm`'s run: the VM's overlay is deleted before its slot's domain runs another VM,
    /// so no later run has it.
    fn still_runs(&self, dom: &Domain, domain: &str, vm: &str) -> Result<(), HvError> {
        let xml = dom.xml_desc(0).map_err(|e| self.err("read domain", domain, e))?;
        match domain_xml::runs_vm(&xml, vm) {
            true => Ok(()),
            false => Err(HvError::NotThisVm { domain: domain.into(), vm: vm.into() }),
        }
    }

    /// Maps a libvirt error; connection-level errors mark the connection broken.
    fn err(&self, op: &'static str, name: &str, e: virt::error::Error) -> HvError {
        if matches!(e.code(), Enum::Known(ErrorNumber::NoConnect | ErrorNumber::InvalidConn | ErrorNumber::Rpc))
            || (matches!(e.code(), Enum::Known(ErrorNumber::SystemError)) && !self.alive())
        {
            self.broken.store(true, Ordering::SeqCst);
            return self.unavailable(e.message());
        }
        HvError::Libvirt { op, name: name.into(), message: e.message().to_string() }
    }

    fn alive(&self) -> bool {
        self.lock().as_ref().is_some_and(|c| c.is_alive().unwrap_or(false))
    }

    /// Whether the host can run domains of `domain_type` (`kvm`, `qemu`) for x86_64.
    pub fn supports_domain_type(&self, domain_type: &str) -> Result<bool, HvError> {
        let conn = self.conn()?;
        let caps = conn.capabilities().map_err(|e| self.err("capabilities", "", e))?;
        let doc = roxmltree::Document::parse(&caps).map_err(|e| HvError::Libvirt {
            op: "capabilities",
            name: String::new(),
            message: e.to_string(),
        })?;
        Ok(doc
            .descendants()
            .filter(|n| n.has_tag_name("guest"))
            .filter(|g| g.descendants().any(|a| a.has_tag_name("arch") && a.attribute("name") == Some("x86_64")))
            .any(|g| g.descendants().any(|d| d.has_tag_name("domain") && d.attribute("type") == Some(domain_type))))
    }

    /// The security drivers libvirt confines QEMU with (`apparmor`, `selinux`, `dac`, `none`).
    pub fn security_models(&self) -> Result<Vec<String>, HvError> {
        let conn = self.conn()?;
        let caps = conn.capabilities().map_err(|e| self.err("capabilities", "", e))?;
        Ok(domain_xml::security_models(&caps))
    }

    /// libvirt's version, `major.minor.micro`.
    pub fn version(&self) -> Result<String, HvError> {
        let conn = self.conn()?;
        let v = conn.lib_version().map_err(|e| self.err("version", "", e))?;
        Ok(format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000))
    }

    fn storage_pool(&self, conn: &Connect) -> Result<StoragePool, HvError> {
        let pool = conn.lookup_storage_pool_by_name(&self.pool).map_err(|e| match e.code() {
            Enum::Known(ErrorNumber::NoStoragePool) => HvError::PoolNotFound { pool: self.pool.clone() },
            _ => self.err("lookup pool", &self.pool, e),
        })?;
        if !pool.is_active().unwrap_or(false) {
            return Err(HvError::PoolNotFound { pool: self.pool.clone() });
        }
        Ok(pool)
    }

    /// The domain `name`, or `None` if there is none.
    fn domain_if_there(&self, name: &str) -> Result<Option<Domain>, HvError> {
        match self.conn()?.lookup_domain_by_name(name) {
            Ok(dom) => Ok(Some(dom)),
            Err(e) if is_code(&e, &[ErrorNumber::NoDomain]) => Ok(None),
            Err(e) => Err(self.err("lookup domain", name, e)),
        }
    }

    /// Destroys and undefines the domain `name` if it exists; what is gone is no error.
    fn destroy_on(&self, conn: &Connect, name: &str) -> Vec<HvError> {
        let mut errors = Vec::new();
        match conn.lookup_domain_by_name(name) {
            Ok(dom) => {
                if dom.is_active().unwrap_or(true)
                    && let Err(e) = dom.destroy()
                    && !is_code(&e, &[ErrorNumber::NoDomain, ErrorNumber::OperationInvalid])
                {
                    errors.push(self.err("destroy", name, e));
                }
                // A transient domain (one restored from a slot) is gone once destroyed.
                if let Err(e) = dom.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_NVRAM)
                    && !is_code(&e, &[ErrorNumber::NoDomain, ErrorNumber::OperationInvalid])
                {
                    errors.push(self.err("undefine", name, e));
                }
            }
            Err(e) if is_code(&e, &[ErrorNumber::NoDomain]) => {}
            Err(e) => errors.push(self.err("lookup domain", name, e)),
        }
        errors
    }

    /// Creates the seed volume and uploads its content through a libvirt stream.
    fn upload_seed(&self, vm: &str, image: &[u8]) -> Result<PathBuf, HvError> {
        let conn = self.conn()?;
        let pool = self.storage_pool(&conn)?;
        let name = seed_volume_name(vm);
        let vol = self.create_volume(&pool, &name, &domain_xml::raw_volume(&name, image.len() as u64))?;
        let stream = Stream::new(&conn, 0).map_err(|e| self.err("new stream", &name, e))?;
        vol.upload(&stream, 0, image.len() as u64, 0).map_err(|e| self.err("upload", &name, e))?;
        let mut off = 0;
        while off < image.len() {
            let n = stream.send(&image[off..]).map_err(|e| self.err("upload", &name, e))?;
            if n <= 0 {
                return Err(HvError::Libvirt { op: "upload", name, message: "stream refused data".into() });
            }
            off += n as usize;
        }
        stream.finish().map_err(|e| self.err("upload", &name, e))?;
        vol.path().map(PathBuf::from).map_err(|e| self.err("volume path", &name, e))
    }

    /// Creates a volume from XML, replacing a stale one of the same name.
    fn create_volume(&self, pool: &StoragePool, name: &str, xml: &str) -> Result<StorageVol, HvError> {
        if let Ok(stale) = pool.lookup_storage_vol_by_name(name) {
            tracing::warn!(volume = name, "replacing a stale volume");
            stale.delete(0).map_err(|e| self.err("delete stale volume", name, e))?;
        }
        StorageVol::create_xml(pool, xml, 0).map_err(|e| self.err("create volume", name, e))
    }
}

/// Sends `message` on a non-blocking stream to a guest's port, then reads (at most
/// [`super::MAX_GUEST_REPLY`] bytes) until the guest answered exactly `ack`, before `deadline`.
/// libvirt's event loop thread moves the data; this polls the stream's buffers.
fn exchange(stream: &Stream, message: &[u8], ack: &str, deadline: std::time::Instant) -> Result<(), String> {
    const POLL: Duration = Duration::from_millis(2);
    const WOULD_BLOCK: c_int = -2;
    let late = || std::time::Instant::now() > deadline;
    let mut sent = 0;
    while sent < message.len() {
        let rest = &message[sent..];
        // SAFETY: the stream is open and `rest` outlives the call.
        let n = unsafe { sys::virStreamSend(stream.as_ptr(), rest.as_ptr().cast(), rest.len()) };
        match n {
            WOULD_BLOCK if late() => return Err("the guest did not take the message in time".into()),
            WOULD_BLOCK => std::thread::sleep(POLL),
            n if n < 0 => return Err(format!("send: {}", virt::error::Error::last_error())),
            n => sent += n as usize,
        }
    }
    let mut got = Vec::with_capacity(ack.len());
    let mut buf = [0u8; super::MAX_GUEST_REPLY];
    loop {
        let room = super::reply_room(got.len());
        // SAFETY: the stream is open and `buf` has `room` bytes (at most its length).
        let n = unsafe { sys::virStreamRecv(stream.as_ptr(), buf.as_mut_ptr().cast(), room) };
        match n {
            WOULD_BLOCK if late() => {
                return Err("the guest did not acknowledge its runner command in time (bind_timeout)".into());
            }
            WOULD_BLOCK => std::thread::sleep(POLL),
            0 => return Err("the guest closed its port without acknowledging".into()),
            n if n < 0 => return Err(format!("receive: {}", virt::error::Error::last_error())),
            n => {
                got.extend_from_slice(&buf[..n as usize]);
                match super::judge_reply(&got, ack) {
                    super::Reply::Acked => return Ok(()),
                    super::Reply::Partial => {}
                    super::Reply::Wrong => {
                        return Err(format!("the guest answered {} bytes that are not the acknowledgement", got.len()));
                    }
                }
            }
        }
    }
}

/// QEMU pauses a guest whose disk write fails for lack of space (`werror=enospc`).
fn paused_on_io_error(dom: &Domain) -> bool {
    use virt::domain::{DomainPausedReason, DomainState as Libvirt, DomainStateReason};
    matches!(
        dom.state(),
        Ok((
            Enum::Known(Libvirt::Paused),
            Enum::Known(DomainStateReason::Paused(Enum::Known(DomainPausedReason::IOError)))
        ))
    )
}

fn is_code(e: &virt::error::Error, codes: &[ErrorNumber]) -> bool {
    matches!(e.code(), Enum::Known(c) if codes.contains(&c))
}

impl Hypervisor for Libvirt {
    fn reserve_address(&self, name: &str, vm: &str) -> Result<network::Reservation, HvError> {
        let _one_at_a_time = self.reserving.lock().unwrap_or_else(|e| e.into_inner());
        // Another process on this libvirt (a second agent, a test) may take the address
        // chosen between the read and the update: libvirt refuses a second entry for it,
        // and the next lowest is tried.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (net, xml) = self.active_network(name)?;
            let dhcp = network::dhcp(&xml);
            if let Some(mine) = dhcp.hosts.iter().find(|h| h.vm == vm) {
                return Ok(mine.clone());
            }
            // Not the network's own address, nor one leased to a MAC other than the one its
            // VM would have (a client of before the network served reserved clients only):
            // the DHCP server would refuse it to the VM while that lease lasts.
            let mut avoid: Vec<_> = dhcp.subnet.map(|s| s.gateway).into_iter().collect();
            avoid.extend(
                self.leases(&net, name)?
                    .into_iter()
                    .filter(|(ip, mac)| *mac != network::mac_for(*ip))
                    .map(|(ip, _)| ip),
            );
            let ip = network::pick(&dhcp, &avoid)
                .ok_or_else(|| HvError::NetworkFull { name: name.into(), vm: vm.into() })?;
            let r = network::Reservation { vm: vm.into(), mac: network::mac_for(ip), ip };
            let flags = self.update_flags(&net, name)?;
            let added = net.update(
                sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
                sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
                -1,
                &network::host_xml(&r),
                flags,
            );
            match added {
                Ok(()) => return Ok(r),
                Err(e) => {
                    let taken = self
                        .active_network(name)
                        .map(|(_, xml)| network::dhcp(&xml).hosts.iter().any(|h| h.ip == r.ip || h.mac == r.mac))
                        .unwrap_or(false);
                    if !taken || attempt >= 8 {
                        return Err(self.err("reserve address", vm, e));
                    }
                }
            }
        }
    }

    fn release_address(&self, name: &str, vm: &str) -> Result<(), HvError> {
        let _one_at_a_time = self.reserving.lock().unwrap_or_else(|e| e.into_inner());
        let (net, xml) = match self.active_network(name) {
            Ok(n) => n,
            // No network, no entry: what is gone is not an error.
            Err(HvError::NetworkMissing { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        for r in network::dhcp(&xml).hosts.iter().filter(|h| h.vm == vm) {
            net.update(
                sys::VIR_NETWORK_UPDATE_COMMAND_DELETE,
                sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
                -1,
                &network::host_xml(r),
                self.update_flags(&net, name)?,
            )
            .map_err(|e| self.err("release address", vm, e))?;
        }
        Ok(())
    }

    fn network_dhcp(&self, name: &str) -> Result<network::Dhcp, HvError> {
        let (_, xml) = self.active_network(name)?;
        Ok(network::dhcp(&xml))
    }

    fn host_resources(&self) -> Result<crate::capacity::Host, HvError> {
        let conn = self.conn()?;
        let node = conn.node_info().map_err(|e| self.err("node info", "", e))?;
        let pool = self.storage_pool(&conn)?.info().map_err(|e| self.err("storage pool info", &self.pool, e))?;
        Ok(crate::capacity::Host {
            cpus: u64::from(node.cpus),
            memory_mib: node.memory / 1024,
            pool_gib: pool.capacity >> 30,
        })
    }

    fn define_filter(&self, name: &str, xml: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        let mut defined = self.filters.lock().unwrap_or_else(|p| p.into_inner());
        if defined.get(name).is_some_and(|x| x == xml) && conn.lookup_nwfilter_by_name(name).is_ok() {
            return Ok(());
        }
        // libvirt redefines a filter only under its existing UUID.
        let existing = conn.lookup_nwfilter_by_name(name).ok().and_then(|f| f.uuid_string().ok());
        let xml_with_uuid = match &existing {
            Some(uuid) => domain_xml::with_uuid(xml, uuid),
            None => xml.to_string(),
        };
        conn.define_nwfilter_xml(&xml_with_uuid).map_err(|e| self.err("define nwfilter", name, e))?;
        tracing::info!(filter = name, "network fence (nwfilter) defined");
        defined.insert(name.into(), xml.into());
        Ok(())
    }

    fn check_pool(&self) -> Result<(), HvError> {
        let conn = self.conn()?;
        self.storage_pool(&conn).map(|_| ())
    }

    fn create_overlay(&self, vm: &str, backing: &Path, capacity: u64) -> Result<PathBuf, HvError> {
        let conn = self.conn()?;
        let pool = self.storage_pool(&conn)?;
        let name = overlay_volume_name(vm);
        let vol = self
            .create_volume(&pool, &name, &domain_xml::overlay_volume(&name, capacity, backing))
            .map_err(|e| e.in_pool(&self.pool))?;
        vol.path().map(PathBuf::from).map_err(|e| self.err("volume path", &name, e))
    }

    fn create_seed(&self, vm: &str, image: &[u8]) -> Result<PathBuf, HvError> {
        self.upload_seed(vm, image).map_err(|e| e.in_pool(&self.pool))
    }

    fn define(&self, name: &str, xml: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        conn.define_domain_xml(xml).map(|_| ()).map_err(|e| self.err("define", name, e))
    }

    fn start(&self, name: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        let dom = conn.lookup_domain_by_name(name).map_err(|e| self.err("lookup domain", name, e))?;
        dom.create().map_err(|e| self.err("start", name, e))
    }

    fn teardown(&self, vm: &str) -> Vec<HvError> {
        let conn = match self.conn() {
            Ok(c) => c,
            Err(e) => return vec![e],
        };
        let mut errors = self.destroy_on(&conn, vm);
        match self.storage_pool(&conn) {
            Ok(pool) => {
                for name in [overlay_volume_name(vm), seed_volume_name(vm), save_volume_name(vm)] {
                    match pool.lookup_storage_vol_by_name(&name) {
                        Ok(vol) => {
                            if let Err(e) = vol.delete(0) {
                                errors.push(self.err("delete volume", &name, e));
                            }
                        }
                        Err(e) if is_code(&e, &[ErrorNumber::NoStorageVolume]) => {}
                        Err(e) => errors.push(self.err("lookup volume", &name, e)),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        errors
    }

    fn destroy(&self, name: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        self.destroy_on(&conn, name).into_iter().next().map_or(Ok(()), Err)
    }

    fn suspend(&self, name: &str) -> Result<(), HvError> {
        let Some(dom) = self.domain_if_there(name)? else { return Ok(()) };
        // Paused already: libvirt says yes; shut off (or gone meanwhile): nothing runs.
        match dom.suspend() {
            Err(e) if !is_code(&e, &[ErrorNumber::NoDomain, ErrorNumber::OperationInvalid]) => {
                Err(self.err("suspend", name, e))
            }
            _ => Ok(()),
        }
    }

    fn resume(&self, name: &str) -> Result<(), HvError> {
        use virt::domain::{DomainPausedReason, DomainState as Libvirt, DomainStateReason};
        let Some(dom) = self.domain_if_there(name)? else { return Ok(()) };
        let state = match dom.state() {
            Ok(state) => state,
            Err(e) if is_code(&e, &[ErrorNumber::NoDomain]) => return Ok(()),
            Err(e) => return Err(self.err("domain state", name, e)),
        };
        // Paused by `suspend` (or by an operator's `virsh suspend`: the same reason).
        let ours = matches!(
            state,
            (
                Enum::Known(Libvirt::Paused),
                Enum::Known(DomainStateReason::Paused(Enum::Known(DomainPausedReason::User)))
            )
        );
        if !ours {
            return Ok(());
        }
        match dom.resume() {
            Err(e) if !is_code(&e, &[ErrorNumber::NoDomain, ErrorNumber::OperationInvalid]) => {
                Err(self.err("resume", name, e))
            }
            _ => Ok(()),
        }
    }

    fn volume_path(&self, name: &str) -> Result<PathBuf, HvError> {
        let conn = self.conn()?;
        let pool = self.storage_pool(&conn)?;
        let vol = pool.lookup_storage_vol_by_name(name).map_err(|e| self.err("lookup volume", name, e))?;
        vol.path().map(PathBuf::from).map_err(|e| self.err("volume path", name, e))
    }

    fn guest_waiting(&self, vm: &str) -> Result<bool, HvError> {
        let conn = self.conn()?;
        let dom = conn.lookup_domain_by_name(vm).map_err(|e| self.err("lookup domain", vm, e))?;
        let xml = dom.xml_desc(0).map_err(|e| self.err("domain XML", vm, e))?;
        domain_xml::channel_connected(&xml, domain_xml::BIND_CHANNEL).ok_or_else(|| HvError::Libvirt {
            op: "bind port",
            name: vm.into(),
            message: format!("the domain has no {} channel (not a warm VM)", domain_xml::BIND_CHANNEL),
        })
    }

    fn deliver(&self, domain: &str, vm: &str, message: &[u8], ack: &str, timeout: Duration) -> Result<(), HvError> {
        let conn = self.conn()?;
        let dom = self.domain_of(&conn, domain, vm)?;
        let stream = Stream::new(&conn, sys::VIR_STREAM_NONBLOCK).map_err(|e| self.err("new stream", domain, e))?;
        dom.open_channel(Some(domain_xml::BIND_CHANNEL), &stream, sys::VIR_DOMAIN_CHANNEL_FORCE)
            .map_err(|e| self.err("open bind port", domain, e))?;
        // The port opened is the run's the domain had then: the VM's, checked again now
        // (another VM restored into a slot's domain since the check above would get
        // this VM's command).
        if let Err(e) = self.still_runs(&dom, domain, vm) {
            let _ = stream.abort();
            return Err(e);
        }
        let result = exchange(&stream, message, ack, std::time::Instant::now() + timeout);
        // Ends libvirt's side of the session; the guest sees the port close.
        let _ = stream.abort();
        result.map_err(|message| HvError::Libvirt { op: "deliver", name: domain.into(), message })
    }

    fn save(&self, vm: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        let dom = conn.lookup_domain_by_name(vm).map_err(|e| self.err("lookup domain", vm, e))?;
        let pool = self.storage_pool(&conn)?;
        // Made through the storage API (the pool knows it, its teardown deletes it, a full
        // pool is named); QEMU's stream through libvirt's helper then replaces its content.
        let name = save_volume_name(vm);
        let vol =
            self.create_volume(&pool, &name, &domain_xml::raw_volume(&name, 0)).map_err(|e| e.in_pool(&self.pool))?;
        let file = vol.path().map_err(|e| self.err("volume path", &name, e))?;
        let path = std::ffi::CString::new(file).map_err(|e| HvError::Libvirt {
            op: "save",
            name: vm.into(),
            message: e.to_string(),
        })?;
        // SAFETY: `dom` is a live domain object and `path` a NUL-terminated string that
        // outlives the call; no replacement XML is passed.
        let rc = unsafe {
            sys::virDomainSaveFlags(dom.as_ptr(), path.as_ptr(), std::ptr::null(), sys::VIR_DOMAIN_SAVE_RUNNING)
        };
        if rc < 0 {
            return Err(self.err("save", vm, virt::error::Error::last_error()).in_pool(&self.pool));
        }
        // Nothing may start the saved disk again but a restore onto an overlay of it.
        if let Err(e) = dom.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_NVRAM)
            && !is_code(&e, &[ErrorNumber::NoDomain])
        {
            return Err(self.err("undefine", vm, e));
        }
        let _ = pool.refresh(0);
        Ok(())
    }

    fn restore(&self, saved: &str, disk: &Path, console_log: &Path) -> Result<(), HvError> {
        let conn = self.conn()?;
        let pool = self.storage_pool(&conn)?;
        let path = |name: &str| -> Result<String, HvError> {
            let vol = pool.lookup_storage_vol_by_name(name).map_err(|e| self.err("lookup volume", name, e))?;
            vol.path().map_err(|e| self.err("volume path", name, e))
        };
        let (file, base) = (path(&save_volume_name(saved))?, path(&overlay_volume_name(saved))?);
        let xml = conn
            .save_image_xml_desc(&file, sys::VIR_DOMAIN_SAVE_IMAGE_XML_SECURE)
            .map_err(|e| self.err("read save image", saved, e))?;
        let xml = domain_xml::for_restore(&xml, Path::new(&base), disk, Some(console_log)).ok_or_else(|| {
            HvError::Libvirt {
                op: "restore",
                name: saved.to_string(),
                message: format!("the saved domain has no disk at {base} (or a path is not UTF-8)"),
            }
        })?;
        conn.restore_domain_flags(&file, Some(&xml), sys::VIR_DOMAIN_SAVE_RUNNING)
            .map_err(|e| self.err("restore", saved, e))
    }

    fn saved_metadata(&self, saved: &str) -> Result<Option<domain_xml::VmMetadata>, HvError> {
        let conn = self.conn()?;
        let pool = self.storage_pool(&conn)?;
        let name = save_volume_name(saved);
        let vol = pool.lookup_storage_vol_by_name(&name).map_err(|e| self.err("lookup volume", &name, e))?;
        let file = vol.path().map_err(|e| self.err("volume path", &name, e))?;
        let xml = conn.save_image_xml_desc(&file, 0).map_err(|e| self.err("read save image", saved, e))?;
        Ok(domain_xml::metadata_of_domain(&xml))
    }

    fn describe(
        &self,
        domain: &str,
        vm: &str,
        metadata: &domain_xml::VmMetadata,
        title: &str,
        description: &str,
    ) -> Result<(), HvError> {
        let conn = self.conn()?;
        let dom = self.domain_of(&conn, domain, vm)?;
        // A domain restored from a snapshot slot is transient: it has no persistent config.
        let flags = match dom.is_persistent() {
            Ok(false) => sys::VIR_DOMAIN_AFFECT_LIVE,
            _ => sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG,
        };
        let xml = domain_xml::metadata_xml(metadata);
        dom.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(&xml),
            Some(domain_xml::METADATA_PREFIX),
            Some(domain_xml::METADATA_NS),
            flags,
        )
        .map_err(|e| self.err("set metadata", domain, e))?;
        dom.set_metadata(sys::VIR_DOMAIN_METADATA_TITLE as i32, Some(title), None, None, flags)
            .map_err(|e| self.err("set title", domain, e))?;
        dom.set_metadata(sys::VIR_DOMAIN_METADATA_DESCRIPTION as i32, Some(description), None, None, flags)
            .map_err(|e| self.err("set description", domain, e))
    }

    fn list_vms(&self) -> Result<Vec<VmInfo>, HvError> {
        let conn = self.conn()?;
        let doms = conn.list_all_domains(0).map_err(|e| self.err("list domains", "", e))?;
        let mut out = Vec::new();
        for dom in doms {
            let Ok(name) = dom.name() else { continue };
            if !name.starts_with(PREFIX) {
                continue;
            }
            // A state or metadata that cannot be read is no answer: the domain is listed as
            // unreadable (the sweep leaves it alone) rather than called stopped, or one of
            // this agent's without metadata, and reaped. One gone meanwhile is not listed.
            // (A lost connection is no domain's: the listing fails, as any call's.)
            let unreadable = |what: &str, e: virt::error::Error| match self.err("describe domain", &name, e) {
                e @ HvError::Unavailable { .. } => Err(e),
                e => Ok(VmInfo::unreadable(&name, format!("{what}: {e}"))),
            };
            let active = match dom.is_active() {
                Ok(a) => a,
                Err(e) if is_code(&e, &[ErrorNumber::NoDomain]) => continue,
                Err(e) => {
                    out.push(unreadable("its state", e)?);
                    continue;
                }
            };
            let state = if !active {
                DomainState::Stopped
            } else if paused_on_io_error(&dom) {
                DomainState::IoPaused
            } else {
                DomainState::Running
            };
            let metadata = match dom.metadata(sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(domain_xml::METADATA_NS), 0)
            {
                Ok(x) => domain_xml::parse_metadata(&x),
                Err(e) if is_code(&e, &[ErrorNumber::NoDomainMetadata]) => None,
                Err(e) if is_code(&e, &[ErrorNumber::NoDomain]) => continue,
                Err(e) => {
                    out.push(unreadable("its metadata", e)?);
                    continue;
                }
            };
            out.push(VmInfo { name, state, metadata, unreadable: None });
        }
        Ok(out)
    }

    fn list_volumes(&self) -> Result<Vec<String>, HvError> {
        let conn = self.conn()?;
        let pool = self.storage_pool(&conn)?;
        let _ = pool.refresh(0);
        let names = pool.list_volumes().map_err(|e| self.err("list volumes", &self.pool, e))?;
        Ok(names.into_iter().filter(|n| n.starts_with(PREFIX)).collect())
    }

    fn delete_volume(&self, name: &str) -> Result<(), HvError> {
        let conn = self.conn()?;
        let pool = self.storage_pool(&conn)?;
        match pool.lookup_storage_vol_by_name(name) {
            Ok(vol) => vol.delete(0).map_err(|e| self.err("delete volume", name, e)),
            Err(e) if is_code(&e, &[ErrorNumber::NoStorageVolume]) => Ok(()),
            Err(e) => Err(self.err("lookup volume", name, e)),
        }
    }
}

// ---- raw callbacks (the virt crate exposes lifecycle events only as FFI) ----

unsafe extern "C" fn lifecycle_cb(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: opaque is the Box<UnboundedSender> registered below, alive until free_sender.
    let tx = unsafe { &*(opaque as *const UnboundedSender<HvEvent>) };
    // SAFETY: dom is valid for the duration of the callback; the name is owned by it.
    let name_ptr = unsafe { sys::virDomainGetName(dom) };
    if name_ptr.is_null() {
        return 0;
    }
    let name = unsafe { CStr::from_ptr(name_ptr) }.to_string_lossy().into_owned();
    if !name.starts_with(PREFIX) {
        return 0;
    }
    let ev = match event as u32 {
        sys::VIR_DOMAIN_EVENT_STARTED => Some(HvEvent::Started(name)),
        sys::VIR_DOMAIN_EVENT_STOPPED => Some(HvEvent::Stopped(name)),
        sys::VIR_DOMAIN_EVENT_SUSPENDED if detail as u32 == sys::VIR_DOMAIN_EVENT_SUSPENDED_IOERROR => {
            Some(HvEvent::IoPaused(name))
        }
        _ => None,
    };
    if let Some(ev) = ev {
        let _ = tx.send(ev);
    }
    0
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    // SAFETY: created by Box::into_raw in register_callbacks; freed exactly once by libvirt.
    drop(unsafe { Box::from_raw(opaque as *mut UnboundedSender<HvEvent>) });
}

unsafe extern "C" fn close_cb(_conn: sys::virConnectPtr, _reason: c_int, opaque: *mut c_void) {
    // SAFETY: opaque is the Arc<AtomicBool> leaked below, freed in free_flag.
    let flag = unsafe { &*(opaque as *const AtomicBool) };
    flag.store(true, Ordering::SeqCst);
}

unsafe extern "C" fn free_flag(opaque: *mut c_void) {
    // SAFETY: created by Arc::into_raw in register_callbacks.
    drop(unsafe { Arc::from_raw(opaque as *const AtomicBool) });
}

fn register_callbacks(conn: &Connect, events: UnboundedSender<HvEvent>, broken: Arc<AtomicBool>) {
    let opaque = Box::into_raw(Box::new(events)) as *mut c_void;
    // SAFETY: the lifecycle callback has the virConnectDomainEventCallback signature, which
    // libvirt expects for VIR_DOMAIN_EVENT_ID_LIFECYCLE despite the generic pointer type.
    let cb: sys::virConnectDomainEventGenericCallback = unsafe {
        std::mem::transmute::<
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int,
            sys::virConnectDomainEventGenericCallback,
        >(lifecycle_cb)
    };
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            cb,
            opaque,
            Some(free_sender),
        )
    };
    if id < 0 {
        tracing::error!("cannot register for libvirt lifecycle events; relying on the periodic sweep");
        unsafe { free_sender(opaque) };
    }
    let flag = Arc::into_raw(broken) as *mut c_void;
    let rc = unsafe { sys::virConnectRegisterCloseCallback(conn.as_ptr(), Some(close_cb), flag, Some(free_flag)) };
    if rc < 0 {
        unsafe { free_flag(flag) };
    }
}

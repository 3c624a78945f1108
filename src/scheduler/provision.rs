//! Provisioning and teardown of one VM, run as tasks spawned by the scheduler. They touch
//! no scheduling state: they call GitHub and the hypervisor and report back with events.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::event::Event;
use crate::cloudinit::{self, Credential, RunnerSpec};
use crate::config::{Config, NetworkConfig, PoolConfig, Registration};
use crate::fence;
use crate::github::{Deleted, GhError, GitHub};
use crate::hypervisor::domain_xml::{self, DomainSpec, VmMetadata};
use crate::hypervisor::network::{Reservation, Subnet};
use crate::hypervisor::{self, HvError, Hypervisor, seed};
use crate::model::{SlotRec, VmRec};

/// Test hook for the kill-9 drill: `RUNNERVISOR_FAULT_CRASH_AT=<step>` aborts the process
/// right after that step (`after-persist`, `after-overlay`, `after-seed`, `after-define`,
/// `after-start`; restoring from a snapshot slot: `restore-after-overlay`, `after-restore`; saving a
/// slot: `slot-after-save`; binding a VM to its job: `bind-after-credential`,
/// `bind-after-delivery`). Compiled only with the `fault-injection`
/// feature (`scripts/drill` enables it); otherwise it does nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn crash_point(_step: &str) {}

/// Test hook for the kill-9 drill: `RUNNERVISOR_FAULT_CRASH_AT=<step>` aborts the process
/// `RUNNERVISOR_FAULT_CRASH_DELAY_MS` (default 1,000) after this point, from another
/// thread: inside the libvirt call that follows (`during-save`, `during-restore`: libvirt
/// finishes it on its own, or not, with no one to hear the answer).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn crash_during(_step: &str) {}

#[cfg(feature = "fault-injection")]
pub fn crash_during(step: &str) {
    if std::env::var("RUNNERVISOR_FAULT_CRASH_AT").is_ok_and(|s| s == step) {
        let ms = std::env::var("RUNNERVISOR_FAULT_CRASH_DELAY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
        let step = step.to_string();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            eprintln!("runnervisor: RUNNERVISOR_FAULT_CRASH_AT={step}: aborting");
            std::process::abort();
        });
    }
}

#[cfg(feature = "fault-injection")]
pub fn crash_point(step: &str) {
    if std::env::var("RUNNERVISOR_FAULT_CRASH_AT").is_ok_and(|s| s == step) {
        eprintln!("runnervisor: RUNNERVISOR_FAULT_CRASH_AT={step}: aborting");
        std::process::abort();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("golden image: {0}")]
    Image(#[source] HvError),
    #[error("network fence: {0}")]
    Network(#[source] HvError),
    #[error("overlay volume: {0}")]
    Overlay(#[source] HvError),
    #[error("seed volume: {0}")]
    Seed(String),
    /// A snapshot slot's saved state could not be restored (missing, corrupt, made by
    /// another libvirt or QEMU, or its address no longer its own): the slot's fault.
    #[error("restore from snapshot slot: {0}")]
    Restore(#[source] HvError),
    /// libvirt refused the domain's definition. Its XML carries the job's own strings
    /// (title, description): a refusal that repeats is charged to the job.
    #[error("domain definition: {0}")]
    Define(#[source] HvError),
    #[error("domain: {0}")]
    Domain(#[source] HvError),
    /// The provisioning task itself failed (a panic, e.g. in a libvirt binding's `Drop`).
    #[error("{0}")]
    Task(String),
}

impl ProvisionError {
    pub fn step(&self) -> &'static str {
        match self {
            ProvisionError::Image(_) => "image",
            ProvisionError::Network(_) => "network",
            ProvisionError::Overlay(_) => "overlay",
            ProvisionError::Seed(_) => "seed",
            ProvisionError::Restore(_) => "restore",
            ProvisionError::Define(_) => "define",
            ProvisionError::Domain(_) => "domain",
            ProvisionError::Task(_) => "task",
        }
    }

    /// Whether this failure counts as one of the job's attempts (`max_attempts`): only a
    /// definition libvirt refused, the one step whose input the job shapes (not libvirt
    /// being away). The others are the host's (GitHub, storage, libvirt itself) and only
    /// back the pool off.
    pub fn charged_to_job(&self) -> bool {
        matches!(self, ProvisionError::Define(HvError::Libvirt { .. }))
    }
}

pub struct Ctx<G, H> {
    pub github: Arc<G>,
    pub hv: Arc<H>,
    pub config: Arc<Config>,
    pub events: UnboundedSender<Event>,
    /// Addresses of other hosts the fence drops too (fleet mode).
    pub fence_others: Arc<fence::Others>,
    /// The JIT configs of pools that are runner scale sets (`intake = "scale_set"`).
    pub scale_sets: Option<Arc<dyn crate::scaleset::ScaleSetRunners>>,
}

impl<G, H> Clone for Ctx<G, H> {
    fn clone(&self) -> Self {
        Ctx {
            github: self.github.clone(),
            hv: self.hv.clone(),
            config: self.config.clone(),
            events: self.events.clone(),
            fence_others: self.fence_others.clone(),
            scale_sets: self.scale_sets.clone(),
        }
    }
}

/// Runs a blocking hypervisor call. A panic in it (the virt crate's `Drop` may panic)
/// resumes here and ends the provisioning or teardown task, whose spawner
/// ([`super::event::spawn_reporting`]) turns it into a failure report.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match crate::offload::spawn(f).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("blocking hypervisor call: {e}"),
    }
}

pub struct Plan {
    pub vm: VmRec,
    /// The snapshot slot `vm` is restored from (`vm.slot`).
    pub slot: Option<SlotRec>,
    /// A VM made for a snapshot slot: what it is made from, kept in its metadata (and so in
    /// its saved state).
    pub made_from: Option<String>,
    pub pool: PoolConfig,
    pub labels: Vec<String>,
    pub runner_group_id: u64,
    pub workflow: String,
    pub job_name: String,
}

/// A provisioning's report: how long it took, and when (since it began) the domain was
/// defined.
#[derive(Debug, Clone, Copy)]
pub struct Provisioned {
    pub took: Duration,
    pub defined: Duration,
}

/// Image check, fence, overlay, seed, define, start. No credential: every VM gets its
/// runner's once its guest waits on the bind port ([`bind`]), never through cloud-init.
pub async fn provision<G: GitHub, H: Hypervisor>(ctx: Ctx<G, H>, plan: Plan) -> Result<Provisioned, ProvisionError> {
    if let Some(slot) = &plan.slot {
        return restore(&ctx, &plan.vm.name, slot, plan.pool.disk_gib << 30).await;
    }
    let started = Instant::now();
    let name = plan.vm.name.clone();
    let pool = &plan.pool;
    let image_path = pool.image.clone();
    let image = blocking(move || hypervisor::check_image(&image_path)).await.map_err(ProvisionError::Image)?;
    let disk = pool.disk_gib << 30;
    if image.virtual_size > disk {
        return Err(ProvisionError::Image(HvError::ImageTooLarge {
            path: pool.image.clone(),
            image_size: image.virtual_size,
            disk_size: disk,
        }));
    }

    let joined = fence_up(&ctx).await.map_err(ProvisionError::Network)?;
    let address = match (joined.subnet, ctx.config.libvirt.network.libvirt_network()) {
        (Some(subnet), Some(net)) if joined.fixed => {
            Some((reserve_address(&ctx, net, &name).await.map_err(ProvisionError::Network)?, subnet))
        }
        _ => None,
    };

    let hv = ctx.hv.clone();
    let (n, backing) = (name.clone(), pool.image.clone());
    let overlay = blocking(move || hv.create_overlay(&n, &backing, disk)).await.map_err(ProvisionError::Overlay)?;
    crash_point("after-overlay");

    let network_config = address.as_ref().map(|(r, subnet)| cloudinit::network_config(r, *subnet));
    let image = seed::nocloud_image(&cloudinit::user_data(), &cloudinit::meta_data(&name), network_config.as_deref())
        .map_err(|e| ProvisionError::Seed(e.to_string()))?;
    let hv = ctx.hv.clone();
    let n = name.clone();
    let seed_path =
        blocking(move || hv.create_seed(&n, &image)).await.map_err(|e| ProvisionError::Seed(e.to_string()))?;
    crash_point("after-seed");

    let metadata = metadata(&ctx, &plan.vm, plan.made_from.clone());
    let (title, description) = describe(&plan);
    let xml = domain_xml::domain(&DomainSpec {
        name: &name,
        domain_type: ctx.config.libvirt.domain_type,
        vcpus: pool.vcpus,
        memory_mib: pool.memory_mib,
        overlay_path: &overlay,
        seed_path: &seed_path,
        kernel: pool.kernel.as_deref(),
        initrd: pool.initrd.as_deref(),
        cmdline: pool.cmdline.as_deref(),
        network: &ctx.config.libvirt.network,
        gateway: joined.subnet.map(|s| s.gateway),
        address: address.as_ref().map(|(r, _)| r),
        title: &title,
        description: &description,
        metadata: &metadata,
    });
    let hv = ctx.hv.clone();
    let n = name.clone();
    blocking(move || hv.define(&n, &xml)).await.map_err(ProvisionError::Define)?;
    let defined = started.elapsed();
    crash_point("after-define");
    let hv = ctx.hv.clone();
    let n = name.clone();
    blocking(move || hv.start(&n)).await.map_err(ProvisionError::Domain)?;
    crash_point("after-start");
    Ok(Provisioned { took: started.elapsed(), defined })
}

/// Fence, then the VM `name` restored from `slot` onto a fresh overlay of the slot's disk.
/// Nothing is defined: the saved domain (the slot's name, UUID, MAC and address) runs
/// again with another disk, a transient domain gone once destroyed.
async fn restore<G, H: Hypervisor>(
    ctx: &Ctx<G, H>,
    name: &str,
    slot: &SlotRec,
    disk: u64,
) -> Result<Provisioned, ProvisionError> {
    let started = Instant::now();
    fence_up(ctx).await.map_err(ProvisionError::Network)?;
    // The saved guest has its address configured: it must still be the slot's.
    if let (Some(net), Some(address)) = (ctx.config.libvirt.network.libvirt_network(), slot.address) {
        let held = reserve_address(ctx, net, &slot.name).await.map_err(ProvisionError::Network)?;
        if held.ip != address {
            return Err(ProvisionError::Restore(HvError::Libvirt {
                op: "address",
                name: slot.name.clone(),
                message: format!("the network holds {} for the slot, whose saved guest has {address}", held.ip),
            }));
        }
    }
    let (hv, base) = (ctx.hv.clone(), hypervisor::overlay_volume_name(&slot.name));
    let base = blocking(move || hv.volume_path(&base)).await.map_err(restore_error)?;
    let (hv, n) = (ctx.hv.clone(), name.to_string());
    // A full pool is the host's; any other failure here is the base's (the slot's).
    let overlay = blocking(move || hv.create_overlay(&n, &base, disk)).await.map_err(|e| match e {
        e @ HvError::PoolFull { .. } => ProvisionError::Overlay(e),
        e => restore_error(e),
    })?;
    crash_point("restore-after-overlay");
    let (hv, s) = (ctx.hv.clone(), slot.name.clone());
    let console_log = console_log(ctx, name);
    crash_during("during-restore");
    blocking(move || hv.restore(&s, &overlay, &console_log)).await.map_err(restore_error)?;
    crash_point("after-restore");
    let took = started.elapsed();
    Ok(Provisioned { took, defined: took })
}

/// A restore's failure: the slot's, unless libvirt itself is away (the host's).
fn restore_error(e: HvError) -> ProvisionError {
    match e {
        e @ HvError::Unavailable { .. } => ProvisionError::Domain(e),
        e => ProvisionError::Restore(e),
    }
}

/// Where the VM's serial console is logged (restored VMs too: not their slot's file).
fn console_log<G, H>(ctx: &Ctx<G, H>, vm: &str) -> std::path::PathBuf {
    ctx.config.libvirt.console_log_dir.join(format!("{vm}.log"))
}

/// The VM's runnervisor metadata, as its domain carries it.
fn metadata<G, H>(ctx: &Ctx<G, H>, vm: &VmRec, made_from: Option<String>) -> VmMetadata {
    VmMetadata {
        job_id: vm.job_id,
        run_id: vm.run_id,
        repository: vm.repository.clone(),
        pool: vm.pool.clone(),
        runner_name: vm.name.clone(),
        created: vm.created_at,
        console_log: console_log(ctx, &vm.name),
        job_url: vm.job_url.clone(),
        warm: vm.warm && vm.job_id == 0,
        host: ctx.config.fleet.as_ref().map(|f| f.host_id()),
        made_from,
    }
}

/// A string from a job (its workflow's or its own name, chosen by whoever pushes a
/// workflow) as it may appear in the domain's title and description: control characters
/// (a newline libvirt refuses in a title; NUL, which XML cannot carry at all) and the
/// other characters XML cannot carry (U+FFFE, U+FFFF: libvirt would write a domain XML it
/// cannot read back) become spaces, and it is cut at 200 characters.
fn printable(s: &str) -> String {
    without_controls(s.chars().take(200))
}

fn without_controls(s: impl Iterator<Item = char>) -> String {
    s.map(|c| if c.is_control() || !domain_xml::xml_char(c) { ' ' } else { c }).collect()
}

/// The domain's title and description (`virsh list --title`, `virsh desc`).
fn describe(plan: &Plan) -> (String, String) {
    let (title, description) = describe_raw(plan);
    (printable(&title), without_controls(description.chars()))
}

fn describe_raw(plan: &Plan) -> (String, String) {
    let vm = &plan.vm;
    if vm.warm && vm.job_id == 0 {
        return (
            format!("{} · warm, waiting for a job", vm.pool),
            format!(
                "runnervisor warm VM of pool {}: booted without any GitHub credential; \
                 it waits for a job's runner command on its {} port",
                vm.pool,
                domain_xml::BIND_CHANNEL
            ),
        );
    }
    let warm = if vm.warm { " (a warm VM bound to it)" } else { "" };
    let (workflow, job_name) = (printable(&plan.workflow), printable(&plan.job_name));
    (
        format!("{} · {workflow} · job {}", vm.repository, vm.job_id),
        format!(
            "runnervisor runner for {} workflow {workflow:?} job {job_name:?} (id {}, run {}) {}{warm}",
            vm.repository, vm.job_id, vm.run_id, vm.job_url
        ),
    )
}

/// The one-job credential of `plan`'s VM: a JIT config (reported as soon as its runner
/// exists, so a crash after it still lets the teardown find the registration), or a
/// registration token with what `config.sh` needs.
async fn credential<G: GitHub, H>(ctx: &Ctx<G, H>, plan: &Plan) -> Result<Credential, GhError> {
    let name = &plan.vm.name;
    match plan.pool.registration {
        Registration::Jit => {
            // In a fleet a runner of that name may be another member's (names from before
            // member numbers), unless an earlier binding of this VM may have made it.
            let may_be_others = ctx.config.fleet.is_some() && plan.vm.binds <= 1;
            // A scale set's runners are made by the set (it gives them its labels and group).
            let generate = || async {
                match (&ctx.scale_sets, plan.pool.scale_set()) {
                    (Some(sets), Some(_)) => sets.jit(&plan.pool.name, name).await,
                    _ => ctx.github.generate_jit_config(name, &plan.labels, plan.runner_group_id).await,
                }
            };
            let jit = match generate().await {
                // Left alone: the job's next VM, a new claim, has a new name.
                Err(e) if e.status() == Some(409) && may_be_others => {
                    tracing::warn!(vm = %name, "a runner with this name exists: in a fleet it may be another member's, so it is not replaced; the job is served under a new name");
                    Err(e)
                }
                Err(e) if e.status() == Some(409) => {
                    // A registration of this name survived an earlier attempt: remove it, retry once.
                    tracing::warn!(vm = %name, "a runner with this name exists; replacing it");
                    if let Some(r) = ctx.github.find_runner(name).await? {
                        ctx.github.delete_runner(r.id).await?;
                    }
                    generate().await
                }
                other => other,
            }?;
            let _ = ctx.events.send(Event::RunnerCreated { vm: name.clone(), runner_id: jit.runner_id });
            Ok(Credential::Jit { encoded: jit.encoded })
        }
        Registration::Token => {
            let token = ctx.github.registration_token().await?;
            let group = match ctx.config.github.scope() {
                crate::config::Scope::Repository { .. } => None,
                _ => Some(ctx.config.github.runner_group.clone()),
            };
            Ok(Credential::Token {
                url: format!("{}/{}", ctx.config.github.web_url(), ctx.config.github.scope().web_path()),
                token,
                labels: plan.labels.clone(),
                runner_group: group,
                disable_update: plan.pool.disable_update,
            })
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("runner credential: {0}")]
    Credential(#[source] GhError),
    #[error("runner credential: {0}")]
    Message(#[source] cloudinit::BindMessageError),
    #[error("delivery: {0}")]
    Delivery(#[source] HvError),
    #[error("random bytes for the guest (/dev/urandom): {0}")]
    Entropy(#[source] std::io::Error),
    /// The domain's metadata could not be made this job's (before any credential: the
    /// guest still waits).
    #[error("marking the domain as this job's: {0}")]
    Describe(#[source] HvError),
    /// The binding task itself failed (a panic).
    #[error("{0}")]
    Task(String),
    /// A restart cut the binding short before the guest took its command (it still waits).
    #[error("interrupted by a restart before the guest took its command")]
    Interrupted,
}

impl BindError {
    /// Whether the runner command may have reached the guest all the same: the delivery
    /// failed into the VM's own domain (its acknowledgement lost, its port unreadable), or
    /// the binding task failed (a panic, wherever it was). Not a credential that failed:
    /// nothing was delivered then.
    pub fn may_have_reached_guest(&self) -> bool {
        match self {
            BindError::Delivery(e) => !matches!(e, HvError::NotThisVm { .. }),
            BindError::Task(_) => true,
            BindError::Credential(_)
            | BindError::Message(_)
            | BindError::Entropy(_)
            | BindError::Describe(_)
            | BindError::Interrupted => false,
        }
    }

    pub fn step(&self) -> &'static str {
        match self {
            BindError::Credential(_) | BindError::Message(_) | BindError::Entropy(_) => "credential",
            BindError::Delivery(_) => "delivery",
            BindError::Describe(_) => "describe",
            BindError::Task(_) => "task",
            BindError::Interrupted => "restart",
        }
    }
}

/// Where a warm VM's binding spent its time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BindTimes {
    /// Making the runner credential at GitHub.
    pub credential: Duration,
    /// Writing the runner command into the VM until the guest acknowledged it.
    pub delivery: Duration,
    /// A binding a restart cut short, found complete (the guest had taken its command).
    pub resumed: bool,
}

/// Random bytes from this host's kernel for a guest's kernel RNG ([`cloudinit::Fresh`]).
pub fn fresh_entropy() -> std::io::Result<[u8; cloudinit::ENTROPY_BYTES]> {
    use std::io::Read;
    let mut out = [0u8; cloudinit::ENTROPY_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut out)?;
    Ok(out)
}

/// Gives a VM whose guest waits its job (a warm VM chosen for it, or a cold VM made for
/// it): makes the runner credential now, delivers what starts the runner into the guest
/// over its bind port, and waits (at most `bind_timeout`) for the guest's
/// acknowledgement. `plan.vm` carries the job.
pub async fn bind<G: GitHub, H: Hypervisor>(ctx: Ctx<G, H>, plan: Plan) -> Result<BindTimes, BindError> {
    let name = plan.vm.name.clone();
    // Before the credential: a failure here costs no runner registration.
    let entropy = fresh_entropy().map_err(BindError::Entropy)?;
    // For operators (`virsh desc`) and re-adoption: no longer warm, now this job's runner.
    // Before any credential is made: a domain whose metadata still says "warm, no job" (a
    // warm VM's, a restored slot's) would be adopted as a waiting warm VM if its record
    // were lost, and its guest (root in it may have reopened the bind port) given the next
    // job's credential. No credential goes into a domain not marked as its job's.
    let metadata = metadata(&ctx, &plan.vm, None);
    let (title, description) = describe(&plan);
    let (hv, domain, n) = (ctx.hv.clone(), plan.vm.domain().to_string(), name.clone());
    blocking(move || hv.describe(&domain, &n, &metadata, &title, &description)).await.map_err(BindError::Describe)?;
    let started = Instant::now();
    let credential = credential(&ctx, &plan).await.map_err(BindError::Credential)?;
    crash_point("bind-after-credential");
    let made = Instant::now();
    let message = cloudinit::bind_message(&RunnerSpec {
        vm_name: &name,
        runner_user: &plan.pool.runner_user,
        runner_dir: &plan.pool.runner_dir,
        credential: &credential,
        // The guest's wall clock: this host's, not a test's simulated one.
        fresh: Some(cloudinit::Fresh { entropy: &entropy, now: std::time::SystemTime::now() }),
    })
    .map_err(BindError::Message)?;
    drop(credential);
    let hv = ctx.hv.clone();
    let (n, domain, timeout) = (name.clone(), plan.vm.domain().to_string(), plan.pool.bind_timeout);
    // Checked against the domain's disk at the call: a binding cut short (the VM torn
    // down) whose call runs on would otherwise deliver into the next VM restored into the
    // same slot's domain, whose guest then runs this runner (simulator seed 16105).
    if let Err(e) =
        blocking(move || hv.deliver(&domain, &n, message.expose().as_bytes(), &cloudinit::bind_ack(&n), timeout)).await
    {
        // The guest may have taken its command all the same: libvirtd restarted during the
        // exchange and only the acknowledgement was lost (the restart-libvirtd drill met
        // it). Its port says: a guest that took its command closes it and starts its
        // runner, which destroying the VM would kill with the job. (Not another VM's.)
        let ours = !matches!(e, HvError::NotThisVm { .. });
        if !ours || !matches!(guest_port(ctx.hv.clone(), plan.vm.domain().to_string()).await, Port::Closed) {
            return Err(BindError::Delivery(e));
        }
        tracing::warn!(vm = %name, error = %e, "the delivery failed, but the guest closed its bind port: it took its command, its runner starts");
    }
    crash_point("bind-after-delivery");
    Ok(BindTimes { credential: made - started, delivery: made.elapsed(), resumed: false })
}

/// How long the guest's port is watched after a binding was cut short: libvirt sees a
/// port the guest closed about a second later (measured by `tests/vm_world.rs`), and a
/// message still in flight when the agent died is taken as fast.
const PORT_SETTLE: Duration = Duration::from_secs(5);

/// How long a watch of the guest's port waits for libvirt to answer at all (libvirtd
/// restarting: the agent reconnects within seconds).
const PORT_RECONNECT: Duration = Duration::from_secs(30);

/// What the guest's bind port says after a binding was cut short.
#[derive(Debug)]
enum Port {
    /// The guest closed it: it took its command and is starting its runner.
    Closed,
    /// Still open after [`PORT_SETTLE`]: the guest never got its command.
    Open,
    /// libvirt did not answer within [`PORT_RECONNECT`].
    Unknown(HvError),
}

/// Watches the guest's bind port of `vm` (see [`Port`]).
async fn guest_port<H: Hypervisor>(hv: Arc<H>, vm: String) -> Port {
    let start = Instant::now();
    loop {
        let (h, n) = (hv.clone(), vm.clone());
        match blocking(move || h.guest_waiting(&n)).await {
            Ok(false) => return Port::Closed,
            Ok(true) if start.elapsed() >= PORT_SETTLE => return Port::Open,
            Err(e) if start.elapsed() >= PORT_RECONNECT => return Port::Unknown(e),
            Ok(true) | Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A binding a restart cut short: one whose guest took its command stands, one whose guest
/// still waits is interrupted (the VM goes, the job is served again).
pub async fn resume_bind<H: Hypervisor>(hv: Arc<H>, vm: String) -> Result<BindTimes, BindError> {
    match guest_port(hv, vm).await {
        Port::Closed => Ok(BindTimes { resumed: true, ..BindTimes::default() }),
        Port::Open => Err(BindError::Interrupted),
        Port::Unknown(e) => Err(BindError::Delivery(e)),
    }
}

/// The network a VM joins, as [`fence_up`] found it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Joined {
    /// A libvirt network's subnet (its address is the VM's gateway and DNS server).
    pub subnet: Option<Subnet>,
    /// Whether the agent fixes the VM's address: a libvirt network whose DHCP server serves
    /// known clients only. The VM's seed carries the address and the fence keeps the VM
    /// from DHCP. Otherwise (a bridge; a network defined before this agent reserved
    /// addresses, which may have leased them to any client) the VM learns it by DHCP.
    pub fixed: bool,
}

/// Checks the network the VM joins and (re)defines the fence's nwfilter from the config
/// and this host's current addresses. Fails, so that no VM starts, when either is missing:
/// there is no fallback to an open network.
pub async fn fence_up<G, H: Hypervisor>(ctx: &Ctx<G, H>) -> Result<Joined, HvError> {
    let net = ctx.config.libvirt.network.clone();
    let hv = ctx.hv.clone();
    let others = ctx.fence_others.get();
    blocking(move || {
        let joined = match &net {
            NetworkConfig::User { .. } => return Ok(Joined::default()),
            NetworkConfig::Network { name, .. } => {
                let dhcp = hv.network_dhcp(name)?;
                let fixed = dhcp
                    .fixes_addresses()
                    .map_err(|reason| HvError::NetworkUnusable { name: name.clone(), reason: reason.into() })?;
                if !fixed && let Some(suppressed) = OPEN_NETWORK.check() {
                    tracing::warn!(network = %name, suppressed, "the libvirt network leases addresses to any client, so a job can take them all: VMs get learned addresses; define it again with runnervisor-network (runnervisor check says so)");
                }
                Joined { subnet: dhcp.subnet, fixed }
            }
            NetworkConfig::Bridge { name, .. } if !fence::bridge_exists(name) => {
                return Err(HvError::BridgeMissing { name: name.clone() });
            }
            NetworkConfig::Bridge { .. } => Joined::default(),
        };
        if net.fence().is_some() {
            let mut drop = hv.host_addresses()?;
            drop.extend_from_slice(&others);
            for (filter, xml) in fence::filters_for(&net, joined.subnet, joined.fixed, &drop) {
                hv.define_filter(&filter, &xml)?;
            }
        }
        Ok(joined)
    })
    .await
}

/// `vm`'s reserved address on the libvirt network `network` (made now, or kept from an
/// earlier attempt), where [`Joined::fixed`].
async fn reserve_address<G, H: Hypervisor>(ctx: &Ctx<G, H>, network: &str, vm: &str) -> Result<Reservation, HvError> {
    let (hv, net, vm) = (ctx.hv.clone(), network.to_string(), vm.to_string());
    blocking(move || hv.reserve_address(&net, &vm)).await
}

/// The warning about a network that leases to anyone, at most hourly.
static OPEN_NETWORK: crate::logging::Throttle = crate::logging::Throttle::new(Duration::from_secs(3600));

#[derive(Debug, Default)]
pub struct TeardownOutcome {
    pub errors: Vec<String>,
    /// How many of `errors` were GitHub's rate limit, and how long it holds the calls back
    /// more (the longest wait).
    rate_limited: usize,
    rate_limited_for: Option<Duration>,
    /// `runner_first` found the runner busy: the VM was left alone.
    pub aborted_busy: bool,
    /// `runner_first` found the runner not busy (deleted it, or a runner of known id was
    /// gone): the VM goes, whatever else failed.
    pub runner_idle: bool,
    /// Domain, volumes and address gone, its runner still busy at GitHub (its one
    /// failure): the VM holds nothing of the host's any more.
    pub busy_after_host: bool,
    pub duration: Duration,
}

impl TeardownOutcome {
    /// A step failed: `e`, a call of GitHub's or not.
    fn failed_on_github(&mut self, e: GhError, what: &str) {
        if let GhError::RateLimited { wait, .. } = &e {
            self.rate_limited += 1;
            self.rate_limited_for = Some(self.rate_limited_for.map_or(*wait, |w| w.max(*wait)));
        }
        self.errors.push(format!("{what}: {e}"));
    }

    /// A step failed on something other than GitHub's rate limit.
    pub fn failed(&mut self, e: String) {
        self.errors.push(e);
    }

    /// When every step that failed failed only on GitHub's rate limit: how long it holds
    /// (the retry waits for it to lift, not for a back-off from 10 s).
    pub fn only_rate_limited(&self) -> Option<Duration> {
        self.rate_limited_for.filter(|_| self.rate_limited == self.errors.len())
    }
}

/// Removes the domain, its volumes, and the runner registration (unless GitHub removed it
/// already: `runner_done`). With `runner_first` (reaping a runner believed idle, or one
/// whose binding failed after its command may have reached the guest) the registration
/// goes first (a runner its guest registers itself, not found, asked again with the
/// domain paused), and a runner that turns out to be busy keeps its VM, running.
pub async fn teardown<G: GitHub, H: Hypervisor>(ctx: Ctx<G, H>, vm: VmRec, runner_first: bool) -> TeardownOutcome {
    let started = Instant::now();
    let mut out = TeardownOutcome::default();
    // A runner whose job completed is gone already (ephemeral): no call for it; a slot's
    // VM never had one; nor had one whose name another runner held (a fleet member's).
    let has_runner = vm.has_runner();
    if runner_first && has_runner {
        let mut answer = delete_runner(&ctx, &vm).await;
        // "Not found" for a runner its guest registers itself (its id unknown) says only
        // "not yet": the guest may register it, and it take a job, any moment until the
        // destroy. Paused, the guest cannot, and GitHub asked again says what holds until
        // then (ARCHITECTURE.md: the teardown's question; simulator seed 195363). A runner
        // GitHub knows needs no pause: deleted, it takes no job; busy, it keeps its VM.
        if matches!(answer, Ok(Deleted::NotFound)) && vm.runner_id.is_none() {
            let (hv, domain) = (ctx.hv.clone(), vm.domain().to_string());
            if let Err(e) = blocking(move || hv.suspend(&domain)).await {
                out.failed(e.to_string());
                out.duration = started.elapsed();
                return out;
            }
            tracing::debug!(vm = %vm.name, domain = %vm.domain(), "vm paused while GitHub is asked about its runner again");
            answer = match tokio::time::timeout(PAUSED_QUESTION, delete_runner(&ctx, &vm)).await {
                Ok(answer) => answer,
                Err(_) => Err((
                    GhError::Transport {
                        method: "GET".into(),
                        path: "runners".into(),
                        message: format!("no answer within {}s while the vm is paused", PAUSED_QUESTION.as_secs()),
                    },
                    format!("find runner {}", vm.name),
                )),
            };
        }
        if !matches!(answer, Ok(Deleted::Deleted | Deleted::NotFound)) {
            // Kept (busy), or not known yet: it runs again, paused by this try or an earlier.
            if let Err(e) = resume(&ctx, &vm).await {
                tracing::warn!(vm = %vm.name, domain = %vm.domain(), error = %e, paused = true, "cannot resume the vm; the teardown's retry asks GitHub again and resumes it");
                out.failed(e.to_string());
                if let Err((e, what)) = answer {
                    out.failed_on_github(e, &what);
                }
                out.duration = started.elapsed();
                return out;
            }
        }
        match answer {
            Ok(Deleted::Busy) => {
                out.aborted_busy = true;
                out.duration = started.elapsed();
                return out;
            }
            // Gone, or never there: a runner of unknown id that a guest registers itself
            // (a registration token) may be "not found" only not yet.
            Ok(Deleted::Deleted) => out.runner_idle = true,
            Ok(Deleted::NotFound) => out.runner_idle = vm.runner_id.is_some(),
            // Whether its runner took a job unseen is not known: the VM stays until GitHub
            // says (the teardown is retried). Destroyed meanwhile, it killed the job its
            // runner ran (an in-progress webhook lost, GitHub rate-limited: the simulator).
            Err((e, what)) => {
                out.failed_on_github(e, &what);
                out.duration = started.elapsed();
                return out;
            }
        }
    }
    let hv = ctx.hv.clone();
    let (name, slot) = (vm.name.clone(), vm.slot.clone());
    // A VM restored from a slot has the slot's domain and address, which the slot keeps.
    // The address is on the network the VM was made on (a record of before: the
    // configured one).
    let configured = ctx.config.libvirt.network.libvirt_network().map(str::to_string);
    let network = vm.network.clone().or(configured).filter(|_| slot.is_none());
    let host_errors = blocking(move || {
        // Its overlay goes once the domain writing to it is gone.
        let mut errors: Vec<HvError> = slot.and_then(|s| hv.destroy(&s).err()).into_iter().collect();
        if errors.is_empty() {
            errors = hv.teardown(&name);
        }
        // Its address goes once its domain is gone (not before: the next VM would get it).
        if errors.is_empty()
            && let Some(net) = network
            && let Err(e) = hv.release_address(&net, &name)
        {
            errors.push(e);
        }
        errors
    })
    .await;
    let host_done = host_errors.is_empty();
    for e in host_errors {
        out.failed(e.to_string());
    }
    if !runner_first && has_runner {
        match delete_runner(&ctx, &vm).await {
            Ok(Deleted::Busy) => {
                out.busy_after_host = host_done;
                out.failed(format!("runner {} is still busy at GitHub; will retry", vm.name))
            }
            Ok(_) => {}
            Err((e, what)) => out.failed_on_github(e, &what),
        }
    }
    out.duration = started.elapsed();
    out
}

/// How long GitHub is asked about a runner while its VM is paused ([`teardown`]): a job
/// its runner may run waits meanwhile.
const PAUSED_QUESTION: Duration = Duration::from_secs(60);

/// Lets `vm`'s domain run again if a teardown paused it, trying three times a second
/// apart (a job its runner runs waits meanwhile).
async fn resume<G: GitHub, H: Hypervisor>(ctx: &Ctx<G, H>, vm: &VmRec) -> Result<(), HvError> {
    let mut tries = 0;
    loop {
        let (hv, domain) = (ctx.hv.clone(), vm.domain().to_string());
        match blocking(move || hv.resume(&domain)).await {
            Err(_) if tries < 2 => {
                tries += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            result => return result,
        }
    }
}

/// Deletes `vm`'s runner registration; an error says which call failed.
async fn delete_runner<G: GitHub, H: Hypervisor>(ctx: &Ctx<G, H>, vm: &VmRec) -> Result<Deleted, (GhError, String)> {
    let id = match vm.runner_id {
        Some(id) => Some(id),
        None => {
            ctx.github.find_runner(&vm.name).await.map_err(|e| (e, format!("find runner {}", vm.name)))?.map(|r| r.id)
        }
    };
    match id {
        None => Ok(Deleted::NotFound),
        Some(id) => ctx.github.delete_runner(id).await.map_err(|e| (e, format!("delete runner {}", vm.name))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binding whose failure leaves it unknown whether the guest took its command has its
    /// VM's runner asked about before the VM goes; one that failed before delivering has not.
    #[test]
    fn which_binding_failures_may_have_reached_the_guest() {
        let hv = |message: &str| HvError::Libvirt { op: "deliver", name: "rv-p-1".into(), message: message.into() };
        let gh = || GhError::Status { method: "POST".into(), path: "jit".into(), status: 500, message: String::new() };
        let table = [
            (BindError::Delivery(hv("the guest did not acknowledge")), true),
            (BindError::Task("injected panic".into()), true),
            (BindError::Delivery(HvError::NotThisVm { domain: "rv-p-s0".into(), vm: "rv-p-1".into() }), false),
            (BindError::Credential(gh()), false),
            (BindError::Entropy(std::io::Error::other("no")), false),
            (BindError::Interrupted, false),
        ];
        for (e, want) in table {
            assert_eq!(e.may_have_reached_guest(), want, "{e:?}");
        }
    }

    /// Workflow and job names are anyone's text: what reaches the domain's title and
    /// description has no control character (libvirt refuses a newline in a title; XML
    /// cannot carry NUL) and a bounded length.
    #[test]
    fn job_strings_in_the_domain_description_are_printable() {
        let mut vm = VmRec::new("rv-p-7".into(), "p", false, std::time::SystemTime::UNIX_EPOCH);
        vm.job_id = 7;
        vm.repository = "octo-org/app".into();
        let nasty = "build\nInjected: yes\r\u{0}\u{1b}[31m\u{7f}\u{FFFF}\u{FFFE}";
        let plan = Plan {
            slot: None,
            made_from: None,
            vm,
            pool: crate::scheduler::fixtures::config("").pools[0].clone(),
            labels: vec![],
            runner_group_id: 1,
            workflow: format!("{nasty}{}", "w".repeat(500)),
            job_name: nasty.into(),
        };
        let (title, description) = describe(&plan);
        for text in [&title, &description] {
            assert!(!text.chars().any(|c| c.is_control() || !domain_xml::xml_char(c)), "{text:?}");
        }
        assert!(title.starts_with("octo-org/app · build Injected: yes"), "{title}");
        assert!(title.chars().count() < 260, "{} characters", title.chars().count());
        assert!(description.contains("job \"build Injected: yes"), "{description}");
        let xml = domain_xml::metadata_xml(&VmMetadata {
            job_id: 7,
            run_id: 1,
            repository: "octo-org/app".into(),
            pool: "p".into(),
            runner_name: "rv-p-7".into(),
            created: std::time::SystemTime::UNIX_EPOCH,
            console_log: "/x".into(),
            job_url: String::new(),
            warm: false,
            host: None,
            made_from: None,
        });
        assert!(roxmltree::Document::parse(&xml).is_ok());
    }

    #[test]
    fn only_a_refused_definition_is_charged_to_the_job() {
        let hv = || HvError::Libvirt { op: "define", name: "rv-p-7".into(), message: "refused".into() };
        assert!(ProvisionError::Define(hv()).charged_to_job());
        let away = || HvError::Unavailable { uri: "qemu:///system".into(), message: "connection lost".into() };
        for e in [
            ProvisionError::Define(away()),
            ProvisionError::Domain(hv()),
            ProvisionError::Overlay(hv()),
            ProvisionError::Network(hv()),
        ] {
            assert!(!e.charged_to_job(), "{e}");
        }
    }
}

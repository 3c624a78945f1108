//! Provisioning and teardown of one VM, run as tasks spawned by the scheduler. They touch
//! no scheduling state: they call GitHub and the hypervisor and report back with events.

use std::path::PathBuf;
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
use crate::hypervisor::{self, HvError, Hypervisor, seed};
use crate::model::VmRec;

/// Test hook for the kill-9 drill: `RUNNERVISOR_FAULT_CRASH_AT=<step>` aborts the process
/// right after that step (`after-persist`, `after-credential`, `after-overlay`,
/// `after-seed`, `after-define`, `after-start`). Compiled only with the `fault-injection`
/// feature (`scripts/drill` enables it); otherwise it does nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn crash_point(_step: &str) {}

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
    #[error("runner credential: {0}")]
    Credential(#[source] GhError),
    #[error("overlay volume: {0}")]
    Overlay(#[source] HvError),
    #[error("seed volume: {0}")]
    Seed(String),
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
            ProvisionError::Credential(_) => "credential",
            ProvisionError::Overlay(_) => "overlay",
            ProvisionError::Seed(_) => "seed",
            ProvisionError::Domain(_) => "domain",
            ProvisionError::Task(_) => "task",
        }
    }
}

pub struct Ctx<G, H> {
    pub github: Arc<G>,
    pub hv: Arc<H>,
    pub config: Arc<Config>,
    pub events: UnboundedSender<Event>,
}

impl<G, H> Clone for Ctx<G, H> {
    fn clone(&self) -> Self {
        Ctx {
            github: self.github.clone(),
            hv: self.hv.clone(),
            config: self.config.clone(),
            events: self.events.clone(),
        }
    }
}

/// Runs a blocking hypervisor call. A panic in it (the virt crate's `Drop` may panic)
/// resumes here and ends the provisioning or teardown task, whose spawner
/// ([`super::event::spawn_reporting`]) turns it into a failure report.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("blocking hypervisor call: {e}"),
    }
}

pub struct Plan {
    pub vm: VmRec,
    pub pool: PoolConfig,
    pub labels: Vec<String>,
    pub runner_group_id: u64,
    pub workflow: String,
    pub job_name: String,
}

/// Image check, credential, overlay, seed, define, start. Reports the runner id as soon as
/// it exists, so a crash after it still lets the teardown find the registration.
pub async fn provision<G: GitHub, H: Hypervisor>(ctx: Ctx<G, H>, plan: Plan) -> Result<Duration, ProvisionError> {
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

    let gateway = fence_up(&ctx).await.map_err(ProvisionError::Network)?;

    let credential = match pool.registration {
        Registration::Jit => {
            let jit = match ctx.github.generate_jit_config(&name, &plan.labels, plan.runner_group_id).await {
                Err(e) if e.status() == Some(409) => {
                    // A registration of this name survived an earlier attempt: remove it, retry once.
                    tracing::warn!(vm = %name, "a runner with this name exists; replacing it");
                    if let Some(r) = ctx.github.find_runner(&name).await.map_err(ProvisionError::Credential)? {
                        ctx.github.delete_runner(r.id).await.map_err(ProvisionError::Credential)?;
                    }
                    ctx.github.generate_jit_config(&name, &plan.labels, plan.runner_group_id).await
                }
                other => other,
            }
            .map_err(ProvisionError::Credential)?;
            let _ = ctx.events.send(Event::RunnerCreated { vm: name.clone(), runner_id: jit.runner_id });
            Credential::Jit { encoded: jit.encoded }
        }
        Registration::Token => {
            let token = ctx.github.registration_token().await.map_err(ProvisionError::Credential)?;
            let group = match ctx.config.github.scope() {
                crate::config::Scope::Repository { .. } => None,
                _ => Some(ctx.config.github.runner_group.clone()),
            };
            Credential::Token {
                url: format!("{}/{}", ctx.config.github.web_url(), ctx.config.github.scope().web_path()),
                token,
                labels: plan.labels.clone(),
                runner_group: group,
                disable_update: pool.disable_update,
            }
        }
    };
    crash_point("after-credential");

    let hv = ctx.hv.clone();
    let (n, backing) = (name.clone(), pool.image.clone());
    let overlay = blocking(move || hv.create_overlay(&n, &backing, disk)).await.map_err(ProvisionError::Overlay)?;
    crash_point("after-overlay");

    let user_data = cloudinit::user_data(&RunnerSpec {
        vm_name: &name,
        runner_user: &pool.runner_user,
        runner_dir: &pool.runner_dir,
        credential: &credential,
    });
    let image = seed::nocloud_image(&user_data, &cloudinit::meta_data(&name))
        .map_err(|e| ProvisionError::Seed(e.to_string()))?;
    drop(user_data);
    let hv = ctx.hv.clone();
    let n = name.clone();
    let seed_path =
        blocking(move || hv.create_seed(&n, &image)).await.map_err(|e| ProvisionError::Seed(e.to_string()))?;
    crash_point("after-seed");

    let console_log: PathBuf = ctx.config.libvirt.console_log_dir.join(format!("{name}.log"));
    let metadata = VmMetadata {
        job_id: plan.vm.job_id,
        run_id: plan.vm.run_id,
        repository: plan.vm.repository.clone(),
        pool: pool.name.clone(),
        runner_name: name.clone(),
        created: plan.vm.created_at,
        console_log,
        job_url: plan.vm.job_url.clone(),
    };
    let title = format!("{} · {} · job {}", plan.vm.repository, plan.workflow, plan.vm.job_id);
    let description = format!(
        "runnervisor runner for {} workflow {:?} job {:?} (id {}, run {}) {}",
        plan.vm.repository, plan.workflow, plan.job_name, plan.vm.job_id, plan.vm.run_id, plan.vm.job_url
    );
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
        gateway,
        title: &title,
        description: &description,
        metadata: &metadata,
    });
    let hv = ctx.hv.clone();
    let n = name.clone();
    blocking(move || hv.define(&n, &xml)).await.map_err(ProvisionError::Domain)?;
    crash_point("after-define");
    let hv = ctx.hv.clone();
    let n = name.clone();
    blocking(move || hv.start(&n)).await.map_err(ProvisionError::Domain)?;
    crash_point("after-start");
    Ok(started.elapsed())
}

/// Checks the network the VM joins and (re)defines the fence's nwfilter from the config
/// and this host's current addresses. Fails, so that no VM starts, when either is missing:
/// there is no fallback to an open network. Returns the network's gateway address.
pub async fn fence_up<G, H: Hypervisor>(ctx: &Ctx<G, H>) -> Result<Option<std::net::Ipv4Addr>, HvError> {
    let net = ctx.config.libvirt.network.clone();
    let hv = ctx.hv.clone();
    blocking(move || {
        let gateway = match &net {
            NetworkConfig::User { .. } => return Ok(None),
            NetworkConfig::Network { name, .. } => hv.network_gateway(name)?,
            NetworkConfig::Bridge { name, .. } if !fence::bridge_exists(name) => {
                return Err(HvError::BridgeMissing { name: name.clone() });
            }
            NetworkConfig::Bridge { .. } => None,
        };
        let fence = fence::filter_for(&net, gateway).map_err(|e| HvError::HostAddresses { message: e.to_string() })?;
        if let Some((filter, xml)) = fence {
            hv.define_filter(&filter, &xml)?;
        }
        Ok(gateway)
    })
    .await
}

#[derive(Debug, Default)]
pub struct TeardownOutcome {
    pub errors: Vec<String>,
    /// `runner_first` found the runner busy: the VM was left alone.
    pub aborted_busy: bool,
    pub duration: Duration,
}

/// Removes the domain, its volumes, and the runner registration. With `runner_first`
/// (reaping a runner believed idle) the registration goes first, and a runner that turns
/// out to be busy keeps its VM.
pub async fn teardown<G: GitHub, H: Hypervisor>(ctx: Ctx<G, H>, vm: VmRec, runner_first: bool) -> TeardownOutcome {
    let started = Instant::now();
    let mut out = TeardownOutcome::default();
    if runner_first {
        match delete_runner(&ctx, &vm).await {
            Ok(Deleted::Busy) => {
                out.aborted_busy = true;
                out.duration = started.elapsed();
                return out;
            }
            Ok(_) => {}
            Err(e) => out.errors.push(e),
        }
    }
    let hv = ctx.hv.clone();
    let name = vm.name.clone();
    for e in blocking(move || hv.teardown(&name)).await {
        out.errors.push(e.to_string());
    }
    if !runner_first {
        match delete_runner(&ctx, &vm).await {
            Ok(Deleted::Busy) => out.errors.push(format!("runner {} is still busy at GitHub; will retry", vm.name)),
            Ok(_) => {}
            Err(e) => out.errors.push(e),
        }
    }
    out.duration = started.elapsed();
    out
}

async fn delete_runner<G: GitHub, H: Hypervisor>(ctx: &Ctx<G, H>, vm: &VmRec) -> Result<Deleted, String> {
    let id = match vm.runner_id {
        Some(id) => Some(id),
        None => {
            ctx.github.find_runner(&vm.name).await.map_err(|e| format!("find runner {}: {e}", vm.name))?.map(|r| r.id)
        }
    };
    match id {
        None => Ok(Deleted::NotFound),
        Some(id) => ctx.github.delete_runner(id).await.map_err(|e| format!("delete runner {}: {e}", vm.name)),
    }
}

//! runnervisor: ephemeral GitHub Actions runners, one fresh libvirt VM per job.
//!
//! # Layout
//! - [`config`]: the TOML file, typed and validated.
//! - [`webhook`]: `POST /webhook` intake: signature, parse, persist, wake the scheduler.
//! - [`store`]: the embedded store (redb): delivery ids, inbox, jobs, VMs.
//! - [`scheduler`]: the one task owning jobs and VMs; [`scheduler::vm`] is the VM state
//!   machine; [`scheduler::provision`] the provisioning and teardown tasks.
//! - [`github`]: the GitHub seam (trait, HTTP client, App auth, fake).
//! - [`hypervisor`]: the libvirt seam (trait, libvirt, fake), domain XML and seed builders.
//! - [`cloudinit`]: user-data and meta-data for the runner VM.
//! - [`fence`]: the network fence of job VMs (allow-list, nwfilter).
//! - [`capacity`]: the pools' worst case against the host's CPUs, memory and disk.
//! - [`server`]: the HTTP listeners' connection cap and timeouts; [`sources`]: who may
//!   connect (allow-list, per-source cap).
//! - [`admin`]: the local admin socket; [`metrics`]: OpenMetrics; [`systemd`]: sd_notify;
//!   [`logging`]: stderr or native journald; [`check`]: `runnervisor check`.
//!
//! [`run`] wires them: listeners, store, scheduler; it returns when `shutdown` is
//! cancelled and in-flight work has finished (running VMs keep running).

pub mod admin;
pub mod capacity;
pub mod check;
pub mod clock;
pub mod cloudinit;
pub mod config;
pub mod docs;
pub mod fence;
pub mod fleet;
pub mod github;
pub mod heap;
pub mod hypervisor;
pub mod images;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod offload;
pub mod reload;
pub mod scaleset;
pub mod scheduler;
pub mod secret;
pub mod server;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod sources;
pub mod store;
pub mod systemd;
pub mod timeline;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::github::GitHub;
use crate::hypervisor::{HvEvent, Hypervisor};
use crate::metrics::Metrics;
use crate::scheduler::{Event, Scheduler};
use crate::secret::Secret;
use crate::store::Store;

/// The implementations `run` drives: real ones in `main`, fakes or simulators in tests.
pub struct Deps<G, H> {
    pub github: Arc<G>,
    pub hypervisor: Arc<H>,
    pub hv_events: mpsc::UnboundedReceiver<HvEvent>,
    pub webhook_secret: Secret,
    pub metrics: Arc<Metrics>,
    /// Pre-bound listeners (tests bind port 0); `None`: bind what the config says.
    pub webhook_listener: Option<std::net::TcpListener>,
    pub metrics_listener: Option<std::net::TcpListener>,
    /// Validated configurations to apply while running (SIGHUP: [`reload::on_sighup`]).
    pub reloads: Option<mpsc::UnboundedReceiver<reload::Request>>,
    /// Fleet mode (`[fleet]`): this host's membership; `None`: a single host.
    pub fleet: Option<fleet::Member>,
    /// The scale-set pools' client other than GitHub's over HTTP (the deterministic
    /// simulator's model of the Actions service); `None`: GitHub's.
    pub scale_sets: Option<ScaleSetModel>,
}

/// A model of GitHub's Actions service for the scale-set pools: the simulator's (none
/// without it: then only `None` is one).
pub enum ScaleSetModel {
    #[cfg(any(test, feature = "sim"))]
    Sim(sim::scaleset::SimScaleSets),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("fleet: {0}")]
    Fleet(#[from] fleet::FleetError),
}

/// `user` (slirp) networking lets a job reach this host's loopback: said loudly at every
/// start unless the operator acknowledged it.
fn warn_if_unfenced(network: &config::NetworkConfig) {
    if let config::NetworkConfig::User { accept_unfenced } = network {
        if *accept_unfenced {
            tracing::warn!("job VMs are NOT fenced (libvirt.network type \"user\", accept_unfenced = true): labs only");
        } else {
            tracing::warn!(
                "job VMs are NOT fenced: with libvirt.network type \"user\" (slirp) a job reaches this host's loopback at 10.0.2.2 \
                 (webhook, metrics, anything bound to 127.0.0.1); use the default libvirt network, or set accept_unfenced = true for a lab"
            );
        }
    }
}

fn bind(
    what: &'static str,
    addr: SocketAddr,
    pre: Option<std::net::TcpListener>,
) -> Result<tokio::net::TcpListener, RunError> {
    let err = |source| RunError::Bind { what, addr: addr.to_string(), source };
    let std_listener = match pre {
        Some(l) => l,
        None => std::net::TcpListener::bind(addr).map_err(err)?,
    };
    std_listener.set_nonblocking(true).map_err(err)?;
    tokio::net::TcpListener::from_std(std_listener).map_err(err)
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run<G: GitHub, H: Hypervisor>(
    config: Arc<Config>,
    mut deps: Deps<G, H>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let store = Arc::new(Store::open(&config.state_dir)?);
    warn_if_unfenced(&config.libvirt.network);
    let webhook_listener = bind("webhook", config.server.listen, deps.webhook_listener.take())?;
    let metrics_listener = match (config.metrics.enabled, deps.metrics_listener.take()) {
        (_, Some(l)) => Some(bind("metrics", config.metrics.listen, Some(l))?),
        (true, None) => Some(bind("metrics", config.metrics.listen, None)?),
        (false, None) => None,
    };
    let admin_listener = admin::bind(&config.admin.socket, config.admin.group.as_deref())?;
    let admission = sources::Admission::new(
        config.server.allow_sources.clone(),
        config.server.max_connections_per_source,
        Some(deps.metrics.clone()),
    );
    if admission.wants_github() {
        tokio::spawn(sources::keep_github_ranges(deps.github.clone(), admission.clone(), shutdown.clone()));
    }
    let metrics = deps.metrics.clone();
    let agent = assemble(config.clone(), deps, store, Arc::new(clock::SystemClock), shutdown.clone())?;
    let app = agent.app.clone().route("/healthz", axum::routing::get(|| async { "ok\n" }));
    let limits = server::Limits {
        max_connections: config.server.max_connections,
        header_timeout: config.server.header_timeout,
        write_timeout: config.server.body_timeout,
        shutdown_grace: config.reconcile.shutdown_grace,
    };
    tracing::info!(addr = %webhook_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "webhook listener bound");
    if let Some(l) = metrics_listener {
        tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics listener bound");
        let router =
            axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let m = metrics.clone();
                    async move {
                        ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.render())
                    }
                }),
            );
        let s = shutdown.clone();
        // Scrapes are few: a small cap keeps a misbehaving client from holding many.
        let metrics_limits = server::Limits { max_connections: 16, ..limits };
        let anyone = sources::Admission::new(None, metrics_limits.max_connections, None);
        tokio::spawn(server::serve(l, router, metrics_limits, anyone, s));
    }
    let admin_task = tokio::spawn(admin::serve(admin_listener, agent.events.clone(), shutdown.clone()));
    let webhook_addr = webhook_listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    server::serve(webhook_listener, app, limits, admission, shutdown.clone()).await;
    tracing::info!(webhook = %webhook_addr, "intake stopped; finishing in-flight work");
    systemd::stopping();
    let result = agent.finish().await;
    let _ = admin_task.await;
    let _ = std::fs::remove_file(&config.admin.socket);
    result
}

/// The agent without its sockets: what [`run`] serves, assembled in process (the
/// simulator drives it so: deliveries into `app`, admin commands into `events`).
pub struct Agent {
    /// The webhook listener's routes (`POST /webhook`).
    pub app: axum::Router,
    /// The scheduler's events; the admin socket sends its commands here.
    pub events: mpsc::UnboundedSender<Event>,
    scheduler: tokio::task::JoinHandle<()>,
    stop_scheduler: CancellationToken,
    /// The scale-set pools' listeners: they stop with the intake, letting their sessions go.
    listeners: Vec<tokio::task::JoinHandle<()>>,
    refused: Arc<std::sync::Mutex<Option<fleet::FleetError>>>,
}

impl Agent {
    /// Whether the scheduler's task has ended (it ends only when stopped).
    pub fn scheduler_finished(&self) -> bool {
        self.scheduler.is_finished()
    }

    /// Once the intake has stopped: stops the scheduler, waits for its in-flight work
    /// (bounded by `shutdown_grace`), and says why the agent must exit non-zero, if it must.
    pub async fn finish(self) -> Result<(), RunError> {
        self.stop_scheduler.cancel();
        let _ = self.scheduler.await;
        // A listener stopping deletes its session (so that the next start opens one at
        // once, not after the service gives up on it): waited for, briefly.
        let deadline = tokio::time::Instant::now() + LISTENERS_GRACE;
        for l in self.listeners {
            if tokio::time::timeout_at(deadline, l).await.is_err() {
                tracing::warn!("a scale set's listener did not stop in time: its session lapses on GitHub's side");
                break;
            }
        }
        match self.refused.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(RunError::Fleet(e)),
            None => Ok(()),
        }
    }
}

/// How long [`Agent::finish`] waits for the scale-set listeners to let their sessions go.
const LISTENERS_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts the scheduler (and in fleet mode the membership) over `store`, with wall time
/// from `clock`, and builds the intake's routes. `deps`' listeners are not used here.
pub fn assemble<G: GitHub, H: Hypervisor>(
    config: Arc<Config>,
    deps: Deps<G, H>,
    store: Arc<Store>,
    clock: Arc<dyn clock::Clock>,
    shutdown: CancellationToken,
) -> Result<Agent, RunError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut hv_events = deps.hv_events;
    let forward = tx.clone();
    tokio::spawn(async move {
        while let Some(ev) = hv_events.recv().await {
            if forward.send(Event::Hv(ev)).is_err() {
                return;
            }
        }
    });

    if let Some(mut reloads) = deps.reloads {
        let forward = tx.clone();
        tokio::spawn(async move {
            while let Some((config, reply)) = reloads.recv().await {
                if forward.send(Event::Reload(config, reply)).is_err() {
                    return;
                }
            }
        });
    }

    let inbox_ready = Arc::new(Notify::new());
    // The store has one writer thread, for the intake (a single host's) and the scheduler.
    let writer = Arc::new(store::Writer::start(store.clone()));
    let scheduler_store: Arc<dyn store::SchedulerStore> = writer.clone();
    let github = deps.github.clone();
    let mut scheduler = Scheduler::new(
        config.clone(),
        deps.github,
        deps.hypervisor,
        scheduler_store,
        deps.metrics.clone(),
        inbox_ready.clone(),
        tx.clone(),
        rx,
    )?
    .with_clock(clock);
    // The intake stamps deliveries in the scheduler's frame (see `clock::FrameClock`).
    let clock = scheduler.clock();
    // Pools that are runner scale sets: their client and what the scheduler and their
    // listeners (started below, with the intake's store) share.
    let mut scale_sets = None;
    if config.pools.iter().any(|p| p.scale_set().is_some()) {
        let scope_url = format!("{}/{}", config.github.web_url(), config.github.scope().web_path());
        let client = match deps.scale_sets {
            #[cfg(any(test, feature = "sim"))]
            Some(ScaleSetModel::Sim(model)) => Ok(scaleset::Client::Sim(model)),
            None => github::scaleset::HttpScaleSets::new(
                &config.github.api_url,
                &scope_url,
                github,
                config.github.api_timeout,
            )
            .map(|c| scaleset::Client::Http(c.with_metrics(deps.metrics.clone()))),
        };
        match client {
            Ok(client) => {
                let client = Arc::new(client);
                let registry = Arc::new(scaleset::Registry::default());
                let runners = Arc::new(scaleset::Runners { client: client.clone(), registry: registry.clone() });
                scheduler = scheduler.with_scale_sets(registry.clone(), runners);
                scale_sets = Some((client, registry));
            }
            Err(e) => tracing::error!(error = %e, "cannot make the scale set client: scale-set pools take no jobs"),
        }
    }
    // In a fleet: the member's claims (the scheduler's, and the leads of the scale sets,
    // whose sessions the member leading each holds).
    let claims: Option<Arc<dyn fleet::claims::Claims>> = deps.fleet.as_ref().map(|m| {
        let claims = fleet::claims::PgClaims::new(m.pool.clone(), m.host_id.clone(), m.lease);
        Arc::new(claims.with_leases(m.leases.clone())) as Arc<dyn fleet::claims::Claims>
    });
    let lead = deps.fleet.as_ref().zip(claims.clone()).map(|(m, claims)| scaleset::Lead { claims, lease: m.lease });
    // Who holds a session (GitHub shows it to another client that tries): the member.
    let owner = deps.fleet.as_ref().map(|m| m.host_id.clone());
    // Fleet mode: the room for new jobs the scheduler leaves its intake to claim on write.
    let reserve = Arc::new(fleet::intake::Reserve::default());
    if let (Some(m), Some(claims)) = (&deps.fleet, claims) {
        let member = scheduler::claims::Fleet::new(
            claims,
            Some(fleet::intake::FleetIntake::start(m.pool.clone(), None)),
            m.host_id.clone(),
            m.lease,
            m.cold_head_start,
        );
        scheduler = scheduler.with_fleet(member.joined_when(m.joined.clone()).with_reserve(reserve.clone()));
    }
    let stop_scheduler = CancellationToken::new();
    let (ready_tx, ready_rx) = oneshot::channel();
    let sched = tokio::spawn(scheduler.run(stop_scheduler.clone(), Some(ready_tx)));
    tokio::spawn(async move {
        if ready_rx.await.is_ok() {
            tracing::info!("ready: taking jobs");
            systemd::ready();
        }
    });

    // Fleet mode: deliveries go to the fleet's database, whose job rows the scheduler reads
    // (woken by a job left to claim; the rest read every 2 s); a single host writes its
    // store.
    // A member that must not be one (a newer schema, its host id taken) stops the agent,
    // which exits non-zero with the reason.
    let refused: Arc<std::sync::Mutex<Option<fleet::FleetError>>> = Arc::default();
    let accepter = match deps.fleet {
        Some(member) => {
            tracing::info!(host_id = %member.host_id, "fleet mode: the job queue is shared on PostgreSQL");
            // New jobs this member would serve at once are claimed as they are written.
            let claimed = tx.clone();
            let on_write = fleet::intake::OnWrite {
                host: member.host_id.clone(),
                lease: member.lease,
                reserve: reserve.clone(),
                claimed: Box::new(move |c| {
                    let _ = claimed.send(Event::ClaimedOnWrite(c));
                }),
            };
            let persist =
                webhook::Persist::Fleet(fleet::intake::FleetIntake::start(member.pool.clone(), Some(on_write)));
            let (wake, refused, stop) = (tx.clone(), refused.clone(), shutdown.clone());
            tokio::spawn(async move {
                let woken = move |_payload: String| {
                    let _ = wake.send(Event::FleetWake);
                };
                if let Err(e) = fleet::run_member(member, woken, stop.clone()).await {
                    tracing::error!(error = %e, "fleet database refused: stopping");
                    *refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    stop.cancel();
                }
            });
            persist
        }
        None => webhook::Persist::Local(writer),
    };
    // A listener per scale-set pool, writing where deliveries go.
    let mut listeners = Vec::new();
    if let Some((client, registry)) = scale_sets {
        let owner = owner.unwrap_or_else(|| {
            nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "runnervisor".into())
        });
        for pool in &config.pools {
            let Some(name) = pool.scale_set() else { continue };
            let listener = scaleset::Listener {
                client: client.clone(),
                registry: registry.clone(),
                pool: pool.name.clone(),
                spec: github::scaleset::ScaleSetSpec {
                    name: name.to_string(),
                    labels: pool.labels.clone(),
                    runner_group: config.github.runner_group.clone(),
                },
                persist: accepter.clone(),
                inbox_ready: inbox_ready.clone(),
                clock: clock.clone(),
                owner: owner.clone(),
                lead: lead.clone(),
                metrics: deps.metrics.clone(),
            };
            listeners.push(tokio::spawn(listener.run(shutdown.clone())));
        }
    }
    let intake = Arc::new(webhook::Intake {
        secret: deps.webhook_secret,
        accepter,
        inbox_ready,
        metrics: deps.metrics.clone(),
        scope: config.github.scope(),
        scale_sets: config.pools.iter().filter(|p| p.scale_set().is_some()).cloned().collect(),
        max_body_bytes: config.server.max_body_bytes,
        body_timeout: config.server.body_timeout,
        clock,
        replays: webhook::Replays::default(),
    });
    Ok(Agent { app: webhook::router(intake), events: tx, scheduler: sched, stop_scheduler, refused, listeners })
}

#[cfg(test)]
pub(crate) mod test_support {
    /// A temporary directory, removed when dropped; derefs to its path.
    pub struct TempDir(tempfile::TempDir);

    impl std::ops::Deref for TempDir {
        type Target = std::path::Path;
        fn deref(&self) -> &std::path::Path {
            self.0.path()
        }
    }

    pub fn tempdir() -> TempDir {
        TempDir(tempfile::Builder::new().prefix("runnervisor-test-").tempdir().expect("a temporary directory"))
    }
}

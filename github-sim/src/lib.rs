//! github-sim: a faithful stand-in for the parts of GitHub that runnervisor talks to.
//!
//! # Layout
//! - [`model`]: the simulated world (jobs, runners, tokens, deliveries) and GitHub's rules
//!   for it (label matching, ephemeral runners, busy runners cannot be deleted). No I/O.
//! - [`api`]: the REST API at GitHub's paths (also under `/api/v3`, as on GHES), with
//!   authentication, rate-limit headers, pagination and fault injection.
//! - [`runner_proto`]: what the (fake) runner in a VM speaks: token exchange at
//!   `actions/runner-registration`, registration, long-poll for a job, heartbeat, completion.
//! - [`scaleset`]: runner scale sets as the Actions service plays them (sessions, the
//!   message queue's long poll, acquirejobs, the set's JIT configs).
//! - [`control`]: `/_sim/...`, the test and demo control API (queue jobs, cancel, faults).
//! - [`webhook`]: signs and POSTs `workflow_job` deliveries, records them, never retries.
//! - [`faults`], [`auth`], [`error`], [`time`]: helpers.
//!
//! [`serve`] runs everything on one listener until `shutdown` resolves.

pub mod api;
pub mod auth;
pub mod control;
pub mod error;
pub mod faults;
pub mod model;
pub mod runner_proto;
pub mod scaleset;
pub mod time;
pub mod webhook;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

use crate::auth::{AppKey, InstallationTokens};
use crate::faults::Faults;
use crate::model::World;

/// How the simulator is set up (the command line of the `github-sim` binary).
pub struct SimConfig {
    /// Where `workflow_job` deliveries are POSTed; none means deliveries are recorded as failed.
    pub webhook_url: Option<String>,
    pub webhook_secret: String,
    /// The personal access token the API accepts.
    pub pat: String,
    /// GitHub App accepted for JWT auth.
    pub app: Option<AppKey>,
    pub installation_id: u64,
    pub hook_id: u64,
    /// The simulator's base URL as seen from runner VMs (`http://10.0.2.2:PORT` under slirp).
    /// `None`: `http://<public_host>:<port>` if `public_host` is set, else the listen address.
    pub public_url: Option<String>,
    /// Host part of the base URL runners use, with the listen port (e.g. `10.0.2.2`).
    pub public_host: Option<String>,
    pub installation_token_ttl: Duration,
    pub registration_token_ttl: Duration,
    pub webhook_timeout: Duration,
    /// The enterprise the organizations belong to: deliveries carry its `enterprise`
    /// object and `/enterprises/{slug}/...` answers for this slug only (404 for any other).
    /// `None`: no enterprise in payloads, any slug answers.
    pub enterprise: Option<String>,
    /// More URLs each delivery is sent to (a relay in front of a fleet of agents).
    pub fanout: Vec<String>,
    /// With `fanout`: each delivery goes to this many of the URLs (`webhook_url` first, then
    /// `fanout`), taken in turn (a load balancer that sends each request to N backends).
    /// `None`: to all of them.
    pub fanout_each: Option<usize>,
    /// Deliveries in flight at once (GitHub sends concurrently; 1: one after another, in
    /// order, which tests of ordering faults rely on).
    pub webhook_concurrency: usize,
    /// What `GET /meta` lists as `hooks`, the networks deliveries come from: the
    /// simulator's own (loopback) by default.
    pub hook_ranges: Vec<String>,
    /// What every registration token begins with (GitHub's are 29 upper-case characters
    /// beginning with `A`): tests that search a guest for its credential plant a marker.
    pub registration_token_prefix: String,
    /// What every runner's credential (its token on the runner protocol, in its JIT config
    /// or given at registration) begins with.
    pub runner_credential_prefix: String,
    /// How long the Actions service's token (the registration exchange's) lasts.
    pub admin_token_ttl: Duration,
    /// How long a scale set's message-queue token lasts (a session refresh renews it).
    pub queue_token_ttl: Duration,
    /// A scale set's session not polled for this long is gone (another may be made).
    pub scale_set_session_idle: Duration,
    /// How long a message long poll waits before it answers 202 (GitHub: about 50 s).
    pub message_poll_window: Duration,
    /// A job assigned to a scale set and not started for this long is offered again.
    pub reassign_after: Duration,
}

impl SimConfig {
    pub fn new(pat: impl Into<String>, webhook_secret: impl Into<String>) -> Self {
        SimConfig {
            webhook_url: None,
            webhook_secret: webhook_secret.into(),
            pat: pat.into(),
            app: None,
            installation_id: 1,
            hook_id: 1,
            public_url: None,
            public_host: None,
            installation_token_ttl: Duration::from_secs(3600),
            registration_token_ttl: Duration::from_secs(3600),
            webhook_timeout: Duration::from_secs(10),
            enterprise: None,
            fanout: Vec::new(),
            fanout_each: None,
            webhook_concurrency: 1,
            hook_ranges: vec!["127.0.0.0/8".into(), "::1/128".into()],
            registration_token_prefix: "A".into(),
            runner_credential_prefix: "rc_".into(),
            admin_token_ttl: Duration::from_secs(3600),
            queue_token_ttl: Duration::from_secs(3600),
            scale_set_session_idle: Duration::from_secs(120),
            message_poll_window: Duration::from_secs(50),
            reassign_after: Duration::from_secs(60),
        }
    }
}

/// Shared state of a running simulator.
pub struct Sim {
    pub config: SimConfig,
    /// Base URL for links in payloads and for runners: `public_url`, else the listen address.
    pub base_url: String,
    world: Mutex<World>,
    faults: Mutex<Faults>,
    pub(crate) installation_tokens: Mutex<InstallationTokens>,
    rate: Mutex<BTreeMap<String, api::RateBucket>>,
    api_calls: Mutex<BTreeMap<String, u64>>,
    /// Woken whenever a job is queued, so long-polling runners look again.
    pub(crate) jobs_changed: Notify,
    webhooks: mpsc::UnboundedSender<webhook::Outgoing>,
    /// Deliveries sent so far (where `fanout_each` starts).
    pub(crate) sent: std::sync::atomic::AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sim {
    pub fn world(&self) -> MutexGuard<'_, World> {
        lock(&self.world)
    }
    pub fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.faults)
    }
    pub(crate) fn rate(&self) -> MutexGuard<'_, BTreeMap<String, api::RateBucket>> {
        lock(&self.rate)
    }
    pub(crate) fn count_call(&self, key: String) {
        *lock(&self.api_calls).entry(key).or_default() += 1;
    }
    pub fn api_calls(&self) -> BTreeMap<String, u64> {
        lock(&self.api_calls).clone()
    }
    pub(crate) fn send_webhook(&self, out: webhook::Outgoing) {
        let _ = self.webhooks.send(out);
    }
}

/// Serves the simulator on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = listener.local_addr()?;
    let base_url = match (&config.public_url, &config.public_host) {
        (Some(u), _) => u.trim_end_matches('/').to_string(),
        (None, Some(h)) => format!("http://{h}:{}", addr.port()),
        (None, None) => format!("http://{addr}"),
    };
    let mut world = World::default();
    world.runner_credential_prefix = config.runner_credential_prefix.clone();
    let sim = Arc::new(Sim {
        config,
        base_url,
        world: Mutex::new(world),
        faults: Mutex::new(Faults::default()),
        installation_tokens: Mutex::new(InstallationTokens::default()),
        rate: Mutex::new(BTreeMap::new()),
        api_calls: Mutex::new(BTreeMap::new()),
        jobs_changed: Notify::new(),
        webhooks: tx,
        sent: std::sync::atomic::AtomicUsize::new(0),
    });
    let sender = tokio::spawn(webhook::run(sim.clone(), rx));
    let app = router(sim);
    let result = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    sender.abort();
    result
}

pub fn router(sim: Arc<Sim>) -> axum::Router {
    api::router(sim.clone())
        .merge(runner_proto::router(sim.clone()))
        .merge(scaleset::router(sim.clone()))
        .merge(control::router(sim.clone()))
        .fallback(|| async { error::ApiError::not_found() })
}

/// An in-process simulator for tests: `start` binds `127.0.0.1:0`; dropping the handle stops it.
pub struct SimHandle {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SimHandle {
    pub async fn start(config: SimConfig) -> std::io::Result<SimHandle> {
        Self::start_on(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Like [`SimHandle::start`], on `addr` (e.g. the gateway of the VMs' network, port 0).
    pub async fn start_on(config: SimConfig, addr: SocketAddr) -> std::io::Result<SimHandle> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(serve(listener, config, async {
            let _ = stopped.await;
        }));
        Ok(SimHandle { addr, stop: Some(stop) })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

//! What `scripts/fleet-sim` and `scripts/fleet-chaos` share: a member's configuration and
//! dependencies (the real `run()` with a fake hypervisor, github-sim as GitHub), and the
//! fake guest that does what the test image's runner does.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use runnervisor::config::Config;
use runnervisor::github::http::{Auth, HttpGitHub};
use runnervisor::hypervisor::HvEvent;
use runnervisor::hypervisor::fake::FakeHypervisor;
use runnervisor::metrics::Metrics;
use runnervisor::secret::Secret;
use serde_json::{Value, json};

pub const PAT: &str = "ghp_fleet_sim";
pub const SECRET: &str = "fleet-sim-webhook-secret";
pub const LABELS: [&str; 2] = ["self-hosted", "linux"];

/// A member's settings.
pub struct MemberSpec<'a> {
    pub dir: &'a Path,
    pub host_id: &'a str,
    pub sim_url: &'a str,
    /// The fleet's database; none: a single host (its own store, no `[fleet]`).
    pub pg_url: Option<&'a str>,
    pub lease: Duration,
    pub max_vms: usize,
    /// Warm VMs its pool keeps.
    pub warm: usize,
}

/// Member `spec`'s configuration (its golden image made in its directory), parsed as the
/// agent parses its file.
pub fn member_config(spec: &MemberSpec) -> Result<Config, String> {
    let image = runnervisor::hypervisor::fake::golden_image(spec.dir).map_err(|e| e.to_string())?;
    let text = format!(
        r#"
        state_dir = "{dir}"
        [server]
        listen = "127.0.0.1:0"
        [admin]
        socket = "{dir}/admin.sock"
        [github]
        api_url = "{sim_url}"
        organization = "octo-org"
        auth = {{ type = "pat", token = {{ file = "/nonexistent" }} }}
        webhook_secret = {{ file = "/nonexistent" }}
        hook = {{ type = "organization", id = 1 }}
        [reconcile]
        sweep_interval = "2s"
        github_interval = "10s"
        {fleet}
        [[pool]]
        name = "small"
        labels = ["self-hosted", "linux"]
        image = "{image}"
        max_vms = {max_vms}
        warm = {warm}
        "#,
        dir = spec.dir.display(),
        sim_url = spec.sim_url,
        fleet = match spec.pg_url {
            Some(url) => format!(
                "[fleet]\nhost_id = \"{}\"\nlease = \"{}ms\"\npostgres = {{ url = \"{url}\", max_connections = 3 }}",
                spec.host_id,
                spec.lease.as_millis()
            ),
            None => String::new(),
        },
        image = image.display(),
        max_vms = spec.max_vms,
        warm = spec.warm,
    );
    Config::parse(&text).map_err(|e| format!("{}: {e}", spec.host_id))
}

/// The dependencies of `run()` for a member: github-sim at `sim_url`, a fake hypervisor
/// (returned too), the webhook listener given.
pub fn member_deps(
    config: &Config,
    password: &str,
    sim_url: &str,
    webhook: std::net::TcpListener,
) -> Result<(runnervisor::Deps<HttpGitHub, FakeHypervisor>, Arc<FakeHypervisor>, Arc<Metrics>), String> {
    let member = match &config.fleet {
        Some(fleet) => Some(
            runnervisor::fleet::Member::new(fleet, Some(&Secret::new(password)))
                .map_err(|e| format!("{}: {e}", fleet.host_id()))?,
        ),
        None => None,
    };
    let metrics = Arc::new(Metrics::default());
    let github = HttpGitHub::new(
        sim_url,
        config.github.scope(),
        config.github.hook.clone(),
        Auth::Pat(Secret::new(PAT)),
        config.github.api_timeout,
    )
    .map_err(|e| e.to_string())?
    .with_metrics(metrics.clone());
    let (hv_tx, hv_rx) = tokio::sync::mpsc::unbounded_channel();
    let hv = Arc::new(FakeHypervisor::new(hv_tx.clone()));
    let _ = hv_tx.send(HvEvent::Reconnected);
    let deps = runnervisor::Deps {
        github: Arc::new(github),
        hypervisor: hv.clone(),
        hv_events: hv_rx,
        webhook_secret: Secret::new(SECRET),
        metrics: metrics.clone(),
        webhook_listener: Some(webhook),
        metrics_listener: Some(std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?),
        reloads: None,
        fleet: member,
        scale_sets: None,
    };
    Ok((deps, hv, metrics))
}

/// One fake guest: boots, runs its runner (one job at most), powers off. `ran(job)` once
/// its runner has run a job; `gone()`: its host died (the guest stops before taking one).
pub async fn guest(
    hv: &FakeHypervisor,
    vm: &str,
    (boot, poweroff): (Duration, Duration),
    http: &reqwest::Client,
    gone: impl Fn() -> bool,
    ran: impl FnOnce(u64),
) -> Result<(), String> {
    let jitter = Duration::from_millis(fastrand::u64(0..=boot.as_millis() as u64 / 2));
    tokio::time::sleep(boot + jitter).await;
    let exists = || hv.lock().domains.contains_key(vm);
    // The runner's files come over the bind port once the agent binds the VM to its job.
    let message = loop {
        if let Some((_, m)) = hv.lock().delivered.iter().find(|(v, _)| v == vm) {
            break m.clone();
        }
        if !exists() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (server, token) = runner_credential(&message)?;
    while exists() {
        if gone() {
            return Ok(());
        }
        let r = http
            .get(format!("{server}/jobs/next?wait=2"))
            .bearer_auth(&token)
            .send()
            .await
            .map_err(|e| format!("jobs/next: {e}"))?;
        match r.status().as_u16() {
            200 => {
                let job: Value = r.json().await.map_err(|e| e.to_string())?;
                let id = job["id"].as_u64().ok_or("a job without an id")?;
                tokio::time::sleep(Duration::from_secs_f64(job["duration_secs"].as_f64().unwrap_or(0.0))).await;
                let done = http
                    .post(format!("{server}/jobs/{id}/complete"))
                    .bearer_auth(&token)
                    .json(&json!({"conclusion": "success"}))
                    .send()
                    .await
                    .map_err(|e| format!("complete: {e}"))?;
                if done.status().is_success() {
                    ran(id);
                }
                break;
            }
            204 => continue,
            // The runner was removed (a surplus VM reaped): the runner exits.
            401 | 404 => break,
            other => return Err(format!("jobs/next: HTTP {other}")),
        }
    }
    // The runner is done: the guest unit powers the guest off.
    tokio::time::sleep(poweroff).await;
    if exists() {
        hv.stop(vm);
    }
    Ok(())
}

/// The runner's server URL and credential, from the files of its bind message (a JIT
/// config unpacked as `run.sh --jitconfig` would unpack it).
fn runner_credential(message: &str) -> Result<(String, String), String> {
    let doc: Value = serde_json::from_str(message).map_err(|e| format!("bind message: {e}"))?;
    let files = &doc["files"];
    let b64 = |s: &str| -> Result<Value, String> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).map_err(|e| format!("runner file: {e}"))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("runner file: {e}"))
    };
    let runner = b64(files[".runner"].as_str().ok_or("bind message: no .runner")?)?;
    let credentials = b64(files[".credentials"].as_str().ok_or("bind message: no .credentials")?)?;
    let server = runner["serverUrl"].as_str().ok_or(".runner: no serverUrl")?.to_string();
    let token = credentials["data"]["token"].as_str().ok_or(".credentials: no token")?.to_string();
    Ok((server, token))
}

/// A connection to PostgreSQL at `url` (driven by a spawned task).
pub async fn connect(url: &str, password: &str) -> Result<tokio_postgres::Client, String> {
    let mut pg: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| e.to_string())?;
    pg.password(password);
    let (client, conn) = pg.connect(tokio_postgres::NoTls).await.map_err(|e| format!("PostgreSQL: {e}"))?;
    tokio::spawn(conn);
    Ok(client)
}

/// A JSON answer of the simulator's control API.
pub async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, String> {
    let answer = http.get(url).send().await.map_err(|e| format!("{url}: {e}"))?;
    answer.json().await.map_err(|e| format!("{url}: {e}"))
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// How long each of github-sim's deliveries took to be answered (ms, sorted).
pub async fn delivery_times(http: &reqwest::Client, sim: &str) -> Result<Vec<f64>, String> {
    let deliveries = get_json(http, &format!("{sim}/_sim/deliveries")).await?;
    let mut ms: Vec<f64> = deliveries
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["duration"].as_f64())
        .map(|s| s * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

/// The `p` quantile of `sorted` (NaN for none).
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n => sorted[((n as f64 * p) as usize).min(n - 1)],
    }
}

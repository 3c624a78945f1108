//! The agent in process: `run()` with the fake GitHub and a fake hypervisor, real HTTP on
//! 127.0.0.1 port 0, the real store and admin socket (`tests/in_process.rs`, and fleet
//! members in `tests/fleet.rs`).

use std::sync::Arc;
use std::time::Duration;

use runnervisor::admin::{self, Reply, Request, Status};
use runnervisor::config::Config;
use runnervisor::github::fake::FakeGitHub;
use runnervisor::hypervisor::HvEvent;
use runnervisor::hypervisor::fake::FakeHypervisor;
use runnervisor::secret::Secret;
use tokio_util::sync::CancellationToken;

/// The webhook secret of in-process agents.
pub const SECRET: &str = "in-process-secret";

pub fn sign(body: &[u8]) -> String {
    github_sim::webhook::signature(SECRET.as_bytes(), body)
}

/// A `queued` delivery for job `id` with labels `self-hosted, linux`.
pub fn queued(id: u64, repository: &str) -> String {
    serde_json::json!({
        "action": "queued",
        "workflow_job": {"id": id, "run_id": 1, "run_attempt": 1, "name": "build", "workflow_name": "CI",
            "labels": ["self-hosted", "linux"], "html_url": "https://x", "runner_name": null,
            "runner_id": null, "conclusion": null, "status": "queued"},
        "repository": {"full_name": repository},
    })
    .to_string()
}

pub struct Agent {
    pub webhook: String,
    pub metrics: String,
    pub socket: std::path::PathBuf,
    pub hv: Arc<FakeHypervisor>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), runnervisor::RunError>>,
    _dir: tempfile::TempDir,
}

/// An agent with one pool `small` (labels `self-hosted, linux`, `max_vms = 2`) and
/// `extra` appended before the pool (e.g. a `[fleet]` table), on `github`, a member of a
/// fleet when `fleet` is given (its config then comes from `extra`'s `[fleet]`).
pub async fn start(
    extra: &str,
    github: Arc<FakeGitHub>,
    fleet: Option<(tokio_postgres::Config, runnervisor::fleet::Pool)>,
) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let image = runnervisor::hypervisor::fake::golden_image(dir.path()).unwrap();
    let socket = dir.path().join("admin.sock");
    let text = format!(
        r#"
        state_dir = "{dir}"
        [server]
        listen = "127.0.0.1:0"
        [admin]
        socket = "{socket}"
        [github]
        organization = "octo-org"
        auth = {{ type = "pat", token = {{ file = "/nonexistent" }} }}
        webhook_secret = {{ file = "/nonexistent" }}
        [reconcile]
        sweep_interval = "1s"
        {extra}
        [[pool]]
        name = "small"
        labels = ["self-hosted", "linux"]
        image = "{image}"
        max_vms = 2
        "#,
        dir = dir.path().display(),
        socket = socket.display(),
        image = image.display(),
    );
    let config = Arc::new(Config::parse(&text).unwrap());
    let member = fleet.map(|(pg, pool)| {
        let f = config.fleet.clone().expect("a [fleet] table in `extra`");
        runnervisor::fleet::Member {
            host_id: f.host_id(),
            leases: pool.clone(),
            pool,
            listen: pg,
            tls: runnervisor::fleet::tls(None).unwrap(),
            lease: f.lease,
            cold_head_start: f.cold_head_start,
            joined: Default::default(),
        }
    });
    let (hv_tx, hv_rx) = tokio::sync::mpsc::unbounded_channel();
    let hv = Arc::new(FakeHypervisor::new(hv_tx.clone()));
    hv_tx.send(HvEvent::Reconnected).unwrap();
    let webhook_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let webhook = format!("http://{}/webhook", webhook_listener.local_addr().unwrap());
    let metrics = format!("http://{}/metrics", metrics_listener.local_addr().unwrap());
    let deps = runnervisor::Deps {
        github,
        hypervisor: hv.clone(),
        hv_events: hv_rx,
        webhook_secret: Secret::new(SECRET),
        metrics: Arc::new(runnervisor::metrics::Metrics::default()),
        webhook_listener: Some(webhook_listener),
        metrics_listener: Some(metrics_listener),
        reloads: None,
        fleet: member,
        scale_sets: None,
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(runnervisor::run(config, deps, stop.clone()));
    Agent { webhook, metrics, socket, hv, stop, task, _dir: dir }
}

impl Agent {
    pub async fn status(&self) -> Option<Status> {
        match admin::request(&self.socket, &Request::Status).await {
            Ok(Reply::Status(s)) => Some(s),
            _ => None,
        }
    }

    pub async fn wait(&self, what: &str, f: impl Fn(&Status) -> bool) -> Status {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if let Some(s) = self.status().await.filter(|s| f(s)) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}: {:#?}", self.status().await);
    }

    /// A signed `queued` delivery for job `id`; the answer's status code.
    pub async fn post(&self, id: u64, delivery: &str) -> u16 {
        let body = queued(id, "octo-org/app");
        reqwest::Client::new()
            .post(&self.webhook)
            .header("X-GitHub-Event", "workflow_job")
            .header("X-GitHub-Delivery", delivery)
            .header("X-Hub-Signature-256", sign(body.as_bytes()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// How the agent ended, if it ends by itself within `limit`.
    pub async fn ended_within(&mut self, limit: Duration) -> Option<Result<(), runnervisor::RunError>> {
        tokio::time::timeout(limit, &mut self.task).await.ok().map(|r| r.unwrap())
    }

    pub async fn stop(self) -> Result<(), runnervisor::RunError> {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

//! `github-sim`: serves the GitHub simulator until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use github_sim::{SimConfig, auth::AppKey};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// A faithful stand-in for GitHub's runner, webhook and App APIs, for tests and demos.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:8700.
    #[arg(long, default_value = "127.0.0.1:8700")]
    listen: String,
    /// Where `workflow_job` deliveries are POSTed (the agent's /webhook).
    #[arg(long)]
    webhook_url: Option<String>,
    /// File holding the webhook secret used for X-Hub-Signature-256.
    #[arg(long)]
    webhook_secret_file: PathBuf,
    /// File holding the personal access token the API accepts.
    #[arg(long)]
    pat_file: PathBuf,
    /// GitHub App id accepted as JWT issuer (needs --app-public-key).
    #[arg(long, requires = "app_public_key")]
    app_id: Option<u64>,
    /// GitHub App client id, also accepted as JWT issuer.
    #[arg(long)]
    app_client_id: Option<String>,
    /// PEM public key that verifies the App's RS256 JWTs.
    #[arg(long, requires = "app_id")]
    app_public_key: Option<PathBuf>,
    /// The App installation id (payloads carry it; tokens are issued for it).
    #[arg(long, default_value_t = 1)]
    installation_id: u64,
    /// The webhook's hook id (X-GitHub-Hook-ID; deliveries API paths).
    #[arg(long, default_value_t = 1)]
    hook_id: u64,
    /// Base URL runners in VMs use to reach the simulator (slirp: http://10.0.2.2:PORT).
    #[arg(long)]
    public_url: Option<String>,
    /// Host runners use to reach the simulator, with the listen port (slirp: 10.0.2.2).
    #[arg(long, conflicts_with = "public_url")]
    public_host: Option<String>,
    /// Lifetime of installation tokens, seconds.
    #[arg(long, default_value_t = 3600)]
    installation_token_ttl: u64,
    /// Lifetime of registration tokens, seconds.
    #[arg(long, default_value_t = 3600)]
    registration_token_ttl: u64,
}

fn read_secret(path: &PathBuf, what: &str) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {what} from {}", path.display()))?;
    let s = s.trim().to_string();
    anyhow::ensure!(!s.is_empty(), "{what} file {} is empty", path.display());
    Ok(s)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = std::env::var("RUST_LOG").ok().and_then(|v| v.parse::<Targets>().ok());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .finish()
        .with(filter.unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO)))
        .init();
    let args = Args::parse();
    let mut config =
        SimConfig::new(read_secret(&args.pat_file, "PAT")?, read_secret(&args.webhook_secret_file, "webhook secret")?);
    config.webhook_url = args.webhook_url;
    config.installation_id = args.installation_id;
    config.hook_id = args.hook_id;
    config.public_url = args.public_url;
    config.public_host = args.public_host;
    config.installation_token_ttl = Duration::from_secs(args.installation_token_ttl);
    config.registration_token_ttl = Duration::from_secs(args.registration_token_ttl);
    if let (Some(id), Some(key)) = (args.app_id, args.app_public_key) {
        let pem = std::fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?;
        config.app = Some(
            AppKey::from_pem(id, args.app_client_id, &pem).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?,
        );
    }
    let listener =
        tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "github-sim listening");
    github_sim::serve(listener, config, shutdown()).await?;
    Ok(())
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

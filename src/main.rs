//! The `runnervisor` binary: CLI, logging, real implementations, exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use runnervisor::admin::Reply as AdminReply;
use runnervisor::admin::{self, Request};
use runnervisor::config::{AuthConfig, Config};
use runnervisor::github::app::AppSigner;
use runnervisor::github::http::{Auth, HttpGitHub};
use runnervisor::hypervisor::libvirt::Libvirt;
use runnervisor::metrics::Metrics;
use runnervisor::secret::credentials_dir;
use tokio_util::sync::CancellationToken;

/// Exit codes: distinct per kind of fatal error.
mod exit {
    pub const CONFIG: u8 = 2;
    pub const SECRETS: u8 = 3;
    pub const STARTUP: u8 = 4;
    pub const ADMIN: u8 = 5;
}

const DEFAULT_CONFIG: &str = "/etc/runnervisor/config.toml";

/// Ephemeral GitHub Actions runners, one fresh libvirt VM per job.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: take workflow_job webhooks, run each job in a fresh VM.
    Serve {
        /// The configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Check a configuration against this host and GitHub; one ✔/✘ line per check.
    Check {
        /// The configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show pools, queued jobs and VMs of the running agent.
    Status {
        #[command(flatten)]
        socket: SocketArgs,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Stop taking new jobs; running VMs finish their jobs, waiting warm VMs are removed.
    /// Survives restarts.
    Drain {
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Take new jobs again after `drain`.
    Undrain {
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Each VM's milestones since the agent started (job queued, VM defined and started,
    /// bound when warm, runner online, job completed, VM gone), as a table, JSON or an SVG
    /// picture.
    Timeline {
        #[command(flatten)]
        socket: SocketArgs,
        /// Print JSON instead of a table.
        #[arg(long, conflicts_with = "svg")]
        json: bool,
        /// Write an SVG timeline to this file instead.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
    /// Write a cloud-init NoCloud seed image (FAT, label CIDATA); used by image recipes.
    SeedImage {
        /// The user-data file.
        #[arg(long)]
        user_data: PathBuf,
        /// The meta-data file.
        #[arg(long)]
        meta_data: PathBuf,
        /// Where to write the raw image (created mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Operate on one VM.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Operate on a pool's runner scale set (`intake = "scale_set"`).
    ScaleSet {
        #[command(subcommand)]
        command: ScaleSetCommand,
    },
    /// Write the manual pages or a shell completion script (the package is built with it).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
}

#[derive(Subcommand)]
enum Generate {
    /// runnervisor.8 and runnervisor.toml.5 into a directory.
    ManPages {
        #[arg(long)]
        out: PathBuf,
    },
    /// The completion script for a shell, on stdout.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum VmCommand {
    /// Destroy a VM cleanly: domain, overlay, seed and runner registration.
    Destroy {
        /// The VM's name (`virsh list` / `runnervisor status`).
        name: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
}

#[derive(Subcommand)]
enum ScaleSetCommand {
    /// Delete the pool's scale set at GitHub, with its runners (the agent never does: a
    /// restart keeps it). Stop the agent first: running, it makes the set again.
    Delete {
        /// The pool's name (or `--name`).
        #[arg(required_unless_present = "name")]
        pool: Option<String>,
        /// The scale set's name, for a set no pool of the configuration is (any more): in
        /// the configuration's scope and `github.runner_group`.
        #[arg(long, conflicts_with = "pool")]
        name: Option<String>,
        /// The configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(clap::Args)]
struct SocketArgs {
    /// The agent's configuration file (to find its admin socket).
    #[arg(long, short, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// The admin socket, overriding the configuration.
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl SocketArgs {
    fn path(&self) -> Result<PathBuf, String> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        Config::load(&self.config).map(|c| c.admin.socket).map_err(|e| format!("{e} (or pass --socket)"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve { .. }) {
        runnervisor::heap::cap_arenas();
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match cli.command {
        Command::Serve { config } => rt.block_on(serve(config)),
        Command::ScaleSet { command: ScaleSetCommand::Delete { pool, name, config } } => {
            rt.block_on(delete_scale_set(config, pool, name))
        }
        Command::Check { config } => rt.block_on(async {
            let lines = runnervisor::check::run(&config).await;
            print!("{}", runnervisor::check::render(&lines));
            if lines.iter().all(|l| l.ok) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }),
        Command::Status { socket, json } => rt.block_on(admin_cmd(&socket, Request::Status, Show::json(json))),
        Command::Drain { socket } => rt.block_on(admin_cmd(&socket, Request::Drain, Show::Text)),
        Command::Undrain { socket } => rt.block_on(admin_cmd(&socket, Request::Undrain, Show::Text)),
        Command::Timeline { socket, json, svg } => {
            let show = svg.map(Show::Svg).unwrap_or(Show::json(json));
            rt.block_on(admin_cmd(&socket, Request::Timeline, show))
        }
        Command::SeedImage { user_data, meta_data, out } => seed_image(&user_data, &meta_data, &out),
        Command::Vm { command: VmCommand::Destroy { name, socket } } => {
            rt.block_on(admin_cmd(&socket, Request::Destroy { vm: name }, Show::Text))
        }
        Command::Generate { what } => generate(what),
    }
}

fn generate(what: Generate) -> ExitCode {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    match what {
        Generate::Completions { shell } => {
            clap_complete::generate(shell, &mut cmd, "runnervisor", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Generate::ManPages { out } => {
            let version = env!("CARGO_PKG_VERSION");
            let mut agent = Vec::new();
            let man = clap_mangen::Man::new(cmd).section("8").manual("System Administration");
            let rendered = man.render(&mut agent).map(|()| {
                agent.extend_from_slice(runnervisor::docs::AGENT_MANUAL_EXTRA.as_bytes());
                agent
            });
            let written = rendered.and_then(|agent| {
                std::fs::create_dir_all(&out)?;
                std::fs::write(out.join("runnervisor.8"), agent)?;
                let config = runnervisor::docs::config_manual(runnervisor::docs::EXAMPLE, version);
                std::fs::write(out.join("runnervisor.toml.5"), config)
            });
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("runnervisor: manual pages into {}: {e}", out.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The GitHub credential the configuration names, loaded.
fn github_auth(config: &Config, creds: Option<&runnervisor::secret::Credentials>) -> Result<Auth, String> {
    Ok(match &config.github.auth {
        AuthConfig::Pat { token } => Auth::Pat(token.load(creds).map_err(|e| format!("github.auth.token: {e}"))?),
        AuthConfig::App { app_id, installation_id, private_key } => {
            let pem = private_key.load(creds).map_err(|e| format!("github.auth.private_key: {e}"))?;
            Auth::App {
                signer: Box::new(AppSigner::new(*app_id, &pem).map_err(|e| format!("github.auth.private_key: {e}"))?),
                installation_id: *installation_id,
            }
        }
    })
}

/// `runnervisor scale-set delete POOL` (or `--name SET`).
async fn delete_scale_set(path: PathBuf, pool: Option<String>, name: Option<String>) -> ExitCode {
    use runnervisor::github::scaleset::{HttpScaleSets, ScaleSetSpec, ScaleSets};
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("runnervisor: configuration: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    let (name, of) = match (pool, name) {
        (_, Some(name)) => (name, String::new()),
        (Some(pool), None) => {
            let Some(p) = config.pool(&pool) else {
                eprintln!("runnervisor: no pool {pool:?} in {} (a set no pool is: --name)", path.display());
                return ExitCode::from(exit::CONFIG);
            };
            let Some(name) = p.scale_set() else {
                eprintln!("runnervisor: pool {pool:?} is no scale set (its intake is not \"scale_set\")");
                return ExitCode::from(exit::CONFIG);
            };
            (name.to_string(), format!(" of pool {pool}"))
        }
        (None, None) => unreachable!("clap requires one"),
    };
    // Run from a shell (the agent stopped first): the unit's credential files, as `check`.
    let auth = match github_auth(&config, runnervisor::secret::credentials_outside_service().as_ref()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("runnervisor: {e}");
            return ExitCode::from(exit::SECRETS);
        }
    };
    let t = config.github.api_timeout;
    let scope_url = format!("{}/{}", config.github.web_url(), config.github.scope().web_path());
    let client = HttpGitHub::new(&config.github.api_url, config.github.scope(), None, auth, t)
        .map_err(|e| e.to_string())
        .and_then(|g| {
            HttpScaleSets::new(&config.github.api_url, &scope_url, Arc::new(g), t).map_err(|e| e.to_string())
        });
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            eprintln!("runnervisor: {e}");
            return ExitCode::from(exit::STARTUP);
        }
    };
    let spec =
        ScaleSetSpec { name: name.clone(), labels: Vec::new(), runner_group: config.github.runner_group.clone() };
    let deleted = async {
        let Some(set) = client.find(&spec).await? else { return Ok(None) };
        client.delete(set.id).await.map(|()| Some(set.id))
    };
    match deleted.await {
        Ok(Some(id)) => {
            println!("deleted scale set {name:?} (id {id}){of}");
            ExitCode::SUCCESS
        }
        Ok(None) => {
            println!("no scale set {name:?} in runner group {:?}: nothing to delete", config.github.runner_group);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("runnervisor: cannot delete scale set {name:?}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("runnervisor: configuration: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    let log_level = runnervisor::logging::init(&config.log_level, runnervisor::logging::detect());
    let creds = credentials_dir();
    let secrets = (|| -> Result<_, String> {
        let webhook_secret =
            config.github.webhook_secret.load(creds.as_ref()).map_err(|e| format!("github.webhook_secret: {e}"))?;
        let auth = github_auth(&config, creds.as_ref())?;
        let fleet = match &config.fleet {
            None => None,
            Some(f) => {
                let password = match &f.postgres.password {
                    Some(p) => Some(p.load(creds.as_ref()).map_err(|e| format!("fleet.postgres.password: {e}"))?),
                    None => None,
                };
                Some(
                    runnervisor::fleet::Member::new(f, password.as_ref())
                        .map_err(|e| format!("fleet.postgres: {e}"))?,
                )
            }
        };
        Ok((webhook_secret, auth, fleet))
    })();
    let (webhook_secret, auth, fleet) = match secrets {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(exit::SECRETS);
        }
    };
    let metrics = Arc::new(Metrics::default());
    let github = match HttpGitHub::new(
        &config.github.api_url,
        config.github.scope(),
        config.github.hook.clone(),
        auth,
        config.github.api_timeout,
    ) {
        Ok(g) => Arc::new(g.with_metrics(metrics.clone())),
        Err(e) => {
            tracing::error!(error = %e, "cannot build the GitHub client");
            return ExitCode::from(exit::STARTUP);
        }
    };
    let (hv_tx, hv_rx) = tokio::sync::mpsc::unbounded_channel();
    let hypervisor = Libvirt::start(&config.libvirt.uri, &config.libvirt.storage_pool, hv_tx);
    if let Err(e) = std::fs::create_dir_all(&config.libvirt.console_log_dir) {
        tracing::warn!(dir = %config.libvirt.console_log_dir.display(), error = %e, "cannot create the console log directory");
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(runnervisor::heap::keep_trimmed(shutdown.clone()));
    let s = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down; running VMs keep running"),
        }
        s.cancel();
    });
    let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(runnervisor::reload::on_sighup(path.clone(), reload_tx, metrics.clone(), move |level| {
        log_level.set(level)
    }));
    tracing::info!(config = %path.display(), version = env!("CARGO_PKG_VERSION"), pools = config.pools.len(), "runnervisor starting");
    let deps = runnervisor::Deps {
        github,
        hypervisor,
        hv_events: hv_rx,
        webhook_secret,
        metrics,
        webhook_listener: None,
        metrics_listener: None,
        reloads: Some(reload_rx),
        fleet,
        scale_sets: None,
    };
    match runnervisor::run(config, deps, shutdown).await {
        Ok(()) => {
            tracing::info!("runnervisor stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            tracing::error!("{msg}");
            ExitCode::from(exit::STARTUP)
        }
    }
}

fn seed_image(user_data: &PathBuf, meta_data: &PathBuf, out: &PathBuf) -> ExitCode {
    let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let result = (|| -> Result<(), String> {
        let image = runnervisor::hypervisor::seed::nocloud_image(&read(user_data)?, &read(meta_data)?, None)
            .map_err(|e| e.to_string())?;
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(out)
            .map_err(|e| format!("{}: {e}", out.display()))?;
        f.write_all(&image).map_err(|e| format!("{}: {e}", out.display()))
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("runnervisor: {e}");
            ExitCode::from(exit::CONFIG)
        }
    }
}

/// How an admin reply is shown.
enum Show {
    Text,
    Json,
    Svg(PathBuf),
}

impl Show {
    fn json(json: bool) -> Show {
        if json { Show::Json } else { Show::Text }
    }
}

async fn admin_cmd(socket: &SocketArgs, req: Request, show: Show) -> ExitCode {
    let path = match socket.path() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("runnervisor: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    match admin::request(&path, &req).await {
        Ok(AdminReply::Status(s)) if matches!(show, Show::Json) => {
            println!("{}", serde_json::to_string_pretty(&s).expect("json"));
            ExitCode::SUCCESS
        }
        Ok(AdminReply::Status(s)) => {
            print!("{}", admin::render_status(&s));
            ExitCode::SUCCESS
        }
        Ok(AdminReply::Timeline(t)) => match show {
            Show::Json => {
                println!("{}", serde_json::to_string_pretty(&t).expect("json"));
                ExitCode::SUCCESS
            }
            Show::Text => {
                print!("{}", runnervisor::timeline::table(&t));
                ExitCode::SUCCESS
            }
            Show::Svg(path) => {
                match std::fs::write(&path, runnervisor::timeline::svg(&t, std::time::SystemTime::now())) {
                    Ok(()) => {
                        println!("{}: {} VMs", path.display(), t.len());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("runnervisor: {}: {e}", path.display());
                        ExitCode::FAILURE
                    }
                }
            }
        },
        Ok(AdminReply::Ok(m)) => {
            println!("{m}");
            ExitCode::SUCCESS
        }
        Ok(AdminReply::Error(m)) => {
            eprintln!("runnervisor: {m}");
            ExitCode::from(exit::ADMIN)
        }
        Err(e) => {
            let mut msg = e.to_string();
            if let Some(s) = std::error::Error::source(&e) {
                msg.push_str(&format!(": {s}"));
            }
            eprintln!("runnervisor: {msg}");
            ExitCode::from(exit::ADMIN)
        }
    }
}

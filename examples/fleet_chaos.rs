//! `scripts/fleet-chaos`: a nemesis for fleet mode, Jepsen-style. N member **processes**
//! (the real `run()`, each with a fake hypervisor whose guests run their runners against
//! github-sim, as in `fleet_sim`) share the real PostgreSQL, each through a proxy of its
//! own; jobs arrive for the whole run while a seeded random schedule of faults hits them:
//! - `kill`: kill -9 a member's process (its host dies, guests too: GitHub fails the jobs
//!   its runners ran, as it does for a runner it no longer hears from), restarted later
//!   from its state directory;
//! - `stop`: SIGSTOP a member for longer than its lease, then SIGCONT;
//! - `cut`: its path to PostgreSQL cut (connections dropped, new ones refused), then healed;
//! - `delay`: its path to PostgreSQL slowed by up to 30 s (a transaction commits long
//!   after it began), then healed;
//! - `pg-restart`: PostgreSQL stopped and started again;
//! - `drop`/`duplicate`/`reorder` deliveries, GitHub `5xx` and `rate-limit` (github-sim's
//!   faults);
//! - `newer`: a member upgraded mid-run writes job rows the others cannot read (a row whose
//!   job does not decode, fields they do not know on others).
//!
//! Then every fault is healed and the fleet left to finish. The checker reads the records
//! of github-sim (which runner ran which job), the members (every VM each made, when) and
//! PostgreSQL (every claim and renewal, by a trigger on the job rows):
//! - served_once: jobs completed that exactly one runner took; doubles: jobs more than
//!   one runner took; lost: jobs not completed at the end;
//! - starved: jobs that waited longer than `--starve-bound` for a runner;
//! - leaked: VMs left on any member and runners left registered at the end;
//! - late_claims: VMs made for a job when the member's claim of that attempt had run out.
//!
//! The verdict: `fleet-chaos: members=N jobs=J faults=F served_once=J lost=0 doubles=0
//! starved=0 leaked=0 late_claims=0 max_queue_wait_s=W`; exit 1 on any violation. A run is
//! repeated with `--seed` (the schedule is the seed's; the processes' timing is the machine's).
//! The load starts once every member has joined. Also printed: the claim latency (a
//! delivery received → its job's first claim), and with `--beside-single` the same load on
//! one host beside the fleet (no `[fleet]`, the fleet's VMs, its own github-sim, no faults):
//! how fast each answered its deliveries and how long jobs waited from queued to started.
//!
//! `fleet_chaos member ...` is one member (the controller starts them).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use runnervisor::hypervisor::DomainState;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[path = "fleet_common/mod.rs"]
mod common;
use common::{LABELS, SECRET, connect, delivery_times, get_json, pct, unix_ms};

#[derive(Parser)]
#[command(about = "A nemesis for fleet mode: member processes, real PostgreSQL, github-sim, seeded faults")]
struct Args {
    /// Member processes.
    #[arg(long, default_value_t = 6)]
    members: usize,
    /// VMs per member.
    #[arg(long, default_value_t = 4)]
    max_vms: usize,
    /// Warm VMs the members with an even index keep (the others boot cold).
    #[arg(long, default_value_t = 1)]
    warm: usize,
    /// How long faults are made (then the fleet is healed and left to finish).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The schedule's seed (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Jobs queued per second, on average.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    #[arg(long, default_value_t = 3.0)]
    job_secs: f64,
    #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
    boot: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// A fault every this long, on average (0: none, the fleet under load alone).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    fault_every: Duration,
    /// A job waiting longer than this for a runner is starved.
    #[arg(long, default_value = "150s", value_parser = humantime::parse_duration)]
    starve_bound: Duration,
    /// Longest the fleet may take to finish once healed.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    quiesce: Duration,
    /// PostgreSQL: a role that may create databases; its password in `--password-file`.
    #[arg(long)]
    postgres: String,
    #[arg(long)]
    password_file: PathBuf,
    /// Stops and starts the PostgreSQL server (`halt` / `start`).
    #[arg(long, default_value = "scripts/test-postgres")]
    pg_script: PathBuf,
    /// Where the members' logs go.
    #[arg(long, default_value = "out/fleet-chaos")]
    out: PathBuf,
    /// The same load on one host beside the fleet, in the same run: a single-host agent
    /// (no `[fleet]`, its own store) with the fleet's VMs and warm VMs, its own github-sim,
    /// each job queued to both; both say how long a job waited from queued to its VM
    /// defined. No fault touches it.
    #[arg(long)]
    beside_single: bool,
}

/// One member process (`fleet_chaos member`).
#[derive(Parser)]
struct MemberArgs {
    #[arg(long)]
    host_id: String,
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    sim: String,
    /// The fleet's database (through its proxy); none: a single host.
    #[arg(long)]
    pg: Option<String>,
    #[arg(long)]
    password_file: PathBuf,
    #[arg(long, value_parser = humantime::parse_duration)]
    lease: Duration,
    #[arg(long)]
    max_vms: usize,
    #[arg(long)]
    warm: usize,
    #[arg(long, value_parser = humantime::parse_duration)]
    boot: Duration,
}

fn main() -> ExitCode {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    let targets = filter.parse::<tracing_subscriber::filter::Targets>().unwrap_or_default();
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::fmt().with_writer(std::io::stderr).finish().with(targets).init();
    if std::env::args().nth(1).as_deref() == Some("member") {
        let args = MemberArgs::parse_from(std::env::args().skip(1));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        return match rt.block_on(member(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fleet-chaos member: {e}");
                ExitCode::from(2)
            }
        };
    }
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    match rt.block_on(chaos(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fleet-chaos: {e}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------------
// A member process.

/// Runs the agent until SIGTERM. On stdout: `vm NAME MS` for each VM the first time it is
/// seen running (MS: when it was defined); every second `domains N W`: the domains of VMs made for a job or bound to
/// one, and the warm VMs waiting unbound (the pool keeps `--warm` of those).
async fn member(args: MemberArgs) -> Result<(), String> {
    let password = std::fs::read_to_string(&args.password_file).map_err(|e| e.to_string())?.trim().to_string();
    let spec = common::MemberSpec {
        dir: &args.dir,
        host_id: &args.host_id,
        sim_url: &args.sim,
        pg_url: args.pg.as_deref(),
        lease: args.lease,
        max_vms: args.max_vms,
        warm: args.warm,
    };
    let config = Arc::new(common::member_config(&spec)?);
    let listener = std::net::TcpListener::bind(args.listen).map_err(|e| format!("{}: {e}", args.listen))?;
    let (deps, hv, _metrics) = common::member_deps(&config, &password, &args.sim, listener)?;
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            term.recv().await;
        }
        s.cancel();
    });
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().map_err(|e| e.to_string())?;
    let watcher = {
        let (hv, stop) = (hv.clone(), stop.clone());
        let times = (args.boot, Duration::from_secs(1));
        tokio::spawn(async move {
            let mut seen = BTreeSet::new();
            let mut next_report = Instant::now();
            while !stop.is_cancelled() {
                let (up, count, warm): (Vec<(String, u64)>, usize, usize) = {
                    let s = hv.lock();
                    // When each was defined (by the agent's call), not when seen here: a stop
                    // of this process would make it look late.
                    let defined = |name: &String| {
                        s.defined_at.get(name).map_or(0, |t| {
                            t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
                        })
                    };
                    let up = s
                        .domains
                        .iter()
                        .filter(|(name, (state, _))| *state == DomainState::Running && !seen.contains(*name))
                        .map(|(name, _)| (name.clone(), defined(name)))
                        .collect();
                    let unbound =
                        |name: &String| name.starts_with("rv-small-w") && !s.delivered.iter().any(|(v, _)| v == name);
                    let warm = s.domains.keys().filter(|n| unbound(n)).count();
                    (up, s.domains.len() - warm, warm)
                };
                for (vm, defined) in up {
                    println!("vm {vm} {defined}");
                    seen.insert(vm.clone());
                    let (hv, http) = (hv.clone(), http.clone());
                    tokio::spawn(async move {
                        if let Err(e) = common::guest(&hv, &vm, times, &http, || false, |_| {}).await {
                            eprintln!("fleet-chaos member: guest {vm}: {e}");
                        }
                    });
                }
                if Instant::now() >= next_report {
                    println!("domains {count} {warm}");
                    next_report = Instant::now() + Duration::from_secs(1);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let result = runnervisor::run(config, deps, stop.clone()).await;
    stop.cancel();
    let _ = watcher.await;
    result.map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------
// The path to PostgreSQL, one proxy per member.

#[derive(Debug, Clone, Copy, PartialEq)]
enum PgPath {
    Open,
    /// Connections dropped, new ones refused (accepted and closed).
    Cut,
    /// Every byte, both ways, arrives this much later.
    Delay(Duration),
}

/// While PostgreSQL is down for a restart, no proxy connects to its port: a connection to
/// a loopback port in the ephemeral range with nothing listening may connect to itself
/// (the kernel picks that very port as its source) and hold the port the server must bind.
static PG_DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `scripts/test-postgres halt|start` (a start is tried again for a while: the port may be
/// held still).
fn pg_ctl(args: &Args, what: &str) -> Result<(), String> {
    for _ in 0..30 {
        let status = std::process::Command::new(&args.pg_script).arg(what).status().map_err(|e| e.to_string())?;
        if status.success() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    Err(format!("{} {what}: failed", args.pg_script.display()))
}

async fn proxy(listener: tokio::net::TcpListener, upstream: SocketAddr, mode: watch::Receiver<PgPath>) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        if *mode.borrow() == PgPath::Cut || PG_DOWN.load(std::sync::atomic::Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let mode = mode.clone();
        tokio::spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
            if server.local_addr().ok() == server.peer_addr().ok() {
                // Connected to itself (see PG_DOWN).
                return;
            }
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let mut cut = mode.clone();
            tokio::select! {
                _ = pump(cr, sw, mode.clone()) => {}
                _ = pump(sr, cw, mode.clone()) => {}
                _ = async { while cut.changed().await.is_ok() { if *cut.borrow() == PgPath::Cut { return } } } => {}
            }
        });
    }
}

/// Copies one direction, each chunk delayed as the path is when it was read (in order).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: watch::Receiver<PgPath>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let delay = match *mode.borrow() {
                        PgPath::Delay(d) => d,
                        _ => Duration::ZERO,
                    };
                    if tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    // The reader ends first (EOF); the writer then drains what is due and ends.
    tokio::join!(reader, writer);
}

// ---------------------------------------------------------------------------------------
// The controller.

/// What the members said (their stdout).
#[derive(Default)]
struct Records {
    /// (member, VM name, unix ms first seen running)
    vms: Vec<(usize, String, u64)>,
    domains: HashMap<usize, usize>,
    /// Warm VMs waiting unbound, per member.
    warm: HashMap<usize, usize>,
}

type Shared = Arc<Mutex<Records>>;

fn lock(r: &Shared) -> std::sync::MutexGuard<'_, Records> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

struct MemberProc {
    host_id: String,
    dir: PathBuf,
    listen: SocketAddr,
    /// None: the single host beside the fleet.
    pg: Option<String>,
    max_vms: usize,
    warm: usize,
    child: Option<tokio::process::Child>,
    path: watch::Sender<PgPath>,
    stopped: bool,
    /// Busy with a fault (killed, stopped, cut or delayed) until then.
    faulted_until: Option<Instant>,
}

/// Waits (up to a minute) until `n` members have written their heartbeat; how long it took.
async fn all_joined(pg: &str, password: &str, n: usize) -> Result<Duration, String> {
    let start = Instant::now();
    let c = connect(pg, password).await?;
    loop {
        let joined: i64 = c.query_one("SELECT count(*) FROM rv_members", &[]).await.map_err(|e| e.to_string())?.get(0);
        if joined as usize >= n {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(format!("{joined} of {n} members joined in a minute"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Something the schedule does later (a fault's end).
enum Heal {
    Restart(usize),
    Cont(usize),
    Path(usize),
    PgStart,
}

async fn chaos(args: Args) -> Result<bool, String> {
    let seed = args.seed.unwrap_or_else(|| unix_ms() % 1_000_000);
    eprintln!(
        "fleet-chaos: seed={seed} (again: ./scripts/fleet-chaos --seed {seed} --duration {} --members {})",
        humantime::format_duration(args.duration),
        args.members
    );
    let password = std::fs::read_to_string(&args.password_file)
        .map_err(|e| format!("{}: {e}", args.password_file.display()))?
        .trim()
        .to_string();
    let db = format!("rv_fleet_chaos_{}", std::process::id());
    let admin = connect(&args.postgres, &password).await?;
    admin.batch_execute(&format!("CREATE DATABASE \"{db}\"")).await.map_err(|e| format!("create {db}: {e}"))?;
    let result = run_chaos(&args, seed, &db, &password).await;
    // PostgreSQL may have been restarted meanwhile: a new connection.
    match connect(&args.postgres, &password).await {
        Ok(c) => {
            if let Err(e) = c.batch_execute(&format!("DROP DATABASE \"{db}\" WITH (FORCE)")).await {
                eprintln!("fleet-chaos: drop {db}: {e}");
            }
        }
        Err(e) => eprintln!("fleet-chaos: drop {db}: {e}"),
    }
    result
}

/// The audit of claims: each claim and renewal as it was written.
const AUDIT: &str = r#"
CREATE TABLE chaos_claims (job bigint, attempt int, holder text, lease_until timestamptz, at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION chaos_claim_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    -- A claim made as the row is written.
    IF NEW.holder IS NOT NULL THEN
      INSERT INTO chaos_claims (job, attempt, holder, lease_until) VALUES (NEW.id, NEW.attempts, NEW.holder, NEW.lease_until);
    END IF;
  ELSIF NEW.holder IS NOT NULL AND NEW.lease_until IS DISTINCT FROM OLD.lease_until THEN
    INSERT INTO chaos_claims (job, attempt, holder, lease_until) VALUES (NEW.id, NEW.attempts, NEW.holder, NEW.lease_until);
  ELSIF NEW.holder IS NULL AND OLD.holder IS NOT NULL THEN
    -- A release ends the claim now.
    INSERT INTO chaos_claims (job, attempt, holder, lease_until) VALUES (OLD.id, OLD.attempts, OLD.holder, clock_timestamp());
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER chaos_claims AFTER INSERT OR UPDATE ON rv_jobs FOR EACH ROW EXECUTE FUNCTION chaos_claim_log();
"#;

async fn run_chaos(args: &Args, seed: u64, db: &str, password: &str) -> Result<bool, String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let base = args.postgres.split('?').next().unwrap_or(&args.postgres);
    let (server, _) = base.rsplit_once('/').ok_or("--postgres: no database in the URL")?;
    let direct = format!("{server}/{db}?sslmode=disable");
    let upstream: SocketAddr = {
        let pg: tokio_postgres::Config = direct.parse().map_err(|e: tokio_postgres::Error| e.to_string())?;
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => return Err("--postgres: a TCP host is needed (the members reach it through proxies)".into()),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("--postgres: no address")?
    };
    // The schema first, so that the audit trigger can be put on the job rows.
    {
        let mut c = connect(&direct, password).await?;
        runnervisor::fleet::schema::migrate(&mut c).await.map_err(|e| e.to_string())?;
        c.batch_execute(AUDIT).await.map_err(|e| format!("audit: {e}"))?;
    }
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let state = tempfile::tempdir().map_err(|e| e.to_string())?;

    // Each member on an address of its own: webhooks at 127.0.10.i, PostgreSQL through a
    // proxy at 127.0.11.i.
    let mut members = Vec::new();
    for i in 0..args.members {
        let listen: SocketAddr = format!("127.0.10.{}:18080", i + 1).parse().expect("address");
        let proxy_at: SocketAddr = format!("127.0.11.{}:15432", i + 1).parse().expect("address");
        let listener = tokio::net::TcpListener::bind(proxy_at).await.map_err(|e| format!("{proxy_at}: {e}"))?;
        let (path, mode) = watch::channel(PgPath::Open);
        tokio::spawn(proxy(listener, upstream, mode));
        let dir = state.path().join(format!("m{i}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        members.push(MemberProc {
            host_id: format!("chaos-{i:02}"),
            dir,
            listen,
            // Without faults (load alone), straight to the server: a proxy's hops would be
            // counted as the agent's.
            pg: Some(match args.fault_every.is_zero() {
                true => format!("postgres://{}@{upstream}/{db}?sslmode=disable", user_of(&args.postgres)),
                false => format!("postgres://{}@{proxy_at}/{db}?sslmode=disable", user_of(&args.postgres)),
            }),
            max_vms: args.max_vms,
            warm: warm_of(args, i),
            child: None,
            path,
            stopped: false,
            faulted_until: None,
        });
    }
    let urls: Vec<String> = members.iter().map(|m| format!("http://{}/webhook", m.listen)).collect();
    let mut sim_config = github_sim::SimConfig::new(common::PAT, SECRET);
    sim_config.webhook_url = Some(urls[0].clone());
    sim_config.fanout = urls[1..].to_vec();
    sim_config.fanout_each = Some(2.min(args.members));
    sim_config.webhook_concurrency = 8;
    let sim = github_sim::SimHandle::start(sim_config).await.map_err(|e| format!("github-sim: {e}"))?;
    let sim_url = sim.url();
    let records: Shared = Arc::default();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    for (i, m) in members.iter_mut().enumerate() {
        spawn_member(&exe, args, m, i, &sim_url, &records)?;
    }
    eprintln!("fleet-chaos: {} member processes on {db}, github-sim at {sim_url}", members.len());
    let single = match args.beside_single {
        true => Some(Single::start(&exe, args, state.path()).await?),
        false => None,
    };

    // The load starts once every member has joined (its first heartbeat written): jobs sent
    // while 20 processes start on two cores would measure their start, not the fleet.
    let joined_in = all_joined(&direct, password, members.len()).await?;
    eprintln!("fleet-chaos: every member joined in {:.1} s", joined_in.as_secs_f64());
    if let Some(s) = &single {
        s.ready().await?;
    }
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let end = started + args.duration;
    let mut heals: Vec<(Instant, Heal)> = Vec::new();
    let mut faults: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut next_fault = started + exp(&mut rng, args.fault_every);
    let mut queued = 0u64;
    let mut pg_down = false;
    let mut newer_rows = 0u64;
    let mut next_report = started;
    let tick = Duration::from_millis(250);
    let mut exited: Vec<String> = Vec::new();
    while Instant::now() < end {
        let now = Instant::now();
        // A member that ended on its own (a panic, an error) is a finding, then restarted.
        for (i, m) in members.iter_mut().enumerate() {
            if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                eprintln!("fleet-chaos: {} exited on its own: {status}", m.host_id);
                exited.push(format!("{}: {status}", m.host_id));
                spawn_member(&exe, args, m, i, &sim_url, &records)?;
            }
        }
        // Jobs: each tick, as many as the rate gives (in small bursts).
        let mut due = args.rate * tick.as_secs_f64();
        while due > 0.0 {
            if rng.f64() < due.min(1.0) {
                queue_job(&http, &sim_url, args).await?;
                if let Some(s) = &single {
                    queue_job(&http, &s.sim.url(), args).await?;
                }
                queued += 1;
            }
            due -= 1.0;
        }
        // Faults that end now.
        let (ready, later): (Vec<_>, Vec<_>) = heals.drain(..).partition(|(t, _)| *t <= now);
        heals = later;
        for (_, heal) in ready {
            apply_heal(heal, &exe, args, &mut members, &sim_url, &records, &mut pg_down)?;
        }
        if now >= next_fault && !args.fault_every.is_zero() {
            next_fault = now + exp(&mut rng, args.fault_every);
            let name = fault(
                &mut rng,
                args,
                &mut members,
                &mut heals,
                (&http, &sim_url),
                &records,
                &mut pg_down,
                (&direct, password, &mut newer_rows),
            )
            .await?;
            if let Some(name) = name {
                *faults.entry(name).or_default() += 1;
                eprintln!("fleet-chaos: t={:.0}s fault {name}", started.elapsed().as_secs_f64());
            }
        }
        if now >= next_report {
            let jobs = sim_jobs(&http, &sim_url).await.unwrap_or_default();
            let done = jobs.iter().filter(|j| j["status"] == "completed").count();
            eprintln!(
                "fleet-chaos: t={:.0}s queued={queued} completed={done} faults={}",
                started.elapsed().as_secs_f64(),
                faults.values().sum::<u32>()
            );
            next_report = now + Duration::from_secs(10);
        }
        tokio::time::sleep(tick).await;
    }
    // Every fault ends: the fleet is whole again and finishes what it has.
    for (_, heal) in std::mem::take(&mut heals) {
        apply_heal(heal, &exe, args, &mut members, &sim_url, &records, &mut pg_down)?;
    }
    let _ = http.delete(format!("{sim_url}/_sim/faults")).send().await;
    eprintln!("fleet-chaos: t={:.0}s healed; waiting for the fleet to finish", started.elapsed().as_secs_f64());
    let quiet_by = Instant::now() + args.quiesce;
    let mut last_report = Instant::now();
    loop {
        let jobs = sim_jobs(&http, &sim_url).await?;
        let open = jobs.iter().filter(|j| j["status"] != "completed").count();
        let runners = get_json(&http, &format!("{sim_url}/_sim/runners")).await?.as_array().map_or(0, |a| a.len());
        let domains: usize = lock(&records).domains.values().sum();
        let single_busy = match &single {
            Some(s) => s.busy(&http).await?,
            None => false,
        };
        if open == 0 && runners == 0 && domains == 0 && !single_busy {
            break;
        }
        if Instant::now() >= quiet_by {
            eprintln!(
                "fleet-chaos: not quiet after {:?}: jobs open {open}, runners {runners}, VMs {domains}",
                args.quiesce
            );
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            eprintln!("fleet-chaos: finishing: jobs open {open}, runners {runners}, VMs {domains}");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let ok = check(args, &http, &sim_url, &direct, password, &records, queued, faults.values().sum()).await;
    let single_ok = match single {
        Some(s) => s.finish(&http, &sim_url, queued).await?,
        None => true,
    };
    for m in &mut members {
        if let Some(child) = &mut m.child {
            if let Some(pid) = child.id() {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
            }
            // Each member stops cleanly on SIGTERM.
            match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                other => {
                    exited.push(format!("{} at SIGTERM: {other:?}", m.host_id));
                    let _ = child.kill().await;
                }
            }
        }
    }
    eprintln!("fleet-chaos: faults by kind: {faults:?}");
    if !exited.is_empty() {
        eprintln!("fleet-chaos: members that did not end as told: {exited:?}");
    }
    Ok(ok? && single_ok && exited.is_empty())
}

/// The single host beside the fleet (`--beside-single`).
struct Single {
    proc: MemberProc,
    sim: github_sim::SimHandle,
    records: Shared,
}

impl Single {
    /// Its github-sim, and the agent with the fleet's VMs and warm VMs.
    async fn start(exe: &Path, args: &Args, state: &Path) -> Result<Single, String> {
        let listen: SocketAddr = "127.0.12.1:18080".parse().expect("address");
        let mut config = github_sim::SimConfig::new(common::PAT, SECRET);
        config.webhook_url = Some(format!("http://{listen}/webhook"));
        config.webhook_concurrency = 8;
        let sim = github_sim::SimHandle::start(config).await.map_err(|e| format!("github-sim: {e}"))?;
        let dir = state.join("single");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let (path, _) = watch::channel(PgPath::Open);
        let mut proc = MemberProc {
            host_id: "single".into(),
            dir,
            listen,
            pg: None,
            max_vms: args.max_vms * args.members,
            warm: (0..args.members).map(|i| warm_of(args, i)).sum(),
            child: None,
            path,
            stopped: false,
            faulted_until: None,
        };
        let records: Shared = Arc::default();
        spawn_member(exe, args, &mut proc, 0, &sim.url(), &records)?;
        eprintln!(
            "fleet-chaos: beside it one host, {} VMs and {} warm, github-sim at {}",
            proc.max_vms,
            proc.warm,
            sim.url()
        );
        Ok(Single { proc, sim, records })
    }

    /// Once its scheduler answers on the admin socket.
    async fn ready(&self) -> Result<(), String> {
        let socket = self.proc.dir.join("admin.sock");
        let start = Instant::now();
        while runnervisor::admin::request(&socket, &runnervisor::admin::proto::Request::Status).await.is_err() {
            if start.elapsed() > Duration::from_secs(60) {
                return Err("the single host did not answer in a minute".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Jobs open, runners registered or VMs left.
    async fn busy(&self, http: &reqwest::Client) -> Result<bool, String> {
        let url = self.sim.url();
        let open = sim_jobs(http, &url).await?.iter().any(|j| j["status"] != "completed");
        let runners = get_json(http, &format!("{url}/_sim/runners")).await?.as_array().is_some_and(|a| !a.is_empty());
        Ok(open || runners || lock(&self.records).domains.values().sum::<usize>() > 0)
    }

    /// Compares the fleet and this host (job queued → started), checks this host
    /// served every job once and left nothing, and stops it.
    async fn finish(mut self, http: &reqwest::Client, fleet_sim: &str, queued: u64) -> Result<bool, String> {
        let url = self.sim.url();
        let jobs = sim_jobs(http, &url).await?;
        let fleet_wait = queued_to_started(&sim_jobs(http, fleet_sim).await?);
        let single_wait = queued_to_started(&jobs);
        for (who, sim) in [("the fleet", fleet_sim), ("one host beside it", url.as_str())] {
            let d = delivery_times(http, sim).await?;
            eprintln!(
                "fleet-chaos: deliveries answered, {who}: p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms ({})",
                pct(&d, 0.5),
                pct(&d, 0.99),
                d.last().copied().unwrap_or(f64::NAN),
                d.len()
            );
        }
        for (who, w) in [("the fleet", &fleet_wait), ("one host beside it", &single_wait)] {
            eprintln!(
                "fleet-chaos: job queued → a runner started it, {who}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} jobs)",
                pct(w, 0.5),
                pct(w, 0.99),
                w.last().copied().unwrap_or(f64::NAN),
                w.len()
            );
        }
        let history = get_json(http, &format!("{url}/_sim/runner-history")).await?;
        let mut took: HashMap<u64, usize> = HashMap::new();
        for h in history.as_object().into_iter().flat_map(|o| o.values()) {
            for j in h["jobs"].as_array().into_iter().flatten().filter_map(Value::as_u64) {
                *took.entry(j).or_default() += 1;
            }
        }
        let served_once = jobs
            .iter()
            .filter(|j| j["status"] == "completed" && j["id"].as_u64().and_then(|id| took.get(&id)) == Some(&1))
            .count() as u64;
        let busy = self.busy(http).await?;
        eprintln!("fleet-chaos: the single host: jobs={} served_once={served_once} left_busy={busy}", jobs.len());
        let ok = served_once == queued && jobs.len() as u64 == queued && !busy;
        signal(&self.proc, nix::sys::signal::Signal::SIGTERM);
        let stopped = match &mut self.proc.child {
            Some(child) => tokio::time::timeout(Duration::from_secs(20), child.wait()).await,
            None => return Ok(ok),
        };
        if !matches!(stopped, Ok(Ok(s)) if s.success()) {
            eprintln!("fleet-chaos: the single host did not stop cleanly on SIGTERM: {stopped:?}");
            return Ok(false);
        }
        Ok(ok)
    }
}

/// For each job a runner started, from its creation at GitHub until then, in ms, sorted
/// (whichever runner took it: any runner takes any job its labels cover).
fn queued_to_started(jobs: &[Value]) -> Vec<f64> {
    let mut waits: Vec<f64> = jobs
        .iter()
        .filter_map(|j| Some(j["started_unix_ms"].as_u64()?.saturating_sub(j["created_unix_ms"].as_u64()?) as f64))
        .collect();
    waits.sort_by(f64::total_cmp);
    waits
}

/// One job queued at the github-sim at `sim`.
async fn queue_job(http: &reqwest::Client, sim: &str, args: &Args) -> Result<(), String> {
    let r = http
        .post(format!("{sim}/_sim/jobs"))
        .json(&json!({"repo": "octo-org/app", "labels": LABELS, "duration_secs": args.job_secs}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    match r.status().as_u16() {
        201 => Ok(()),
        s => Err(format!("github-sim at {sim} refused a job: {s}")),
    }
}

/// The warm VMs member `i` keeps: the even ones keep `--warm`, the others boot cold.
fn warm_of(args: &Args, i: usize) -> usize {
    if i.is_multiple_of(2) { args.warm } else { 0 }
}

/// The role of a `postgres://USER@...` URL.
fn user_of(url: &str) -> String {
    url.parse::<tokio_postgres::Config>().ok().and_then(|c| c.get_user().map(str::to_string)).unwrap_or_default()
}

/// An exponentially distributed wait with the given mean.
fn exp(rng: &mut fastrand::Rng, mean: Duration) -> Duration {
    mean.mul_f64(-(1.0 - rng.f64()).ln()).min(mean * 5)
}

fn between(rng: &mut fastrand::Rng, lo: Duration, hi: Duration) -> Duration {
    lo + (hi - lo).mul_f64(rng.f64())
}

fn spawn_member(
    exe: &Path,
    args: &Args,
    m: &mut MemberProc,
    i: usize,
    sim_url: &str,
    records: &Shared,
) -> Result<(), String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.out.join(format!("{}.log", m.host_id)))
        .map_err(|e| e.to_string())?;
    let mut child = tokio::process::Command::new(exe)
        .arg("member")
        .args(["--host-id", &m.host_id, "--sim", sim_url])
        .args(m.pg.iter().flat_map(|pg| ["--pg", pg]))
        .arg("--dir")
        .arg(&m.dir)
        .args(["--listen", &m.listen.to_string()])
        .arg("--password-file")
        .arg(&args.password_file)
        .args(["--lease", &humantime::format_duration(args.lease).to_string()])
        .args(["--max-vms", &m.max_vms.to_string()])
        .args(["--warm", &m.warm.to_string()])
        .args(["--boot", &humantime::format_duration(args.boot).to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{}: {e}", exe.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let records = records.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("vm"), Some(name), Some(ms)) => {
                    lock(&records).vms.push((i, name.to_string(), ms.parse().unwrap_or(0)));
                }
                (Some("domains"), Some(n), Some(warm)) => {
                    let mut r = lock(&records);
                    r.domains.insert(i, n.parse().unwrap_or(0));
                    r.warm.insert(i, warm.parse().unwrap_or(0));
                }
                _ => {}
            }
        }
    });
    m.child = Some(child);
    m.stopped = false;
    Ok(())
}

fn signal(m: &MemberProc, sig: nix::sys::signal::Signal) {
    if let Some(pid) = m.child.as_ref().and_then(|c| c.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

fn apply_heal(
    heal: Heal,
    exe: &Path,
    args: &Args,
    members: &mut [MemberProc],
    sim_url: &str,
    records: &Shared,
    pg_down: &mut bool,
) -> Result<(), String> {
    match heal {
        Heal::Restart(i) => {
            spawn_member(exe, args, &mut members[i], i, sim_url, records)?;
            members[i].faulted_until = None;
        }
        Heal::Cont(i) => {
            signal(&members[i], nix::sys::signal::Signal::SIGCONT);
            members[i].stopped = false;
            members[i].faulted_until = None;
        }
        Heal::Path(i) => {
            members[i].path.send_replace(PgPath::Open);
            members[i].faulted_until = None;
        }
        Heal::PgStart => {
            pg_ctl(args, "start")?;
            PG_DOWN.store(false, std::sync::atomic::Ordering::SeqCst);
            *pg_down = false;
        }
    }
    Ok(())
}

/// Makes one fault (and schedules its end); its name, or `None` when none could be made now.
#[allow(clippy::too_many_arguments)]
async fn fault(
    rng: &mut fastrand::Rng,
    args: &Args,
    members: &mut [MemberProc],
    heals: &mut Vec<(Instant, Heal)>,
    (http, sim_url): (&reqwest::Client, &str),
    records: &Shared,
    pg_down: &mut bool,
    (db_url, password, newer_rows): (&str, &str, &mut u64),
) -> Result<Option<&'static str>, String> {
    let now = Instant::now();
    // At most half the members are hit at a time: the fleet keeps capacity to serve.
    let busy = members.iter().filter(|m| m.faulted_until.is_some()).count();
    let free: Vec<usize> = (0..members.len()).filter(|i| members[*i].faulted_until.is_none()).collect();
    let may_hit = busy < members.len() / 2 && !free.is_empty();
    #[rustfmt::skip]
    let kinds: [(&str, u32); 11] = [
        ("kill", 3), ("stop", 3), ("cut", 3), ("delay", 2), ("pg-restart", 1), ("drop", 2),
        ("duplicate", 2), ("reorder", 1), ("5xx", 2), ("rate-limit", 1), ("newer", 1),
    ];
    let total: u32 = kinds.iter().map(|(_, w)| w).sum();
    let mut pick = rng.u32(0..total);
    let kind = kinds.iter().find(|(_, w)| {
        if pick < *w {
            return true;
        }
        pick -= w;
        false
    });
    let Some((kind, _)) = kind else { return Ok(None) };
    let member_fault = matches!(*kind, "kill" | "stop" | "cut" | "delay");
    if member_fault && !may_hit {
        return Ok(None);
    }
    let target = if member_fault { free[rng.usize(0..free.len())] } else { 0 };
    let sim_fault = |v: Value| async move {
        http.post(format!("{sim_url}/_sim/faults")).json(&v).send().await.map_err(|e| e.to_string()).map(|_| ())
    };
    match *kind {
        "kill" => {
            let m = &mut members[target];
            if let Some(mut child) = m.child.take() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
            // Its guests died with it: GitHub fails what their runners ran.
            runners_lost(http, sim_url, records, target).await;
            let back = now + between(rng, Duration::from_secs(1), Duration::from_secs(10));
            m.faulted_until = Some(back);
            heals.push((back, Heal::Restart(target)));
        }
        "stop" => {
            let m = &mut members[target];
            signal(m, nix::sys::signal::Signal::SIGSTOP);
            m.stopped = true;
            let back = now + args.lease + between(rng, Duration::from_secs(1), args.lease);
            m.faulted_until = Some(back);
            heals.push((back, Heal::Cont(target)));
        }
        "cut" | "delay" => {
            let m = &mut members[target];
            let mode = if *kind == "cut" {
                PgPath::Cut
            } else {
                PgPath::Delay(between(rng, Duration::from_secs(1), Duration::from_secs(30)))
            };
            m.path.send_replace(mode);
            let back = now + between(rng, Duration::from_secs(3), Duration::from_secs(40));
            m.faulted_until = Some(back);
            heals.push((back, Heal::Path(target)));
        }
        "pg-restart" => {
            if *pg_down {
                return Ok(None);
            }
            PG_DOWN.store(true, std::sync::atomic::Ordering::SeqCst);
            pg_ctl(args, "halt")?;
            *pg_down = true;
            heals.push((now + between(rng, Duration::from_secs(2), Duration::from_secs(10)), Heal::PgStart));
        }
        "drop" => sim_fault(json!({"kind": "webhook_drop", "count": rng.u32(1..=5)})).await?,
        "duplicate" => {
            sim_fault(json!({"kind": "webhook_duplicate", "count": rng.u32(1..=5), "new_guid": rng.bool()})).await?
        }
        "reorder" => sim_fault(json!({"kind": "webhook_reorder", "count": rng.u32(2..=6)})).await?,
        "5xx" => {
            let status = [500, 502, 503][rng.usize(0..3)];
            sim_fault(json!({"kind": "api_error", "status": status, "count": rng.u32(5..=30)})).await?
        }
        "rate-limit" => {
            sim_fault(
                json!({"kind": "rate_limit", "status": 429, "retry_after": rng.u64(1..=5), "count": rng.u32(3..=10)}),
            )
            .await?
        }
        "newer" => {
            if *pg_down {
                return Ok(None);
            }
            // A newer member's rows: a job whose description this agent cannot decode, and
            // fields it does not know on the queued jobs' rows.
            *newer_rows += 1;
            let id = NEWER_IDS + *newer_rows as i64;
            let c = connect(db_url, password).await?;
            c.execute(
                "INSERT INTO rv_jobs (id, state, rank, labels, repository, received_at, info, label_key) \
                 VALUES ($1, 'queued', 0, $2, 'octo-org/app', now(), $3, rv_label_key($2))",
                &[&id, &LABELS.to_vec(), &json!({"id": id, "variant": {"kind": "from-a-newer-agent"}})],
            )
            .await
            .map_err(|e| format!("newer rows: {e}"))?;
            c.batch_execute(
                "UPDATE rv_jobs SET info = info || '{\"x_newer_field\": {\"a\": 1}}' \
                 WHERE state = 'queued' AND info IS NOT NULL AND id < 9000000000000; SELECT pg_notify('rv_events', '')",
            )
            .await
            .map_err(|e| format!("newer rows: {e}"))?;
        }
        _ => return Ok(None),
    }
    Ok(Some(kind))
}

/// The ids of the rows a newer agent writes (`newer`): above github-sim's job ids.
const NEWER_IDS: i64 = 9_000_000_000_000;

/// GitHub stops hearing from the runners of member `i`'s VMs (its host died).
async fn runners_lost(http: &reqwest::Client, sim_url: &str, records: &Shared, i: usize) {
    let names: BTreeSet<String> =
        lock(records).vms.iter().filter(|(m, _, _)| *m == i).map(|(_, n, _)| n.clone()).collect();
    let Ok(runners) = get_json(http, &format!("{sim_url}/_sim/runners")).await else { return };
    for r in runners.as_array().into_iter().flatten() {
        if r["name"].as_str().is_some_and(|n| names.contains(n))
            && let Some(id) = r["id"].as_u64()
        {
            let _ = http.post(format!("{sim_url}/_sim/runners/{id}/lost")).send().await;
        }
    }
    let mut r = lock(records);
    r.domains.insert(i, 0);
    r.warm.insert(i, 0);
}

async fn sim_jobs(http: &reqwest::Client, sim_url: &str) -> Result<Vec<Value>, String> {
    Ok(get_json(http, &format!("{sim_url}/_sim/jobs")).await?.as_array().cloned().unwrap_or_default())
}

/// The job and attempt a cold VM of pool `small` was made for (`rv-small-JOB[-ATTEMPT]`).
fn job_attempt(vm: &str) -> Option<(u64, u32)> {
    let rest = vm.strip_prefix("rv-small-")?;
    let mut parts = rest.split('-');
    let job = parts.next()?.parse().ok()?;
    let attempt = parts.next().map_or(Some(1), |a| a.parse().ok())?;
    Some((job, attempt))
}

#[allow(clippy::too_many_arguments)]
async fn check(
    args: &Args,
    http: &reqwest::Client,
    sim_url: &str,
    db_url: &str,
    password: &str,
    records: &Shared,
    queued: u64,
    faults: u32,
) -> Result<bool, String> {
    let jobs = sim_jobs(http, sim_url).await?;
    let history = get_json(http, &format!("{sim_url}/_sim/runner-history")).await?;
    let mut took: HashMap<u64, Vec<String>> = HashMap::new();
    for (name, h) in history.as_object().into_iter().flatten() {
        for j in h["jobs"].as_array().into_iter().flatten().filter_map(Value::as_u64) {
            took.entry(j).or_default().push(name.clone());
        }
    }
    let completed = |j: &Value| j["status"] == "completed";
    let id = |j: &Value| j["id"].as_u64().unwrap_or(0);
    let served_once = jobs.iter().filter(|j| completed(j) && took.get(&id(j)).is_some_and(|r| r.len() == 1)).count();
    let doubles: Vec<u64> = jobs.iter().map(id).filter(|j| took.get(j).is_some_and(|r| r.len() > 1)).collect();
    let lost: Vec<u64> = jobs.iter().filter(|j| !completed(j)).map(id).collect();
    let waits: Vec<(u64, f64)> = jobs
        .iter()
        .filter_map(|j| {
            let (c, s) = (j["created_unix_ms"].as_u64()?, j["started_unix_ms"].as_u64()?);
            Some((id(j), s.saturating_sub(c) as f64 / 1000.0))
        })
        .collect();
    let max_wait = waits.iter().map(|(_, w)| *w).fold(0.0, f64::max);
    let starved: Vec<u64> =
        waits.iter().filter(|(_, w)| *w > args.starve_bound.as_secs_f64()).map(|(j, _)| *j).collect();
    let runners_left = get_json(http, &format!("{sim_url}/_sim/runners")).await?.as_array().map_or(0, |a| a.len());
    // Left: VMs of jobs, and warm VMs beyond what a member keeps.
    let (vms, vms_left) = {
        let r = lock(records);
        let extra_warm: usize = r.warm.iter().map(|(i, n)| n.saturating_sub(warm_of(args, *i))).sum();
        (r.vms.clone(), r.domains.values().sum::<usize>() + extra_warm)
    };
    // Each VM made within its member's claim of that attempt: a claim (or renewal) of it
    // written before the VM was seen, whose lease ran past that moment.
    let c = connect(db_url, password).await?;
    let rows = c
        .query(
            "SELECT job, attempt, holder, (extract(epoch FROM at) * 1000)::int8, (extract(epoch FROM lease_until) * 1000)::int8 \
             FROM chaos_claims",
            &[],
        )
        .await
        .map_err(|e| format!("chaos_claims: {e}"))?;
    let mut claims: HashMap<(u64, u32), Vec<(String, u64, u64)>> = HashMap::new();
    for r in &rows {
        let key = (r.get::<_, i64>(0) as u64, r.get::<_, i32>(1) as u32);
        claims.entry(key).or_default().push((r.get(2), r.get::<_, i64>(3) as u64, r.get::<_, i64>(4) as u64));
    }
    let mut late = Vec::new();
    for cs in claims.values_mut() {
        cs.sort_by_key(|(_, at, _)| *at);
    }
    for (m, vm, seen) in &vms {
        let Some(key) = job_attempt(vm) else { continue };
        let host = format!("chaos-{m:02}");
        // The claim's last word before the VM was defined: this member's, running past it (a
        // release ends a claim when it is written).
        let last = claims.get(&key).and_then(|cs| cs.iter().rev().find(|(_, at, _)| *at <= *seen));
        let within = last.is_some_and(|(h, _, until)| *h == host && *until >= *seen);
        if !within {
            late.push(format!("{vm} on {host}"));
        }
    }
    let leaked = runners_left + vms_left;
    // Claim latency: a delivery received by a member → its job's first claim.
    let row = c
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms) \
             FROM (SELECT (extract(epoch FROM first_claimed_at - received_at) * 1000)::float8 AS ms \
                   FROM rv_jobs WHERE first_claimed_at IS NOT NULL AND id < 9000000000000) c",
            &[],
        )
        .await
        .map_err(|e| format!("claim latency: {e}"))?;
    let ms = |i: usize| row.get::<_, Option<f64>>(i).unwrap_or(f64::NAN);
    eprintln!(
        "fleet-chaos: claim latency (delivery received → first claim): p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms",
        ms(0),
        ms(1),
        ms(2)
    );
    eprintln!(
        "fleet-chaos: {} VMs made for {} jobs; {} claims and renewals written",
        vms.len(),
        jobs.len(),
        rows.len()
    );
    for (what, list) in [("lost", &lost), ("doubles", &doubles), ("starved", &starved)] {
        if !list.is_empty() {
            eprintln!("fleet-chaos: {what}: {:?}", &list[..list.len().min(20)]);
        }
    }
    if !late.is_empty() {
        eprintln!("fleet-chaos: VMs made past their claim: {:?}", &late[..late.len().min(20)]);
    }
    if leaked > 0 {
        eprintln!("fleet-chaos: left: {vms_left} VMs, {runners_left} runners");
    }
    println!(
        "fleet-chaos: members={} jobs={} faults={faults} served_once={served_once} lost={} doubles={} starved={} leaked={leaked} late_claims={} max_queue_wait_s={max_wait:.0}",
        args.members,
        jobs.len(),
        lost.len(),
        doubles.len(),
        starved.len(),
        late.len(),
    );
    Ok(jobs.len() as u64 == queued
        && served_once == jobs.len()
        && lost.is_empty()
        && doubles.is_empty()
        && starved.is_empty()
        && leaked == 0
        && late.is_empty())
}

//! `scripts/fleet-sim`: a fleet at scale without real VMs. N members (the real `run()`,
//! each on a runtime of its own) share one real PostgreSQL and one github-sim, whose
//! deliveries a relay sends to two members each, in turn. Each member's hypervisor is a
//! fake whose "guests" do what the test image's runner does: after a boot delay they take
//! the runner files delivered over their bind port, long-poll the simulator for a job, run
//! it, report, and power off. Jobs arrive in bursts; one member is killed mid-run (its runtime dropped:
//! its tasks and connections vanish as with kill -9, its guests keep running).
//!
//! Last line: `fleet-sim: hosts=N jobs=N served_once=N doubles=0 lost=0 claim_p50=MS
//! claim_p99=MS max_host_share=P` — served_once: jobs completed by exactly one runner;
//! doubles: jobs run by more than one runner; lost: jobs not completed by the deadline;
//! claim: a job's delivery received → its first claim won (PostgreSQL's clock and the
//! receiving member's, one machine); max_host_share: the largest share of the jobs that
//! one member's runners ran. The lines before it say how many VMs were made (any runner
//! takes any job, so a VM made for a job another runner took is surplus, reaped idle) and
//! the GitHub API calls of the whole fleet. Exits 1 unless every job was served once, none
//! twice, and no member ran more than twice its fair share.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use runnervisor::hypervisor::DomainState;
use runnervisor::hypervisor::fake::FakeHypervisor;
use runnervisor::metrics::Metrics;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[path = "fleet_common/mod.rs"]
mod common;
use common::{LABELS, SECRET, connect, get_json, unix_ms};

#[derive(Parser)]
#[command(about = "Many fleet members in one process on a real PostgreSQL, fake VMs, github-sim")]
struct Args {
    #[arg(long, default_value_t = 20)]
    hosts: usize,
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    /// VMs per member.
    #[arg(long, default_value_t = 8)]
    max_vms: usize,
    /// Jobs per burst, and the pause between bursts.
    #[arg(long, default_value_t = 50)]
    burst: usize,
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    burst_every: Duration,
    /// A guest's boot, until its runner asks for a job; and a job's length.
    #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
    boot: Duration,
    #[arg(long, default_value_t = 5.0)]
    job_secs: f64,
    /// A guest's power-off, from its runner's exit until the domain stops (systemd stopping
    /// its units: a few seconds).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    poweroff: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// How many members the relay sends each delivery to.
    #[arg(long, default_value_t = 2)]
    relay_to: usize,
    /// Kill one member once this share of the jobs has been queued (none: 0).
    #[arg(long, default_value_t = 0.4)]
    kill_at: f64,
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// PostgreSQL: a role that may create databases (`postgres://USER@HOST:PORT/DB`); its
    /// password in `--password-file`. A database of its own is made and dropped.
    #[arg(long)]
    postgres: String,
    #[arg(long)]
    password_file: std::path::PathBuf,
}

/// What the fake guests saw: which member's runner ran which job, and every VM made.
#[derive(Default)]
struct World {
    ran: Vec<(usize, u64)>,
    /// The killed member: its host is gone, guests that have no job yet with it.
    dead: Option<usize>,
    /// (member, VM name), each VM once, in the order they were seen running.
    vms: Vec<(usize, String)>,
    guest_errors: Vec<String>,
}

type Shared = Arc<Mutex<World>>;

fn lock(w: &Shared) -> std::sync::MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

struct Member {
    hv: Arc<FakeHypervisor>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = std::env::var("RUST_LOG").ok().and_then(|v| v.parse::<Targets>().ok());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .finish()
        .with(filter.unwrap_or_else(|| Targets::new().with_default(tracing::Level::ERROR)))
        .init();
    match sim(args).await {
        Ok(ok) if ok => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fleet-sim: {e}");
            ExitCode::from(2)
        }
    }
}

async fn sim(args: Args) -> Result<bool, String> {
    let password = std::fs::read_to_string(&args.password_file)
        .map_err(|e| format!("{}: {e}", args.password_file.display()))?
        .trim()
        .to_string();
    let mut admin: tokio_postgres::Config = args.postgres.parse().map_err(|e| format!("--postgres: {e}"))?;
    admin.password(&password);
    let db = format!("rv_fleet_sim_{}", std::process::id());
    let (client, conn) = admin.connect(tokio_postgres::NoTls).await.map_err(|e| format!("PostgreSQL: {e}"))?;
    tokio::spawn(conn);
    client.batch_execute(&format!("CREATE DATABASE \"{db}\"")).await.map_err(|e| format!("create {db}: {e}"))?;
    let result = run_sim(&args, &db, &password).await;
    // Every member's connections are gone by now (their runtimes dropped).
    let dropped = client.batch_execute(&format!("DROP DATABASE \"{db}\" WITH (FORCE)")).await;
    if let Err(e) = dropped {
        eprintln!("fleet-sim: drop {db}: {e}");
    }
    result
}

async fn run_sim(args: &Args, db: &str, password: &str) -> Result<bool, String> {
    let pg_url = {
        let base = args.postgres.split('?').next().unwrap_or(&args.postgres);
        let (server, _) = base.rsplit_once('/').ok_or("--postgres: no database in the URL")?;
        format!("{server}/{db}?sslmode=disable")
    };
    // Listeners first: the relay needs every member's URL.
    let listeners: Vec<std::net::TcpListener> = (0..args.hosts)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let urls: Vec<String> =
        listeners.iter().map(|l| format!("http://{}/webhook", l.local_addr().expect("bound"))).collect();
    let mut sim_config = github_sim::SimConfig::new(common::PAT, SECRET);
    sim_config.webhook_url = Some(urls[0].clone());
    sim_config.fanout = urls[1..].to_vec();
    sim_config.fanout_each = Some(args.relay_to.clamp(1, args.hosts));
    // GitHub sends deliveries concurrently: at this scale one at a time would be a backlog.
    sim_config.webhook_concurrency = 8;
    let sim = github_sim::SimHandle::start(sim_config).await.map_err(|e| format!("github-sim: {e}"))?;
    let sim_url = sim.url();

    let world: Shared = Arc::default();
    let mut members = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        members.push(start_member(args, i, listener, &sim_url, &pg_url, password)?);
    }
    let stop_guests = CancellationToken::new();
    let hvs: Vec<Arc<FakeHypervisor>> = members.iter().map(|m| m.hv.clone()).collect();
    tokio::spawn(watch_guests(hvs, world.clone(), (args.boot, args.poweroff), stop_guests.clone()));
    eprintln!("fleet-sim: {} members on {db}, github-sim at {sim_url}", args.hosts);

    let http = reqwest::Client::new();
    let started = Instant::now();
    let kill_after = ((args.jobs as f64) * args.kill_at).round() as usize;
    let mut killed: Option<usize> = None;
    // The jobs the dead member held, and when it died (ms since the epoch).
    let mut orphaned: Vec<u64> = Vec::new();
    let mut killed_at: Option<u64> = None;
    let mut queued = 0;
    let mut next_report = Instant::now();
    let deadline = Instant::now() + args.deadline;
    loop {
        if queued < args.jobs {
            let n = args.burst.min(args.jobs - queued);
            for _ in 0..n {
                let body = json!({"repo": "octo-org/app", "labels": LABELS, "duration_secs": args.job_secs});
                let r =
                    http.post(format!("{sim_url}/_sim/jobs")).json(&body).send().await.map_err(|e| e.to_string())?;
                if r.status() != 201 {
                    return Err(format!("github-sim refused a job: {}", r.status()));
                }
            }
            queued += n;
        }
        if killed.is_none() && args.kill_at > 0.0 && queued >= kill_after {
            // The member holding the most queued jobs (its VMs booting) dies with its host.
            let (victim, held) = busiest_holder(&pg_url, password).await?;
            if let Some(kill) = members[victim].kill.take() {
                let _ = kill.send(());
            }
            if let Some(t) = members[victim].thread.take() {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
            killed = Some(victim);
            lock(&world).dead = Some(victim);
            eprintln!(
                "fleet-sim: t={:.0}s member sim-{victim:02} killed with its host, holding {} queued jobs",
                started.elapsed().as_secs_f64(),
                held.len()
            );
            orphaned = held;
            killed_at = Some(unix_ms());
        }
        let jobs = sim_jobs(&http, &sim_url).await?;
        let done = jobs.values().filter(|s| s.as_str() == "completed").count();
        if Instant::now() >= next_report || done == args.jobs {
            let running: usize = members.iter().map(|m| m.hv.running().len()).sum();
            eprintln!(
                "fleet-sim: t={:.0}s queued={queued} completed={done} vms_running={running}",
                started.elapsed().as_secs_f64()
            );
            next_report = Instant::now() + Duration::from_secs(5);
        }
        if done == args.jobs || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(if queued < args.jobs { args.burst_every } else { Duration::from_millis(250) }).await;
    }
    let elapsed = started.elapsed();
    let jobs = sim_jobs(&http, &sim_url).await?;
    if let Some(at) = killed_at {
        let list = sim_job_list(&http, &sim_url).await?;
        let after: Vec<String> = list
            .iter()
            .filter(|j| j["id"].as_u64().is_some_and(|id| orphaned.contains(&id)))
            .map(|j| match j["started_unix_ms"].as_u64() {
                Some(t) => format!("{:.1}", t.saturating_sub(at) as f64 / 1000.0),
                None => "never".into(),
            })
            .collect();
        eprintln!(
            "fleet-sim: the dead member's queued jobs started {after:?} s after it died (lease {:?})",
            args.lease
        );
    }

    // Claim latency and takeovers, from the fleet's database.
    let client = connect(&pg_url, password).await?;
    let row = client
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), \
               max(ms), count(*) \
             FROM (SELECT (extract(epoch FROM first_claimed_at - received_at) * 1000)::float8 AS ms \
                   FROM rv_jobs WHERE first_claimed_at IS NOT NULL) c",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let (claim_p50, claim_p99, claim_max, claimed): (Option<f64>, Option<f64>, Option<f64>, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));

    let attempts: Vec<(i32, i64)> = client
        .query("SELECT attempts, count(*) FROM rv_jobs GROUP BY 1 ORDER BY 1", &[])
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    eprintln!("fleet-sim: claims won per job (claims: jobs): {attempts:?}");
    for m in &mut members {
        m.stop.cancel();
        if let Some(t) = m.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
    stop_guests.cancel();
    let takeovers: u64 =
        members.iter().map(|m| counter(&m.metrics.render(), "runnervisor_fleet_takeovers_total")).sum();

    // GitHub API calls the fleet made, by kind (github-sim counts them).
    let stats = get_json(&http, &format!("{sim_url}/_sim/stats")).await?;
    let calls: Vec<String> = stats["api_calls"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_u64().unwrap_or(0)))
        .collect();
    eprintln!("fleet-sim: GitHub API calls in {:.0} s: {}", elapsed.as_secs_f64(), calls.join(" "));
    // How long the relay took per delivery (8 in flight at most).
    let send = common::delivery_times(&http, &sim_url).await?;
    let pct = |p: f64| common::pct(&send, p);
    eprintln!(
        "fleet-sim: {} deliveries, each to {} members: p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms, {:.0} s in all",
        send.len(),
        args.relay_to,
        pct(0.5),
        pct(0.99),
        send.last().copied().unwrap_or(0.0),
        send.iter().sum::<f64>() / 1000.0
    );
    let w = lock(&world);
    let mut ran_by: HashMap<u64, Vec<usize>> = HashMap::new();
    for (host, job) in &w.ran {
        ran_by.entry(*job).or_default().push(*host);
    }
    let completed = jobs.values().filter(|s| s.as_str() == "completed").count();
    let served_once =
        jobs.iter().filter(|(id, s)| s.as_str() == "completed" && ran_by.get(id).is_some_and(|h| h.len() == 1)).count();
    let lost = args.jobs - completed;
    // Jobs run by more than one runner (what the drills call doubles).
    let doubles = ran_by.values().filter(|hosts| hosts.len() > 1).count();
    let mut per_host = vec![0usize; args.hosts];
    for (host, _) in &w.ran {
        per_host[*host] += 1;
    }
    let max_share = per_host.iter().max().copied().unwrap_or(0) as f64 / args.jobs.max(1) as f64;
    let min_share = per_host.iter().enumerate().filter(|(i, _)| Some(*i) != killed).map(|(_, n)| *n).min().unwrap_or(0);
    for e in w.guest_errors.iter().take(5) {
        eprintln!("fleet-sim: guest error: {e}");
    }
    eprintln!(
        "fleet-sim: {:.1}s, {} VMs made for {} jobs, {claimed} jobs claimed, claim max {:.0} ms, {takeovers} taken over from the dead member, \
         jobs per member {}..{} (fair share {:.0}), guest errors {}",
        elapsed.as_secs_f64(),
        w.vms.len(),
        args.jobs,
        claim_max.unwrap_or(0.0),
        min_share,
        per_host.iter().max().copied().unwrap_or(0),
        args.jobs as f64 / args.hosts as f64,
        w.guest_errors.len(),
    );
    println!(
        "fleet-sim: hosts={} jobs={} served_once={served_once} doubles={doubles} lost={lost} claim_p50={:.0} claim_p99={:.0} max_host_share={:.1}%",
        args.hosts,
        args.jobs,
        claim_p50.unwrap_or(f64::NAN),
        claim_p99.unwrap_or(f64::NAN),
        max_share * 100.0,
    );
    // The load is spread: no member ran more than twice its fair share.
    let spread = max_share <= 2.0 / args.hosts as f64;
    if !spread {
        eprintln!(
            "fleet-sim: one member ran {:.1}% of the jobs (fair share {:.1}%)",
            max_share * 100.0,
            100.0 / args.hosts as f64
        );
    }
    Ok(served_once == args.jobs && doubles == 0 && lost == 0 && spread)
}

/// The member holding the most queued jobs, and those jobs (waits up to 2 s for one).
async fn busiest_holder(pg_url: &str, password: &str) -> Result<(usize, Vec<u64>), String> {
    let client = connect(pg_url, password).await?;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let row = client
            .query_opt(
                "SELECT holder, array_agg(id) FROM rv_jobs WHERE state = 'queued' AND holder IS NOT NULL \
                 GROUP BY 1 ORDER BY count(*) DESC LIMIT 1",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        if let Some(r) = row {
            let host: String = r.get(0);
            let i = host.trim_start_matches("sim-").parse().map_err(|_| format!("holder {host}"))?;
            return Ok((i, r.get::<_, Vec<i64>>(1).into_iter().map(|j| j as u64).collect()));
        }
        if Instant::now() >= deadline {
            return Ok((0, Vec::new()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every job of the simulator and its status.
async fn sim_jobs(http: &reqwest::Client, sim_url: &str) -> Result<BTreeMap<u64, String>, String> {
    Ok(sim_job_list(http, sim_url)
        .await?
        .into_iter()
        .filter_map(|j| Some((j["id"].as_u64()?, j["status"].as_str()?.to_string())))
        .collect())
}

async fn sim_job_list(http: &reqwest::Client, sim_url: &str) -> Result<Vec<Value>, String> {
    Ok(get_json(http, &format!("{sim_url}/_sim/jobs")).await?.as_array().cloned().unwrap_or_default())
}

fn counter(metrics: &str, name: &str) -> u64 {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0)
}

/// Member `i`: `run()` on a runtime of its own thread, with a fake hypervisor.
fn start_member(
    args: &Args,
    i: usize,
    listener: std::net::TcpListener,
    sim_url: &str,
    pg_url: &str,
    password: &str,
) -> Result<Member, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let spec = common::MemberSpec {
        dir: dir.path(),
        host_id: &format!("sim-{i:02}"),
        sim_url,
        pg_url: Some(pg_url),
        lease: args.lease,
        max_vms: args.max_vms,
        warm: 0,
    };
    let config = Arc::new(common::member_config(&spec)?);
    let (deps, hv, metrics) = common::member_deps(&config, password, sim_url, listener)?;
    let stop = CancellationToken::new();
    let (kill, killed) = tokio::sync::oneshot::channel::<()>();
    let s = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("member-{i:02}"))
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                tokio::select! {
                    r = runnervisor::run(config, deps, s) => if let Err(e) = r { eprintln!("fleet-sim: member {i}: {e}") },
                    _ = killed => {}
                }
            });
            // Killed (or stopped): whatever it still ran goes with the runtime.
            rt.shutdown_background();
        })
        .map_err(|e| e.to_string())?;
    Ok(Member { hv, metrics, stop, kill: Some(kill), thread: Some(thread), _dir: dir })
}

/// Starts a guest for each VM that comes up on any member's fake hypervisor.
async fn watch_guests(
    hvs: Vec<Arc<FakeHypervisor>>,
    world: Shared,
    (boot, poweroff): (Duration, Duration),
    stop: CancellationToken,
) {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
    let mut seen: BTreeSet<(usize, String)> = BTreeSet::new();
    while !stop.is_cancelled() {
        for (host, hv) in hvs.iter().enumerate() {
            let up: Vec<String> = {
                let s = hv.lock();
                s.domains
                    .iter()
                    .filter(|(_, (state, _))| *state == DomainState::Running)
                    .filter(|(name, _)| !seen.contains(&(host, (*name).clone())))
                    .map(|(name, _)| name.clone())
                    .collect()
            };
            for vm in up {
                seen.insert((host, vm.clone()));
                lock(&world).vms.push((host, vm.clone()));
                let (hv, world, http, stop) = (hv.clone(), world.clone(), http.clone(), stop.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        r = guest(&hv, &vm, (boot, poweroff), &http, host, &world) => if let Err(e) = r {
                            lock(&world).guest_errors.push(format!("{vm}: {e}"));
                        },
                        _ = stop.cancelled() => {}
                    }
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One fake guest of member `host` (see `common::guest`); its job is recorded as run there.
async fn guest(
    hv: &FakeHypervisor,
    vm: &str,
    times: (Duration, Duration),
    http: &reqwest::Client,
    host: usize,
    world: &Shared,
) -> Result<(), String> {
    common::guest(hv, vm, times, http, || lock(world).dead == Some(host), |id| lock(world).ran.push((host, id))).await
}

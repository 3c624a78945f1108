//! Benchmark: queued → runner online, cold path against warm path, side by side in one run
//! on real VMs (TCG here), measured at the simulator (the job's creation to its runner's
//! first poll).
//!
//! One agent, two pools with the same image and size: `cold` (every job boots its VM) and
//! `warm` (`warm = 1`: a VM waits without a credential; the job's JIT config is made and
//! delivered when it arrives). Each run: a warm job (with nothing else booting), then a
//! cold job (while the warm pool's replacement boots, as it would in production), then
//! wait until a warm VM waits again.
//!
//! `cargo bench -p runnervisor --bench warm` (needs what `./scripts/test` sets up;
//! `RV_BENCH_RUNS` runs, default 5). The last lines are
//! `bench warm: cold_p50=S warm_p50=S warm_p90=S ratio=R runs=N` and
//! `bench api: jobs=N calls_per_job=X background_per_hour=Y`: the GitHub API calls the
//! agent's metrics count over the run, per job served (warm and cold alike).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::agent::*;
use common::*;

fn percentile(v: &[f64], p: usize) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) * p + 50) / 100]
}

/// The `key=N` values of the agent's "warm vm bound" log lines, in milliseconds.
fn logged_ms(log: &str, key: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("warm vm bound"))
        .filter_map(|l| l.split(&format!("{key}=")).nth(1)?.split_whitespace().next()?.trim_matches('"').parse().ok())
        .collect()
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::var("RV_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let img = test_image();
    let mut spec = AgentSpec::new("bench-cold", &["self-hosted", "bench-cold"]);
    spec.max_vms = 1;
    // A second pool, equal but for its labels and its warm VM.
    spec.pool_extra = format!(
        "\n[[pool]]\nname = \"bench-warm\"\nlabels = [\"self-hosted\", \"bench-warm\"]\nimage = \"{}\"\nkernel = \"{}\"\n\
         initrd = \"{}\"\nvcpus = 1\nmemory_mib = 512\ndisk_gib = 4\nmax_vms = 2\nwarm = 1\n",
        img.golden.display(),
        img.kernel.display(),
        img.initrd.display()
    );
    let webhook_port = free_port();
    let sim = Sim::start(Some(format!("http://127.0.0.1:{webhook_port}/webhook")), |_| {}).await;
    let mut agent = Agent::configure(&spec, sim.handle.addr.port(), webhook_port);
    agent.start().await;
    let agent_started = std::time::Instant::now();
    let (hv, _) = libvirt();
    let waiting = "runnervisor_vms{pool=\"bench-warm\",state=\"waiting\"} 1\n";
    let wait_warm = async |agent: &Agent| {
        wait_for("a warm VM waiting", VM_TIMEOUT, async || agent.metrics().await.contains(waiting).then_some(())).await
    };
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for i in 0..runs {
        wait_warm(&agent).await;
        let job = sim.queue("octo-org/app", &["self-hosted", "bench-warm"], 1.0).await;
        sim.wait_completed(job, VM_TIMEOUT).await;
        let (secs, runner) = sim.queued_to_online(job).await;
        assert!(runner.starts_with("rv-bench-warm-w"), "a warm VM took it: {runner}");
        warm.push(secs);
        let job = sim.queue("octo-org/app", &["self-hosted", "bench-cold"], 1.0).await;
        sim.wait_completed(job, VM_TIMEOUT).await;
        let (c, runner) = sim.queued_to_online(job).await;
        assert_eq!(runner, format!("rv-bench-cold-{job}"));
        cold.push(c);
        eprintln!("run {}/{runs}: warm {secs:.2}s cold {c:.1}s", i + 1);
        wait_for("the cold VM gone", Duration::from_secs(120), async || {
            leftovers(&hv, "rv-bench-cold-").0.is_empty().then_some(())
        })
        .await;
    }
    assert!(agent.cli(&["drain"]).status.success());
    wait_for("everything cleaned", Duration::from_secs(120), async || {
        let (d, v) = leftovers(&hv, "rv-bench-");
        (d.is_empty() && v.is_empty()).then_some(())
    })
    .await;
    let log = agent.log_text();
    let (credential, delivery) = (logged_ms(&log, "credential_ms"), logged_ms(&log, "delivery_ms"));
    let api = api_calls(&agent.metrics().await);
    let api_hours = agent_started.elapsed().as_secs_f64() / 3600.0;
    assert!(agent.terminate().success());

    let (cold_p50, warm_p50, warm_p90) = (percentile(&cold, 50), percentile(&warm, 50), percentile(&warm, 90));
    assert!(!credential.is_empty() && !delivery.is_empty(), "no 'warm vm bound' lines with timings in the agent's log");
    let agent_ms = percentile(&credential, 50) + percentile(&delivery, 50);
    println!(
        "queued -> runner online, {runs} runs each ({} domains, {} build)",
        domain_type().as_str(),
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    println!("  cold (boot per job):       p50 {cold_p50:.1} s, p90 {:.1} s", percentile(&cold, 90));
    println!("  warm (credential on bind): p50 {warm_p50:.2} s, p90 {warm_p90:.2} s");
    println!(
        "  warm breakdown (p50): agent {agent_ms:.0} ms (credential {:.1} ms + delivery until the guest's ack {:.1} ms); \
         webhook and guest runner start {:.2} s",
        percentile(&credential, 50),
        percentile(&delivery, 50),
        warm_p50 - agent_ms / 1000.0
    );
    // The API budget, from the agent's own metrics: the periodic sync's calls (runner list,
    // the hook's delivery log, redeliveries, the runner group) are background; the rest is
    // spent on jobs.
    let jobs = 2 * runs;
    println!("GitHub API calls by endpoint over the run ({jobs} jobs, {:.1} min):", api_hours * 60.0);
    let (mut per_job, mut background) = (0u64, 0u64);
    for (endpoint, n) in &api {
        let periodic = is_background(endpoint);
        println!("  {n:>5}  {endpoint}{}", if periodic { "  (background)" } else { "" });
        if periodic { background += n } else { per_job += n }
    }
    println!(
        "  background: {background} calls, {:.0} per hour at github_interval = 10 s (the tests' setting; 60 s by default: a sixth)",
        background as f64 / api_hours
    );
    println!(
        "bench warm: cold_p50={cold_p50:.1} warm_p50={warm_p50:.2} warm_p90={warm_p90:.2} ratio={:.1} runs={runs}",
        cold_p50 / warm_p50
    );
    println!(
        "bench api: jobs={jobs} calls_per_job={:.2} background_per_hour={:.0}",
        per_job as f64 / jobs as f64,
        background as f64 / api_hours
    );
}

/// `runnervisor_github_api_calls_total` by endpoint (statuses summed).
fn api_calls(metrics: &str) -> std::collections::BTreeMap<String, u64> {
    let mut calls = std::collections::BTreeMap::new();
    for line in metrics.lines().filter(|l| l.starts_with("runnervisor_github_api_calls_total{")) {
        let endpoint = line.split("endpoint=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
        let n: u64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0);
        *calls.entry(endpoint.to_string()).or_insert(0) += n;
    }
    calls
}

/// Endpoints the periodic sync calls whatever the number of jobs.
fn is_background(endpoint: &str) -> bool {
    endpoint == "GET /orgs/octo-org/actions/runners"
        || endpoint.contains("/hooks/")
        || endpoint.contains("/runner-groups")
}

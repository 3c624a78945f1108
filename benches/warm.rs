//! Benchmark: queued → runner online, cold path, warm path and restored path side by side
//! in one run on real VMs (TCG here), measured at the simulator (the job's creation to its
//! runner's first poll).
//!
//! One agent, three pools with the same image and size: `cold` (every job boots its VM),
//! `warm` (`warm = 1`: a VM waits without a credential; the job's JIT config is made and
//! delivered when it arrives) and `slot` (`snapshot_slots = 1`: a VM saved once its guest
//! waited, nothing running; a job's VM is restored from it onto a fresh overlay, then bound
//! as a cold VM is). Each run: with a warm VM waiting and the slot saved, a restored job
//! (nothing else booting), then a warm job, then a cold job (while the warm pool's
//! replacement boots, as it would in production).
//!
//! `cargo bench -p runnervisor --bench warm` (needs what `./scripts/test` sets up;
//! `RV_BENCH_RUNS` runs, default 5). The last lines are
//! `bench snapshot: cold_p50=S warm_p50=S restore_p50=S restore_p90=S idle_vms=N slot_disk_mib=M runs=N`,
//! `bench warm: cold_p50=S warm_p50=S warm_p90=S ratio=R runs=N` and
//! `bench api: jobs=N calls_per_job=X background_per_hour=Y`: the GitHub API calls the
//! agent's metrics count over the run, per job served (warm and cold alike), and
//! `bench api scale-set: jobs=N calls_per_job=X long_polls_per_hour=Y warm_p50=S`: a fourth
//! pool, `bench-set`, is a runner scale set with a warm VM (no webhook serves it): the
//! Actions service's calls per job (acquire, JIT config, acknowledgements), its long polls
//! and sessions apart, and its job's message → runner online (the simulator offers a job
//! to the set when it is queued); then a burst of its jobs queued together, whose calls
//! per job are `burst_calls_per_job` (GitHub groups the messages of jobs that come together).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::agent::*;
use common::*;
use runnervisor::hypervisor::Hypervisor;

fn percentile(v: &[f64], p: usize) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) * p + 50) / 100]
}

/// The `key=N` values of the agent's log lines that contain `what` (`TEXT|VM`: and the
/// VM name prefix), in milliseconds.
fn logged_ms(log: &str, what: &str, key: &str) -> Vec<f64> {
    let (what, vm) = what.split_once('|').unwrap_or((what, ""));
    log.lines()
        .filter(|l| l.contains(what) && l.contains(vm))
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
         initrd = \"{}\"\nvcpus = 1\nmemory_mib = 512\ndisk_gib = 4\nmax_vms = 2\nwarm = 1\n\
         \n[[pool]]\nname = \"bench-slot\"\nlabels = [\"self-hosted\", \"bench-slot\"]\nimage = \"{0}\"\nkernel = \"{1}\"\n\
         initrd = \"{2}\"\nvcpus = 1\nmemory_mib = 512\ndisk_gib = 4\nmax_vms = 1\nsnapshot_slots = 1\n\
         \n[[pool]]\nname = \"bench-set\"\nlabels = [\"self-hosted\", \"bench-set\"]\nimage = \"{0}\"\nkernel = \"{1}\"\n\
         initrd = \"{2}\"\nvcpus = 1\nmemory_mib = 512\ndisk_gib = 4\nmax_vms = 2\nwarm = 1\nintake = \"scale_set\"\n",
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
    let slot_ready = "runnervisor_slots_ready{pool=\"bench-slot\"} 1\n";
    let wait_slot = async |agent: &Agent| {
        wait_for("the slot saved", VM_TIMEOUT, async || agent.metrics().await.contains(slot_ready).then_some(())).await
    };
    let set_waiting = "runnervisor_vms{pool=\"bench-set\",state=\"waiting\"} 1\n";
    let wait_set = async |agent: &Agent| {
        wait_for("the scale set's warm VM waiting", VM_TIMEOUT, async || {
            agent.metrics().await.contains(set_waiting).then_some(())
        })
        .await
    };
    let (mut cold, mut warm, mut restore, mut set) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut idle_vms, mut slot_disk) = (0, 0u64);
    for i in 0..runs {
        wait_warm(&agent).await;
        wait_slot(&agent).await;
        // What a waiting slot holds: no domain running, its saved state and disk on the pool.
        idle_vms = idle_vms.max(leftovers(&hv, "rv-bench-slot-").0.len());
        slot_disk = ["rv-bench-slot-s0.save", "rv-bench-slot-s0.qcow2"]
            .iter()
            .map(|v| std::fs::metadata(hv.volume_path(v).unwrap()).map(|m| m.len()).unwrap_or(0))
            .sum();
        let job = sim.queue("octo-org/app", &["self-hosted", "bench-slot"], 1.0).await;
        sim.wait_completed(job, VM_TIMEOUT).await;
        let (r, runner) = sim.queued_to_online(job).await;
        assert_eq!(runner, format!("rv-bench-slot-{job}"), "restored for the job, named for it");
        restore.push(r);
        let job = sim.queue("octo-org/app", &["self-hosted", "bench-warm"], 1.0).await;
        sim.wait_completed(job, VM_TIMEOUT).await;
        let (secs, runner) = sim.queued_to_online(job).await;
        assert!(runner.starts_with("rv-bench-warm-w"), "a warm VM took it: {runner}");
        warm.push(secs);
        // The scale set's job (`runs-on: bench-set`), taken by its warm VM, as the warm job
        // was: with nothing booting (the warm pool's replacement waits).
        wait_set(&agent).await;
        wait_warm(&agent).await;
        let job = sim.queue("octo-org/app", &["bench-set"], 1.0).await;
        sim.wait_completed(job, VM_TIMEOUT).await;
        let (s, runner) = sim.queued_to_online(job).await;
        assert!(runner.starts_with("rv-bench-set-w"), "the set's warm VM took it: {runner}");
        set.push(s);
        let job = sim.queue("octo-org/app", &["self-hosted", "bench-cold"], 1.0).await;
        sim.wait_completed(job, VM_TIMEOUT).await;
        let (c, runner) = sim.queued_to_online(job).await;
        assert_eq!(runner, format!("rv-bench-cold-{job}"));
        cold.push(c);
        eprintln!("run {}/{runs}: restored {r:.2}s warm {secs:.2}s scale set (warm) {s:.2}s cold {c:.1}s", i + 1);
        wait_for("the cold VM gone", Duration::from_secs(120), async || {
            leftovers(&hv, "rv-bench-cold-").0.is_empty().then_some(())
        })
        .await;
    }
    // A burst of the set's jobs queued together (GitHub groups their messages): the set's
    // calls per job then, long polls and sessions apart.
    wait_set(&agent).await;
    let before = set_job_calls(&api_calls(&agent.metrics().await));
    let mut burst = Vec::new();
    for _ in 0..BURST {
        burst.push(sim.queue("octo-org/app", &["bench-set"], 1.0).await);
    }
    for job in &burst {
        sim.wait_completed(*job, VM_TIMEOUT * 3).await;
    }
    let burst_calls = set_job_calls(&api_calls(&agent.metrics().await)) - before;
    eprintln!("burst of {BURST} scale set jobs: {burst_calls} calls");
    assert!(agent.cli(&["drain"]).status.success());
    // Drained, only the saved slot stays (it holds no VM; a restart would use it).
    let slot = "rv-bench-slot-s0";
    wait_for("everything cleaned but the slot", Duration::from_secs(120), async || {
        let (d, v) = leftovers(&hv, "rv-bench-");
        (d.is_empty() && v.iter().all(|v| v.starts_with(slot))).then_some(())
    })
    .await;
    let log = agent.log_text();
    let bound = "warm vm bound";
    let (credential, delivery) = (logged_ms(&log, bound, "credential_ms"), logged_ms(&log, bound, "delivery_ms"));
    // The restored path's parts: the restore (the provisioning of a restored VM), the
    // guest seen waiting, the binding (credential and delivery, as for a cold VM).
    let restores = logged_ms(&log, "restored from slot", "duration_ms");
    let cold_bound = "vm bound to its job|rv-bench-slot-";
    let (r_credential, r_delivery) =
        (logged_ms(&log, cold_bound, "credential_ms"), logged_ms(&log, cold_bound, "delivery_ms"));
    let api = api_calls(&agent.metrics().await);
    let api_hours = agent_started.elapsed().as_secs_f64() / 3600.0;
    assert!(agent.terminate().success());
    assert!(hv.teardown(slot).is_empty(), "the slot's volumes removed");
    let _ = hv.release_address(NETWORK, slot);

    let (cold_p50, warm_p50, warm_p90) = (percentile(&cold, 50), percentile(&warm, 50), percentile(&warm, 90));
    let (restore_p50, restore_p90) = (percentile(&restore, 50), percentile(&restore, 90));
    assert!(!restores.is_empty(), "no 'restored from slot' lines with timings in the agent's log");
    assert!(!r_credential.is_empty() && !r_delivery.is_empty(), "no binding lines of restored VMs in the agent's log");
    assert!(!credential.is_empty() && !delivery.is_empty(), "no 'warm vm bound' lines with timings in the agent's log");
    let agent_ms = percentile(&credential, 50) + percentile(&delivery, 50);
    println!(
        "queued -> runner online, {runs} runs each ({} domains, {} build)",
        domain_type().as_str(),
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    println!("  cold (boot per job):       p50 {cold_p50:.1} s, p90 {:.1} s", percentile(&cold, 90));
    println!("  warm (credential on bind): p50 {warm_p50:.2} s, p90 {warm_p90:.2} s");
    println!("  restored (from a slot):    p50 {restore_p50:.2} s, p90 {restore_p90:.2} s");
    let bind_ms = percentile(&r_credential, 50) + percentile(&r_delivery, 50);
    println!(
        "  restored breakdown (p50): restore (overlay, fence, libvirt restore) {:.0} ms; bind {bind_ms:.0} ms; \
         webhook, guest seen waiting and runner start {:.2} s",
        percentile(&restores, 50),
        restore_p50 - (percentile(&restores, 50) + bind_ms) / 1000.0
    );
    println!(
        "  a waiting slot: {idle_vms} domains running, {} MiB on the storage pool (saved state and disk)",
        slot_disk >> 20
    );
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
    let jobs = 3 * runs;
    println!(
        "GitHub API calls by endpoint over the run ({} jobs, {:.1} min):",
        4 * runs + BURST as usize,
        api_hours * 60.0
    );
    let (mut per_job, mut background, mut polls) = (0u64, 0u64, 0u64);
    // The burst's apart (counted above).
    let set_per_job = set_job_calls(&api) - burst_calls;
    for (endpoint, n) in &api {
        let periodic = is_background(endpoint);
        let what = if endpoint.contains(" scale set ") {
            if is_long_poll(endpoint) {
                polls += n;
                "  (scale set: long poll)"
            } else if set_background(endpoint) {
                "  (scale set: background)"
            } else {
                "  (scale set: per job)"
            }
        } else if periodic {
            background += n;
            "  (background)"
        } else {
            per_job += n;
            ""
        };
        println!("  {n:>5}  {endpoint}{what}");
    }
    println!(
        "  background: {background} calls, {:.0} per hour at github_interval = 10 s (the tests' setting; 60 s by default: a sixth)",
        background as f64 / api_hours
    );
    println!(
        "bench snapshot: cold_p50={cold_p50:.1} warm_p50={warm_p50:.2} restore_p50={restore_p50:.2} \
         restore_p90={restore_p90:.2} idle_vms={idle_vms} slot_disk_mib={} runs={runs}",
        slot_disk >> 20
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
    println!(
        "bench api scale-set: jobs={runs} calls_per_job={:.2} burst_jobs={BURST} burst_calls_per_job={:.2} \
         long_polls_per_hour={:.0} warm_p50={:.2} warm_p90={:.2}",
        set_per_job as f64 / runs as f64,
        burst_calls as f64 / BURST as f64,
        polls as f64 / api_hours,
        percentile(&set, 50),
        percentile(&set, 90)
    );
}

/// The scale set's jobs queued together at the end.
const BURST: u64 = 4;

fn is_long_poll(endpoint: &str) -> bool {
    endpoint.contains("message queue") && endpoint.starts_with("GET")
}

/// The scale set's calls spent on jobs (acquisitions, JIT configs, acknowledgements).
fn set_job_calls(api: &std::collections::BTreeMap<String, u64>) -> u64 {
    api.iter()
        .filter(|(e, _)| e.contains(" scale set ") && !is_long_poll(e) && !set_background(e))
        .map(|(_, n)| n)
        .sum()
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

/// The scale set's calls made whatever the number of jobs: the exchange for the service's
/// token, the set found or made, its session.
fn set_background(endpoint: &str) -> bool {
    endpoint.contains("runner-registration") || endpoint.contains("/sessions") || endpoint.ends_with("runnerscalesets")
}

/// Endpoints the periodic sync calls whatever the number of jobs.
fn is_background(endpoint: &str) -> bool {
    endpoint == "GET /orgs/octo-org/actions/runners"
        // The scale set client's, for the Actions service's token (every pool here is JIT).
        || endpoint.contains("registration-token")
        || endpoint.contains("/hooks/")
        || endpoint.contains("/runner-groups")
}

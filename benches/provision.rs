//! Benchmark: the agent's provisioning overhead against the bare libvirt work, in pairs.
//!
//! - direct: create the overlay and the seed through the storage API, define and start the
//!   domain (what provisioning must do at least), timed in this process;
//! - agent: github-sim queues a job and sends the signed webhook; the `runnervisor` binary
//!   verifies, persists, schedules, fetches a JIT config and does the same libvirt work;
//!   timed from queueing the job to libvirt's "started" lifecycle event for its domain.
//!
//! The two alternate (direct, agent, direct, agent, …) so that the noise of a shared
//! machine hits both alike, and the figure is the median of the paired differences.
//!
//! `cargo bench -p runnervisor --bench provision` (needs what `./scripts/test` sets up;
//! `RV_BENCH_PAIRS` pairs, default 30). The last line is
//! `bench overhead: direct_p50=MS agent_p50=MS ratio=R`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::agent::*;
use common::*;
use runnervisor::hypervisor::{HvEvent, Hypervisor};

/// The `p`-th percentile (nearest rank) of `v`.
fn percentile(v: &[f64], p: usize) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) * p + 50) / 100]
}

#[tokio::main]
async fn main() {
    let pairs: usize = std::env::var("RV_BENCH_PAIRS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let img = test_image();
    let (hv, mut events) = libvirt();

    // Direct: the same storage-API and domain calls, no agent, on the same fenced network
    // (the filter is defined once, as the agent does).
    let network = fenced_network("rv-bench-direct-fence", 1);
    let fence = TestFence::up(&hv, &network);
    let direct_run = |i: usize| {
        let name = format!("rv-bench-direct-{}-{i}", unique());
        let t = Instant::now();
        let overlay = hv.create_overlay(&name, &img.golden, 4 << 30).unwrap();
        let image = test_seed(&hv, &name);
        let seed_path = hv.create_seed(&name, &image).unwrap();
        let console_log = console_dir().join(format!("{name}.log"));
        let xml = test_domain_xml(&hv, &name, &overlay, &seed_path, &console_log, i as u64, &network);
        hv.define(&name, &xml).unwrap();
        hv.start(&name).unwrap();
        let took = t.elapsed().as_secs_f64() * 1000.0;
        assert!(hv.teardown(&name).is_empty());
        hv.release_address(NETWORK, &name).unwrap();
        took
    };

    // Agent: webhook to domain started.
    let spec = AgentSpec::new("bench", &["self-hosted", "bench"]);
    let webhook_port = free_port();
    let sim = Sim::start(Some(format!("http://127.0.0.1:{webhook_port}/webhook")), |_| {}).await;
    let mut agent = Agent::configure(&spec, sim.handle.addr.port(), webhook_port);
    agent.start().await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (mut direct, mut via_agent) = (Vec::new(), Vec::new());
    for i in 0..pairs {
        direct.push(direct_run(i));
        while events.try_recv().is_ok() {}
        let t = Instant::now();
        let job = sim.queue("octo-org/app", &["self-hosted", "bench"], 1.0).await;
        let name = format!("rv-bench-{job}");
        loop {
            match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
                Ok(Some(HvEvent::Started(n))) if n == name => break,
                Ok(Some(_)) => {}
                other => panic!("no start event for {name}: {other:?}\n{}", agent.log_tail()),
            }
        }
        via_agent.push(t.elapsed().as_secs_f64() * 1000.0);
        // Cancel, then remove the VM through the agent, as an operator would.
        sim.http.post(format!("{}/_sim/jobs/{job}/cancel", sim.url())).send().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let out = agent.cli(&["vm", "destroy", &name]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        wait_for("teardown", Duration::from_secs(30), async || leftovers(&hv, "rv-bench-").0.is_empty().then_some(()))
            .await;
    }
    drop(fence);
    assert!(agent.terminate().success());

    let diffs: Vec<f64> = via_agent.iter().zip(&direct).map(|(a, d)| a - d).collect();
    let (dm, am) = (percentile(&direct, 50), percentile(&via_agent, 50));
    println!(
        "provisioning, {pairs} pairs ({} domains, {} build)",
        domain_type().as_str(),
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    println!(
        "  direct libvirt calls (overlay, seed, define, start): p50 {dm:.1} ms, p90 {:.1} ms",
        percentile(&direct, 90)
    );
    println!(
        "  runnervisor (webhook -> domain started):             p50 {am:.1} ms, p90 {:.1} ms",
        percentile(&via_agent, 90)
    );
    println!(
        "  agent - direct, paired: p50 {:.1} ms (p25 {:.1}, p75 {:.1}, min {:.1}, max {:.1})",
        percentile(&diffs, 50),
        percentile(&diffs, 25),
        percentile(&diffs, 75),
        percentile(&diffs, 0),
        percentile(&diffs, 100)
    );
    println!("bench overhead: direct_p50={dm:.1} agent_p50={am:.1} ratio={:.2}", am / dm);
}

//! Benchmark: webhook ingest and the agent's memory, against the `runnervisor` binary
//! (release build) with its real store, on loopback.
//!
//! - memory with tracked jobs: the agent is drained (no VM starts), 1,000 `queued` jobs
//!   for its pool arrive, and its RSS is read once the scheduler has them all and the agent
//!   has settled;
//! - ingest: the project's load generator (`tests/common/load.rs`, on this machine's same
//!   cores) sends signed ~1.6 KB `workflow_job` deliveries over keep-alive connections,
//!   labels matching no pool so nothing boots; each is answered only once it is durable.
//!   Rate and latency at 1, 16 and 64 connections (64 three times: the median run counts);
//! - memory after 100,000 deliveries seen (the ingest runs count towards them).
//!
//! `cargo bench -p runnervisor --bench ingest` (needs what `./scripts/test` sets up:
//! libvirt, the test image). The last lines are
//! `bench ingest: conns=64 rate=N/s p50=MS p99=MS` and
//! `bench memory: jobs=1000 rss_mib=X deliveries=100000 rss_mib=Y`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::agent::*;
use common::load::{self, Load};
use common::*;

const SECONDS: u64 = 5;
const DELIVERIES: u64 = 100_000;

/// A `/proc/PID/status` figure in MiB (`VmRSS`, `RssAnon`, `RssFile`).
fn status_mib(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb / 1024.0
}

fn rss_mib(pid: u32) -> f64 {
    let rss = status_mib(pid, "VmRSS");
    eprintln!(
        "  rss {rss:.1} MiB: anon {:.1}, file {:.1}, threads {}",
        status_mib(pid, "RssAnon"),
        status_mib(pid, "RssFile"),
        std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
    );
    rss
}

/// Lets the agent settle before its RSS is read: past its next heap trim (the freed memory
/// of the load it just took goes back to the kernel then, see `runnervisor::heap`).
async fn settle() {
    tokio::time::sleep(runnervisor::heap::TRIM_EVERY + Duration::from_secs(1)).await;
}

/// The value of the metric line starting with `name` (0 if absent).
async fn metric(agent: &Agent, name: &str) -> u64 {
    let text = agent.metrics().await;
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut spec = AgentSpec::new("bench-ingest", &["self-hosted", "bench-ingest"]);
    spec.log_level = "info".into();
    // Every connection comes from 127.0.0.1, as from a reverse proxy in front of the agent:
    // the per-source cap (16 by default) raised to the connections the load opens.
    spec.server_extra = "max_connections_per_source = 64".into();
    let webhook_port = free_port();
    let sim = Sim::start(Some(format!("http://127.0.0.1:{webhook_port}/webhook")), |_| {}).await;
    let mut agent = Agent::configure(&spec, sim.handle.addr.port(), webhook_port);
    agent.start().await;
    let pid = agent.child.as_ref().unwrap().id();
    let addr: SocketAddr = format!("127.0.0.1:{webhook_port}").parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    assert!(agent.cli(&["drain"]).status.success());
    settle().await;
    let idle = rss_mib(pid);

    // 1,000 tracked jobs (drained: they wait, nothing boots).
    let tracked = Load {
        addr,
        conns: 8,
        duration: Duration::from_secs(120),
        max: 1000,
        labels: vec!["self-hosted".into(), "bench-ingest".into()],
        tag: "tracked".into(),
    };
    let out = load::run(&tracked, stop.clone()).await;
    assert_eq!(out.answered(202), 1000, "every tracked job accepted");
    let received = "runnervisor_jobs_received_total{pool=\"bench-ingest\"}";
    wait_for("the scheduler tracks 1000 jobs", Duration::from_secs(60), async || {
        (metric(&agent, received).await == 1000).then_some(())
    })
    .await;
    settle().await;
    let rss_jobs = rss_mib(pid);

    // Ingest, deliveries for jobs no pool serves.
    let unmatched = |conns: usize, duration: Duration, max: u64, tag: &str| Load {
        addr,
        conns,
        duration,
        max,
        labels: vec!["self-hosted".into(), "no-such-pool".into()],
        tag: tag.into(),
    };
    let mut seen = 1000u64;
    let warmup = load::run(&unmatched(64, Duration::from_secs(1), u64::MAX, "warmup"), stop.clone()).await;
    seen += warmup.sent.len() as u64;
    // 64 connections three times (this shared machine's noise moves a 5 s run by ±10 %):
    // the run with the median rate makes the line.
    let mut at64 = Vec::new();
    for conns in [1, 16, 64, 64, 64] {
        let out = load::run(
            &unmatched(conns, Duration::from_secs(SECONDS), u64::MAX, &format!("c{conns}-{seen}")),
            stop.clone(),
        )
        .await;
        let (ok, all) = (out.answered(202), out.sent.len());
        assert_eq!(ok, all, "every delivery accepted at {conns} connections");
        seen += all as u64;
        println!(
            "ingest {conns:>2} connections: {:>6.0} deliveries/s  p50 {:.2} ms  p99 {:.2} ms  ({all} in {:.1} s)",
            out.rate(),
            out.latency_ms(50),
            out.latency_ms(99),
            out.elapsed.as_secs_f64()
        );
        if conns == 64 {
            at64.push((out.rate(), out.latency_ms(50), out.latency_ms(99)));
        }
    }
    at64.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (rate, p50, p99) = at64[at64.len() / 2];
    let line = format!("bench ingest: conns=64 rate={rate:.0}/s p50={p50:.2} p99={p99:.2}");

    // Up to 100,000 deliveries seen, then memory once the scheduler has applied them all.
    if seen < DELIVERIES {
        let rest = load::run(&unmatched(64, Duration::from_secs(600), DELIVERIES - seen, "rest"), stop.clone()).await;
        seen += rest.sent.len() as u64;
    }
    let unmatched_total = seen - 1000;
    wait_for("the scheduler applied every delivery", Duration::from_secs(120), async || {
        (metric(&agent, "runnervisor_jobs_unmatched_total").await >= unmatched_total).then_some(())
    })
    .await;
    settle().await;
    let rss_deliveries = rss_mib(pid);
    println!(
        "memory: idle {idle:.1} MiB, 1000 tracked jobs {rss_jobs:.1} MiB, {seen} deliveries seen {rss_deliveries:.1} MiB"
    );
    assert!(agent.terminate().success());
    println!("{line}");
    println!("bench memory: jobs=1000 rss_mib={rss_jobs:.1} deliveries={seen} rss_mib={rss_deliveries:.1}");
}

//! The snapshot slots shared by the real-VM tests and drills whose subject is not a VM's
//! boot: their VMs are restored from two slots of one pool, [`POOL`] (one pool name, image
//! and shape), which the first of them makes (two boots and saves, 40 s to a minute) and each
//! later one adopts from the storage pool. The test agent's cleanup spares saved slots
//! ([`super::agent::AgentSpec::keep_slots`]); `scripts/drill` removes them at its end, and
//! `./scripts/test` at its own (`scripts/drill clean-slots`). One agent of the pool at a
//! time, across processes ([`take`] holds a file lock): a slot serves one VM at a time.

use std::time::{Duration, Instant};

use super::agent::{Agent, AgentSpec, free_port};
use super::{Sim, VM_TIMEOUT, wait_for};

/// The pool of the shared slots (`rv-d-slots-s<n>`).
pub const POOL: &str = "d-slots";
pub const SLOTS: usize = 2;

/// What makes a pool's agent keep [`SLOTS`] slots of [`POOL`] that outlive it.
pub fn spec(spec: &mut AgentSpec) {
    assert_eq!(spec.pool, POOL, "shared slots are the pool {POOL}'s");
    spec.keep_slots = true;
    spec.pool_extra.push_str(&format!("\nsnapshot_slots = {SLOTS}\n"));
    spec.max_vms = spec.max_vms.max(SLOTS);
}

/// The shared slots, held: no other test or drill runs an agent of [`POOL`] until it is
/// dropped (or its process ends).
pub struct Held {
    _lock: std::fs::File,
    /// "adopted" or "made", and how long that took.
    pub how: String,
}

/// Waits for the shared slots to be free, then has an agent of the pool's plain settings
/// adopt them (a few seconds), or remove what is not right of them (a slot of an older
/// image, one whose making was cut short) and make them: a test's own timers (a short
/// `max_lifetime` or `registration_timeout`) are meant for restored VMs, not for a boot.
pub async fn take(who: &str) -> Held {
    let path = std::env::temp_dir().join("runnervisor-test-shared-slots.lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).unwrap();
    let waited = Instant::now();
    let file = tokio::task::spawn_blocking(move || {
        file.lock().unwrap();
        file
    })
    .await
    .unwrap();
    if waited.elapsed() > Duration::from_secs(1) {
        eprintln!("{who}: waited {:.0}s for the shared snapshot slots", waited.elapsed().as_secs_f64());
    }
    let started = Instant::now();
    let mut s = AgentSpec::new(POOL, &["self-hosted", "shared-slots"]);
    spec(&mut s);
    let webhook_port = free_port();
    let sim = Sim::start(Some(format!("http://127.0.0.1:{webhook_port}/webhook")), |_| {}).await;
    let mut agent = Agent::configure(&s, sim.handle.addr.port(), webhook_port);
    eprintln!("{who}: the shared snapshot slots adopted or made (agent log {})", agent.log.display());
    agent.start().await;
    let ready = format!("runnervisor_slots_ready{{pool=\"{POOL}\"}} {SLOTS}");
    wait_for("the shared snapshot slots saved", 2 * VM_TIMEOUT, async || {
        agent.metrics().await.lines().any(|l| l == ready).then_some(())
    })
    .await;
    let made = agent.log_text().matches("snapshot slot saved").count();
    let how = format!("{} in {:.0}s", if made > 0 { "made" } else { "adopted" }, started.elapsed().as_secs_f64());
    eprintln!("{who}: shared snapshot slots ready ({made} made) in {:.0}s", started.elapsed().as_secs_f64());
    Held { _lock: file, how }
}

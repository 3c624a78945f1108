//! Liveness: a panic, a hang or a failing store never stops the agent.

use super::*;

/// The scheduler's store whose commits fail while `FAIL` is set (the harness's own
/// store, for the intake, is unaffected).
struct FlakyStore {
    inner: Arc<Store>,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

impl SchedulerStore for FlakyStore {
    fn load(&self) -> Result<crate::store::Snapshot, StoreError> {
        self.inner.load()
    }
    fn inbox(&self, after: u64, max: usize) -> Result<Vec<(u64, JobEvent)>, StoreError> {
        self.inner.inbox(after, max)
    }
    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Encode(serde_json::from_str::<u8>("x").unwrap_err()));
        }
        self.inner.commit(batch)
    }
    fn delivery_seen(&self, guid: &str) -> Result<bool, StoreError> {
        self.inner.delivery_seen(guid)
    }
    fn prune_deliveries(&self, age: Duration, now: SystemTime) -> Result<usize, StoreError> {
        self.inner.prune_deliveries(age, now)
    }
}

/// The harness over a [`FlakyStore`] that fails until the flag returned is cleared.
fn failing_store() -> (H, Arc<std::sync::atomic::AtomicBool>) {
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = fail.clone();
    let wrap: Box<dyn FnOnce(Arc<Store>) -> Arc<dyn SchedulerStore>> =
        Box::new(move |inner| Arc::new(FlakyStore { inner, fail: flag }));
    (harness_full("", |_| {}, |_| {}, |_| {}, Some(wrap)), fail)
}

#[tokio::test(start_paused = true)]
async fn a_panicking_provisioning_task_is_a_failure_not_a_hang() {
    let mut h = harness_full(
        "",
        |_| {},
        |_| {},
        |hv| {
            hv.panics.insert("start", 1);
        },
        None,
    );
    h.deliver(JobAction::Queued, info(601, LABELS, None));
    // The first VM's provisioning panicked: reported as failed, torn down, and the job
    // gets another VM once the back-off passes.
    let s = h.wait("a second VM", |_, hv| hv.running() == ["rv-small-601-2"]).await;
    assert_eq!(s.vms.len(), 1, "the first VM is gone: {s:#?}");
    let m = h.metrics.render();
    assert!(m.contains(r#"runnervisor_provision_failures_total{pool="small",step="task"} 1"#), "{m}");
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_sweep_does_not_stop_sweeps() {
    // The first sweep panics; without a report no sweep would ever run again and libvirt
    // would never count as ready.
    let mut h = harness_full(
        "",
        |_| {},
        |_| {},
        |hv| {
            hv.panics.insert("list_vms", 1);
        },
        None,
    );
    h.deliver(JobAction::Queued, info(611, LABELS, None));
    h.wait("a VM after the next sweep", |_, hv| hv.running().len() == 1).await;
    assert_eq!(h.hv.lock().panics["list_vms"], 0, "the panic happened");
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_teardown_is_retried() {
    let mut h = harness_full(
        "",
        |_| {},
        |_| {},
        |hv| {
            hv.panics.insert("teardown", 1);
        },
        None,
    );
    h.deliver(JobAction::Queued, info(621, LABELS, None));
    h.wait("a VM", |_, hv| hv.running().len() == 1).await;
    h.run_job_on("rv-small-621", 621);
    // The retry comes after TEARDOWN_RETRY (10 s).
    h.wait_for("the teardown retried", Duration::from_secs(30), |s, hv| {
        s.vms.is_empty() && hv.lock().domains.is_empty()
    })
    .await;
    assert!(h.metrics.render().contains("runnervisor_teardown_failures_total 1\n"), "{}", h.metrics.render());
    h.shutdown().await;
}

/// An agent whose first VM start hangs (until `release_stalled`), with `provision_timeout`
/// and `tweak` applied.
fn stalled_start(provision_timeout: Duration, tweak: impl FnOnce(&mut Config)) -> H {
    harness_full(
        "",
        |_| {},
        |c| {
            c.reconcile.provision_timeout = provision_timeout;
            tweak(c);
        },
        |hv| hv.stall_starts = 1,
        None,
    )
}

#[tokio::test(start_paused = true)]
async fn a_provisioning_past_its_deadline_fails_its_attempt_and_goes_once_its_call_returns() {
    let mut h = stalled_start(Duration::from_secs(2), |_| {});
    h.deliver(JobAction::Queued, info(631, LABELS, None));
    // The job gets another VM where the pool has room (2); the hung one holds its place.
    let s = h.wait_advancing("another VM after the deadline", |_, hv| hv.running() == ["rv-small-631-2"]).await;
    assert!(s.vms.iter().any(|v| v.name == "rv-small-631" && v.state == "provisioning"), "{s:#?}");
    assert_eq!(s.queued.len(), 1, "the job stays queued: {s:#?}");
    let m = h.metrics.render();
    assert!(m.contains(r#"runnervisor_provision_failures_total{pool="small",step="timeout"} 1"#), "{m}");
    // The hung call returns at last: the VM it made goes.
    h.hv.lock().release_stalled = true;
    h.wait("nothing of the hung VM left", |s, hv| {
        !hv.lock().domains.contains_key("rv-small-631") && s.vms.iter().all(|v| v.name != "rv-small-631")
    })
    .await;
    let m = h.metrics.render();
    assert!(m.contains(r#"runnervisor_teardowns_total{reason="provision_timeout"} 1"#), "{m}");
    h.shutdown().await;
}

/// Past its deadline, a provisioning whose libvirt call is still under way holds its place
/// (the call may yet make its domain): the job's next VM comes once that VM is torn down,
/// never beside it (the simulator found a pool one VM over `max_vms` so).
#[tokio::test(start_paused = true)]
async fn a_provisioning_past_its_deadline_holds_its_place_until_its_call_returns() {
    let mut h = stalled_start(Duration::from_secs(2), |c| c.pools[0].max_vms = 1);
    h.deliver(JobAction::Queued, info(632, LABELS, None));
    // Past the deadline, short of the second one: the hung VM stays, nothing beside it.
    let s = h.advance_for(Duration::from_secs(3)).await;
    let names: Vec<&str> = s.vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["rv-small-632"], "{s:#?}");
    assert_eq!(s.vms[0].going.as_deref(), Some("provision_timeout"), "the status says it goes");
    assert!(h.metrics.render().contains(r#"runnervisor_provision_failures_total{pool="small",step="timeout"} 1"#));
    // The call returns (its domain starts): it is torn down, then the job's next VM comes.
    h.hv.lock().release_stalled = true;
    h.wait_advancing("the job's next VM", |_, hv| hv.running() == ["rv-small-632-2"]).await;
    assert_eq!(h.hv.lock().peak_running, 1, "never two VMs of a pool of one");
    h.shutdown().await;
}

/// A VM doomed while its provisioning hangs (its job cancelled, then surplus past
/// `idle_timeout`) whose deadline then passes: the timeout is counted once, not at every
/// pass (each pass backed the pool off anew).
#[tokio::test(start_paused = true)]
async fn a_doomed_provisioning_that_times_out_is_counted_once() {
    let mut h = stalled_start(Duration::from_secs(10), |c| c.pools[0].idle_timeout = Duration::from_secs(1));
    h.deliver(JobAction::Queued, info(633, LABELS, None));
    h.wait_advancing("its VM provisioning", |s, _| s.vms.iter().any(|v| v.name == "rv-small-633")).await;
    h.complete(633, None, "cancelled");
    h.advance_for(Duration::from_secs(40)).await;
    let m = h.metrics.render();
    assert!(m.contains("runnervisor_provision_failures_total{pool=\"small\",step=\"timeout\"} 1\n"), "{m}");
    h.hv.lock().release_stalled = true;
    h.wait("the hung VM gone", |s, hv| s.vms.is_empty() && hv.lock().domains.is_empty()).await;
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn no_vm_is_made_while_its_record_cannot_be_persisted() {
    let (mut h, fail) = failing_store();
    h.deliver(JobAction::Queued, info(641, LABELS, None));
    h.wait("the refusal", |_, _| {
        h.metrics.render().contains(r#"runnervisor_provision_failures_total{pool="small",step="store"}"#)
    })
    .await;
    // The refusal happens before anything is spawned: nothing can be on its way.
    {
        let hv = h.hv.lock();
        assert!(hv.domains.is_empty() && hv.volumes.is_empty(), "nothing made: {:?}", hv.volumes);
    }
    assert!(h.gh.lock().calls.iter().all(|c| !c.starts_with("jit")), "no credential: {:?}", h.gh.lock().calls);
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    h.wait("a VM once the store works", |_, hv| hv.running().len() == 1).await;
    h.shutdown().await;
}

/// A store that keeps refusing the scheduler's commits (a full file system) is logged once
/// a minute, not at every turn of the scheduler (1,037 lines in 5 minutes before).
#[tokio::test(start_paused = true)]
async fn a_store_that_keeps_failing_is_logged_once_a_minute() {
    let (logs, _caught) = LogBuf::catch();
    let (mut h, fail) = failing_store();
    h.deliver(JobAction::Queued, info(651, LABELS, None));
    h.advance_for(Duration::from_secs(150)).await;
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    // Once the pool's back-off (a minute by then) has passed.
    h.wait_for("a VM once the store works", Duration::from_secs(120), |_, hv| hv.running().len() == 1).await;
    h.shutdown().await;
    let failing = logs.saying("cannot persist scheduler state").len();
    assert!((3..=4).contains(&failing), "{failing} lines in 150 s");
}

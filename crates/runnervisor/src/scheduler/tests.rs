//! Scheduler logic against the fake GitHub and fake hypervisor.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use tokio::sync::mpsc::UnboundedSender;

use super::*;
use crate::admin::proto::{Reply as AdminReply, Status};
use crate::github::fake::FakeGitHub;
use crate::hypervisor::fake::FakeHypervisor;
use crate::hypervisor::{HvEvent, Hypervisor};
use crate::model::{JobAction, JobEvent, JobInfo, JobRec, JobState, VmRec};
use crate::store::{Batch, SchedulerStore, Store, StoreError};

const LABELS: &[&str] = &["self-hosted", "linux"];

fn config(extra_pool: &str, dir: &std::path::Path) -> Arc<Config> {
    let text = format!(
        r#"
        state_dir = "{}"
        [server]
        listen = "127.0.0.1:0"
        [github]
        organization = "octo-org"
        auth = {{ type = "pat", token = {{ file = "/x" }} }}
        webhook_secret = {{ file = "/y" }}
        [reconcile]
        sweep_interval = "1s"
        github_interval = "5s"
        stop_grace = "2s"
        [[pool]]
        name = "small"
        labels = ["self-hosted", "Linux"]
        image = "/dev/null"
        max_vms = 2
        {extra_pool}
        "#,
        dir.display()
    );
    Arc::new(Config::parse(&text).unwrap())
}

struct H {
    metrics: Arc<Metrics>,
    gh: Arc<FakeGitHub>,
    hv: Arc<FakeHypervisor>,
    store: Arc<Store>,
    inbox: Arc<Notify>,
    tx: UnboundedSender<Event>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    seq: u64,
    /// The state dir and the image, removed when the harness goes.
    dirs: Vec<crate::test_support::TempDir>,
}

/// A fake image: check_image reads a qcow2 header, so write one.
fn fake_image(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("golden.qcow2");
    let mut header = b"QFI\xfb".to_vec();
    header.resize(24, 0);
    header.extend_from_slice(&(1u64 << 30).to_be_bytes());
    std::fs::write(&p, header).unwrap();
    p
}

fn start(
    cfg: Arc<Config>,
    gh: Arc<FakeGitHub>,
    hv: Arc<FakeHypervisor>,
    hv_rx: Option<UnboundedReceiver<HvEvent>>,
    store: Arc<Store>,
) -> H {
    start_on(cfg, gh, hv, hv_rx, store.clone(), store)
}

/// [`start`] with the scheduler on its own view of the store (e.g. one that fails).
fn start_on(
    cfg: Arc<Config>,
    gh: Arc<FakeGitHub>,
    hv: Arc<FakeHypervisor>,
    hv_rx: Option<UnboundedReceiver<HvEvent>>,
    store: Arc<Store>,
    scheduler_store: Arc<dyn SchedulerStore>,
) -> H {
    let (tx, rx) = mpsc::unbounded_channel();
    if let Some(mut hv_rx) = hv_rx {
        let fwd = tx.clone();
        tokio::spawn(async move {
            while let Some(e) = hv_rx.recv().await {
                let _ = fwd.send(Event::Hv(e));
            }
        });
    }
    let inbox = Arc::new(Notify::new());
    let metrics = Arc::new(Metrics::default());
    let s =
        Scheduler::new(cfg, gh.clone(), hv.clone(), scheduler_store, metrics.clone(), inbox.clone(), tx.clone(), rx)
            .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(s.run(stop.clone(), None));
    H { metrics, gh, hv, store, inbox, tx, stop, task, seq: 0, dirs: Vec::new() }
}

fn harness(extra_pool: &str) -> H {
    harness_with(extra_pool, |_| {})
}

fn harness_with(extra_pool: &str, with_image: impl FnOnce(&std::path::Path)) -> H {
    harness_tweaked(extra_pool, with_image, |_| {})
}

/// A harness whose config is changed by `tweak` (after parsing: no validation).
fn harness_tweaked(extra_pool: &str, with_image: impl FnOnce(&std::path::Path), tweak: impl FnOnce(&mut Config)) -> H {
    harness_full(extra_pool, with_image, tweak, |_| {}, None)
}

/// A harness whose fake hypervisor is set up by `hv_setup` before the scheduler starts,
/// and whose scheduler uses `store` (wrapping the harness's own) when given.
fn harness_full(
    extra_pool: &str,
    with_image: impl FnOnce(&std::path::Path),
    tweak: impl FnOnce(&mut Config),
    hv_setup: impl FnOnce(&mut crate::hypervisor::fake::FakeState),
    wrap_store: Option<Box<dyn FnOnce(Arc<Store>) -> Arc<dyn SchedulerStore>>>,
) -> H {
    let dir = crate::test_support::tempdir();
    let img = fake_image(&dir);
    with_image(&img);
    let extra = format!("{extra_pool}\n");
    let cfg = config(&extra, &dir);
    let mut cfg = (*cfg).clone();
    cfg.pools[0].image = img;
    tweak(&mut cfg);
    let (hv_tx, hv_rx) = mpsc::unbounded_channel();
    let hv = Arc::new(FakeHypervisor::new(hv_tx.clone()));
    hv_setup(&mut hv.lock());
    let _ = hv_tx.send(HvEvent::Reconnected);
    let store = Arc::new(Store::open(&dir).unwrap());
    let scheduler_store = match wrap_store {
        Some(wrap) => wrap(store.clone()),
        None => store.clone(),
    };
    let mut h = start_on(Arc::new(cfg), Arc::new(FakeGitHub::default()), hv, Some(hv_rx), store, scheduler_store);
    h.dirs.push(dir);
    h
}

fn info(id: u64, labels: &[&str], runner: Option<&str>) -> JobInfo {
    JobInfo {
        id,
        run_id: 1,
        run_attempt: 1,
        name: "build".into(),
        workflow_name: "CI".into(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        repository: "octo-org/app".into(),
        html_url: String::new(),
        runner_name: runner.map(str::to_string),
        conclusion: None,
    }
}

impl H {
    fn deliver_as(&mut self, delivery: &str, action: JobAction, job: JobInfo) -> bool {
        let ok = self
            .store
            .accept(&JobEvent { delivery: delivery.into(), action, job, received_at: SystemTime::now() })
            .unwrap();
        self.inbox.notify_one();
        ok
    }
    fn deliver(&mut self, action: JobAction, job: JobInfo) {
        self.seq += 1;
        let d = format!("d{}", self.seq);
        self.deliver_as(&d, action, job);
    }
    async fn status(&self) -> Status {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Event::Admin(AdminCommand::Status, tx)).ok().unwrap();
        match rx.await.unwrap() {
            AdminReply::Status(s) => s,
            other => panic!("{other:?}"),
        }
    }
    async fn admin(&self, cmd: AdminCommand) -> AdminReply {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Event::Admin(cmd, tx)).ok().unwrap();
        rx.await.unwrap()
    }
    async fn wait(&self, what: &str, f: impl Fn(&Status, &FakeHypervisor) -> bool) -> Status {
        self.wait_for(what, Duration::from_secs(10), f).await
    }
    async fn wait_for(&self, what: &str, limit: Duration, f: impl Fn(&Status, &FakeHypervisor) -> bool) -> Status {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let s = self.status().await;
            if f(&s, &self.hv) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}: {:#?}", self.status().await);
    }
    /// Job `id`, queued while the hypervisor is in trouble, has no VM and stays queued for
    /// `hold`; once `heal` has run, it gets one. Returns the status seen while it was held.
    async fn job_held_until(&mut self, id: u64, hold: Duration, heal: impl FnOnce(&H)) -> Status {
        self.deliver(JobAction::Queued, info(id, LABELS, None));
        tokio::time::sleep(hold).await;
        let held = self.status().await;
        assert!(held.vms.is_empty() && held.queued.len() == 1, "{held:#?}");
        heal(self);
        self.wait("a VM once the hypervisor is well again", |_, hv| hv.running().len() == 1).await;
        held
    }
    /// The runner of `vm` takes job `id`, finishes it, and the guest powers off.
    fn run_job_on(&mut self, vm: &str, id: u64) {
        self.deliver(JobAction::InProgress, info(id, LABELS, Some(vm)));
        let mut done = info(id, LABELS, Some(vm));
        done.conclusion = Some("success".into());
        self.deliver(JobAction::Completed, done);
        self.hv.stop(vm);
    }
    async fn shutdown(self) -> (Arc<FakeGitHub>, Arc<FakeHypervisor>, Arc<Store>) {
        self.stop.cancel();
        self.task.await.unwrap();
        (self.gh, self.hv, self.store)
    }
}

fn vm_for(s: &Status, job: u64) -> Option<String> {
    s.vms.iter().find(|v| v.job_id == job).map(|v| v.name.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_get_vms_fifo_within_capacity_and_everything_is_cleaned() {
    let mut h = harness("");
    for id in [11, 12, 13] {
        h.deliver(JobAction::Queued, info(id, &["Self-Hosted", "linux"], None));
    }
    let s = h.wait("two VMs", |_, hv| hv.running().len() == 2).await;
    assert!(vm_for(&s, 11).is_some() && vm_for(&s, 12).is_some(), "oldest first: {s:#?}");
    assert!(vm_for(&s, 13).is_none(), "capacity 2");
    assert_eq!(s.pools[0].queued, 3);
    let vm11 = vm_for(&s, 11).unwrap();
    assert_eq!(vm11, "rv-small-11");
    // The seed went through the hypervisor seam with a JIT credential for this VM.
    assert!(h.hv.lock().seeds.contains_key(&vm11));
    // The VM sits behind the fence: the default network, an isolated port, the nwfilter
    // defined from the config, trusting the network's own DHCP server.
    {
        let hv = h.hv.lock();
        let xml = &hv.domains[&vm11].1;
        assert!(xml.contains("<source network=\"runnervisor\"/>"), "{xml}");
        assert!(xml.contains("<filterref filter=\"runnervisor-fence\">") && xml.contains("<port isolated=\"yes\"/>"));
        assert!(xml.contains("name=\"DHCPSERVER\" value=\"198.51.100.1\""), "{xml}");
        let filter = &hv.filters["runnervisor-fence"];
        assert!(filter.contains("clean-traffic") && filter.contains("dstipaddr=\"169.254.0.0\""), "{filter}");
    }
    h.run_job_on(&vm11, 11);
    let s = h.wait("job 13 gets a VM", |s, _| vm_for(s, 13).is_some()).await;
    assert!(s.vms.iter().all(|v| v.name != vm11), "vm 11 torn down");
    let vm12 = vm_for(&s, 12).unwrap();
    let vm13 = vm_for(&s, 13).unwrap();
    h.run_job_on(&vm12, 12);
    h.run_job_on(&vm13, 13);
    h.wait("all gone", |s, hv| s.vms.is_empty() && hv.lock().domains.is_empty()).await;
    let (gh, hv, _) = h.shutdown().await;
    let st = hv.lock();
    assert!(st.volumes.is_empty(), "{:?}", st.volumes);
    assert!(st.seeds_removed.is_empty(), "JIT seeds are not hot-unplugged");
    assert_eq!(st.peak_running, 2);
    assert_eq!(st.started_total, 3);
    assert!(gh.runner_names().is_empty(), "runner registrations deleted: {:?}", gh.runner_names());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_runner_may_take_any_job_counting_not_binding() {
    let mut h = harness("");
    h.deliver(JobAction::Queued, info(21, LABELS, None));
    h.deliver(JobAction::Queued, info(22, LABELS, None));
    h.wait("two VMs", |_, hv| hv.running().len() == 2).await;
    // The VM made for 21 runs job 22: job 21 still needs a runner and keeps the other VM.
    h.run_job_on("rv-small-21", 22);
    let s = h.wait("vm for 21 gone", |s, _| s.vms.iter().all(|v| v.name != "rv-small-21")).await;
    assert_eq!(s.vms.len(), 1, "no extra VM: the VM made for 22 serves 21: {s:#?}");
    h.run_job_on("rv-small-22", 21);
    h.wait("all served", |s, hv| s.vms.is_empty() && s.queued.is_empty() && hv.lock().domains.is_empty()).await;
    let (_, hv, _) = h.shutdown().await;
    assert_eq!(hv.lock().started_total, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_labels_duplicates_and_reordering_make_no_extra_vm() {
    let mut h = harness("");
    h.deliver(JobAction::Queued, info(31, &["self-hosted", "gpu"], None));
    h.deliver(JobAction::Queued, info(32, &["self-hosted"], None));
    // completed before queued: never provisioned.
    let mut c = info(33, LABELS, None);
    c.conclusion = Some("cancelled".into());
    h.deliver(JobAction::Completed, c);
    h.deliver(JobAction::Queued, info(33, LABELS, None));
    // The same delivery twice is accepted once; the same job under two deliveries once.
    assert!(h.deliver_as("same", JobAction::Queued, info(34, LABELS, None)));
    assert!(!h.deliver_as("same", JobAction::Queued, info(34, LABELS, None)));
    h.deliver(JobAction::Queued, info(34, LABELS, None));
    let s = h.wait("one VM", |_, hv| hv.running().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s2 = h.status().await;
    assert_eq!(s2.vms.len(), 1, "{s:#?}");
    assert_eq!(s2.vms[0].job_id, 34);
    assert_eq!(s2.queued.len(), 1);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_makes_its_vm_surplus_and_it_is_reaped() {
    let mut h = harness("idle_timeout = \"1s\"");
    h.deliver(JobAction::Queued, info(41, LABELS, None));
    h.wait("a VM", |_, hv| hv.running().len() == 1).await;
    let mut c = info(41, LABELS, None);
    c.conclusion = Some("cancelled".into());
    h.deliver(JobAction::Completed, c);
    h.wait("surplus VM reaped", |s, hv| s.vms.is_empty() && hv.lock().domains.is_empty()).await;
    let (gh, _, _) = h.shutdown().await;
    assert!(gh.runner_names().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_failures_back_off_and_the_job_is_still_served() {
    let mut h = harness("");
    h.gh.lock().fail_next = 2;
    h.deliver(JobAction::Queued, info(51, LABELS, None));
    let s = h.wait("a VM despite API errors", |_, hv| hv.running().len() == 1).await;
    assert!(vm_for(&s, 51).unwrap().starts_with("rv-small-51"));
    assert_eq!(s.queued.len(), 1, "the job was never dropped");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_dying_before_a_job_are_retried_then_the_job_is_given_up() {
    let mut h = harness("max_attempts = 2");
    h.deliver(JobAction::Queued, info(61, LABELS, None));
    h.wait("first VM", |_, hv| hv.running() == ["rv-small-61"]).await;
    h.hv.stop("rv-small-61");
    h.wait("second VM", |_, hv| hv.running() == ["rv-small-61-2"]).await;
    h.hv.stop("rv-small-61-2");
    let s = h.wait("given up", |s, hv| s.queued.is_empty() && s.vms.is_empty() && hv.lock().domains.is_empty()).await;
    assert!(s.vms.is_empty());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, hv, _) = h.shutdown().await;
    assert_eq!(hv.lock().started_total, 2, "no third VM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_paused_on_a_full_disk_are_torn_down_without_giving_the_job_up() {
    let mut h = harness("max_attempts = 2");
    h.deliver(JobAction::Queued, info(65, LABELS, None));
    h.wait("first VM", |_, hv| hv.running() == ["rv-small-65"]).await;
    // As many pauses as max_attempts (stops would give the job up), one seen by its event,
    // one found by the sweep alone.
    h.hv.io_pause("rv-small-65", true);
    h.wait("second VM", |_, hv| hv.running() == ["rv-small-65-2"]).await;
    h.hv.io_pause("rv-small-65-2", false);
    let s = h.wait("third VM", |_, hv| hv.running() == ["rv-small-65-3"]).await;
    assert_eq!(s.queued.len(), 1, "the job is still queued: {s:#?}");
    assert_eq!(h.hv.lock().domains.len(), 1, "the paused domains are gone");
    let teardowns = h.metrics.render();
    assert!(teardowns.contains(r#"runnervisor_teardowns_total{reason="disk_error"} 2"#), "{teardowns}");
    h.run_job_on("rv-small-65-3", 65);
    h.wait("served", |s, _| s.queued.is_empty() && s.vms.is_empty()).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirt_outage_defers_provisioning_without_losing_jobs() {
    let mut h = harness("");
    h.hv.lock().unavailable = true;
    let _ = h.tx.send(Event::Hv(HvEvent::Disconnected));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = h
        .job_held_until(71, Duration::from_millis(1500), |h| {
            h.hv.lock().unavailable = false;
            let _ = h.tx.send(Event::Hv(HvEvent::Reconnected));
        })
        .await;
    assert!(!held.libvirt_connected, "{held:#?}");
    assert!(held.hypervisor_problem.as_deref().is_some_and(|p| p.contains("not reachable")), "{held:#?}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_new_vms_and_survives_restart() {
    let mut h = harness("");
    assert!(matches!(h.admin(AdminCommand::Drain(true)).await, AdminReply::Ok(_)));
    h.deliver(JobAction::Queued, info(81, LABELS, None));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(h.hv.running().is_empty());
    let cfg = h.store.load().unwrap();
    assert_eq!(cfg.meta["draining"], b"1");
    assert!(matches!(h.admin(AdminCommand::DestroyVm("rv-nope-1".into())).await, AdminReply::Error(_)));
    assert!(matches!(h.admin(AdminCommand::Drain(false)).await, AdminReply::Ok(_)));
    h.wait("VM after undrain", |_, hv| hv.running().len() == 1).await;
    assert!(matches!(h.admin(AdminCommand::DestroyVm("rv-small-81".into())).await, AdminReply::Ok(_)));
    h.wait("operator destroy", |s, _| s.vms.iter().all(|v| v.name != "rv-small-81")).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_adopts_running_vms_and_recovers_interrupted_provisioning() {
    let mut h = harness("");
    h.deliver(JobAction::Queued, info(91, LABELS, None));
    h.wait("a VM", |_, hv| hv.running().len() == 1).await;
    let (gh, hv, store) = h.shutdown().await;
    // Simulate a crash mid-provisioning of a second job: a record, a volume and a runner
    // exist, no domain.
    let now = SystemTime::now();
    let job = JobRec {
        info: info(92, LABELS, None),
        pool: Some("small".into()),
        state: JobState::Queued,
        received_at: now,
        vms_made: 1,
        failed_vms: 0,
        updated_at: now,
    };
    let vm = VmRec {
        name: "rv-small-92".into(),
        pool: "small".into(),
        job_id: 92,
        run_id: 1,
        repository: "octo-org/app".into(),
        job_url: String::new(),
        runner_id: None,
        state: VmState::Provisioning,
        created_at: now,
        state_since: now,
        took_job: None,
        seed_removed: false,
        reap: None,
    };
    store.commit(&Batch { jobs: vec![job], vms: vec![vm], ..Default::default() }).unwrap();
    hv.lock().volumes.insert("rv-small-92.qcow2".into());
    GitHub::generate_jit_config(&*gh, "rv-small-92", &[], 1).await.unwrap();
    // An orphan domain of ours with no record at all, not running.
    hv.define("rv-small-99", "<domain/>").unwrap();

    let dir = crate::test_support::tempdir();
    let cfg = config("", &dir);
    let mut cfg = (*cfg).clone();
    cfg.pools[0].image = fake_image(&dir);
    let mut h = start(Arc::new(cfg), gh, hv.clone(), None, store);
    h.dirs.push(dir);
    let _ = h.tx.send(Event::Hv(HvEvent::Reconnected));
    let s = h
        .wait("recovered", |_, hv| {
            hv.running().contains(&"rv-small-91".to_string())
                && hv.running().iter().any(|n| n.starts_with("rv-small-92-"))
                && !hv.lock().domains.contains_key("rv-small-99")
        })
        .await;
    assert!(s.vms.iter().any(|v| v.name == "rv-small-91" && v.state == "booting"), "adopted: {s:#?}");
    assert!(!hv.lock().volumes.contains("rv-small-92.qcow2"), "interrupted VM's volume removed");
    let (gh, _, _) = h.shutdown().await;
    assert!(!gh.runner_names().contains(&"rv-small-92".to_string()), "interrupted VM's runner removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_declaring_an_old_runner_is_reported() {
    let h = harness_with("runner_max_age = \"10d\"", |img| {
        let manifest = crate::images::manifest_path(img);
        std::fs::write(manifest, r#"{"runner_version": "2.300.0", "runner_released": "2020-01-01"}"#).unwrap();
    });
    h.wait("the warning", |_, _| h.metrics.image_runner_outdated.get_or_create(&metrics::pool("small")).get() == 1)
        .await;
    h.shutdown().await;
    let fresh = harness("");
    fresh.wait("a sweep", |s, _| s.libvirt_connected).await;
    assert_eq!(
        fresh.metrics.image_runner_outdated.get_or_create(&metrics::pool("small")).get(),
        0,
        "no manifest, no warning"
    );
    fresh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_storage_pool_holds_jobs_until_it_is_back() {
    let mut h = harness("");
    h.hv.lock().pool_missing = true;
    let _ = h.tx.send(Event::Hv(HvEvent::Reconnected));
    // (Not `!libvirt_connected`: that holds before the first sweep too.)
    let s = h.wait("the pool to be found missing", |s, _| s.hypervisor_problem.is_some()).await;
    assert!(!s.libvirt_connected);
    // libvirt answers: what is wrong is the pool, and status says so.
    assert!(s.hypervisor_problem.as_deref().is_some_and(|p| p.contains("storage pool")), "{s:#?}");
    h.job_held_until(101, Duration::from_millis(2500), |h| h.hv.lock().pool_missing = false).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_network_holds_jobs_and_never_falls_back_to_an_open_one() {
    let mut h = harness("");
    h.hv.lock().network_missing = true;
    let held = h.job_held_until(101, Duration::from_millis(2500), |h| h.hv.lock().network_missing = false).await;
    assert!(held.vms.is_empty());
    // No credential was made while the fence was down: the first JIT config came after.
    let (gh, hv, _) = h.shutdown().await;
    assert_eq!(gh.lock().calls.iter().filter(|c| c.starts_with("jit")).count(), 1, "{:?}", gh.lock().calls);
    let hv = hv.lock();
    let (_, xml) = hv.domains.values().next().unwrap();
    assert!(xml.contains("<filterref filter=\"runnervisor-fence\">"), "{xml}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_scope_polls_queued_jobs_whose_webhooks_were_missed() {
    let dir = crate::test_support::tempdir();
    let img = fake_image(&dir);
    let cfg = config("", &dir);
    let mut cfg = (*cfg).clone();
    cfg.pools[0].image = img;
    cfg.github.organization = None;
    cfg.github.repository = Some("octo-org/app".into());
    let (hv_tx, hv_rx) = mpsc::unbounded_channel();
    let hv = Arc::new(FakeHypervisor::new(hv_tx.clone()));
    let _ = hv_tx.send(HvEvent::Reconnected);
    let gh = Arc::new(FakeGitHub::default());
    gh.lock().queued.push(info(111, LABELS, None));
    let store = Arc::new(Store::open(&dir).unwrap());
    let mut h = start(Arc::new(cfg), gh, hv, Some(hv_rx), store);
    h.dirs.push(dir);
    let s = h.wait("a VM for the polled job", |_, hv| hv.running() == ["rv-small-111"]).await;
    assert_eq!(s.queued[0].job_id, 111);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_no_pool_serves_are_counted_not_kept() {
    let mut h = harness("");
    for id in 200..205 {
        h.deliver(JobAction::Queued, info(id, &["self-hosted", "gpu"], None));
    }
    h.deliver(JobAction::Queued, info(210, LABELS, None));
    let s = h.wait("the matching job tracked", |s, _| s.queued.iter().any(|q| q.job_id == 210)).await;
    assert_eq!(s.queued.len(), 1, "only the matching job is tracked: {s:#?}");
    assert!(h.metrics.render().contains("runnervisor_jobs_unmatched_total 5\n"), "{}", h.metrics.render());
    let (_, _, store) = h.shutdown().await;
    let snap = store.load().unwrap();
    assert!(snap.jobs.keys().all(|id| *id == 210), "unmatched jobs are not stored: {:?}", snap.jobs.keys());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_github_answers_404_for_is_dropped() {
    // Drained: the job gets no VM and stays queued until the GitHub sync asks about it
    // (after two sync intervals without news); the fake GitHub does not know it.
    let mut h = harness("");
    assert!(matches!(h.admin(AdminCommand::Drain(true)).await, AdminReply::Ok(_)));
    h.deliver(JobAction::Queued, info(301, LABELS, None));
    h.wait("job queued", |s, _| s.queued.len() == 1).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let s = h.status().await;
        if s.queued.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the unknown job was kept: {s:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(h.gh.lock().calls.iter().any(|c| c.starts_with("job")), "{:?}", h.gh.lock().calls);
    let (_, _, store) = h.shutdown().await;
    let snap = store.load().unwrap();
    let j = &snap.jobs[&301];
    assert!(
        matches!(&j.state, JobState::Completed { conclusion, .. } if conclusion.as_deref() == Some("not_found")),
        "{:?}",
        j.state
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mode_seeds_are_removed_once_the_runner_is_online() {
    let mut h = harness("registration = \"token\"");
    h.deliver(JobAction::Queued, info(401, LABELS, None));
    let s = h.wait("a VM", |_, hv| hv.running().len() == 1).await;
    let vm = vm_for(&s, 401).unwrap();
    let seed = crate::hypervisor::seed_volume_name(&vm);
    assert!(h.hv.lock().volumes.contains(&seed));
    assert!(h.hv.lock().seeds_removed.is_empty(), "kept while the runner has not registered");
    h.deliver(JobAction::InProgress, info(401, LABELS, Some(&vm)));
    h.wait("the seed removed", |_, hv| hv.lock().seeds_removed == [vm.clone()]).await;
    assert!(!h.hv.lock().volumes.contains(&seed));
    let (_, hv, store) = h.shutdown().await;
    assert!(store.load().unwrap().vms[&vm].seed_removed, "remembered across restarts");
    assert_eq!(hv.lock().seeds_removed.len(), 1, "once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_repository_cannot_take_every_slot_and_the_host_cap_holds() {
    let mut h = harness_tweaked("max_vms_per_repository = 1", |_| {}, |c| c.pools[0].max_vms = 3);
    // A matrix of one repository, then one job of another: the other gets a VM at once.
    for id in 501..=503 {
        h.deliver(JobAction::Queued, info(id, LABELS, None));
    }
    let mut other = info(504, LABELS, None);
    other.repository = "octo-org/other".into();
    h.deliver(JobAction::Queued, other);
    let s = h.wait("one VM per repository", |s, hv| s.queued.len() == 4 && hv.running().len() == 2).await;
    assert!(vm_for(&s, 501).is_some() && vm_for(&s, 504).is_some(), "{s:#?}");
    assert!(vm_for(&s, 502).is_none() && vm_for(&s, 503).is_none(), "{s:#?}");
    h.shutdown().await;

    // The host-wide cap binds below the pool's max_vms.
    let mut h = harness_tweaked(
        "",
        |_| {},
        |c| {
            c.pools[0].max_vms = 3;
            c.capacity.max_vms = Some(1);
        },
    );
    for id in 511..=513 {
        h.deliver(JobAction::Queued, info(id, LABELS, None));
    }
    h.wait("one VM", |s, hv| s.queued.len() == 3 && hv.running().len() == 1).await;
    // VM records are made synchronously when the loop reconciles, which it did after
    // every event so far: no second VM is on its way.
    let s = h.status().await;
    assert_eq!(s.vms.len(), 1, "capacity.max_vms = 1: {s:#?}");
    let (_, hv, _) = h.shutdown().await;
    assert_eq!(hv.lock().peak_running, 1);
}

// ---- liveness: a panic, a hang or a failing store never stops the agent ----

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
    fn inbox(&self) -> Result<Vec<(u64, JobEvent)>, StoreError> {
        self.inner.inbox()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioning_that_never_reports_is_torn_down_at_its_deadline() {
    let mut h = harness_full(
        "",
        |_| {},
        |c| c.reconcile.provision_timeout = Duration::from_secs(2),
        |hv| hv.stall_starts = 1,
        None,
    );
    h.deliver(JobAction::Queued, info(631, LABELS, None));
    let s = h.wait("another VM after the deadline", |_, hv| hv.running() == ["rv-small-631-2"]).await;
    assert!(s.vms.iter().all(|v| v.name != "rv-small-631"), "the hung one is gone: {s:#?}");
    assert_eq!(s.queued.len(), 1, "the job stays queued: {s:#?}");
    let m = h.metrics.render();
    assert!(m.contains(r#"runnervisor_provision_failures_total{pool="small",step="timeout"} 1"#), "{m}");
    assert!(m.contains(r#"runnervisor_teardowns_total{reason="provision_timeout"} 1"#), "{m}");
    // The hung call returns at last: what it would still make is not kept.
    h.hv.lock().release_stalled = true;
    h.wait("nothing of the hung VM left", |_, hv| !hv.lock().domains.contains_key("rv-small-631")).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_vm_is_made_while_its_record_cannot_be_persisted() {
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = fail.clone();
    let wrap: Box<dyn FnOnce(Arc<Store>) -> Arc<dyn SchedulerStore>> =
        Box::new(move |inner| Arc::new(FlakyStore { inner, fail: flag }));
    let mut h = harness_full("", |_| {}, |_| {}, |_| {}, Some(wrap));
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

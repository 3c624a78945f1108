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
use crate::model::{JobAction, JobEvent, JobInfo, JobRec, JobState};
use crate::store::{Batch, SchedulerStore, Store, StoreError};

const LABELS: &[&str] = &["self-hosted", "linux"];

/// A pool like the config's first, named `big`, for jobs labelled `self-hosted, big` (added
/// by a reload, or put in the first's place).
fn big_pool(c: &Config) -> crate::config::PoolConfig {
    let mut big = c.pools[0].clone();
    big.name = "big".into();
    big.labels = vec!["self-hosted".into(), "big".into()];
    big
}

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
    /// The configuration the scheduler started with.
    config: Arc<Config>,
    /// Lets the fake hypervisor's hung calls return when the harness goes.
    _release: ReleaseStalled,
    /// The scheduler's clock (deliveries are received on it).
    clock: Arc<crate::clock::TokioClock>,
}

/// A fake image: check_image reads a qcow2 header, so write one.
fn fake_image(dir: &std::path::Path) -> std::path::PathBuf {
    crate::hypervisor::fake::golden_image(dir).unwrap()
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
    start_member(cfg, gh, hv, hv_rx, store, scheduler_store, |s| s, new_clock())
}

/// Wall time that follows tokio's paused clock: every timer runs in virtual time.
fn new_clock() -> Arc<crate::clock::TokioClock> {
    Arc::new(crate::clock::TokioClock::new())
}

/// [`start_on`], with the scheduler set up by `setup` (a fleet's member, say), on `clock`
/// (one a scheduler before it read, say).
#[allow(clippy::too_many_arguments)]
fn start_member(
    cfg: Arc<Config>,
    gh: Arc<FakeGitHub>,
    hv: Arc<FakeHypervisor>,
    hv_rx: Option<UnboundedReceiver<HvEvent>>,
    store: Arc<Store>,
    scheduler_store: Arc<dyn SchedulerStore>,
    setup: impl FnOnce(Scheduler<FakeGitHub, FakeHypervisor>) -> Scheduler<FakeGitHub, FakeHypervisor>,
    clock: Arc<crate::clock::TokioClock>,
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
    let config = cfg.clone();
    let s =
        Scheduler::new(cfg, gh.clone(), hv.clone(), scheduler_store, metrics.clone(), inbox.clone(), tx.clone(), rx)
            .unwrap()
            .with_clock(clock.clone());
    let s = setup(s);
    let stop = CancellationToken::new();
    let task = tokio::spawn(s.run(stop.clone(), None));
    let _release = ReleaseStalled(hv.clone());
    H { metrics, gh, hv, store, inbox, tx, stop, task, seq: 0, dirs: Vec::new(), config, clock, _release }
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

/// A scheduler started again (as after a restart) on what a previous one left: its
/// GitHub, hypervisor and store (`None`: a fresh, empty store), with a config of
/// `extra_pool`; told libvirt is connected.
fn restart(extra_pool: &str, gh: Arc<FakeGitHub>, hv: Arc<FakeHypervisor>, store: Option<Arc<Store>>) -> H {
    restart_on_clock(extra_pool, gh, hv, store, new_clock())
}

/// [`restart`] on `clock` (the host's, which the scheduler before read).
fn restart_on_clock(
    extra_pool: &str,
    gh: Arc<FakeGitHub>,
    hv: Arc<FakeHypervisor>,
    store: Option<Arc<Store>>,
    clock: Arc<crate::clock::TokioClock>,
) -> H {
    let dir = crate::test_support::tempdir();
    let mut cfg = (*config(extra_pool, &dir)).clone();
    cfg.pools[0].image = fake_image(&dir);
    let store = store.unwrap_or_else(|| Arc::new(Store::open(&dir).unwrap()));
    let mut h = start_member(Arc::new(cfg), gh, hv, None, store.clone(), store, |s| s, clock);
    h.dirs.push(dir);
    let _ = h.tx.send(Event::Hv(HvEvent::Reconnected));
    h
}

use super::fixtures::job_info as info;

impl H {
    /// A webhook delivery; GitHub (the fake) knows the job in the state it announces.
    fn deliver_as(&mut self, delivery: &str, action: JobAction, job: JobInfo) -> bool {
        let status = match action {
            JobAction::Queued | JobAction::Waiting => "queued",
            JobAction::InProgress => "in_progress",
            JobAction::Completed => "completed",
        };
        self.gh.lock().jobs.insert(
            job.id,
            crate::github::JobStatus {
                status: status.into(),
                conclusion: job.conclusion.clone(),
                runner_name: job.runner_name.clone(),
            },
        );
        let ok = self
            .store
            .accept(&JobEvent { delivery: delivery.into(), action, job, received_at: self.clock.now() })
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
    /// Reloads the configuration the scheduler started with, changed by `change`.
    async fn reload(&self, change: impl FnOnce(&mut Config)) -> crate::config::ReloadReport {
        let mut config = (*self.config).clone();
        change(&mut config);
        let (tx, rx) = oneshot::channel();
        self.tx.send(Event::Reload(Arc::new(config), tx)).ok().unwrap();
        rx.await.unwrap()
    }
    /// `runnervisor timeline`: the trace of `vm`.
    async fn trace(&self, vm: &str) -> timeline::Trace {
        match self.admin(AdminCommand::Timeline).await {
            AdminReply::Timeline(t) => t.into_iter().find(|t| t.vm == vm).unwrap_or_else(|| panic!("no trace of {vm}")),
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
    /// [`H::wait`] while a hypervisor call hangs: tokio does not advance paused time on
    /// its own while a blocking task runs, so this advances it.
    async fn wait_advancing(&self, what: &str, f: impl Fn(&Status, &FakeHypervisor) -> bool) -> Status {
        self.poll(what, Duration::from_secs(10), true, f).await
    }
    async fn wait_for(&self, what: &str, limit: Duration, f: impl Fn(&Status, &FakeHypervisor) -> bool) -> Status {
        self.poll(what, limit, false, f).await
    }
    /// Until `f` holds, for `limit` of virtual time: sleeping between looks (time advances
    /// when the runtime is idle), or advancing it by hand.
    async fn poll(
        &self,
        what: &str,
        limit: Duration,
        advance: bool,
        f: impl Fn(&Status, &FakeHypervisor) -> bool,
    ) -> Status {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.holds(&f).await {
                return s;
            }
            if advance {
                advance_step().await;
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.timed_out(what).await
    }
    /// Lets `d` of virtual time pass by hand, as [`H::wait_advancing`] does (a hypervisor
    /// call may hang meanwhile), and returns the status then: what did not happen in it.
    async fn advance_for(&self, d: Duration) -> Status {
        self.advance_by(d, STEP).await
    }
    /// [`H::advance_for`] in steps of `step` (minutes of virtual time in steps of a second).
    async fn advance_by(&self, d: Duration, step: Duration) -> Status {
        let end = Instant::now() + d;
        while Instant::now() < end {
            advance_step_of(step).await;
        }
        self.status().await
    }
    /// The status, if `f` holds for it and the fake hypervisor. Checked twice: the first
    /// status may predate what the hypervisor shows by the time it is looked at (its calls
    /// run on other threads); the second is taken after.
    async fn holds(&self, f: &impl Fn(&Status, &FakeHypervisor) -> bool) -> Option<Status> {
        if !f(&self.status().await, &self.hv) {
            return None;
        }
        let s = self.status().await;
        f(&s, &self.hv).then_some(s)
    }
    /// Fails the test with what the scheduler shows, counts, and the calls GitHub saw.
    async fn timed_out(&self, what: &str) -> ! {
        let m = self.metrics.render();
        let counts: Vec<&str> = m.lines().filter(|l| !l.starts_with('#') && l.contains("_total")).collect();
        let calls = self.gh.lock().calls.clone();
        panic!("timed out waiting for {what}: {:#?}\n{counts:#?}\nGitHub calls: {calls:?}", self.status().await);
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
    /// Job `id` (of `LABELS`) completed on `runner` (none: before any took it) so.
    fn complete(&mut self, id: u64, runner: Option<&str>, conclusion: &str) {
        let mut done = info(id, LABELS, runner);
        done.conclusion = Some(conclusion.into());
        self.deliver(JobAction::Completed, done);
    }
    /// Job `id` gets its VM, whose runner takes it; the VM crashes while GitHub still has
    /// the runner busy, and refuses its teardown's deletion of it (waited for).
    async fn crash_running(&mut self, id: u64) {
        let vm = format!("rv-small-{id}");
        self.deliver(JobAction::Queued, info(id, LABELS, None));
        self.wait("a VM", |_, hv| hv.running() == [vm.as_str()]).await;
        self.gh.set_runner(&vm, true, true);
        self.deliver(JobAction::InProgress, info(id, LABELS, Some(&vm)));
        self.hv.stop(&vm);
        self.wait("its runner's deletion refused", |_, _| self.gh.lock().calls.iter().any(|c| c == "delete")).await;
    }
    /// The runner of `vm` takes job `id`, finishes it, and the guest powers off.
    fn run_job_on(&mut self, vm: &str, id: u64) {
        self.deliver(JobAction::InProgress, info(id, LABELS, Some(vm)));
        self.complete(id, Some(vm), "success");
        // GitHub removes an ephemeral runner once its job is done.
        self.gh.lock().runners.retain(|_, r| r.name != vm);
        self.hv.stop(vm);
    }
    async fn shutdown(self) -> (Arc<FakeGitHub>, Arc<FakeHypervisor>, Arc<Store>) {
        self.stop.cancel();
        self.task.await.unwrap();
        (self.gh, self.hv, self.store)
    }
}

/// What the agent says when a job's hold ran out (`Scheduler::say_if_held_before`).
const HELD_RAN_OUT: &str = "the job's own runner went busy with a job still not named";

/// Log lines written into a buffer (`tracing`'s subscriber for this thread: the test's
/// runtime is on it).
#[derive(Clone, Default)]
struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl LogBuf {
    /// Catches this thread's INFO lines and above until the guard goes.
    fn catch() -> (LogBuf, tracing::subscriber::DefaultGuard) {
        let logs = LogBuf::default();
        let writer = logs.clone();
        let subscriber =
            tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).without_time().finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }
    /// The lines that say `what`.
    fn saying(&self, what: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().filter(|l| l.contains(what)).map(str::to_string).collect()
    }
}

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every milestone of `t` is there, in this order (equal times allowed: the clock is paused).
fn assert_in_order(t: &timeline::Trace, milestones: &[(&str, Option<u64>)]) {
    let mut last = 0;
    for (name, at) in milestones {
        let at = at.unwrap_or_else(|| panic!("{name} missing: {t:#?}"));
        assert!(at >= last, "{name} before the milestone before it: {t:#?}");
        last = at;
    }
}

/// A step of [`advance_step`].
const STEP: Duration = Duration::from_millis(50);

/// 50 ms of virtual time by hand, and real time for the blocking calls in flight
/// (advancing does not wait for them).
async fn advance_step() {
    advance_step_of(STEP).await;
}

/// [`advance_step`] of `step`.
async fn advance_step_of(step: Duration) {
    tokio::time::advance(step).await;
    tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(2))).await.unwrap();
}

/// Sets the fake hypervisor's `release_stalled` when it goes, the test passed or failed: a
/// failed test's runtime waits for its blocking calls before the failure is reported.
struct ReleaseStalled(Arc<FakeHypervisor>);

impl Drop for ReleaseStalled {
    fn drop(&mut self) {
        self.0.lock().release_stalled = true;
    }
}

fn vm_for(s: &Status, job: u64) -> Option<String> {
    s.vms.iter().find(|v| v.job_id == job).map(|v| v.name.clone())
}

mod faults;
mod fleet;
mod liveness;
mod reload;
mod scale_sets;
mod serving;
mod slots;
mod warm;

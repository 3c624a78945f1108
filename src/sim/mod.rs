//! The deterministic simulator: the agent's real wiring ([`crate::assemble`]: intake,
//! store, scheduler, provisioning, sweeps, GitHub sync, warm pools, slots, reloads) in one
//! thread, on a paused clock, against a simulated GitHub and hypervisor, with every draw
//! made from the seed: the world (pools whose names collide, labels, caps, timers), the
//! workload (bursts, trickles, cancels, re-runs, jobs no pool serves or another pool's
//! runner takes) and the faults (see [`Fault`]). Invariants are checked after every step
//! and once the world is healed and quiet; a violation names itself, with the seed and the
//! steps that reproduce it (`./scripts/simulate --seed S --steps K`) and a trace.
//!
//! Determinism: one thread, tokio's current-thread runtime with its clock paused, blocking
//! calls inline ([`crate::offload`]), the store's writes inline on an in-memory disk
//! ([`disk::Disk`]), the scheduler's `select!` biased and its maps ordered. The same seed
//! gives the same trace (a test checks it).

pub mod disk;
pub mod github;
pub mod hv;
pub mod scaleset;
pub mod time;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fastrand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::admin::proto::{Reply, Status};
use crate::clock::Step;
use crate::config::Config;
use crate::hypervisor::fake::FakeHypervisor;
use crate::hypervisor::{DomainState, HvEvent};
use crate::metrics::Metrics;
use crate::scheduler::{AdminCommand, Event};
use crate::secret::Secret;
use crate::store::Store;
use axum::http;

use github::{Fault as GhFault, Hub, SimGitHub, Status as GStatus};
use time::Time;

const SECRET: &str = "sim-webhook-secret";

/// What one run is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub seed: u64,
    pub steps: u32,
    /// Faults drawn (off: the workload alone).
    pub faults: bool,
}

/// What one run did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub seed: u64,
    /// Steps made (fewer than asked when a violation stopped the run).
    pub steps: u32,
    pub faults: u32,
    pub jobs: u32,
    /// The most GitHub API calls the agent made in one hour of virtual time.
    pub busiest_hour: u64,
    /// The first invariant broken, named.
    pub violation: Option<String>,
    /// What happened, a line per step that did something.
    pub trace: Vec<String>,
}

impl Outcome {
    /// The line that runs this seed again, as far as it went.
    pub fn reproduce(&self) -> String {
        format!("./scripts/simulate --seed {} --steps {}", self.seed, self.steps)
    }

    /// What broke, if anything, as the line that reports it: how to replay it, and what.
    pub fn violation_line(&self) -> Option<String> {
        self.violation.as_ref().map(|v| format!("violation: {} # {v}", self.reproduce()))
    }
}

/// The faults the world injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    GitHub5xx,
    GitHubTimeout,
    GitHubRateLimit,
    HvFail,
    HvPanic,
    HvDown,
    HvSlow,
    GuestDeaf,
    AckLost,
    RunnerNeverOnline,
    VmCrash,
    DiskFull,
    AgentKilled,
    ClockStep,
    Reload,
    StoreFull,
    Drain,
}

const FAULTS: &[Fault] = &[
    Fault::GitHub5xx,
    Fault::GitHubTimeout,
    Fault::GitHubRateLimit,
    Fault::HvFail,
    Fault::HvPanic,
    Fault::HvDown,
    Fault::HvSlow,
    Fault::GuestDeaf,
    Fault::AckLost,
    Fault::RunnerNeverOnline,
    Fault::VmCrash,
    Fault::DiskFull,
    Fault::AgentKilled,
    Fault::ClockStep,
    Fault::Reload,
    Fault::StoreFull,
    Fault::Drain,
];

/// GitHub API calls an hour an App's installation may make (its rate limit's floor).
const API_BUDGET: u64 = 5000;

/// Pool names drawn so that they collide: prefixes of each other, digits, dashes.
const POOL_NAMES: &[&str] = &["ubuntu", "ubuntu-22", "ubuntu-2", "u", "u-1", "small", "small-31234567890"];
/// Label sets pools take (distinct), and jobs.
const LABEL_SETS: &[&[&str]] = &[
    &["self-hosted", "linux"],
    &["self-hosted", "linux", "x64"],
    &["self-hosted", "Linux", "gpu"],
    &["self-hosted", "linux", "x64", "big"],
];
/// Labels no pool has (a job for no pool), and a subset any runner above may take.
const NO_POOL: &[&str] = &["self-hosted", "windows"];
/// How busy a seed's GitHub is: the share (in percent) of the steps that would queue jobs
/// (new ones, bursts, re-runs) that do; cancels keep their rate. Every seed used to queue
/// at the full rate, a job every 23 s of virtual time (about 83 minutes at 2,000 steps),
/// more than most seeds' pools serve (jobs last 85 s on average, pools have one to four
/// VMs): every seed was a backlog served for hours once the workload ended, and none was
/// an agent keeping up (when idle runners, warm VMs and surplus timers matter). A third
/// of the seeds each: quiet, busy, overloaded.
const LOADS: [u32; 3] = [30, 60, 100];
/// How long a hung job runs: longer than any pool's `max_lifetime` (at most 90 minutes).
const HUNG: Duration = Duration::from_secs(24 * 3600);
const ANY_RUNNER: &[&str] = &["self-hosted"];
/// The name of a seed's scale-set pool (and its set's).
const SCALE_SET: &str = "scale";
/// Mixed into the seed for the draws of the scale-set pool.
const SCALE_SET_STREAM: u64 = 0x5ca1_e5e7_0000_0001;
/// Mixed into the seed for the draws of the later faults (`Hub::late`).
const LATE_STREAM: u64 = 0x1a7e_0000_0000_0002;
/// Mixed into the seed for the draws added after seeds were kept (`Sim::added`).
const ADDED_STREAM: u64 = 0xadd0_0000_0000_0003;

/// One incarnation of the agent: its runtime (dropped: killed at whatever await point
/// each task was), and the handles the simulator drives it by.
struct Incarnation {
    rt: tokio::runtime::Runtime,
    agent: Option<crate::Agent>,
    events: mpsc::UnboundedSender<Event>,
    shutdown: CancellationToken,
    reloads: mpsc::UnboundedSender<crate::reload::Request>,
    metrics: Arc<Metrics>,
}

struct Guest {
    domain: String,
    /// The domain's boot it runs in (a runner dies with its VM: a domain of the same name
    /// restored later is not its VM).
    boot: usize,
    online_at: Duration,
    never: bool,
}

struct Sim {
    rng: Rng,
    /// Draws added after seeds were kept (teardowns cut short, slots changed by a reload):
    /// a stream of their own, so that the main stream's draws stay as they were.
    added: Rng,
    /// The seed's share of job-queueing steps (one of [`LOADS`]).
    load: u32,
    opts: Options,
    time: Time,
    hub: SimGitHub,
    fake: Arc<FakeHypervisor>,
    hv: Arc<hv::SimHv>,
    disk: disk::Disk,
    config: Arc<Config>,
    /// Per pool: the most VMs it may have now (a reload that lowers `max_vms` lowers it
    /// once the pool is within the new cap).
    caps: BTreeMap<String, usize>,
    /// Per pool that has one: the most VMs a repository may have of it now (a reload that
    /// lowers `max_vms_per_repository` lowers it once every repository fits the new one).
    repo_caps: BTreeMap<String, usize>,
    inc: Option<Incarnation>,
    trace: Vec<String>,
    faults: u32,
    jobs: u32,
    next_job: u64,
    /// Runners started in guests, by runner name.
    guests: BTreeMap<String, Guest>,
    delivered_seen: usize,
    completions: Vec<(Duration, u64)>,
    /// Boots of domains the world stopped (a crash, a full disk): a job lost on them is the
    /// fault's (a slot's domain restored later runs another VM, which is judged).
    killed: BTreeSet<(String, usize)>,
    /// Domains stopped (their guest powered off or crashed), by boot (a slot's domain
    /// comes back under its name), since when (see `check_stopped`).
    stopped_since: BTreeMap<(String, usize), Duration>,
    /// VMs on their way when the host's clock was stepped, and boots restored into a slot
    /// not yet described by their binding then: how old they are the world cannot tell
    /// (see `Fault::ClockStep`), so a job lost on them is not judged.
    skewed: BTreeSet<String>,
    skewed_boots: BTreeSet<usize>,
    /// The calls the agent had made to GitHub's API at each check of the last hour (when,
    /// how many in all), and the most in any hour.
    api_calls: std::collections::VecDeque<(Duration, u64)>,
    busiest_hour: u64,
    /// When each domain was first seen, and its pool.
    domains_seen: BTreeMap<String, (Duration, String)>,
    /// When the agent made each domain's VM, in virtual time (its metadata's `created`, on
    /// the host's clock as it was when the domain was seen: the VM's lifetime counts from
    /// its record, made before its provisioning).
    domains_created: BTreeMap<String, Duration>,
    hv_up_at: Option<Duration>,
    /// When the operator undrains the agent it drained (tried again until it takes).
    undrain_at: Option<Duration>,
    /// A drain the agent died in (its answer lost: whether its store kept it, the agent's
    /// next start tells), and for how long the operator meant it.
    drain_unanswered: Option<Duration>,
    disk_room_at: Option<Duration>,
    store_room_at: Option<Duration>,
    never_online: u32,
    /// Blocking calls still to be slow (a hung libvirt).
    slow: Arc<AtomicU32>,
    /// When a status last said the agent's hypervisor was not ready (`libvirt_connected`
    /// false: libvirt lost, and no sweep has answered since), which makes and reaps no VM.
    hv_unready_seen: Option<Duration>,
    violation: Option<String>,
    step: u32,
    /// Virtual time as of the runtime's last turn (time moves only inside `block_on`).
    t: Duration,
    /// Once the world is healed (settling): since when each runner has been online with
    /// nothing to do, and the longest `idle_timeout` each pool ever had.
    settled_at: Option<Duration>,
    idle_since: BTreeMap<String, Duration>,
    /// Once healed: when each pool last had a job the agent queues (a runner of the pool
    /// is kept for it, not surplus, until the agent serves, drops or gives it up).
    pool_queued_at: BTreeMap<String, Duration>,
    /// Once healed: how long each job the agent queues has had no VM while its pool had
    /// room, in all (see `check_waiting`), and when that was last looked at.
    waited: BTreeMap<u64, Duration>,
    waited_checked: Option<Duration>,
    idle_timeouts: BTreeMap<String, Duration>,
    /// Every pool the run configured, with its labels (a pool a reload adds has a name
    /// and labels none had) and its max_lifetime.
    pools_ever: Vec<(String, Vec<String>, Duration)>,
    /// The agent's status, until its runtime runs again (the checks of a step ask for it
    /// several times; each ask was a turn of the agent).
    status_cache: Option<Status>,
    /// The jobs (by the agent's ids) its status ever showed, queued or with a VM: it took
    /// their deliveries, whatever it answered (one it answered 503, its store dying, may
    /// have been written all the same: seed 86004 of 1,000 steps).
    shown: BTreeSet<u64>,
}

fn label_set_of(labels: &[&str]) -> Vec<String> {
    crate::model::label_set(&labels.iter().map(|l| l.to_string()).collect::<Vec<_>>())
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Draws the world: pools and timers (a valid configuration).
fn draw_config(rng: &mut Rng, sets_rng: &mut Rng, image: &std::path::Path) -> Config {
    loop {
        let npools = rng.usize(1..=3);
        let mut names: Vec<&str> = POOL_NAMES.to_vec();
        rng.shuffle(&mut names);
        let mut sets: Vec<&[&str]> = LABEL_SETS.to_vec();
        rng.shuffle(&mut sets);
        // Mostly an organization; a repository (whose queued jobs are also polled), or an
        // enterprise (no hook: its delivery log is not read).
        let scope = match rng.u8(0..5) {
            0 => format!("repository = \"{}\"\nhook = {{ type = \"repository\", id = 1 }}", github::REPOS[0]),
            1 => format!("enterprise = \"{}\"", github::ENTERPRISE),
            _ => format!("organization = \"{}\"\nhook = {{ type = \"organization\", id = 1 }}", github::ORG),
        };
        let mut text = format!(
            "state_dir = \"/nonexistent/runnervisor-sim\"\n[server]\nlisten = \"127.0.0.1:0\"\n\
             [github]\n{scope}\nauth = {{ type = \"pat\", token = {{ file = \"/nonexistent\" }} }}\n\
             webhook_secret = {{ file = \"/nonexistent\" }}\n\
             [reconcile]\nsweep_interval = \"{}s\"\ngithub_interval = \"{}s\"\nstop_grace = \"{}s\"\n",
            rng.u32(5..=60),
            rng.u32(15..=120),
            rng.u32(5..=60),
        );
        if rng.u8(0..4) == 0 {
            text.push_str(&format!("[capacity]\nmax_vms = {}\n", rng.usize(1..=5)));
        }
        for i in 0..npools {
            let max_vms = rng.usize(1..=4);
            let warm = if rng.bool() { 0 } else { rng.usize(0..=max_vms.min(2)) };
            let slots = if rng.u8(0..4) == 0 { rng.usize(1..=2) } else { 0 };
            let per_repo = match rng.u8(0..3) {
                0 => format!("max_vms_per_repository = {}\n", rng.usize(1..=max_vms)),
                _ => String::new(),
            };
            let labels: Vec<String> = sets[i].iter().map(|l| format!("\"{l}\"")).collect();
            text.push_str(&format!(
                "[[pool]]\nname = \"{}\"\nlabels = [{}]\nimage = \"{}\"\nmax_vms = {max_vms}\nwarm = {warm}\n\
                 snapshot_slots = {slots}\nregistration = \"{}\"\naccept_token_exposure = true\nidle_timeout = \"{}s\"\n\
                 registration_timeout = \"{}s\"\nmax_lifetime = \"{}m\"\nmax_attempts = {}\nwarm_max_age = \"{}m\"\n\
                 bind_timeout = \"{}s\"\n{per_repo}",
                names[i],
                labels.join(", "),
                image.display(),
                if rng.bool() { "jit" } else { "token" },
                rng.u32(20..=300),
                rng.u32(60..=600),
                rng.u32(20..=90),
                rng.u32(1..=4),
                rng.u32(10..=60),
                rng.u32(5..=30),
            ));
        }
        let Ok(config) = Config::parse(&text) else { continue };
        // A third of the seeds: a pool that is a runner scale set (jobs from its messages,
        // not webhooks; JIT configs from the set).
        if sets_rng.u8(0..3) != 0 {
            return config;
        }
        let max_vms = sets_rng.usize(1..=3);
        let lifetime = sets_rng.u32(20..=90);
        text.push_str(&format!(
            "[[pool]]\nname = \"{SCALE_SET}\"\nintake = \"scale_set\"\nlabels = [\"{SCALE_SET}-linux\"]\nimage = \"{}\"\n\
             max_vms = {max_vms}\nwarm = {}\nregistration = \"jit\"\nidle_timeout = \"{}s\"\n\
             registration_timeout = \"{}s\"\nmax_lifetime = \"{lifetime}m\"\nmax_attempts = {}\n\
             warm_max_age = \"{}m\"\nbind_timeout = \"{}s\"\n",
            image.display(),
            if sets_rng.bool() { 0 } else { sets_rng.usize(0..=max_vms.min(1)) },
            sets_rng.u32(20..=300),
            sets_rng.u32(60..=600),
            sets_rng.u32(1..=4),
            sets_rng.u32(5..lifetime),
            sets_rng.u32(5..=30),
        ));
        return Config::parse(&text).expect("a scale-set pool beside the drawn ones is valid");
    }
}

/// The process's golden image (a qcow2 header and a manifest), made once.
fn image() -> std::path::PathBuf {
    static IMAGE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("runnervisor-sim-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("the simulator's image directory");
            crate::hypervisor::fake::golden_image(&dir).expect("the simulator's golden image")
        })
        .clone()
}

thread_local! {
    /// Panics on this thread that no fault injected (a bug the run reports).
    static PANICS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Injected panics pass quietly; any other is recorded for the run on its thread (and
/// printed as usual).
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if msg.starts_with("injected panic") {
                return;
            }
            let at = info.location().map(|l| format!(" at {l}")).unwrap_or_default();
            PANICS.with(|p| p.borrow_mut().push(format!("{msg}{at}")));
            default(info);
        }));
    });
}

/// Seeds that found a bug (in the agent or in the simulator's own checks), with their
/// steps: `./scripts/simulate --regressions` runs them (so does the ordinary suite, before
/// its seed budget). A seed replays the world it found only while the world's generator
/// draws it the same; the test the fix came with holds the bug beyond that.
pub const REGRESSIONS: &[(u64, u32)] = &[
    (638, 1000),
    (1749, 1000),
    (3541, 2000),
    (5092, 1000),
    (8897, 2000),
    (15882, 2000),
    (21836, 2000),
    (22899, 1000),
    (38932, 1000),
    (48799, 1000),
    (49846, 1000),
    (55044, 1000),
    (69541, 1000),
    (86004, 1000),
    (111830, 665),
    (126780, 1000),
    (195363, 1000),
    (201072, 2000),
];

/// Runs one seed.
pub fn run_seed(opts: Options) -> Outcome {
    let mut sim = Sim::new(opts);
    sim.start(Duration::ZERO);
    while sim.violation.is_none() && sim.step < opts.steps {
        sim.step += 1;
        sim.one_step();
    }
    if sim.violation.is_none() {
        sim.settle();
    }
    sim.end();
    Outcome {
        seed: opts.seed,
        steps: sim.step,
        faults: sim.faults,
        jobs: sim.jobs,
        busiest_hour: sim.busiest_hour,
        violation: sim.violation,
        trace: sim.trace,
    }
}

impl Sim {
    /// The world the seed draws, the agent not started yet; on this thread, until
    /// [`Sim::end`], blocking calls are inline with drawn latencies.
    fn new(opts: Options) -> Sim {
        install_panic_hook();
        PANICS.with(|p| p.borrow_mut().clear());
        // Whatever draws from fastrand's thread-local generator (entropy for guests) draws the
        // same every run of this seed.
        fastrand::seed(opts.seed);
        let mut rng = Rng::with_seed(opts.seed);
        let image = image();
        // A scale-set pool, drawn from a stream of its own: a seed without one draws the
        // world it drew before scale sets were simulated.
        let mut sets_rng = Rng::with_seed(opts.seed ^ SCALE_SET_STREAM);
        let config = draw_config(&mut rng, &mut sets_rng, &image);
        let load = LOADS[rng.usize(0..LOADS.len())];
        let time = Time::default();
        time.make_current();
        let disk = disk::Disk::default();
        let hub = SimGitHub {
            hub: Arc::new(std::sync::Mutex::new(Hub::new(
                time.clone(),
                config.github.api_timeout,
                config.github.scope(),
            ))),
            disk: disk.clone(),
        };
        hub.lock().late = opts.faults.then(|| Rng::with_seed(opts.seed ^ LATE_STREAM));
        let (tx, _rx) = mpsc::unbounded_channel();
        let fake = Arc::new(FakeHypervisor::new(tx));
        fake.lock().forget_seeds = true;
        let hv = Arc::new(hv::SimHv::new(fake.clone(), disk.clone(), time.clone()));
        let slow = Arc::new(AtomicU32::new(0));
        let (latency_rng, slow_left) = (std::cell::RefCell::new(Rng::with_seed(opts.seed ^ 0x5eed)), slow.clone());
        crate::offload::set_inline(Some(Box::new(move || {
            let mut r = latency_rng.borrow_mut();
            let slow = slow_left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
            let (before, after) = (Duration::from_millis(r.u64(0..=30)), Duration::from_millis(r.u64(0..=30)));
            // A slow call hangs before it acts, or after (done, its answer minutes late).
            match (slow, r.bool()) {
                (false, _) => (before, after),
                (true, true) => (Duration::from_secs(r.u64(20..=300)), after),
                (true, false) => (before, Duration::from_secs(r.u64(20..=300))),
            }
        })));
        let caps = config.pools.iter().map(|p| (p.name.clone(), p.max_vms)).collect();
        let repo_caps = config.pools.iter().filter_map(|p| Some((p.name.clone(), p.max_vms_per_repository?))).collect();
        let mut sim = Sim {
            rng,
            added: Rng::with_seed(opts.seed ^ ADDED_STREAM),
            load,
            opts,
            time,
            hub,
            fake,
            hv,
            disk,
            config: Arc::new(config),

            caps,
            repo_caps,
            inc: None,
            trace: Vec::new(),
            faults: 0,
            jobs: 0,
            next_job: 1000,
            guests: BTreeMap::new(),
            delivered_seen: 0,
            completions: Vec::new(),
            killed: BTreeSet::new(),
            stopped_since: BTreeMap::new(),
            skewed: BTreeSet::new(),
            skewed_boots: BTreeSet::new(),
            api_calls: std::collections::VecDeque::new(),
            busiest_hour: 0,
            domains_seen: BTreeMap::new(),
            domains_created: BTreeMap::new(),
            hv_up_at: None,
            undrain_at: None,
            drain_unanswered: None,
            disk_room_at: None,
            store_room_at: None,
            never_online: 0,
            slow,
            hv_unready_seen: None,
            violation: None,
            step: 0,
            t: Duration::ZERO,
            settled_at: None,
            idle_since: BTreeMap::new(),
            pool_queued_at: BTreeMap::new(),
            waited: BTreeMap::new(),
            waited_checked: None,
            idle_timeouts: BTreeMap::new(),
            pools_ever: Vec::new(),
            status_cache: None,
            shown: BTreeSet::new(),
        };
        for p in &sim.config.pools {
            sim.idle_timeouts.insert(p.name.clone(), p.idle_timeout);
            sim.pools_ever.push((p.name.clone(), p.labels.clone(), p.max_lifetime));
        }
        sim.note(format!("world: {}", sim.describe_config()));
        sim
    }

    /// The agent stops where it is; blocking calls leave the simulator's hands.
    fn end(&mut self) {
        if let Some(inc) = self.inc.take() {
            self.stop(inc, false);
        }
        let by = format!("{:?}", self.hub.lock().calls_by);
        self.note(format!("GitHub API calls by endpoint: {by}"));
        crate::offload::set_inline(None);
    }

    fn note(&mut self, line: String) {
        self.trace.push(format!("[{} {}] {line}", self.step, secs(self.t)));
    }

    fn describe_config(&self) -> String {
        let pools: Vec<String> = self
            .config
            .pools
            .iter()
            .map(|p| {
                format!(
                    "{} {:?} max_vms={} warm={} slots={} {:?} idle={} reg={} life={}",
                    p.name,
                    p.labels,
                    p.max_vms,
                    p.warm,
                    p.snapshot_slots,
                    p.registration,
                    secs(p.idle_timeout),
                    secs(p.registration_timeout),
                    secs(p.max_lifetime)
                )
            })
            .collect();
        format!(
            "load={}% scope={:?} capacity={:?} pools=[{}]",
            self.load,
            self.config.github.scope(),
            self.config.capacity.max_vms,
            pools.join("; ")
        )
    }

    fn violate(&mut self, what: String) {
        if self.violation.is_none() {
            self.note(format!("VIOLATION: {what}"));
            self.violation = Some(what);
        }
    }

    /// Starts the agent on what the last one left (its store, the hypervisor, GitHub).
    fn start(&mut self, down: Duration) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("the simulator's runtime");
        let store = match Store::open_on(self.disk.clone()) {
            Ok(s) => Arc::new(s),
            Err(e) => return self.violate(format!("store: does not open after the agent was killed: {e}")),
        };
        let (hv_tx, hv_rx) = mpsc::unbounded_channel();
        self.fake.set_events(hv_tx.clone());
        if !self.fake.lock().unavailable {
            let _ = hv_tx.send(HvEvent::Reconnected);
        }
        let (reload_tx, reload_rx) = mpsc::unbounded_channel();
        let metrics = Arc::new(Metrics::default());
        let deps = crate::Deps {
            github: Arc::new(self.hub.clone()),
            hypervisor: self.hv.clone(),
            hv_events: hv_rx,
            webhook_secret: Secret::new(SECRET),
            metrics: metrics.clone(),
            webhook_listener: None,
            metrics_listener: None,
            reloads: Some(reload_rx),
            fleet: None,
            scale_sets: Some(crate::ScaleSetModel::Sim(scaleset::SimScaleSets { gh: self.hub.clone() })),
        };
        let shutdown = CancellationToken::new();
        let (config, time, stop) = (self.config.clone(), self.time.clone(), shutdown.clone());
        self.status_cache = None;
        let (t, agent) = rt.block_on(async move {
            time.start_incarnation(down);
            (time.now(), crate::assemble(config, deps, store, Arc::new(time::HostClock(time.clone())), stop))
        });
        self.t = t;
        match agent {
            Ok(agent) => {
                let events = agent.events.clone();
                self.inc = Some(Incarnation { rt, agent: Some(agent), events, shutdown, reloads: reload_tx, metrics });
            }
            Err(e) => return self.violate(format!("agent: does not start: {e}")),
        }
        // The operator whose drain went unanswered looks at `runnervisor status`: a drain the
        // store kept is undone when the operator meant it to end.
        if let Some(d) = self.drain_unanswered.take()
            && self.status().is_some_and(|s| s.draining)
            && self.undrain_at.is_none()
        {
            self.undrain_at = Some(self.t + d);
            self.note("operator: the agent is draining after its restart (its store kept the drain it died in)".into());
        }
    }

    /// Stops the agent: cleanly (SIGTERM: in-flight work finishes, bounded) or killed.
    fn stop(&mut self, mut inc: Incarnation, clean: bool) {
        self.status_cache = None;
        // The next agent's timeline knows nothing of this one's teardowns.
        self.hv.arm().torn_running.clear();
        if clean {
            inc.shutdown.cancel();
            if let Some(agent) = inc.agent.take() {
                let _ = inc.rt.block_on(agent.finish());
            }
        }
        inc.rt.block_on(async { self.time.end_incarnation() });
        drop(inc.agent.take());
        drop(inc);
    }

    fn one_step(&mut self) {
        let r = self.rng.u32(0..100);
        if r < 7 {
            // A job, or a burst of them, at the seed's load.
            if self.rng.u32(0..100) < self.load {
                let n = if r < 6 { 1 } else { self.rng.u32(2..=6) };
                self.new_jobs(n);
            }
        } else if r < 9 {
            if self.rng.u8(0..8) == 0 {
                self.vanish();
            } else {
                self.cancel();
            }
        } else if r < 10 {
            // A re-run queues a job too: at the seed's load.
            if self.rng.u32(0..100) < self.load {
                self.rerun();
            }
        } else if r < 14 && self.opts.faults {
            let f = FAULTS[self.rng.usize(0..FAULTS.len())];
            self.inject(f);
        }
        if self.inc.is_none() {
            return;
        }
        if self.undrain_at.is_some_and(|t| t <= self.t) && self.admin_drain(false) == Some(true) {
            self.undrain_at = None;
        }
        let dt = match self.rng.u32(0..100) {
            0..70 => Duration::from_millis(self.rng.u64(0..=500)),
            70..95 => Duration::from_millis(self.rng.u64(500..=5000)),
            _ => Duration::from_millis(self.rng.u64(5000..=60_000)),
        };
        self.advance(dt);
        self.restart_if_dead();
        self.check_step();
        // The checks ask the agent (its status, its timeline), which may write and die: the
        // next step's world must not act on a dead process.
        if self.violation.is_none() {
            self.restart_if_dead();
        }
    }

    /// The agent died writing its store (the disk says so): it is restarted on what it kept.
    fn restart_if_dead(&mut self) {
        if self.disk.dead() {
            self.kill("died writing its store");
        }
    }

    /// The agent is killed where it is (its runtime dropped) and started again on what
    /// its store kept: writes not synced are lost or kept, and torn, as the seed draws.
    fn kill(&mut self, how: &str) {
        let Some(inc) = self.inc.take() else { return };
        self.stop(inc, false);
        let torn = self.rng.u8(0..3) == 0;
        let rng = &mut self.rng;
        let lost = self.disk.crash(|| match rng.u8(0..3) {
            0 => None,
            _ => Some(if torn { Some(rng.usize(0..4096)) } else { None }),
        });
        let mut down = Duration::from_secs(self.rng.u64(0..=120));
        // It cannot open its store on a full file system: systemd starts it again until it
        // can (`Restart=on-failure`).
        if let Some(room) = self.store_room_at.take() {
            down = down.max(room.saturating_sub(self.t));
            self.disk.set_full(false);
        }
        self.note(format!("agent {how} ({lost} unsynced writes lost, torn {torn}); back in {}", secs(down)));
        self.start(down);
    }

    /// Lets `dt` of virtual time pass: the agent runs, and the world acts when its events
    /// fall due (webhooks posted, runners online, jobs taken and finished).
    fn advance(&mut self, dt: Duration) {
        let Some(inc) = self.inc.take() else { return };
        self.status_cache = None;
        let app = inc.agent.as_ref().map(|a| a.app.clone());
        inc.rt.block_on(async {
            let end = self.time.now() + dt;
            loop {
                if self.disk.dead() {
                    self.t = self.time.now();
                    break;
                }
                if let Some(app) = &app {
                    self.tick(app).await;
                }
                let now = self.time.now();
                if now >= end {
                    self.t = now;
                    break;
                }
                let next = self.next_due().map_or(end, |t| t.clamp(now, end));
                // At least a millisecond: what falls due now was done by the tick.
                tokio::time::sleep(next.saturating_sub(now).max(Duration::from_millis(1))).await;
            }
        });
        self.inc = Some(inc);
    }

    fn next_due(&self) -> Option<Duration> {
        let hub = self.hub.lock();
        let hooks = hub.outbox.iter().map(|(t, _)| *t);
        let done = self.completions.iter().map(|(t, _)| *t);
        let online = self.guests.values().filter(|g| !g.never).map(|g| g.online_at);
        let timers = [self.hv_up_at, self.disk_room_at, self.store_room_at].into_iter().flatten();
        let nudged = hub.nudge.then(|| self.time.now());
        hooks.chain(done).chain(online.filter(|t| *t > self.time.now())).chain(timers).chain(nudged).min()
    }

    /// The world's turn: everything due now.
    async fn tick(&mut self, app: &axum::Router) {
        let now = self.time.now();
        self.t = now;
        self.hub.lock().nudge = false;
        self.heal_due(now);
        self.follow_guests(now);
        self.assign(now);
        self.finish_due(now);
        self.post_due(app, now).await;
    }

    fn heal_due(&mut self, now: Duration) {
        if self.hv_up_at.is_some_and(|t| t <= now) {
            self.hv_up_at = None;
            self.fake.lock().unavailable = false;
            self.fake.send(HvEvent::Reconnected);
        }
        if self.disk_room_at.is_some_and(|t| t <= now) {
            self.disk_room_at = None;
        }
        if self.store_room_at.is_some_and(|t| t <= now) {
            self.store_room_at = None;
            self.disk.set_full(false);
        }
    }

    /// `runnervisor drain` (or `undrain`): whether the agent took it (it cannot while its
    /// store cannot persist it, nor while it is down); `None`: no answer, the agent died
    /// writing it (its store may have kept it or not).
    fn admin_drain(&mut self, on: bool) -> Option<bool> {
        if self.inc.is_none() {
            return Some(false);
        }
        let ok = matches!(self.ask(AdminCommand::Drain(on)), Some(Reply::Ok(_)));
        let answer = (!self.disk.dead()).then_some(ok);
        let said = match answer {
            Some(true) => "ok",
            Some(false) => "refused",
            None => "no answer (the agent died writing it)",
        };
        self.note(format!("operator: {} → {said}", if on { "drain" } else { "undrain" }));
        answer
    }

    /// Guests that got their runner command start it; runners whose VM is gone go offline
    /// (a job they ran fails).
    fn follow_guests(&mut self, now: Duration) {
        let delivered: Vec<((String, String), usize)> = {
            let s = self.fake.lock();
            let boots = s.delivered_boots[self.delivered_seen..].iter().copied();
            s.delivered[self.delivered_seen..].iter().cloned().zip(boots).collect()
        };
        self.delivered_seen += delivered.len();
        for ((domain, message), boot) in delivered {
            let Ok(doc) = serde_json::from_str::<serde_json::Value>(&message) else {
                self.violate(format!("guest: the runner command into {domain} is not JSON"));
                continue;
            };
            let name = doc["vm"].as_str().unwrap_or_default().to_string();
            // Token mode: the guest registers its runner (`config.sh ... --labels a,b`).
            let token_labels = doc["runcmd"].as_array().into_iter().flatten().find_map(|cmd| {
                let args: Vec<&str> = cmd["argv"].as_array()?.iter().filter_map(|a| a.as_str()).collect();
                let at = args.iter().position(|a| *a == "--labels")?;
                args.get(at + 1).map(|l| l.split(',').map(str::to_string).collect::<Vec<_>>())
            });
            let mut hub = self.hub.lock();
            if let Some(labels) = token_labels {
                let labels = crate::model::label_set(&labels);
                if hub.runner_named(&name).is_none() {
                    hub.next_runner += 1;
                    let id = hub.next_runner;
                    hub.runners.insert(
                        id,
                        github::Runner {
                            id,
                            name: name.clone(),
                            labels,
                            online: false,
                            job: None,
                            by_token: true,
                            scale_set: None,
                        },
                    );
                }
            }
            drop(hub);
            let never = self.never_online > 0;
            self.never_online = self.never_online.saturating_sub(1);
            let online_at = now + Duration::from_millis(self.rng.u64(1000..=20_000));
            self.guests.insert(name, Guest { domain, boot, online_at, never });
        }
        let running: BTreeSet<String> = {
            let s = self.fake.lock();
            self.guests.iter().filter(|(_, g)| s.runs_in(&g.domain, g.boot)).map(|(n, _)| n.clone()).collect()
        };
        let frozen = self.frozen_guests();
        let mut lost = Vec::new();
        {
            let mut hub = self.hub.lock();
            for (name, g) in &self.guests {
                let Some(r) = hub.runner_named_mut(name) else { continue };
                if running.contains(name) {
                    if !g.never && g.online_at <= now && !frozen.contains(name) {
                        r.online = true;
                    }
                } else if r.online || r.job.is_some() {
                    r.online = false;
                    if let Some(job) = r.job.take() {
                        lost.push((job, g.domain.clone(), g.boot, name.clone()));
                    }
                }
            }
        }
        for (job, domain, boot, runner) in lost {
            let seen = self.domains_seen.get(&domain).map(|(t, _)| now.saturating_sub(*t)).unwrap_or_default();
            let made = self.domains_created.get(&domain).map(|c| now.saturating_sub(*c));
            // A boot restored into a slot: its domain was seen, and made, for the slot's VM;
            // its own VM is as old as its binding described it (or, undescribed, at most as
            // old as the slot).
            let bound = self.hv.arm().made.get(&boot).map(|m| now.saturating_sub(*m));
            let age = bound.unwrap_or(made.unwrap_or(seen).max(seen));
            let pool = self.domains_seen.get(&domain).map(|(_, p)| p.clone()).unwrap_or_default();
            // A pool a reload removed lets its VMs' jobs finish (the agent retires it, on its
            // own timers or, restarted since, on a retired pool's).
            let life = match self.config.pools.iter().find(|p| p.name == pool) {
                Some(p) => Some(p.max_lifetime),
                None => {
                    self.pools_ever.iter().find(|(n, _, _)| *n == pool).map(|(_, _, l)| (*l).min(retired_lifetime()))
                }
            };
            let by_fault = self.killed.contains(&(domain.clone(), boot))
                || self.skewed.contains(&runner)
                || self.skewed_boots.contains(&boot);
            if let (false, Some(life)) = (by_fault, life)
                && age + Duration::from_secs(5) < life
            {
                self.violate(format!(
                    "a running job's VM destroyed: job {job} on {runner} (domain {domain}, {} old, max_lifetime {})",
                    secs(age),
                    secs(life)
                ));
            }
            // It ends with its runner (a hung job, too).
            self.completions.retain(|(_, j)| *j != job);
            let mut hub = self.hub.lock();
            if let Some(j) = hub.jobs.get_mut(&job).filter(|j| j.status == GStatus::InProgress) {
                j.status = GStatus::Completed("failure".into());
                hub.emit(job, "completed", Duration::from_secs(30));
                hub.post(job, github::Kind::Completed("failed"));
            }
        }
    }

    /// Runners (by name) whose guest's domain is paused ([`crate::hypervisor::Hypervisor::suspend`]):
    /// they do nothing until it runs again.
    fn frozen_guests(&self) -> BTreeSet<String> {
        let s = self.fake.lock();
        if s.frozen.is_empty() {
            return BTreeSet::new();
        }
        self.guests.iter().filter(|(_, g)| s.frozen.contains(&g.boot)).map(|(n, _)| n.clone()).collect()
    }

    /// GitHub gives each idle online runner the oldest queued job its labels cover (a
    /// frozen one polls for none).
    fn assign(&mut self, now: Duration) {
        let mut started = Vec::new();
        let frozen = self.frozen_guests();
        {
            let mut hub = self.hub.lock();
            let idle: Vec<u64> = hub
                .runners
                .values()
                .filter(|r| r.online && r.job.is_none() && !frozen.contains(&r.name))
                .map(|r| r.id)
                .collect();
            for id in idle {
                let labels = hub.runners[&id].labels.clone();
                // A scale set's runner takes the jobs its set acquired; another runner, none
                // routed to a set.
                let set = hub.runners[&id].scale_set;
                let job = hub
                    .jobs
                    .values()
                    .filter(|j| j.status == GStatus::Queued)
                    .filter(|j| hub.in_scope(j))
                    .filter(|j| match (set, &j.routed) {
                        (Some(set), Some(r)) => r.set == set && r.acquired(),
                        (None, None) => crate::model::label_set(&j.labels).iter().all(|l| labels.contains(l)),
                        _ => false,
                    })
                    .min_by_key(|j| (j.queued_at, j.id))
                    .map(|j| j.id);
                let Some(job) = job else { continue };
                let name = hub.runners[&id].name.clone();
                hub.runners.get_mut(&id).expect("listed").job = Some(job);
                let j = hub.jobs.get_mut(&job).expect("listed");
                j.status = GStatus::InProgress;
                j.runner = Some(name.clone());
                j.taken += 1;
                hub.emit(job, "in_progress", Duration::from_millis(200));
                hub.post(job, github::Kind::Started);
                started.push((job, name));
            }
        }
        for (job, runner) in started {
            let took = match self.rng.u8(0..50) {
                // A job that hangs (a test waiting on a network that never answers) ends
                // only when its VM does: at its pool's max_lifetime (`check_lifetimes`).
                0 if self.opts.faults => HUNG,
                n if n < 35 => Duration::from_millis(self.rng.u64(2_000..=60_000)),
                _ => Duration::from_millis(self.rng.u64(60_000..=360_000)),
            };
            self.completions.push((now + took, job));
            self.note(format!("job {job} taken by {runner} for {}", secs(took)));
        }
    }

    /// Jobs whose time is up complete: their runner goes and its guest powers off. (One
    /// whose guest is frozen completes a second after it runs again, at the earliest.)
    fn finish_due(&mut self, now: Duration) {
        let frozen = self.frozen_guests();
        if !frozen.is_empty() {
            let hub = self.hub.lock();
            for (t, job) in &mut self.completions {
                if *t <= now && hub.jobs.get(job).and_then(|j| j.runner.as_ref()).is_some_and(|r| frozen.contains(r)) {
                    *t = now + Duration::from_secs(1);
                }
            }
        }
        let due: Vec<u64> = self.completions.iter().filter(|(t, _)| *t <= now).map(|(_, j)| *j).collect();
        self.completions.retain(|(t, _)| *t > now);
        for job in due {
            let runner = {
                let mut hub = self.hub.lock();
                let Some(j) = hub.jobs.get_mut(&job) else { continue };
                let runner = j.runner.clone();
                if j.status == GStatus::InProgress {
                    j.status = GStatus::Completed("success".into());
                    hub.emit(job, "completed", Duration::from_millis(300));
                    hub.post(job, github::Kind::Completed("succeeded"));
                }
                // GitHub removes an ephemeral runner once its job is done.
                if let Some(id) = runner.as_deref().and_then(|n| hub.runner_named(n)).map(|r| r.id) {
                    hub.runners.remove(&id);
                }
                runner
            };
            let guest = runner.and_then(|r| self.guests.remove(&r));
            // Its guest powers off (unless its boot ended: a domain of its name may run another
            // VM); libvirt's event is lost now and then.
            if let Some(domain) = guest.filter(|g| self.fake.lock().runs_in(&g.domain, g.boot)).map(|g| g.domain) {
                // No event reaches the agent while libvirt is away (its connection is gone).
                if (self.opts.faults && self.rng.u8(0..10) == 0) || self.fake.lock().unavailable {
                    if let Some(d) = self.fake.lock().domains.get_mut(&domain) {
                        d.0 = DomainState::Stopped;
                    }
                    self.note(format!("{domain} powered off (its event lost)"));
                } else {
                    self.fake.stop(&domain);
                }
            }
        }
    }

    /// Deliveries due are posted to the agent's intake (some lost, some twice); GitHub logs
    /// each with the answer.
    async fn post_due(&mut self, app: &axum::Router, now: Duration) {
        let mut due: Vec<(Duration, github::Hook)> = {
            let mut hub = self.hub.lock();
            let (due, later): (Vec<_>, Vec<_>) =
                std::mem::take(&mut hub.outbox).into_iter().partition(|(t, _)| *t <= now);
            hub.outbox = later;
            due
        };
        due.sort_by_key(|(t, h)| (*t, h.id));
        for (_, hook) in due {
            // GitHub's duplicate sent later is posted as it is (its faults were drawn with
            // the delivery it copies; the world's own stream draws nothing for it).
            let lost = !hook.copy && self.opts.faults && self.rng.u8(0..25) == 0;
            let mut twice = !hook.copy && self.opts.faults && self.rng.u8(0..25) == 0;
            // Half of GitHub's duplicates come later, up to ten minutes (after a restart of
            // the agent, a reload, the job's next delivery).
            if twice {
                let mut hub = self.hub.lock();
                if let Some(later) = hub.late.as_mut().and_then(|r| r.bool().then(|| r.u64(1..=600))) {
                    twice = false;
                    let copy = github::Hook { copy: true, ..hook.clone() };
                    hub.outbox.push((now + Duration::from_secs(later), copy));
                }
            }
            self.post_hook(app, &hook, lost, twice).await;
        }
    }

    /// Posts one delivery (`lost`: GitHub gets no answer and logs it failed; `twice`: it is
    /// posted once more, as GitHub does now and then). A lost delivery posted twice was
    /// taken by the agent all the same.
    async fn post_hook(&mut self, app: &axum::Router, hook: &github::Hook, lost: bool, twice: bool) {
        // A process that died (writing an earlier delivery of this turn) answers nothing.
        let code = if lost || self.disk.dead() { 0 } else { post(app, hook).await };
        let again = if twice && !self.disk.dead() { post(app, hook).await } else { 0 };
        if lost || !(200..300).contains(&code) {
            self.note(format!("delivery {} ({} {}) answered {code}", hook.id, hook.guid, hook.action));
        }
        let mut hub = self.hub.lock();
        // GitHub's own duplicate is not in its log twice.
        if !hook.copy {
            hub.logged(hook, code);
        }
        hub.answered(hook, code);
        hub.answered(hook, again);
    }

    fn new_jobs(&mut self, n: u32) {
        let now = self.t;
        for _ in 0..n {
            let labels: Vec<String> = match self.rng.u8(0..20) {
                0 => NO_POOL.iter().map(|s| s.to_string()).collect(),
                1 => ANY_RUNNER.iter().map(|s| s.to_string()).collect(),
                _ => {
                    let p = &self.config.pools[self.rng.usize(0..self.config.pools.len())];
                    p.labels.clone()
                }
            };
            let set = crate::model::label_set(&labels);
            let pool = self
                .config
                .pools
                .iter()
                .find(|p| !p.retiring && crate::model::label_set(&p.labels) == set)
                .map(|p| p.name.clone());
            let repository = github::REPOS[self.rng.usize(0..github::REPOS.len())].to_string();
            let id = self.queue_job(github::Job {
                id: 0,
                run_id: 0,
                run_attempt: 1,
                labels,
                repository,
                pool: pool.clone(),
                status: GStatus::Queued,
                queued_at: now,
                runner: None,
                taken: 0,
                routed: None,
            });
            self.note(format!("job {id} queued for {}", pool.as_deref().unwrap_or("no pool")));
        }
    }

    /// A job queued at GitHub under the next id (a new run's unless `job` names one), its
    /// delivery on its way.
    fn queue_job(&mut self, mut job: github::Job) -> u64 {
        self.next_job += 1;
        self.jobs += 1;
        job.id = self.next_job;
        if job.run_id == 0 {
            job.run_id = job.id * 10;
        }
        let delay = self.hook_delay();
        let mut hub = self.hub.lock();
        hub.jobs.insert(job.id, job.clone());
        hub.emit(job.id, "queued", delay);
        // A scale set's labels cover it: offered to the set (GitHub sends its webhooks too).
        hub.route(job.id);
        job.id
    }

    /// How late a delivery arrives: at once mostly, minutes late now and then.
    fn hook_delay(&mut self) -> Duration {
        if self.opts.faults && self.rng.u8(0..30) == 0 {
            Duration::from_secs(self.rng.u64(30..=1200))
        } else {
            Duration::from_millis(self.rng.u64(50..=1500))
        }
    }

    fn cancel(&mut self) {
        let mut hub = self.hub.lock();
        let open: Vec<u64> =
            hub.jobs.values().filter(|j| !matches!(j.status, GStatus::Completed(_))).map(|j| j.id).collect();
        if open.is_empty() {
            return;
        }
        let id = open[self.rng.usize(0..open.len())];
        let j = hub.jobs.get_mut(&id).expect("listed");
        let was = j.status.clone();
        j.status = GStatus::Completed("cancelled".into());
        let runner = j.runner.clone();
        hub.emit(id, "completed", Duration::from_millis(300));
        hub.post(id, github::Kind::Completed("canceled"));
        drop(hub);
        if was == GStatus::InProgress {
            // Its runner stops the job and finishes now.
            self.completions.retain(|(_, j)| *j != id);
            let now = self.t;
            self.completions.push((now, id));
        }
        self.note(format!("job {id} cancelled ({was:?}, runner {runner:?})"));
    }

    /// A queued job's run is deleted (or its repository): GitHub forgets the job and sends
    /// nothing. The agent learns it when it asks after the job (`not_found`); a VM it made
    /// or bound for it goes as any surplus one.
    fn vanish(&mut self) {
        let mut hub = self.hub.lock();
        let queued: Vec<u64> =
            hub.jobs.values().filter(|j| j.status == GStatus::Queued && j.runner.is_none()).map(|j| j.id).collect();
        if queued.is_empty() {
            return;
        }
        let id = queued[self.rng.usize(0..queued.len())];
        // A scale set's request for it ends with it (assumed: the service cancels the
        // requests of a run deleted; the agent cannot ask the REST API about a request).
        hub.post(id, github::Kind::Completed("canceled"));
        hub.jobs.remove(&id);
        drop(hub);
        self.note(format!("job {id} gone: its run deleted"));
    }

    /// A finished run is re-run: a new job of the same run.
    fn rerun(&mut self) {
        let done: Vec<u64> = {
            let hub = self.hub.lock();
            hub.jobs.values().filter(|j| matches!(j.status, GStatus::Completed(_))).map(|j| j.id).collect()
        };
        if done.is_empty() {
            return;
        }
        let old = self.hub.lock().jobs[&done[self.rng.usize(0..done.len())]].clone();
        let id = self.queue_job(github::Job {
            run_attempt: old.run_attempt + 1,
            status: GStatus::Queued,
            queued_at: self.t,
            runner: None,
            taken: 0,
            routed: None,
            ..old.clone()
        });
        self.note(format!("job {id} queued (re-run of {})", old.id));
    }

    fn running_domains(&self) -> Vec<String> {
        self.fake.running()
    }

    fn inject(&mut self, f: Fault) {
        self.faults += 1;
        let now = self.t;
        let what = match f {
            Fault::GitHub5xx | Fault::GitHubTimeout | Fault::GitHubRateLimit => {
                let mut hub = self.hub.lock();
                let kind = match f {
                    Fault::GitHub5xx => GhFault::ServerError,
                    // Half the timeouts come after the call took effect.
                    Fault::GitHubTimeout if hub.late.as_mut().is_some_and(|r| r.bool()) => GhFault::LostAnswer,
                    Fault::GitHubTimeout => GhFault::Timeout,
                    _ => GhFault::RateLimit,
                };
                let n = self.rng.u32(1..=6);
                hub.fault = Some((kind, n));
                drop(hub);
                format!("GitHub: next {n} calls {kind:?}")
            }
            Fault::HvFail => {
                let n = self.rng.u32(1..=5);
                self.hv.arm().fail += n;
                // Half the time, teardowns cut short too (drawn from `added`).
                let r = &mut self.added;
                let left: Vec<u8> = match r.bool() {
                    true => (0..r.u32(1..=3)).map(|_| r.u8(1..8)).collect(),
                    false => Vec::new(),
                };
                let partial = match left.is_empty() {
                    true => String::new(),
                    false => format!(
                        "; next {} teardowns cut short after the domain, volumes left (overlay 1, seed 2, saved 4) {left:?}",
                        left.len()
                    ),
                };
                self.hv.arm().partial.extend(left);
                format!("libvirt: next {n} calls fail{partial}")
            }
            Fault::HvPanic => {
                const OPS: &[&str] =
                    &["define", "start", "teardown", "list_vms", "deliver", "guest_waiting", "create_overlay", "save"];
                let mut op = OPS[self.rng.usize(0..OPS.len())];
                // A teardown's pause and resume panic as its destroy may (drawn on the stream
                // of their own: the main stream's draws stay as they were).
                if op == "teardown" {
                    op = ["teardown", "suspend", "resume"][self.added.usize(0..3)];
                }
                self.hv.arm().panic = Some(op);
                format!("libvirt: next {op} panics")
            }
            Fault::HvDown => {
                let down = Duration::from_secs(self.rng.u64(5..=300));
                self.fake.lock().unavailable = true;
                self.fake.send(HvEvent::Disconnected);
                self.hv_up_at = Some(now + down);
                format!("libvirt: down for {}", secs(down))
            }
            Fault::HvSlow => {
                let n = self.rng.u32(1..=4);
                self.slow.fetch_add(n, Ordering::Relaxed);
                format!("libvirt: next {n} calls hang for minutes")
            }
            Fault::GuestDeaf | Fault::AckLost => {
                let running = self.running_domains();
                if running.is_empty() {
                    return;
                }
                let d = running[self.rng.usize(0..running.len())].clone();
                let mut s = self.fake.lock();
                if f == Fault::GuestDeaf {
                    s.guests_deaf.insert(d.clone());
                } else {
                    s.acks_lost.insert(d.clone());
                }
                format!("guest {d}: {f:?}")
            }
            Fault::RunnerNeverOnline => {
                self.never_online += 1;
                "the next runner started never comes online".into()
            }
            Fault::VmCrash | Fault::DiskFull => {
                let running = self.running_domains();
                if running.is_empty() {
                    return;
                }
                let d = running[self.rng.usize(0..running.len())].clone();
                let boot = self.fake.lock().boot_of(&d).expect("drawn from the running domains");
                self.killed.insert((d.clone(), boot));
                let event = self.rng.bool() && !self.fake.lock().unavailable;
                if f == Fault::VmCrash {
                    if event {
                        self.fake.stop(&d);
                    } else if let Some(x) = self.fake.lock().domains.get_mut(&d) {
                        x.0 = DomainState::Stopped;
                    }
                } else {
                    self.fake.io_pause(&d, event);
                }
                format!("{d}: {f:?} (event {})", if event { "sent" } else { "lost" })
            }
            Fault::AgentKilled => {
                if self.rng.bool() {
                    return self.kill("killed");
                }
                let n = self.rng.u32(0..40);
                self.disk.die_after(n);
                format!("the agent dies at its {n}th write from now")
            }
            Fault::ClockStep => {
                // Forward up to 3 h (a host booted with its RTC behind), or back up to 1 h.
                let secs_by = |s: u64| s as i64 * 1_000_000_000;
                let by = match self.rng.u32(0..3) {
                    0 => Step(-secs_by(self.rng.u64(60..=3600))),
                    _ => Step(secs_by(self.rng.u64(60..=3 * 3600))),
                };
                // A domain's metadata says when its VM was made on the host's clock: those
                // made before the step are read with the clock as it was. A VM on its way
                // (recorded, its domain not defined yet) may write the time its record was
                // made before the step into its domain, which the world reads after: how old
                // it is the world cannot tell, the agent can. Judged by the agent's VMs and
                // the domains as they are at the step (this turn's status may predate a VM:
                // seed 48799 of 1,000 steps); one recorded after it is judged as any other.
                let before = self.fresh_status();
                self.see_domains();
                let defined: BTreeSet<String> = self.fake.lock().domains.keys().cloned().collect();
                self.time.step_host_clock(by);
                self.status_cache = None;
                for v in before.map(|s| s.vms).unwrap_or_default() {
                    let domain = v.slot.as_ref().unwrap_or(&v.name);
                    if !defined.contains(domain) {
                        self.skewed.insert(v.name);
                    }
                }
                // So may a binding under way into a boot restored into a slot describe it
                // (with the record it took before the step).
                let a = self.hv.arm();
                let undescribed = a.restored_as.keys().filter(|b| !a.made.contains_key(b));
                self.skewed_boots.extend(undescribed);
                format!("host clock stepped {by}")
            }
            Fault::Reload => return self.reload(),
            Fault::Drain => {
                let d = Duration::from_secs(self.rng.u64(10..=1800));
                if self.undrain_at.is_some() {
                    return;
                }
                match self.admin_drain(true) {
                    Some(true) => self.undrain_at = Some(now + d),
                    Some(false) => return,
                    None => {
                        self.drain_unanswered = Some(d);
                        return;
                    }
                }
                format!("the operator drains the agent for {}", secs(d))
            }
            Fault::StoreFull => {
                let d = Duration::from_secs(self.rng.u64(1..=120));
                self.disk.set_full(true);
                self.store_room_at = Some(now + d);
                format!("the store's file system full for {}", secs(d))
            }
        };
        self.note(format!("fault: {what}"));
    }

    /// SIGHUP with a changed configuration: a pool's caps, warm count, timers or slots; or a pool
    /// removed, or one added (under a name and labels no pool of this run had: a removed
    /// pool's jobs are dropped, and GitHub keeps them queued).
    fn reload(&mut self) {
        let mut config = (*self.config).clone();
        let unused_labels: Vec<&[&str]> = LABEL_SETS
            .iter()
            .copied()
            .filter(|l| {
                !self.pools_ever.iter().any(|(_, labels, _)| crate::model::label_set(labels) == label_set_of(l))
            })
            .collect();
        let unused_name = POOL_NAMES.iter().find(|n| !self.pools_ever.iter().any(|(p, _, _)| p == *n));
        // A scale-set pool stays as it is (a reload that adds, removes or changes one waits
        // for a restart).
        let webhook: Vec<usize> = (0..config.pools.len()).filter(|i| config.pools[*i].scale_set().is_none()).collect();
        let what = match self.rng.u8(0..5) {
            0 if webhook.len() > 1 => {
                let gone = config.pools.remove(webhook[self.rng.usize(0..webhook.len())]);
                format!("reload: pool {} removed", gone.name)
            }
            1 if webhook.len() < 3 && !unused_labels.is_empty() && unused_name.is_some() => {
                let mut p = config.pools[webhook[0]].clone();
                p.name = unused_name.expect("checked").to_string();
                p.labels =
                    unused_labels[self.rng.usize(0..unused_labels.len())].iter().map(|l| l.to_string()).collect();
                p.max_vms = self.rng.usize(1..=4);
                p.max_vms_per_repository = p.max_vms_per_repository.map(|n| n.min(p.max_vms));
                p.warm = if self.rng.bool() { 0 } else { self.rng.usize(0..=p.max_vms.min(2)) };
                p.snapshot_slots = if self.rng.u8(0..4) == 0 { self.rng.usize(1..=2) } else { 0 };
                let what = format!(
                    "reload: pool {} added, labels {:?} max_vms={} warm={}",
                    p.name, p.labels, p.max_vms, p.warm
                );
                config.pools.push(p);
                what
            }
            _ => {
                let i = webhook[self.rng.usize(0..webhook.len())];
                let p = &mut config.pools[i];
                p.max_vms = self.rng.usize(1..=4);
                p.max_vms_per_repository = p.max_vms_per_repository.map(|n| n.min(p.max_vms));
                p.warm = self.rng.usize(0..=p.max_vms.min(2));
                p.idle_timeout = Duration::from_secs(self.rng.u64(20..=300));
                // A quarter of them change its snapshot slots too (drawn from `added`): slots
                // made, or removed while VMs restored from them run.
                if self.added.u8(0..4) == 0 {
                    p.snapshot_slots = self.added.usize(0..=2);
                }
                format!(
                    "reload: {} max_vms={} warm={} idle={} slots={}",
                    p.name,
                    p.max_vms,
                    p.warm,
                    secs(p.idle_timeout),
                    p.snapshot_slots
                )
            }
        };
        if config.validate().is_err() {
            return;
        }
        for p in &config.pools {
            if !self.pools_ever.iter().any(|(n, _, _)| n == &p.name) {
                self.pools_ever.push((p.name.clone(), p.labels.clone(), p.max_lifetime));
            }
        }
        let config = Arc::new(config);
        let Some(inc) = self.inc.take() else { return };
        let (tx, rx) = oneshot::channel();
        let _ = inc.reloads.send((config.clone(), tx));
        let report = inc.rt.block_on(rx);
        self.status_cache = None;
        self.inc = Some(inc);
        self.faults += 1;
        self.note(format!("fault: {what} → {:?}", report.as_ref().map(|r| format!("{r:?}"))));
        for p in &config.pools {
            let cap = self.caps.entry(p.name.clone()).or_insert(p.max_vms);
            *cap = (*cap).max(p.max_vms);
            if let Some(n) = p.max_vms_per_repository {
                let cap = self.repo_caps.entry(p.name.clone()).or_insert(n);
                *cap = (*cap).max(n);
            }
            let idle = self.idle_timeouts.entry(p.name.clone()).or_insert(p.idle_timeout);
            *idle = (*idle).max(p.idle_timeout);
        }
        self.config = config;
    }

    /// Once the world healed, a stopped domain (its guest powered off or crashed, libvirt's
    /// event lost or not) is torn down within two sweeps and some slack (a teardown in
    /// hand, a start that hung until then): the sweep reaps what no event told of, long
    /// before `max_lifetime` would.
    fn check_stopped(&mut self, now: Duration) {
        let stopped: BTreeSet<(String, usize)> = {
            let fake = self.fake.lock();
            fake.domains
                .iter()
                .filter(|(_, (state, _))| *state == DomainState::Stopped)
                .map(|(n, _)| (n.clone(), fake.boots.get(n).copied().unwrap_or_default()))
                .collect()
        };
        self.stopped_since.retain(|d, _| stopped.contains(d));
        for d in stopped {
            self.stopped_since.entry(d).or_insert(now);
        }
        let Some(settled) = self.settled_at else { return };
        let bound = self.config.reconcile.sweep_interval * 2 + Duration::from_secs(600);
        let late = self.stopped_since.iter().find(|(_, since)| now.saturating_sub((**since).max(settled)) > bound);
        if let Some(((d, _), since)) = late {
            let what = format!(
                "domain {d} stopped at {} is still there at {}, the world healed at {} (bound {})",
                secs(*since),
                secs(now),
                secs(settled),
                secs(bound)
            );
            self.violate(what);
        }
    }

    /// Notes the domains not seen before: when, their pool, and when their VM was made.
    fn see_domains(&mut self) {
        let now = self.t;
        let mut fake = self.fake.lock();
        let unseen: Vec<(String, String)> = fake
            .domains
            .iter()
            .filter(|(name, _)| !self.domains_seen.contains_key(*name))
            .map(|(name, (_, xml))| (name.clone(), xml.clone()))
            .collect();
        for (name, xml) in unseen {
            let md = fake.metadata_of(&xml);
            if let Some(m) = &md {
                self.domains_created.insert(name.clone(), self.time.host_to_virtual(m.created));
            }
            self.domains_seen.insert(name, (now, md.map(|m| m.pool).unwrap_or_default()));
        }
    }

    /// Invariants after every step.
    fn check_step(&mut self) {
        if let Some(p) = PANICS.with(|p| p.borrow().first().cloned()) {
            return self.violate(format!("panic: {p}"));
        }
        if self.fake.lock().delivered_unmarked > 0 {
            return self.violate(
                "a runner command went into a domain whose metadata still said warm, no job (its record lost, it would be bound again)".into(),
            );
        }
        let Some(inc) = &self.inc else { return };
        if inc.agent.as_ref().is_some_and(|a| a.scheduler_finished()) {
            return self.violate("the scheduler task ended".into());
        }
        let now = self.t;
        let mut per_pool: BTreeMap<String, usize> = BTreeMap::new();
        let domains: Vec<(String, String)> = {
            let s = self.fake.lock();
            s.domains.iter().map(|(n, (_, xml))| (n.clone(), xml.clone())).collect()
        };
        self.see_domains();
        for (name, _) in &domains {
            let pool = self.domains_seen.get(name).map(|(_, p)| p.clone()).unwrap_or_default();
            *per_pool.entry(pool).or_default() += 1;
        }
        for (pool, n) in &per_pool {
            let now_cap = self.config.pools.iter().find(|p| &p.name == pool).map(|p| p.max_vms);
            let cap = self.caps.get(pool).copied().or(now_cap).unwrap_or(0);
            if *n > cap {
                let mine: Vec<String> = domains
                    .iter()
                    .filter(|(d, _)| self.domains_seen.get(d).is_some_and(|(_, p)| p == pool))
                    .map(|(d, _)| d.clone())
                    .collect();
                let agent: Vec<String> = self.status().map(|s| vm_list(&s)).unwrap_or_default();
                return self.violate(format!(
                    "pool {pool} has {n} VMs, more than max_vms {cap}: {mine:?}; the agent's: {agent:?}"
                ));
            }
        }
        // No repository has more VMs of a pool than its max_vms_per_repository, counted
        // among the agent's records of VMs that hold resources. After a reload lowered it,
        // the old one holds until every repository's VMs of the pool fit the new.
        if !self.repo_caps.is_empty()
            && let Some(status) = self.status()
        {
            let mut by_repo: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
            for v in status.vms.iter().filter(|v| self.holds(v, &domains)) {
                if let Some(repo) = repo_of(v) {
                    by_repo.entry((v.pool.as_str(), repo.as_str())).or_default().push(v.name.as_str());
                }
            }
            for ((pool, repo), vms) in &by_repo {
                if let Some(cap) = self.repo_caps.get(*pool).filter(|cap| vms.len() > **cap) {
                    return self.violate(format!(
                        "pool {pool} has {} VMs for {repo}, more than max_vms_per_repository {cap}: {vms:?}",
                        vms.len()
                    ));
                }
            }
            for p in &self.config.pools {
                if let Some(new) = p.max_vms_per_repository
                    && self.repo_caps.get(&p.name).is_some_and(|c| *c > new)
                    && by_repo.iter().all(|((pool, _), vms)| *pool != p.name || vms.len() <= new)
                {
                    self.repo_caps.insert(p.name.clone(), new);
                }
            }
        }
        // After a reload lowered a pool's cap, VMs the agent had on their way (a start that
        // hangs in libvirt) still come: the old cap holds until the agent's own records of
        // the pool (its status: every VM, those without a domain yet too) fit the new one.
        let lowered: Vec<(String, usize)> = self
            .config
            .pools
            .iter()
            .filter(|p| self.caps.get(&p.name).is_some_and(|c| *c > p.max_vms))
            .map(|p| (p.name.clone(), p.max_vms))
            .collect();
        if !lowered.is_empty()
            && let Some(status) = self.status()
        {
            for (pool, new) in lowered {
                if status.vms.iter().filter(|v| v.pool == pool).count() <= new
                    && per_pool.get(&pool).copied().unwrap_or(0) <= new
                {
                    self.caps.insert(pool, new);
                }
            }
        }
        if let Some(cap) = self.config.capacity.max_vms
            && domains.len() > cap
        {
            return self.violate(format!("{} VMs on the host, more than capacity.max_vms {cap}", domains.len()));
        }
        self.check_stopped(now);
        if self.violation.is_some() {
            return;
        }
        if let Some(settled) = self.settled_at {
            self.check_surplus(now, settled);
            if self.violation.is_some() {
                return;
            }
            self.check_lifetimes(now, settled);
            if self.violation.is_some() {
                return;
            }
        }
        self.check_reaps();
        if self.violation.is_some() {
            return;
        }
        // GitHub's API budget: an App's installation may make 5,000 calls an hour (a
        // loop that asks again and again spends it, and no runner is made after). Over the
        // last hour at every check (steps are a minute at most).
        let calls = self.hub.lock().calls;
        let hour = Duration::from_secs(3600);
        self.api_calls.push_back((now, calls));
        while self.api_calls.get(1).is_some_and(|(t, _)| *t + hour <= now) {
            self.api_calls.pop_front();
        }
        let since = self.api_calls.front().filter(|(t, _)| *t + hour <= now).map_or(0, |(_, n)| *n);
        let last_hour = calls - since;
        self.busiest_hour = self.busiest_hour.max(last_hour);
        if last_hour > API_BUDGET {
            let by = format!("{:?}", self.hub.lock().calls_by);
            return self.violate(format!(
                "{last_hour} GitHub API calls in the hour up to {}, more than {API_BUDGET} (all calls of the run: {by})",
                secs(now)
            ));
        }
        let hub = self.hub.lock();
        if let Some(j) = hub.jobs.values().find(|j| j.taken > 1) {
            let id = j.id;
            drop(hub);
            self.violate(format!("job {id} taken by more than one runner"));
        }
    }

    /// Whether the agent's record `v` is a VM that counts toward its caps: its domain is
    /// defined (a slot's: running this VM, or stopped), or it is on its way. A record the
    /// store kept of a VM torn down while the store could not write, read again at a
    /// restart, is not (the agent's first sweep forgets it: seed 2,150 of 1,000 steps); nor
    /// is one whose domain is gone, its volumes left by a teardown cut short.
    fn holds(&self, v: &crate::admin::proto::VmStatus, domains: &[(String, String)]) -> bool {
        if v.state == crate::model::VmState::Provisioning.as_str() {
            return true;
        }
        let domain = v.slot.as_ref().unwrap_or(&v.name);
        if !domains.iter().any(|(d, _)| d == domain) {
            return false;
        }
        let boot = self.fake.lock().boot_of(domain);
        v.slot.is_none() || boot.is_none_or(|b| self.hv.arm().restored_as.get(&b) == Some(&v.name))
    }

    /// The agent tears a VM down as stopped only if its domain is: one whose domain still
    /// ran was reaped on a stale look (a sweep's listing from before the domain started),
    /// and a boot was thrown away. Asked of the agent's timeline, which gives each VM's
    /// reason (a VM whose trace a restart took is not judged).
    fn check_reaps(&mut self) {
        let torn = std::mem::take(&mut self.hv.arm().torn_running);
        if torn.is_empty() {
            return;
        }
        let Some(traces) = self.timeline() else { return };
        for (domain, boot) in torn {
            // A slot's domain runs the VMs restored into it, each of its own name.
            let vm = self.hv.arm().restored_as.get(&boot).cloned().unwrap_or_else(|| domain.clone());
            let stopped = traces.iter().rev().find(|t| t.vm == vm).and_then(|t| t.reason.as_deref()) == Some("stopped");
            if stopped && !self.killed.contains(&(domain.clone(), boot)) {
                return self.violate(format!("VM {vm} (domain {domain}) torn down as stopped while its domain ran"));
            }
        }
    }

    /// The agent's timeline: every VM's trace it keeps.
    fn timeline(&mut self) -> Option<Vec<crate::timeline::Trace>> {
        match self.ask(AdminCommand::Timeline)? {
            Reply::Timeline(t) => Some(t),
            _ => None,
        }
    }

    /// Once healed (and its teardowns had time to be retried), no VM outlives its pool's
    /// `max_lifetime` by more than `stop_grace` and a sweep: in virtual time, from when its
    /// domain says it was made (a step of the host's clock holds none back).
    fn check_lifetimes(&mut self, now: Duration, settled: Duration) {
        let slack = Duration::from_secs(600);
        if now < settled + slack {
            return;
        }
        let Some(status) = self.status() else { return };
        for v in status.vms.iter().filter(|v| !v.for_slot) {
            // A VM restored into a slot is as old as its binding described it (its domain's
            // name comes back, and its first sighting and metadata are the slot's VM's).
            let made = match &v.slot {
                // One on its way at a step of the host's clock says when it was made on the
                // clock before the step, read after it: it is at least as old as its domain
                // was seen (seed 21836 of 2,000 steps: a warm VM whose start hung across a
                // step, judged an hour older than it was).
                None if self.skewed.contains(&v.name) => self.domains_seen.get(&v.name).map(|(t, _)| *t),
                None => self.domains_created.get(&v.name).copied(),
                Some(slot) => self.restored_made(slot, &v.name),
            };
            let Some(made) = made else { continue };
            let life = match self.config.pool(&v.pool) {
                Some(pool) => pool.max_lifetime,
                // A removed pool's VMs go by its timers, or, once the agent restarted, by
                // the defaults (`PoolConfig::retiring`): at most the longer, the default.
                None => retired_lifetime(),
            };
            let bound = life + self.config.reconcile.stop_grace + self.config.reconcile.sweep_interval + slack;
            if now.saturating_sub(made) > bound {
                return self.violate(format!(
                    "VM {} ({}) {} old, max_lifetime {}: a timer held back",
                    v.name,
                    v.state,
                    secs(now.saturating_sub(made)),
                    secs(life)
                ));
            }
        }
    }

    /// When the VM `vm` running in `slot`'s domain now was made, as its binding described it
    /// (`None`: not restored there, not described, or described across a clock step).
    fn restored_made(&self, slot: &str, vm: &str) -> Option<Duration> {
        let boot = self.fake.lock().boot_of(slot)?;
        let a = self.hv.arm();
        let this = a.restored_as.get(&boot).is_some_and(|n| n == vm) && !self.skewed_boots.contains(&boot);
        a.made.get(&boot).copied().filter(|_| this)
    }

    /// What the surplus check allows beyond a pool's `idle_timeout`: the time the agent
    /// needs to see a runner surplus (two GitHub syncs, a sweep) and slack.
    fn surplus_slack(&self) -> Duration {
        // Without a hook a job whose `completed` delivery was lost is asked about once it
        // has had no news for 15 minutes while webhooks flow (`sync::refresh_after`).
        let unhooked = match self.config.github.hook {
            Some(_) => Duration::ZERO,
            None => crate::scheduler::sync::UNHOOKED_RECHECK,
        };
        self.config.reconcile.github_interval * 2
            + unhooked
            + self.config.reconcile.sweep_interval
            + Duration::from_secs(60)
    }

    /// Once the world is healed: a runner online with nothing to do (no queued job its
    /// labels cover: GitHub would give it one) is surplus, and goes within its pool's
    /// `idle_timeout` and the time the agent needs to see it (a GitHub sync, a sweep),
    /// counted from when the agent last had a job of its pool queued or its hypervisor not
    /// ready.
    fn check_surplus(&mut self, now: Duration, settled: Duration) {
        let slack = self.surplus_slack();
        let idle: Vec<(String, String)> = {
            let hub = self.hub.lock();
            hub.runners
                .values()
                .filter(|r| r.online && r.job.is_none())
                .filter_map(|r| Some((r.name.clone(), self.guests.get(&r.name)?.domain.clone())))
                .collect()
        };
        self.idle_since.retain(|name, _| idle.iter().any(|(n, _)| n == name));
        if idle.is_empty() {
            return;
        }
        // A runner is kept for a job of its pool the agent queues (one whose delivery was
        // lost and redelivered late, one gone from GitHub that no webhook says so, which
        // the agent drops on its second 404): surplus only from when none is left (seed
        // 22899 of 1,000 steps: a job's lost delivery redelivered 480 s after the world
        // healed, dropped 77 s later, the runner reaped its idle_timeout after that).
        if let Some(status) = self.status() {
            for q in &status.queued {
                self.pool_queued_at.insert(q.pool.clone(), now);
            }
        }
        // Nor does the agent plan while its hypervisor is not ready (libvirt lost, or just
        // started, and no sweep answered since: a sweep made before the world healed may
        // hang for minutes after it): surplus only from when a status last said so (seed
        // 55044 of 1,000 steps: a sweep hung 262 s past the healing, the runner reaped its
        // idle_timeout after the next; seed 49846: the agent's start waited 258 s past it
        // for its listing). A reaping GitHub's rate limit held back is retried as the
        // limit the agent was told of lifts, within the slack (seed 69541 of 1,000 steps:
        // retried at a back-off doubled to 300 s, the runner stayed 190 s past the
        // healing).
        let unready = self.hv_unready_seen.unwrap_or_default();
        for (name, domain) in idle {
            let since = *self.idle_since.entry(name.clone()).or_insert(now);
            let pool = self.domains_seen.get(&domain).map(|(_, p)| p.clone()).unwrap_or_default();
            let timeout = self.idle_timeouts.get(&pool).copied().unwrap_or_default();
            let queued_at = self.pool_queued_at.get(&pool).copied().unwrap_or_default();
            let waited = now.saturating_sub(since.max(settled).max(queued_at).max(unready));
            if waited > timeout + slack {
                let status = self.status();
                let queued: Vec<u64> =
                    status.iter().flat_map(|s| &s.queued).filter(|q| q.pool == pool).map(|q| q.job_id).collect();
                let libvirt = status.as_ref().map(|s| (s.libvirt_connected, s.hypervisor_problem.clone()));
                let agent = status.and_then(|s| s.vms.into_iter().find(|v| v.name == name));
                return self.violate(format!(
                    "surplus runner {name} (pool {pool}) idle for {} once healed: idle_timeout {} (and {} to see it); the agent's VM: {agent:?}, the pool's jobs it queues: {queued:?}, libvirt connected {libvirt:?}",
                    secs(waited),
                    secs(timeout),
                    secs(slack)
                ));
            }
        }
    }

    /// The world healed and the workload over: the agent must bring everything to rest.
    fn settle(&mut self) {
        self.note("settling: faults healed, no new jobs".into());
        self.hub.lock().fault = None;
        self.hub.lock().rate_limited_until = None;
        {
            let mut a = self.hv.arm();
            a.fail = 0;
            a.panic = None;
            a.partial.clear();
        }
        self.slow.store(0, Ordering::Relaxed);
        self.disk.set_full(false);
        self.disk.spare();
        self.store_room_at = None;
        if self.fake.lock().unavailable {
            self.fake.lock().unavailable = false;
            self.fake.send(HvEvent::Reconnected);
        }
        self.hv_up_at = None;
        // A death that came already is the agent's restart now, so that the healed world
        // starts with a live process (and the timers the checks allow start after it).
        // (Without it, the operator's undrain went to the dead one, unanswered, and the
        // agent was said to refuse it: seed 1749 of 1,000 steps, its death at a write of
        // the last step's checks.)
        self.restart_if_dead();
        self.settled_at = Some(self.t);
        if self.undrain_at.take().is_some() && self.admin_drain(false) != Some(true) {
            return self.violate("the agent refuses to undrain with its store healthy".into());
        }
        {
            let mut s = self.fake.lock();
            s.guests_deaf.clear();
            s.acks_lost.clear();
        }
        self.never_online = 0;
        let longest = self
            .config
            .pools
            .iter()
            .map(|p| p.idle_timeout.max(p.registration_timeout) + p.bind_timeout)
            .max()
            .unwrap_or_default();
        // Long enough, since the last job ended, for the next to be served (once more) and
        // every timer to run out (jobs last up to 10 minutes; back-off is at most minutes): a
        // backlog of a pool of one VM is served one job after another, for hours.
        // A hung job's VM goes at its pool's max_lifetime (a removed pool's: the default).
        let limit = (Duration::from_secs(4 * 3600) + longest * 4).max(retired_lifetime() + Duration::from_secs(3600));
        let mut start = self.t;
        let mut ended = self.jobs_ended();
        let quiet_faults = self.opts.faults;
        self.opts.faults = false;
        // Nor are deliveries late any more.
        self.hub.lock().late = None;
        let mut last;
        // At rest twice in a row, 10 s apart: what the agent took in just before a check
        // may not be in its status yet (a scale-set job acknowledged, its event in the
        // inbox until the next pass: seed 126780 of 1,000 steps was "at rest" between).
        let mut quiet_before = false;
        loop {
            self.advance(Duration::from_secs(10));
            self.restart_if_dead();
            self.check_step();
            if self.violation.is_some() {
                return;
            }
            let now = self.t;
            self.check_waiting(now);
            if self.violation.is_some() {
                return;
            }
            if self.jobs_ended() != ended {
                ended = self.jobs_ended();
                start = now;
            }
            let late = now - start > limit;
            match self.quiet(late) {
                Ok(()) if quiet_before => break,
                Ok(()) => {
                    quiet_before = true;
                    continue;
                }
                Err(why) => {
                    quiet_before = false;
                    last = why;
                }
            }
            if late {
                self.opts.faults = quiet_faults;
                return self.violate(format!(
                    "not at rest {} after the faults healed and {} after a job last ended: {last}",
                    secs(now - self.settled_at.unwrap_or_default()),
                    secs(limit)
                ));
            }
        }
        self.opts.faults = quiet_faults;
        self.note("at rest".into());
        self.check_at_rest();
    }

    /// Once healed (liveness): a job the agent queues gets a VM within a bound while its
    /// pool has room (fewer VMs than `max_vms`, the host below `capacity.max_vms`): the
    /// time a VM may take to fail (a registration or bind timeout), a back-off and a
    /// libvirt call still hanging from before, and slack.
    fn check_waiting(&mut self, now: Duration) {
        let Some(status) = self.status() else { return };
        let bound = self.config.pools.iter().map(|p| p.registration_timeout + p.bind_timeout).max().unwrap_or_default()
            + Duration::from_secs(600);
        let host_room = !status.draining && self.config.capacity.max_vms.is_none_or(|cap| status.vms.len() < cap);
        let dt = now.saturating_sub(self.waited_checked.unwrap_or(now));
        self.waited_checked = Some(now);
        let mut waited = BTreeMap::new();
        for q in &status.queued {
            // A VM of its own: not going (now or once provisioned), not running another job.
            let served = status.vms.iter().any(|v| {
                v.job_id == q.job_id
                    && v.state != "tearing_down"
                    && v.going.is_none()
                    && v.took_job.is_none_or(|j| j == q.job_id)
            });
            if served {
                continue;
            }
            let per_repo = self.config.pool(&q.pool).and_then(|p| p.max_vms_per_repository);
            let repo_vms =
                || status.vms.iter().filter(|v| v.pool == q.pool && repo_of(v) == Some(&q.repository)).count();
            let room = host_room
                && status.pools.iter().any(|p| p.name == q.pool && !p.retiring && p.vms < p.max_vms)
                && per_repo.is_none_or(|cap| repo_vms() < cap);
            let total =
                self.waited.get(&q.job_id).copied().unwrap_or_default() + if room { dt } else { Duration::ZERO };
            if total > bound {
                let vms = vm_list(&status);
                return self.violate(format!(
                    "job {} of pool {} has had no VM for {} while its pool had room (bound {}); the agent's VMs: {vms:?}",
                    q.job_id,
                    q.pool,
                    secs(total),
                    secs(bound)
                ));
            }
            waited.insert(q.job_id, total);
        }
        self.waited = waited;
    }

    /// The jobs of a pool (not retiring) still queued at GitHub.
    fn open_jobs(&self) -> Vec<u64> {
        let pools: BTreeSet<&str> = self.config.pools.iter().filter(|p| !p.retiring).map(|p| p.name.as_str()).collect();
        let hub = self.hub.lock();
        // Without a hook nothing reads the delivery log: a job whose deliveries all failed
        // never reaches the agent (GitHub does not retry them on its own).
        let delivered = self.config.github.hook.is_none().then_some(&hub.heard);
        // (A scale set's job reaches the agent through the set's messages, not the hook.)
        let unheard = |j: &&github::Job| j.routed.is_none() && delivered.as_ref().is_some_and(|d| !d.contains(&j.id));
        let open = hub.jobs.values().filter(|j| j.status == GStatus::Queued && hub.in_scope(j));
        open.filter(|j| j.pool.as_deref().is_some_and(|p| pools.contains(p)) && !unheard(j)).map(|j| j.id).collect()
    }

    /// The jobs ended on GitHub: each one's id in the agent (a scale set's request's),
    /// with its own.
    fn ended_jobs(&self) -> BTreeMap<u64, u64> {
        let hub = self.hub.lock();
        hub.jobs
            .values()
            .filter(|j| matches!(j.status, GStatus::Completed(_)))
            .map(|j| (hub.agent_id(j.id), j.id))
            .collect()
    }

    /// How many jobs have ended on GitHub (progress while settling).
    fn jobs_ended(&self) -> usize {
        self.ended_jobs().len()
    }

    /// Whether the world is at rest: every job of a pool ended, nothing left over.
    fn quiet(&mut self, detail: bool) -> Result<(), String> {
        let hub = self.hub.lock();
        if !hub.outbox.is_empty() || !self.completions.is_empty() {
            let hooks: Vec<String> =
                hub.outbox.iter().take(3).map(|(t, h)| format!("{} due {}", h.guid, secs(*t))).collect();
            let done: Vec<String> =
                self.completions.iter().take(3).map(|(t, j)| format!("job {j} at {}", secs(*t))).collect();
            return Err(format!("deliveries {hooks:?} or job ends {done:?} in flight"));
        }
        drop(hub);
        let open = self.open_jobs();
        if !open.is_empty() {
            // A job still queued at GitHub is at rest once the agent took its delivery (a
            // lost one the agent's sync redelivers) and gave it up (with a reason:
            // max_attempts), i.e. neither queues it nor has a VM for it; that it was given
            // up, not lost, the store says at the end (`check_at_rest`). It took one its
            // status showed, whatever it answered the delivery (`shown`).
            let Some(status) = self.status() else { return Err("the agent gives no status".into()) };
            let (taken, agent_ids) = {
                let hub = self.hub.lock();
                let ids: BTreeMap<u64, u64> = open.iter().map(|id| (*id, hub.agent_id(*id))).collect();
                (hub.heard.clone(), ids)
            };
            let serving: Vec<u64> = open
                .iter()
                .copied()
                .filter(|id| {
                    // A scale set's job is the agent's under its request's id.
                    let a = agent_ids[id];
                    !(taken.contains(id) || self.shown.contains(&a))
                        || status.queued.iter().any(|q| q.job_id == a)
                        || status.vms.iter().any(|v| v.job_id == a)
                })
                .collect();
            if !serving.is_empty() {
                let first: Vec<u64> = serving.iter().take(5).copied().collect();
                let mut why = format!("{} jobs never served, first {first:?}", serving.len());
                if detail {
                    let vms = vm_list(&status);
                    why.push_str(&format!(
                        "; agent: {} queued, VMs {vms:?}, libvirt connected {} problem {:?}, pools {:?}",
                        status.queued.len(),
                        status.libvirt_connected,
                        status.hypervisor_problem,
                        status.pools
                    ));
                }
                return Err(why);
            }
        }
        // Nor does the agent still queue a job GitHub ended (whose end it missed): it would
        // make VMs for it.
        let ended = self.ended_jobs();
        if !ended.is_empty() {
            let Some(status) = self.status() else { return Err("the agent gives no status".into()) };
            if let Some(q) = status.queued.iter().find(|q| ended.contains_key(&q.job_id)) {
                return Err(format!("the agent still queues job {}, which GitHub ended", q.job_id));
            }
        }
        let pools: BTreeSet<&str> = self.config.pools.iter().filter(|p| !p.retiring).map(|p| p.name.as_str()).collect();
        let hub = self.hub.lock();
        if let Some(r) = hub.runners.values().next() {
            return Err(format!("runner registration {} (id {}, online {}) outlives its job", r.name, r.id, r.online));
        }
        drop(hub);
        let s = self.fake.lock();
        for p in &self.config.pools {
            let mine: Vec<&String> = s
                .domains
                .keys()
                .filter(|d| self.domains_seen.get(*d).is_some_and(|(_, pool)| pool == &p.name))
                .collect();
            if mine.len() > p.warm {
                return Err(format!("pool {}: {} VMs at rest, warm = {}: {mine:?}", p.name, mine.len(), p.warm));
            }
        }
        // A teardown pauses a domain only while it asks GitHub, until its destroy or its
        // resume: none is left paused.
        if let Some(d) = s.domains.keys().find(|d| s.frozen(d)) {
            return Err(format!("domain {d} paused at rest (a teardown's pause never undone)"));
        }
        let known: BTreeSet<&str> = s.domains.keys().chain(s.saved.keys()).map(|d| d.as_str()).collect();
        if let Some(d) =
            s.domains.keys().find(|d| !self.domains_seen.get(*d).is_some_and(|(_, p)| pools.contains(p.as_str())))
        {
            return Err(format!("VM {d} of no pool at rest"));
        }
        if let Some(v) =
            s.volumes.iter().find(|v| !crate::hypervisor::vm_of_volume(v).is_some_and(|vm| known.contains(vm)))
        {
            return Err(format!("volume {v} outlives its VM"));
        }
        if let Some(h) = s.dhcp.as_ref().and_then(|d| d.hosts.iter().find(|h| !known.contains(h.vm.as_str()))) {
            return Err(format!("address {} reserved for {} outlives its VM", h.ip, h.vm));
        }
        drop(s);
        // Nothing on its way: every VM the agent has, has its domain (a provisioning that
        // hangs in libvirt finishes first; a clean stop would leave it to the next start).
        let Some(status) = self.status() else { return Err("the agent gives no status".into()) };
        let s = self.fake.lock();
        if let Some(v) = status.vms.iter().find(|v| !s.domains.contains_key(v.slot.as_deref().unwrap_or(&v.name))) {
            return Err(format!("VM {} ({}) has no domain yet", v.name, v.state));
        }
        Ok(())
    }

    /// Warm VMs made: each serves a job, or replaces one a fault, a restart or a reload took,
    /// or one recycled for its age (`warm_max_age`, drawn 10 minutes or more). A pool that
    /// makes a warm VM and reaps it again and again (churn: every boot costs a host a
    /// minute of CPU) makes far more than that.
    fn check_warm_churn(&self) -> Result<(), String> {
        let warm_made = self.fake.lock().warm_started;
        // At most 3 pools of up to 2 warm VMs each, and a scale-set pool's 1.
        let warm = 6 + usize::from(self.config.pools.iter().any(|p| p.scale_set().is_some()));
        let ages = (self.t.as_secs() / 600) as usize;
        let budget = self.jobs as usize + warm * (self.faults as usize + ages + 4);
        if warm_made > budget {
            return Err(format!(
                "warm VMs churn: {warm_made} made for {} jobs, {} faults in {} (at most {budget})",
                self.jobs,
                self.faults,
                secs(self.t)
            ));
        }
        Ok(())
    }

    /// At rest: the metrics say what the status says, and the store reloads to the book.
    fn check_at_rest(&mut self) {
        if let Err(why) = self.check_warm_churn() {
            return self.violate(why);
        }
        // The agent may still be acting at rest (a warm VM replaced as its lifetime ends)
        // and its runtime runs on past the status's answer before the metrics are read:
        // they must agree when the status did not change around the reading.
        for tries in 1.. {
            let Some(before) = self.fresh_status() else { return self.violate("no status at rest".into()) };
            let rendered = self.inc.as_ref().map(|i| i.metrics.render()).unwrap_or_default();
            let Some(why) = self.gauges_disagree(&before, &rendered) else { break };
            let after = self.fresh_status().map(|s| Sim::gauged(&s));
            if after.as_ref() == Some(&Sim::gauged(&before)) {
                return self.violate(why);
            }
            // An agent still busy after a few readings (each a turn of its runtime) is not at
            // rest: the check is at fault, and says so.
            if tries == 5 {
                return self.violate(format!("{why} (the status kept changing around 5 readings: {after:?})"));
            }
        }
        // Stopped cleanly, the store holds what the hypervisor has.
        let Some(inc) = self.inc.take() else { return };
        self.stop(inc, true);
        let snap = match Store::open_on(self.disk.clone()).and_then(|s| s.load()) {
            Ok(s) => s,
            Err(e) => return self.violate(format!("store: does not reload: {e}")),
        };
        // Every job of a pool still queued at GitHub was given up, with its reason.
        for id in self.open_jobs() {
            let agent_id = self.hub.lock().agent_id(id);
            match snap.jobs.get(&agent_id).map(|j| &j.state) {
                Some(crate::model::JobState::Abandoned { .. }) => {}
                other => return self.violate(format!("job {id}: queued at GitHub, in the store {other:?}")),
            }
        }
        // No job of a pool is kept waiting in the store once GitHub ended it (one kept
        // running, its ended delivery lost, holds nothing and goes with its history).
        let ended = self.ended_jobs();
        for (agent_id, rec) in &snap.jobs {
            let queued = rec.state == crate::model::JobState::Queued;
            if let (true, Some(_), Some(id)) = (queued, &rec.pool, ended.get(agent_id)) {
                return self.violate(format!("job {id}: ended at GitHub, in the store {:?}", rec.state));
            }
        }
        let s = self.fake.lock();
        let domains: BTreeSet<String> = s.domains.keys().cloned().collect();
        let recorded: BTreeSet<String> = snap.vms.values().map(|v| v.domain().to_string()).collect();
        let saved: BTreeSet<String> = s.saved.keys().cloned().collect();
        let slots: BTreeSet<String> = snap.slots.keys().cloned().collect();
        drop(s);
        if domains != recorded {
            return self.violate(format!("store: reloads VMs {recorded:?}, the hypervisor has {domains:?}"));
        }
        if saved != slots {
            self.violate(format!("store: reloads slots {slots:?}, the hypervisor saved {saved:?}"));
        }
    }

    fn status(&mut self) -> Option<Status> {
        if let Some(s) = &self.status_cache {
            return Some(s.clone());
        }
        match self.ask(AdminCommand::Status)? {
            Reply::Status(s) => {
                if !s.libvirt_connected {
                    self.hv_unready_seen = Some(self.t);
                }
                self.shown.extend(s.queued.iter().map(|q| q.job_id).chain(s.vms.iter().map(|v| v.job_id)));
                self.status_cache = Some(s.clone());
                Some(s)
            }
            _ => None,
        }
    }

    /// The agent's status as it is now (not as of this turn of the world).
    fn fresh_status(&mut self) -> Option<Status> {
        self.status_cache = None;
        self.status()
    }

    /// How the rendered gauges differ from `status`: `runnervisor_vms` by pool and state,
    /// each pool's `runnervisor_queue_depth` and `runnervisor_slots_ready`,
    /// `runnervisor_draining` and `runnervisor_hypervisor_ready`. Every pool of the status
    /// has each of its series (a gauge never set would read as 0, which queues and ready
    /// slots at rest mostly are), and no other pool has one (a removed pool's are dropped).
    fn gauges_disagree(&self, status: &Status, rendered: &str) -> Option<String> {
        let gauge = |series: &str| {
            let prefix = format!("{series} ");
            rendered.lines().find_map(|l| l.strip_prefix(&prefix)?.parse::<f64>().ok()).map(|v| v as u64)
        };
        let mut counted: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for v in &status.vms {
            *counted.entry((v.pool.as_str(), v.state.as_str())).or_default() += 1;
        }
        let mut want: Vec<(String, u64)> = Vec::new();
        for p in &status.pools {
            for s in crate::model::VmState::ALL {
                let vms = counted.get(&(p.name.as_str(), s.as_str())).copied().unwrap_or(0);
                want.push((format!("runnervisor_vms{{pool=\"{}\",state=\"{}\"}}", p.name, s.as_str()), vms));
            }
            want.push((format!("runnervisor_queue_depth{{pool=\"{}\"}}", p.name), p.queued as u64));
            want.push((format!("runnervisor_slots_ready{{pool=\"{}\"}}", p.name), p.slots_ready as u64));
        }
        want.push(("runnervisor_draining".into(), u64::from(status.draining)));
        want.push(("runnervisor_hypervisor_ready".into(), u64::from(status.libvirt_connected)));
        for (series, want) in &want {
            let shown = gauge(series);
            if shown != Some(*want) {
                let shown = shown.map_or("missing".to_string(), |v| v.to_string());
                return Some(format!(
                    "metrics: {series} = {shown}, status shows {want}: {:?}; VMs {:?}",
                    status.pools,
                    vm_list(status)
                ));
            }
        }
        let families = ["runnervisor_vms{", "runnervisor_queue_depth{", "runnervisor_slots_ready{"];
        let pools: BTreeSet<&str> = status.pools.iter().map(|p| p.name.as_str()).collect();
        for line in rendered.lines().filter(|l| families.iter().any(|f| l.starts_with(f))) {
            let pool = line.split("pool=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_default();
            if !pools.contains(pool) {
                return Some(format!("metrics: {line:?} is of a pool the status does not have: {pools:?}"));
            }
        }
        None
    }

    /// What the gauges that [`Sim::gauges_disagree`] compares are counted from.
    fn gauged(status: &Status) -> String {
        let pools: Vec<(&str, usize, usize)> =
            status.pools.iter().map(|p| (p.name.as_str(), p.queued, p.slots_ready)).collect();
        format!("{:?} {pools:?} {} {}", vm_list(status), status.draining, status.libvirt_connected)
    }

    /// The agent's answer to an operator's command (its runtime runs meanwhile).
    fn ask(&mut self, cmd: AdminCommand) -> Option<Reply> {
        let inc = self.inc.as_ref()?;
        let (tx, rx) = oneshot::channel();
        inc.events.send(Event::Admin(cmd, tx)).ok()?;
        let reply = inc.rt.block_on(rx).ok();
        self.status_cache = None;
        reply
    }
}

/// How long a VM of a pool the agent no longer has lives at most (`PoolConfig::retiring`:
/// its timers are the defaults once the agent restarted without the pool).
fn retired_lifetime() -> Duration {
    crate::config::PoolConfig::retiring("retired").map(|p| p.max_lifetime).expect("a retiring pool's defaults")
}

/// The repository a VM of the status counts for in its pool's `max_vms_per_repository` (an
/// unbound warm VM and a slot's VM count for none).
fn repo_of(v: &crate::admin::proto::VmStatus) -> Option<&String> {
    (!v.for_slot && !v.repository.is_empty()).then_some(&v.repository)
}

/// The agent's VMs as its status gives them, `name state` each (for a violation's text).
fn vm_list(status: &Status) -> Vec<String> {
    status.vms.iter().map(|v| format!("{} {}", v.name, v.state)).collect()
}

/// Posts one delivery to the intake as GitHub would; its status code.
async fn post(app: &axum::Router, hook: &github::Hook) -> u16 {
    use hmac::{KeyInit, Mac};
    use tower_service::Service;
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).expect("hmac");
    mac.update(hook.body.as_bytes());
    let sig: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let req = http::Request::post("/webhook")
        .header("content-type", "application/json")
        .header("x-github-event", "workflow_job")
        .header("x-github-delivery", &hook.guid)
        .header("x-hub-signature-256", format!("sha256={sig}"))
        .header("content-length", hook.body.len())
        .body(axum::body::Body::from(hook.body.clone()))
        .expect("request");
    let mut app = app.clone();
    match app.call(req).await {
        Ok(r) => r.status().as_u16(),
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests;

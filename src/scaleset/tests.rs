//! The listener against github-sim's scale sets over HTTP, writing the real store's inbox.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::*;
use crate::fleet::claims::{MemoryBoard, MemoryClaims};
use crate::github::http::HttpGitHub;
use crate::github::scaleset::tests::{client_of, complete_job, take_job};
use crate::github::scaleset::{HttpScaleSets, Statistics};
use crate::store::{Store, Writer};

type Client = HttpScaleSets<HttpGitHub>;

fn client(sim: &github_sim::SimHandle) -> Arc<Client> {
    Arc::new(client_of(sim))
}

async fn queue_job(sim: &github_sim::SimHandle, labels: &[&str]) -> u64 {
    crate::github::scaleset::tests::queue_job(sim, labels, 0.1).await
}

/// github-sim answering a long poll within 300 ms (so that the listener's turns come
/// quickly), `tweak`ed.
async fn sim_with(tweak: impl FnOnce(&mut github_sim::SimConfig)) -> github_sim::SimHandle {
    let mut config = github_sim::SimConfig::new("pat", "secret");
    config.message_poll_window = Duration::from_millis(300);
    tweak(&mut config);
    github_sim::SimHandle::start(config).await.unwrap()
}

/// Looks every 50 ms, `looks` times at most, until `f` holds (the caller asserts it).
async fn eventually(looks: u32, f: impl Fn() -> bool) {
    for _ in 0..looks {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `listener` as fleet member `host` on `board`, holding its session only while it leads.
fn led(listener: Listener<Client>, board: &Arc<MemoryBoard>, host: &str, lease: Duration) -> Listener<Client> {
    let clock = Arc::new(crate::clock::SystemClock);
    let claims = MemoryClaims { board: board.clone(), host: host.into(), lease, clock };
    Listener { owner: host.into(), lead: Some(Lead { claims: Arc::new(claims), lease }), ..listener }
}

/// The listener of pool `linux` (scale set `rv-linux`, owner `host-a`) writing `store`.
fn listener<S: ScaleSets>(client: Arc<S>, registry: Arc<Registry>, store: &Arc<Store>) -> Listener<S> {
    Listener {
        client,
        registry,
        pool: "linux".into(),
        spec: ScaleSetSpec { name: "rv-linux".into(), labels: vec![], runner_group: "default".into() },
        persist: Persist::Local(Arc::new(Writer::start(store.clone()))),
        inbox_ready: Arc::new(Notify::new()),
        clock: Arc::new(crate::clock::SystemClock),
        owner: "host-a".into(),
        lead: None,
        metrics: Arc::new(crate::metrics::Metrics::default()),
    }
}

/// The jobs the inbox has a `queued` event of (an acquired job's comes when it is acquired,
/// and again with its `JobAssigned`).
fn queued_jobs(store: &Store) -> usize {
    let ids: std::collections::BTreeSet<u64> = store
        .inbox(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|(_, ev)| ev.action == JobAction::Queued)
        .map(|(_, ev)| ev.job.id)
        .collect();
    ids.len()
}

/// Waits until the inbox holds an event `what` says is the one.
async fn wait_inbox(store: &Store, what: impl Fn(&JobEvent) -> bool) -> JobEvent {
    for _ in 0..200 {
        if let Some((_, ev)) = store.inbox(0, 1000).unwrap().into_iter().find(|(_, ev)| what(ev)) {
            return ev;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no such event in the inbox: {:?}", store.inbox(0, 1000).unwrap());
}

/// With no inbound endpoint at all: the jobs GitHub assigns to the set become the pool's
/// queued jobs in the store's inbox (acquired within the announced capacity), the set's
/// runner from the provisioning's JIT config takes one, and its start and end follow;
/// once stopped, the listener lets its session go (the next one opens at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_assigned_to_a_scale_set_reach_the_inbox_and_a_runner_of_the_set_serves_them() {
    let sim = sim_with(|config| {
        // Expires while the test runs: the listener renews it and carries on.
        config.queue_token_ttl = Duration::from_secs(1);
    })
    .await;
    let dir = crate::test_support::tempdir();
    let store = Arc::new(Store::open(&dir).unwrap());
    let registry = Arc::new(Registry::default());
    registry.set_capacity("linux", 2);
    let client = client(&sim);
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let listener = Listener { metrics: metrics.clone(), ..listener(client.clone(), registry.clone(), &store) };
    let stop = CancellationToken::new();
    let running = tokio::spawn(listener.run(stop.clone()));

    queue_job(&sim, &["rv-linux"]).await;
    queue_job(&sim, &["rv-linux"]).await;
    let queued = |ev: &JobEvent| ev.action == JobAction::Queued && ev.job.scale_set.as_deref() == Some("rv-linux");
    let first = wait_inbox(&store, queued).await;
    assert_eq!(first.job.repository, "octo-org/app");
    assert_eq!(first.job.labels, ["rv-linux"]);
    // Capacity 2: both are assigned to the set.
    eventually(200, || queued_jobs(&store) == 2).await;
    assert_eq!(queued_jobs(&store), 2);
    // GitHub's counts, as its messages say (the second assignment's message says both).
    let assigned = "runnervisor_scale_set_statistics{pool=\"linux\",kind=\"assigned\"} 2";
    eventually(100, || metrics.render().contains(assigned)).await;
    assert!(metrics.render().contains(assigned), "{}", metrics.render());

    // The runner provisioning makes, from the set.
    let runners = Runners { client: client.clone(), registry: registry.clone() };
    let jit = runners.jit("linux", "rv-linux-1").await.unwrap();
    let job = take_job(&sim, &jit).await;
    let started = wait_inbox(&store, |ev| ev.action == JobAction::InProgress).await;
    assert_eq!(started.job.runner_name.as_deref(), Some("rv-linux-1"));
    assert_eq!(started.job.scale_set.as_deref(), Some("rv-linux"));
    complete_job(&sim, &jit, job).await;
    let done = wait_inbox(&store, |ev| ev.action == JobAction::Completed).await;
    assert_eq!((done.job.id, done.job.conclusion.as_deref()), (started.job.id, Some("success")));
    let shown = registry.status("linux", "rv-linux");
    assert!(shown.session && shown.id.is_some() && shown.capacity == 2, "{shown:?}");
    // Long after the first queue token expired: still taking jobs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    queue_job(&sim, &["rv-linux"]).await;
    eventually(200, || queued_jobs(&store) == 3).await;
    assert_eq!(queued_jobs(&store), 3, "after a renewal");
    // A pool the registry does not know has no set yet: provisioning is told so.
    assert!(runners.jit("other", "rv-other-1").await.unwrap_err().to_string().contains("not found or made yet"));

    stop.cancel();
    running.await.unwrap();
    assert!(!registry.status("linux", "rv-linux").session, "no session once stopped");
    let set = registry.set_id("linux").unwrap();
    client.create_session(set, "host-b").await.expect("the stopped listener's session was deleted");
}

/// Another client holds the session (this agent before a `kill -9`): the listener tries
/// again until the service lets it go, then takes the jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_held_by_another_client_is_taken_once_it_is_let_go() {
    let sim = sim_with(|_| {}).await;
    let client = client(&sim);
    let spec = ScaleSetSpec { name: "rv-linux".into(), labels: vec![], runner_group: "default".into() };
    let set = client.ensure(&spec).await.unwrap();
    let held = client.create_session(set.id, "crashed-agent").await.unwrap();
    let dir = crate::test_support::tempdir();
    let store = Arc::new(Store::open(&dir).unwrap());
    let registry = Arc::new(Registry::default());
    registry.set_capacity("linux", 1);
    let listener = listener(client.clone(), registry, &store);
    let stop = CancellationToken::new();
    let running = tokio::spawn(listener.run(stop.clone()));
    queue_job(&sim, &["rv-linux"]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(store.inbox(0, 10).unwrap().is_empty(), "no job taken while another client holds the session");
    client.delete_session(set.id, &held.id).await.unwrap();
    wait_inbox(&store, |ev| ev.action == JobAction::Queued).await;
    stop.cancel();
    running.await.unwrap();
}

/// A message's jobs as inbox events: an assigned job is queued for the pool; started and
/// completed follow it; a job the set gives up on to offer it again is `cancelled`; the
/// delivery ids are the request's and what happened (the same when it comes again).
#[test]
fn a_messages_jobs_become_the_pools_inbox_events() {
    let job = |id: u64| JobRef {
        request_id: id,
        repository: "o/r".into(),
        job_id: "j".into(),
        run_id: 9,
        display_name: "build".into(),
        labels: vec!["rv".into()],
    };
    let m = Message {
        id: 41,
        statistics: Some(Statistics::default()),
        jobs: vec![
            JobMessage::Available(job(1)),
            JobMessage::Assigned(job(2)),
            JobMessage::Started { job: job(3), runner_name: Some("rv-linux-3".into()) },
            JobMessage::Completed { job: job(4), result: "canceled".into(), runner_name: None },
            JobMessage::Completed { job: job(5), result: "Succeeded".into(), runner_name: Some("rv-linux-5".into()) },
        ],
        unreadable: None,
    };
    let now = SystemTime::UNIX_EPOCH;
    let got: Vec<_> = events("linux", 7, &m, now)
        .into_iter()
        .map(|e| (e.delivery, e.action, e.job.id, e.job.runner_name, e.job.conclusion, e.job.scale_set))
        .collect();
    let linux = Some("linux".to_string());
    assert_eq!(
        got,
        [
            ("scale-set-7-2-assigned-41".to_string(), JobAction::Queued, 2, None, None, linux.clone()),
            ("scale-set-7-3-started".into(), JobAction::InProgress, 3, Some("rv-linux-3".into()), None, linux.clone()),
            (
                "scale-set-7-4-completed-41".into(),
                JobAction::Completed,
                4,
                None,
                Some("cancelled".into()),
                linux.clone()
            ),
            (
                "scale-set-7-5-completed".into(),
                JobAction::Completed,
                5,
                Some("rv-linux-5".into()),
                Some("success".into()),
                linux
            ),
        ]
    );
}

/// `acquirejobs` fails, for good: the news of the jobs already assigned still comes in
/// (a message not acknowledged would hold up every message after it), and once it works
/// again the job offered meanwhile is acquired when offered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_acquire_holds_up_no_other_news() {
    let sim = sim_with(|config| {
        config.reassign_after = Duration::from_secs(2);
    })
    .await;
    let dir = crate::test_support::tempdir();
    let store = Arc::new(Store::open(&dir).unwrap());
    let registry = Arc::new(Registry::default());
    registry.set_capacity("linux", 2);
    let client = client(&sim);
    let listener = listener(client.clone(), registry.clone(), &store);
    let stop = CancellationToken::new();
    let running = tokio::spawn(listener.run(stop.clone()));
    let http = reqwest::Client::new();
    queue_job(&sim, &["rv-linux"]).await;
    let first = wait_inbox(&store, |ev| ev.action == JobAction::Queued).await;
    // From now on every acquire fails; a second job is offered.
    let fault = |count: Value| json!({"kind": "api_error", "status": 500, "path": "acquirejobs", "count": count});
    http.post(format!("{}/_sim/faults", sim.url())).json(&fault(Value::Null)).send().await.unwrap();
    queue_job(&sim, &["rv-linux"]).await;
    // The first job runs and ends on the set's runner: its news comes in all the same.
    let jit = Runners { client: client.clone(), registry }.jit("linux", "rv-linux-1").await.unwrap();
    let job = take_job(&sim, &jit).await;
    complete_job(&sim, &jit, job).await;
    let done = wait_inbox(&store, |ev| ev.action == JobAction::Completed).await;
    assert_eq!(done.job.id, first.job.id);
    assert_eq!(queued_jobs(&store), 1);
    // Acquiring works again: the second job, offered again, is the pool's.
    http.delete(format!("{}/_sim/faults", sim.url())).send().await.unwrap();
    eventually(200, || queued_jobs(&store) == 2).await;
    assert_eq!(queued_jobs(&store), 2);
    stop.cancel();
    running.await.unwrap();
}

/// In a fleet, the member leading the fleet's scale sets holds the set's session; another
/// member only finds the set (for its VMs' JIT configs). When the lead passes to the other
/// (the first could not renew it in time, or was cut off), the first lets the session go
/// and the second opens it and takes the jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_fleet_the_lead_holds_the_session_and_hands_it_over() {
    let sim = sim_with(|_| {}).await;
    let client = client(&sim);
    let board = Arc::new(MemoryBoard::default());
    let lease = Duration::from_secs(3);
    let dir = crate::test_support::tempdir();
    let member = |host: &str| {
        let store = Arc::new(Store::open(&dir.join(host)).unwrap());
        let registry = Arc::new(Registry::default());
        // Room for both jobs (the first stays assigned: no runner takes it).
        registry.set_capacity("linux", 2);
        let listener = led(listener(client.clone(), registry.clone(), &store), &board, host, lease);
        (store, registry, listener)
    };
    let (store_a, reg_a, a) = member("host-a");
    let (store_b, reg_b, b) = member("host-b");
    let stop = CancellationToken::new();
    let running_a = tokio::spawn(a.run(stop.clone()));
    let open = |r: &Registry| r.status("linux", "rv-linux").session;
    eventually(100, || open(&reg_a)).await;
    assert!(open(&reg_a), "the first member leads and holds the session");
    let running_b = tokio::spawn(b.run(stop.clone()));
    eventually(100, || reg_b.set_id("linux").is_some()).await;
    assert_eq!(reg_b.set_id("linux"), reg_a.set_id("linux"), "the other finds the set");
    queue_job(&sim, &["rv-linux"]).await;
    let queued = |ev: &JobEvent| ev.action == JobAction::Queued;
    let ev = wait_inbox(&store_a, queued).await;
    assert_eq!(ev.job.scale_set.as_deref(), Some("rv-linux"));
    assert!(!open(&reg_b) && store_b.inbox(0, 10).unwrap().is_empty(), "one session: the lead's");
    // The lead passes to host-b (host-a's renewal is refused from now on).
    board.leads.lock().unwrap().insert(lead_work("rv-linux"), ("host-b".into(), SystemTime::now() + lease));
    eventually(200, || open(&reg_b)).await;
    assert!(open(&reg_b) && !open(&reg_a), "the session moved to the new lead");
    queue_job(&sim, &["rv-linux"]).await;
    wait_inbox(&store_b, queued).await;
    stop.cancel();
    running_a.await.unwrap();
    running_b.await.unwrap();
}

/// The fleet's database answers no more (a member cut off from it): the lead cannot be
/// renewed, so the member lets the set's session go within the lease, before another
/// member could take the lead; and while it cannot ask, it does not take it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_that_cannot_be_renewed_lets_the_session_go_within_its_lease() {
    let sim = sim_with(|_| {}).await;
    let client = client(&sim);
    let lease = Duration::from_secs(5);
    let board = Arc::new(MemoryBoard::default());
    let dir = crate::test_support::tempdir();
    let store = Arc::new(Store::open(&dir).unwrap());
    let registry = Arc::new(Registry::default());
    registry.set_capacity("linux", 1);
    let listener = led(listener(client.clone(), registry.clone(), &store), &board, "host-a", lease);
    let stop = CancellationToken::new();
    let running = tokio::spawn(listener.run(stop.clone()));
    let open = || registry.status("linux", "rv-linux").session;
    eventually(100, &open).await;
    assert!(open(), "it leads and holds the session");
    board.leases_away.store(true, std::sync::atomic::Ordering::SeqCst);
    let cut = std::time::Instant::now();
    while open() {
        assert!(cut.elapsed() < lease, "the session is still held a lease after the database went away");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let go for good (deleted: another client opens one at once), and not taken again
    // while the lead cannot be asked for (the set free to take meanwhile).
    let set = registry.set_id("linux").unwrap();
    let other = client.create_session(set, "host-b").await.expect("the session was deleted");
    client.delete_session(set, &other.id).await.unwrap();
    tokio::time::sleep(lease).await;
    assert!(!open(), "not taken again without the lead");
    stop.cancel();
    running.await.unwrap();
}

/// Two members serving different sets: each leads its own (a lead per set), so each set has
/// its session although neither member serves both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_set_has_a_lead_of_its_own() {
    let sim = sim_with(|_| {}).await;
    let client = client(&sim);
    let board = Arc::new(MemoryBoard::default());
    let lease = Duration::from_secs(3);
    let dir = crate::test_support::tempdir();
    let member = |host: &str, set: &str| {
        let store = Arc::new(Store::open(&dir.join(host)).unwrap());
        let registry = Arc::new(Registry::default());
        let spec = ScaleSetSpec { name: set.into(), labels: vec![], runner_group: "default".into() };
        let listener = Listener { spec, ..listener(client.clone(), registry.clone(), &store) };
        (registry, led(listener, &board, host, lease))
    };
    let (reg_a, a) = member("host-a", "rv-linux");
    let (reg_b, b) = member("host-b", "rv-gpu");
    let stop = CancellationToken::new();
    let running = [tokio::spawn(a.run(stop.clone())), tokio::spawn(b.run(stop.clone()))];
    let open = |r: &Registry| r.status("linux", "-").session;
    eventually(100, || open(&reg_a) && open(&reg_b)).await;
    assert!(open(&reg_a) && open(&reg_b), "both sets' sessions held");
    assert_ne!(reg_a.set_id("linux"), reg_b.set_id("linux"));
    stop.cancel();
    for r in running {
        r.await.unwrap();
    }
}

/// The jobs a message offers and the listener acquires are in the book at once: the set's
/// count of jobs waiting to be acquired (for which other pools' warm VMs give the host's
/// room up) leaves them out, though the message, made before, counted them (a warm VM was
/// reaped for a job already served, and made again at the next message). Against the
/// simulator's model of the service, in process.
#[tokio::test(start_paused = true)]
async fn jobs_just_acquired_are_not_counted_as_waiting() {
    let (model, set, mut session) = offering(&[1, 2]).await;
    let dir = crate::test_support::tempdir();
    let store = Arc::new(Store::open(&dir).unwrap());
    let registry = Arc::new(Registry::default());
    let listener = listener(model.clone(), registry.clone(), &store);
    // Room for one: of the two offered, one is acquired.
    registry.set_capacity("linux", 1);
    let m = model.poll(&session, 0, 1).await.unwrap().expect("the offers");
    assert_eq!((m.jobs.len(), m.statistics.map(|s| s.available)), (2, Some(2)));
    listener.handle(set, &mut session, &m, 1).await.unwrap();
    assert_eq!(queued_jobs(&store), 1);
    assert_eq!(registry.available("linux"), 1, "the one acquired is not waiting");
}

/// The model of the Actions service, with set `rv-linux` offering jobs `ids` (as pool
/// `linux`'s), and a session on it.
async fn offering(ids: &[u64]) -> (Arc<crate::sim::scaleset::SimScaleSets>, u64, Session) {
    use crate::sim::github::{Hub, Job, SimGitHub, Status};
    let hub = Hub::new(
        crate::sim::time::Time::default(),
        Duration::from_secs(10),
        crate::config::Scope::Organization("octo-org".into()),
    );
    let gh = SimGitHub { hub: Arc::new(Mutex::new(hub)), disk: crate::sim::disk::Disk::default() };
    let model = Arc::new(crate::sim::scaleset::SimScaleSets { gh: gh.clone() });
    let spec = ScaleSetSpec { name: "rv-linux".into(), labels: vec![], runner_group: "default".into() };
    let set = model.ensure(&spec).await.unwrap().id;
    for &id in ids {
        let job = Job {
            id,
            run_id: id * 10,
            run_attempt: 1,
            labels: vec!["rv-linux".into()],
            repository: "octo-org/app".into(),
            pool: Some("linux".into()),
            status: Status::Queued,
            queued_at: Duration::ZERO,
            runner: None,
            taken: 0,
            routed: None,
        };
        let mut hub = gh.lock();
        hub.jobs.insert(id, job);
        hub.route(id);
    }
    let session = model.create_session(set, "host-a").await.unwrap();
    (model, set, session)
}

/// The poll announced room for three; by the time its message comes the pool has room
/// for one (libvirt went away, another pool took the host's places): one job is acquired,
/// not three that would wait for VMs until the set gave them up (helper-64's F6). The
/// others are offered again.
#[tokio::test(start_paused = true)]
async fn jobs_are_acquired_within_the_room_the_pool_has_when_they_are_offered() {
    let (model, set, mut session) = offering(&[1, 2, 3]).await;
    let dir = crate::test_support::tempdir();
    let store = Arc::new(Store::open(&dir).unwrap());
    let registry = Arc::new(Registry::default());
    let listener = listener(model.clone(), registry.clone(), &store);
    let m = model.poll(&session, 0, 3).await.unwrap().expect("the offers");
    assert_eq!(m.jobs.len(), 3);
    registry.set_capacity("linux", 1);
    listener.handle(set, &mut session, &m, 3).await.unwrap();
    assert_eq!(queued_jobs(&store), 1, "acquired within the room now");
    assert_eq!(model.gh.lock().statistics(set).assigned, 1);
}

#[test]
fn the_jobs_to_acquire_are_those_the_pool_has_room_for_now() {
    let st = |assigned| Statistics { assigned, ..Statistics::default() };
    let offered = [1, 2, 3];
    #[rustfmt::skip]
    let table: [(u64, u64, Option<Statistics>, &[u64]); 7] = [
        (3, 3, None, &[1, 2, 3]),          // the room announced: the service holds to it
        (2, 5, Some(st(4)), &[1, 2, 3]),   // more room now: the service holds to what it was told
        (3, 1, None, &[1]),
        (3, 2, Some(st(1)), &[1]),         // one of the two places has its job already
        (3, 2, Some(st(2)), &[]),
        (3, 0, None, &[]),                 // libvirt away, or the pool holds
        (3, 1, Some(st(5)), &[]),
    ];
    for (announced, now, statistics, want) in table {
        assert_eq!(to_acquire(&offered, announced, now, statistics.as_ref()), want, "{announced} {now} {statistics:?}");
    }
}

/// A service whose polls and session deletes fail as `polls` and `deletes` say, in turn
/// (an HTTP status; 0: an answer that cannot be read), then work (polls bring nothing):
/// the calls it saw, in order.
#[derive(Default)]
struct Flaky {
    polls: Mutex<std::collections::VecDeque<u16>>,
    deletes: Mutex<std::collections::VecDeque<u16>>,
    calls: Mutex<Vec<String>>,
}

impl Flaky {
    fn fails(&self, what: &str, statuses: &Mutex<std::collections::VecDeque<u16>>) -> Result<(), SsError> {
        let next = statuses.lock().unwrap().pop_front();
        let mut calls = self.calls.lock().unwrap();
        match next {
            None => {
                calls.push(what.to_string());
                Ok(())
            }
            Some(0) => {
                calls.push(format!("{what}: unreadable"));
                Err(SsError::Decode { path: what.into(), message: "<html>".into() })
            }
            Some(status) => {
                calls.push(format!("{what}: {status}"));
                Err(SsError::Status {
                    method: "GET".into(),
                    path: what.into(),
                    status,
                    type_name: String::new(),
                    message: String::new(),
                })
            }
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl ScaleSets for Flaky {
    async fn ensure(&self, spec: &ScaleSetSpec) -> Result<ScaleSetInfo, SsError> {
        Ok(ScaleSetInfo { id: 7, name: spec.name.clone(), runner_group_id: 1, labels: vec![] })
    }
    async fn find(&self, spec: &ScaleSetSpec) -> Result<Option<ScaleSetInfo>, SsError> {
        self.ensure(spec).await.map(Some)
    }
    async fn delete(&self, _: u64) -> Result<(), SsError> {
        Ok(())
    }
    async fn create_session(&self, _: u64, _: &str) -> Result<Session, SsError> {
        self.calls.lock().unwrap().push("create".into());
        Ok(Session {
            id: "s".into(),
            queue_url: String::new(),
            queue_token: crate::secret::Secret::new("mq"),
            statistics: Statistics::default(),
        })
    }
    async fn refresh_session(&self, _: u64, _: &str) -> Result<Session, SsError> {
        unreachable!("no token runs out here")
    }
    async fn delete_session(&self, _: u64, _: &str) -> Result<(), SsError> {
        self.fails("delete", &self.deletes)
    }
    async fn poll(&self, _: &Session, _: u64, _: u64) -> Result<Option<Message>, SsError> {
        self.fails("poll", &self.polls)?;
        tokio::time::sleep(Duration::from_secs(50)).await;
        Ok(None)
    }
    async fn ack(&self, _: &Session, _: u64) -> Result<(), SsError> {
        unreachable!("no message comes here")
    }
    async fn acquire(&self, _: u64, _: &Session, _: &[u64]) -> Result<Vec<u64>, SsError> {
        unreachable!("no job is offered here")
    }
    async fn generate_jit_config(&self, _: u64, _: &str) -> Result<JitRunner, SsError> {
        unreachable!("no runner is made here")
    }
    async fn delete_runner(&self, _: u64) -> Result<crate::github::Deleted, SsError> {
        unreachable!("no runner is deleted here")
    }
}

/// Pool `linux`'s listener against `service` for `span` of (paused) time, then stopped:
/// the calls the service saw.
async fn listened_for(service: &Arc<Flaky>, span: Duration) -> Vec<String> {
    let dir = crate::test_support::tempdir();
    let store = Arc::new(Store::open(&dir).unwrap());
    let registry = Arc::new(Registry::default());
    let listener = listener(service.clone(), registry, &store);
    let stop = CancellationToken::new();
    let running = tokio::spawn(listener.run(stop.clone()));
    tokio::time::sleep(span).await;
    stop.cancel();
    running.await.unwrap();
    service.calls()
}

/// GitHub fails the polls for four minutes (502s, then 503s): the session is kept and
/// polled again until they work; it was given up after five failures, its delete failing
/// as well, and the service refused the next session while it held the old one (helper-64's
/// F5). Once the failures last ten minutes, it is given up.
#[tokio::test(start_paused = true)]
async fn a_session_outlasts_a_service_outage_and_is_given_up_only_once_it_lasts() {
    let service = Arc::new(Flaky { polls: Mutex::new([502; 9].into()), ..Flaky::default() });
    let calls = listened_for(&service, Duration::from_secs(450)).await;
    assert_eq!(calls.iter().filter(|c| *c == "create").count(), 1, "{calls:?}");
    assert_eq!(calls.iter().filter(|c| *c == "poll: 502").count(), 9, "{calls:?}");
    assert!(calls.iter().any(|c| c == "poll"), "polled again once it works: {calls:?}");
    assert_eq!(calls.last().map(String::as_str), Some("delete"), "let go once stopped: {calls:?}");

    let service = Arc::new(Flaky { polls: Mutex::new([503; 40].into()), ..Flaky::default() });
    let calls = listened_for(&service, Duration::from_secs(900)).await;
    let given_up = calls.iter().position(|c| c == "delete").expect("given up");
    assert!(given_up >= 12, "not before ten minutes of failures: {calls:?}");
    assert_eq!(calls.get(given_up + 1).map(String::as_str), Some("create"), "{calls:?}");

    // A failure that does not pass (the service refuses the queue): five give it up.
    let service = Arc::new(Flaky { polls: Mutex::new([400; 5].into()), ..Flaky::default() });
    let calls = listened_for(&service, Duration::from_secs(120)).await;
    assert_eq!(calls[..7], ["create", "poll: 400", "poll: 400", "poll: 400", "poll: 400", "poll: 400", "delete"]);

    // One that does not pass amid an outage (a proxy's page): the outage's session is kept.
    let polls = [502; 8].into_iter().chain([0]).chain([502; 4]).collect();
    let service = Arc::new(Flaky { polls: Mutex::new(polls), ..Flaky::default() });
    let calls = listened_for(&service, Duration::from_secs(560)).await;
    assert_eq!(calls.iter().filter(|c| *c == "create").count(), 1, "{calls:?}");
    assert!(calls.contains(&"poll: unreadable".to_string()) && calls.contains(&"poll".to_string()), "{calls:?}");
}

/// What a session outlasts: GitHub's 5xx and 429, a timeout, a connection that fails, the
/// store (its failure is a transport's); not an answer that cannot be read, a refusal, a
/// conflict.
#[test]
fn the_failures_a_session_outlasts() {
    let status = |status| SsError::Status {
        method: "GET".into(),
        path: "p".into(),
        status,
        type_name: String::new(),
        message: String::new(),
    };
    let gh = |status| {
        SsError::GitHub(GhError::Status { method: "POST".into(), path: "p".into(), status, message: String::new() })
    };
    let transport =
        SsError::Transport { method: "-".into(), path: "the store's inbox".into(), message: "disk full".into() };
    let limited =
        SsError::GitHub(GhError::RateLimited { method: "POST".into(), path: "p".into(), wait: Duration::from_secs(9) });
    for (e, want) in [
        (status(500), true),
        (status(503), true),
        (status(429), true),
        (gh(502), true),
        (transport, true),
        (limited, true),
        (status(400), false),
        (status(403), false),
        (gh(401), false),
        (SsError::Decode { path: "p".into(), message: "<html>".into() }, false),
        (SsError::Conflict("held".into()), false),
        (SsError::QueueToken, false),
        (SsError::GitHub(GhError::Auth("key".into())), false),
    ] {
        assert_eq!(passing(&e), want, "{e}");
    }
}

/// A session's delete fails (GitHub's 502): it is tried again, so that the next session
/// (this start's or the next's) is not refused while the service holds the old one.
#[tokio::test(start_paused = true)]
async fn a_session_whose_delete_fails_is_deleted_again() {
    let service = Arc::new(Flaky { deletes: Mutex::new([502, 500].into()), ..Flaky::default() });
    let calls = listened_for(&service, Duration::from_secs(5)).await;
    assert_eq!(calls, ["create", "poll", "delete: 502", "delete: 500", "delete"]);
    // Found gone, or refused for good: not tried again.
    let service = Arc::new(Flaky { deletes: Mutex::new([404, 500].into()), ..Flaky::default() });
    let calls = listened_for(&service, Duration::from_secs(5)).await;
    assert_eq!(calls, ["create", "poll", "delete: 404"]);
}

/// A service whose queue token runs out after each call that presents it (GitHub's lasts
/// an hour; this one, one call): the calls made with it, by kind and token, in order.
#[derive(Default)]
struct Expiring {
    calls: Mutex<Vec<String>>,
    /// The token the service takes now (`mq-N`), and whether message 1 was acknowledged.
    token: Mutex<(u32, bool)>,
    /// The first refresh finds the session gone (the service let it go).
    first_refresh_gone: bool,
}

impl Expiring {
    /// Whether `session`'s token is the live one (it expires once used).
    fn take(&self, what: &str, session: &Session) -> Result<(), SsError> {
        let mut t = self.token.lock().unwrap();
        let live = session.queue_token.expose() == format!("mq-{}", t.0);
        self.calls.lock().unwrap().push(format!("{what} {}", session.queue_token.expose()));
        if !live {
            return Err(SsError::QueueToken);
        }
        t.0 += 1;
        Ok(())
    }

    fn session(&self) -> Session {
        let token = format!("mq-{}", self.token.lock().unwrap().0);
        Session {
            id: "s".into(),
            queue_url: String::new(),
            queue_token: crate::secret::Secret::new(token),
            statistics: Statistics::default(),
        }
    }
}

impl ScaleSets for Expiring {
    async fn ensure(&self, spec: &ScaleSetSpec) -> Result<ScaleSetInfo, SsError> {
        Ok(ScaleSetInfo { id: 7, name: spec.name.clone(), runner_group_id: 1, labels: vec![] })
    }
    async fn find(&self, spec: &ScaleSetSpec) -> Result<Option<ScaleSetInfo>, SsError> {
        self.ensure(spec).await.map(Some)
    }
    async fn delete(&self, _: u64) -> Result<(), SsError> {
        Ok(())
    }
    async fn create_session(&self, _: u64, _: &str) -> Result<Session, SsError> {
        self.calls.lock().unwrap().push("create".into());
        Ok(self.session())
    }
    async fn refresh_session(&self, _: u64, _: &str) -> Result<Session, SsError> {
        let mut calls = self.calls.lock().unwrap();
        if self.first_refresh_gone && !calls.iter().any(|c| c.starts_with("refresh")) {
            calls.push("refresh: gone".into());
            return Err(SsError::SessionGone("simulated".into()));
        }
        calls.push("refresh".into());
        Ok(self.session())
    }
    async fn delete_session(&self, _: u64, _: &str) -> Result<(), SsError> {
        Ok(())
    }
    async fn poll(&self, session: &Session, _: u64, _: u64) -> Result<Option<Message>, SsError> {
        self.take("poll", session)?;
        if self.token.lock().unwrap().1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Ok(None);
        }
        let job = JobRef {
            request_id: 1,
            repository: "o/r".into(),
            job_id: "77".into(),
            run_id: 9,
            display_name: "build".into(),
            labels: vec!["rv-linux".into()],
        };
        Ok(Some(Message { id: 1, statistics: None, jobs: vec![JobMessage::Available(job)], unreadable: None }))
    }
    async fn ack(&self, session: &Session, _: u64) -> Result<(), SsError> {
        self.take("ack", session)?;
        self.token.lock().unwrap().1 = true;
        Ok(())
    }
    async fn acquire(&self, _: u64, session: &Session, requests: &[u64]) -> Result<Vec<u64>, SsError> {
        self.take("acquire", session)?;
        Ok(requests.to_vec())
    }
    async fn generate_jit_config(&self, _: u64, _: &str) -> Result<JitRunner, SsError> {
        unreachable!("no runner is made here")
    }
    async fn delete_runner(&self, _: u64) -> Result<crate::github::Deleted, SsError> {
        unreachable!("no runner is deleted here")
    }
}

/// Pool `linux`'s listener (room for one job) against `service`, on a store of its own,
/// until a job is queued in its inbox and `done` holds: that job's event, and the calls
/// the service saw.
async fn listened(service: &Arc<Expiring>, done: impl Fn(&Expiring) -> bool) -> (JobEvent, Vec<String>) {
    let dir = crate::test_support::tempdir();
    let store = Arc::new(Store::open(&dir).unwrap());
    let registry = Arc::new(Registry::default());
    registry.set_capacity("linux", 1);
    let listener = listener(service.clone(), registry, &store);
    let stop = CancellationToken::new();
    let running = tokio::spawn(listener.run(stop.clone()));
    let queued = wait_inbox(&store, |ev| ev.action == JobAction::Queued).await;
    eventually(200, || done(service)).await;
    stop.cancel();
    running.await.unwrap();
    let calls = service.calls.lock().unwrap().clone();
    (queued, calls)
}

/// The queue token runs out between a poll and the acquisition of the job it brought, and
/// again before the message's acknowledgement: each is renewed and the call made again at
/// once, as GitHub's listener does (it was a failure, warned of, a back-off, and the
/// message polled again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_token_that_runs_out_under_an_acquire_or_an_ack_is_renewed_at_once() {
    let service = Arc::new(Expiring::default());
    let (queued, calls) = listened(&service, |s| s.token.lock().unwrap().1).await;
    assert_eq!(queued.job.id, 1, "the request acquired");
    assert!(calls.len() >= 8, "{calls:?}");
    assert_eq!(
        calls[..8],
        ["create", "poll mq-0", "acquire mq-0", "refresh", "acquire mq-1", "ack mq-1", "refresh", "ack mq-2"],
        "{calls:?}"
    );
}

/// The renewal under an acquire finds the session gone: the message fails whole (it comes
/// again on the next session), not taken in and acknowledged with the token that ran out
/// (its jobs never acquired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_found_gone_under_an_acquire_is_opened_again_before_the_message_is_taken() {
    let service = Arc::new(Expiring { first_refresh_gone: true, ..Expiring::default() });
    let (queued, calls) = listened(&service, |_| true).await;
    assert_eq!(queued.job.id, 1, "the request acquired, on the next session");
    assert!(calls.len() >= 5, "{calls:?}");
    assert_eq!(calls[..5], ["create", "poll mq-0", "acquire mq-0", "refresh: gone", "create"], "{calls:?}");
}

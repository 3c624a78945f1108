//! Pools that are runner scale sets: their jobs come from their listener (named by pool),
//! their runners' JIT configs from the set, and each pass publishes their capacity.

use std::future::Future;
use std::pin::Pin;

use super::*;
use crate::github::{GhError, JitRunner};
use crate::scaleset::{Registry, ScaleSetRunners};

/// The set's JIT configs: recorded, each a new runner, listed by GitHub's REST API (as a
/// set's runners are) when `gh` is given.
#[derive(Default)]
struct FakeRunners {
    made: std::sync::Mutex<Vec<(String, String)>>,
    gh: Option<Arc<FakeGitHub>>,
}

impl ScaleSetRunners for FakeRunners {
    fn jit<'a>(
        &'a self,
        pool: &'a str,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<JitRunner, GhError>> + Send + 'a>> {
        Box::pin(async move {
            let mut made = self.made.lock().unwrap();
            made.push((pool.to_string(), name.to_string()));
            let id = 900 + made.len() as u64;
            if let Some(gh) = &self.gh {
                let info = crate::github::RunnerInfo { id, name: name.into(), online: false, busy: false };
                gh.lock().runners.insert(id, info);
            }
            Ok(JitRunner {
                runner_id: id,
                encoded: crate::secret::Secret::new(crate::github::fake::encoded_jit_config(id, name)),
            })
        })
    }
}

fn start_scale_set_pool(extra_pool: &str) -> (H, Arc<Registry>, Arc<FakeRunners>) {
    let dir = crate::test_support::tempdir();
    let mut cfg = (*config(&format!("intake = \"scale_set\"\n{extra_pool}"), &dir)).clone();
    let image = fake_image(&dir);
    for p in &mut cfg.pools {
        p.image = image.clone();
    }
    let (hv_tx, hv_rx) = mpsc::unbounded_channel();
    let hv = Arc::new(FakeHypervisor::new(hv_tx.clone()));
    let _ = hv_tx.send(HvEvent::Reconnected);
    let store = Arc::new(Store::open(&dir).unwrap());
    let gh = Arc::new(FakeGitHub::default());
    let runners = Arc::new(FakeRunners { gh: Some(gh.clone()), ..FakeRunners::default() });
    let registry = Arc::new(Registry::default());
    let (r, f) = (registry.clone(), runners.clone());
    let mut h = start_member(
        Arc::new(cfg),
        gh,
        hv,
        Some(hv_rx),
        store.clone(),
        store,
        move |s| s.with_scale_sets(r, f),
        new_clock(),
    );
    h.dirs.push(dir);
    (h, registry, runners)
}

impl H {
    /// What the pool's listener writes for a message of its set.
    fn deliver_from_set(&mut self, action: JobAction, job: JobInfo) {
        self.seq += 1;
        let ev = JobEvent {
            delivery: format!("scale-set-1-{}-0", self.seq),
            action,
            job: JobInfo { scale_set: Some("small".into()), ..job },
            received_at: self.clock.now(),
        };
        self.store.accept(&ev).unwrap();
        self.inbox.notify_one();
    }
}

/// A webhook about a job with the pool's labels is not the pool's (the hook hears of every
/// job, a scale set's too: served twice otherwise); the job the listener names the pool for
/// gets a VM, its runner's JIT config from the set (not GitHub's REST API), and GitHub is
/// never asked about the request (the REST API does not know it). The capacity announced
/// is what the pool could run at once.
#[tokio::test(start_paused = true)]
async fn a_scale_sets_jobs_come_from_its_listener_and_its_runners_from_the_set() {
    let (mut h, registry, runners) = start_scale_set_pool("");
    h.deliver(JobAction::Queued, info(1, LABELS, None));
    h.wait("capacity published", |_, _| registry.capacity("small") == 2).await;
    let s = h.status().await;
    assert!(s.vms.is_empty() && s.queued.is_empty(), "a webhook's job is not the scale set's: {s:#?}");

    h.deliver_from_set(JobAction::Queued, info(7_000_000_001, &["rv-small"], None));
    let s = h.wait("a VM for the set's job", |s, _| vm_for(s, 7_000_000_001).is_some()).await;
    let vm = vm_for(&s, 7_000_000_001).unwrap();
    h.wait("its runner from the set", |_, hv| hv.lock().delivered.iter().any(|(v, _)| *v == vm)).await;
    assert_eq!(*runners.made.lock().unwrap(), [("small".to_string(), vm.clone())]);
    // The hook's news of the same job (its workflow job id, its runner ours): not taken, or
    // the VM would look busy with a job its pool does not know.
    h.deliver(JobAction::InProgress, info(31_000_000_001, &["rv-small"], Some(&vm)));
    h.deliver(JobAction::Queued, info(31_000_000_002, &["rv-small"], None));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = h.status().await;
    assert!(s.queued.iter().all(|q| q.job_id < 31_000_000_000), "{s:#?}");
    assert!(
        !h.metrics.render().contains("runnervisor_jobs_unmatched_total 2"),
        "a scale set's job is no unmatched one"
    );
    assert!(s.vms.iter().all(|v| v.took_job.is_none()), "{s:#?}");
    // Long enough for the sync to ask GitHub about a webhook's job it heard nothing of
    // (two sync intervals without news, no hook configured).
    tokio::time::sleep(Duration::from_secs(60)).await;
    h.deliver_from_set(JobAction::InProgress, info(7_000_000_001, &["rv-small"], Some(&vm)));
    let mut done = info(7_000_000_001, &["rv-small"], Some(&vm));
    done.conclusion = Some("success".into());
    h.deliver_from_set(JobAction::Completed, done);
    h.hv.stop(&vm);
    h.wait("served and gone", |s, _| s.vms.is_empty() && s.queued.is_empty()).await;
    let calls = h.gh.lock().calls.clone();
    assert!(!calls.iter().any(|c| c == "jit" || c == "job"), "{calls:?}");
    // Draining: no capacity to announce.
    h.admin(AdminCommand::Drain(true)).await;
    h.wait("none while draining", |_, _| registry.capacity("small") == 0).await;
    h.shutdown().await;
}

/// In a fleet, a set's job is in the fleet's queue filed under its set (the member leading
/// the sets wrote it): one member with room claims it and serves it, its runner's JIT
/// config from the set; a webhook's job with the same labels is filed under them and no
/// member takes it. Each member's heartbeat says what its pool of the set could run, and
/// every member's registry announces the fleet's sum (whichever holds the session).
#[tokio::test(start_paused = true)]
async fn in_a_fleet_a_sets_job_is_served_once_and_the_sets_capacity_is_the_fleets() {
    use super::fleet::{LEASE, fleet_member};
    use crate::fleet::claims::MemoryBoard;
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let member = |host: &str| {
        let runners = Arc::new(FakeRunners { gh: Some(gh.clone()), ..FakeRunners::default() });
        let registry = Arc::new(Registry::default());
        let (r, f) = (registry.clone(), runners.clone());
        let h = fleet_member(&board, host, &gh, "intake = \"scale_set\"", |_| {}, move |s| s.with_scale_sets(r, f));
        (h, registry, runners)
    };
    let (a, reg_a, runners_a) = member("hv-a");
    let (b, reg_b, runners_b) = member("hv-b");
    // Heartbeats every third of the lease.
    a.wait_for("the fleet's capacity", LEASE, |_, _| reg_a.capacity("small") == 4).await;
    b.wait_for("the fleet's capacity", LEASE, |_, _| reg_b.capacity("small") == 4).await;
    assert_eq!((reg_a.own_capacity("small"), reg_b.own_capacity("small")), (2, 2));

    let at = a.clock.now();
    let hooked =
        JobEvent { delivery: "d-1".into(), action: JobAction::Queued, job: info(1, &["small"], None), received_at: at };
    board.write(&hooked);
    let set_job = JobInfo { scale_set: Some("small".into()), ..info(7_000_000_001, &["small"], None) };
    board.write(&JobEvent {
        delivery: "scale-set-1-7000000001-assigned-1".into(),
        action: JobAction::Queued,
        job: set_job,
        received_at: at,
    });
    let served = |s: &Status| s.vms.iter().filter(|v| v.job_id == 7_000_000_001).count();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut both = (0, 0);
    while Instant::now() < deadline {
        both = (served(&a.status().await), served(&b.status().await));
        if both.0 + both.1 > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(both.0 + both.1, 1, "one VM for the set's job: {both:?}");
    // Long enough for every read and claim: still one, and the webhook's job none.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (sa, sb) = (a.status().await, b.status().await);
    assert_eq!(served(&sa) + served(&sb), 1, "{sa:#?} {sb:#?}");
    assert!(sa.vms.iter().chain(&sb.vms).all(|v| v.job_id != 1), "a webhook's job is not the set's: {sa:#?} {sb:#?}");
    let made = [runners_a.made.lock().unwrap().clone(), runners_b.made.lock().unwrap().clone()].concat();
    assert_eq!(made.len(), 1, "its runner from the set: {made:?}");
    let calls = gh.lock().calls.clone();
    assert!(!calls.iter().any(|c| c == "jit" || c == "job"), "{calls:?}");

    // Its member goes away, the VM still booting: once its claim's lease runs out the other
    // takes the set's job over under the next attempt's name, asking the REST API nothing
    // (it does not know requests).
    let (gone, stays, host) = if served(&sa) == 1 { (a, b, "hv-a") } else { (b, a, "hv-b") };
    gone.shutdown().await;
    board.expire(host);
    let vm = |s: &Status, name: &str| s.vms.iter().any(|v| v.name == name);
    let second = "rv-small-7000000001-2";
    stays.wait_for("the set's job taken over", LEASE * 2, |s, _| vm(s, second)).await;
    let calls = gh.lock().calls.clone();
    assert!(!calls.iter().any(|c| c == "job"), "{calls:?}");

    // The set gives the request up (no runner took it) and assigns it again under its id:
    // queued again in the fleet's queue, and served again.
    let mut gave_up = JobInfo { scale_set: Some("small".into()), ..info(7_000_000_001, &["small"], None) };
    gave_up.conclusion = Some("cancelled".into());
    let at = stays.clock.now();
    let ev =
        |delivery: &str, action, job: JobInfo| JobEvent { delivery: delivery.into(), action, job, received_at: at };
    board.write(&ev("scale-set-1-7000000001-completed", JobAction::Completed, gave_up));
    stays.wait_for("its VM gone with it", LEASE, |s, _| !vm(s, second)).await;
    let again = JobInfo { scale_set: Some("small".into()), ..info(7_000_000_001, &["small"], None) };
    board.write(&ev("scale-set-1-7000000001-assigned-9", JobAction::Queued, again));
    stays.wait_for("served again", LEASE, |s, _| vm(s, "rv-small-7000000001-3")).await;
    stays.shutdown().await;
}

/// A scale set's jobs waiting to be acquired are in no book: while another pool's warm VM
/// held the host's only place (`capacity.max_vms`), the set announced no room, and its jobs
/// were never acquired (found by the simulator). They count as that pool's waiting jobs do:
/// the warm VM gives its place up, and the set's capacity follows.
#[tokio::test(start_paused = true)]
async fn a_scale_sets_waiting_jobs_free_the_host_room_another_pools_warm_vm_holds() {
    let big = "[[pool]]\nname = \"big\"\nlabels = [\"self-hosted\", \"big\"]\nimage = \"/dev/null\"\n\
               max_vms = 1\nwarm = 1\n[capacity]\nmax_vms = 1\n";
    let (h, registry, _) = start_scale_set_pool(big);
    h.wait("the other pool's warm VM waiting", |s, _| s.vms.iter().any(|v| v.pool == "big" && v.state == "waiting"))
        .await;
    let s = h.advance_for(Duration::from_secs(30)).await;
    assert_eq!(registry.capacity("small"), 0, "the host is full: {s:#?}");
    registry.set_available("small", 2);
    h.wait("the warm VM gone, room for the set", |s, _| s.vms.is_empty() && registry.capacity("small") == 1).await;
    // Once the set acquired them (none waits), the warm VM comes back.
    registry.set_available("small", 0);
    h.wait("the warm VM back", |s, _| s.vms.iter().any(|v| v.pool == "big")).await;
    h.shutdown().await;
}

//! Fleet mode: members sharing one queue serve each job once, within their capacity; a
//! member with a warm VM waiting is first; a member that goes away loses its unserved
//! jobs to the others once its lease runs out.

use super::*;
use std::collections::BTreeSet;

use crate::fleet::claims::{MemoryBoard, MemoryClaims};

pub(super) const LEASE: Duration = Duration::from_secs(30);

fn member(board: &Arc<MemoryBoard>, host: &str, gh: &Arc<FakeGitHub>, extra_pool: &str) -> H {
    member_with(board, host, gh, extra_pool, |_| {})
}

fn member_with(
    board: &Arc<MemoryBoard>,
    host: &str,
    gh: &Arc<FakeGitHub>,
    extra_pool: &str,
    tweak: impl FnOnce(&mut Config),
) -> H {
    fleet_member(board, host, gh, extra_pool, tweak, |s| s)
}

/// A member of the fleet on `board`; `setup` adds to its scheduler.
pub(super) fn fleet_member(
    board: &Arc<MemoryBoard>,
    host: &str,
    gh: &Arc<FakeGitHub>,
    extra_pool: &str,
    tweak: impl FnOnce(&mut Config),
    setup: impl FnOnce(Scheduler<FakeGitHub, FakeHypervisor>) -> Scheduler<FakeGitHub, FakeHypervisor> + Send + 'static,
) -> H {
    let dir = crate::test_support::tempdir();
    let mut cfg = (*config(extra_pool, &dir)).clone();
    cfg.pools[0].image = fake_image(&dir);
    tweak(&mut cfg);
    cfg.fleet = Some(crate::config::FleetConfig {
        host_id: Some(host.into()),
        postgres: crate::config::PostgresConfig {
            // An address, not a name: nothing is looked up (the fence drops it).
            url: "postgres://rv@198.18.200.1/rv".into(),
            password: None,
            ca_file: None,
            max_connections: 1,
        },
        lease: LEASE,
        cold_head_start: Duration::from_secs(1),
    });
    let (hv_tx, hv_rx) = mpsc::unbounded_channel();
    let hv = Arc::new(FakeHypervisor::new(hv_tx.clone()));
    let _ = hv_tx.send(HvEvent::Reconnected);
    let store = Arc::new(Store::open(&dir).unwrap());
    let clock = Arc::new(crate::clock::TokioClock::new());
    let claims = MemoryClaims { board: board.clone(), host: host.into(), lease: LEASE, clock };
    let fleet = claims::Fleet::new(Arc::new(claims), None, host.into(), LEASE, Duration::from_secs(1));
    let mut h = start_member(
        Arc::new(cfg),
        gh.clone(),
        hv,
        Some(hv_rx),
        store.clone(),
        store,
        move |s| setup(s.with_fleet(fleet)),
        new_clock(),
    );
    h.dirs.push(dir);
    h
}

/// One event of the fleet's log, as every member's mirror brings it (and the job's row).
fn publish(members: &mut [&mut H], board: &MemoryBoard, action: JobAction, job: JobInfo) {
    board.set_queued(job.id, matches!(action, JobAction::Queued | JobAction::Waiting));
    let delivery = format!("d-{}-{action:?}", job.id);
    for m in members.iter_mut() {
        m.deliver_as(&delivery, action, job.clone());
    }
}

/// The job runs on `vm` (of member `on`) and completes; every member hears it.
fn run_job(members: &mut [&mut H], on: usize, board: &MemoryBoard, vm: &str, id: u64) {
    publish(members, board, JobAction::InProgress, info(id, LABELS, Some(vm)));
    let mut done = info(id, LABELS, Some(vm));
    done.conclusion = Some("success".into());
    publish(members, board, JobAction::Completed, done);
    members[on].gh.lock().runners.retain(|_, r| r.name != vm);
    members[on].hv.stop(vm);
}

/// Whether `f` holds at every look for `limit` of virtual time.
async fn stays(h: &H, limit: Duration, f: impl Fn(&Status, &FakeHypervisor) -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if !f(&h.status().await, &h.hv) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// Each member's VMs with the job each was made for.
async fn vms(members: &[&mut H]) -> Vec<Vec<(String, u64)>> {
    let mut all = Vec::new();
    for m in members {
        all.push(m.status().await.vms.iter().map(|v| (v.name.clone(), v.job_id)).collect());
    }
    all
}

#[tokio::test(start_paused = true)]
async fn members_serve_each_job_once_within_their_capacity() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let (mut a, mut b) = (member(&board, "hv-a", &gh, ""), member(&board, "hv-b", &gh, ""));
    for id in 1..=5 {
        publish(&mut [&mut a, &mut b], &board, JobAction::Queued, info(id, LABELS, None));
    }
    // Two slots each: four jobs served, one VM each, the fifth waits.
    let mut seen = Vec::new();
    for _ in 0..200 {
        seen = vms(&[&mut a, &mut b]).await;
        if seen.iter().map(Vec::len).sum::<usize>() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2], "{seen:?}");
    let jobs: BTreeSet<u64> = seen.iter().flatten().map(|(_, j)| *j).collect();
    assert_eq!(jobs, (1..=4).collect(), "the oldest four, each once: {seen:?}");
    for (i, host) in ["hv-a", "hv-b"].iter().enumerate() {
        for (_, job) in &seen[i] {
            assert_eq!(board.holder(*job).as_deref(), Some(*host), "a VM only for a job its member holds");
        }
    }
    // Nothing more happens while no slot frees: no member makes a second VM for a job.
    assert!(stays(&a, Duration::from_secs(20), |s, _| s.vms.len() == 2).await);
    assert!(stays(&b, Duration::from_secs(1), |s, _| s.vms.len() == 2).await);
    // A slot frees on a: the fifth job goes there; then everything drains.
    let (vm, job) = seen[0][0].clone();
    run_job(&mut [&mut a, &mut b], 0, &board, &vm, job);
    a.wait("job 5 on a", |s, _| vm_for(s, 5).is_some()).await;
    for (i, m) in seen.iter().enumerate() {
        for (vm, job) in m.iter().filter(|(_, j)| *j != job) {
            run_job(&mut [&mut a, &mut b], i, &board, vm, *job);
        }
    }
    let vm5 = vm_for(&a.status().await, 5).unwrap();
    run_job(&mut [&mut a, &mut b], 0, &board, &vm5, 5);
    a.wait("a empty", |s, hv| s.vms.is_empty() && hv.running().is_empty()).await;
    b.wait("b empty", |s, hv| s.vms.is_empty() && hv.running().is_empty()).await;
    let made = a.hv.lock().started_total + b.hv.lock().started_total;
    assert_eq!(made, 5, "one VM per job across the fleet");
    let (ma, mb) = (a.metrics.render(), b.metrics.render());
    assert_eq!(claims_won(&ma) + claims_won(&mb), 5, "{ma}\n{mb}");
}

/// The claims a member won, as its metrics (`rendered`) count them.
fn claims_won(rendered: &str) -> u64 {
    let won = "runnervisor_fleet_claims_total{result=\"won\"} ";
    rendered.lines().find_map(|l| l.strip_prefix(won)?.parse().ok()).unwrap_or(0)
}

#[tokio::test(start_paused = true)]
async fn a_member_with_a_warm_vm_is_first_and_cold_members_leave_it_the_job() {
    let s =
        left_to_the_warm_member("warm = 1", 7, |s, _| s.pools[0].warm_waiting == 1, |m| m.warm_target == 1, |v| v.warm)
            .await;
    assert!(s.vms.iter().any(|v| v.warm && v.job_id == 7), "{s:#?}");
}

/// Snapshot slots count as warm capacity in a fleet: a member whose slot is saved says so
/// in its heartbeat (a free slot as a warm VM waiting), and a cold member leaves it a
/// young job, which it restores a VM for.
#[tokio::test(start_paused = true)]
async fn a_member_with_a_saved_slot_counts_as_warm_and_cold_members_leave_it_the_job() {
    left_to_the_warm_member(
        "snapshot_slots = 1",
        8,
        |s, hv| s.pools[0].slots_ready == 1 && hv.running().is_empty(),
        |m| m.warm_target == 1 && m.warm_waiting == 1,
        |v| v.slot.is_some(),
    )
    .await;
}

/// A member of `warm_pool` (hv-warm) and a cold one: once the first is `ready` and the
/// cold one heard it as `heard` says, job `job` goes to a VM of the first that `serves`
/// (its status then), never to the cold member.
async fn left_to_the_warm_member(
    warm_pool: &str,
    job: u64,
    ready: impl Fn(&Status, &FakeHypervisor) -> bool,
    heard: impl Fn(&crate::fleet::claims::MemberInfo) -> bool,
    serves: impl Fn(&crate::admin::proto::VmStatus) -> bool,
) -> Status {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let mut warm = member(&board, "hv-warm", &gh, warm_pool);
    let mut cold = member(&board, "hv-cold", &gh, "");
    warm.wait("warm capacity waiting", ready).await;
    cold.wait_for("the cold member heard of the warm one", LEASE, |s, _| {
        s.fleet.as_ref().is_some_and(|f| f.members.iter().any(|m| m.host_id == "hv-warm" && heard(m)))
    })
    .await;
    publish(&mut [&mut warm, &mut cold], &board, JobAction::Queued, info(job, LABELS, None));
    let s = warm.wait("served there", |s, _| s.vms.iter().any(|v| serves(v) && v.job_id == job)).await;
    assert_eq!(board.holder(job).as_deref(), Some("hv-warm"));
    assert!(stays(&cold, Duration::from_secs(10), |s, _| s.vms.is_empty()).await, "the cold member makes no VM for it");
    s
}

/// A warm member that reads a job another member wins keeps its one waiting VM: it boots
/// no second one to replace the VM it meant to bind, and so reaps none as surplus (20
/// members with a warm VM each made three VMs per job that way under load).
#[tokio::test(start_paused = true)]
async fn a_warm_member_that_loses_a_job_to_another_boots_and_reaps_no_warm_vm_for_it() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let mut warm = member(&board, "hv-warm", &gh, "warm = 1");
    warm.wait("a warm VM waiting", |s, _| s.pools[0].warm_waiting == 1).await;
    // Another member wrote the job and claimed it as it did.
    board.set_queued(5, true);
    let clock = Arc::new(crate::clock::TokioClock::new());
    let other = MemoryClaims { board: board.clone(), host: "hv-other".into(), lease: LEASE, clock };
    assert_eq!(crate::fleet::claims::Claims::claim(&other, vec![5]).await.unwrap().len(), 1);
    warm.deliver_as("d-5", JobAction::Queued, info(5, LABELS, None));
    let kept = stays(&warm, Duration::from_secs(20), |s, hv| {
        s.vms.len() == 1 && s.pools[0].warm_waiting == 1 && hv.lock().started_total == 1
    })
    .await;
    let m = warm.metrics.render();
    assert!(kept, "{:#?}\n{m}", warm.status().await);
    assert!(!m.contains("warm_surplus"), "{m}");
    assert_eq!(board.holder(5).as_deref(), Some("hv-other"));
}

#[tokio::test(start_paused = true)]
async fn in_a_fleet_without_warm_vms_a_cold_member_claims_at_once() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let (mut a, mut b) = (member(&board, "hv-a", &gh, ""), member(&board, "hv-b", &gh, ""));
    for m in [&a, &b] {
        // Heartbeats every third of the lease.
        m.wait_for("both members heard", LEASE, |s, _| s.fleet.as_ref().is_some_and(|f| f.members.len() == 2)).await;
    }
    let published = Instant::now();
    publish(&mut [&mut a, &mut b], &board, JobAction::Queued, info(3, LABELS, None));
    let mut made = false;
    while !made {
        made = !vms(&[&mut a, &mut b]).await.concat().is_empty();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // No head start (cold_head_start is 1 s here): nobody keeps a warm VM to leave it to.
    assert!(published.elapsed() < Duration::from_millis(500), "{:?}", published.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_runner_that_took_another_members_job_leaves_its_own_to_that_members_vm() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let (mut a, mut b) = (member(&board, "hv-a", &gh, ""), member(&board, "hv-b", &gh, ""));
    publish(&mut [&mut a], &board, JobAction::Queued, info(1, LABELS, None));
    a.wait("a serves job 1", |s, _| vm_for(s, 1).is_some()).await;
    publish(&mut [&mut b], &board, JobAction::Queued, info(2, LABELS, None));
    b.wait("b serves job 2", |s, _| vm_for(s, 2).is_some()).await;
    b.deliver_as("d-1-b", JobAction::Queued, info(1, LABELS, None));
    a.deliver_as("d-2-a", JobAction::Queued, info(2, LABELS, None));
    // a's runner comes online first and takes job 2 (b's). b's VM, still booting, has no
    // job now and will take job 1: a makes no second VM for job 1 meanwhile.
    publish(&mut [&mut a, &mut b], &board, JobAction::InProgress, info(2, LABELS, Some("rv-small-1")));
    let taken = Instant::now();
    assert!(
        stays(&a, LEASE / 2 - Duration::from_secs(1), |s, hv| s.vms.len() == 1 && hv.lock().started_total == 1).await
    );
    assert_eq!(b.hv.lock().started_total, 1, "nor does b");
    // b's VM never takes it (say its boot failed): after half a lease, a serves job 1 again.
    let s = a.wait_for("a serves job 1 again", LEASE, |s, _| s.vms.len() == 2).await;
    assert!(taken.elapsed() >= LEASE / 2, "{:?}", taken.elapsed());
    assert!(s.vms.iter().any(|v| v.name == "rv-small-1-2"), "{s:#?}");
}

/// A member whose VMs fail to start (its pool backs off) gives the job's claim back
/// instead of renewing it while it cannot serve it: a healthy member serves the job.
#[tokio::test(start_paused = true)]
async fn a_member_that_cannot_serve_gives_its_claims_back_and_a_healthy_one_serves_them() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let mut a = member(&board, "hv-a", &gh, "");
    a.hv.lock().fail_starts = 1000;
    publish(&mut [&mut a], &board, JobAction::Queued, info(11, LABELS, None));
    // Claimed, then given back as its VM fails, again and again: the claim is held only
    // between, which a look at the board may miss (it did on a loaded machine); the count
    // of claims won stays.
    let metrics = a.metrics.clone();
    a.wait("a claimed it", move |_, _| claims_won(&metrics.render()) > 0).await;
    let mut b = member(&board, "hv-b", &gh, "");
    b.deliver_as("d-11-b", JobAction::Queued, info(11, LABELS, None));
    let s = b.wait_for("b serves it", LEASE * 2, |s, _| vm_for(s, 11).is_some()).await;
    assert_eq!(board.holder(11).as_deref(), Some("hv-b"), "{s:#?}");
    let m = a.metrics.render();
    assert!(m.contains("runnervisor_fleet_claims_total{result=\"given_back\"}"), "{m}");
}

/// A member that cannot serve a job (its pool backs off) keeps its claim while its VM's
/// teardown still asks GitHub about the VM's runner, which may be running the job (unseen:
/// its webhook late): given back, another member would serve a job already running.
#[tokio::test(start_paused = true)]
async fn a_member_keeps_the_claim_of_a_job_its_going_vm_may_be_running() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let mut a = member(&board, "hv-a", &gh, "registration_timeout = \"60s\"");
    publish(&mut [&mut a], &board, JobAction::Queued, info(13, LABELS, None));
    a.wait("bound", |_, hv| hv.lock().delivered.len() == 1).await;
    gh.lock().fail_calls.insert("list", 1000);
    gh.lock().fail_calls.insert("delete", 1000);
    a.hv.lock().fail_starts = 1000;
    a.wait_for("past its registration_timeout, asked about", Duration::from_secs(120), |s, _| {
        s.vms.iter().any(|v| v.name == "rv-small-13" && v.state == "tearing_down")
    })
    .await;
    assert!(
        stays(&a, LEASE * 3, |_, _| board.holder(13).as_deref() == Some("hv-a")).await,
        "the claim given back: {:?}",
        board.holder(13)
    );
    let m = a.metrics.render();
    assert!(m.contains("runnervisor_provision_failures_total{"), "its next VMs failed to start: {m}");
    assert!(!m.contains("runnervisor_fleet_claims_total{result=\"given_back\"}"), "{m}");
}

#[tokio::test(start_paused = true)]
async fn a_member_that_goes_away_loses_its_unserved_jobs_to_another() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let mut a = member(&board, "hv-a", &gh, "");
    publish(&mut [&mut a], &board, JobAction::Queued, info(9, LABELS, None));
    a.wait("a serves job 9", |s, _| vm_for(s, 9).is_some()).await;
    assert_eq!(board.holder(9).as_deref(), Some("hv-a"));
    // a goes away with its VM still booting (its runner never came online).
    let (_, a_hv, _) = a.shutdown().await;
    let mut b = member(&board, "hv-b", &gh, "");
    publish(&mut [&mut b], &board, JobAction::Queued, info(9, LABELS, None));
    // a's lease still runs: b leaves the job alone.
    assert!(stays(&b, Duration::from_secs(10), |s, _| s.vms.is_empty()).await);
    // a's lease runs out (it stopped renewing): b takes the job over, checks GitHub (still
    // queued), and serves it with the next attempt's name.
    board.expire("hv-a");
    let s = b.wait_for("b takes over job 9", Duration::from_secs(60), |s, _| vm_for(s, 9).is_some()).await;
    assert_eq!(vm_for(&s, 9).as_deref(), Some("rv-small-9-2"), "attempt 2: a unique name");
    assert_eq!(board.holder(9).as_deref(), Some("hv-b"));
    assert!(b.gh.lock().calls.iter().any(|c| c == "job"), "GitHub was asked first");
    assert_eq!(a_hv.lock().started_total, 1);
}

/// A heartbeat that hangs (a lookup of the database's name, a saturated pool) holds up no
/// renewal of a claim: an independent read found renewals waiting on it, so a member whose
/// heartbeat hung lost its claims to the others while it served them.
#[tokio::test(start_paused = true)]
async fn a_heartbeat_that_hangs_holds_up_no_renewal() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let mut a = member(&board, "hv-a", &gh, "");
    a.hv.lock().guests_booting = true;
    publish(&mut [&mut a], &board, JobAction::Queued, info(12, LABELS, None));
    a.wait("a makes a VM for job 12", |s, _| vm_for(s, 12).is_some()).await;
    board.stalled_heartbeats.lock().unwrap().insert("hv-a".into());
    // Still queued at GitHub: a member taking it over would serve it.
    gh.lock().queued.push(info(12, LABELS, None));
    let mut b = member(&board, "hv-b", &gh, "");
    publish(&mut [&mut b], &board, JobAction::Queued, info(12, LABELS, None));
    // Three leases: a's renewals keep its claim; b never takes the job over.
    assert!(stays(&b, 3 * LEASE, |s, _| vm_for(s, 12).is_none()).await, "b took job 12 over");
    assert_eq!(board.holder(12).as_deref(), Some("hv-a"));
    assert!(a.status().await.fleet.is_some_and(|f| f.held == 1));
    // Its heartbeats are retried (each bounded by a third of the lease): one that hung does
    // not stop the next.
    board.stalled_heartbeats.lock().unwrap().clear();
    b.wait_for("a heard by the fleet again", LEASE, |s, _| {
        s.fleet.as_ref().is_some_and(|f| f.members.iter().any(|m| m.host_id == "hv-a" && m.seen_secs_ago < 20))
    })
    .await;
}

/// A cold VM is bound to its job only within its member's claim: a member that lost the
/// claim while the VM booted (its lease ran out, another member took the job) gives the VM
/// no runner for it; the VM is surplus.
#[tokio::test(start_paused = true)]
async fn a_cold_vm_whose_claim_was_lost_while_it_booted_is_not_bound() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let mut a = member(&board, "hv-a", &gh, "");
    a.hv.lock().guests_booting = true;
    publish(&mut [&mut a], &board, JobAction::Queued, info(5, LABELS, None));
    let s = a.wait("a makes a VM for job 5", |s, _| vm_for(s, 5).is_some()).await;
    let vm = vm_for(&s, 5).unwrap();
    // a's lease runs out (say it stalled) and b takes the job.
    board.expire("hv-a");
    let mut b = member(&board, "hv-b", &gh, "");
    publish(&mut [&mut b], &board, JobAction::Queued, info(5, LABELS, None));
    b.wait_for("b takes job 5", Duration::from_secs(60), |s, _| vm_for(s, 5).is_some()).await;
    // a's next renewal tells it; then its guest is ready for a runner.
    a.wait_for("a learns it lost job 5", Duration::from_secs(60), |s, _| s.fleet.as_ref().is_some_and(|f| f.held == 0))
        .await;
    a.hv.lock().guests_booting = false;
    a.wait_for("a's VM reaped as surplus", Duration::from_secs(60), |s, hv| {
        s.vms.iter().all(|v| v.name != vm) && !hv.running().contains(&vm)
    })
    .await;
    assert!(a.hv.lock().delivered.is_empty(), "no runner was bound to a's VM");
    assert_eq!(board.holder(5).as_deref(), Some("hv-b"));
}

#[tokio::test(start_paused = true)]
async fn a_taken_over_job_its_member_had_served_is_not_served_again() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let mut a = member(&board, "hv-a", &gh, "");
    publish(&mut [&mut a], &board, JobAction::Queued, info(3, LABELS, None));
    a.wait("a serves job 3", |s, _| vm_for(s, 3).is_some()).await;
    let _ = a.shutdown().await;
    // The job ran on a's runner, but the news never reached the fleet's log.
    gh.lock().jobs.insert(
        3,
        crate::github::JobStatus {
            status: "in_progress".into(),
            conclusion: None,
            runner_name: Some("rv-small-3".into()),
        },
    );
    let mut b = member(&board, "hv-b", &gh, "");
    b.deliver_as("d-3", JobAction::Queued, info(3, LABELS, None));
    gh.lock().jobs.get_mut(&3).unwrap().status = "in_progress".into();
    board.expire("hv-a");
    b.wait_for("b learns job 3 runs", Duration::from_secs(60), |s, _| s.pools[0].queued == 0).await;
    assert!(stays(&b, Duration::from_secs(10), |s, _| s.vms.is_empty()).await, "no VM for a job already running");
}

#[tokio::test(start_paused = true)]
async fn a_member_back_after_losing_its_job_reaps_its_idle_vm() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let mut a = member(&board, "hv-a", &gh, "");
    publish(&mut [&mut a], &board, JobAction::Queued, info(4, LABELS, None));
    let s = a.wait("a serves job 4", |s, _| vm_for(s, 4).is_some()).await;
    let vm = vm_for(&s, 4).unwrap();
    // a is cut off; its lease runs out and b takes the job over.
    let (gh_a, hv, store) = a.shutdown().await;
    board.expire("hv-a");
    let mut b = member(&board, "hv-b", &gh, "");
    publish(&mut [&mut b], &board, JobAction::Queued, info(4, LABELS, None));
    b.wait_for("b takes over job 4", Duration::from_secs(60), |s, _| vm_for(s, 4).is_some()).await;
    // a comes back with its VM (from its store and libvirt): it no longer holds job 4,
    // so its VM is a surplus runner, reaped once idle for the pool's idle timeout.
    let dir = crate::test_support::tempdir();
    let mut cfg = (*config("idle_timeout = \"5s\"", &dir)).clone();
    cfg.pools[0].image = fake_image(&dir);
    cfg.fleet = b.config.fleet.clone().map(|mut f| {
        f.host_id = Some("hv-a".into());
        f
    });
    let clock = Arc::new(crate::clock::TokioClock::new());
    let claims = MemoryClaims { board: board.clone(), host: "hv-a".into(), lease: LEASE, clock };
    let fleet = claims::Fleet::new(Arc::new(claims), None, "hv-a".into(), LEASE, Duration::from_secs(1));
    let mut back =
        start_member(Arc::new(cfg), gh_a, hv, None, store.clone(), store, |s| s.with_fleet(fleet), new_clock());
    back.dirs.push(dir);
    let _ = back.tx.send(Event::Hv(HvEvent::Reconnected));
    back.wait_for("a's idle VM reaped", Duration::from_secs(60), |s, hv| {
        s.vms.iter().all(|v| v.name != vm) && !hv.running().contains(&vm)
    })
    .await;
    assert_eq!(board.holder(4).as_deref(), Some("hv-b"), "b keeps it");
}

#[tokio::test(start_paused = true)]
async fn one_member_at_a_time_reads_the_delivery_log_and_another_takes_over() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let hooked = |c: &mut Config| c.github.hook = Some(crate::config::HookConfig::Organization { id: 1 });
    let a = member_with(&board, "hv-a", &gh, "", hooked);
    let b = member_with(&board, "hv-b", &gh, "", hooked);
    let count = |what: &str| gh.lock().calls.iter().filter(|c| *c == what).count();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (lists, logs) = (count("list"), count("deliveries"));
    // Every 5 s: one member lists the runners (the other follows its VMs on the list it
    // shares) and reads the delivery log.
    assert!((11..=14).contains(&lists), "runner lists: {lists} (one member, not both)");
    assert!((11..=14).contains(&logs), "delivery log reads: {logs} (one member, not both)");
    // The lead prunes the fleet's tables once in the hour (nothing was left over).
    assert_eq!(board.prunes.load(std::sync::atomic::Ordering::Relaxed), 1);
    // and records how far it read the log, where a new lead goes on from.
    let checked = board.deliveries_checked.lock().unwrap().expect("shared");
    gh.lock().deliveries_since.clear();
    // The leader goes away: the other reads the log once the lead's lease ran out.
    let leader = board.leads.lock().unwrap()["github"].0.clone();
    let (gone, stays) = if leader == "hv-a" { (a, b) } else { (b, a) };
    let _ = gone.shutdown().await;
    board.expire(&leader);
    let before = count("deliveries");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(count("deliveries") >= before + 5, "the other member took the lead");
    assert_ne!(board.leads.lock().unwrap()["github"].0, leader);
    let first = gh.lock().deliveries_since.first().copied();
    assert!(first.is_some_and(|since| since >= checked), "the new lead read on from {checked:?}, not from {first:?}");
    assert_eq!(board.prunes.load(std::sync::atomic::Ordering::Relaxed), 2, "the new lead prunes too");
    let _ = stays.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_member_that_does_not_lead_follows_its_runners_on_the_list_the_lead_shares() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let a = member(&board, "hv-a", &gh, "");
    a.wait_for("a leads", LEASE, |_, _| board.leads.lock().unwrap().get("github").is_some_and(|l| l.0 == "hv-a")).await;
    let mut b = member(&board, "hv-b", &gh, "");
    publish(&mut [&mut b], &board, JobAction::Queued, info(5, LABELS, None));
    b.wait("b serves job 5", |s, _| vm_for(s, 5).is_some()).await;
    let lists = gh.lock().calls.iter().filter(|c| *c == "list").count();
    // Its runner comes online: b learns it from the list a read and shared.
    gh.set_runner("rv-small-5", true, false);
    b.wait_for("b's runner online", LEASE, |s, _| s.vms.iter().any(|v| v.name == "rv-small-5" && v.state == "idle"))
        .await;
    let after = gh.lock().calls.iter().filter(|c| *c == "list").count();
    assert!(after - lists <= 3, "one member lists ({} lists meanwhile)", after - lists);
    assert_eq!(board.leads.lock().unwrap()["github"].0, "hv-a");
}

/// A job deleted at GitHub (its run or repository: no webhook) while a runner made for it
/// waits online on a member that does not lead: that member asks GitHub about it itself
/// (the lead may never have read the job: a member claims a job as it writes it), drops it
/// on the second 404, and its runner goes as surplus, not after the hour's recheck. With a
/// hook or without (then the job is stale too, which the lead alone asks about as such).
#[tokio::test(start_paused = true)]
async fn a_member_that_does_not_lead_asks_about_the_jobs_beside_its_waiting_runners() {
    for hooked in [true, false] {
        let board = Arc::new(MemoryBoard::default());
        let gh = Arc::new(FakeGitHub::default());
        let tweak = |c: &mut Config| {
            if hooked {
                c.github.hook = Some(crate::config::HookConfig::Organization { id: 1 });
            }
            c.pools[0].max_vms = 1;
            c.pools[0].idle_timeout = Duration::from_secs(30);
        };
        let a = member_with(&board, "hv-a", &gh, "", tweak);
        a.wait_for("a leads", LEASE, |_, _| board.leads.lock().unwrap().get("github").is_some_and(|l| l.0 == "hv-a"))
            .await;
        let mut b = member_with(&board, "hv-b", &gh, "", tweak);
        for id in [7, 8] {
            publish(&mut [&mut b], &board, JobAction::Queued, info(id, LABELS, None));
        }
        b.wait("b serves job 7", |s, _| vm_for(s, 7).is_some()).await;
        for id in [7, 8] {
            gh.lock().jobs.remove(&id);
        }
        gh.set_runner("rv-small-7", true, false);
        b.wait_for("b's VM gone", Duration::from_secs(150), |s, hv| s.vms.is_empty() && hv.running().is_empty()).await;
        let asked = gh.lock().calls.iter().filter(|c| *c == "job").count();
        assert_eq!(asked, 4, "hooked {hooked}: each job asked about twice (dropped on the second 404)");
        assert_eq!(board.leads.lock().unwrap()["github"].0, "hv-a", "b never led");
        let (_, _, store) = b.shutdown().await;
        let jobs = store.load().unwrap().jobs;
        for id in [7, 8] {
            assert!(
                matches!(&jobs[&id].state, JobState::Completed { conclusion, .. } if conclusion.as_deref() == Some("not_found")),
                "hooked {hooked}, {id}: {:?}",
                jobs[&id].state
            );
        }
        let _ = a.shutdown().await;
    }
}

/// A job VM must not reach the fleet's other hosts: each member's fence drops the other
/// members' addresses (from their heartbeats) and the database's (from its URL).
#[tokio::test(start_paused = true)]
async fn the_fence_drops_the_other_members_and_the_database() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let mut a = member(&board, "hv-a", &gh, "");
    // Another member, on a host of its own with a public address.
    board.heard(crate::fleet::claims::MemberInfo {
        host_id: "hv-b".into(),
        max_vms: 2,
        vms: 0,
        warm_waiting: 0,
        warm_target: 0,
        held: 0,
        version: "0.1.0".into(),
        seen_secs_ago: 0,
        addresses: vec!["203.0.113.77".into(), "not an address".into()],
        number: Some(0),
        scale_sets: Default::default(),
    });
    tokio::time::sleep(LEASE).await;
    publish(&mut [&mut a], &board, JobAction::Queued, info(901, LABELS, None));
    a.wait("a VM", |_, hv| hv.running().len() == 1).await;
    let filter = a.hv.lock().filters["runnervisor-fence"].clone();
    for other in ["203.0.113.77", "198.18.200.1"] {
        assert!(filter.contains(&format!("dstipaddr=\"{other}\"")), "{other} not dropped: {filter}");
    }
    a.shutdown().await;
}

/// Members sharing one libvirtd: a member's slots carry its digits, and its sweep leaves
/// another member's saved slot (no domain, so no host id to see) with its volumes and
/// address alone, while a slot of its own digits that it no longer makes goes.
#[tokio::test(start_paused = true)]
async fn a_member_leaves_another_members_saved_slot_alone_and_removes_its_own_unused_one() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let a = member(&board, "hv-a", &gh, "snapshot_slots = 1");
    // The first member to write its heartbeat is given number 0.
    let mine = 0;
    let own = crate::hypervisor::slot_name("small", mine * 1000);
    let foreign = crate::hypervisor::slot_name("small", (mine + 1) % 1000 * 1000);
    let unused = crate::hypervisor::slot_name("small", mine * 1000 + 7);
    let volumes = |slot: &str| [".save", ".qcow2", "-seed.img"].map(|s| format!("{slot}{s}"));
    {
        let mut hv = a.hv.lock();
        let dhcp = hv.dhcp.get_or_insert_with(crate::hypervisor::fake::fake_dhcp);
        for (n, slot) in [&foreign, &unused].into_iter().enumerate() {
            let ip = std::net::Ipv4Addr::new(198, 51, 100, 240 + n as u8);
            dhcp.hosts.push(crate::hypervisor::network::Reservation {
                vm: slot.clone(),
                mac: crate::hypervisor::network::mac_for(ip),
                ip,
            });
        }
        for slot in [&foreign, &unused] {
            hv.volumes.extend(volumes(slot));
            hv.saved.insert(slot.clone(), "<domain type='qemu'><name>x</name></domain>".into());
        }
    }
    a.wait("its own slot saved, the unused one removed", |s, hv| {
        s.pools[0].slots_ready == 1 && volumes(&unused).iter().all(|v| !hv.lock().volumes.contains(v))
    })
    .await;
    assert!(a.hv.lock().volumes.contains(&format!("{own}.save")), "its own slot: {:?}", a.hv.lock().volumes);
    // Sweeps and a provisioning timeout's worth of time go by: the other member's slot stays.
    let left_alone = |_: &Status, hv: &FakeHypervisor| {
        let s = hv.lock();
        volumes(&foreign).iter().all(|v| s.volumes.contains(v))
            && s.dhcp.as_ref().is_some_and(|d| d.hosts.iter().any(|h| h.vm == foreign))
    };
    assert!(stays(&a, Duration::from_secs(1200), left_alone).await, "another member's slot touched");
    let held = a.hv.lock().dhcp.as_ref().unwrap().hosts.iter().any(|h| h.vm == unused);
    assert!(!held, "the unused slot's address given back");
    a.shutdown().await;
}

/// A member whose image serves no slot (no manifest: its guest may not freshen a restored
/// VM) makes none, and does not count its `snapshot_slots` as warm capacity: the other
/// members would leave young jobs to capacity it does not have.
#[tokio::test(start_paused = true)]
async fn a_member_whose_image_serves_no_slot_does_not_count_its_slots_as_warm() {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let refused = member_with(&board, "hv-refused", &gh, "snapshot_slots = 1", |c| {
        std::fs::remove_file(crate::images::manifest_path(&c.pools[0].image)).unwrap()
    });
    let other = member(&board, "hv-other", &gh, "");
    refused
        .wait("its image refused for slots", |_, _| {
            refused.metrics.render().contains("runnervisor_slot_failures_total{pool=\"small\",step=\"image\"} 1")
        })
        .await;
    // Heartbeats every third of the lease: the other member has heard it since.
    let s = other.advance_for(LEASE).await;
    let heard = s.fleet.as_ref().and_then(|f| f.members.iter().find(|m| m.host_id == "hv-refused").cloned());
    assert_eq!(heard.map(|m| (m.warm_target, m.warm_waiting)), Some((0, 0)), "{s:#?}");
    assert!(refused.hv.lock().volumes.is_empty(), "no slot made");
}

/// A runner already registered under the name of a member's new VM may be another
/// member's in a fleet (one just registered, not online yet): it is not deleted, neither
/// to make room nor when the VM that could not take the name goes (a single host replaces
/// its own leftover); the job is served under the next name.
#[tokio::test(start_paused = true)]
async fn a_member_never_deletes_a_runner_that_has_its_vms_name() {
    let (board, gh, mut a) = lone_member_beside_runner(77, "rv-small-21").await;
    publish(&mut [&mut a], &board, JobAction::Queued, info(21, LABELS, None));
    let s = a
        .wait_advancing("served under another name", |s, hv| {
            s.vms.iter().any(|v| v.job_id == 21 && v.name != "rv-small-21") && !hv.lock().delivered.is_empty()
        })
        .await;
    let runner = gh.lock().runners.get(&77).map(|r| r.name.clone());
    assert_eq!(runner.as_deref(), Some("rv-small-21"), "the other runner stays: {s:#?}");
    assert!(gh.lock().calls.iter().all(|c| !c.starts_with("delete")), "{:?}", gh.lock().calls);
}

/// The same, as the job's last attempt, its destroy failing (it is retried 10 s on): no
/// runner is asked about (none is the VM's), so the job is given up at once, not once the
/// VM is gone.
#[tokio::test(start_paused = true)]
async fn a_last_attempt_whose_name_another_runner_has_is_given_up_at_once() {
    let (board, gh, mut a) = lone_member_beside_runner_with(79, "rv-small-23", "max_attempts = 1").await;
    a.hv.lock().panics.insert("teardown", 1);
    publish(&mut [&mut a], &board, JobAction::Queued, info(23, LABELS, None));
    let s = a.wait_advancing("given up", |s, _| s.queued.is_empty()).await;
    assert!(s.vms.iter().any(|v| v.name == "rv-small-23"), "its teardown is still to finish: {s:#?}");
    assert!(a.metrics.render().contains("runnervisor_jobs_failed_total{pool=\"small\"} 1"), "{s:#?}");
    assert!(gh.lock().calls.iter().all(|c| !c.starts_with("delete") && c != "find"), "{:?}", gh.lock().calls);
}

/// A credential that failed, maybe after GitHub made the runner (its answer lost): the
/// next binding of the same VM finds a runner of its name, its own, and replaces it, as a
/// single host does (no boot wasted, no registration left for a day).
#[tokio::test(start_paused = true)]
async fn a_member_replaces_the_runner_its_own_earlier_binding_made() {
    let (board, gh, mut a) = lone_member_beside_runner(78, "rv-small-22").await;
    gh.lock().fail_calls.insert("jit", 1);
    publish(&mut [&mut a], &board, JobAction::Queued, info(22, LABELS, None));
    let s = a
        .wait_advancing("bound on the second try", |s, hv| {
            s.vms.iter().any(|v| v.name == "rv-small-22" && v.job_id == 22) && !hv.lock().delivered.is_empty()
        })
        .await;
    assert!(!gh.lock().runners.contains_key(&78), "its own leftover replaced: {s:#?}");
    assert_eq!(a.hv.lock().started_total, 1, "no second VM");
}

/// A fleet of one member (hv-a), joined, and an offline runner `name` (`id`) already
/// registered at GitHub.
async fn lone_member_beside_runner(id: u64, name: &str) -> (Arc<MemoryBoard>, Arc<FakeGitHub>, H) {
    lone_member_beside_runner_with(id, name, "").await
}

async fn lone_member_beside_runner_with(
    id: u64,
    name: &str,
    extra_pool: &str,
) -> (Arc<MemoryBoard>, Arc<FakeGitHub>, H) {
    let board = Arc::new(MemoryBoard::default());
    let gh = Arc::new(FakeGitHub::default());
    let a = member(&board, "hv-a", &gh, extra_pool);
    a.wait_for("a member", LEASE, |s, _| s.fleet.as_ref().is_some_and(|f| f.members.len() == 1)).await;
    gh.lock().runners.insert(id, crate::github::RunnerInfo { id, name: name.into(), online: false, busy: false });
    (board, gh, a)
}

//! Warm pools: VMs booted without credentials, bound to jobs as they arrive.

use super::*;

fn warm_vms(s: &Status, state: &str) -> Vec<String> {
    s.vms.iter().filter(|v| v.warm && v.state == state).map(|v| v.name.clone()).collect()
}

fn bound_to(s: &Status, job: u64) -> Option<String> {
    s.vms.iter().find(|v| v.warm && v.job_id == job).map(|v| v.name.clone())
}

#[tokio::test(start_paused = true)]
async fn a_warm_vm_holds_no_credential_until_a_job_arrives_then_serves_it_and_is_replaced() {
    let mut h = harness("warm = 1");
    let s = h.wait("a warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    let warm = warm_vms(&s, "waiting").remove(0);
    assert!(warm.starts_with("rv-small-w"), "{warm}");
    assert_eq!(s.pools[0].warm_waiting, 1);
    {
        // Nothing worth stealing: no runner registered, no credential in its seed.
        assert!(h.gh.runner_names().is_empty(), "{:?}", h.gh.runner_names());
        let hv = h.hv.lock();
        let seed = String::from_utf8_lossy(&hv.seeds[&warm]).into_owned();
        assert!(!seed.contains("jitconfig") && !seed.contains("runcmd"), "{seed}");
        let xml = &hv.domains[&warm].1;
        assert!(xml.contains("dev.runnervisor.bind.0") && xml.contains("<runnervisor:warm>true</runnervisor:warm>"));
        assert!(xml.contains("warm VM of pool small"), "virsh desc says so: {xml}");
        assert!(hv.delivered.is_empty());
    }
    h.deliver(JobAction::Queued, info(11, LABELS, None));
    let s = h
        .wait("bound, and a new warm VM", |s, _| {
            bound_to(s, 11).is_some() && s.vms.iter().any(|v| v.warm && v.job_id == 0 && v.name != warm)
        })
        .await;
    assert_eq!(bound_to(&s, 11).as_deref(), Some(warm.as_str()), "the waiting VM serves the job: {s:#?}");
    assert!(s.vms.iter().all(|v| v.warm), "no cold VM for it: {s:#?}");
    {
        let hv = h.hv.lock();
        assert_eq!(hv.delivered.len(), 1);
        let (vm, msg) = &hv.delivered[0];
        assert_eq!(vm, &warm);
        assert!(msg.contains("\".runner\"") && msg.contains("\"runnervisor\":2"), "{msg}");
        assert!(!msg.contains("--jitconfig"), "the JIT config is in no command line: {msg}");
        assert!(hv.descriptions[&warm].contains("job \"build\""), "{:?}", hv.descriptions);
    }
    assert!(h.gh.runner_names().contains(&warm), "its JIT runner is made at binding");
    let m = h.metrics.render();
    assert!(m.contains("runnervisor_job_runners_total{pool=\"small\",path=\"warm\"} 1"), "{m}");
    assert!(m.contains("runnervisor_bind_duration_seconds_count{pool=\"small\"} 1"), "{m}");
    assert!(!m.contains("path=\"cold\""), "{m}");
    h.run_job_on(&warm, 11);
    let s =
        h.wait("the bound VM is gone", |s, hv| s.vms.iter().all(|v| v.name != warm) && hv.running().len() == 1).await;
    assert_eq!(warm_vms(&s, "waiting").len() + warm_vms(&s, "warming").len(), 1, "{s:#?}");
    // The timeline: booted before the job came, bound when it did.
    let t = h.trace(&warm).await;
    assert_eq!((t.job_id, t.warm, t.reason.as_deref()), (Some(11), true, Some("stopped")), "{t:#?}");
    let boot = [
        ("created", t.created),
        ("defined", t.defined),
        ("started", t.started),
        ("ready", t.ready),
        ("queued", t.queued),
    ];
    let rest = [("bound", t.bound), ("online", t.online), ("completed", t.completed), ("gone", t.gone)];
    assert_in_order(&t, &[&boot[..], &rest[..]].concat());
    assert!(t.queued > t.started, "the VM was up before its job came: {t:#?}");
    let (gh, _, _) = h.shutdown().await;
    assert!(!gh.runner_names().contains(&warm), "runner deleted");
}

#[tokio::test(start_paused = true)]
async fn more_jobs_than_warm_vms_go_cold_and_every_job_is_served_once() {
    let mut h = harness_tweaked("warm = 1", |_| {}, |c| c.pools[0].max_vms = 3);
    h.wait("a warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    for id in [21, 22, 23] {
        h.deliver(JobAction::Queued, info(id, LABELS, None));
    }
    // Every VM gets its runner's credential over its bind port, the cold ones too.
    let s = h.wait("one warm hit, two cold", |_, hv| hv.running().len() == 3 && hv.lock().delivered.len() == 3).await;
    assert!(bound_to(&s, 21).is_some(), "the oldest job takes the warm VM: {s:#?}");
    assert_eq!(vm_for(&s, 22).as_deref(), Some("rv-small-22"));
    assert_eq!(vm_for(&s, 23).as_deref(), Some("rv-small-23"));
    let m = h.metrics.render();
    assert!(m.contains("path=\"cold\"} 2") && m.contains("path=\"warm\"} 1"), "{m}");
    h.shutdown().await;
}

/// libvirtd restarted during a delivery (the restart-libvirtd drill met it on a restored
/// VM): the guest took its runner command, whose runner took the job, but the exchange
/// failed before the acknowledgement came back. The VM is kept and its runner runs the job;
/// the job is served once, by it.
#[tokio::test(start_paused = true)]
async fn a_delivery_that_fails_after_its_runner_took_the_job_keeps_the_vm() {
    let mut h = harness("warm = 1");
    let s = h.wait("a warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    let vm = warm_vms(&s, "waiting").remove(0);
    deliver_stalled(&mut h, &vm, 31).await;
    h.deliver(JobAction::InProgress, info(31, LABELS, Some(&vm)));
    h.wait_advancing("its runner took the job", |s, _| s.vms.iter().any(|v| v.name == vm && v.state == "busy")).await;
    // The failure comes back while libvirt is away: the guest's port cannot tell either.
    {
        let mut hv = h.hv.lock();
        hv.unavailable = true;
        hv.release_stalled = true;
    }
    // Once the port was watched for 30 s.
    let s = failure_handled(&h, Duration::from_secs(60), true).await;
    h.hv.lock().unavailable = false;
    assert_kept(&h, &s, &vm, 31, "busy");
    assert!(!h.metrics.render().contains("path=\"cold\""), "no VM booted for the job");
    served_once_by(h, &vm, 31).await;
}

/// A cold VM whose binding is under way (its command delivered, the acknowledgement
/// pending) is surplus once another runner took its job: GitHub is asked about its runner
/// before its domain goes, and a runner that took another job meanwhile (one any runner
/// takes) keeps its VM. (The domain went first, killing that job: simulator seed 8897 of
/// 2,000 steps.)
#[tokio::test(start_paused = true)]
async fn a_binding_vm_whose_job_went_elsewhere_is_asked_about_before_it_goes() {
    let mut h = harness("idle_timeout = \"10s\"");
    let vm = "rv-small-41".to_string();
    deliver_stalled(&mut h, &vm, 41).await;
    // Its runner took another job; GitHub's runner list does not say so (it fails).
    h.gh.set_runner(&vm, true, true);
    h.gh.lock().fail_calls.insert("list", 1000);
    h.complete(41, Some("rv-elsewhere-1"), "success");
    let s = h.advance_for(Duration::from_secs(60)).await;
    assert!(h.hv.running().contains(&vm), "its runner's job runs on: {s:#?}");
    assert_eq!(h.hv.lock().suspends, 0, "a runner GitHub knows by id is never paused: {s:#?}");
    assert!(h.gh.lock().calls.iter().any(|c| c == "delete"), "GitHub asked: {:?} {s:#?}", h.gh.lock().calls);
    h.hv.lock().release_stalled = true;
    h.shutdown().await;
}

/// A warm VM (token mode) whose delivery hangs in libvirt goes once its job is cancelled.
/// GitHub has no runner of its name ("not yet": its guest registers it once its command
/// lands), so its domain is paused and GitHub asked again; it stays paused until the
/// destroy (which libvirt fails a while). The late delivery finds a guest that cannot take
/// it. (Running, its runner registered after the answer and took a re-run, killed by the
/// destroy: simulator seed 195363.)
#[tokio::test(start_paused = true)]
async fn a_vm_whose_runner_is_not_found_stays_paused_until_it_is_destroyed() {
    let mut h = harness("warm = 1\nregistration = \"token\"\naccept_token_exposure = true\nidle_timeout = \"10s\"");
    let s = h.wait("a warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    let vm = warm_vms(&s, "waiting").remove(0);
    {
        let mut hv = h.hv.lock();
        hv.stall_deliveries_before = 1;
        hv.fail_teardowns = 1000;
    }
    h.deliver(JobAction::Queued, info(45, LABELS, None));
    h.wait("binding", |s, _| s.vms.iter().any(|v| v.name == vm && v.state == "binding")).await;
    h.complete(45, None, "cancelled");
    let metrics = h.metrics.clone();
    let s = h
        .poll("its destroy failed", Duration::from_secs(300), true, |_, _| {
            !metrics.render().contains("runnervisor_teardown_failures_total 0")
        })
        .await;
    assert!(s.vms.iter().any(|v| v.name == vm && v.state == "tearing_down"), "{s:#?}");
    assert!(h.gh.lock().calls.iter().filter(|c| *c == "find").count() >= 2, "asked twice: {:?}", h.gh.lock().calls);
    assert!(h.hv.lock().frozen(&vm), "paused from the second question on: {s:#?}");
    h.hv.lock().release_stalled = true;
    h.poll("the late delivery refused", Duration::from_secs(60), true, |_, hv| hv.lock().refused_paused == 1).await;
    assert!(h.hv.lock().delivered.is_empty(), "no runner command reached the paused guest");
    h.hv.lock().fail_teardowns = 0;
    h.poll("gone", Duration::from_secs(600), true, |s, hv| {
        s.vms.iter().all(|v| v.name != vm) && !hv.lock().domains.contains_key(&vm)
    })
    .await;
    h.shutdown().await;
}

/// A warm VM's domain is made its job's before any credential is made: its metadata
/// says "warm, no job" until then, and a domain saying so, adopted without its record,
/// would be bound again (its guest, which a job with root may have left listening, given
/// the next job's credential). A warm VM whose metadata cannot be changed takes no job:
/// it goes, no credential made, and its job boots a VM of its own.
#[tokio::test(start_paused = true)]
async fn a_warm_vm_whose_domain_cannot_be_marked_as_its_jobs_takes_no_credential() {
    let mut h = harness("warm = 1");
    let s = h.wait("a warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    let vm = warm_vms(&s, "waiting").remove(0);
    h.hv.lock().fail_describes = 1;
    h.deliver(JobAction::Queued, info(46, LABELS, None));
    let s = h
        .wait("job 46 on a VM of its own", |s, hv| {
            !hv.lock().domains.contains_key(&vm)
                && s.vms.iter().any(|v| v.name != vm && v.job_id == 46 && v.state == "booting")
        })
        .await;
    assert!(
        h.metrics.render().contains("runnervisor_bind_failures_total{pool=\"small\",step=\"describe\"} 1"),
        "{s:#?}"
    );
    assert_eq!(
        h.gh.lock().calls.iter().filter(|c| c.starts_with("jit")).count(),
        1,
        "one credential, the cold VM's: {:?}",
        h.gh.lock().calls
    );
    // The next warm VM is bound as ever: its domain marked before the delivery.
    h.wait("a warm VM waiting again", |s, _| warm_vms(s, "waiting").len() == 1).await;
    h.deliver(JobAction::Queued, info(47, LABELS, None));
    h.wait("job 47 bound", |s, _| s.vms.iter().any(|v| v.job_id == 47 && v.state == "booting")).await;
    {
        let hv = h.hv.lock();
        assert!(hv.delivered.iter().all(|(d, _)| *d != vm), "{:?}", hv.delivered);
        assert_eq!(
            (hv.delivered.len(), hv.delivered_unmarked),
            (2, 0),
            "every delivery into a domain marked its job's"
        );
    }
    h.shutdown().await;
}

/// A binding that failed without knowing whether the guest took its command (the
/// delivery's acknowledgement lost, then the check of the guest's port panicked) destroys
/// its VM only once GitHub says its runner is not busy: a runner that took the job keeps
/// its VM. (Destroyed at once, it killed the job: simulator seed 111830 of 665 steps.)
#[tokio::test(start_paused = true)]
async fn a_binding_unsure_whether_its_guest_took_the_command_keeps_a_vm_whose_runner_is_busy() {
    // Its failure is the job's last attempt: the job is not given up while GitHub is asked,
    // and the attempt is given back once its runner turns out busy.
    // Its runner took the job at once; the job's in-progress webhook is late, and GitHub's
    // runner list does not say so (it fails): only the teardown's question can tell.
    let (mut h, vm) = binding_fails_unsure(43, true, ("list", 1000)).await;
    let s = h.advance_for(Duration::from_secs(120)).await;
    assert!(h.metrics.render().contains("runnervisor_bind_failures_total{"), "the binding failed: {s:#?}");
    assert!(h.hv.running().contains(&vm), "its runner's job runs on: {s:#?}");
    assert!(s.vms.iter().any(|v| v.name == vm && v.state == "busy"), "kept, busy: {s:#?}");
    assert!(s.queued.iter().any(|q| q.job_id == 43), "still queued (its webhook is late), not given up: {s:#?}");
    assert_eq!(h.store.load().unwrap().jobs[&43].failed_vms, 0, "the attempt given back");
    assert!(!h.metrics.render().contains("runnervisor_jobs_failed_total{"), "{}", h.metrics.render());
    h.run_job_on(&vm, 43);
    h.wait("served by it", |s, hv| s.queued.is_empty() && !hv.lock().domains.contains_key(&vm)).await;
    assert!(!h.metrics.render().contains("runnervisor_jobs_failed_total{"), "{}", h.metrics.render());
    h.shutdown().await;
}

/// The other side: a binding unsure whether its guest took the command, whose runner
/// GitHub says is not busy, was the job's last attempt. No VM is made for the job while
/// GitHub is asked (it fails twice), and the job is given up once its VM is gone.
#[tokio::test(start_paused = true)]
async fn a_binding_unsure_whether_its_guest_took_the_command_is_the_last_attempt_once_its_runner_is_idle() {
    let (h, vm) = binding_fails_unsure(44, false, ("delete", 2)).await;
    let s = h.advance_for(Duration::from_secs(120)).await;
    assert!(s.vms.is_empty() && !h.hv.running().contains(&vm), "its vm is gone: {s:#?}");
    assert!(s.queued.is_empty(), "given up: {s:#?}");
    let m = h.metrics.render();
    assert!(m.contains("runnervisor_jobs_failed_total{pool=\"small\"} 1"), "{m}");
    assert!(m.contains("runnervisor_vms_started_total{pool=\"small\"} 1"), "no second vm for the job: {m}");
    assert_eq!(h.gh.lock().calls.iter().filter(|c| *c == "delete").count(), 3, "asked three times");
    h.shutdown().await;
}

/// As above, but libvirt fails the destroy once GitHub said the runner is not busy: the
/// job is given up then, not once libvirt lets the VM go (it would wait, with no VM).
#[tokio::test(start_paused = true)]
async fn a_last_attempt_stands_once_github_says_its_runner_is_idle_whatever_libvirt_does() {
    let (h, vm) = binding_fails_unsure(46, false, ("delete", 1)).await;
    h.wait_advancing("GitHub asked once", |_, _| h.gh.lock().calls.iter().any(|c| c == "delete")).await;
    h.hv.lock().unavailable = true;
    // (Its retry is due 10 s on; the one after, 20 s after that.)
    let s = h.advance_for(Duration::from_secs(20)).await;
    assert_eq!(h.gh.lock().calls.iter().filter(|c| *c == "delete").count(), 2, "asked again: {s:#?}");
    assert!(s.queued.is_empty(), "given up: {s:#?}");
    assert!(h.metrics.render().contains("runnervisor_jobs_failed_total{pool=\"small\"} 1"), "{}", h.metrics.render());
    assert!(s.vms.iter().any(|v| v.name == vm), "its teardown is still to finish: {s:#?}");
    h.hv.lock().unavailable = false;
    h.wait_for("its vm gone", Duration::from_secs(600), |s, hv| s.vms.is_empty() && !hv.running().contains(&vm)).await;
    let m = h.metrics.render();
    assert!(m.contains("runnervisor_vms_started_total{pool=\"small\"} 1"), "no second vm for the job: {m}");
    // (Its retry destroys first, then deletes the runner once more: not found.)
    assert_eq!(h.gh.lock().calls.iter().filter(|c| *c == "delete").count(), 3);
    h.shutdown().await;
}

/// Job `job`'s cold VM (`max_attempts` 1) has its runner online, `busy` or not, and its
/// binding is about to fail unsure whether the guest took the command (the delivery's
/// acknowledgement lost, then the check of the guest's port panics); GitHub fails
/// `failing` (a call, how many times).
async fn binding_fails_unsure(job: u64, busy: bool, failing: (&'static str, u32)) -> (H, String) {
    let mut h = harness("max_attempts = 1");
    let vm = format!("rv-small-{job}");
    deliver_stalled(&mut h, &vm, job).await;
    h.gh.set_runner(&vm, true, busy);
    h.gh.lock().fail_calls.insert(failing.0, failing.1);
    let mut hv = h.hv.lock();
    hv.panics.insert("guest_waiting", 1);
    hv.release_stalled = true;
    drop(hv);
    (h, vm)
}

/// Queues `job` for `vm` (a warm VM waiting, or its own cold VM) and waits until its runner
/// command is delivered; the delivery's acknowledgement stays pending (the guest took it).
async fn deliver_stalled(h: &mut H, vm: &str, job: u64) {
    {
        let mut hv = h.hv.lock();
        hv.stall_deliveries = 1;
        hv.acks_lost.insert(vm.to_string());
    }
    h.deliver(JobAction::Queued, info(job, LABELS, None));
    h.wait_advancing("the command delivered, its acknowledgement pending", |_, hv| hv.lock().delivered.len() == 1)
        .await;
}

/// Waits until a failed delivery was handled: counted as the warm VM's runner (kept), or
/// as a failed bind.
async fn failure_handled(h: &H, limit: Duration, advance: bool) -> Status {
    let metrics = h.metrics.clone();
    h.poll("the delivery's failure handled", limit, advance, |_, _| {
        let m = metrics.render();
        m.contains("path=\"warm\"") || m.contains("runnervisor_bind_failures_total{")
    })
    .await
}

/// The warm VM `vm` is kept, bound to `job`, in `state`, and counted as a warm runner.
fn assert_kept(h: &H, s: &Status, vm: &str, job: u64, state: &str) {
    assert!(s.vms.iter().any(|v| v.name == vm && v.state == state), "the vm is kept, {state}: {s:#?}");
    assert_eq!(bound_to(s, job).as_deref(), Some(vm), "{s:#?}");
    let m = h.metrics.render();
    assert!(!m.contains("runnervisor_bind_failures_total{") && !m.contains("bind_failed"), "{m}");
    assert!(m.contains("runnervisor_job_runners_total{pool=\"small\",path=\"warm\"} 1"), "{m}");
}

/// `vm`'s runner runs `job` and goes; it was the only VM the job's command reached.
async fn served_once_by(mut h: H, vm: &str, job: u64) {
    h.run_job_on(vm, job);
    h.wait("served by it; it is gone", |s, hv| s.queued.is_empty() && !hv.lock().domains.contains_key(vm)).await;
    let (_, hv, _) = h.shutdown().await;
    assert_eq!(hv.lock().delivered.len(), 1, "one command, into the VM that ran the job");
}

/// libvirtd restarts during a delivery, before the job's in-progress webhook: the guest took
/// its command, only its acknowledgement was lost. Its closed port says so.
#[tokio::test(start_paused = true)]
async fn a_delivery_whose_acknowledgement_is_lost_stands_when_the_guest_took_its_command() {
    let mut h = harness("warm = 1");
    let s = h.wait("a warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    let vm = warm_vms(&s, "waiting").remove(0);
    h.hv.lock().acks_lost.insert(vm.clone());
    h.deliver(JobAction::Queued, info(32, LABELS, None));
    let s = failure_handled(&h, Duration::from_secs(10), false).await;
    // Bound, its runner starting.
    assert_kept(&h, &s, &vm, 32, "booting");
    served_once_by(h, &vm, 32).await;
}

#[tokio::test(start_paused = true)]
async fn a_warm_vm_that_ignores_its_delivery_is_destroyed_and_the_job_goes_cold() {
    let mut h = harness("warm = 1");
    let s = h.wait("a warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    let deaf = warm_vms(&s, "waiting").remove(0);
    h.hv.lock().guests_deaf.insert(deaf.clone());
    h.deliver(JobAction::Queued, info(31, LABELS, None));
    let s = h
        .wait("the job boots its own VM", |s, hv| {
            vm_for(s, 31).as_deref() == Some("rv-small-31") && !hv.lock().domains.contains_key(&deaf)
        })
        .await;
    assert!(s.vms.iter().all(|v| v.name != deaf), "{s:#?}");
    assert!(h.gh.lock().deleted.contains(&deaf), "the JIT registration made for it is deleted");
    let m = h.metrics.render();
    assert!(m.contains("runnervisor_bind_failures_total{pool=\"small\",step=\"delivery\"} 1"), "{m}");
    assert!(m.contains("runnervisor_teardowns_total{reason=\"bind_failed\"} 1"), "{m}");
    h.run_job_on("rv-small-31", 31);
    h.wait("served; a fresh warm VM waits", |s, _| s.queued.is_empty() && warm_vms(s, "waiting").len() == 1).await;
    let (_, hv, _) = h.shutdown().await;
    let delivered: Vec<String> = hv.lock().delivered.iter().map(|(v, _)| v.clone()).collect();
    assert_eq!(delivered, ["rv-small-31"], "nothing was delivered into the deaf VM, its job's own VM got its");
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_job_leaves_a_warm_vm_untouched_and_a_dead_one_is_replaced() {
    let mut h = harness_full("warm = 1", |_| {}, |_| {}, |hv| hv.guests_booting = true, None);
    let s = h.wait("a warm VM booting", |s, _| warm_vms(s, "warming").len() == 1).await;
    let warm = warm_vms(&s, "warming").remove(0);
    h.deliver(JobAction::Queued, info(41, LABELS, None));
    h.complete(41, None, "cancelled");
    h.wait("the job is gone", |s, _| s.queued.is_empty()).await;
    h.hv.lock().guests_booting = false;
    let s = h.wait("the warm VM waits", |s, _| warm_vms(s, "waiting") == [warm.clone()]).await;
    assert_eq!(s.vms.len(), 1, "no VM for the cancelled job: {s:#?}");
    assert!(h.hv.lock().delivered.is_empty() && h.gh.runner_names().is_empty());
    // It dies while waiting: it goes, and a new one takes its place.
    h.hv.stop(&warm);
    let s = h.wait("replaced", |s, _| warm_vms(s, "waiting").len() == 1 && s.vms.iter().all(|v| v.name != warm)).await;
    assert_eq!(s.vms.len(), 1);
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn warm_vms_are_recycled_at_warm_max_age() {
    let h = harness("warm = 1\nwarm_max_age = \"1m\"");
    let s = h.wait("a warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    let first = warm_vms(&s, "waiting").remove(0);
    let s = h
        .wait_for("recycled", Duration::from_secs(90), |s, _| {
            warm_vms(s, "waiting").len() == 1 && s.vms.iter().all(|v| v.name != first)
        })
        .await;
    assert_eq!(s.vms.len(), 1);
    assert!(h.metrics.render().contains("runnervisor_teardowns_total{reason=\"warm_recycled\"} 1"));
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn drain_removes_waiting_warm_vms_and_a_restart_readopts_them() {
    let h = harness("warm = 1");
    let s = h.wait("a warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    let warm = warm_vms(&s, "waiting").remove(0);
    // Restart: the warm VM is found again and used.
    let (gh, hv, store) = h.shutdown().await;
    let mut h = restart("warm = 1", gh, hv.clone(), Some(store));
    h.wait("re-adopted", |s, _| warm_vms(s, "waiting") == [warm.clone()]).await;
    h.deliver(JobAction::Queued, info(51, LABELS, None));
    let s = h.wait("bound", |s, _| bound_to(s, 51).is_some()).await;
    assert_eq!(bound_to(&s, 51), Some(warm.clone()), "the re-adopted VM serves: {s:#?}");
    assert_eq!(hv.lock().started_total, 2, "no VM but the top-up was made after the restart");
    // Drain: the unbound warm VM goes, the bound one keeps its job, nothing is topped up.
    assert!(matches!(h.admin(AdminCommand::Drain(true)).await, AdminReply::Ok(_)));
    let s = h.wait("only the bound VM", |s, hv| s.vms.len() == 1 && hv.running().len() == 1).await;
    assert_eq!(s.vms[0].name, warm);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.status().await.vms.len(), 1, "no warm VM made while draining");
    assert!(h.metrics.render().contains("runnervisor_teardowns_total{reason=\"warm_surplus\"} 1"));
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn token_mode_delivers_config_with_the_token_in_its_environment_then_run() {
    let mut h = harness("warm = 1\nregistration = \"token\"\naccept_token_exposure = true");
    h.wait("a warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    h.deliver(JobAction::Queued, info(61, LABELS, None));
    let s = h.wait("bound", |s, hv| bound_to(s, 61).is_some() && !hv.lock().delivered.is_empty()).await;
    let warm = bound_to(&s, 61).unwrap();
    let msg = h.hv.lock().delivered[0].1.clone();
    let v: serde_json::Value = serde_json::from_str(&msg).unwrap();
    let cmds = v["runcmd"].as_array().unwrap();
    assert_eq!(cmds.len(), 2, "config.sh, then run.sh: {msg}");
    assert!(cmds[0]["argv"].as_array().unwrap().iter().any(|a| a == "--ephemeral"), "{msg}");
    assert_eq!(cmds[0]["env"]["ACTIONS_RUNNER_INPUT_TOKEN"], "REGTOKEN", "{msg}");
    assert!(cmds[1]["argv"].as_array().unwrap().iter().any(|a| a.as_str().is_some_and(|a| a.ends_with("/run.sh"))));
    assert!(cmds[1].get("env").is_none(), "the runner does not get the token: {msg}");
    h.deliver(JobAction::InProgress, info(61, LABELS, Some(&warm)));
    h.wait("busy", |s, _| s.vms.iter().any(|v| v.name == warm && v.state == "busy")).await;
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_warm_vm_found_without_a_record_is_adopted_as_warm_by_its_metadata() {
    let h = harness("warm = 1");
    let s = h.wait("a warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    let warm = warm_vms(&s, "waiting").remove(0);
    let (gh, hv, _) = h.shutdown().await;
    // The store is lost: only the domain and its metadata remain.
    let mut h = restart("warm = 1", gh, hv, None);
    let s = h.wait("adopted as a waiting warm VM", |s, _| warm_vms(s, "waiting") == [warm.clone()]).await;
    assert_eq!(s.vms.len(), 1, "adopted, not replaced: {s:#?}");
    h.deliver(JobAction::Queued, info(71, LABELS, None));
    h.wait("and used", |s, _| bound_to(s, 71) == Some(warm.clone())).await;
    h.shutdown().await;
}

/// A restart cuts a binding short: the guest's port says whether it took its command.
#[tokio::test(start_paused = true)]
async fn a_binding_cut_short_by_a_restart_stands_if_the_guest_took_its_command() {
    for took_it in [false, true] {
        let h = harness("warm = 1");
        let s = h.wait("a warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
        let warm = warm_vms(&s, "waiting").remove(0);
        let (gh, hv, store) = h.shutdown().await;
        // The record says Binding for job 81, as a crash mid-binding leaves it.
        let mut vm = store.load().unwrap().vms[&warm].clone();
        vm.state = VmState::Binding;
        vm.job_id = 81;
        let job =
            JobRec { info: info(81, LABELS, None), ..fixtures::job(81, "small", "octo-org/app", JobState::Queued, 0) };
        store.commit(&Batch { jobs: vec![job], vms: vec![vm], ..Default::default() }).unwrap();
        gh.set_job_queued(81);
        // The guest closed its port once it took the command; otherwise it still waits.
        hv.lock().guests_booting = took_it;
        let h = restart("warm = 1", gh, hv, Some(store));
        if took_it {
            let s =
                h.wait("the binding stands", |s, _| s.vms.iter().any(|v| v.name == warm && v.state == "booting")).await;
            assert_eq!(bound_to(&s, 81), Some(warm.clone()));
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(h.status().await.vms.iter().any(|v| v.name == warm), "not torn down");
        } else {
            h.hv.lock().guests_booting = false;
            let s = h
                .wait("replaced, and the job bound again", |s, _| {
                    s.vms.iter().all(|v| v.name != warm) && bound_to(s, 81).is_some()
                })
                .await;
            assert_ne!(bound_to(&s, 81), Some(warm.clone()));
            assert!(h.metrics.render().contains("runnervisor_teardowns_total{reason=\"interrupted\"} 1"));
        }
        h.shutdown().await;
    }
}

/// Pool `small` with a warm VM, and pool `big` (labels `self-hosted, linux, big`, no warm
/// VM, `big_max_vms`) on a host of `host_max_vms`.
fn small_warm_beside_big(host_max_vms: usize, big_max_vms: usize) -> H {
    harness_tweaked(
        "warm = 1",
        |_| {},
        |c| {
            c.capacity.max_vms = Some(host_max_vms);
            let mut other = c.pools[0].clone();
            other.name = "big".into();
            other.labels = vec!["self-hosted".into(), "linux".into(), "big".into()];
            other.warm = 0;
            other.max_vms = big_max_vms;
            c.pools.push(other);
        },
    )
}

/// The host's room goes to jobs before spares: with `capacity.max_vms = 1`, a warm VM of
/// one pool gives its place to a job of another pool (the simulator found that job waiting
/// for good, seed 9 of 1,000 steps, before this).
#[tokio::test(start_paused = true)]
async fn a_warm_vm_gives_the_hosts_last_place_to_another_pools_job() {
    let mut h = small_warm_beside_big(1, 2);
    let s = h.wait("small's warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    let warm = warm_vms(&s, "waiting").remove(0);
    h.deliver(JobAction::Queued, info(21, &["self-hosted", "linux", "big"], None));
    let s =
        h.wait("big's job has the host's place", |s, _| s.vms.iter().any(|v| v.pool == "big" && v.job_id == 21)).await;
    assert!(s.vms.iter().all(|v| v.name != warm), "the warm VM gave its place: {s:#?}");
    assert!(s.vms.len() <= 1, "{s:#?}");
    // Once big's job is done, small keeps its warm VM again.
    let vm = vm_for(&s, 21).unwrap();
    h.run_job_on(&vm, 21);
    h.wait("small warm again", |s, _| warm_vms(s, "waiting").len() == 1 && s.vms.len() == 1).await;
}

/// ... but not to a job its pool cannot start (the pool is at its own `max_vms`): such a job
/// is no reason to give the place up. Before, the warm VM was reaped as surplus, made again
/// once the place was free, reaped again when it waited, every few seconds (a profile of the
/// simulator found 4,293 warm VMs made and reaped in one seed).
#[tokio::test(start_paused = true)]
async fn a_warm_vm_keeps_its_place_from_a_job_its_pool_cannot_start() {
    let mut h = small_warm_beside_big(2, 1);
    h.wait("small's warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    let big = ["self-hosted", "linux", "big"];
    h.deliver(JobAction::Queued, info(21, &big, None));
    h.wait("big's job has a VM", |s, _| vm_for(s, 21).is_some()).await;
    // Big is at its max_vms: its second job waits, whatever the host's room.
    h.deliver(JobAction::Queued, info(22, &big, None));
    let s = h.wait("small's warm VM waiting beside it", |s, _| warm_vms(s, "waiting").len() == 1).await;
    let warm = warm_vms(&s, "waiting").remove(0);
    let s = h.advance_for(Duration::from_secs(60)).await;
    assert_eq!(warm_vms(&s, "waiting"), [warm], "{s:#?}");
    assert!(!h.metrics.render().contains("reason=\"warm_surplus\""), "{}", h.metrics.render());
    h.shutdown().await;
}

/// Nor to a job whose runner is on its way (its pool below its `max_vms`): once big's VM
/// is made for its job, small keeps its warm VM beside it.
#[tokio::test(start_paused = true)]
async fn a_warm_vm_keeps_its_place_from_a_job_whose_runner_is_coming() {
    let mut h = small_warm_beside_big(2, 2);
    h.wait("small's warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    // Big's VM will boot for long (its runner not online yet): its job stays queued.
    h.hv.lock().guests_booting = true;
    h.deliver(JobAction::Queued, info(21, &["self-hosted", "linux", "big"], None));
    h.wait("big's job has a VM", |s, _| vm_for(s, 21).is_some()).await;
    let s = h.advance_for(Duration::from_secs(30)).await;
    assert_eq!(warm_vms(&s, "waiting").len(), 1, "{s:#?}");
    assert!(!h.metrics.render().contains("reason=\"warm_surplus\""), "{}", h.metrics.render());
    h.shutdown().await;
}

/// A warm VM bound to its pool's job is not replaced while another pool's job needs the
/// host's last place: both jobs arrive together, each gets a runner, and no warm VM is
/// made in that place (to be reaped as surplus when it waited).
#[tokio::test(start_paused = true)]
async fn a_bound_warm_vm_is_not_replaced_in_the_place_another_pools_job_needs() {
    let mut h = small_warm_beside_big(2, 2);
    h.wait("small's warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    h.deliver(JobAction::Queued, info(31, LABELS, None));
    h.deliver(JobAction::Queued, info(41, &["self-hosted", "linux", "big"], None));
    h.wait("both jobs have runners", |s, _| vm_for(s, 41).is_some() && s.vms.iter().any(|v| v.job_id == 31)).await;
    let s = h.advance_for(Duration::from_secs(30)).await;
    assert!(s.vms.len() <= 2, "{s:#?}");
    assert!(!h.metrics.render().contains("reason=\"warm_surplus\""), "{}", h.metrics.render());
    h.shutdown().await;
}

/// A job bound to a warm VM whose runner GitHub lists busy with a job nothing named gets
/// no other VM for `TAKEN_UNHEARD`; then it is bound to the next warm VM, and the agent
/// says why, naming the busy one.
#[tokio::test(start_paused = true)]
async fn a_warm_runner_busy_with_a_job_nothing_named_keeps_its_job_a_while_then_says_why() {
    let (logs, _caught) = LogBuf::catch();
    let mut h = harness("warm = 1");
    h.wait("a warm VM waiting", |s, _| warm_vms(s, "waiting").len() == 1).await;
    h.deliver(JobAction::Queued, info(44, LABELS, None));
    let s = h.wait("bound", |s, _| bound_to(s, 44).is_some()).await;
    let first = bound_to(&s, 44).unwrap();
    h.gh.set_runner(&first, true, true);
    h.wait("the runner listed busy", |s, _| s.vms.iter().any(|v| v.name == first && v.state == "busy")).await;
    let s = h.advance_for(TAKEN_UNHEARD - Duration::from_secs(10)).await;
    assert!(s.vms.iter().filter(|v| v.job_id == 44).count() == 1, "no second VM meanwhile: {s:#?}");
    assert!(logs.saying(HELD_RAN_OUT).is_empty(), "{:?}", logs.saying(HELD_RAN_OUT));
    let s = h
        .wait_for("another warm VM bound to it", Duration::from_secs(30), |s, _| {
            s.vms.iter().any(|v| v.job_id == 44 && v.name != first)
        })
        .await;
    assert!(s.vms.iter().all(|v| v.warm), "a warm VM, not a cold one: {s:#?}");
    let said = logs.saying(HELD_RAN_OUT);
    let named = format!("vm={first}");
    assert!(matches!(&said[..], [l] if l.split(' ').any(|f| f == named)), "once, naming the busy VM: {said:?}");
    h.shutdown().await;
}

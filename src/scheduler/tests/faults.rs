//! Failures of GitHub and of the host: back-off, retries, outages, a full disk, a missing
//! pool or network.

use super::*;

/// GitHub failing to make a credential is not the VM's fault: the VM keeps waiting, the
/// pool backs off, and the same VM is bound once GitHub answers.
#[tokio::test(start_paused = true)]
async fn api_failures_back_off_and_the_job_is_still_served() {
    let mut h = harness("");
    h.gh.lock().fail_calls.insert("jit", 2);
    h.deliver(JobAction::Queued, info(51, LABELS, None));
    h.wait_for("bound despite API errors", Duration::from_secs(20), |_, hv| hv.lock().delivered.len() == 1).await;
    let s = h.status().await;
    assert_eq!(h.hv.running(), ["rv-small-51"], "the same VM waited: {s:#?}");
    assert_eq!(h.hv.lock().started_total, 1);
    assert_eq!(s.queued.len(), 1, "the job was never dropped");
    let m = h.metrics.render();
    assert!(m.contains(r#"runnervisor_bind_failures_total{pool="small",step="credential"} 2"#), "{m}");
    assert!(!m.contains("runnervisor_teardowns_total{"), "nothing torn down: {m}");
    // The pool backed off between the attempts: 2 s after the first failure, 4 s after
    // the second (lower bounds: a slow machine only adds to them).
    let (calls, jit): (Vec<String>, Vec<Instant>) = {
        let gh = h.gh.lock();
        let jit = gh.calls.iter().zip(&gh.call_times).filter(|(c, _)| *c == "jit").map(|(_, t)| *t).collect();
        (gh.calls.clone(), jit)
    };
    assert_eq!(jit.len(), 3, "{calls:?}");
    assert!(jit[1] - jit[0] >= Duration::from_secs(2), "first back-off: {:?}", jit[1] - jit[0]);
    assert!(jit[2] - jit[1] >= Duration::from_secs(4), "doubled: {:?}", jit[2] - jit[1]);
    h.run_job_on("rv-small-51", 51);
    h.wait("served", |s, _| s.queued.is_empty() && s.vms.is_empty()).await;
    h.shutdown().await;
}

/// libvirt refusing to mark a cold VM's domain as its job's (done before any credential)
/// is the host's failure, not the VM's: no credential is made, the VM keeps waiting, the
/// pool backs off, and the same VM is bound (the job is charged nothing).
#[tokio::test(start_paused = true)]
async fn a_cold_vm_whose_domain_cannot_be_marked_yet_waits_and_is_bound_again() {
    let mut h = harness("");
    h.hv.lock().fail_describes = 1;
    h.deliver(JobAction::Queued, info(53, LABELS, None));
    h.wait_for("bound after the refusal", Duration::from_secs(20), |_, hv| hv.lock().delivered.len() == 1).await;
    let s = h.status().await;
    assert_eq!(
        (h.hv.running(), h.hv.lock().started_total),
        (vec!["rv-small-53".to_string()], 1),
        "the same VM waited: {s:#?}"
    );
    assert_eq!(h.hv.lock().delivered_unmarked, 0);
    assert_eq!(
        h.gh.lock().calls.iter().filter(|c| *c == "jit").count(),
        1,
        "no credential made before the domain was marked"
    );
    let m = h.metrics.render();
    assert!(m.contains(r#"runnervisor_bind_failures_total{pool="small",step="describe"} 1"#), "{m}");
    assert!(!m.contains("runnervisor_teardowns_total{"), "nothing torn down: {m}");
    assert_eq!(h.store.load().unwrap().jobs[&53].failed_vms, 0, "not charged to the job");
    h.shutdown().await;
}

/// An agent with nothing new plans its pools only every `IDLE_PLAN`, but a back-off that
/// runs out at once: the waiting VM is bound as it ends, not up to `IDLE_PLAN` later (no
/// sweep or sync comes in between to plan).
#[tokio::test(start_paused = true)]
async fn a_back_off_that_runs_out_is_acted_on_at_once_by_an_idle_agent() {
    let mut h = harness_tweaked(
        "",
        |_| {},
        |c| {
            c.reconcile.sweep_interval = Duration::from_secs(600);
            c.reconcile.github_interval = Duration::from_secs(600);
        },
    );
    h.gh.lock().fail_calls.insert("jit", 1);
    h.deliver(JobAction::Queued, info(52, LABELS, None));
    h.wait_for("bound after the API error", Duration::from_secs(20), |_, hv| hv.lock().delivered.len() == 1).await;
    let jit: Vec<Instant> = {
        let gh = h.gh.lock();
        gh.calls.iter().zip(&gh.call_times).filter(|(c, _)| *c == "jit").map(|(_, t)| *t).collect()
    };
    assert_eq!(jit.len(), 2, "{jit:?}");
    // 2 s of back-off, then the next housekeeping tick (1 s).
    let gap = jit[1] - jit[0];
    assert!(gap >= Duration::from_secs(2) && gap < Duration::from_secs(4), "bound again after {gap:?}");
    h.shutdown().await;
}

/// A cold VM whose guest never takes its runner command (an image without the guest unit,
/// or a broken one) costs its job an attempt, like a VM that dies: replaced, then given up.
#[tokio::test(start_paused = true)]
async fn a_cold_vm_that_ignores_its_runner_command_is_replaced_then_the_job_given_up() {
    let mut h = harness("max_attempts = 2");
    h.hv.lock().guests_deaf.extend(["rv-small-66".to_string(), "rv-small-66-2".to_string()]);
    h.deliver(JobAction::Queued, info(66, LABELS, None));
    // Each failed delivery watches the guest's port for 5 s before it counts as failed.
    h.wait_for("given up", Duration::from_secs(30), |s, hv| {
        s.queued.is_empty() && s.vms.is_empty() && hv.lock().domains.is_empty()
    })
    .await;
    let m = h.metrics.render();
    assert!(m.contains(r#"runnervisor_bind_failures_total{pool="small",step="delivery"} 2"#), "{m}");
    assert!(m.contains(r#"runnervisor_jobs_failed_total{pool="small"} 1"#), "{m}");
    let (gh, hv, _) = h.shutdown().await;
    assert_eq!(hv.lock().started_total, 2, "no third VM");
    assert!(gh.runner_names().is_empty(), "the JIT runners made for them are deleted: {:?}", gh.runner_names());
}

#[tokio::test(start_paused = true)]
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

/// A workflow or job name is anyone's text: one with a newline still gets its VM (libvirt
/// refuses a newline in a domain's title), and a definition libvirt keeps refusing is
/// charged to the job, which is given up after `max_attempts` instead of retried for ever.
#[tokio::test(start_paused = true)]
async fn job_names_cannot_break_the_definition_and_refusals_are_charged_to_the_job() {
    let mut h = harness("max_attempts = 2");
    let mut job = info(62, LABELS, None);
    job.workflow_name = "CI\nInjected: yes".into();
    job.name = "build\u{0}".into();
    h.deliver(JobAction::Queued, job);
    h.wait("a VM despite the newline", |_, hv| hv.running() == ["rv-small-62"]).await;
    let title = {
        let hv = h.hv.lock();
        let xml = &hv.domains["rv-small-62"].1;
        let doc = roxmltree::Document::parse(xml).unwrap();
        doc.descendants().find(|n| n.has_tag_name("title")).and_then(|n| n.text()).unwrap().to_string()
    };
    assert_eq!(title, "octo-org/app · CI Injected: yes · job 62");
    h.run_job_on("rv-small-62", 62);
    h.wait("served", |s, _| s.queued.is_empty() && s.vms.is_empty()).await;

    h.hv.lock().fail_defines = 100;
    h.deliver(JobAction::Queued, info(63, LABELS, None));
    h.wait("given up", |s, hv| s.queued.is_empty() && s.vms.is_empty() && hv.lock().volumes.is_empty()).await;
    // Backed off and never tried again (the pool's back-off is seconds).
    tokio::time::sleep(Duration::from_secs(120)).await;
    let m = h.metrics.render();
    assert!(m.contains(r#"runnervisor_provision_failures_total{pool="small",step="define"} 2"#), "{m}");
    assert!(m.contains(r#"runnervisor_jobs_failed_total{pool="small"} 1"#), "{m}");
    assert_eq!(h.hv.lock().fail_defines, 98, "two definitions, then the job was given up");
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
async fn an_image_declaring_an_old_runner_is_reported() {
    let h = harness_with("runner_max_age = \"10d\"", |img| {
        let manifest = crate::images::manifest_path(img);
        std::fs::write(manifest, r#"{"runner_version": "2.300.0", "runner_released": "2020-01-01"}"#).unwrap();
    });
    h.wait("the warning", |_, _| h.metrics.image_runner_outdated.get_or_create(&metrics::pool("small")).get() == 1)
        .await;
    h.shutdown().await;
    let fresh = harness_with("", |img| std::fs::remove_file(crate::images::manifest_path(img)).unwrap());
    fresh.wait("a sweep", |s, _| s.libvirt_connected).await;
    assert_eq!(
        fresh.metrics.image_runner_outdated.get_or_create(&metrics::pool("small")).get(),
        0,
        "no manifest, no warning"
    );
    fresh.shutdown().await;
}

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
async fn a_missing_network_holds_jobs_and_never_falls_back_to_an_open_one() {
    let mut h = harness("");
    h.hv.lock().network_missing = true;
    let held = h.job_held_until(101, Duration::from_millis(2500), |h| h.hv.lock().network_missing = false).await;
    assert!(held.vms.is_empty());
    h.wait("its credential delivered", |_, hv| hv.lock().delivered.len() == 1).await;
    // No credential was made while the fence was down: the first JIT config came after.
    let (gh, hv, _) = h.shutdown().await;
    let calls = gh.lock().calls.clone();
    assert_eq!(calls.iter().filter(|c| c.starts_with("jit")).count(), 1, "{calls:?}");
    let hv = hv.lock();
    let (_, xml) = hv.domains.values().next().unwrap();
    assert!(xml.contains("<filterref filter=\"runnervisor-fence-fixed\">"), "{xml}");
}

/// A runner group GitHub will not name (a rate limit answers at once) is asked for again
/// after a doubling wait, not in a tight loop: a waiting warm VM planned for a job kept
/// asking on every pass of the scheduler (the simulator found it, seed 64 of 1,000 steps,
/// spinning with no time passing).
#[tokio::test(start_paused = true)]
async fn an_unresolved_runner_group_is_asked_for_again_after_a_wait_not_in_a_loop() {
    let mut h = harness("warm = 1");
    h.wait("a warm VM waiting", |s, _| s.vms.iter().any(|v| v.warm && v.state == "waiting")).await;
    h.gh.lock().fail_calls.insert("group", 1000);
    // The group was resolved to make nothing yet (a warm VM needs none): forget it.
    h.deliver(JobAction::Queued, info(61, LABELS, None));
    h.advance_for(Duration::from_secs(30)).await;
    let asked = h.gh.lock().calls.iter().filter(|c| *c == "group").count();
    // 5 s, 10 s, 20 s apart: at most four calls in 30 s.
    assert!((1..=4).contains(&asked), "runner group asked {asked} times in 30 s");
    h.gh.lock().fail_calls.clear();
    h.wait_for("served once GitHub answers", Duration::from_secs(120), |_, hv| hv.lock().delivered.len() == 1).await;
}

/// A VM past `registration_timeout` whose runner took its job unseen (its in-progress
/// webhook lost, the agent down meanwhile) keeps running: GitHub is asked about the runner
/// before the domain goes, and asked again while it does not answer (the simulator found
/// such jobs killed, seeds 385 and 400 of 1,000 steps).
#[tokio::test(start_paused = true)]
async fn a_vm_past_its_registration_timeout_whose_runner_took_its_job_unseen_keeps_running() {
    let mut h = harness("registration_timeout = \"60s\"");
    h.deliver(JobAction::Queued, info(71, LABELS, None));
    h.wait("bound", |_, hv| hv.lock().delivered.len() == 1).await;
    // Its runner took the job; no webhook says so, GitHub's runner list fails, and GitHub
    // fails twice when asked about the runner.
    h.gh.set_runner("rv-small-71", true, true);
    h.gh.lock().fail_calls.insert("list", 1000);
    h.gh.lock().fail_calls.insert("delete", 2);
    let s = h.advance_for(Duration::from_secs(150)).await;
    // (Which job its runner took is not known: the job may get another VM meanwhile.)
    assert!(h.hv.running().contains(&"rv-small-71".to_string()), "the job's VM runs on: {s:#?}");
    let deletes = h.gh.lock().calls.iter().filter(|c| *c == "delete").count();
    assert!(deletes >= 3, "asked again while GitHub failed: {deletes}");
    assert!(s.vms.iter().any(|v| v.name == "rv-small-71" && v.state == "busy"), "{s:#?}");
}

/// A job's last attempt fails (its VM's guest powers off before its runner came online)
/// while GitHub is still to say whether the runner of its first VM, past its
/// `registration_timeout`, is busy: the job is not given up meanwhile; that runner took
/// it, its attempt is given back, and the job is not given up.
#[tokio::test(start_paused = true)]
async fn a_jobs_last_failed_vm_does_not_give_it_up_while_another_may_be_running_it() {
    let h = last_attempt_failed_while_the_first_is_asked_about(72).await;
    // The first VM's runner took the job; GitHub answers again.
    h.gh.set_runner("rv-small-72", true, true);
    h.gh.lock().fail_calls.clear();
    let s = h
        .wait_for("the first VM kept", Duration::from_secs(600), |s, _| {
            s.vms.iter().any(|v| v.name == "rv-small-72" && v.state == "busy")
        })
        .await;
    assert!(s.queued.iter().any(|q| q.job_id == 72), "{s:#?}");
    assert!(!h.metrics.render().contains("runnervisor_jobs_failed_total{"), "{}", h.metrics.render());
    assert_eq!(h.store.load().unwrap().jobs[&72].failed_vms, 1, "the first VM's attempt given back");
    h.shutdown().await;
}

/// As above, but the first VM's runner turns out idle: the job's attempts are spent, and
/// it is given up once GitHub says so.
#[tokio::test(start_paused = true)]
async fn a_jobs_last_failed_vm_gives_it_up_once_the_other_one_is_known_idle() {
    let h = last_attempt_failed_while_the_first_is_asked_about(73).await;
    h.gh.set_runner("rv-small-73", true, false);
    h.gh.lock().fail_calls.clear();
    let s = h.wait_for("given up", Duration::from_secs(600), |s, _| s.queued.is_empty()).await;
    assert!(h.metrics.render().contains("runnervisor_jobs_failed_total{pool=\"small\"} 1"), "{s:#?}");
    assert_eq!(h.hv.lock().started_total, 2, "no third VM: {s:#?}");
    h.shutdown().await;
}

/// As the first above, with the agent restarted while GitHub is still to say: that the
/// first VM's attempt may be given back is in the store (`VmRec::charged`), so the job gets
/// no third VM after the restart, and its attempt is given back once the runner turns out
/// busy.
#[tokio::test(start_paused = true)]
async fn a_jobs_last_attempt_in_question_stays_so_across_a_restart() {
    let h = last_attempt_failed_while_the_first_is_asked_about(75).await;
    let clock = h.clock.clone();
    let (gh, hv, store) = h.shutdown().await;
    let h = restart_on_clock("registration_timeout = \"60s\"\nmax_attempts = 2", gh, hv, Some(store), clock);
    h.gh.lock().fail_calls.insert("list", 1000);
    h.gh.lock().fail_calls.insert("delete", 1000);
    let s = h.advance_for(Duration::from_secs(60)).await;
    assert!(s.queued.iter().any(|q| q.job_id == 75), "not given up after the restart: {s:#?}");
    assert_eq!(h.hv.lock().started_total, 2, "no third VM after the restart: {s:#?}");
    h.gh.set_runner("rv-small-75", true, true);
    h.gh.lock().fail_calls.clear();
    h.wait_for("the first VM kept", Duration::from_secs(600), |s, _| {
        s.vms.iter().any(|v| v.name == "rv-small-75" && v.state == "busy")
    })
    .await;
    assert_eq!(h.store.load().unwrap().jobs[&75].failed_vms, 1, "the first VM's attempt given back");
    assert!(!h.metrics.render().contains("runnervisor_jobs_failed_total{"), "{}", h.metrics.render());
    h.shutdown().await;
}

/// Job `job` (`max_attempts` 2) has had two VMs fail: the first, past its
/// `registration_timeout`, is torn down once GitHub says whether its runner is busy (GitHub
/// fails meanwhile); the second's guest powered off before its runner came online. The job
/// is still queued, with no third VM.
async fn last_attempt_failed_while_the_first_is_asked_about(job: u64) -> H {
    let mut h = harness("registration_timeout = \"60s\"\nmax_attempts = 2");
    h.deliver(JobAction::Queued, info(job, LABELS, None));
    h.wait("bound", |_, hv| hv.lock().delivered.len() == 1).await;
    h.gh.lock().fail_calls.insert("list", 1000);
    h.gh.lock().fail_calls.insert("delete", 1000);
    let s = h
        .wait_for("a second VM bound", Duration::from_secs(300), |s, hv| {
            hv.lock().delivered.len() == 2 && s.vms.iter().any(|v| v.job_id == job && v.state == "booting")
        })
        .await;
    let second = s.vms.iter().find(|v| v.job_id == job && v.state == "booting").unwrap().name.clone();
    assert_ne!(second, format!("rv-small-{job}"), "{s:#?}");
    h.hv.stop(&second);
    let s = h.advance_for(Duration::from_secs(30)).await;
    assert!(s.queued.iter().any(|q| q.job_id == job), "not given up while its first VM is asked about: {s:#?}");
    assert!(!h.metrics.render().contains("runnervisor_jobs_failed_total{"), "{}", h.metrics.render());
    assert_eq!(h.hv.lock().started_total, 2, "no third VM meanwhile: {s:#?}");
    h
}

/// A VM whose guest registers its runner itself (a registration token) is past its
/// `registration_timeout`: GitHub has no runner of its name, which says only "not yet".
/// Asked again with the domain paused, it still has none; libvirt fails the destroy. Then
/// GitHub lists the runner, busy (registered, and its job taken, before the pause: GitHub's
/// list lagged): the retry asks again, and the VM is kept, running again (its resume fails
/// three times first: the retry after that resumes it).
#[tokio::test(start_paused = true)]
async fn a_runner_not_found_yet_is_asked_about_again_before_a_retry_destroys_its_vm() {
    let mut h = harness("registration = \"token\"\naccept_token_exposure = true\nregistration_timeout = \"60s\"");
    h.deliver(JobAction::Queued, info(74, LABELS, None));
    h.wait("bound", |_, hv| hv.lock().delivered.len() == 1).await;
    h.gh.lock().fail_calls.insert("list", 1000);
    h.advance_for(Duration::from_secs(30)).await;
    h.hv.lock().fail_teardowns = 1000;
    // Until its destroy failed (not only begun: libvirt back before it, the VM went).
    let metrics = h.metrics.clone();
    let s = h
        .wait_for("past its registration_timeout, asked about, its destroy failed", Duration::from_secs(120), |s, _| {
            s.vms.iter().any(|v| v.name == "rv-small-74" && v.state == "tearing_down")
                && !metrics.render().contains("runnervisor_teardown_failures_total 0")
        })
        .await;
    let asked = h.gh.lock().calls.iter().filter(|c| *c == "find").count();
    assert!(asked >= 2, "GitHub asked, then asked again with the domain paused: {s:#?}");
    assert!(h.hv.lock().frozen("rv-small-74"), "paused from the question on: {s:#?}");
    h.gh.add_runner("rv-small-74");
    h.gh.set_runner("rv-small-74", true, true);
    // (The teardown's retries back off while libvirt fails, up to 5 minutes apart.)
    {
        let mut hv = h.hv.lock();
        hv.fail_teardowns = 0;
        hv.fail_resumes = 3;
    }
    let s = h
        .wait_for("kept, busy", Duration::from_secs(600), |s, _| {
            s.vms.iter().any(|v| v.name == "rv-small-74" && v.state == "busy")
        })
        .await;
    assert!(h.hv.running().contains(&"rv-small-74".to_string()), "its job runs on: {s:#?}");
    assert!(!h.hv.lock().frozen("rv-small-74"), "running again: {s:#?}");
    assert_eq!(h.hv.lock().fail_resumes, 0, "its resume was tried until it worked");
    h.shutdown().await;
}

/// A step of the wall clock ages no VM, and holds none back: a running job's VM lives
/// through a step forward past its `max_lifetime`, goes at its `max_lifetime` after a step
/// back, and a step made while the agent was down is found at its start.
#[tokio::test(start_paused = true)]
async fn a_step_of_the_wall_clock_ages_no_vm_and_holds_none_back() {
    use crate::clock::Step;
    const HOUR: i64 = 3_600_000_000_000;
    let mut h = harness("max_lifetime = \"1h\"");
    h.deliver(JobAction::Queued, info(61, LABELS, None));
    h.wait("a VM", |_, hv| hv.running().len() == 1).await;
    h.deliver(JobAction::InProgress, info(61, LABELS, Some("rv-small-61")));
    h.wait("busy", |s, _| s.vms.iter().any(|v| v.state == "busy")).await;
    let busy = |s: &Status| s.vms.iter().any(|v| v.name == "rv-small-61" && v.state == "busy");

    h.clock.step(Step(2 * HOUR));
    let s = h.advance_for(Duration::from_secs(30)).await;
    assert!(busy(&s) && h.hv.running().len() == 1, "a step forward of 2 h tore down the job's VM: {s:#?}");
    assert!(s.vms[0].age_secs < 120, "its age counts from where it was: {s:#?}");

    // Down for a minute, during which the clock is stepped forward again.
    let clock = h.clock.clone();
    let (gh, hv, store) = h.shutdown().await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    clock.step(Step(2 * HOUR));
    let h = restart_on_clock("max_lifetime = \"1h\"", gh, hv, Some(store), clock.clone());
    let s = h.advance_for(Duration::from_secs(30)).await;
    assert!(busy(&s) && h.hv.running().len() == 1, "a step while the agent was down tore down the VM: {s:#?}");
    assert!(s.vms[0].age_secs < 240, "{s:#?}");

    // A step back does not let it outlive its max_lifetime.
    h.clock.step(Step(-5 * HOUR));
    tokio::time::sleep(Duration::from_secs(50 * 60)).await;
    let s = h.status().await;
    assert!(busy(&s), "gone before its max_lifetime: {s:#?}");
    h.wait_for("torn down at its max_lifetime", Duration::from_secs(10 * 60), |s, hv| {
        s.vms.is_empty() && hv.running().is_empty()
    })
    .await;
    assert_eq!(h.metrics.render().lines().filter(|l| l.contains("reason=\"max_lifetime\"")).count(), 1);
}

/// Teardowns that failed while libvirt was away are tried again as soon as it is back, not
/// after their back-off (grown to minutes in a long outage).
#[tokio::test(start_paused = true)]
async fn teardowns_go_on_at_once_when_libvirt_is_back() {
    let mut h = harness("");
    h.deliver(JobAction::Queued, info(72, LABELS, None));
    h.wait("a VM", |_, hv| hv.running() == ["rv-small-72"]).await;
    h.hv.lock().unavailable = true;
    let _ = h.tx.send(Event::Hv(HvEvent::Disconnected));
    h.run_job_on("rv-small-72", 72);
    // Tried at once, then after 10, 20, 40 and 80 s: the next try is minutes away.
    tokio::time::sleep(Duration::from_secs(200)).await;
    assert_eq!(h.status().await.vms.len(), 1, "its teardown cannot succeed yet");
    h.hv.lock().unavailable = false;
    let _ = h.tx.send(Event::Hv(HvEvent::Reconnected));
    h.wait_for("the VM gone", Duration::from_secs(5), |s, hv| s.vms.is_empty() && hv.lock().domains.is_empty()).await;
    h.shutdown().await;
}

/// A sweep whose libvirt call hangs for good (a daemon stuck on a storage pool, its
/// connection alive): until it is overdue the agent goes on; then the hypervisor is not
/// ready, status says why and a job gets no VM; no second sweep starts beside the hung one.
/// Once the call answers, the job is served, and what the sweep listed before a VM was torn
/// down meanwhile (10 minutes ago and more) does not bring that VM back.
#[tokio::test(start_paused = true)]
async fn a_sweep_that_hangs_holds_provisioning_once_overdue_until_it_answers() {
    use crate::scheduler::sweep::SWEEP_OVERDUE;
    // Minutes of virtual time by hand (a call hangs: tokio does not advance it), a second
    // at a time.
    let second = Duration::from_secs(1);
    let mut h = harness("");
    let _release = ReleaseStalled(h.hv.clone());
    h.wait("a first sweep", |s, _| s.libvirt_connected).await;
    h.deliver(JobAction::Queued, info(170, LABELS, None));
    h.wait("a VM", |_, hv| hv.running() == ["rv-small-170"]).await;
    // (Two armed: the second would be a sweep started beside the hung one.)
    h.hv.lock().stall_lists = 2;
    // The next sweep lists the VM, then hangs; meanwhile its job runs and it goes.
    let s = h.advance_by(Duration::from_secs(60), second).await;
    assert_eq!(h.hv.lock().stall_lists, 1, "a sweep is hung: {s:#?}");
    h.run_job_on("rv-small-170", 170);
    h.wait_advancing("the VM gone", |s, hv| s.vms.is_empty() && hv.running().is_empty()).await;
    // Short of the bound the agent still looks connected, to what an operator alerts on too.
    let metrics = h.metrics.clone();
    let ready_is = |n: u8| metrics.render().lines().any(|l| l == format!("runnervisor_hypervisor_ready {n}"));
    let s = h.advance_by(SWEEP_OVERDUE - Duration::from_secs(90), second).await;
    assert!(s.libvirt_connected && s.hypervisor_problem.is_none(), "{s:#?}");
    assert!(ready_is(1), "{}", h.metrics.render());
    let s = h.advance_by(Duration::from_secs(60), second).await;
    assert!(!s.libvirt_connected, "{s:#?}");
    assert!(ready_is(0), "{}", h.metrics.render());
    let problem = s.hypervisor_problem.clone().unwrap_or_default();
    assert!(problem.contains("libvirt has not answered a sweep"), "{s:#?}");
    assert_eq!(h.hv.lock().stall_lists, 1, "one sweep at a time");
    h.hv.lock().stall_lists = 0;
    h.deliver(JobAction::Queued, info(171, LABELS, None));
    // Held for a minute: the VM went over 10 minutes before the sweep answers.
    let held = h.advance_by(Duration::from_secs(60), second).await;
    assert!(held.vms.is_empty() && held.queued.len() == 1, "{held:#?}");
    let teardowns = || -> u64 {
        let m = h.metrics.render();
        m.lines()
            .filter(|l| l.starts_with("runnervisor_teardowns_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = teardowns();
    h.hv.lock().release_stalled = true;
    h.wait("a VM once the sweep answered", |_, hv| hv.running() == ["rv-small-171"]).await;
    let s = h.status().await;
    assert!(s.libvirt_connected && s.hypervisor_problem.is_none(), "{s:#?}");
    assert!(ready_is(1), "{}", h.metrics.render());
    // Sweeps after it: a VM adopted from the late listing would have been found gone.
    let s = h.advance_for(Duration::from_secs(60)).await;
    let names: Vec<&str> = s.vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["rv-small-171"], "{s:#?}");
    assert_eq!(
        teardowns(),
        before,
        "the torn-down VM the late listing had is not adopted again: {}",
        h.metrics.render()
    );
    h.shutdown().await;
}

/// A job keeps its runner busy at GitHub after its VM went at `max_lifetime` (the runner's
/// credentials, taken out of the VM, renew the job from elsewhere, for days): the VM's
/// place under `max_vms` is given back once its domain and volumes are gone, and a queued
/// job gets a VM; the runner is deleted once it is no longer busy (helper-67's F2: the
/// record held the pool's only place while the teardown asked again every 5 minutes).
#[tokio::test(start_paused = true)]
async fn a_runner_kept_busy_after_its_vm_went_holds_no_place() {
    let mut h = harness_tweaked("max_lifetime = \"1h\"", |_| {}, |c| c.pools[0].max_vms = 1);
    h.deliver(JobAction::Queued, info(81, LABELS, None));
    h.wait("a VM", |_, hv| hv.running().len() == 1).await;
    h.deliver(JobAction::InProgress, info(81, LABELS, Some("rv-small-81")));
    h.gh.set_runner("rv-small-81", true, true);
    h.wait("busy", |s, _| s.vms.iter().any(|v| v.name == "rv-small-81" && v.state == "busy")).await;
    h.deliver(JobAction::Queued, info(82, LABELS, None));
    h.wait_for("the next job's VM", Duration::from_secs(80 * 60), |s, hv| {
        hv.running() == ["rv-small-82"] && s.vms.iter().all(|v| v.name != "rv-small-81")
    })
    .await;
    assert!(h.gh.runner_names().contains(&"rv-small-81".to_string()), "still busy, still registered");
    h.gh.set_runner("rv-small-81", false, false);
    let gh = h.gh.clone();
    h.wait_for("its runner deleted", Duration::from_secs(10 * 60), |_, _| {
        !gh.runner_names().contains(&"rv-small-81".to_string())
    })
    .await;
    h.shutdown().await;
}

/// libvirt cannot say a domain's state or metadata (an ACL, a driver error): the sweep
/// leaves it alone, with its volumes, and a VM of the book on it stays; the agent stays
/// ready and its other work goes on. Once libvirt can say, each is judged as usual. (Before,
/// one was listed stopped or without metadata, for the sweep to reap: helper-68; then
/// the whole listing failed, and an agent starting up never became ready: helper-69.)
#[tokio::test(start_paused = true)]
async fn a_domain_libvirt_cannot_describe_is_left_alone() {
    let mut h = harness("");
    h.deliver(JobAction::Queued, info(93, LABELS, None));
    h.wait("a VM", |_, hv| hv.running() == ["rv-small-93"]).await;
    {
        let mut s = h.hv.lock();
        s.unreadable.extend(["rv-small-93".to_string(), "rv-small-97".to_string()]);
        s.volumes.insert("rv-small-97.qcow2".into());
    }
    h.hv.define("rv-small-97", "<domain/>").unwrap();
    // Its domain stops, unseen (no event): unreadable, the VM stays.
    h.hv.lock().domains.get_mut("rv-small-93").unwrap().0 = crate::hypervisor::DomainState::Stopped;
    let s = h.advance_for(Duration::from_secs(180)).await;
    assert!(s.vms.iter().any(|v| v.name == "rv-small-93"), "{s:#?}");
    assert!(s.libvirt_connected && s.hypervisor_problem.is_none(), "{s:#?}");
    assert!(h.hv.lock().domains.contains_key("rv-small-97") && h.hv.lock().volumes.contains("rv-small-97.qcow2"));
    // Readable again: the stopped VM goes (its job gets another), the unknown domain of
    // ours (no metadata) too.
    h.hv.lock().unreadable.clear();
    h.wait_for("both gone", Duration::from_secs(180), |s, hv| {
        let hv = hv.lock();
        s.vms.iter().all(|v| v.name != "rv-small-93")
            && !hv.domains.contains_key("rv-small-93")
            && !hv.domains.contains_key("rv-small-97")
            && !hv.volumes.contains("rv-small-97.qcow2")
    })
    .await;
    h.shutdown().await;
}

//! Reloads: pools resized, added and removed while jobs run.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_resized_pool_grows_at_once_and_an_added_pool_serves() {
    let mut h = harness("");
    for id in [11, 12, 13] {
        h.deliver(JobAction::Queued, info(id, LABELS, None));
    }
    h.wait("two VMs (max_vms = 2)", |_, hv| hv.running().len() == 2).await;
    let report = h
        .reload(|c| {
            c.pools[0].max_vms = 3;
            c.pools.push(big_pool(c));
        })
        .await;
    assert_eq!(report.applied, ["pool small", "pool big (added)"]);
    assert!(report.kept.is_empty());
    h.wait("the third job's VM", |s, _| vm_for(s, 13).is_some()).await;
    h.deliver(JobAction::Queued, info(21, &["self-hosted", "big"], None));
    let s = h.wait("a VM of the new pool", |s, _| vm_for(s, 21).is_some()).await;
    assert_eq!(vm_for(&s, 21).as_deref(), Some("rv-big-21"));
    assert_eq!(s.pools.iter().map(|p| (p.name.as_str(), p.max_vms)).collect::<Vec<_>>(), [("small", 3), ("big", 3)]);
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_removed_pool_drains_its_queued_jobs_are_dropped_and_it_goes_with_its_last_vm() {
    let mut h = harness("");
    for id in [11, 12, 13] {
        h.deliver(JobAction::Queued, info(id, LABELS, None));
    }
    h.wait("two VMs", |_, hv| hv.running().len() == 2).await;
    let report = h
        .reload(|c| {
            c.pools[0].name = "other".into();
            c.pools[0].labels = vec!["self-hosted".into(), "other".into()];
        })
        .await;
    assert_eq!(
        report.applied,
        ["pool other (added)", "pool small (removed: its VMs finish, its queued jobs are dropped)"]
    );
    // Its running VMs stay; the job without one is dropped; it takes no new job.
    let s = h.status().await;
    assert!(s.queued.iter().all(|q| q.job_id != 13), "{s:#?}");
    assert!(vm_for(&s, 11).is_some() && vm_for(&s, 12).is_some());
    assert!(s.pools.iter().any(|p| p.name == "small" && p.retiring));
    h.deliver(JobAction::Queued, info(14, LABELS, None));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = h.status().await;
    assert_eq!(s.vms.len(), 2, "no VM for a removed pool: {s:#?}");
    assert!(h.metrics.render().contains("runnervisor_jobs_unmatched_total 1\n"));
    // Its VMs finish their jobs; with the last one the pool goes.
    h.run_job_on("rv-small-11", 11);
    h.run_job_on("rv-small-12", 12);
    let s = h
        .wait("the removed pool gone", |s, hv| s.vms.is_empty() && hv.lock().domains.is_empty() && s.pools.len() == 1)
        .await;
    assert_eq!(s.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["other"]);
    assert!(!h.metrics.render().contains("pool=\"small\",state="), "its gauges are gone");
    // Added again, it is counted again (its gauges' handles went with its series).
    h.reload(|c| {
        let mut small = c.pools[0].clone();
        small.name = "small".into();
        small.labels = LABELS.iter().map(|l| l.to_string()).collect();
        c.pools.push(small);
    })
    .await;
    h.deliver(JobAction::Queued, info(15, LABELS, None));
    h.wait("a VM of the pool added again", |s, _| vm_for(s, 15).is_some()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m = h.metrics.render();
    let vms = |state: &str| format!("runnervisor_vms{{pool=\"small\",state=\"{state}\"}} 1\n");
    assert!(["provisioning", "booting"].iter().any(|s| m.contains(&vms(s))), "{m}");
    assert!(m.contains("runnervisor_queue_depth{pool=\"small\"} 1\n"), "its job waits for its runner: {m}");
    h.shutdown().await;
}

/// A pool removed from the configuration while the agent was stopped (or by a reload it
/// died before finishing): its VMs found in the store at start finish as a removed pool's
/// do, its queued jobs are dropped, and the host's room they held goes to the pools that
/// are configured. Before, such a VM had no timer at all and held its place for good (the
/// simulator: seed 255, a host of one VM that served nothing for hours).
#[tokio::test(start_paused = true)]
async fn vms_of_a_pool_the_configuration_no_longer_has_go_and_free_their_room() {
    let h = harness("");
    let (gh, hv, store) = h.shutdown().await;
    let now = h_now();
    let job = fixtures::job(31, "gone", "octo-org/app", JobState::Queued, 0);
    // And a job of another pool gone, which has no VM.
    let lone = fixtures::job(33, "gone-too", "octo-org/app", JobState::Queued, 0);
    let vm = fixtures::vm("rv-gone-30", "gone", 30, VmState::Idle, now);
    store.commit(&Batch { jobs: vec![job, lone], vms: vec![vm], ..Default::default() }).unwrap();
    hv.define("rv-gone-30", "<domain/>").unwrap();
    hv.start("rv-gone-30").unwrap();

    let mut h = restart("[capacity]\nmax_vms = 1", gh, hv.clone(), Some(store));
    let s = h.wait("the gone pool retiring", |s, _| s.pools.iter().any(|p| p.name == "gone" && p.retiring)).await;
    assert!(s.queued.is_empty(), "their queued jobs dropped: {s:#?}");
    assert!(h.store.load().unwrap().jobs.keys().all(|id| ![31, 33].contains(id)), "and deleted from the store");
    h.deliver(JobAction::Queued, info(32, LABELS, None));
    // Surplus once the default idle_timeout (20 s) passes: it goes, the job gets its room.
    let s = h
        .wait_for("the configured pool's VM", Duration::from_secs(120), |s, hv| {
            vm_for(s, 32).is_some() && !hv.lock().domains.contains_key("rv-gone-30")
        })
        .await;
    assert!(s.pools.iter().all(|p| p.name != "gone"), "forgotten with its last VM: {s:#?}");
    h.shutdown().await;
}

/// Wall time as the harness's clock reads it.
fn h_now() -> SystemTime {
    crate::clock::TokioClock::new().now()
}

/// A guest that registers its runner (registration token) just before its VM is torn down:
/// the registration shows up after the teardown looked for it. Its exact name is watched,
/// and it is deleted by the next sync, also once its pool is removed and the agent no
/// longer takes names of that pool for its own (the simulator: seed 201072 at 2,000 steps
/// left such a registration for good).
#[tokio::test(start_paused = true)]
async fn a_runner_registered_after_its_vm_was_torn_down_is_deleted_even_once_its_pool_is_gone() {
    let h = vm_of_a_removed_pool_gone_before_its_runner(41).await;
    // Its guest's registration arrives now.
    h.gh.add_runner("rv-small-41");
    h.wait_for("the late registration deleted", Duration::from_secs(30), |_, _| {
        !h.gh.runner_names().contains(&"rv-small-41".to_string())
    })
    .await;
    h.shutdown().await;
}

/// As above, with the agent restarted after the VM went and before the registration
/// showed up: the watch is in the store, not in memory only (a restart forgot it, and the
/// pool's names were no longer the agent's: the registration stayed; the simulator, seed
/// 38932 of 1,000 steps).
#[tokio::test(start_paused = true)]
async fn a_late_runner_of_a_removed_pool_is_deleted_after_a_restart() {
    let h = late_runner_watched_then_restarted(Duration::from_secs(60)).await;
    h.wait_for("the late registration deleted", Duration::from_secs(120), |_, _| {
        !h.gh.runner_names().contains(&"rv-small-42".to_string())
    })
    .await;
    h.shutdown().await;
}

/// The watch lasts its hour, a restart's downtime included: a registration showing up
/// after it is not the agent's (its pool is gone) and stays.
#[tokio::test(start_paused = true)]
async fn a_late_runners_watch_ends_its_hour_after_it_began_across_a_restart() {
    let h = late_runner_watched_then_restarted(Duration::from_secs(3700)).await;
    h.advance_for(Duration::from_secs(300)).await;
    assert!(h.gh.runner_names().contains(&"rv-small-42".to_string()), "deleted after its watch ended");
    assert!(h.gh.lock().calls.iter().any(|c| c == "list"), "the runners listed: {:?}", h.gh.lock().calls);
    h.shutdown().await;
}

/// A token VM of pool "small" torn down before its runner registered, its pool removed;
/// the agent down for `down`, started again without the pool; then the registration
/// (`rv-small-42`) shows up.
async fn late_runner_watched_then_restarted(down: Duration) -> H {
    let h = vm_of_a_removed_pool_gone_before_its_runner(42).await;
    let clock = h.clock.clone();
    let (gh, hv, store) = h.shutdown().await;
    tokio::time::sleep(down).await;
    // Started again with the config the reload left (no pool "small").
    let dir = crate::test_support::tempdir();
    let mut cfg = (*config("", &dir)).clone();
    cfg.pools[0].image = fake_image(&dir);
    cfg.pools = vec![big_pool(&cfg)];
    let mut h = start_member(Arc::new(cfg), gh, hv, None, store.clone(), store, |s| s, clock);
    h.dirs.push(dir);
    let _ = h.tx.send(Event::Hv(HvEvent::Reconnected));
    h.gh.add_runner("rv-small-42");
    h
}

/// Job `job`'s token VM of pool "small" (`rv-small-<job>`) got its runner command, then
/// a reload removed the pool and the VM went, its runner not registered yet.
async fn vm_of_a_removed_pool_gone_before_its_runner(job: u64) -> H {
    let mut h = harness("registration = \"token\"\naccept_token_exposure = true\nidle_timeout = \"5s\"");
    h.deliver(JobAction::Queued, info(job, LABELS, None));
    h.wait("bound", |_, hv| hv.lock().delivered.len() == 1).await;
    h.reload(|c| c.pools = vec![big_pool(c)]).await;
    let vm = format!("rv-small-{job}");
    h.wait_for("the removed pool's VM gone, and the pool", Duration::from_secs(60), |s, hv| {
        s.pools.iter().all(|p| p.name != "small") && !hv.lock().domains.contains_key(&vm)
    })
    .await;
    h
}

/// A reload moves new VMs to another libvirt network: a VM made before it releases its
/// address on the network it got it from, not on the new one, where it has none (its entry
/// stayed on the old network for good: helper-68).
#[tokio::test(start_paused = true)]
async fn a_vm_releases_its_address_on_the_network_it_was_made_on() {
    use crate::config::NetworkConfig;
    let mut h = harness("");
    h.deliver(JobAction::Queued, info(91, LABELS, None));
    h.wait("a VM", |_, hv| hv.running() == ["rv-small-91"]).await;
    h.reload(|c| {
        if let NetworkConfig::Network { name, .. } = &mut c.libvirt.network {
            *name = "rv-other".into();
        }
    })
    .await;
    h.deliver(JobAction::Queued, info(92, LABELS, None));
    h.wait("the next VM", |_, hv| hv.running().len() == 2).await;
    h.run_job_on("rv-small-91", 91);
    h.run_job_on("rv-small-92", 92);
    h.wait("both gone", |s, hv| s.vms.is_empty() && hv.running().is_empty()).await;
    let released = h.hv.lock().released.clone();
    let on = |vm: &str| released.iter().filter(|(_, v)| v == vm).map(|(n, _)| n.as_str()).collect::<Vec<_>>();
    assert_eq!(on("rv-small-91"), ["runnervisor"], "{released:?}");
    assert_eq!(on("rv-small-92"), ["rv-other"], "{released:?}");
    h.shutdown().await;
}

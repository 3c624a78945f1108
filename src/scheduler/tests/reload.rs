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
            let mut big = c.pools[0].clone();
            big.name = "big".into();
            big.labels = vec!["self-hosted".into(), "big".into()];
            c.pools.push(big);
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
    h.shutdown().await;
}

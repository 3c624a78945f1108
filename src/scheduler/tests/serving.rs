//! Jobs served: demand, counting not binding, drain, restart, scopes and caps.

use super::*;

#[tokio::test(start_paused = true)]
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
    // The seed went through the hypervisor seam with nothing secret in it; the VM's JIT
    // runner files came over its bind port once its guest waited.
    let seed = String::from_utf8_lossy(&h.hv.lock().seeds[&vm11]).into_owned();
    assert!(!seed.contains("runcmd") && !seed.contains("jit"), "{seed}");
    h.wait("vm 11 bound", |_, hv| hv.lock().delivered.iter().any(|(v, m)| *v == vm11 && m.contains(".runner"))).await;
    // The VM sits behind the fence: the default network, an isolated port, the nwfilter
    // defined from the config, trusting the network's own DHCP server.
    {
        let hv = h.hv.lock();
        let xml = &hv.domains[&vm11].1;
        assert!(xml.contains("<source network=\"runnervisor\"/>"), "{xml}");
        assert!(
            xml.contains("<filterref filter=\"runnervisor-fence-fixed\">") && xml.contains("<port isolated=\"yes\"/>")
        );
        assert!(xml.contains("name=\"DHCPSERVER\" value=\"198.51.100.1\""), "{xml}");
        let filter = &hv.filters["runnervisor-fence-fixed"];
        assert!(filter.contains("clean-traffic") && filter.contains("dstipaddr=\"169.254.0.0\""), "{filter}");
        // This host's own addresses (the hypervisor's answer: the fake's) are dropped.
        assert!(filter.contains("dstipaddr=\"127.0.0.1\" dstipmask=\"32\""), "{filter}");
    }
    h.run_job_on(&vm11, 11);
    let s = h.wait("job 13 gets a VM", |s, _| vm_for(s, 13).is_some()).await;
    assert!(s.vms.iter().all(|v| v.name != vm11), "vm 11 torn down");
    let vm12 = vm_for(&s, 12).unwrap();
    let vm13 = vm_for(&s, 13).unwrap();
    h.run_job_on(&vm12, 12);
    h.run_job_on(&vm13, 13);
    h.wait("all gone", |s, hv| s.vms.is_empty() && hv.lock().domains.is_empty()).await;
    // The timeline: each milestone, in order, the job 13 waited for a slot.
    for (vm, job) in [(&vm11, 11), (&vm13, 13)] {
        let t = h.trace(vm).await;
        assert_eq!((t.job_id, t.warm, t.reason.as_deref()), (Some(job), false, Some("stopped")), "{t:#?}");
        let m = [("queued", t.queued), ("created", t.created), ("defined", t.defined), ("started", t.started)];
        let rest = [("online", t.online), ("completed", t.completed), ("reaped", t.reaped), ("gone", t.gone)];
        assert_in_order(&t, &[&m[..], &rest[..]].concat());
    }
    let (t11, t13) = (h.trace(&vm11).await, h.trace(&vm13).await);
    assert!(t13.created.unwrap() >= t11.gone.unwrap(), "job 13 waited for vm 11's slot");
    let (gh, hv, _) = h.shutdown().await;
    let st = hv.lock();
    assert!(st.volumes.is_empty(), "{:?}", st.volumes);
    assert_eq!(st.peak_running, 2);
    assert_eq!(st.started_total, 3);
    assert!(gh.runner_names().is_empty(), "runner registrations deleted: {:?}", gh.runner_names());
    // The API budget: per job its credential, nothing else. GitHub removed each ephemeral
    // runner when its job completed (no DELETE); webhooks flowed (no status polling).
    let calls = &gh.lock().calls;
    assert_eq!(calls.iter().filter(|c| *c == "jit").count(), 3, "{calls:?}");
    assert!(!calls.iter().any(|c| ["delete", "find", "job"].contains(&c.as_str())), "{calls:?}");
}

#[tokio::test(start_paused = true)]
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

/// The `in_progress` webhook lost: the job's `completed` names the runner that took it, and
/// the VM is booked as having served that job, not the one it was made for.
#[tokio::test(start_paused = true)]
async fn a_completed_job_names_the_job_a_runner_took_when_its_start_was_lost() {
    let mut h = harness("");
    h.deliver(JobAction::Queued, info(23, LABELS, None));
    h.deliver(JobAction::Queued, info(24, LABELS, None));
    h.wait("two VMs", |_, hv| hv.running().len() == 2).await;
    h.complete(24, Some("rv-small-23"), "success");
    h.wait("vm for 23 finishing", |s, _| s.vms.iter().any(|v| v.name == "rv-small-23" && v.state == "finishing")).await;
    h.gh.lock().runners.retain(|_, r| r.name != "rv-small-23");
    h.hv.stop("rv-small-23");
    let s = h.wait("vm for 23 gone", |s, _| s.vms.iter().all(|v| v.name != "rv-small-23")).await;
    assert_eq!(s.queued.iter().map(|q| q.job_id).collect::<Vec<_>>(), [23], "{s:#?}");
    let t = h.trace("rv-small-23").await;
    assert_eq!(t.job_id, Some(24), "{t:#?}");
    h.shutdown().await;
}

/// A job's end that names no runner (a scale set's request cancelled once its runner took
/// it): the runner it started on ran it, and that VM finishes (it was left busy).
#[tokio::test(start_paused = true)]
async fn a_jobs_end_naming_no_runner_finishes_the_vm_it_started_on() {
    let mut h = harness("");
    h.deliver(JobAction::Queued, info(25, LABELS, None));
    h.wait("its VM", |_, hv| hv.running().len() == 1).await;
    h.deliver(JobAction::InProgress, info(25, LABELS, Some("rv-small-25")));
    h.wait("its job taken", |s, _| s.vms.iter().any(|v| v.took_job == Some(25))).await;
    h.complete(25, None, "cancelled");
    h.wait("its VM finishing", |s, _| s.vms.iter().any(|v| v.name == "rv-small-25" && v.state == "finishing")).await;
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn unmatched_labels_duplicates_and_reordering_make_no_extra_vm() {
    let mut h = harness("");
    h.deliver(JobAction::Queued, info(31, &["self-hosted", "gpu"], None));
    h.deliver(JobAction::Queued, info(32, &["self-hosted"], None));
    // completed before queued: never provisioned.
    h.complete(33, None, "cancelled");
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

#[tokio::test(start_paused = true)]
async fn a_cancelled_job_makes_its_vm_surplus_and_it_is_reaped() {
    let mut h = harness("idle_timeout = \"1s\"");
    h.deliver(JobAction::Queued, info(41, LABELS, None));
    h.wait("a VM", |_, hv| hv.running().len() == 1).await;
    h.complete(41, None, "cancelled");
    h.wait("surplus VM reaped", |s, hv| s.vms.is_empty() && hv.lock().domains.is_empty()).await;
    let (gh, _, _) = h.shutdown().await;
    assert!(gh.runner_names().is_empty());
}

/// A surplus runner whose deletion GitHub's rate limit holds back is deleted (and its VM
/// goes) as the limit lifts (within the second its retries are spread over, and the
/// `IDLE_PLAN` a retry due may wait for), not at the next doubled back-off (10, 20, 40,
/// 80 s: 150 s after a limit of 100 s began).
#[tokio::test(start_paused = true)]
async fn a_teardown_held_back_by_a_rate_limit_is_retried_as_it_lifts() {
    let mut h = harness("idle_timeout = \"1s\"");
    h.deliver(JobAction::Queued, info(42, LABELS, None));
    h.wait("a VM", |_, hv| hv.running().len() == 1).await;
    let limit = Duration::from_secs(100);
    let began = Instant::now();
    h.gh.lock().rate_limited_until = Some(began + limit);
    h.complete(42, None, "cancelled");
    h.wait_for("the surplus VM reaped", Duration::from_secs(300), |s, hv| {
        s.vms.is_empty() && hv.lock().domains.is_empty()
    })
    .await;
    let took = began.elapsed();
    let late = Duration::from_secs(1) + IDLE_PLAN + Duration::from_secs(1);
    assert!(took >= limit && took < limit + late, "gone {took:?} after a limit of {limit:?} began");
    let m = h.metrics.render();
    assert!(m.contains("runnervisor_teardown_failures_total 1\n"), "one try failed, the next at the lift: {m}");
    let (gh, _, _) = h.shutdown().await;
    assert!(gh.runner_names().is_empty());
}

/// A VM's runner GitHub lists as busy before anything named its job (the `in_progress`
/// webhook lost or late, or sent while the agent restarted: the restart test's failure
/// in CI, its job given a second VM 2 ms before the redelivery named it) gets its job no
/// other VM meanwhile; with no news for `TAKEN_UNHEARD` (the runner may have taken
/// another job), the job gets one.
#[tokio::test(start_paused = true)]
async fn a_runner_busy_with_a_job_nothing_named_keeps_its_job_from_a_second_vm_a_while() {
    let (logs, _caught) = LogBuf::catch();
    let mut h = harness("");
    h.deliver(JobAction::Queued, info(43, LABELS, None));
    h.wait("a VM", |_, hv| hv.running() == ["rv-small-43"]).await;
    h.gh.set_runner("rv-small-43", true, true);
    let s = h.wait("the runner listed busy", |s, _| s.vms.iter().any(|v| v.state == "busy")).await;
    assert_eq!(s.queued.len(), 1, "no news of the job: {s:#?}");
    let s = h.advance_for(TAKEN_UNHEARD - Duration::from_secs(10)).await;
    assert_eq!(h.hv.running(), ["rv-small-43"], "no second VM while the runner's job may be its own: {s:#?}");
    h.wait_for("a VM for the job once the wait is over", Duration::from_secs(30), |_, hv| hv.running().len() == 2)
        .await;
    let said = logs.saying(HELD_RAN_OUT);
    assert!(
        matches!(&said[..], [l] if l.split(' ').any(|f| f == "vm=rv-small-43")),
        "once, naming the busy VM: {said:?}"
    );
    h.shutdown().await;
}

/// A pool whose name is another's followed by `-<digits>` ("small" and "small-2"): a VM of
/// "small-2" (`rv-small-2-41`) reads like one of "small" (job 2, attempt 41), yet its
/// surplus timer is its own pool's, so it is reaped after its idle_timeout, not kept
/// until max_lifetime by the other pool's passes.
#[tokio::test(start_paused = true)]
async fn a_surplus_vm_of_a_pool_named_like_another_plus_digits_is_reaped() {
    let second = "idle_timeout = \"1s\"\n[[pool]]\nname = \"small-2\"\nlabels = [\"self-hosted\", \"gpu\"]\nimage = \"/dev/null\"\nidle_timeout = \"1s\"";
    let mut h = harness_tweaked(second, |_| {}, |c| c.pools[1].image = c.pools[0].image.clone());
    let gpu = &["self-hosted", "gpu"];
    h.deliver(JobAction::Queued, info(41, gpu, None));
    h.wait("a VM of small-2", |_, hv| hv.running() == ["rv-small-2-41"]).await;
    assert!(crate::hypervisor::is_vm_of_pool("rv-small-2-41", "small"), "the name alone is ambiguous");
    let mut c = info(41, gpu, None);
    c.conclusion = Some("cancelled".into());
    h.deliver(JobAction::Completed, c);
    h.wait("the surplus VM reaped", |s, hv| s.vms.is_empty() && hv.lock().domains.is_empty()).await;
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
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
        vms_made: 1,
        received_at: now,
        updated_at: now,
        ..fixtures::job(92, "small", "octo-org/app", JobState::Queued, 0)
    };
    let vm = fixtures::vm("rv-small-92", "small", 92, VmState::Provisioning, now);
    store.commit(&Batch { jobs: vec![job], vms: vec![vm], ..Default::default() }).unwrap();
    hv.lock().volumes.insert("rv-small-92.qcow2".into());
    GitHub::generate_jit_config(&*gh, "rv-small-92", &[], 1).await.unwrap();
    // An orphan domain of ours with no record at all, not running.
    hv.define("rv-small-99", "<domain/>").unwrap();

    let h = restart("", gh, hv.clone(), Some(store));
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

#[tokio::test(start_paused = true)]
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
    assert_eq!(s.queued.iter().map(|q| q.job_id).collect::<Vec<_>>(), [111], "{s:#?}\n{}", h.metrics.render());
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
async fn a_job_github_answers_404_for_is_dropped() {
    // Drained: the job gets no VM and stays queued until the GitHub sync asks about it
    // (after two sync intervals without news); the fake GitHub does not know it.
    let mut h = harness("");
    assert!(matches!(h.admin(AdminCommand::Drain(true)).await, AdminReply::Ok(_)));
    h.deliver(JobAction::Queued, info(301, LABELS, None));
    h.gh.lock().jobs.remove(&301);
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
    let calls = h.gh.lock().calls.clone();
    assert!(calls.iter().any(|c| c.starts_with("job")), "{calls:?}");
    let (_, _, store) = h.shutdown().await;
    let snap = store.load().unwrap();
    let j = &snap.jobs[&301];
    assert!(
        matches!(&j.state, JobState::Completed { conclusion, .. } if conclusion.as_deref() == Some("not_found")),
        "{:?}",
        j.state
    );
}

/// A backlog of queued jobs, asked about while webhooks are quiet (no hook), is asked
/// about ever less often while GitHub has nothing new to say of them (the recheck period
/// at most): 25 jobs, syncs every 5 s, 10 minutes: each job about six times, not every
/// other sync (20 a sync, 2,400 calls).
#[tokio::test(start_paused = true)]
async fn a_backlog_is_asked_about_ever_less_often() {
    let mut h = harness("");
    assert!(matches!(h.admin(AdminCommand::Drain(true)).await, AdminReply::Ok(_)));
    for id in 400..425 {
        h.gh.set_job_queued(id);
        h.deliver(JobAction::Queued, info(id, LABELS, None));
    }
    h.wait("the backlog queued", |s, _| s.queued.len() == 25).await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    let asked = h.gh.lock().calls.iter().filter(|c| *c == "job").count();
    assert!((100..=250).contains(&asked), "asked {asked} times");
    assert_eq!(h.status().await.queued.len(), 25, "all still queued");
    h.shutdown().await;
}

/// Every VM's address is decided by the agent: a DHCP host entry per VM (its MAC follows
/// from the address) made before its domain and given back after it; the fence knows the
/// address from the start; a freed address serves the next VM; an entry left by a VM
/// that is gone is released by the sweep, one that is not ours is left alone.
#[tokio::test(start_paused = true)]
async fn every_vm_gets_a_reserved_address_given_back_at_teardown() {
    let mut h = harness("");
    h.deliver(JobAction::Queued, info(71, LABELS, None));
    h.deliver(JobAction::Queued, info(72, LABELS, None));
    h.wait("two VMs", |_, hv| hv.running().len() == 2).await;
    let hosts = |h: &H| h.hv.lock().dhcp.clone().unwrap().hosts;
    // The two provisionings run at once: which gets the lower address is theirs to race.
    let mut ips: Vec<(String, String)> = hosts(&h).iter().map(|r| (r.ip.to_string(), r.mac.clone())).collect();
    ips.sort();
    assert_eq!(
        ips,
        [("198.51.100.10".into(), "52:54:00:33:64:0a".into()), ("198.51.100.11".into(), "52:54:00:33:64:0b".into())]
    );
    let r71 = hosts(&h).into_iter().find(|r| r.vm == "rv-small-71").unwrap();
    {
        let hv = h.hv.lock();
        let xml = &hv.domains["rv-small-71"].1;
        assert!(xml.contains(&format!("<mac address=\"{}\"/>", r71.mac)), "{xml}");
        assert!(xml.contains(&format!("name=\"IP\" value=\"{}\"", r71.ip)), "the fence knows it: {xml}");
        assert!(!xml.contains("CTRL_IP_LEARNING"), "nothing learned: {xml}");
        assert!(xml.contains("filter=\"runnervisor-fence-fixed\""), "the fence without DHCP: {xml}");
        // The seed gives the guest that address (and the MAC it is for): it asks no DHCP
        // server, and its fence lets no DHCP message out.
        let seed = crate::hypervisor::seed::read_file(&hv.seeds["rv-small-71"], "network-config").unwrap();
        let config: serde_json::Value = serde_json::from_str(&seed).unwrap();
        let eth = &config["ethernets"]["rv0"];
        assert_eq!(eth["match"]["macaddress"], r71.mac.as_str());
        assert_eq!(eth["addresses"][0], format!("{}/24", r71.ip));
        assert_eq!(eth["dhcp4"], false);
        let fixed = &hv.filters["runnervisor-fence-fixed"];
        assert!(!fixed.contains("dstportstart=\"67\""), "no DHCP: {fixed}");
        assert!(hv.filters["runnervisor-fence"].contains("dstportstart=\"67\""), "for VMs of before: {fixed}");
        assert!(hv.filters.contains_key(crate::fence::NO_ANNOUNCE));
    }
    h.run_job_on("rv-small-71", 71);
    h.wait("71 gone, its address free", |s, _| s.vms.len() == 1).await;
    h.wait("released", |_, hv| hv.lock().dhcp.as_ref().unwrap().hosts.len() == 1).await;
    h.deliver(JobAction::Queued, info(73, LABELS, None));
    h.wait("73 runs", |_, hv| hv.running().contains(&"rv-small-73".to_string())).await;
    let r73 = hosts(&h).into_iter().find(|r| r.vm == "rv-small-73").unwrap();
    assert_eq!((r73.ip, &r73.mac), (r71.ip, &r71.mac), "the freed address serves the next VM, with the same MAC");
    // Entries the sweep finds: one of a VM of ours that is gone, one of another program.
    for (vm, last) in [("rv-small-999", 200u8), ("someone-else", 201)] {
        let ip = std::net::Ipv4Addr::new(198, 51, 100, last);
        let r =
            crate::hypervisor::network::Reservation { vm: vm.into(), mac: crate::hypervisor::network::mac_for(ip), ip };
        h.hv.lock().dhcp.as_mut().unwrap().hosts.push(r);
    }
    // Once it has been stray longer than a provisioning may take (10 min by default).
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert!(hosts(&h).iter().any(|r| r.vm == "rv-small-999"), "not before");
    h.wait_for("the stray entry released by the sweep", Duration::from_secs(700), |_, hv| {
        let names: Vec<String> = hv.lock().dhcp.as_ref().unwrap().hosts.iter().map(|r| r.vm.clone()).collect();
        !names.contains(&"rv-small-999".to_string())
    })
    .await;
    // Meanwhile the two VMs never had a runner online and were replaced: every entry of
    // ours is a live VM's, and the other program's entry is untouched.
    let s = h.status().await;
    let ours: Vec<String> = hosts(&h).into_iter().map(|r| r.vm).filter(|n| n.starts_with("rv-")).collect();
    let live: Vec<String> = s.vms.iter().map(|v| v.name.clone()).collect();
    assert!(ours.iter().all(|n| live.contains(n)), "entries {ours:?}, vms {live:?}");
    assert!(hosts(&h).iter().any(|r| r.vm == "someone-else"));
    h.shutdown().await;
}

/// No credential ever passes through cloud-init (it keeps copies a job could read): in
/// token mode too the seed has nothing secret, and the registration token is made only once
/// the guest waits and goes over the bind port, in `config.sh`'s environment.
#[tokio::test(start_paused = true)]
async fn token_mode_credentials_come_over_the_bind_port_never_in_the_seed() {
    let mut h = harness("registration = \"token\"\naccept_token_exposure = true");
    h.hv.lock().guests_booting = true;
    h.deliver(JobAction::Queued, info(401, LABELS, None));
    let s = h.wait("a VM", |_, hv| hv.running().len() == 1).await;
    let vm = vm_for(&s, 401).unwrap();
    let seed = String::from_utf8_lossy(&h.hv.lock().seeds[&vm]).into_owned();
    assert!(!seed.contains("--token") && !seed.contains("runcmd"), "{seed}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!h.gh.lock().calls.iter().any(|c| c == "token"), "no token before the guest waits");
    assert!(h.hv.lock().delivered.is_empty());
    h.hv.lock().guests_booting = false;
    h.wait("bound", |_, hv| hv.lock().delivered.len() == 1).await;
    let (to, message) = h.hv.lock().delivered[0].clone();
    assert_eq!(to, vm);
    let v: serde_json::Value = serde_json::from_str(&message).unwrap();
    assert_eq!(v["files"], serde_json::json!({}), "{v}");
    assert_eq!(v["runcmd"][0]["env"]["ACTIONS_RUNNER_INPUT_TOKEN"], "REGTOKEN", "{v}");
    let m = h.metrics.render();
    assert!(m.contains(r#"runnervisor_job_runners_total{pool="small",path="cold"} 1"#), "{m}");
    h.run_job_on(&vm, 401);
    h.wait("served", |s, _| s.queued.is_empty() && s.vms.is_empty()).await;
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
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

/// An outage longer than one page of the hook's delivery log: the sync reads the log back
/// to the redelivery window, not just its newest 300 entries, and asks again for every
/// failed `workflow_job` delivery, the oldest first and 50 a sync; a request that fails is
/// asked again at the next; nothing is asked for twice once it was asked.
#[tokio::test(start_paused = true)]
async fn failed_deliveries_behind_hundreds_of_newer_ones_are_redelivered_once() {
    let hooked = |c: &mut Config| c.github.hook = Some(crate::config::HookConfig::Organization { id: 1 });
    let h = harness_tweaked("", |_| {}, hooked);
    let now = h.clock.now();
    let delivery = |id: u64, age: u64, ok: bool| crate::github::DeliveryInfo {
        id,
        guid: format!("guid-{id}"),
        delivered_at: now - Duration::from_secs(age),
        status_code: if ok { 200 } else { 502 },
        redelivery: false,
        event: "workflow_job".into(),
        action: Some("queued".into()),
    };
    // 100 failed during an outage an hour ago; 400 went through after it.
    let mut log: Vec<_> = (1..=100).map(|i| delivery(i, 3600 + i, false)).collect();
    log.extend((101..=500).map(|i| delivery(i, 600 - i, true)));
    h.gh.lock().deliveries = log;
    // The first redelivery request fails: that sync stops there, the next asks from there.
    h.gh.lock().fail_calls.insert("redeliver", 1);
    let gh = h.gh.clone();
    // A sync every 5 s: one stopped by the failure, then 50 a sync.
    h.wait_for("the failed deliveries asked again", Duration::from_secs(60), move |_, _| {
        gh.lock().redelivered.len() >= 100
    })
    .await;
    let calls = h.gh.lock().calls.iter().filter(|c| *c == "redeliver").count();
    assert_eq!(calls, 101, "100 asked, and the one that failed");
    tokio::time::sleep(Duration::from_secs(30)).await;
    let mut asked = h.gh.lock().redelivered.clone();
    asked.sort();
    assert_eq!(asked, (1..=100).collect::<Vec<u64>>(), "each failed delivery asked for once");
    h.shutdown().await;
}

/// With a hook, a job without news is still asked about, at a low rate: a job that runs
/// for hours is asked about once an hour, not at every sync (a refresh that finds nothing
/// new counts as news).
#[tokio::test(start_paused = true)]
async fn a_long_running_job_is_asked_about_once_an_hour() {
    let hooked = |c: &mut Config| c.github.hook = Some(crate::config::HookConfig::Organization { id: 1 });
    let mut h = harness_tweaked("", |_| {}, hooked);
    h.deliver(JobAction::Queued, info(91, LABELS, None));
    // Another runner (not ours) takes it and runs it for hours.
    h.deliver(JobAction::InProgress, info(91, LABELS, Some("someone-else")));
    h.gh.lock().jobs.insert(
        91,
        crate::github::JobStatus {
            status: "in_progress".into(),
            conclusion: None,
            runner_name: Some("someone-else".into()),
        },
    );
    let asked = |h: &H| h.gh.lock().calls.iter().filter(|c| *c == "job").count();
    tokio::time::sleep(Duration::from_secs(3 * 3600 + 60)).await;
    let n = asked(&h);
    assert!((2..=4).contains(&n), "asked {n} times in 3 hours (syncs every 5 s)");
    h.shutdown().await;
}

/// With a hook, a pool's queued jobs are asked about once a runner of the pool has waited
/// online without a job for two syncs, not after the hour: GitHub gives a queued job to an
/// idle runner of its labels within seconds, so such jobs are likely gone (their run or
/// repository deleted, which sends no webhook). The oldest first, one per waiting runner
/// and sync, each dropped on a second 404; the VM goes as surplus once none is left,
/// instead of idling for the hour.
#[tokio::test(start_paused = true)]
async fn jobs_gone_while_a_runner_waits_are_asked_about_soon_one_per_runner() {
    let hooked = |c: &mut Config| c.github.hook = Some(crate::config::HookConfig::Organization { id: 1 });
    let mut h = harness_tweaked(
        "",
        |_| {},
        |c| {
            hooked(c);
            c.pools[0].max_vms = 1;
            c.pools[0].idle_timeout = Duration::from_secs(30);
        },
    );
    for id in [92, 93, 94] {
        h.deliver(JobAction::Queued, info(id, LABELS, None));
    }
    h.wait("a VM", |_, hv| hv.running() == ["rv-small-92"]).await;
    for id in [92, 93, 94] {
        h.gh.lock().jobs.remove(&id);
    }
    h.gh.set_runner("rv-small-92", true, false);
    let asked = |h: &H| h.gh.lock().calls.iter().filter(|c| *c == "job").count();
    // Idle from the next sync (every 5 s), asked after two more.
    h.wait_for("a job asked about", Duration::from_secs(30), |_, _| asked(&h) > 0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(asked(&h), 1, "one per waiting runner and sync");
    h.wait_for("the VM gone", Duration::from_secs(150), |s, hv| s.vms.is_empty() && hv.running().is_empty()).await;
    assert_eq!(asked(&h), 6, "each asked about twice (dropped on the second 404)");
    let (_, _, store) = h.shutdown().await;
    let jobs = store.load().unwrap().jobs;
    for id in [92, 93, 94] {
        assert!(
            matches!(&jobs[&id].state, JobState::Completed { conclusion, .. } if conclusion.as_deref() == Some("not_found")),
            "{id}: {:?}",
            jobs[&id].state
        );
    }
}

/// A job GitHub keeps queued while a runner of its pool waits online (its jobs delayed, or
/// its repository not allowed in the runner group) is asked about again only after a
/// doubling back-off, not at every other sync.
#[tokio::test(start_paused = true)]
async fn a_job_github_keeps_queued_beside_a_waiting_runner_is_asked_about_ever_less_often() {
    let hooked = |c: &mut Config| c.github.hook = Some(crate::config::HookConfig::Organization { id: 1 });
    let mut h = harness_tweaked("", |_| {}, hooked);
    h.deliver(JobAction::Queued, info(95, LABELS, None));
    h.wait("its VM", |_, hv| hv.running() == ["rv-small-95"]).await;
    h.gh.set_job_queued(95);
    h.gh.set_runner("rv-small-95", true, false);
    let asked = |h: &H| h.gh.lock().calls.iter().filter(|c| *c == "job").count();
    // Syncs every 5 s: asked after two (10 s idle), then 10, 20, 40 and 80 s later.
    tokio::time::sleep(Duration::from_secs(160)).await;
    let n = asked(&h);
    assert!((3..=5).contains(&n), "asked {n} times in 160 s");
    assert!(h.status().await.queued.iter().any(|q| q.job_id == 95), "still queued: kept");
    h.shutdown().await;
}

/// Without a hook, a job long in a backlog (its asks backed off to minutes) that GitHub
/// then forgets is learned within a few syncs once a runner waits for it: asks beside a
/// waiting runner are not held by the backlog's back-off.
#[tokio::test(start_paused = true)]
async fn a_backlog_job_gone_while_a_runner_waits_is_learned_soon() {
    let mut h = harness_tweaked(
        "",
        |_| {},
        |c| {
            c.pools[0].max_vms = 1;
            c.pools[0].idle_timeout = Duration::from_secs(30);
        },
    );
    for id in [96, 97] {
        h.gh.set_job_queued(id);
        h.deliver(JobAction::Queued, info(id, LABELS, None));
    }
    h.wait("a VM", |_, hv| hv.running() == ["rv-small-96"]).await;
    h.deliver(JobAction::InProgress, info(96, LABELS, Some("rv-small-96")));
    // 97 waits in the backlog for 25 minutes: its asks back off to the 15-minute recheck.
    tokio::time::sleep(Duration::from_secs(1500)).await;
    h.gh.lock().jobs.remove(&97);
    h.run_job_on("rv-small-96", 96);
    h.wait_for("a VM for 97", Duration::from_secs(60), |_, hv| hv.running() == ["rv-small-97"]).await;
    h.gh.set_runner("rv-small-97", true, false);
    // Idle from the next sync, asked after two more, dropped on the second 404 two syncs
    // later, then surplus for idle_timeout.
    h.wait_for("the VM gone", Duration::from_secs(90), |s, hv| s.vms.is_empty() && hv.running().is_empty()).await;
    h.shutdown().await;
}

/// A VM that dies while its runner runs a job (a crash) goes at once, its runner busy at
/// GitHub (it holds nothing of the host's, nor a place under the caps); the runner's
/// registration goes once GitHub frees it, also when the job's completion (GitHub failing
/// the job of a runner that died) says "success": that completion is no sign that the
/// runner removed itself, as an ephemeral runner that finished its job does. (The
/// simulator found such a registration outliving its job, offline.)
#[tokio::test(start_paused = true)]
async fn a_crashed_vms_runner_is_deleted_though_its_job_completed_meanwhile() {
    let mut h = harness("");
    h.crash_running(51).await;
    h.wait_for("the VM gone", Duration::from_secs(30), |s, _| s.vms.is_empty()).await;
    assert_eq!(h.gh.runner_names(), ["rv-small-51"], "busy: kept for now");
    // The job ends (as it ended, "success", so that only the VM's going tells); the
    // runner's registration stays, offline.
    h.gh.set_runner("rv-small-51", false, false);
    h.complete(51, Some("rv-small-51"), "success");
    let gh = h.gh.clone();
    h.wait_for("its registration gone", Duration::from_secs(5 * 60), |_, _| gh.runner_names().is_empty()).await;
    h.shutdown().await;
}

/// A teardown that keeps failing (libvirt refuses the destroy; the runner busy at GitHub
/// until it fails the runner's job, minutes later) is tried again ever less often: after
/// 10 s, doubling up to 5 minutes, not six times a minute; and at once when the job's end
/// frees the runner.
#[tokio::test(start_paused = true)]
async fn a_teardown_that_keeps_failing_is_retried_ever_less_often() {
    let mut h = harness("");
    h.hv.lock().fail_teardowns = u32::MAX;
    h.crash_running(54).await;
    let deletes = |h: &H| h.gh.lock().calls.iter().filter(|c| *c == "delete").count();
    // Tried at 0, 10, 30, 70, 150, 310 and 610 s.
    tokio::time::sleep(Duration::from_secs(600)).await;
    let n = deletes(&h);
    assert!((5..=7).contains(&n), "{n} deletions asked for in 10 minutes");
    // GitHub fails the job: the runner is free, and goes at once (not after the back-off).
    h.hv.lock().fail_teardowns = 0;
    h.gh.set_runner("rv-small-54", false, false);
    h.complete(54, Some("rv-small-54"), "failure");
    h.wait_for("the VM gone", Duration::from_secs(5), |s, _| s.vms.is_empty()).await;
    let (gh, _, _) = h.shutdown().await;
    assert!(gh.runner_names().is_empty(), "{:?}", gh.runner_names());
}

/// A job that failed (or was cancelled) because its runner died unseen (its VM paused on
/// a full disk, the event lost) ends with its runner's registration kept at GitHub,
/// offline: its VM's teardown deletes it ("not found" when GitHub did remove it), also
/// when its pool was removed meanwhile (no longer a name the sync takes for the agent's).
#[tokio::test(start_paused = true)]
async fn a_failed_jobs_runner_is_deleted_with_its_vm() {
    for (id, conclusion) in [(52, "failure"), (53, "cancelled")] {
        let mut h = harness("");
        let name = format!("rv-small-{id}");
        h.deliver(JobAction::Queued, info(id, LABELS, None));
        h.wait("a VM", |_, hv| hv.running() == [name.as_str()]).await;
        h.deliver(JobAction::InProgress, info(id, LABELS, Some(&name)));
        h.complete(id, Some(&name), conclusion);
        h.reload(|c| c.pools = vec![big_pool(c)]).await;
        h.hv.stop(&name);
        h.wait_for("the VM gone", Duration::from_secs(30), |s, _| s.vms.is_empty()).await;
        let gh = h.gh.clone();
        h.wait_for("its registration gone", Duration::from_secs(30), move |_, _| gh.runner_names().is_empty()).await;
        h.shutdown().await;
    }
}

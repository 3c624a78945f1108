use super::*;

/// A store whose file system filled up takes writes again once there is room.
#[test]
fn a_store_writes_again_once_its_file_system_has_room() {
    let disk = disk::Disk::default();
    let store = Store::open_on(disk.clone()).unwrap();
    let event = |d: &str| crate::model::JobEvent {
        delivery: d.into(),
        action: crate::model::JobAction::Queued,
        job: crate::scheduler::fixtures::job_info(1, &["x"], None),
        received_at: std::time::SystemTime::UNIX_EPOCH,
    };
    assert!(store.accept(&event("d1")).unwrap());
    disk.set_full(true);
    let full = store.accept(&event("d2"));
    assert!(full.is_err(), "{full:?}");
    disk.set_full(false);
    assert!(!store.delivery_seen("d2").unwrap(), "a delivery whose write failed is not seen");
    let again = store.accept(&event("d3"));
    assert!(again.is_ok(), "{again:?}");
    assert!(!store.delivery_seen("d2").unwrap(), "a delivery whose write failed is not seen");
    assert!(store.accept(&event("d2")).unwrap(), "and is taken when it comes again");
    // The inbox is numbered on (the scheduler reads on from the last entry it applied),
    // also when it was emptied before the reopen.
    let entries = store.inbox(0, 100).unwrap();
    let last = entries.last().unwrap().0;
    let done = crate::store::Batch {
        inbox_done: entries.iter().map(|(seq, _)| *seq).collect(),
        // With a change of its own: a durable commit, which a reopen keeps.
        meta: vec![("k".into(), b"v".to_vec())],
        ..Default::default()
    };
    store.commit(&done).unwrap();
    disk.set_full(true);
    assert!(store.accept(&event("d4")).is_err());
    disk.set_full(false);
    assert!(store.accept(&event("d5")).unwrap());
    let after = store.inbox(last, 100).unwrap();
    assert_eq!(after.iter().map(|(_, e)| e.delivery.as_str()).collect::<Vec<_>>(), ["d5"], "read on from {last}");
}

/// The same seed runs the same way: the same trace, step for step (what makes a failing
/// seed a reproduction). Another seed runs another way.
#[test]
fn a_seed_replays_exactly() {
    let run = |seed| run_seed(Options { seed, steps: 150, faults: true });
    let (a, b, c) = (run(7), run(7), run(8));
    assert!(a.trace.len() > 20, "{:#?}", a.trace);
    assert_eq!(a.trace, b.trace);
    assert_eq!((a.steps, a.faults, a.jobs), (b.steps, b.faults, b.jobs));
    assert_ne!(a.trace, c.trace);
}

/// Virtual time stands while the world acts outside the runtime (where tokio's clock is
/// the real one): a delivery the world sends then is due at a virtual time, not at one
/// that depends on how long the host took (runs of one seed differed by it).
#[test]
fn virtual_time_stands_between_the_runtimes_turns() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    let time = Time::default();
    let inside = rt.block_on(async {
        time.start_incarnation(Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        time.now()
    });
    assert_eq!(inside, Duration::from_secs(3605));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(time.now(), inside, "outside the runtime");
    rt.block_on(async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(time.now(), Duration::from_secs(3606));
        time.end_incarnation();
    });
    assert_eq!(time.now(), Duration::from_secs(3606), "between incarnations");
}

/// A crash loses the writes since the last sync that the seed says: a lost resize comes
/// back to the old length with the old bytes, a kept write stays.
#[test]
fn a_crash_undoes_lost_writes_and_resizes() {
    use redb::StorageBackend;
    let disk = disk::Disk::default();
    disk.set_len(8).unwrap();
    disk.write(0, b"synced!!").unwrap();
    disk.sync_data().unwrap();
    // Grown and written, then shrunk below the synced length: all lost.
    disk.set_len(16).unwrap();
    disk.write(8, b"unsynced").unwrap();
    disk.set_len(4).unwrap();
    assert_eq!(disk.crash(|| Some(None)), 3);
    let mut out = [0u8; 8];
    disk.read(0, &mut out).unwrap();
    assert_eq!((disk.len(), &out), (8, b"synced!!"));
    // A write kept, the grow under it lost: the length is the old one, the bytes within it
    // the kept write's.
    disk.set_len(16).unwrap();
    disk.write(0, b"KEPT").unwrap();
    let mut lose = [false, true].into_iter();
    assert_eq!(disk.crash(|| lose.next().unwrap().then_some(None)), 1);
    disk.read(0, &mut out).unwrap();
    assert_eq!((disk.len(), &out), (8, b"KEPTed!!"));
}

/// A drain the agent dies writing has no answer, and its store may have kept it or not.
/// The operator finds it draining after its restart (`runnervisor status`) and undrains it
/// when meant; a drain the store lost is left alone. (The simulator took such a drain for
/// refused, and with it kept, a run's jobs waited for good: seed 3541 of 2,000 steps.)
#[test]
fn a_drain_the_agent_died_in_is_found_after_its_restart() {
    let (mut kept, mut lost) = (0, 0);
    for writes in 0..40 {
        // No fault drawn by the world's steps: only the one injected here.
        let mut sim = Sim::new(Options { seed: 1, steps: 0, faults: false });
        sim.start(Duration::ZERO);
        sim.advance(Duration::from_secs(5));
        sim.disk.die_after(writes);
        sim.inject(Fault::Drain);
        if sim.drain_unanswered.is_none() {
            // Taken: the agent's writes outlived the drain's commit.
            assert!(sim.undrain_at.is_some() && !sim.disk.dead(), "{:#?}", sim.trace);
            sim.end();
            break;
        }
        assert!(sim.disk.dead() && sim.trace.last().unwrap().contains("drain → no answer"), "{:#?}", sim.trace);
        let inc = sim.inc.take().unwrap();
        sim.stop(inc, false);
        // Every write it made is kept: whether the drain is depends on how far it got.
        sim.disk.crash(|| None);
        sim.start(Duration::from_secs(10));
        let draining = sim.status().unwrap().draining;
        let found = sim.trace.last().unwrap().contains("the agent is draining after its restart");
        assert_eq!((found, sim.undrain_at.is_some()), (draining, draining), "{:#?}", sim.trace);
        if draining {
            kept += 1;
            let at = sim.undrain_at.unwrap();
            sim.advance(at.saturating_sub(sim.t) + Duration::from_secs(1));
            sim.step += 1;
            sim.one_step();
            assert!(!sim.status().unwrap().draining, "{:#?}", sim.trace);
        } else {
            lost += 1;
        }
        assert_eq!(sim.violation, None);
        sim.end();
    }
    assert!(kept > 0 && lost > 0, "kept {kept}, lost {lost}: both cases");
}

/// An agent that died writing its store just before the world healed (at the last
/// step's checks, which ask for its status) is restarted before the operator undrains it;
/// the undrain reaches the new process, which takes it.
#[test]
fn an_agent_dead_when_the_world_heals_is_restarted_before_it_is_undrained() {
    let mut sim = Sim::new(Options { seed: 1, steps: 0, faults: false });
    sim.start(Duration::ZERO);
    sim.advance(Duration::from_secs(5));
    sim.inject(Fault::Drain);
    assert!(sim.undrain_at.is_some(), "{:#?}", sim.trace);
    // Its next write is its last.
    sim.disk.die_after(0);
    assert!(sim.disk.dead());
    sim.settle();
    assert_eq!(sim.violation, None, "{:#?}", sim.trace);
    assert!(sim.trace.iter().any(|l| l.contains("agent died writing its store")), "{:#?}", sim.trace);
    assert!(sim.trace.iter().any(|l| l.contains("undrain → ok")), "{:#?}", sim.trace);
    sim.end();
}

/// A guest's runner dies with its VM: a domain of the same name started again (as a
/// snapshot slot's domain is restored for the next job) runs another guest and does not
/// bring the runner back. (The world tied runners to domain names and gave a job to the runner of a
/// VM torn down before: "a running job's VM destroyed", seed 11441.)
#[test]
fn a_runner_dies_with_its_vm_not_with_its_domain_name() {
    use crate::hypervisor::Hypervisor;
    let mut sim = Sim::new(Options { seed: 1, steps: 0, faults: false });
    let vm = "rv-sim-1";
    let boot = |sim: &Sim| {
        let xml = format!(
            "<domain><name>{vm}</name><devices><disk><source file='/fake/{vm}.qcow2'/></disk></devices></domain>"
        );
        sim.fake.define(vm, &xml).unwrap();
        sim.fake.start(vm).unwrap();
    };
    let online = |sim: &Sim| sim.hub.lock().runner_named(vm).map(|r| r.online);
    boot(&sim);
    start_runner(&mut sim, vm);
    assert_eq!(online(&sim), Some(true), "{:#?}", sim.trace);
    sim.fake.teardown(vm);
    boot(&sim);
    sim.follow_guests(Duration::from_secs(60));
    sim.follow_guests(Duration::from_secs(90));
    assert_eq!(online(&sim), Some(false), "its registration outlives it, offline");
    assert_eq!(sim.violation, None);
}

/// A delivery the agent took counts as heard whatever GitHub's log says of it: one lost
/// (logged as failed) and posted once more was taken. (The world took such a job, which
/// the agent gave up with its reason, for one never served: seed 5092 of 1,000 steps.)
#[test]
fn a_delivery_the_agent_took_is_heard_whatever_the_log_says() {
    let mut sim = Sim::new(Options { seed: 1, steps: 0, faults: false });
    sim.start(Duration::ZERO);
    sim.advance(Duration::from_secs(5));
    let post = |sim: &mut Sim, lost: bool, twice: bool| {
        sim.new_jobs(1);
        let id = *sim.hub.lock().jobs.keys().last().unwrap();
        let (_, hook) = sim.hub.lock().outbox.pop().unwrap();
        let inc = sim.inc.take().unwrap();
        let app = inc.agent.as_ref().unwrap().app.clone();
        inc.rt.block_on(sim.post_hook(&app, &hook, lost, twice));
        sim.inc = Some(inc);
        let logged = sim.hub.lock().log.last().map(|d| d.status_code);
        (id, logged)
    };
    let (lost, logged) = post(&mut sim, true, false);
    assert_eq!(logged, Some(0));
    assert!(!sim.hub.lock().heard.contains(&lost), "never reached the agent");
    let (taken, logged) = post(&mut sim, true, true);
    assert_eq!(logged, Some(0), "GitHub's log says it failed");
    assert!(sim.hub.lock().heard.contains(&taken), "the agent took it");
    sim.advance(Duration::from_secs(5));
    let status = sim.status().unwrap();
    let known = |id: u64| status.queued.iter().any(|q| q.job_id == id) || status.vms.iter().any(|v| v.job_id == id);
    assert!(known(taken) && !known(lost), "{status:?}");
    sim.end();
}

/// A slot's domain runs one VM after another, none of its name: a boot restored into it is
/// the VM whose disk it runs (the reap check judges that VM), made when its binding says
/// (the job-lost check's age: the slot's domain was seen, and made, for the slot's VM). A
/// domain torn down while it ran is noted with its boot.
#[test]
fn a_boot_restored_into_a_slot_is_the_vm_whose_disk_it_runs() {
    use crate::hypervisor::{Hypervisor, VmMetadata};
    use std::path::Path;
    let sim = Sim::new(Options { seed: 1, steps: 0, faults: false });
    let (slot, vm) = ("rv-sim-s0", "rv-sim-7");
    let xml = format!(
        "<domain><name>{slot}</name><devices><disk><source file='/fake/{slot}.qcow2'/></disk></devices></domain>"
    );
    sim.hv.create_overlay(slot, Path::new("/g.qcow2"), 1).unwrap();
    sim.hv.define(slot, &xml).unwrap();
    sim.hv.start(slot).unwrap();
    sim.hv.save(slot).unwrap();
    sim.hv.restore(slot, Path::new(&format!("/fake/{vm}.qcow2")), Path::new("/l")).unwrap();
    let boot = sim.fake.lock().boots[slot];
    assert_eq!(sim.hv.arm().restored_as.get(&boot).map(String::as_str), Some(vm));
    sim.time.step_host_clock(Step(-3_600_000_000_000));
    let made = Duration::from_secs(42);
    let metadata = VmMetadata {
        job_id: 7,
        run_id: 70,
        repository: "o/r".into(),
        pool: "sim".into(),
        runner_name: vm.into(),
        // The host's clock, an hour behind the world's.
        created: time::epoch() + made - Duration::from_secs(3600),
        console_log: "/l".into(),
        job_url: String::new(),
        warm: false,
        host: None,
        made_from: None,
    };
    // The slot's own VM is not the one restored into its domain.
    assert!(sim.hv.describe(slot, slot, &metadata, "t", "d").is_err());
    sim.hv.describe(slot, vm, &metadata, "t", "d").unwrap();
    assert_eq!(sim.hv.arm().made.get(&boot), Some(&made));
    // Described again (a binding tried again) after the clock stepped back: its record's
    // time, read on the clock after the step, says nothing of when it was made.
    sim.time.step_host_clock(Step(-1_800_000_000_000));
    sim.hv.describe(slot, vm, &metadata, "t", "d").unwrap();
    assert_eq!(sim.hv.arm().made.get(&boot), Some(&made));
    sim.hv.teardown(slot);
    assert_eq!(sim.hv.arm().torn_running, [(slot.to_string(), boot)]);
}

/// A VM on its way at a step of the host's clock is judged by when its domain was seen:
/// its metadata says when it was made on the clock before the step, which the world reads
/// with the clock after it. (A warm VM whose start hung across a step was judged an hour
/// older than it was: "a timer held back", seed 21836 of 2,000 steps.)
#[test]
fn a_vm_on_its_way_at_a_clock_step_is_judged_by_when_it_was_seen() {
    let mut sim = Sim::new(Options { seed: 1, steps: 0, faults: false });
    sim.start(Duration::ZERO);
    let vm = loop {
        sim.new_jobs(1);
        sim.advance(Duration::from_secs(5));
        sim.see_domains();
        let status = sim.status().unwrap();
        if let Some(v) = status.vms.iter().find(|v| sim.domains_seen.contains_key(&v.name)) {
            break v.clone();
        }
        assert!(sim.t < Duration::from_secs(600), "no VM made: {:#?}", sim.trace);
    };
    let pool = sim.config.pool(&vm.pool).unwrap().clone();
    let bound = pool.max_lifetime + sim.config.reconcile.stop_grace + sim.config.reconcile.sweep_interval;
    // Seen an hour in; read after the step, its metadata says it was made at the start.
    let seen = Duration::from_secs(3600);
    sim.domains_seen.get_mut(&vm.name).unwrap().0 = seen;
    sim.domains_created.insert(vm.name.clone(), Duration::ZERO);
    sim.skewed.insert(vm.name.clone());
    let now = seen + bound + Duration::from_secs(590);
    sim.check_lifetimes(now, Duration::ZERO);
    assert_eq!(sim.violation, None);
    sim.end();
}

/// A call whose answer is lost took effect all the same: the runner GitHub registered (or
/// deleted) is there (or gone) while the agent's client saw its timeout pass; a read so
/// faulted is a timeout.
#[test]
fn a_call_whose_answer_is_lost_takes_effect() {
    use crate::github::GitHub;
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    let time = Time::default();
    let api_timeout = Duration::from_secs(30);
    let hub = SimGitHub {
        hub: Arc::new(std::sync::Mutex::new(Hub::new(
            time.clone(),
            api_timeout,
            crate::config::Scope::Organization("octo-org".into()),
        ))),
        disk: disk::Disk::default(),
    };
    rt.block_on(async {
        time.start_incarnation(Duration::ZERO);
        hub.lock().fault = Some((GhFault::LostAnswer, 3));
        let labels = vec!["self-hosted".to_string()];
        let before = tokio::time::Instant::now();
        let made = hub.generate_jit_config("rv-a-1", &labels, 1).await;
        assert!(matches!(made, Err(crate::github::GhError::Transport { .. })), "{made:?}");
        assert_eq!(before.elapsed(), api_timeout, "the client's timeout passed");
        let id = hub.lock().runner_named("rv-a-1").map(|r| r.id).expect("registered all the same");
        assert!(hub.list_runners().await.is_err(), "a read: a timeout");
        assert!(hub.delete_runner(id).await.is_err());
        assert!(hub.lock().runner_named("rv-a-1").is_none(), "deleted all the same");
        assert!(hub.lock().fault.is_none(), "three calls faulted");
        assert!(hub.list_runners().await.is_ok());
        time.end_incarnation();
    });
}

/// The agent makes and reaps no VM while its hypervisor is not ready (libvirt lost, and
/// no sweep answered since, which a call hung from before the world healed may hold up
/// for minutes): a runner is surplus only from when a status last said it was not.
/// (Seeds 49846 and 55044 of 1,000 steps: a listing hung 258 s and 262 s past the healing;
/// the runner was reaped its idle_timeout after the next sweep, and the world called that
/// too late.)
#[test]
fn a_runner_is_surplus_only_from_when_the_agents_hypervisor_is_ready() {
    use crate::hypervisor::Hypervisor;
    // What the agent's status says is noted: not ready while libvirt is lost, and when.
    let mut sim = Sim::new(Options { seed: 1, steps: 0, faults: false });
    sim.start(Duration::ZERO);
    sim.advance(Duration::from_secs(100));
    assert_eq!(sim.status().map(|s| s.libvirt_connected), Some(true));
    assert_eq!(sim.hv_unready_seen, None);
    sim.fake.lock().unavailable = true;
    sim.fake.send(HvEvent::Disconnected);
    sim.advance(Duration::from_secs(5));
    assert_eq!(sim.status().map(|s| s.libvirt_connected), Some(false));
    let lost = sim.t;
    assert!(lost >= Duration::from_secs(105), "{lost:?}");
    assert_eq!(sim.hv_unready_seen, Some(lost));
    sim.fake.lock().unavailable = false;
    sim.fake.send(HvEvent::Reconnected);
    sim.advance(Duration::from_secs(5));
    assert_eq!(sim.status().map(|s| s.libvirt_connected), Some(true), "a sweep answered");
    assert_eq!(sim.hv_unready_seen, Some(lost), "when it was last seen not ready");
    sim.end();

    // An idle runner of pool p, its idle_timeout 60 s; no agent to ask (no job it queues).
    let mut sim = Sim::new(Options { seed: 1, steps: 0, faults: false });
    let vm = "rv-p-1";
    let xml =
        format!("<domain><name>{vm}</name><devices><disk><source file='/fake/{vm}.qcow2'/></disk></devices></domain>");
    sim.fake.define(vm, &xml).unwrap();
    sim.fake.start(vm).unwrap();
    start_runner(&mut sim, vm);
    assert_eq!(sim.hub.lock().runner_named(vm).map(|r| r.online), Some(true), "{:#?}", sim.trace);
    sim.domains_seen.insert(vm.into(), (Duration::ZERO, "p".into()));
    sim.idle_timeouts.insert("p".into(), Duration::from_secs(60));
    let slack = sim.surplus_slack();
    let settled = Duration::from_secs(100);
    let ready = settled + Duration::from_secs(250);
    sim.hv_unready_seen = Some(ready);
    sim.check_surplus(settled, settled);
    sim.check_surplus(settled + Duration::from_secs(60) + slack + Duration::from_secs(1), settled);
    assert_eq!(sim.violation, None, "its hypervisor was not ready by then");
    sim.check_surplus(ready + Duration::from_secs(60) + slack + Duration::from_secs(1), settled);
    assert!(sim.violation.as_deref().is_some_and(|v| v.contains("surplus runner rv-p-1")), "{:?}", sim.violation);
}

/// The runner of domain `vm` (started) gets its command and comes online.
fn start_runner(sim: &mut Sim, vm: &str) {
    use crate::hypervisor::Hypervisor;
    let command =
        format!("{{\"vm\":\"{vm}\",\"runcmd\":[{{\"argv\":[\"./config.sh\",\"--labels\",\"self-hosted\"]}}]}}\n");
    sim.fake.deliver(vm, vm, command.as_bytes(), "ACK 1", Duration::from_secs(5)).unwrap();
    sim.follow_guests(Duration::ZERO);
    sim.follow_guests(Duration::from_secs(30));
}

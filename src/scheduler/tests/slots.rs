//! Snapshot slots: VMs saved once their guest waits, restored for jobs.

use super::*;

const SLOT: &str = "rv-small-s0";

fn ready(s: &Status) -> usize {
    s.pools[0].slots_ready
}

fn restored(s: &Status, job: u64) -> Option<(String, String)> {
    s.vms.iter().find(|v| v.job_id == job && v.slot.is_some()).map(|v| (v.name.clone(), v.slot.clone().unwrap()))
}

impl H {
    /// The runner of the VM restored from `slot` (named `vm`) takes job `id`, finishes it,
    /// and the guest powers off: the slot's domain stops.
    fn run_restored_job(&mut self, vm: &str, slot: &str, id: u64) {
        self.deliver(JobAction::InProgress, info(id, LABELS, Some(vm)));
        self.complete(id, Some(vm), "success");
        self.gh.lock().runners.retain(|_, r| r.name != vm);
        self.hv.stop(slot);
    }

    /// Job `id`, queued after a reload made the slot saved before wrong: no slot is ready
    /// and nothing is restored from it for 5 s.
    async fn no_old_slot_for(&mut self, id: u64) {
        self.deliver(JobAction::Queued, info(id, LABELS, None));
        let s = self.advance_for(Duration::from_secs(5)).await;
        assert_eq!(ready(&s), 0, "{s:#?}");
        assert_eq!(self.hv.lock().restored_total, 0, "not restored from the old slot: {s:#?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_slot_is_saved_with_no_credential_then_restores_a_vm_per_job_one_at_a_time() {
    let mut h = harness("snapshot_slots = 1");
    let s = h.wait("a slot saved", |s, hv| ready(s) == 1 && hv.running().is_empty()).await;
    assert!(s.vms.is_empty(), "nothing runs while a slot waits: {s:#?}");
    {
        let hv = h.hv.lock();
        for v in ["rv-small-s0.qcow2", "rv-small-s0-seed.img", "rv-small-s0.save"] {
            assert!(hv.volumes.contains(v), "{v}: {:?}", hv.volumes);
        }
        assert!(!hv.domains.contains_key(SLOT), "saved: undefined");
        assert!(hv.delivered.is_empty() && h.gh.runner_names().is_empty(), "saved before any credential");
        assert!(hv.dhcp.as_ref().unwrap().hosts.iter().any(|r| r.vm == SLOT), "the slot keeps its address");
    }
    h.deliver(JobAction::Queued, info(71, LABELS, None));
    h.deliver(JobAction::Queued, info(72, LABELS, None));
    let s = h.wait("one job restored, one cold", |s, hv| hv.lock().delivered.len() == 2 && s.vms.len() == 2).await;
    let (vm, slot) = restored(&s, 71).expect("the oldest job takes the slot");
    assert_eq!((vm.as_str(), slot.as_str()), ("rv-small-71", SLOT));
    assert_eq!(vm_for(&s, 72).as_deref(), Some("rv-small-72"), "the slot is in use: the next job boots");
    assert_eq!(ready(&s), 0);
    {
        let hv = h.hv.lock();
        assert_eq!(hv.restored_total, 1);
        assert!(hv.domains[SLOT].1.contains("/fake/rv-small-71.qcow2"), "restored onto the job's own overlay");
        // Delivered into the slot's domain, for the job's own runner name.
        let (domain, msg) = hv.delivered.iter().find(|(d, _)| d == SLOT).expect("delivered into the slot's domain");
        assert_eq!(domain, SLOT);
        assert!(msg.contains("\"vm\":\"rv-small-71\"") && msg.contains("\"entropy\""), "{msg}");
        assert!(hv.descriptions[SLOT].contains("(id 71,"), "virsh desc of the slot's domain names the job");
    }
    assert!(h.gh.runner_names().contains(&vm), "the runner is named after the job's VM, not the slot");
    h.run_restored_job(&vm, SLOT, 71);
    let s = h
        .wait("the restored VM gone, the slot free again", |s, hv| {
            ready(s) == 1 && !s.vms.iter().any(|v| v.name == vm) && !hv.lock().domains.contains_key(SLOT)
        })
        .await;
    {
        let hv = h.hv.lock();
        assert!(!hv.volumes.contains("rv-small-71.qcow2"), "its overlay is deleted: {:?}", hv.volumes);
        assert!(hv.volumes.contains("rv-small-s0.save") && hv.volumes.contains("rv-small-s0.qcow2"), "the slot stays");
        assert!(hv.dhcp.as_ref().unwrap().hosts.iter().any(|r| r.vm == SLOT), "and keeps its address");
    }
    assert_eq!(restored(&s, 71), None);
    // The next job is restored from the same slot.
    h.deliver(JobAction::Queued, info(73, LABELS, None));
    let s = h.wait("restored again", |s, hv| restored(s, 73).is_some() && hv.lock().delivered.len() == 3).await;
    assert_eq!(restored(&s, 73).unwrap().0, "rv-small-73");
    assert_eq!(h.hv.lock().restored_total, 2);
    let t = h.trace("rv-small-71").await;
    assert_eq!((t.kind(), t.job_id, t.reason.as_deref()), ("restored", Some(71), Some("stopped")), "{t:#?}");
    let m = h.metrics.render();
    assert!(m.contains("runnervisor_job_runners_total{pool=\"small\",path=\"restored\"} 2"), "{m}");
    assert!(m.contains("runnervisor_job_runners_total{pool=\"small\",path=\"cold\"} 1"), "{m}");
    assert!(!m.contains("runnervisor_slot_failures_total{"), "{m}");
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_job_waits_for_the_slot_a_vm_is_giving_back_and_boots_cold_once_that_hangs() {
    let mut h = harness("snapshot_slots = 1");
    h.wait("a slot saved", |s, _| ready(s) == 1).await;
    h.deliver(JobAction::Queued, info(101, LABELS, None));
    let s = h.wait("restored", |s, hv| restored(s, 101).is_some() && hv.lock().delivered.len() == 1).await;
    let (vm, _) = restored(&s, 101).unwrap();
    // Its job done, the VM goes, but its teardown takes a while (a slow libvirt).
    h.hv.lock().stall_teardowns = 1;
    h.run_restored_job(&vm, SLOT, 101);
    h.wait_advancing("its teardown begun", |s, _| s.vms.iter().any(|v| v.name == vm && v.state == "tearing_down"))
        .await;
    h.deliver(JobAction::Queued, info(102, LABELS, None));
    let s = h.advance_for(crate::scheduler::slots::RELEASE_WAIT / 2).await;
    assert_eq!(vm_for(&s, 102), None, "the job waits for the slot rather than boot: {s:#?}");
    assert_eq!(h.hv.lock().started_total, 1, "only the slot's VM ever booted");
    h.hv.lock().release_stalled = true;
    h.wait("restored from the slot given back", |s, hv| restored(s, 102).is_some() && hv.lock().delivered.len() == 2)
        .await;

    // A teardown that hangs past RELEASE_WAIT: the next job boots cold.
    {
        let mut hv = h.hv.lock();
        hv.release_stalled = false;
        hv.stall_teardowns = 1;
    }
    h.run_restored_job("rv-small-102", SLOT, 102);
    h.wait_advancing("its teardown begun", |s, _| {
        s.vms.iter().any(|v| v.name == "rv-small-102" && v.state == "tearing_down")
    })
    .await;
    h.deliver(JobAction::Queued, info(103, LABELS, None));
    let s = h.advance_for(crate::scheduler::slots::RELEASE_WAIT / 2).await;
    assert_eq!(vm_for(&s, 103), None, "{s:#?}");
    let s = h
        .poll("the job booted cold", crate::scheduler::slots::RELEASE_WAIT, true, |s, _| vm_for(s, 103).is_some())
        .await;
    assert_eq!(restored(&s, 103), None, "cold: {s:#?}");
    // Its provisioning may still be under way: it starts (the slot's VM, then this one).
    // The slot's teardown still hangs: paused time moves only by hand meanwhile.
    h.wait_advancing("the cold VM started", |_, hv| hv.lock().started_total == 2).await;
    h.hv.lock().release_stalled = true;
    h.run_job_on("rv-small-103", 103);
    h.wait("served, the slot free", |s, _| s.queued.is_empty() && s.vms.is_empty() && ready(s) == 1).await;
    let m = h.metrics.render();
    assert!(m.contains("runnervisor_job_runners_total{pool=\"small\",path=\"restored\"} 2"), "{m}");
    assert!(m.contains("runnervisor_job_runners_total{pool=\"small\",path=\"cold\"} 1"), "{m}");
    h.shutdown().await;
}

/// A restored VM's binding is cut short (its domain paused on a full disk: torn down)
/// while its delivery is held up before it acts, and the job is restored from the slot
/// again. The held call, once it goes on, finds the next VM's disk in the slot's domain and
/// writes nothing: that guest runs its own runner only. (It ran both, and the first one's
/// job, ending, powered off the second one's: simulator seed 16105 of 633 steps.)
#[tokio::test(start_paused = true)]
async fn a_delivery_held_past_its_vms_teardown_does_not_reach_the_next_vm_restored_into_the_slot() {
    let mut h = harness("snapshot_slots = 1");
    h.wait("a slot saved", |s, _| ready(s) == 1).await;
    h.hv.lock().stall_deliveries_before = 1;
    h.deliver(JobAction::Queued, info(111, LABELS, None));
    h.wait_advancing("its delivery held up", |_, hv| hv.lock().stall_deliveries_before == 0).await;
    h.hv.io_pause(SLOT, true);
    let s = h
        .poll("restored again for the job", Duration::from_secs(180), true, |s, hv| {
            restored(s, 111).is_some_and(|(vm, _)| vm == "rv-small-111-2") && hv.lock().delivered.len() == 1
        })
        .await;
    assert!(!s.vms.iter().any(|v| v.name == "rv-small-111"), "the first VM is gone: {s:#?}");
    h.hv.lock().release_stalled = true;
    h.wait_advancing("the held delivery went on", |_, hv| hv.lock().not_this_vm == 1).await;
    {
        let hv = h.hv.lock();
        let into: Vec<_> =
            hv.delivered.iter().map(|(d, m)| (d.as_str(), m.contains("\"vm\":\"rv-small-111-2\""))).collect();
        assert_eq!(into, [(SLOT, true)], "one command in the slot's domain: its own VM's");
    }
    h.run_restored_job("rv-small-111-2", SLOT, 111);
    h.wait("served, the slot free", |s, _| s.queued.is_empty() && s.vms.is_empty() && ready(s) == 1).await;
    h.shutdown().await;
}

/// A slot recorded whose saved state the hypervisor no longer has (the agent removed it,
/// and died before its store kept that: simulator seed 15882; or an operator deleted it)
/// is removed and made again, not counted ready and restored from.
#[tokio::test(start_paused = true)]
async fn a_slot_whose_saved_state_is_gone_is_made_again() {
    let mut h = harness("snapshot_slots = 1");
    h.wait("a slot saved", |s, _| ready(s) == 1).await;
    {
        let mut hv = h.hv.lock();
        hv.volumes.remove("rv-small-s0.save");
        hv.saved.remove(SLOT);
    }
    h.wait_for("the slot made again", Duration::from_secs(60), |s, hv| {
        ready(s) == 1 && hv.lock().saved.contains_key(SLOT) && hv.lock().started_total == 2
    })
    .await;
    let m = h.metrics.render();
    assert!(m.contains("runnervisor_teardowns_total{reason=\"slot_gone\"} 1"), "{m}");
    assert!(m.contains("runnervisor_slot_failures_total{pool=\"small\",step=\"saved_state\"} 1"), "{m}");
    h.deliver(JobAction::Queued, info(121, LABELS, None));
    let s = h.wait("restored from it", |s, _| restored(s, 121).is_some()).await;
    assert_eq!(restored(&s, 121).unwrap().0, "rv-small-121", "{s:#?}");
    h.shutdown().await;
}

/// A running domain of a saved slot's name that no VM record holds (the record of the VM
/// restored into it lost) is destroyed by the sweep, one destroy at a time however many
/// sweeps find it, and the slot serves no job until that destroy reported: late, it would
/// kill the VM restored into the slot's domain meanwhile.
#[tokio::test(start_paused = true)]
async fn a_slot_domain_no_record_holds_is_destroyed_before_the_slot_serves_again() {
    let mut h = harness("snapshot_slots = 1");
    h.wait("a slot saved", |s, _| ready(s) == 1).await;
    h.hv.lock().stall_destroys = 2;
    let xml = format!(
        "<domain><name>{SLOT}</name><devices><disk><source file='/fake/rv-small-9.qcow2'/></disk></devices></domain>"
    );
    h.hv.define(SLOT, &xml).unwrap();
    h.hv.start(SLOT).unwrap();
    h.wait_advancing("its destroy under way, the slot held", |s, hv| ready(s) == 0 && hv.lock().stall_destroys == 1)
        .await;
    h.deliver(JobAction::Queued, info(131, LABELS, None));
    let s = h.advance_for(Duration::from_secs(5)).await;
    assert_eq!(h.hv.lock().stall_destroys, 1, "one destroy at a time: {s:#?}");
    assert_eq!(restored(&s, 131), None, "not restored into the slot's domain: {s:#?}");
    h.hv.lock().release_stalled = true;
    h.wait_advancing("the domain gone, the slot free", |s, hv| ready(s) == 1 && !hv.lock().domains.contains_key(SLOT))
        .await;
    assert!(h.hv.lock().saved.contains_key(SLOT), "the slot stays");
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_corrupt_save_file_sends_the_job_cold_and_the_slot_is_made_again() {
    let mut h = harness("snapshot_slots = 1");
    h.wait("a slot saved", |s, _| ready(s) == 1).await;
    // Its saved state is unreadable (truncated, or made by another QEMU).
    h.hv.lock().saved.clear();
    h.deliver(JobAction::Queued, info(81, LABELS, None));
    h.wait("the job boots cold", |s, _| vm_for(s, 81).as_deref() == Some("rv-small-81-2")).await;
    let m = h.metrics.render();
    assert!(m.contains("runnervisor_slot_failures_total{pool=\"small\",step=\"restore\"} 1"), "{m}");
    h.run_job_on("rv-small-81-2", 81);
    h.wait("the slot made again", |s, hv| ready(s) == 1 && hv.lock().saved.contains_key(SLOT)).await;
    let s = h.status().await;
    assert!(s.queued.is_empty(), "the job was served: {s:#?}");
    let m = h.metrics.render();
    assert!(m.contains("runnervisor_teardowns_total{reason=\"slot_gone\"}"), "{m}");
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_full_pool_during_a_save_backs_the_pool_off_and_loses_no_job() {
    let mut h = harness_full("snapshot_slots = 1", |_| {}, |_| {}, |hv| hv.fail_saves = 1, None);
    h.wait("the save failed", |_, _| {
        h.metrics.render().contains("runnervisor_slot_failures_total{pool=\"small\",step=\"save\"} 1")
    })
    .await;
    // The storage pool is full: the pool's cold VMs would fill it too.
    h.deliver(JobAction::Queued, info(91, LABELS, None));
    let s = h.advance_for(Duration::from_secs(1)).await;
    assert_eq!(vm_for(&s, 91), None, "the pool backs off: {s:#?}");
    h.wait("the job served cold after the back-off", |s, _| vm_for(s, 91).as_deref() == Some("rv-small-91")).await;
    {
        let hv = h.hv.lock();
        assert!(!hv.domains.contains_key(SLOT), "the failed slot's vm is gone");
    }
    h.wait_advancing("the slot made after the back-off", |s, _| ready(s) == 1).await;
    h.run_job_on("rv-small-91", 91);
    h.wait("served", |s, _| s.queued.is_empty() && s.vms.is_empty()).await;
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_image_change_remakes_a_slot_once_no_vm_uses_it() {
    let mut h = harness("snapshot_slots = 1");
    h.wait("a slot saved", |s, _| ready(s) == 1).await;
    h.deliver(JobAction::Queued, info(101, LABELS, None));
    h.wait("restored", |s, _| restored(s, 101).is_some()).await;
    // The image is rebuilt in place while a VM restored from the slot runs.
    std::fs::write(&h.config.pools[0].image, [crate::hypervisor::QCOW2_MAGIC.as_slice(), &[0u8; 28], b"v2"].concat())
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.hv.lock().saved.len(), 1, "the slot in use stays until its vm is gone");
    let made = h.hv.lock().started_total;
    h.run_restored_job("rv-small-101", SLOT, 101);
    h.wait("made again from the new image", |s, hv| ready(s) == 1 && hv.lock().started_total == made + 1).await;
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_slot_whose_making_a_restart_cut_short_is_made_again_and_lowering_the_count_removes_slots() {
    let h = harness_full("snapshot_slots = 2", |_| {}, |_| {}, |hv| hv.guests_booting = true, None);
    h.wait("two slot vms booting", |s, _| s.vms.iter().filter(|v| v.for_slot).count() == 2).await;
    let (gh, hv, store) = h.shutdown().await;
    hv.lock().guests_booting = false;
    let h = restart("snapshot_slots = 2", gh, hv.clone(), Some(store));
    let s = h.wait("both made again and saved", |s, hv| ready(s) == 2 && hv.running().is_empty()).await;
    assert!(s.vms.is_empty(), "{s:#?}");
    assert_eq!(hv.lock().started_total, 4, "the two cut short went, two new ones were saved");
    h.reload(|c| c.pools[0].snapshot_slots = 1).await;
    h.wait("one slot left", |s, hv| ready(s) == 1 && !hv.lock().volumes.contains("rv-small-s1.save")).await;
    assert!(hv.lock().volumes.contains("rv-small-s0.save"));
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_saved_slot_found_without_a_record_is_kept_if_right_and_removed_if_not() {
    let mut h = harness("snapshot_slots = 1");
    h.wait("a slot saved", |s, _| ready(s) == 1).await;
    let (cfg, image) = (h.config.clone(), h.config.pools[0].image.clone());
    let mut dirs = std::mem::take(&mut h.dirs);
    let (gh, hv, _) = h.shutdown().await;
    let made = hv.lock().started_total;
    // The store is lost; the slot's saved state, disk and address are on the host.
    let fresh_store = |dirs: &mut Vec<crate::test_support::TempDir>| {
        let dir = crate::test_support::tempdir();
        let store = Arc::new(Store::open(&dir).unwrap());
        dirs.push(dir);
        store
    };
    let store = fresh_store(&mut dirs);
    let mut h = start(cfg.clone(), gh, hv.clone(), None, store);
    let _ = h.tx.send(Event::Hv(HvEvent::Reconnected));
    h.wait("the saved slot adopted", |s, _| ready(s) == 1).await;
    assert_eq!(hv.lock().started_total, made, "kept, not made again");
    h.deliver(JobAction::Queued, info(111, LABELS, None));
    h.wait("a job restored from it", |s, hv| restored(s, 111).is_some() && hv.lock().restored_total == 1).await;
    h.run_restored_job("rv-small-111", SLOT, 111);
    h.wait("the slot free again", |s, _| ready(s) == 1 && s.vms.is_empty()).await;
    let (gh, hv, _) = h.shutdown().await;
    // Found again without a record, but the image changed meanwhile: it goes, and is made anew.
    std::fs::write(&image, [crate::hypervisor::QCOW2_MAGIC.as_slice(), &[0u8; 28], b"v2"].concat()).unwrap();
    let store = fresh_store(&mut dirs);
    let mut h = start(cfg, gh, hv.clone(), None, store);
    h.dirs = dirs;
    let _ = h.tx.send(Event::Hv(HvEvent::Reconnected));
    h.wait("made anew from the new image", |s, hv| ready(s) == 1 && hv.lock().started_total == made + 1).await;
    assert!(h.metrics.render().contains("runnervisor_teardowns_total{reason=\"slot_gone\"} 1"));
    h.shutdown().await;
}

/// One slot's failed restore sends its job cold at once and leaves the pool's other slots
/// serving: only the making of slots backs off, not the pool (whose back-off would hold
/// the cold VM and the VM restored from the healthy slot for seconds).
#[tokio::test(start_paused = true)]
async fn a_broken_slot_holds_neither_the_cold_boot_nor_the_other_slots() {
    let mut h = harness("snapshot_slots = 2");
    h.wait("two slots saved", |s, _| ready(s) == 2).await;
    h.hv.lock().saved.remove(SLOT);
    h.deliver(JobAction::Queued, info(121, LABELS, None));
    h.deliver(JobAction::Queued, info(122, LABELS, None));
    h.wait("the broken slot's restore failed", |_, _| {
        h.metrics.render().contains("runnervisor_slot_failures_total{pool=\"small\",step=\"restore\"} 1")
    })
    .await;
    let s = h
        .poll("at once: the job cold, the other restored and bound", Duration::from_secs(1), false, |s, hv| {
            vm_for(s, 121).is_some() && restored(s, 122).is_some() && hv.lock().delivered.len() == 2
        })
        .await;
    assert_eq!(vm_for(&s, 121).as_deref(), Some("rv-small-121-2"), "{s:#?}");
    assert_eq!(restored(&s, 122).map(|r| r.1).as_deref(), Some("rv-small-s1"), "{s:#?}");
    // Both served, the broken slot is made again (after its back-off) beside the other.
    h.run_job_on("rv-small-121-2", 121);
    h.run_restored_job("rv-small-122", "rv-small-s1", 122);
    h.wait("served, both slots ready", |s, _| s.queued.is_empty() && ready(s) == 2).await;
    h.shutdown().await;
}

/// A restored VM shares its slot's RNG state and clock until its guest freshens itself at
/// bind: slots are made only of an image whose manifest says its guest does.
#[tokio::test(start_paused = true)]
async fn slots_are_made_only_of_an_image_whose_guest_freshens_a_restored_vm() {
    let old = |bind_protocol: &'static str| {
        move |img: &std::path::Path| {
            let manifest = crate::images::manifest_path(img);
            if bind_protocol.is_empty() {
                std::fs::remove_file(manifest).unwrap();
            } else {
                let text = format!(
                    r#"{{"runner_version": "2.330.0", "runner_released": "2099-01-01", "bind_protocol": {bind_protocol}}}"#
                );
                std::fs::write(manifest, text).unwrap();
            }
        }
    };
    for (manifest, what) in [("", "no manifest"), ("2", "an older guest")] {
        let mut h = harness_with("snapshot_slots = 1", old(manifest));
        h.deliver(JobAction::Queued, info(131, LABELS, None));
        h.wait(what, |s, _| vm_for(s, 131).is_some()).await;
        let s = h.advance_for(Duration::from_secs(30)).await;
        assert_eq!(ready(&s), 0, "{what}: {s:#?}");
        assert!(!s.vms.iter().any(|v| v.for_slot), "{what}: no slot vm: {s:#?}");
        let m = h.metrics.render();
        assert!(m.contains("runnervisor_slot_failures_total{pool=\"small\",step=\"image\"} 1"), "{what}: {m}");
        h.shutdown().await;
    }
    let h = harness_with("snapshot_slots = 1", old("3"));
    h.wait("a current guest: a slot", |s, _| ready(s) == 1).await;
    h.shutdown().await;
}

/// An image file that cannot be read for a moment (being replaced, a mount away) says
/// nothing of what the slots were made from: they stay and serve.
#[tokio::test(start_paused = true)]
async fn an_image_unreadable_for_a_moment_leaves_the_slots_alone() {
    let mut h = harness("snapshot_slots = 1");
    h.wait("a slot saved", |s, _| ready(s) == 1).await;
    let image = h.config.pools[0].image.clone();
    let aside = image.with_extension("aside");
    std::fs::rename(&image, &aside).unwrap();
    // Sweeps go by (each looks at the image again).
    let s = h.advance_for(Duration::from_secs(120)).await;
    assert_eq!(ready(&s), 1, "the slot stays: {s:#?}");
    assert_eq!(h.hv.lock().started_total, 1, "and is not made again");
    std::fs::rename(&aside, &image).unwrap();
    h.deliver(JobAction::Queued, info(141, LABELS, None));
    h.wait("restored from it", |s, _| restored(s, 141).is_some()).await;
    h.shutdown().await;
}

/// A pool with a warm VM and a slot (the demo's): the first job takes the waiting warm VM,
/// the next is restored from the free slot rather than wait for the warm VM booting to
/// replace the first (a TCG boot takes 30-60 s, a restore seconds), and the third waits
/// for that warm VM rather than boot a VM of its own.
#[tokio::test(start_paused = true)]
async fn a_waiting_warm_vm_first_then_a_free_slot_then_a_warm_vm_still_booting() {
    let mut h = harness_tweaked("warm = 1\nsnapshot_slots = 1", |_| {}, |c| c.pools[0].max_vms = 4);
    h.wait("a warm VM waiting, a slot saved", |s, _| ready(s) == 1 && s.pools[0].warm_waiting == 1).await;
    // The warm VMs made from now on stay booting.
    h.hv.lock().guests_booting = true;
    h.deliver(JobAction::Queued, info(81, LABELS, None));
    h.wait("the warm VM bound, another booting", |s, hv| {
        hv.lock().delivered.len() == 1
            && s.vms.iter().any(|v| v.warm && v.job_id == 81)
            && s.vms.iter().any(|v| v.warm && v.job_id == 0)
    })
    .await;
    h.deliver(JobAction::Queued, info(82, LABELS, None));
    h.wait("the next restored from the slot", |s, hv| hv.lock().delivered.len() == 2 && restored(s, 82).is_some())
        .await;
    h.deliver(JobAction::Queued, info(83, LABELS, None));
    let s = h.advance_for(Duration::from_secs(30)).await;
    assert_eq!(vm_for(&s, 83), None, "the third waits for a warm VM booting: {s:#?}");
    assert!(s.vms.iter().all(|v| v.warm || v.slot.is_some()), "no cold VM: {s:#?}");
    h.hv.lock().guests_booting = false;
    h.wait("the third bound to the new warm VM", |s, hv| {
        hv.lock().delivered.len() == 3 && s.vms.iter().any(|v| v.warm && v.job_id == 83)
    })
    .await;
    h.shutdown().await;
}

/// A reload that points the pool at another image, not readable yet: the old image's slots
/// are wrong at once (a job boots rather than restore the old guest), not kept as they
/// would be for the same file unreadable a moment.
#[tokio::test(start_paused = true)]
async fn a_reload_to_an_image_not_readable_yet_serves_no_job_from_the_old_slots() {
    let mut h = harness("snapshot_slots = 1");
    h.wait("a slot saved", |s, _| ready(s) == 1).await;
    let image = h.config.pools[0].image.clone();
    let next = image.with_extension("next");
    h.reload(|c| c.pools[0].image = next.clone()).await;
    h.no_old_slot_for(151).await;
    // The new image arrives: the job is served from it.
    std::fs::copy(&image, &next).unwrap();
    std::fs::copy(crate::images::manifest_path(&image), crate::images::manifest_path(&next)).unwrap();
    h.wait_advancing("the job has a VM", |s, _| vm_for(s, 151).is_some()).await;
    h.shutdown().await;
}

/// A reload that changes the VM's shape while the image cannot be read for a moment: the
/// slots of the old shape are wrong at once, not kept as for the same files unreadable.
#[tokio::test(start_paused = true)]
async fn a_reload_to_another_vm_shape_while_the_image_is_unreadable_restores_no_old_slot() {
    let mut h = harness("snapshot_slots = 1");
    h.wait("a slot saved", |s, _| ready(s) == 1).await;
    let image = h.config.pools[0].image.clone();
    let aside = image.with_extension("aside");
    std::fs::rename(&image, &aside).unwrap();
    h.reload(|c| c.pools[0].memory_mib *= 2).await;
    h.no_old_slot_for(161).await;
    std::fs::rename(&aside, &image).unwrap();
    h.wait_advancing("the job has a VM", |s, _| vm_for(s, 161).is_some()).await;
    h.shutdown().await;
}

/// A save past its deadline holds its place until its call returns (the call may still
/// write the saved state), is counted once, and goes then, saved or not; the slot is made
/// again, and no saved state is left of the hung one.
#[tokio::test(start_paused = true)]
async fn a_save_past_its_deadline_holds_its_place_until_its_call_returns() {
    let h = harness_full(
        "snapshot_slots = 1",
        |_| {},
        |c| c.reconcile.provision_timeout = Duration::from_secs(5),
        |hv| hv.stall_saves = 1,
        None,
    );
    h.wait_advancing("the slot's save hung", |s, _| s.vms.iter().any(|v| v.name == SLOT && v.state == "saving")).await;
    let s = h.advance_for(Duration::from_secs(10)).await;
    let slot_vm = s.vms.iter().find(|v| v.name == SLOT);
    assert_eq!(slot_vm.and_then(|v| v.going.as_deref()), Some("provision_timeout"), "it waits for its call: {s:#?}");
    assert!(h.hv.lock().domains.contains_key(SLOT), "not torn down under its save: {s:#?}");
    let timeouts = r#"runnervisor_provision_failures_total{pool="small",step="timeout"} 1"#;
    assert!(h.metrics.render().contains(timeouts), "counted once");
    // The call returns, having saved: that saved state goes, and the slot is made anew.
    h.hv.lock().release_stalled = true;
    h.wait_advancing("the hung VM gone", |s, _| s.vms.iter().all(|v| v.name != SLOT || v.going.is_none())).await;
    let s = h.wait_for("a slot made again", Duration::from_secs(120), |s, _| ready(s) == 1).await;
    assert_eq!(s.pools[0].slots, 1, "{s:#?}");
    assert!(h.metrics.render().contains(timeouts), "counted once");
    assert!(h.metrics.render().contains(r#"runnervisor_teardowns_total{reason="provision_timeout"} 1"#));
    h.shutdown().await;
}

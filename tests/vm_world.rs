//! The test world on real VMs, without the agent: a qcow2 overlay of the test image made
//! through libvirt's storage API, a NoCloud seed (with nothing secret in it: the guest's
//! real cloud-init runs), a TCG domain on the fenced lab network; the guest unit waits on
//! the bind port, the credential made at that moment is delivered, and it runs the (fake)
//! runner against github-sim on the allow-listed gateway, which hands it a queued job; the
//! runner completes it and the guest powers off.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use common::*;
use runnervisor::cloudinit::{self, Credential, Fresh, RunnerSpec};
use runnervisor::hypervisor::{DomainState, HvError, Hypervisor};
use runnervisor::secret::Secret;

/// Makes a VM's credential once its guest waits.
type MakeCredential = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = Credential>>>>;

/// A JIT runner `name` with `labels`, made by the simulator as GitHub would.
async fn jit(sim: &Sim, name: &str, labels: &[&str]) -> Credential {
    let v = sim
        .api(
            reqwest::Method::POST,
            "/orgs/octo-org/actions/runners/generate-jitconfig",
            Some(serde_json::json!({"name": name, "runner_group_id": 1, "labels": labels})),
        )
        .await;
    Credential::Jit { encoded: Secret::new(v["encoded_jit_config"].as_str().unwrap()) }
}

/// Boots `name` with nothing secret in its seed and waits for its job: `make` makes the
/// credential only once the guest waits, and it is delivered over the bind port.
async fn boot(name: &str, sim: &Sim, job: u64, make: MakeCredential) {
    let img = test_image();
    let (hv, _events) = libvirt();
    // The fence the agent would put up, with the simulator allow-listed.
    let network = fenced_network(&format!("{name}-fence"), sim.handle.addr.port());
    let _fence = TestFence::up(&hv, &network);
    // Declared after the fence, so dropped before it: the VM goes first.
    let _cleanup = Cleanup { hv: hv.clone(), names: vec![name.to_string()] };
    let console_log = console_dir().join(format!("{name}.log"));

    let overlay = hv.create_overlay(name, &img.golden, 4 << 30).unwrap();
    let seed_img = test_seed(&hv, name);
    let seed_path = hv.create_seed(name, &seed_img).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&seed_path).unwrap().permissions().mode() & 0o077, 0, "seed readable by others");
    let xml = test_domain_xml_with(&hv, name, &overlay, &seed_path, &console_log, job, &network, true);
    hv.define(name, &xml).unwrap();
    let mut started = Instant::now();
    hv.start(name).unwrap();
    assert!(!hv.guest_waiting(name).unwrap(), "not waiting before it booted");
    wait_for("the guest to wait on its port", VM_TIMEOUT, async || hv.guest_waiting(name).unwrap().then_some(())).await;
    eprintln!("{name}: guest waiting {:.1}s after start", started.elapsed().as_secs_f64());
    assert!(sim.runners().await.is_empty(), "no runner exists for a waiting VM");
    started = Instant::now();
    let credential = make().await;
    let made = started.elapsed();
    let entropy = runnervisor::scheduler::provision::fresh_entropy().unwrap();
    let message = cloudinit::bind_message(&RunnerSpec {
        vm_name: name,
        runner_user: "runner",
        runner_dir: "/opt/actions-runner",
        credential: &credential,
        fresh: Some(Fresh { entropy: &entropy, now: std::time::SystemTime::now() }),
    })
    .unwrap();
    let ack = cloudinit::bind_ack(name);
    let at = Instant::now();
    hv.deliver(name, name, message.expose().as_bytes(), &ack, Duration::from_secs(10)).unwrap();
    eprintln!(
        "{name}: credential {:.0} ms, delivered and acknowledged {:.0} ms",
        made.as_secs_f64() * 1000.0,
        at.elapsed().as_secs_f64() * 1000.0
    );
    // Bound: its metadata (no longer warm, now this job's) and description are replaced
    // in place, as the agent does.
    let mut md = hv.list_vms().unwrap().into_iter().find(|v| v.name == name).unwrap().metadata.unwrap();
    assert!(md.warm && md.job_id == job, "{md:?}");
    md.warm = false;
    hv.describe(name, name, &md, "bound title", "bound to its job").unwrap();
    let md = hv.list_vms().unwrap().into_iter().find(|v| v.name == name).unwrap().metadata.unwrap();
    assert!(!md.warm && md.job_id == job, "{md:?}");
    let desc = run(std::process::Command::new("virsh").args(["-c", URI, "desc", name]));
    assert_eq!(desc.trim(), "bound to its job");
    // The guest closed its port: libvirt's view of it says so (a restarted agent relies
    // on this to tell a delivered binding from an interrupted one).
    let closed = Instant::now();
    wait_for("the guest's port closed", Duration::from_secs(10), async || {
        (!hv.guest_waiting(name).unwrap()).then_some(())
    })
    .await;
    eprintln!("{name}: port seen closed {:.0} ms after the ack", closed.elapsed().as_secs_f64() * 1000.0);
    // A second delivery finds nobody listening: the guest took one command and closed.
    let again = hv.deliver(name, name, b"{}\n", &ack, Duration::from_millis(1500));
    assert!(again.is_err(), "{again:?}");
    // Paused (a teardown asking GitHub about its runner), twice: listed as running (not a
    // disk error's pause), then running again; its runner goes on to run its job.
    let domstate = || run(std::process::Command::new("virsh").args(["-c", URI, "domstate", "--reason", name]));
    hv.suspend(name).unwrap();
    hv.suspend(name).unwrap();
    assert!(domstate().starts_with("paused (user)"), "{}", domstate());
    let listed = hv.list_vms().unwrap().into_iter().find(|v| v.name == name).unwrap();
    assert_eq!(listed.state, DomainState::Running);
    hv.resume(name).unwrap();
    hv.resume(name).unwrap();
    assert!(domstate().starts_with("running"), "{}", domstate());
    let gone = format!("{name}-none");
    assert!(hv.suspend(&gone).is_ok() && hv.resume(&gone).is_ok(), "no such domain: nothing to pause");

    let done = tokio::time::timeout(VM_TIMEOUT, sim.wait_completed(job, VM_TIMEOUT)).await;
    assert!(done.is_ok(), "job not completed; console:\n{}", console(&console_log));
    let job_done = started.elapsed();
    let j = sim.job(job).await;
    assert_eq!(j["conclusion"], "success", "{j}");
    assert_eq!(j["runner_name"], name);

    // The guest powers itself off when the runner exits.
    wait_for("the guest to power off", Duration::from_secs(60), async || {
        let vms = hv.list_vms().unwrap();
        let d = vms.iter().find(|v| v.name == name)?;
        (d.state == DomainState::Stopped).then_some(())
    })
    .await;
    eprintln!(
        "{name}: start -> job completed {:.1}s, -> powered off {:.1}s",
        job_done.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(sim.runners().await.is_empty(), "the ephemeral runner is de-registered after its job");

    assert!(hv.teardown(name).is_empty());
    let (doms, vols) = leftovers(&hv, name);
    assert!(doms.is_empty() && vols.is_empty(), "left: {doms:?} {vols:?}");
}

/// Token mode in a warm VM: the registration token is fetched only once the guest waits,
/// and `config.sh --ephemeral` then `run.sh` run from the delivered command lists.
#[tokio::test(flavor = "multi_thread")]
async fn token_mode_runner_in_a_warm_vm_registers_runs_a_job_and_powers_off() {
    let sim = std::sync::Arc::new(Sim::start(None, |_| {}).await);
    let name = format!("rv-world-w{}", unique());
    let job = sim.queue("octo-org/app", &["self-hosted", "linux", "world"], 2.0).await;
    let s = sim.clone();
    let make: MakeCredential = Box::new(move || {
        Box::pin(async move {
            let token = s
                .api(reqwest::Method::POST, "/repos/octo-org/app/actions/runners/registration-token", None)
                .await["token"]
                .as_str()
                .unwrap()
                .to_string();
            Credential::Token {
                url: format!("{}/octo-org/app", s.guest_url()),
                token: Secret::new(token),
                labels: vec!["self-hosted".into(), "linux".into(), "world".into()],
                runner_group: None,
                disable_update: true,
            }
        })
    });
    boot(&name, &sim, job, make).await;
}

/// A warm VM: boots with no credential, its guest waits on the bind port (libvirt says
/// so), then the JIT config made at that moment is delivered and acknowledged, and the
/// runner runs its job.
#[tokio::test(flavor = "multi_thread")]
async fn jit_runner_delivered_into_a_waiting_warm_vm_runs_a_job_and_powers_off() {
    let sim = std::sync::Arc::new(Sim::start(None, |_| {}).await);
    let name = format!("rv-world-w{}", unique());
    let job = sim.queue("octo-org/app", &["self-hosted", "jit"], 2.0).await;
    let (s, n) = (sim.clone(), name.clone());
    let make: MakeCredential = Box::new(move || Box::pin(async move { jit(&s, &n, &["self-hosted", "jit"]).await }));
    boot(&name, &sim, job, make).await;
}

/// The agent redefines its nwfilter when the allow-list or this host's addresses change
/// (and at every start): libvirt accepts that only under the filter's existing UUID.
#[tokio::test(flavor = "multi_thread")]
async fn the_fence_filter_is_redefined_in_place() {
    let (hv, _events) = libvirt();
    let name = format!("rv-world-fence-{}", unique());
    let network = |allow: &[&str]| runnervisor::config::NetworkConfig::Network {
        name: NETWORK.into(),
        filter: name.clone(),
        allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
    };
    let _fence = TestFence::up(&hv, &network(&[]));
    let (subnet, fixed) = lab_addressing(&hv);
    let (_, second) = runnervisor::fence::filters_for(&network(&["10.20.0.5:443"]), subnet, fixed, &[]).swap_remove(1);
    hv.define_filter(&name, &second).unwrap();
    let dumped = run(std::process::Command::new("virsh").args(["-c", URI, "nwfilter-dumpxml", &name]));
    assert!(dumped.contains("dstipaddr='10.20.0.5'"), "the second definition is in force:\n{dumped}");
    // A second agent process (fresh cache) redefines it too.
    let (other, _ev) = libvirt();
    let (_, first) = runnervisor::fence::filters_for(&network(&[]), subnet, fixed, &[]).swap_remove(1);
    other.define_filter(&name, &first).unwrap();
}

/// The building block of snapshot slots: a waiting guest (no credential anywhere) saved
/// with libvirt, then restored four times, each time onto a fresh qcow2 overlay of its disk
/// as it was saved, the saved domain XML changed in its disk path only. Each restored guest
/// waits on its bind port again, takes a JIT runner of its own and runs a job that reports
/// its kernel RNG's output and its clock. Bound as the agent binds (with fresh entropy and
/// the clock), two restores see different random bytes and the right time; bound without
/// (the control), two restores see the clock of the save, and their random bytes are
/// printed, not asserted: without `<genid/>` they were the same in both runs recorded,
/// with it (a new VM generation ID libvirt gives each restore) different in 2 of 3
/// (2026-12-02/03): a reseed of the guest kernel's own, not one to count on.
#[tokio::test(flavor = "multi_thread")]
async fn a_saved_waiting_guest_restores_onto_fresh_overlays_and_runs_a_job_each_time() {
    let sim = std::sync::Arc::new(Sim::start(None, |_| {}).await);
    let img = test_image();
    let (hv, _events) = libvirt();
    let name = format!("rv-world-s{}", unique());
    let network = fenced_network(&format!("{name}-fence"), sim.handle.addr.port());
    let _fence = TestFence::up(&hv, &network);
    // Bound with fresh entropy and the clock (as the agent does), then without (the control).
    let restores: Vec<(String, bool)> =
        ["r1", "r2", "c1", "c2"].iter().map(|t| (format!("{name}{t}"), t.starts_with('r'))).collect();
    let mut names = vec![name.clone()];
    names.extend(restores.iter().map(|(r, _)| r.clone()));
    // The scan's control: a restore saved once it holds its credential.
    let holder = format!("{name}p1");
    names.push(holder.clone());
    let _cleanup = Cleanup { hv: hv.clone(), names };
    let console_log = console_dir().join(format!("{name}.log"));

    let base = hv.create_overlay(&name, &img.golden, 4 << 30).unwrap();
    let seed_path = hv.create_seed(&name, &test_seed(&hv, &name)).unwrap();
    let xml = test_domain_xml_with(&hv, &name, &base, &seed_path, &console_log, 0, &network, true);
    hv.define(&name, &xml).unwrap();
    let booted = Instant::now();
    hv.start(&name).unwrap();
    wait_for("the guest to wait on its port", VM_TIMEOUT, async || hv.guest_waiting(&name).unwrap().then_some(()))
        .await;
    let boot = booted.elapsed();
    let at = Instant::now();
    hv.save(&name).unwrap();
    let saved = at.elapsed();
    let save = hv.volume_path(&runnervisor::hypervisor::save_volume_name(&name)).unwrap();
    let meta = std::fs::metadata(&save).unwrap();
    let size = meta.len();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o077, 0, "the saved state is readable by its owner alone");
    eprintln!(
        "{name}: booted to waiting {:.1}s; saved in {:.1}s, {} MiB",
        boot.as_secs_f64(),
        saved.as_secs_f64(),
        size >> 20
    );
    let state = |hv: &runnervisor::hypervisor::libvirt::Libvirt| {
        hv.list_vms().unwrap().into_iter().find(|v| v.name == name).map(|v| v.state)
    };
    assert_eq!(state(&hv), None, "saved: the domain is undefined, its disk and saved state stay");

    let report = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        "import json, sys, time, urllib.request\n\
         import socket\n\
         r = open('/dev/urandom', 'rb').read(32).hex()\n\
         v6 = sorted(set(l.split()[-1] for l in open('/proc/net/if_inet6')))\n\
         body = json.dumps({'role': 'fresh', 'tag': sys.argv[2], 'urandom': r, 'time': time.time(), 'host': socket.gethostname(), 'ipv6': v6}).encode()\n\
         req = urllib.request.Request(sys.argv[1] + '/_sim/reports', data=body, headers={'Content-Type': 'application/json'})\n\
         urllib.request.urlopen(req, timeout=10).read()\n",
    );
    let mut seen = std::collections::BTreeMap::new();
    let mut credentials = Vec::new();
    let mut genids = std::collections::BTreeSet::new();
    for (runner, fresh) in &restores {
        // The saved disk is the base: each restore writes to an overlay of its own.
        let overlay = hv.create_overlay(runner, &base, 4 << 30).unwrap();
        let at = Instant::now();
        let log = console_dir().join(format!("{runner}.log"));
        hv.restore(&name, &overlay, &log).unwrap();
        let restored = at.elapsed();
        let dumped = run(std::process::Command::new("virsh").args(["-c", URI, "dumpxml", &name]));
        assert!(dumped.contains(&overlay.to_string_lossy().into_owned()), "restored onto its overlay:\n{dumped}");
        assert!(dumped.contains(&log.to_string_lossy().into_owned()), "its own console log:\n{dumped}");
        // libvirt gives each restore a new VM generation ID.
        let genid = dumped.split("<genid>").nth(1).and_then(|r| r.split('<').next()).expect("a genid").to_string();
        assert!(genids.insert(genid), "a new genid at each restore:\n{dumped}");
        wait_for("the restored guest to wait on its port", Duration::from_secs(60), async || {
            hv.guest_waiting(&name).unwrap().then_some(())
        })
        .await;
        let waiting = at.elapsed();
        let script =
            format!("python3 -c \"import base64; exec(base64.b64decode('{report}'))\" {} {runner}", sim.guest_url());
        let job = sim
            .queue_with(
                serde_json::json!({"repo": "octo-org/app", "labels": ["self-hosted", "slot"], "script": script}),
            )
            .await;
        let credential = jit(&sim, runner, &["self-hosted", "slot"]).await;
        if let Credential::Jit { encoded } = &credential {
            credentials.push(encoded.expose().to_string());
        }
        let entropy = runnervisor::scheduler::provision::fresh_entropy().unwrap();
        let before = std::time::SystemTime::now();
        // The domain keeps the slot's name; the runner and the guest's hostname are the job's.
        let message = cloudinit::bind_message(&RunnerSpec {
            vm_name: runner,
            runner_user: "runner",
            runner_dir: "/opt/actions-runner",
            credential: &credential,
            fresh: fresh.then(|| Fresh { entropy: &entropy, now: std::time::SystemTime::now() }),
        })
        .unwrap();
        // A call made for the VM the slot's domain ran before (a binding cut short) finds
        // another VM's disk there and writes nothing.
        let stale = hv.deliver(&name, &name, b"{}\n", &cloudinit::bind_ack(&name), Duration::from_secs(1));
        assert!(matches!(stale, Err(HvError::NotThisVm { .. })), "{stale:?}");
        hv.deliver(&name, runner, message.expose().as_bytes(), &cloudinit::bind_ack(runner), Duration::from_secs(10))
            .unwrap();
        let done = tokio::time::timeout(VM_TIMEOUT, sim.wait_completed(job, VM_TIMEOUT)).await;
        assert!(done.is_ok(), "job not completed; console:\n{}", console(&console_log));
        let after = std::time::SystemTime::now();
        let reports: serde_json::Value =
            sim.http.get(format!("{}/_sim/reports", sim.url())).send().await.unwrap().json().await.unwrap();
        let r =
            reports.as_array().unwrap().iter().find(|r| r["tag"] == runner.as_str()).expect("the job's report").clone();
        let epoch = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let guest_time = r["time"].as_f64().unwrap();
        let skew =
            if guest_time < epoch(before) { guest_time - epoch(before) } else { (guest_time - epoch(after)).max(0.0) };
        eprintln!("{runner}: fresh={fresh} urandom {} clock off by {skew:+.1}s host {}", r["urandom"], r["host"]);
        // The test image keeps IPv6 off its NIC (images/README.md, "Boot time").
        assert_eq!(r["ipv6"], serde_json::json!(["lo"]), "IPv6 addresses only on loopback");
        if *fresh {
            assert_eq!(r["host"].as_str(), Some(runner.as_str()), "the hostname set at bind");
            assert!(skew.abs() <= 2.0, "the clock set at bind is off by {skew:.1}s");
        } else {
            assert!(skew < -2.0, "the control: a restored clock is the save's, {skew:.1}s behind");
        }
        seen.insert(runner.clone(), r["urandom"].as_str().unwrap().to_string());
        let j = sim.job(job).await;
        assert_eq!((j["conclusion"].as_str(), j["runner_name"].as_str()), (Some("success"), Some(runner.as_str())));
        eprintln!(
            "{runner}: restored in {:.1}s, waiting {:.1}s, job completed {:.1}s after the restore began",
            restored.as_secs_f64(),
            waiting.as_secs_f64(),
            at.elapsed().as_secs_f64()
        );
        wait_for("the restored guest to power off", Duration::from_secs(60), async || {
            state(&hv).is_none().then_some(())
        })
        .await;
        // Its overlay goes; the base and the save serve the next restore.
        let errors = hv.teardown(runner);
        assert!(errors.is_empty(), "teardown {runner}: {errors:?}");
    }
    assert!(sim.runners().await.is_empty(), "each ephemeral runner de-registered after its job");
    let bytes = |t: &str| &seen[&format!("{name}{t}")];
    assert_ne!(bytes("r1"), bytes("r2"), "fresh entropy at bind: each restored VM's kernel RNG is its own");
    eprintln!(
        "the control, bound without fresh entropy: same random bytes in both restores: {}",
        bytes("c1") == bytes("c2")
    );
    // Nothing of any job's credential reached the slot's saved state or its disk: neither a
    // whole credential nor what every credential carries (a whole one may straddle pages
    // that a saved state does not keep side by side).
    let markers = credential_markers();
    let found = |file: &std::path::Path, what: &[String]| {
        let bytes = std::fs::read(file).unwrap();
        what.iter().filter(|m| memchr::memmem::find(&bytes, m.as_bytes()).is_some()).cloned().collect::<Vec<_>>()
    };
    for file in [&save, &base] {
        assert_eq!(found(file, &credentials), Vec::<String>::new(), "a credential in {}", file.display());
        assert_eq!(found(file, &markers), Vec::<String>::new(), "a credential's marker in {}", file.display());
    }
    assert_eq!(credentials.len(), 4);
    // The control: the same scan finds a credential in the saved state of a guest that
    // holds one (restored once more, bound, then saved over the slot's state, which is
    // scanned above and used no more).
    let overlay = hv.create_overlay(&holder, &base, 4 << 30).unwrap();
    hv.restore(&name, &overlay, &console_dir().join(format!("{holder}.log"))).unwrap();
    wait_for("the control's guest to wait on its port", Duration::from_secs(60), async || {
        hv.guest_waiting(&name).unwrap().then_some(())
    })
    .await;
    let credential = jit(&sim, &holder, &["self-hosted", "slot"]).await;
    let entropy = runnervisor::scheduler::provision::fresh_entropy().unwrap();
    let message = cloudinit::bind_message(&RunnerSpec {
        vm_name: &holder,
        runner_user: "runner",
        runner_dir: "/opt/actions-runner",
        credential: &credential,
        fresh: Some(Fresh { entropy: &entropy, now: std::time::SystemTime::now() }),
    })
    .unwrap();
    hv.deliver(&name, &holder, message.expose().as_bytes(), &cloudinit::bind_ack(&holder), Duration::from_secs(10))
        .unwrap();
    let sim_ref = &sim;
    wait_for("the control's runner online", VM_TIMEOUT, async || {
        sim_ref.runners().await.iter().any(|r| r["name"] == holder.as_str() && r["status"] == "online").then_some(())
    })
    .await;
    hv.save(&name).unwrap();
    let seen = found(&save, &markers);
    assert!(!seen.is_empty(), "the scan finds what the credential a saved guest holds carries");
    eprintln!(
        "the control: a bound guest's saved state holds its credential's markers {seen:?}, found by the same scan"
    );
}

//! End to end on real VMs: github-sim sends signed workflow_job webhooks to the
//! `runnervisor` binary, which provisions real libvirt VMs (TCG) whose real cloud-init
//! runs the test image's runner against the simulator. Each test ends by checking that no
//! domain, volume or runner registration is left. The tests whose subject is not the boot
//! (scope, registration mode, the VM cap, a restart) restore their VMs from the snapshot
//! slots shared with the drills ([`slots`]); the warm-pool tests boot theirs.

mod common;

use std::time::{Duration, Instant};

use common::agent::*;
use common::slots;
use common::*;
use runnervisor::hypervisor::libvirt::Libvirt;
use runnervisor::hypervisor::{DomainState, Hypervisor};
use serde_json::json;

async fn world(spec: &AgentSpec, tweak: impl FnOnce(&mut github_sim::SimConfig)) -> (Sim, Agent) {
    let webhook_port = free_port();
    let sim = Sim::start(Some(format!("http://127.0.0.1:{webhook_port}/webhook")), tweak).await;
    let agent = Agent::configure(spec, sim.handle.addr.port(), webhook_port);
    (sim, agent)
}

async fn assert_no_runners(sim: &Sim, agent: &Agent) {
    // Ephemeral runners vanish after their job; anything else the agent deletes on teardown.
    wait_for("no runner registrations", Duration::from_secs(30), async || sim.runners().await.is_empty().then_some(()))
        .await;
    let _ = agent;
}

/// Teardown time per VM, from the agent's own log line.
fn teardown_ms(agent: &Agent) -> Vec<u64> {
    agent
        .log_text()
        .lines()
        .filter(|l| l.contains("vm torn down"))
        .filter_map(|l| l.split("duration_ms=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

/// One job in enterprise scope (a PAT of an enterprise owner, JIT runners registered at
/// `/enterprises/{slug}`, webhooks of an organization in that enterprise).
#[tokio::test(flavor = "multi_thread")]
async fn one_job_enterprise_scope_jit_mode_pat_auth() {
    let _slots = slots::take("e2e jit").await;
    let mut spec = AgentSpec::new(slots::POOL, &["self-hosted", "linux", "e2e-jit"]);
    spec.scope = "enterprise = \"octo-ent\"".into();
    spec.hook = None;
    slots::spec(&mut spec);
    let (sim, mut agent) = world(&spec, |c| c.enterprise = Some("octo-ent".into())).await;
    let (hv, _) = libvirt();
    agent.start().await;
    // The job searches its VM, as root, for its runner's credential (JIT config).
    let job = sim.queue_credential_search("octo-org/app", &["self-hosted", "Linux", "e2e-jit"]).await;
    let queued = Instant::now();
    let name = format!("rv-{}-{job}", slots::POOL);

    // While it runs: the domain (restored, so it has its slot's name) carries our metadata,
    // the job's once it is bound.
    let vm = wait_for("the VM", VM_TIMEOUT, async || {
        // Its pool's and its job's: a test beside it has VMs of another pool, whose GitHub
        // numbers its jobs from the same first id.
        hv.list_vms()
            .unwrap()
            .into_iter()
            .find(|v| v.metadata.as_ref().is_some_and(|m| m.job_id == job && m.pool == slots::POOL))
    })
    .await;
    assert!(runnervisor::hypervisor::slot_of_pool(&vm.name, slots::POOL).is_some(), "{}", vm.name);
    let md = vm.metadata.expect("runnervisor metadata on the domain");
    assert_eq!(
        (md.job_id, md.pool.as_str(), md.repository.as_str(), md.runner_name.as_str()),
        (job, slots::POOL, "octo-org/app", name.as_str())
    );
    let done = sim.wait_completed(job, VM_TIMEOUT).await;
    sim.assert_credential_not_found(&name).await;
    assert_eq!(done["conclusion"], "success", "{done}\n{}", agent.log_tail());
    assert_eq!(done["runner_name"], name);
    eprintln!("queued -> completed: {:.1}s", queued.elapsed().as_secs_f64());
    assert_eq!(sim.runner_history().await[&name]["scope"], "enterprises/octo-ent");
    let stats: serde_json::Value =
        reqwest::get(format!("{}/_sim/stats", sim.url())).await.unwrap().json().await.unwrap();
    let calls = stats["api_calls"].as_object().unwrap();
    assert_eq!(calls["POST /enterprises/{enterprise}/actions/runners/generate-jitconfig"], 1, "{calls:?}");
    // Runner endpoints at the enterprise only (a job's status is read from its repository).
    assert!(
        calls.keys().all(|k| !k.contains("/actions/runner") || k.contains(" /enterprises/{enterprise}/")),
        "{calls:?}"
    );

    wait_for("everything cleaned", Duration::from_secs(90), async || {
        let (d, v) = agent.leftovers(&hv);
        (d.is_empty() && v.is_empty()).then_some(())
    })
    .await;
    assert_no_runners(&sim, &agent).await;
    agent.assert_clean(&hv);
    // The teardown reports after the VM's domain and volumes are gone (its address is its
    // slot's and stays).
    let ms = wait_for("the teardown reported", Duration::from_secs(30), async || {
        let ms = teardown_ms(&agent);
        (!ms.is_empty()).then_some(ms)
    })
    .await;
    eprintln!("teardown durations (ms): {ms:?}");
    assert_eq!(ms.len(), 1, "{}", agent.log_tail());

    let metrics = agent.metrics().await;
    assert!(metrics.contains("runnervisor_jobs_received_total{pool=\"d-slots\"} 1"), "{metrics}");
    assert!(
        metrics.contains("runnervisor_jobs_completed_total{pool=\"d-slots\",conclusion=\"success\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("runnervisor_vms_started_total{pool=\"d-slots\"} 1"));
    assert!(metrics.contains("runnervisor_job_runners_total{pool=\"d-slots\",path=\"restored\"} 1"), "{metrics}");
    // Secrets never reach the log.
    let log = agent.log_text();
    assert!(!log.contains(PAT) && !log.contains(SECRET), "a secret reached the log");
    let status = agent.terminate();
    assert!(status.success(), "SIGTERM exits 0: {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_job_token_mode_app_auth() {
    let _slots = slots::take("e2e token").await;
    let mut spec = AgentSpec::new(slots::POOL, &["self-hosted", "e2e-token"]);
    spec.registration = "token";
    slots::spec(&mut spec);
    let keys = tempdir("app-key");
    let key = keys.join("app.pem");
    assert!(
        std::process::Command::new("openssl")
            .args(["genrsa", "-traditional", "-out"])
            .arg(&key)
            .arg("2048")
            .status()
            .unwrap()
            .success()
    );
    let pubkey = keys.join("app.pub");
    assert!(
        std::process::Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&pubkey)
            .status()
            .unwrap()
            .success()
    );
    let pem = std::fs::read_to_string(&pubkey).unwrap();
    spec.auth = Some(format!(
        "auth = {{ type = \"app\", app_id = 4242, installation_id = 77, private_key = {{ file = \"{}\" }} }}",
        key.display()
    ));
    spec.hook = Some("hook = { type = \"app\" }".into());
    let (sim, mut agent) = world(&spec, |c| {
        c.app = Some(github_sim::auth::AppKey::from_pem(4242, None, &pem).unwrap());
        c.installation_id = 77;
    })
    .await;
    let (hv, _) = libvirt();
    agent.start().await;
    // The registration token is valid for an hour for the whole scope: the job searches its
    // VM, as root, for it (it never went through cloud-init; config.sh has exited).
    let job = sim.queue_credential_search("octo-org/app", &["self-hosted", "e2e-token"]).await;
    let vm = format!("rv-{}-{job}", slots::POOL);
    let done = sim.wait_completed(job, VM_TIMEOUT).await;
    sim.assert_credential_not_found(&vm).await;
    assert_eq!(done["conclusion"], "success", "{}", agent.log_tail());
    assert_eq!(done["runner_name"], vm);
    // Its VM was restored from a shared slot: the registration token went in at bind.
    let restored = format!("runnervisor_job_runners_total{{pool=\"{}\",path=\"restored\"}} 1", slots::POOL);
    assert!(agent.metrics().await.contains(&restored), "restored: {}", agent.log_tail());
    wait_for("everything cleaned", Duration::from_secs(90), async || {
        let (d, v) = agent.leftovers(&hv);
        (d.is_empty() && v.is_empty()).then_some(())
    })
    .await;
    assert_no_runners(&sim, &agent).await;
    // The agent authenticated as the App: installation tokens were minted.
    let stats: serde_json::Value =
        sim.http.get(format!("{}/_sim/stats", sim.url())).send().await.unwrap().json().await.unwrap();
    assert!(
        stats["api_calls"]["POST /app/installations/{installation_id}/access_tokens"].as_u64().unwrap_or(0) >= 1,
        "{stats}"
    );
    assert!(
        stats["api_calls"]["POST /orgs/{org}/actions/runners/registration-token"].as_u64().unwrap_or(0) >= 1,
        "{stats}"
    );
    agent.assert_clean(&hv);
}

#[tokio::test(flavor = "multi_thread")]
async fn three_jobs_never_more_than_two_vms() {
    let _slots = slots::take("e2e cap").await;
    let mut spec = AgentSpec::new(slots::POOL, &["self-hosted", "e2e-cap"]);
    slots::spec(&mut spec);
    assert_eq!(spec.max_vms, 2);
    let prefix = format!("rv-{}-", slots::POOL);
    let (sim, mut agent) = world(&spec, |_| {}).await;
    let (hv, _) = libvirt();
    agent.start().await;
    let mut jobs = Vec::new();
    for _ in 0..3 {
        jobs.push(sim.queue("octo-org/app", &["self-hosted", "e2e-cap"], 2.0).await);
    }
    let mut peak = 0;
    let deadline = Instant::now() + VM_TIMEOUT * 2;
    loop {
        let running = hv
            .list_vms()
            .unwrap()
            .into_iter()
            .filter(|v| v.name.starts_with(&prefix) && v.state == DomainState::Running)
            .count();
        let domains = hv.list_vms().unwrap().into_iter().filter(|v| v.name.starts_with(&prefix)).count();
        peak = peak.max(running).max(domains);
        let mut all = true;
        for j in &jobs {
            all &= sim.job(*j).await["status"] == "completed";
        }
        if all {
            break;
        }
        assert!(Instant::now() < deadline, "jobs not completed:\n{}", agent.log_tail());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(peak <= 2, "{peak} VMs at once");
    assert_eq!(peak, 2, "two VMs at once");
    for j in &jobs {
        assert_eq!(sim.job(*j).await["conclusion"], "success");
    }
    wait_for("everything cleaned", Duration::from_secs(90), async || {
        let (d, v) = agent.leftovers(&hv);
        (d.is_empty() && v.is_empty()).then_some(())
    })
    .await;
    assert_no_runners(&sim, &agent).await;
    eprintln!("teardown durations (ms): {:?}", teardown_ms(&agent));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_webhooks_are_refused_and_make_no_vm() {
    let spec = AgentSpec::new("e2e-sig", &["self-hosted", "e2e-sig"]);
    let (sim, mut agent) = world(&spec, |_| {}).await;
    let (hv, _) = libvirt();
    agent.start().await;
    let body = json!({
        "action": "queued",
        "workflow_job": {"id": 1, "run_id": 2, "labels": ["self-hosted", "e2e-sig"], "runner_name": null},
        "repository": {"full_name": "octo-org/app"},
    })
    .to_string();
    let client = reqwest::Client::new();
    let post = |sig: Option<String>, body: String, event: &'static str| {
        let mut r = client
            .post(agent.webhook_url())
            .header("x-github-event", event)
            .header("x-github-delivery", format!("d-{}", unique()))
            .body(body);
        if let Some(s) = sig {
            r = r.header("x-hub-signature-256", s);
        }
        r.send()
    };
    let sign = |b: &str| github_sim::webhook::signature(SECRET.as_bytes(), b.as_bytes());
    let r = post(None, body.clone(), "workflow_job").await.unwrap();
    assert_eq!(r.status(), 401);
    let r = post(Some(github_sim::webhook::signature(b"wrong secret", body.as_bytes())), body.clone(), "workflow_job")
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("does not match"));
    let r = post(Some("sha256=nothex".into()), body.clone(), "workflow_job").await.unwrap();
    assert_eq!(r.status(), 401);
    // Refused from its Content-Length, unread: the client sees the 413, or the connection
    // closed under its upload if the answer loses the race (tests/listener.rs pins the 413).
    let big = "x".repeat(26 * 1024 * 1024);
    match post(Some(sign(&big)), big, "workflow_job").await {
        Ok(r) => assert_eq!(r.status(), 413),
        Err(e) => assert!(e.is_request() || e.is_body(), "not a refusal: {e}"),
    }
    let bad =
        r#"{"action":"queued","workflow_job":{"run_id":1,"labels":[]},"repository":{"full_name":"o/r"}}"#.to_string();
    let r = post(Some(sign(&bad)), bad, "workflow_job").await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("missing field `id`"));
    let r = post(Some(sign("{}")), "{}".into(), "ping").await.unwrap();
    assert_eq!(r.status(), 200);
    let r = post(Some(sign("{}")), "{}".into(), "push").await.unwrap();
    assert_eq!(r.status(), 202);
    tokio::time::sleep(Duration::from_secs(5)).await;
    agent.assert_clean(&hv);
    let metrics = agent.metrics().await;
    assert!(metrics.contains("runnervisor_webhook_signature_failures_total 3"), "{metrics}");
    assert!(!metrics.contains("runnervisor_vms_started_total{"), "no VM was started");
    drop(sim);
}

#[tokio::test(flavor = "multi_thread")]
async fn unmatched_labels_make_no_vm() {
    let spec = AgentSpec::new("e2e-nomatch", &["self-hosted", "e2e-nomatch"]);
    let (sim, mut agent) = world(&spec, |_| {}).await;
    let (hv, _) = libvirt();
    agent.start().await;
    // A subset, a superset and a different set: none equals the pool's labels.
    let a = sim.queue("octo-org/app", &["self-hosted"], 1.0).await;
    let b = sim.queue("octo-org/app", &["self-hosted", "e2e-nomatch", "gpu"], 1.0).await;
    let c = sim.queue("octo-org/app", &["windows"], 1.0).await;
    wait_for("the agent to log them", Duration::from_secs(20), async || {
        (agent.log_text().matches("no pool has exactly these labels").count() >= 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    agent.assert_clean(&hv);
    for j in [a, b, c] {
        assert_eq!(sim.job(j).await["status"], "queued");
    }
    assert!(sim.runners().await.is_empty(), "no runner was registered");
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_and_restarted_while_a_vm_runs() {
    let _slots = slots::take("e2e restart").await;
    let mut spec = AgentSpec::new(slots::POOL, &["self-hosted", "e2e-restart"]);
    slots::spec(&mut spec);
    let (sim, mut agent) = world(&spec, |_| {}).await;
    let (hv, _) = libvirt();
    agent.start().await;
    // The job's in_progress webhook is lost (failed in the hook's log), as when the agent
    // dies receiving it, and so are the redeliveries the agent asks for: it hears of the
    // start only from GitHub's runner list (busy, the job unnamed). In CI the restarted
    // agent gave the job a second VM 2 ms before the redelivery came.
    sim.fault(json!({"kind": "webhook_drop", "action": "in_progress", "count": 10, "redeliveries": true})).await;
    let job = sim.queue("octo-org/app", &["self-hosted", "e2e-restart"], 25.0).await;
    wait_for("the job to start on our VM", VM_TIMEOUT, async || {
        (sim.job(job).await["status"] == "in_progress").then_some(())
    })
    .await;
    agent.kill9();
    let vms: Vec<_> =
        hv.list_vms().unwrap().into_iter().filter(|v| v.name.starts_with(&format!("rv-{}-", slots::POOL))).collect();
    let running = vms.iter().filter(|v| v.state == DomainState::Running).count();
    assert_eq!(running, 1, "the VM outlives the agent: {vms:?}\n{}", agent.log_tail());
    tokio::time::sleep(Duration::from_secs(5)).await;
    agent.start().await;
    let done = sim.wait_completed(job, VM_TIMEOUT).await;
    assert_eq!(done["conclusion"], "success", "{done}\n{}", agent.log_tail());
    wait_for("everything cleaned", Duration::from_secs(90), async || {
        let (d, v) = agent.leftovers(&hv);
        (d.is_empty() && v.is_empty()).then_some(())
    })
    .await;
    assert_no_runners(&sim, &agent).await;
    // The teardown reports after the VM's domain is gone.
    wait_for("the teardown reported", Duration::from_secs(30), async || {
        agent.log_text().contains("vm torn down").then_some(())
    })
    .await;
    // Served once: one VM was ever made.
    let history = sim.runner_history().await;
    assert_eq!(history.as_object().unwrap().len(), 1, "{history}\n{}", agent.log_tail());
}

/// The pool's warm VMs whose guest waits, once the agent counts them as waiting too.
async fn waiting_warm_vms(agent: &Agent, hv: &Libvirt, pool: &str, n: usize) -> Vec<String> {
    let gauge = format!("runnervisor_vms{{pool=\"{pool}\",state=\"waiting\"}} {n}\n");
    wait_for(&format!("{n} warm VMs waiting"), VM_TIMEOUT, async || {
        if !agent.metrics().await.contains(&gauge) {
            return None;
        }
        let names: Vec<String> = hv
            .list_vms()
            .unwrap()
            .into_iter()
            .filter(|v| v.metadata.as_ref().is_some_and(|m| m.warm && m.pool == pool))
            .filter(|v| hv.guest_waiting(&v.name).unwrap_or(false))
            .map(|v| v.name)
            .collect();
        (names.len() == n).then_some(names)
    })
    .await
}

/// A warm pool end to end: a warm VM boots with no credential and no runner; a job takes
/// it (its JIT config made then, delivered over the bind port) and the pool is topped up;
/// the agent is killed with -9 while a warm VM waits, and the restarted agent re-adopts
/// and uses it; drain removes the waiting warm VM; nothing is left.
#[tokio::test(flavor = "multi_thread")]
async fn warm_pool_serves_jobs_at_once_survives_kill9_and_drains() {
    let pool = "e2e-warm";
    let mut spec = AgentSpec::new(pool, &["self-hosted", "e2e-warm"]);
    spec.pool_extra = "warm = 1".into();
    let (sim, mut agent) = world(&spec, |_| {}).await;
    let (hv, _) = libvirt();
    agent.start().await;
    let first = waiting_warm_vms(&agent, &hv, pool, 1).await.remove(0);
    assert!(first.starts_with("rv-e2e-warm-w"), "{first}");
    assert!(sim.runners().await.is_empty(), "a waiting warm VM has no runner registration");
    let md = hv.list_vms().unwrap().into_iter().find(|v| v.name == first).unwrap().metadata.unwrap();
    assert!(md.warm && md.job_id == 0, "{md:?}");

    // The job searches its VM, as root, for the JIT config delivered into it.
    let job = sim.queue_credential_search("octo-org/app", &["self-hosted", "e2e-warm"]).await;
    let done = sim.wait_completed(job, VM_TIMEOUT).await;
    sim.assert_credential_not_found(&first).await;
    assert_eq!(done["conclusion"], "success", "{done}\n{}", agent.log_tail());
    let (secs, runner) = sim.queued_to_online(job).await;
    assert_eq!(runner, first, "the waiting warm VM served the job");
    eprintln!("warm hit: queued -> runner online {secs:.2}s");
    let metrics = agent.metrics().await;
    assert!(metrics.contains("runnervisor_job_runners_total{pool=\"e2e-warm\",path=\"warm\"} 1"), "{metrics}");
    assert!(!metrics.contains("path=\"cold\""), "{metrics}");

    // Topped up: a second warm VM waits. The agent dies; its successor re-adopts it.
    let second = waiting_warm_vms(&agent, &hv, pool, 1).await.remove(0);
    assert_ne!(second, first);
    agent.kill9();
    agent.start().await;
    assert_eq!(waiting_warm_vms(&agent, &hv, pool, 1).await, std::slice::from_ref(&second), "re-adopted, not replaced");
    let job2 = sim.queue("octo-org/app", &["self-hosted", "e2e-warm"], 3.0).await;
    let done = sim.wait_completed(job2, VM_TIMEOUT).await;
    assert_eq!(done["conclusion"], "success", "{done}\n{}", agent.log_tail());
    let (secs, runner) = sim.queued_to_online(job2).await;
    assert_eq!(runner, second, "the re-adopted warm VM served the job");
    eprintln!("warm hit after kill -9: queued -> runner online {secs:.2}s");

    // Drain: the next warm VM (waiting or still booting) goes; nothing is made again.
    let out = agent.cli(&["drain"]);
    assert!(out.status.success(), "{out:?}");
    wait_for("everything cleaned", Duration::from_secs(120), async || {
        let (d, v) = leftovers(&hv, "rv-e2e-warm-");
        (d.is_empty() && v.is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    agent.assert_clean(&hv);
    assert_no_runners(&sim, &agent).await;
    let history = sim.runner_history().await;
    assert_eq!(history.as_object().unwrap().len(), 2, "one runner per job, none for waiting VMs: {history}");
    let log = agent.log_text();
    assert!(!log.contains(PAT) && !log.contains(SECRET) && !log.contains("runcmd"), "a secret reached the log");
    assert!(!log.contains("cannot update the bound warm vm's description"), "{}", agent.log_tail());
    assert_eq!(log.matches("warm vm bound: its runner starts now").count(), 2, "{}", agent.log_tail());
    assert!(agent.terminate().success());
}

/// A warm VM whose guest ignores its delivery (the test image's `rvtest.deaf` switch) is
/// destroyed within `bind_timeout`, the JIT runner made for it deleted, and the job boots a
/// VM of its own (cold).
#[tokio::test(flavor = "multi_thread")]
async fn a_warm_vm_that_ignores_its_delivery_is_replaced_and_the_job_served_cold() {
    let pool = "e2e-deaf";
    let mut spec = AgentSpec::new(pool, &["self-hosted", "e2e-deaf"]);
    spec.pool_extra =
        "warm = 1\nbind_timeout = \"5s\"\ncmdline = \"root=LABEL=root rw console=ttyS0 quiet rvtest.deaf\"".into();
    let (sim, mut agent) = world(&spec, |_| {}).await;
    let (hv, _) = libvirt();
    agent.start().await;
    let deaf = waiting_warm_vms(&agent, &hv, pool, 1).await.remove(0);
    let job = sim.queue("octo-org/app", &["self-hosted", "e2e-deaf"], 2.0).await;
    let done = sim.wait_completed(job, VM_TIMEOUT).await;
    assert_eq!(done["conclusion"], "success", "{done}\n{}", agent.log_tail());
    let (secs, runner) = sim.queued_to_online(job).await;
    assert_eq!(runner, format!("rv-e2e-deaf-{job}"), "served cold");
    eprintln!("after a failed warm delivery: queued -> runner online {secs:.1}s (cold)");
    assert!(hv.list_vms().unwrap().iter().all(|v| v.name != deaf), "the deaf VM is gone");
    let history = sim.runner_history().await;
    assert_eq!(history[&deaf]["deleted_by_api"], true, "its JIT registration was deleted: {history}");
    assert_eq!(history[&deaf]["came_online"], false, "{history}");
    let metrics = agent.metrics().await;
    assert!(metrics.contains("runnervisor_bind_failures_total{pool=\"e2e-deaf\",step=\"delivery\"} 1"), "{metrics}");
    assert!(metrics.contains("runnervisor_job_runners_total{pool=\"e2e-deaf\",path=\"cold\"} 1"), "{metrics}");
    assert!(agent.cli(&["drain"]).status.success());
    wait_for("everything cleaned", Duration::from_secs(120), async || {
        let (d, v) = leftovers(&hv, "rv-e2e-deaf-");
        (d.is_empty() && v.is_empty()).then_some(())
    })
    .await;
    agent.assert_clean(&hv);
    assert_no_runners(&sim, &agent).await;
    assert!(agent.terminate().success());
}

/// The credential search's base64 markers find the runner's token wherever it sits in
/// what was encoded (the bind message carries the runner's files in base64).
#[test]
fn base64_forms_find_a_marker_at_any_offset() {
    use base64::Engine;
    let forms = base64_forms(RUNNER_MARKER);
    assert!(forms.iter().all(|f| f.len() >= 24), "{forms:?}");
    for pad in 0..7 {
        let text = format!("{}{{\"token\": \"{RUNNER_MARKER}abc\"}}", "x".repeat(pad));
        let enc = base64::engine::general_purpose::STANDARD.encode(text);
        assert!(forms.iter().any(|f| enc.contains(f.as_str())), "offset {pad}: {enc} {forms:?}");
    }
}

/// A pool that is a runner scale set, and no webhook at all (the simulator sends none):
/// the jobs GitHub assigns to the set are served from the pool's snapshot slots, each
/// once, by runners the set made (their JIT configs from the set, not the REST API); the
/// job searching its VM finds no credential; nothing is left; the agent's restart opens a
/// session again at once (it deleted its own when it stopped).
#[tokio::test(flavor = "multi_thread")]
async fn a_scale_set_pool_serves_its_jobs_with_no_webhook_at_all() {
    let _slots = slots::take("e2e scale set").await;
    let mut spec = AgentSpec::new(slots::POOL, &["self-hosted", "linux", "e2e-ss"]);
    spec.pool_extra = "intake = \"scale_set\"\nscale_set_name = \"rv-e2e-ss\"\n".into();
    spec.hook = None;
    slots::spec(&mut spec);
    let sim = Sim::start(None, |_| {}).await;
    let mut agent = Agent::configure(&spec, sim.handle.addr.port(), free_port());
    let (hv, _) = libvirt();
    agent.start().await;
    // `runs-on: rv-e2e-ss`: the set's name.
    let first = sim.queue_credential_search("octo-org/app", &["rv-e2e-ss"]).await;
    let second = sim.queue("octo-org/app", &["rv-e2e-ss"], 2.0).await;
    for job in [first, second] {
        let done = sim.wait_completed(job, VM_TIMEOUT).await;
        assert_eq!(done["conclusion"], "success", "{done}\n{}", agent.log_tail());
        let runner = done["runner_name"].as_str().unwrap().to_string();
        assert!(runner.starts_with("rv-d-slots-"), "{runner}");
        if job == first {
            sim.assert_credential_not_found(&runner).await;
        }
    }
    wait_for("everything cleaned", Duration::from_secs(90), async || {
        let (d, v) = agent.leftovers(&hv);
        (d.is_empty() && v.is_empty()).then_some(())
    })
    .await;
    assert_no_runners(&sim, &agent).await;
    agent.assert_clean(&hv);
    let deliveries: serde_json::Value =
        reqwest::get(format!("{}/_sim/deliveries", sim.url())).await.unwrap().json().await.unwrap();
    assert!(
        deliveries.as_array().unwrap().iter().all(|d| d["status_code"].as_u64().unwrap_or(0) != 202),
        "no webhook reached the agent: {deliveries}"
    );
    let stats: serde_json::Value =
        reqwest::get(format!("{}/_sim/stats", sim.url())).await.unwrap().json().await.unwrap();
    let calls = stats["api_calls"].as_object().unwrap();
    assert_eq!(calls.get("scaleset generatejitconfig").and_then(|v| v.as_u64()), Some(2), "{calls:?}");
    assert!(!calls.keys().any(|k| k.contains("actions/runners/generate-jitconfig")), "{calls:?}");
    eprintln!("scale set API calls: {calls:?}");
    let metrics = agent.metrics().await;
    assert!(metrics.contains("runnervisor_job_runners_total{pool=\"d-slots\",path=\"restored\"} 2"), "{metrics}");
    assert!(
        metrics.contains("runnervisor_jobs_completed_total{pool=\"d-slots\",conclusion=\"success\"} 2"),
        "{metrics}"
    );
    // Stopped cleanly, it let its session go: started again, it takes the next job.
    assert!(agent.terminate().success());
    agent.start().await;
    let third = sim.queue("octo-org/app", &["rv-e2e-ss"], 1.0).await;
    let done = sim.wait_completed(third, VM_TIMEOUT).await;
    assert_eq!(done["conclusion"], "success", "{done}\n{}", agent.log_tail());
    let log = agent.log_text();
    assert!(!log.contains("held by another client"), "{}", agent.log_tail());
    // No credential in the log: the PAT, the webhook secret, the registration token, the
    // service's token (a JWT), the queue's, a runner's.
    for secret in [PAT, SECRET, TOKEN_MARKER, "eyJ", "mq_", RUNNER_MARKER] {
        assert!(!log.contains(secret), "a credential ({secret}…) reached the log");
    }
    assert!(agent.terminate().success());
    // The operator deletes the set, the agent stopped (a restart never does); then there
    // is nothing to delete.
    let out = agent.cli(&["scale-set", "delete", slots::POOL]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && said.contains("deleted scale set \"rv-e2e-ss\""), "{out:?}");
    let out = agent.cli(&["scale-set", "delete", "--name", "rv-e2e-ss"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("nothing to delete"), "{out:?}");
}

//! The operator's touch points: the .deb and systemd unit, `runnervisor check`, and a
//! real-VM run seen through journald fields, `runnervisor status`, virsh and metrics.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::agent::*;
use common::*;
use runnervisor::hypervisor::Hypervisor;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_deb_installs_binary_unit_sysusers_tmpfiles_config_and_docs() {
    let out = tempdir("deb");
    let deb = run(Command::new(root().join("scripts/package")).args(["--profile", "debug", "--out"]).arg(&out));
    let deb = deb.trim();
    let contents = run(Command::new("dpkg-deb").args(["--contents", deb]));
    for path in [
        "./usr/bin/runnervisor",
        "./lib/systemd/system/runnervisor.service",
        "./usr/lib/sysusers.d/runnervisor.conf",
        "./usr/lib/tmpfiles.d/runnervisor.conf",
        "./etc/runnervisor/config.toml.example",
        "./usr/lib/runnervisor/runnervisor-network",
        "./usr/share/doc/runnervisor/README.md",
        "./usr/share/doc/runnervisor/images.md",
        "./usr/share/runnervisor/grafana/runnervisor.json",
        "./usr/share/man/man8/runnervisor.8.gz",
        "./usr/share/man/man5/runnervisor.toml.5.gz",
        "./usr/share/bash-completion/completions/runnervisor",
        "./usr/share/zsh/vendor-completions/_runnervisor",
    ] {
        assert!(contents.lines().any(|l| l.ends_with(path)), "{path} missing:\n{contents}");
    }
    assert!(contents.contains("-rwxr-xr-x root/root"), "root-owned, executable binary:\n{contents}");
    // The drills' fault hooks are not compiled into the packaged binary.
    let unpacked = tempdir("deb-x");
    run(Command::new("dpkg-deb").args(["-x", deb]).arg(&unpacked));
    let binary = std::fs::read(unpacked.join("usr/bin/runnervisor")).unwrap();
    assert!(
        !binary.windows(b"RUNNERVISOR_FAULT".len()).any(|w| w == b"RUNNERVISOR_FAULT"),
        "fault-injection hooks in the packaged binary"
    );
    // Debian's own checker: no error, no warning (and no override hiding one).
    let lintian = Command::new("lintian").arg(deb).output().expect("lintian (scripts/setup-host installs it)");
    let said = String::from_utf8_lossy(&lintian.stdout);
    let complaints: Vec<&str> = said.lines().filter(|l| l.starts_with("E:") || l.starts_with("W:")).collect();
    assert!(
        lintian.status.success() && complaints.is_empty(),
        "lintian:\n{said}{}",
        String::from_utf8_lossy(&lintian.stderr)
    );
    // Manual pages render without a warning; the bash completion parses.
    for page in ["usr/share/man/man8/runnervisor.8.gz", "usr/share/man/man5/runnervisor.toml.5.gz"] {
        let script = format!("zcat '{}' | groff -K utf8 -man -ww -z -Tutf8 2>&1", unpacked.join(page).display());
        let warnings = run(Command::new("sh").args(["-c", &script]));
        assert!(warnings.trim().is_empty(), "{page}: {warnings}");
    }
    let page = run(Command::new("sh").args([
        "-c",
        &format!(
            "zcat '{}' | groff -man -Tutf8 -P-cbou",
            unpacked.join("usr/share/man/man5/runnervisor.toml.5.gz").display()
        ),
    ]));
    assert!(page.contains("bind_timeout") && page.contains("[server]"), "{page}");
    run(Command::new("bash").arg("-n").arg(unpacked.join("usr/share/bash-completion/completions/runnervisor")));
    let info = run(Command::new("dpkg-deb").args(["--info", deb]));
    for field in ["Package: runnervisor", "Depends:", "libvirt-daemon-system", "Architecture:"] {
        assert!(info.contains(field), "{field}:\n{info}");
    }
    // The unit verifies (with ExecStart pointing at the built binary).
    let unit = std::fs::read_to_string(root().join("systemd/runnervisor.service")).unwrap();
    let bin = env!("CARGO_BIN_EXE_runnervisor");
    let dir = tempdir("unit");
    std::fs::write(dir.join("runnervisor.service"), unit.replace("/usr/bin/runnervisor", bin)).unwrap();
    let verify = Command::new("systemd-analyze").arg("verify").arg(dir.join("runnervisor.service")).output().unwrap();
    let stderr = String::from_utf8_lossy(&verify.stderr);
    let relevant: Vec<&str> = stderr.lines().filter(|l| l.contains("runnervisor.service")).collect();
    assert!(verify.status.success() && relevant.is_empty(), "systemd-analyze verify: {stderr}");
    for key in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
        "Restart=on-failure",
        "SupplementaryGroups=libvirt",
        "LoadCredential=webhook-secret",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "StateDirectory=",
        "ReadWritePaths=",
    ] {
        assert!(unit.contains(key), "{key}");
    }
    // The example config in the package is the one `check` and the tests parse.
    let example = std::fs::read_to_string(root().join("config.toml.example")).unwrap();
    assert!(runnervisor::config::Config::parse(&example).is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_every_item_with_fixes() {
    let spec = AgentSpec::new("op-check", &["self-hosted", "op-check"]);
    let sim = Sim::start(None, |_| {}).await;
    let agent = Agent::configure(&spec, sim.handle.addr.port(), free_port());
    let bin = env!("CARGO_BIN_EXE_runnervisor");
    let check = |cfg: PathBuf| async move {
        tokio::task::spawn_blocking(move || Command::new(bin).arg("check").arg("--config").arg(&cfg).output().unwrap())
            .await
            .unwrap()
    };
    let out = check(agent.config.clone()).await;
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for what in [
        "configuration",
        "webhook secret",
        "GitHub token",
        "state directory",
        "libvirt",
        "storage pool",
        "domain type",
        "network fence",
        "network DNS",
        "console logs",
        "capacity",
        "pool op-check image",
        "GitHub permissions",
        "GitHub runners",
        "runner group",
        "webhook deliveries",
    ] {
        assert!(text.lines().any(|l| l.starts_with(&format!("✔ {what}"))), "✔ {what}:\n{text}");
    }
    assert!(text.contains("libvirt network runnervisor is active (gateway 198.51.100.1)"), "{text}");
    // No AppArmor/SELinux here: a warning, not a failure.
    assert!(text.lines().any(|l| l.starts_with("⚠ security driver: QEMU runs unconfined")), "{text}");
    // Slirp is not fenced: ✘ unless acknowledged.
    let good = std::fs::read_to_string(&agent.config).unwrap();
    let net_line = good.lines().find(|l| l.starts_with("network = ")).unwrap().to_string();
    std::fs::write(&agent.config, good.replace(&net_line, "network = { type = \"user\" }")).unwrap();
    let text = String::from_utf8_lossy(&check(agent.config.clone()).await.stdout).into_owned();
    assert!(text.contains("✘ network fence") && text.contains("this host's loopback"), "{text}");
    let acked = good.replace(&net_line, "network = { type = \"user\", accept_unfenced = true }");
    std::fs::write(&agent.config, &acked).unwrap();
    let text = String::from_utf8_lossy(&check(agent.config.clone()).await.stdout).into_owned();
    assert!(text.contains("✔ network fence: NOT fenced"), "{text}");
    // A network that is not there: ✘ naming what to run.
    std::fs::write(&agent.config, good.replace("name = \"runnervisor\"", "name = \"rv-no-such-net\"")).unwrap();
    let text = String::from_utf8_lossy(&check(agent.config.clone()).await.stdout).into_owned();
    assert!(text.contains("✘ network fence") && text.contains("scripts/setup-host"), "{text}");
    std::fs::write(&agent.config, &good).unwrap();
    // Break the image and the token: ✘ lines with fixes, non-zero exit.
    let broken = std::fs::read_to_string(&agent.config).unwrap().replace("golden.qcow2", "missing.qcow2");
    std::fs::write(&agent.config, broken).unwrap();
    write_private(&agent.dir.join("pat"), "ghp_wrong");
    let out = check(agent.config.clone()).await;
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(!out.status.success());
    assert!(text.contains("✘ pool op-check image") && text.contains("missing.qcow2"), "{text}");
    assert!(text.contains("✘ GitHub permissions") && text.contains("401"), "{text}");
    assert!(text.matches("    fix: ").count() >= 2, "{text}");
    let out = Command::new(bin).args(["check", "--config", "/nonexistent.toml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("✘ configuration"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_vm_seen_through_journald_status_virsh_and_metrics() {
    let spec = AgentSpec::new("op-view", &["self-hosted", "op-view"]);
    let webhook_port = free_port();
    let sim = Sim::start(Some(format!("http://127.0.0.1:{webhook_port}/webhook")), |_| {}).await;
    let mut agent = Agent::configure(&spec, sim.handle.addr.port(), webhook_port);
    let (hv, _) = libvirt();

    // A journald-compatible sink: the native protocol over a datagram socket.
    let sock_path = agent.dir.join("journal.sock");
    let sink = UnixDatagram::bind(&sock_path).unwrap();
    let entries: Arc<Mutex<Vec<Vec<(String, String)>>>> = Arc::default();
    let e2 = entries.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = sink.recv(&mut buf) {
            e2.lock().unwrap().push(runnervisor::logging::decode(&buf[..n]));
        }
    });
    agent.start_with_env(&[("RUNNERVISOR_JOURNAL_SOCKET", sock_path.to_str().unwrap())]).await;

    let job = sim.queue_with(serde_json::json!({"repo": "octo-org/app", "labels": ["self-hosted", "op-view"], "duration_secs": 20, "workflow_name": "Build & <Test>", "name": "unit"})).await;
    let name = format!("rv-op-view-{job}");
    wait_for("the job to run on our VM", VM_TIMEOUT, async || {
        (sim.job(job).await["status"] == "in_progress").then_some(())
    })
    .await;

    // runnervisor status, human and JSON, once the agent heard the job started (GitHub
    // says so before its webhook has come in: on a loaded machine the first look saw the
    // VM still booting).
    wait_for("the agent to hear the job started", Duration::from_secs(30), async || {
        String::from_utf8_lossy(&agent.cli(&["status"]).stdout).contains("busy").then_some(())
    })
    .await;
    let status = agent.cli(&["status"]);
    let table = String::from_utf8_lossy(&status.stdout);
    eprintln!("{table}");
    assert!(status.status.success());
    assert!(
        table.contains(&name) && table.contains("busy") && table.contains("op-view") && table.contains("1/2"),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_slice(&agent.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(json["vms"][0]["name"], name);
    assert_eq!(json["vms"][0]["took_job"], job);

    // virsh: readable name, description with the job, metadata with the job fields.
    let list = run(Command::new("virsh").args(["-c", URI, "list", "--name"]));
    assert!(list.lines().any(|l| l == name));
    let desc = run(Command::new("virsh").args(["-c", URI, "desc", &name]));
    assert!(
        desc.contains("octo-org/app")
            && desc.contains("Build & <Test>")
            && desc.contains(&job.to_string())
            && desc.contains("/actions/runs/"),
        "{desc}"
    );
    let md = run(Command::new("virsh").args([
        "-c",
        URI,
        "metadata",
        &name,
        "--uri",
        runnervisor::hypervisor::domain_xml::METADATA_NS,
    ]));
    eprintln!("{md}");
    assert!(
        md.contains(&format!("<job-id>{job}</job-id>"))
            && md.contains("<pool>op-view</pool>")
            && md.contains("<console-log>"),
        "{md}"
    );
    let title = run(Command::new("virsh").args(["-c", URI, "desc", &name, "--title"]));
    assert!(title.contains("octo-org/app"), "{title}");

    // Metrics during the run.
    let m = agent.metrics().await;
    assert!(m.contains("runnervisor_vms{pool=\"op-view\",state=\"busy\"} 1"), "{m}");
    assert!(m.contains("runnervisor_jobs_started_total{pool=\"op-view\"} 1"), "{m}");
    assert!(m.contains("runnervisor_queue_depth{pool=\"op-view\"} 0"), "{m}");
    assert!(m.contains("runnervisor_provision_duration_seconds_count{pool=\"op-view\"} 1"), "{m}");

    sim.wait_completed(job, VM_TIMEOUT).await;
    wait_for("cleaned", Duration::from_secs(90), async || leftovers(&hv, "rv-op-view-").0.is_empty().then_some(()))
        .await;

    // `vm destroy`: a booting VM is removed cleanly; its job is not lost.
    let job2 = sim.queue("octo-org/app", &["self-hosted", "op-view"], 1.0).await;
    let vm2 = format!("rv-op-view-{job2}");
    wait_for("second VM", Duration::from_secs(30), async || {
        hv.list_vms().unwrap().iter().any(|v| v.name == vm2).then_some(())
    })
    .await;
    let out = agent.cli(&["vm", "destroy", &vm2]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let own_volumes = [format!("{vm2}.qcow2"), format!("{vm2}-seed.img")];
    wait_for("domain and volumes destroyed", Duration::from_secs(30), async || {
        let gone = !hv.list_vms().unwrap().iter().any(|v| v.name == vm2)
            && !hv.list_volumes().unwrap().iter().any(|v| own_volumes.contains(v));
        gone.then_some(())
    })
    .await;
    let bad = agent.cli(&["vm", "destroy", "rv-op-view-nope"]);
    assert!(!bad.status.success());
    sim.wait_completed(job2, VM_TIMEOUT).await;
    wait_for("cleaned", Duration::from_secs(90), async || {
        let (d, v) = leftovers(&hv, "rv-op-view-");
        (d.is_empty() && v.is_empty()).then_some(())
    })
    .await;
    wait_for("no runners", Duration::from_secs(30), async || sim.runners().await.is_empty().then_some(())).await;

    // `runnervisor timeline`: both VMs' milestones from the agent's records, as a table,
    // JSON and an SVG picture.
    let table = String::from_utf8_lossy(&agent.cli(&["timeline"]).stdout).into_owned();
    let row = table.lines().find(|l| l.starts_with(&name)).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(&job.to_string()) && row.contains("cold") && row.contains("stopped"), "{table}");
    assert!(table.lines().any(|l| l.starts_with(&vm2) && l.contains("operator")), "{table}");
    let traces: Vec<runnervisor::timeline::Trace> =
        serde_json::from_slice(&agent.cli(&["timeline", "--json"]).stdout).unwrap();
    let t = traces.iter().find(|t| t.vm == name).unwrap();
    let order = [t.queued, t.created, t.defined, t.started, t.online, t.completed, t.reaped, t.gone];
    assert!(order.iter().all(Option::is_some) && order.is_sorted(), "{t:#?}");
    let svg = agent.dir.join("timeline.svg");
    let out = agent.cli(&["timeline", "--svg", svg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let svg = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{e}: {svg}"));
    let text: String = doc.descendants().filter_map(|n| n.text()).collect();
    assert!(text.contains(&format!("job {job}")) && text.contains(&name), "{text}");

    // journald: the entries carry the fields operators filter on, and no secret.
    let entries = entries.lock().unwrap().clone();
    let with = |k: &str, v: &str| entries.iter().filter(|e| e.iter().any(|(f, x)| f == k && x == v)).count();
    let job_s = job.to_string();
    assert!(with("JOB_ID", &job_s) >= 3, "entries with JOB_ID={job}: {}", with("JOB_ID", &job_s));
    assert!(with("VM_NAME", &name) >= 2);
    assert!(with("POOL", "op-view") >= 2);
    assert!(with("REPOSITORY", "octo-org/app") >= 1);
    assert!(with("RUNNER_NAME", &name) >= 1);
    assert!(with("RUN_ID", &sim.job(job).await["run_id"].to_string()) >= 1);
    assert!(entries.iter().all(|e| { e.iter().any(|(f, v)| f == "SYSLOG_IDENTIFIER" && v == "runnervisor") }));
    let all: String = entries.iter().flatten().map(|(_, v)| v.as_str()).collect::<Vec<_>>().join("\n");
    assert!(!all.contains(PAT) && !all.contains(SECRET), "a secret reached the journal");
    assert!(agent.log_text().trim().is_empty(), "with journald, nothing goes to stderr: {}", agent.log_tail());
}

/// SIGHUP (`systemctl reload`): a bigger `max_vms`, a new pool, another log level and sync
/// interval apply at once, seen through `status` and the metrics; a moved webhook listener
/// waits for a restart; a config that fails validation is rejected whole (the running one
/// stays); a removed pool goes. systemd hears RELOADING=1 then READY=1 each time.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_what_can_change_live_and_rejects_a_bad_config_whole() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let spec = AgentSpec::new("op-reload", &["self-hosted", "op-reload"]);
    let webhook_port = free_port();
    let sim = Sim::start(Some(format!("http://127.0.0.1:{webhook_port}/webhook")), |_| {}).await;
    let mut agent = Agent::configure(&spec, sim.handle.addr.port(), webhook_port);
    let notify_path = agent.dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    agent.start_with_env(&[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]).await;
    let notified = |want: &str| {
        let mut buf = [0u8; 512];
        loop {
            let n = notify.recv(&mut buf).unwrap_or_else(|e| panic!("no {want} from the agent: {e}"));
            if String::from_utf8_lossy(&buf[..n]).contains(want) {
                return;
            }
        }
    };
    notified("READY=1");
    let hup = |agent: &Agent| {
        kill(Pid::from_raw(agent.child.as_ref().unwrap().id() as i32), Signal::SIGHUP).unwrap();
    };
    assert_eq!(pools(&agent), [("op-reload".to_string(), 2, false)]);

    // A bigger pool, a new one, a quieter log, another sync interval, a moved listener.
    let original = std::fs::read_to_string(&agent.config).unwrap();
    let img = test_image();
    let changed = original
        .replace("max_vms = 2", "max_vms = 3")
        .replace("log_level = \"runnervisor=debug,info\"", "log_level = \"info\"")
        .replace("github_interval = \"10s\"", "github_interval = \"20s\"")
        .replace(&format!("127.0.0.1:{webhook_port}"), &format!("127.0.0.1:{}", free_port()))
        + &format!(
            "\n[[pool]]\nname = \"op-reload-big\"\nlabels = [\"self-hosted\", \"op-reload-big\"]\nimage = \"{}\"\n\
             kernel = \"{}\"\ninitrd = \"{}\"\nvcpus = 1\nmemory_mib = 512\ndisk_gib = 4\nmax_vms = 1\n",
            img.golden.display(),
            img.kernel.display(),
            img.initrd.display()
        );
    std::fs::write(&agent.config, &changed).unwrap();
    hup(&agent);
    notified("RELOADING=1");
    notified("READY=1");
    wait_for("the reload applied", Duration::from_secs(10), async || {
        (pools(&agent) == [("op-reload".to_string(), 3, false), ("op-reload-big".to_string(), 1, false)]).then_some(())
    })
    .await;
    assert_eq!(reload_count(&agent, "applied").await, 1);
    let log = agent.log_text();
    let line = log.lines().find(|l| l.contains("configuration reloaded")).unwrap_or_else(|| panic!("{log}"));
    for what in ["log_level", "reconcile", "pool op-reload", "pool op-reload-big (added)", "server"] {
        assert!(line.contains(what), "{what}: {line}");
    }
    // The listener stays where it was until a restart.
    assert!(reqwest::get(format!("http://127.0.0.1:{webhook_port}/healthz")).await.unwrap().status().is_success());
    // The new pool serves: its gauges are there.
    assert!(agent.metrics().await.contains("runnervisor_queue_depth{pool=\"op-reload-big\"} 0"));

    // Invalid: rejected as a whole, the error names the key and the value; nothing changes.
    std::fs::write(
        &agent.config,
        changed.replace("max_vms = 3", "max_vms = 0").replace("max_vms = 1\n", "max_vms = 5\n"),
    )
    .unwrap();
    hup(&agent);
    notified("RELOADING=1");
    notified("READY=1");
    wait_for("the rejection counted", Duration::from_secs(10), async || {
        (reload_count(&agent, "rejected").await == 1).then_some(())
    })
    .await;
    let log = agent.log_text();
    let line = log.lines().find(|l| l.contains("configuration NOT reloaded")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("max_vms") && line.contains('0'), "{line}");
    assert_eq!(pools(&agent), [("op-reload".to_string(), 3, false), ("op-reload-big".to_string(), 1, false)]);
    assert_eq!(reload_count(&agent, "applied").await, 1);

    // The original again: the added pool (no VM) goes at once.
    std::fs::write(&agent.config, &original).unwrap();
    hup(&agent);
    wait_for("the pool removed", Duration::from_secs(10), async || {
        (pools(&agent) == [("op-reload".to_string(), 2, false)]).then_some(())
    })
    .await;
    assert_eq!(reload_count(&agent, "applied").await, 2);
    assert!(agent.log_text().contains("pool removed: its last VM is gone"));
    assert!(!agent.metrics().await.contains("runnervisor_queue_depth{pool=\"op-reload-big\"}"), "its gauges are gone");
    assert!(agent.terminate().success());
}

/// Pools in `runnervisor status --json`: name, max_vms, retiring.
fn pools(agent: &Agent) -> Vec<(String, u64, bool)> {
    // By the socket: the config file may be one the agent rejected.
    let out = Command::new(env!("CARGO_BIN_EXE_runnervisor"))
        .args(["status", "--json", "--socket"])
        .arg(agent.dir.join("admin.sock"))
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    s["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["max_vms"].as_u64().unwrap(), p["retiring"] == true))
        .collect()
}

/// `runnervisor_config_reloads_total{result=...}`.
async fn reload_count(agent: &Agent, result: &str) -> usize {
    let want = format!("runnervisor_config_reloads_total{{result=\"{result}\"}} ");
    agent.metrics().await.lines().find_map(|l| l.strip_prefix(&want)?.trim().parse().ok()).unwrap_or(0)
}

/// Builds the package as version `version` into a fresh directory; returns its path.
fn package(version: &str, out: &std::path::Path) -> String {
    let deb = run(Command::new(root().join("scripts/package"))
        .args(["--profile", "debug", "--version", version, "--out"])
        .arg(out));
    deb.trim().to_string()
}

/// The maintainer scripts' decisions, run with systemd "running" and every tool they call
/// replaced by a recorder: enabled but not started on first install; a running agent
/// restarted on upgrade (and the operator's choice to disable it kept); stopped on removal
/// only; an existing libvirt network left alone; purge forgets the unit and the state.
#[test]
fn maintainer_scripts_enable_on_install_restart_on_upgrade_stop_on_remove() {
    let dir = tempdir("maint");
    let deb = package("9.9.9", &dir.join("out"));
    let control = dir.join("control");
    run(Command::new("dpkg-deb").args(["-e", &deb]).arg(&control));
    let shims = dir.join("bin");
    std::fs::create_dir_all(&shims).unwrap();
    let log = dir.join("calls");
    for tool in [
        "deb-systemd-helper",
        "deb-systemd-invoke",
        "systemctl",
        "systemd-sysusers",
        "systemd-tmpfiles",
        "virsh",
        "runnervisor-network",
    ] {
        let script = format!(
            "#!/bin/sh\necho \"{tool} $*\" >> '{log}'\n\
             case \"$*\" in *was-enabled*) exit ${{WAS_ENABLED:-0}} ;; *net-info*) exit ${{NET_EXISTS:-1}} ;; esac\nexit 0\n",
            log = log.display()
        );
        let path = shims.join(tool);
        std::fs::write(&path, script).unwrap();
        run(Command::new("chmod").arg("0755").arg(&path));
    }
    let systemd_dir = dir.join("run-systemd-system");
    let state = dir.join("state");
    // The scripts with their fixed paths pointed into this test's directory.
    let scripted = |name: &str| {
        let text = std::fs::read_to_string(control.join(name)).unwrap();
        let text = text
            .replace("/run/systemd/system", systemd_dir.to_str().unwrap())
            .replace("/usr/lib/runnervisor/", &format!("{}/", shims.display()))
            .replace("/var/lib/runnervisor/state", state.to_str().unwrap());
        let path = dir.join(format!("{name}.sh"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let (postinst, prerm, postrm) = (scripted("postinst"), scripted("prerm"), scripted("postrm"));
    let path = format!("{}:{}", shims.display(), std::env::var("PATH").unwrap());
    let calls = |script: &std::path::Path, args: &[&str], systemd: bool, env: &[(&str, &str)]| -> String {
        let _ = std::fs::remove_file(&log);
        if systemd {
            std::fs::create_dir_all(&systemd_dir).unwrap();
        } else {
            let _ = std::fs::remove_dir(&systemd_dir);
        }
        let mut cmd = Command::new("sh");
        cmd.arg(script).args(args).env("PATH", &path);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{script:?} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::read_to_string(&log).unwrap_or_default()
    };
    let has = |calls: &str, what: &str| calls.lines().any(|l| l.starts_with(what));

    // First install: user, directories, network (none yet), enabled, not started.
    let c = calls(&postinst, &["configure", ""], true, &[]);
    for want in [
        "systemd-sysusers runnervisor.conf",
        "systemd-tmpfiles --create runnervisor.conf",
        "runnervisor-network",
        "deb-systemd-helper enable runnervisor.service",
        "systemctl --system daemon-reload",
    ] {
        assert!(has(&c, want), "first install: {want}\n{c}");
    }
    assert!(!has(&c, "deb-systemd-invoke"), "first install starts nothing:\n{c}");
    // Upgrade: the network exists (the operator's), a running agent is restarted.
    let c = calls(&postinst, &["configure", "9.9.8"], true, &[("NET_EXISTS", "0")]);
    assert!(has(&c, "deb-systemd-invoke try-restart runnervisor.service"), "upgrade:\n{c}");
    assert!(has(&c, "deb-systemd-helper enable runnervisor.service"), "{c}");
    assert!(!has(&c, "runnervisor-network"), "an existing network is left alone:\n{c}");
    // Upgrade after the operator disabled it: stays disabled.
    let c = calls(&postinst, &["configure", "9.9.8"], true, &[("NET_EXISTS", "0"), ("WAS_ENABLED", "1")]);
    assert!(has(&c, "deb-systemd-helper update-state") && !has(&c, "deb-systemd-helper enable"), "{c}");
    // Without systemd running (a chroot, an image build): enabled, nothing invoked.
    let c = calls(&postinst, &["configure", "9.9.8"], false, &[("NET_EXISTS", "0")]);
    assert!(has(&c, "deb-systemd-helper enable") && !has(&c, "deb-systemd-invoke") && !has(&c, "systemctl"), "{c}");
    // prerm: an upgrade does not stop it (postinst restarts it); removal does.
    assert!(!has(&calls(&prerm, &["upgrade", "9.9.9"], true, &[]), "deb-systemd-invoke"));
    assert!(has(&calls(&prerm, &["remove"], true, &[]), "deb-systemd-invoke stop runnervisor.service"));
    // postrm: removal masks (a leftover unit cannot start), purge forgets unit and state.
    assert!(has(&calls(&postrm, &["remove"], true, &[]), "deb-systemd-helper mask runnervisor.service"));
    std::fs::create_dir_all(state.join("sub")).unwrap();
    let c = calls(&postrm, &["purge"], true, &[]);
    assert!(has(&c, "deb-systemd-helper purge runnervisor.service"), "{c}");
    assert!(!state.exists(), "purge removes the agent's state");
}

/// Removes the package whatever the test's outcome.
struct Installed;
impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "runnervisor"]).output();
        let _ = std::fs::remove_file("/etc/runnervisor/config.toml");
    }
}

/// An upgrade in place on a real host with a real VM: the previous package is installed
/// (user made, unit enabled, not started), its agent runs a job's VM; the new package is
/// installed over it while the job runs; the agent is restarted as `systemctl restart`
/// does (SIGTERM, start; there is no systemd as PID 1 here, the restart decision itself is
/// tested above) and re-adopts the VM from the state and libvirt's metadata: the job
/// finishes on the same runner, one VM was ever made, the operator's config is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_keeps_the_state_and_re_adopts_a_running_vm() {
    let dir = tempdir("upgrade");
    let v1 = package("0.0.1~prev", &dir.join("v1"));
    let v2 = package("0.0.2", &dir.join("v2"));
    let _ = Command::new("dpkg").args(["--purge", "runnervisor"]).output();
    let _installed = Installed;
    let dpkg_i = |deb: &str| run(Command::new("dpkg").args(["-i", deb]).env("DEBIAN_FRONTEND", "noninteractive"));
    dpkg_i(&v1);
    let installed = |what: &str| run(Command::new("dpkg-query").args(["-W", "-f", what, "runnervisor"]));
    assert_eq!(installed("${Version} ${db:Status-Abbrev}"), "0.0.1~prev ii ");
    run(Command::new("id").arg("runnervisor"));
    let wants = std::path::Path::new("/etc/systemd/system/multi-user.target.wants/runnervisor.service");
    assert!(wants.is_symlink(), "enabled on first install");

    // The operator's config in /etc, the agent from /usr/bin.
    let spec = AgentSpec::new("op-upgrade", &["self-hosted", "op-upgrade"]);
    let webhook_port = free_port();
    let sim = Sim::start(Some(format!("http://127.0.0.1:{webhook_port}/webhook")), |_| {}).await;
    let mut agent = Agent::configure(&spec, sim.handle.addr.port(), webhook_port);
    let etc_config = PathBuf::from("/etc/runnervisor/config.toml");
    let config_text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(&etc_config, &config_text).unwrap();
    agent.config = etc_config.clone();
    agent.bin = PathBuf::from("/usr/bin/runnervisor");
    agent.start().await;
    let job = sim.queue("octo-org/app", &["self-hosted", "op-upgrade"], 25.0).await;
    let name = format!("rv-op-upgrade-{job}");
    wait_for("the job to run on the v1 agent's VM", VM_TIMEOUT, async || {
        (sim.job(job).await["status"] == "in_progress").then_some(())
    })
    .await;

    // The new version over it while the job runs, then the restart.
    dpkg_i(&v2);
    assert_eq!(installed("${Version} ${db:Status-Abbrev}"), "0.0.2 ii ");
    assert_eq!(std::fs::read_to_string(&etc_config).unwrap(), config_text, "the operator's config is untouched");
    assert!(wants.is_symlink(), "still enabled");
    assert!(agent.terminate().success(), "SIGTERM exits 0");
    let (hv, _) = libvirt();
    assert!(
        hv.list_vms()
            .unwrap()
            .iter()
            .any(|v| v.name == name && v.state == runnervisor::hypervisor::DomainState::Running),
        "the VM outlives the agent"
    );
    agent.start().await;
    let status: serde_json::Value = serde_json::from_slice(&agent.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status["vms"][0]["name"], name, "re-adopted: {status}");
    assert_eq!(status["vms"][0]["took_job"], job, "{status}");

    let done = sim.wait_completed(job, VM_TIMEOUT).await;
    assert_eq!((done["conclusion"].as_str(), done["runner_name"].as_str()), (Some("success"), Some(name.as_str())));
    wait_for("cleaned", Duration::from_secs(90), async || {
        let (d, v) = leftovers(&hv, "rv-op-upgrade-");
        (d.is_empty() && v.is_empty()).then_some(())
    })
    .await;
    let history = sim.runner_history().await;
    assert_eq!(history.as_object().unwrap().len(), 1, "one VM was ever made: {history}");
    assert!(agent.terminate().success());
}

//! Helpers for the real-VM tests: the test image, libvirt, the simulator, cleanup checks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runnervisor::config::DomainType;
use runnervisor::hypervisor::libvirt::Libvirt;
use runnervisor::hypervisor::{HvEvent, Hypervisor};
use serde_json::{Value, json};

pub const PAT: &str = "ghp_runnervisor_test_pat";
pub const SECRET: &str = "runnervisor-test-webhook-secret";
pub const POOL: &str = "runnervisor";
pub const URI: &str = "qemu:///system";

pub mod agent;
pub mod inproc;
pub mod lab;
pub mod load;
pub mod pg;
pub mod slots;

/// How long a VM test waits for a guest before failing (TCG boots in ~30 s; allow slack
/// for two VMs sharing two cores).
pub const VM_TIMEOUT: Duration = Duration::from_secs(240);

pub struct TestImage {
    pub golden: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub fn test_image() -> TestImage {
    let dir =
        PathBuf::from(std::env::var("RV_TEST_IMAGE_DIR").unwrap_or_else(|_| "/var/lib/runnervisor/test-image".into()));
    let img =
        TestImage { golden: dir.join("golden.qcow2"), kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img") };
    assert!(
        img.golden.exists() && img.kernel.exists() && img.initrd.exists(),
        "test image missing in {}: run ./scripts/test (or scripts/setup-host and images/test/build)",
        dir.display()
    );
    img
}

pub fn domain_type() -> DomainType {
    match std::env::var("RV_DOMAIN_TYPE").as_deref() {
        Ok("kvm") => DomainType::Kvm,
        _ => DomainType::Qemu,
    }
}

/// The real libvirt hypervisor on the test storage pool, with its event channel.
pub fn libvirt() -> (Arc<Libvirt>, tokio::sync::mpsc::UnboundedReceiver<HvEvent>) {
    libvirt_on(POOL)
}

/// A connection whose job volumes live in storage pool `pool`.
pub fn libvirt_on(pool: &str) -> (Arc<Libvirt>, tokio::sync::mpsc::UnboundedReceiver<HvEvent>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let lv = Libvirt::start(URI, pool, tx);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lv.connected() {
        assert!(Instant::now() < deadline, "libvirt not reachable at {URI}: run ./scripts/setup-host");
        std::thread::sleep(Duration::from_millis(100));
    }
    lv.check_pool().unwrap_or_else(|e| panic!("{e} (run ./scripts/setup-host)"));
    (lv, rx)
}

/// Tears named VMs down when dropped, also when the test panics.
pub struct Cleanup {
    pub hv: Arc<Libvirt>,
    pub names: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for n in &self.names {
            for e in self.hv.teardown(n) {
                eprintln!("cleanup {n}: {e}");
            }
            if let Err(e) = self.hv.release_address(NETWORK, n) {
                eprintln!("cleanup {n}: {e}");
            }
        }
    }
}

/// The MACs the libvirt network `name`'s DHCP server holds leases for now.
pub fn network_leases(name: &str) -> Vec<String> {
    let out = std::process::Command::new("virsh").args(["-c", URI, "net-dhcp-leases", name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.matches(':').count() == 5).map(str::to_string))
        .collect()
}

/// Names of `rv-` domains and volumes that exist right now.
/// Waits (up to 60 s) while this process's own libvirt connection is re-established,
/// e.g. after a drill restarted libvirtd.
pub fn leftovers(hv: &Libvirt, prefix: &str) -> (Vec<String>, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match (hv.list_vms(), hv.list_volumes()) {
            (Ok(vms), Ok(vols)) => {
                let doms = vms.into_iter().map(|v| v.name).filter(|n| n.starts_with(prefix)).collect();
                let vols = vols.into_iter().filter(|n| n.starts_with(prefix)).collect();
                return (doms, vols);
            }
            (Err(e), _) | (_, Err(e)) if Instant::now() > deadline => panic!("libvirt: {e}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The fenced libvirt network the tests' VMs join (made by `scripts/setup-host`), and its
/// gateway: the host's address on it, where the simulator listens.
pub const NETWORK: &str = "runnervisor";
pub fn lab_gateway() -> std::net::Ipv4Addr {
    std::env::var("RV_LAB_GATEWAY")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(std::net::Ipv4Addr::new(198, 51, 100, 1))
}

/// The fenced network for a test whose VMs must reach the simulator at `sim_port`: its own
/// nwfilter (tests run side by side with different allow-lists), removed by [`drop_filter`].
pub fn fenced_network(filter: &str, sim_port: u16) -> runnervisor::config::NetworkConfig {
    runnervisor::config::NetworkConfig::Network {
        name: NETWORK.into(),
        filter: filter.into(),
        allow: vec![format!("{}:{sim_port}", lab_gateway()).parse().unwrap()],
    }
}

/// The fence the agent would put up for `network` on the lab network, defined on `hv`
/// the way the agent does; undefined when dropped (declare it before a VM's cleanup
/// guard, so that the VM goes first).
pub struct TestFence(pub String);

impl TestFence {
    pub fn up(hv: &Libvirt, network: &runnervisor::config::NetworkConfig) -> TestFence {
        let (subnet, fixed) = lab_addressing(hv);
        let filters = runnervisor::fence::filters_for(network, subnet, fixed, &hv.host_addresses().unwrap());
        assert!(!filters.is_empty(), "fenced");
        for (filter, xml) in &filters {
            hv.define_filter(filter, xml).unwrap();
        }
        TestFence(network.fence().unwrap().0.to_string())
    }
}

impl Drop for TestFence {
    fn drop(&mut self) {
        drop_filter(&self.0);
    }
}

/// The lab network's subnet, and whether VMs get fixed addresses on it (as the agent
/// decides: its DHCP server serves known clients only).
pub fn lab_addressing(hv: &Libvirt) -> (Option<runnervisor::hypervisor::network::Subnet>, bool) {
    let dhcp = hv.network_dhcp(NETWORK).expect("the lab network");
    (dhcp.subnet, dhcp.fixes_addresses().expect("the lab network can take VMs"))
}

/// The NoCloud seed of test VM `name` as the agent makes it: nothing secret, and on the lab
/// network its fixed address (reserved now; [`test_domain_xml`] finds the same).
pub fn test_seed(hv: &Libvirt, name: &str) -> Vec<u8> {
    use runnervisor::cloudinit;
    let network_config = match lab_addressing(hv) {
        (Some(subnet), true) => {
            let r = hv.reserve_address(NETWORK, name).expect("an address on the lab network");
            Some(cloudinit::network_config(&r, subnet))
        }
        _ => None,
    };
    runnervisor::hypervisor::seed::nocloud_image(
        &cloudinit::user_data(),
        &cloudinit::meta_data(name),
        network_config.as_deref(),
    )
    .unwrap()
}

/// Undefines a test's nwfilters, `filter` and its `-fixed` one (once no VM uses them).
pub fn drop_filter(filter: &str) {
    let _ = std::process::Command::new("virsh")
        .args(["-c", URI, "nwfilter-undefine", &runnervisor::fence::vm_filter(filter, true)])
        .output();
    let _ = std::process::Command::new("virsh")
        .args(["-c", URI, "nwfilter-undefine", filter])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

pub struct Sim {
    pub handle: github_sim::SimHandle,
    pub http: reqwest::Client,
}

/// What every registration token of the tests' simulators begins with: a marker planted
/// so that a job can search its VM for its credential.
pub const TOKEN_MARKER: &str = "AQRVSECRETMARKERQ";

/// What every runner credential of the tests' simulators begins with (the token inside a
/// JIT config, which the runner keeps in `.credentials`): planted for the same search.
pub const RUNNER_MARKER: &str = "rcRVRUNNERSECRETMARKERQQ";

/// The characters `marker` is sure to show, wherever it sits, once encoded in base64: for
/// each of the three alignments, the groups made of its bytes alone.
pub fn base64_forms(marker: &str) -> Vec<String> {
    use base64::Engine;
    let m = marker.as_bytes();
    (0..3)
        .map(|a| {
            let padded: Vec<u8> = std::iter::repeat_n(0u8, a).chain(m.iter().copied()).collect();
            let enc = base64::engine::general_purpose::STANDARD.encode(&padded);
            let (first, last) = (a.div_ceil(3), (a + m.len()) / 3);
            enc[4 * first..4 * last].to_string()
        })
        .collect()
}

/// The files of its runner's own identity the runner keeps for its one job (what a JIT
/// config unpacks into, or `config.sh` writes), which a credential search does not count.
pub const RUNNER_KEEPS: &[&str] =
    &["/opt/actions-runner/.runner", "/opt/actions-runner/.credentials", "/opt/actions-runner/.credentials_rsaparams"];

impl Sim {
    /// A simulator on the lab network's gateway, where both the agent (on the host) and
    /// the runners (in fenced VMs, through the allow-list) reach it.
    pub async fn start(webhook_url: Option<String>, tweak: impl FnOnce(&mut github_sim::SimConfig)) -> Sim {
        let mut c = github_sim::SimConfig::new(PAT, SECRET);
        c.webhook_url = webhook_url;
        c.registration_token_prefix = TOKEN_MARKER.into();
        c.runner_credential_prefix = RUNNER_MARKER.into();
        tweak(&mut c);
        let addr = std::net::SocketAddr::from((lab_gateway(), 0));
        let handle = github_sim::SimHandle::start_on(c, addr)
            .await
            .unwrap_or_else(|e| panic!("simulator on {addr}: {e} (the lab network is made by ./scripts/setup-host)"));
        Sim { handle, http: reqwest::Client::new() }
    }

    pub fn url(&self) -> String {
        self.handle.url()
    }

    /// Queues a job whose script searches its VM, as root, for its runner's credential (a
    /// registration token, [`TOKEN_MARKER`]; a JIT config, by the opening every one of this
    /// simulator's begins with; the runner's own token, [`RUNNER_MARKER`], raw and in
    /// base64) in every file but [`RUNNER_KEEPS`], in every process's arguments and
    /// environment, and in the journal (`tests/isolation/credential_search.py`).
    pub async fn queue_credential_search(&self, repo: &str, labels: &[&str]) -> u64 {
        use base64::Engine;
        let code = base64::engine::general_purpose::STANDARD.encode(include_str!("../isolation/credential_search.py"));
        let script = format!(
            "sudo -n python3 -c \"import base64,sys; exec(base64.b64decode('{code}'))\" {}",
            self.credential_search_cfg()
        );
        self.queue_with(json!({"repo": repo, "labels": labels, "script": script})).await
    }

    /// The argument of `tests/isolation/credential_search.py` (base64 JSON): the markers,
    /// reversed so that no argument list holds them, and the files the runner keeps.
    pub fn credential_search_cfg(&self) -> String {
        use base64::Engine;
        let reversed_hex = |m: &str| m.bytes().rev().map(|b| format!("{b:02x}")).collect::<String>();
        let markers = credential_markers();
        let cfg = json!({
            "sim": self.guest_url(),
            "markers": markers.iter().map(|m| reversed_hex(m)).collect::<Vec<_>>(),
            "kept": RUNNER_KEEPS,
        });
        base64::engine::general_purpose::STANDARD.encode(cfg.to_string())
    }

    /// The credential search's report from `vm`: it ran as root, searched, found nothing.
    pub async fn assert_credential_not_found(&self, vm: &str) {
        let reports: Value =
            self.http.get(format!("{}/_sim/reports", self.url())).send().await.unwrap().json().await.unwrap();
        let report = reports
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["role"] == "credential-search" && r["vm"] == vm)
            .unwrap_or_else(|| panic!("no credential search report from {vm}: {reports}"));
        assert_eq!(report["uid"], 0, "the search ran as root: {report}");
        assert!(report["files"].as_u64().unwrap_or(0) > 1000, "it searched the filesystem: {report}");
        assert!(report["processes"].as_u64().unwrap_or(0) > 10, "and the processes: {report}");
        assert_eq!(report["hits"], json!([]), "the runner's credential is readable inside {vm}: {report}");
        assert_eq!(report["resolved"], "127.0.1.1", "{vm}'s own name resolves from its /etc/hosts: {report}");
        eprintln!(
            "{vm}: credential search as root found nothing in {} files and {} processes",
            report["files"], report["processes"]
        );
    }

    pub fn guest_url(&self) -> String {
        self.handle.url()
    }

    pub async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self.http.request(method, format!("{}{path}", self.url())).bearer_auth(PAT);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.json().await.unwrap_or(Value::Null)
    }

    pub async fn queue(&self, repo: &str, labels: &[&str], duration_secs: f64) -> u64 {
        self.queue_with(json!({"repo": repo, "labels": labels, "duration_secs": duration_secs})).await
    }

    pub async fn queue_with(&self, body: Value) -> u64 {
        let r = self.http.post(format!("{}/_sim/jobs", self.url())).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["id"].as_u64().unwrap()
    }

    pub async fn job(&self, id: u64) -> Value {
        self.http.get(format!("{}/_sim/jobs/{id}", self.url())).send().await.unwrap().json().await.unwrap()
    }

    pub async fn runners(&self) -> Vec<Value> {
        let v: Value =
            self.http.get(format!("{}/_sim/runners", self.url())).send().await.unwrap().json().await.unwrap();
        v.as_array().cloned().unwrap_or_default()
    }

    /// Every runner that ever registered, by name (`/_sim/runner-history`).
    pub async fn runner_history(&self) -> Value {
        self.http.get(format!("{}/_sim/runner-history", self.url())).send().await.unwrap().json().await.unwrap()
    }

    /// Queued → runner online of `job` (seconds), at the simulator, and the runner that took it.
    pub async fn queued_to_online(&self, job: u64) -> (f64, String) {
        let j = self.job(job).await;
        let runner = j["runner_name"].as_str().expect("a runner took it").to_string();
        let online = self.runner_history().await[&runner]["online_unix_ms"].as_u64().expect("came online");
        (online.saturating_sub(j["created_unix_ms"].as_u64().unwrap()) as f64 / 1000.0, runner)
    }

    pub async fn fault(&self, f: Value) {
        let r = self.http.post(format!("{}/_sim/faults", self.url())).json(&f).send().await.unwrap();
        assert_eq!(r.status(), 201);
    }

    /// Waits until job `id` is completed; returns it.
    pub async fn wait_completed(&self, id: u64, timeout: Duration) -> Value {
        wait_for(&format!("job {id} completed"), timeout, async || {
            let j = self.job(id).await;
            (j["status"] == "completed").then_some(j)
        })
        .await
    }
}

pub async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The console log of a VM, for failure messages.
pub fn console(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

pub fn console_dir() -> PathBuf {
    let d = PathBuf::from("/var/log/runnervisor/test-console");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A unique-per-test suffix so parallel tests never share names.
pub fn unique() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64 % 1_000_000_000_000
}

/// Domain XML for a test VM of the test image (1 vCPU, 512 MiB, on `network`), with the
/// address the agent would reserve for it on the lab network (its DHCP server answers
/// reserved clients only); [`Cleanup`] releases it.
pub fn test_domain_xml(
    hv: &Libvirt,
    name: &str,
    overlay: &Path,
    seed: &Path,
    console_log: &Path,
    job_id: u64,
    network: &runnervisor::config::NetworkConfig,
) -> String {
    test_domain_xml_with(hv, name, overlay, seed, console_log, job_id, network, false)
}

/// [`test_domain_xml`], whose metadata says it is a warm VM when `warm`.
#[allow(clippy::too_many_arguments)]
pub fn test_domain_xml_with(
    hv: &Libvirt,
    name: &str,
    overlay: &Path,
    seed: &Path,
    console_log: &Path,
    job_id: u64,
    network: &runnervisor::config::NetworkConfig,
    warm: bool,
) -> String {
    use runnervisor::hypervisor::domain_xml::{self, DomainSpec, VmMetadata};
    let img = test_image();
    let address =
        lab_addressing(hv).1.then(|| hv.reserve_address(NETWORK, name).expect("an address on the lab network"));
    let meta = VmMetadata {
        job_id,
        run_id: 1,
        repository: "octo-org/app".into(),
        pool: "test".into(),
        runner_name: name.into(),
        created: std::time::SystemTime::now(),
        console_log: console_log.to_path_buf(),
        job_url: String::new(),
        warm,
        host: None,
        made_from: None,
    };
    domain_xml::domain(&DomainSpec {
        name,
        domain_type: domain_type(),
        vcpus: 1,
        memory_mib: 512,
        overlay_path: overlay,
        seed_path: seed,
        kernel: Some(&img.kernel),
        initrd: Some(&img.initrd),
        cmdline: None,
        network,
        gateway: Some(lab_gateway()),
        address: address.as_ref(),
        title: "runnervisor test VM",
        description: "a test VM",
        metadata: &meta,
    })
}

/// Runs a command that must succeed; its stdout.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What every credential of the simulator carries, short enough to sit within one page of
/// a guest's memory: the registration token's [`TOKEN_MARKER`], the opening of every JIT
/// config, the runner's own token's [`RUNNER_MARKER`] raw and in base64.
pub fn credential_markers() -> Vec<String> {
    let mut markers = vec![TOKEN_MARKER.to_string(), github_sim::api::jit_config_fingerprint()];
    markers.push(RUNNER_MARKER.to_string());
    markers.extend(base64_forms(RUNNER_MARKER));
    markers
}

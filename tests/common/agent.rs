//! The `runnervisor` binary as a child process, with a generated config.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

/// The nwfilter of a test agent's pool: its own, since tests run side by side.
pub fn filter_name(pool: &str) -> String {
    format!("rv-test-fence-{pool}")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A test's scratch directory: removed when the test passes, kept (and named on stderr)
/// when it fails, for the logs and configs in it.
pub struct Scratch(Option<tempfile::TempDir>);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.as_ref().expect("present until dropped").path()
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        self
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take()
            && std::thread::panicking()
        {
            eprintln!("test failed: its files are kept in {}", dir.keep().display());
        }
    }
}

pub fn tempdir(tag: &str) -> Scratch {
    Scratch(Some(tempfile::Builder::new().prefix(&format!("rv-e2e-{tag}-")).tempdir().unwrap()))
}

pub fn write_private(path: &Path, content: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).unwrap();
    f.write_all(content.as_bytes()).unwrap();
}

/// What differs between tests.
pub struct AgentSpec {
    pub pool: String,
    /// The libvirt storage pool for job volumes.
    pub storage_pool: String,
    pub labels: Vec<String>,
    pub max_vms: usize,
    pub registration: &'static str,
    /// `[github]` auth line; default: PAT from a file.
    pub auth: Option<String>,
    /// Extra lines appended to the `[[pool]]` table.
    pub pool_extra: String,
    /// Extra lines for `[reconcile]` (default: `stop_grace = "30s"`).
    pub reconcile: String,
    /// Scope line, default the organization.
    pub scope: String,
    pub hook: Option<String>,
    /// Bind the webhook and metrics listeners to 0.0.0.0 (as in production), not loopback.
    pub listen_all: bool,
    /// `log_level` (default: the agent's debug lines too).
    pub log_level: String,
    /// The snapshot slots of its pool stay when the agent goes (drills share them).
    pub keep_slots: bool,
    /// Extra lines for `[server]`.
    pub server_extra: String,
}

impl AgentSpec {
    pub fn new(pool: &str, labels: &[&str]) -> Self {
        AgentSpec {
            pool: pool.into(),
            storage_pool: POOL.into(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
            max_vms: 2,
            registration: "jit",
            auth: None,
            pool_extra: String::new(),
            reconcile: "stop_grace = \"30s\"".into(),
            scope: "organization = \"octo-org\"".into(),
            hook: Some("hook = { type = \"organization\", id = 1 }".into()),
            listen_all: false,
            log_level: "runnervisor=debug,info".into(),
            keep_slots: false,
            server_extra: String::new(),
        }
    }
}

pub struct Agent {
    pub dir: Scratch,
    pub config: PathBuf,
    pub webhook_port: u16,
    pub metrics_port: u16,
    pub log: PathBuf,
    pub child: Option<Child>,
    pub spec_pool: String,
    pub storage_pool: String,
    /// See [`AgentSpec::keep_slots`].
    pub keep_slots: bool,
    /// The agent binary: the one cargo built, or e.g. a package's `/usr/bin/runnervisor`.
    pub bin: PathBuf,
}

impl Agent {
    /// Writes the config for `spec` against `sim_port`, with a fresh webhook port.
    pub fn configure(spec: &AgentSpec, sim_port: u16, webhook_port: u16) -> Agent {
        let img = test_image();
        let dir = tempdir(&spec.pool);
        write_private(&dir.join("pat"), PAT);
        write_private(&dir.join("secret"), SECRET);
        let metrics_port = free_port();
        let labels: Vec<String> = spec.labels.iter().map(|l| format!("{l:?}")).collect();
        let auth = spec.auth.clone().unwrap_or_else(|| {
            format!("auth = {{ type = \"pat\", token = {{ file = \"{}\" }} }}", dir.join("pat").display())
        });
        let text = format!(
            r#"
state_dir = "{dir}/state"
log_level = "{log_level}"

[server]
listen = "{listen}:{webhook_port}"
{server_extra}

[github]
api_url = "http://{gateway}:{sim_port}"
web_url = "http://{gateway}:{sim_port}"
{scope}
{auth}
webhook_secret = {{ file = "{dir}/secret" }}
{hook}

[libvirt]
uri = "{URI}"
storage_pool = "{storage_pool}"
domain_type = "{domain_type}"
network = {{ type = "network", name = "{network}", filter = "{filter}", allow = ["{gateway}:{sim_port}"] }}
console_log_dir = "{dir}/console"

[admin]
socket = "{dir}/admin.sock"

[metrics]
listen = "{listen}:{metrics_port}"

[reconcile]
sweep_interval = "2s"
github_interval = "10s"
{reconcile}

[[pool]]
name = "{pool}"
labels = [{labels}]
image = "{golden}"
kernel = "{kernel}"
initrd = "{initrd}"
vcpus = 1
memory_mib = 512
disk_gib = 4
max_vms = {max_vms}
registration = "{registration}"
accept_token_exposure = {accept}
{pool_extra}
"#,
            dir = dir.display(),
            gateway = lab_gateway(),
            log_level = spec.log_level,
            server_extra = spec.server_extra,
            listen = if spec.listen_all { "0.0.0.0" } else { "127.0.0.1" },
            network = NETWORK,
            filter = filter_name(&spec.pool),
            scope = spec.scope,
            hook = spec.hook.clone().unwrap_or_default(),
            domain_type = domain_type().as_str(),
            reconcile = spec.reconcile,
            pool = spec.pool,
            storage_pool = spec.storage_pool,
            labels = labels.join(", "),
            golden = img.golden.display(),
            kernel = img.kernel.display(),
            initrd = img.initrd.display(),
            max_vms = spec.max_vms,
            registration = spec.registration,
            accept = spec.registration == "token",
            pool_extra = spec.pool_extra,
        );
        let config = dir.join("config.toml");
        std::fs::write(&config, text).unwrap();
        Agent {
            log: dir.join("agent.log"),
            dir,
            config,
            webhook_port,
            metrics_port,
            child: None,
            spec_pool: spec.pool.clone(),
            storage_pool: spec.storage_pool.clone(),
            keep_slots: spec.keep_slots,
            bin: PathBuf::from(env!("CARGO_BIN_EXE_runnervisor")),
        }
    }

    pub fn webhook_url(&self) -> String {
        format!("http://127.0.0.1:{}/webhook", self.webhook_port)
    }

    /// Starts the agent (appending to its log) and waits until its webhook answers.
    pub async fn start(&mut self) {
        self.start_with_env(&[]).await;
    }

    pub async fn start_with_env(&mut self, env: &[(&str, &str)]) {
        self.spawn(env);
        let url = format!("http://127.0.0.1:{}/healthz", self.webhook_port);
        let client = reqwest::Client::new();
        for _ in 0..100 {
            if client.get(&url).send().await.is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited early with {status}:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("agent did not come up:\n{}", self.log_tail());
    }

    /// Starts the agent without waiting for it.
    pub fn spawn(&mut self, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["serve", "--config"]).arg(&self.config).stdout(Stdio::null()).stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM to the agent");
        c.wait().unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let t = self.log_text();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port)).await.unwrap().text().await.unwrap()
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin).args(args).arg("--config").arg(&self.config).output().unwrap()
    }

    /// Whether `name` (a VM's, without a volume's suffix) is a saved slot this agent keeps
    /// ([`AgentSpec::keep_slots`]): `saved`, the names of the saved states there are.
    fn kept_slot(&self, name: &str, saved: &[String]) -> bool {
        self.keep_slots
            && runnervisor::hypervisor::slot_of_pool(name, &self.spec_pool).is_some()
            && saved.iter().any(|s| s == name)
    }

    /// The domains and volumes of this pool on the hypervisor, but for its kept slots'
    /// volumes (a domain of a slot's name is a VM restored from it, and counts).
    pub fn leftovers(&self, hv: &Libvirt) -> (Vec<String>, Vec<String>) {
        let (doms, vols, _) = self.leftovers_and_saved(hv);
        (doms, vols)
    }

    /// [`Agent::leftovers`], and the saved slots there are.
    fn leftovers_and_saved(&self, hv: &Libvirt) -> (Vec<String>, Vec<String>, Vec<String>) {
        let (doms, vols) = leftovers(hv, &format!("rv-{}-", self.spec_pool));
        let saved = saved_states(&vols);
        let vols = vols
            .into_iter()
            .filter(|v| !runnervisor::hypervisor::vm_of_volume(v).is_some_and(|vm| self.kept_slot(vm, &saved)))
            .collect();
        (doms, vols, saved)
    }

    /// Asserts nothing of this pool is left on the hypervisor (its kept slots aside).
    pub fn assert_clean(&self, hv: &Libvirt) {
        let prefix = format!("rv-{}-", self.spec_pool);
        let (doms, vols, saved) = self.leftovers_and_saved(hv);
        assert!(doms.is_empty() && vols.is_empty(), "leaked domains {doms:?} volumes {vols:?}\n{}", self.log_tail());
        // Addresses go after their domains: give a teardown in its last step a moment.
        let held = |hv: &Libvirt| -> Vec<String> {
            let hosts = hv.network_dhcp(NETWORK).map(|d| d.hosts).unwrap_or_default();
            hosts
                .into_iter()
                .map(|h| h.vm)
                .filter(|vm| vm.starts_with(&prefix) && !self.kept_slot(vm, &saved))
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !held(hv).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        let addresses = held(hv);
        assert!(addresses.is_empty(), "leaked addresses of {addresses:?}\n{}", self.log_tail());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        // Anything this test's pool left behind is removed so later tests start clean.
        let storage_pool = self.storage_pool.clone();
        if let Ok(lv) = std::panic::catch_unwind(move || libvirt_on(&storage_pool).0) {
            let prefix = format!("rv-{}-", self.spec_pool);
            let (doms, vols) = leftovers(&lv, &prefix);
            // A saved shared slot stays (its saved state, disk, seed and address); a domain
            // of its name is a VM restored from it, which goes. A slot not saved (its
            // making cut short) goes with everything.
            let saved = saved_states(&vols);
            let slot = |name: &str| self.kept_slot(name, &saved);
            for d in doms {
                if slot(&d) {
                    let _ = lv.destroy(&d);
                } else {
                    let _ = lv.teardown(&d);
                }
            }
            for v in vols.into_iter().filter(|v| !runnervisor::hypervisor::vm_of_volume(v).is_some_and(slot)) {
                let _ = lv.delete_volume(&v);
            }
            let hosts = lv.network_dhcp(NETWORK).map(|d| d.hosts).unwrap_or_default();
            for h in hosts.into_iter().filter(|h| h.vm.starts_with(&prefix) && !slot(&h.vm)) {
                let _ = lv.release_address(NETWORK, &h.vm);
            }
        }
        drop_filter(&filter_name(&self.spec_pool));
    }
}

/// The VMs (slots) whose saved state is among `volumes`.
fn saved_states(volumes: &[String]) -> Vec<String> {
    volumes.iter().filter_map(|v| v.strip_suffix(".save")).map(str::to_string).collect()
}

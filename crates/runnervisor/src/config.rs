//! The configuration file: one struct per TOML table, unknown keys refused, named
//! defaults, and [`Config::validate`] naming the key and the value that is wrong.
//! [`Config::parse`] takes text; [`Config::load`] reads a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::fence::AllowEntry;
use crate::secret::SecretSource;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory of the embedded store (job queue, VM records, delivery ids).
    #[serde(default = "defaults::state_dir")]
    pub state_dir: PathBuf,
    /// Log filter (`info`, `debug`, `runnervisor=debug,info`); `RUST_LOG` overrides it.
    #[serde(default = "defaults::log_level")]
    pub log_level: String,
    pub server: ServerConfig,
    pub github: GitHubConfig,
    #[serde(default)]
    pub libvirt: LibvirtConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub reconcile: ReconcileConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub capacity: CapacityConfig,
    #[serde(rename = "pool")]
    pub pools: Vec<PoolConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the webhook listener binds; the path is `/webhook`.
    pub listen: SocketAddr,
    /// Largest accepted webhook body. A `workflow_job` payload is a few KiB; GitHub sends
    /// at most 25 MiB (the highest value allowed).
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    /// Connections served at once; beyond, new ones wait in the listen backlog.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Deadline for a request's headers (and for an idle keep-alive connection).
    #[serde(default = "defaults::header_timeout", deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// Deadline for a request's body once its headers are in.
    #[serde(default = "defaults::body_timeout", deserialize_with = "duration")]
    pub body_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitHubConfig {
    /// REST base: `https://api.github.com` or `https://HOST/api/v3` (GHES).
    #[serde(default = "defaults::api_url")]
    pub api_url: String,
    /// Web base runners are configured against (`config.sh --url`). Default: derived
    /// from `api_url` (`https://github.com`, or the GHES host).
    #[serde(default)]
    pub web_url: Option<String>,
    /// Exactly one of `repository` ("owner/name"), `organization`, `enterprise`.
    #[serde(default)]
    pub repository: Option<String>,
    #[serde(default)]
    pub organization: Option<String>,
    #[serde(default)]
    pub enterprise: Option<String>,
    /// Runner group new runners join (organization/enterprise scope).
    #[serde(default = "defaults::runner_group")]
    pub runner_group: String,
    pub auth: AuthConfig,
    pub webhook_secret: SecretSource,
    /// The webhook whose failed deliveries are redelivered by the reconciler:
    /// `{ type = "repository", id = N }`, `{ type = "organization", id = N }` or
    /// `{ type = "app" }` (the GitHub App's webhook). Unset: no redelivery.
    #[serde(default)]
    pub hook: Option<HookConfig>,
    /// Timeout of one API call.
    #[serde(default = "defaults::api_timeout", deserialize_with = "duration")]
    pub api_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum AuthConfig {
    /// A personal access token (classic: `repo`/`admin:org`; fine-grained: Administration
    /// or "Self-hosted runners" write).
    Pat { token: SecretSource },
    /// A GitHub App installation (permissions: Administration or organization
    /// "Self-hosted runners" write; Actions read).
    App { app_id: u64, installation_id: u64, private_key: SecretSource },
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum HookConfig {
    Repository { id: u64 },
    Organization { id: u64 },
    App,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    #[serde(default = "defaults::libvirt_uri")]
    pub uri: String,
    /// Storage pool where job overlays and seeds are created.
    #[serde(default = "defaults::storage_pool")]
    pub storage_pool: String,
    /// `kvm` on real hypervisors; `qemu` (TCG) where KVM is unusable.
    #[serde(default = "defaults::domain_type")]
    pub domain_type: DomainType,
    #[serde(default)]
    pub network: NetworkConfig,
    /// Directory for per-VM serial console logs (written by QEMU).
    #[serde(default = "defaults::console_log_dir")]
    pub console_log_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DomainType {
    Kvm,
    Qemu,
}

impl DomainType {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
        }
    }
}

/// How job VMs are networked. Every mode but `user` is fenced (see [`crate::fence`]): an
/// isolated port, and runnervisor's nwfilter allowing the internet and the `allow` list only.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "snake_case")]
pub enum NetworkConfig {
    /// A libvirt NAT network owned by runnervisor (created by the package / `scripts/setup-host`).
    Network {
        #[serde(default = "defaults::network_name")]
        name: String,
        /// The libvirt nwfilter runnervisor defines from this section and puts on every VM.
        #[serde(default = "defaults::filter_name")]
        filter: String,
        /// Non-public endpoints job VMs may reach: `"ADDRESS[/PREFIX]:PORT[-PORT]"` (TCP and UDP).
        #[serde(default)]
        allow: Vec<AllowEntry>,
    },
    /// An existing host bridge (the VMs sit on its LAN segment), with the same fence.
    Bridge {
        name: String,
        #[serde(default = "defaults::filter_name")]
        filter: String,
        #[serde(default)]
        allow: Vec<AllowEntry>,
    },
    /// QEMU user-mode networking (slirp), for labs only: **not fenced** — the guest reaches
    /// this host's loopback at 10.0.2.2. Refused by `check` and warned about at start
    /// unless `accept_unfenced = true`.
    User {
        #[serde(default)]
        accept_unfenced: bool,
    },
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig::Network { name: defaults::network_name(), filter: defaults::filter_name(), allow: Vec::new() }
    }
}

impl NetworkConfig {
    /// The nwfilter and allow-list, for the fenced modes.
    pub fn fence(&self) -> Option<(&str, &[AllowEntry])> {
        match self {
            NetworkConfig::Network { filter, allow, .. } | NetworkConfig::Bridge { filter, allow, .. } => {
                Some((filter, allow))
            }
            NetworkConfig::User { .. } => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Unix socket for `runnervisor status|drain|undrain|vm destroy`.
    #[serde(default = "defaults::admin_socket")]
    pub socket: PathBuf,
    /// Group allowed to use the socket (mode 0660); none: root only (0600).
    #[serde(default)]
    pub group: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityConfig {
    /// Most VMs on this host across all pools (unset: each pool's `max_vms` only).
    #[serde(default)]
    pub max_vms: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve OpenMetrics at `http://<listen>/metrics`.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Loopback by default: expose it deliberately.
    #[serde(default = "defaults::metrics_listen")]
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: true, listen: defaults::metrics_listen() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileConfig {
    /// How often the state of domains and runners is compared with what should be.
    #[serde(default = "defaults::sweep_interval", deserialize_with = "duration")]
    pub sweep_interval: Duration,
    /// How often GitHub's runner list and failed webhook deliveries are reconciled.
    #[serde(default = "defaults::github_interval", deserialize_with = "duration")]
    pub github_interval: Duration,
    /// After `completed` for a VM's job, how long the VM may take to power off.
    #[serde(default = "defaults::stop_grace", deserialize_with = "duration")]
    pub stop_grace: Duration,
    /// On SIGTERM, how long in-flight provisioning steps may take to finish.
    #[serde(default = "defaults::shutdown_grace", deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// The longest provisioning may take (image check, credential, volumes, define, start):
    /// beyond it the VM is torn down, the pool backs off and the job stays queued.
    #[serde(default = "defaults::provision_timeout", deserialize_with = "duration")]
    pub provision_timeout: Duration,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Registration {
    /// `generate-jitconfig`, then `run.sh --jitconfig`.
    #[default]
    Jit,
    /// A registration token, `config.sh ... --ephemeral`, then `run.sh`.
    Token,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Short name (`[a-z0-9-]`, at most 20 characters); VMs are `rv-<pool>-<job id>`.
    pub name: String,
    /// The exact label set a job must carry (case-insensitive), e.g.
    /// `["self-hosted", "linux", "x64"]`. Runners get exactly these labels.
    pub labels: Vec<String>,
    /// Golden qcow2 image the per-job overlays are backed by.
    pub image: PathBuf,
    /// Direct kernel boot (optional): kernel, initrd and command line.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default = "defaults::vcpus")]
    pub vcpus: u32,
    #[serde(default = "defaults::memory_mib")]
    pub memory_mib: u64,
    #[serde(default = "defaults::disk_gib")]
    pub disk_gib: u64,
    #[serde(default = "defaults::max_vms")]
    pub max_vms: usize,
    /// Most VMs of this pool serving one repository's jobs at once (unset: no limit), so
    /// that one repository's large matrix cannot take every slot.
    #[serde(default)]
    pub max_vms_per_repository: Option<usize>,
    #[serde(default)]
    pub registration: Registration,
    /// User in the image that runs the runner (the real runner refuses root).
    #[serde(default = "defaults::runner_user")]
    pub runner_user: String,
    /// Where the runner is installed in the image.
    #[serde(default = "defaults::runner_dir")]
    pub runner_dir: String,
    /// Pass `--disableupdate` in token mode (the image's runner must stay current).
    #[serde(default = "defaults::yes")]
    pub disable_update: bool,
    /// A VM whose runner has not come online in this time is replaced.
    #[serde(default = "defaults::registration_timeout", deserialize_with = "duration")]
    pub registration_timeout: Duration,
    /// A runner with nothing to do for this long is surplus and removed.
    #[serde(default = "defaults::idle_timeout", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// No VM lives longer than this.
    #[serde(default = "defaults::max_lifetime", deserialize_with = "duration")]
    pub max_lifetime: Duration,
    /// VMs tried for one job (runner never registered, VM died early) before it is given up.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// Warn when the image's manifest declares a runner released longer ago than this.
    #[serde(default = "defaults::runner_max_age", deserialize_with = "duration")]
    pub runner_max_age: Duration,
}

mod defaults {
    use super::*;
    pub fn state_dir() -> PathBuf {
        "/var/lib/runnervisor/state".into()
    }
    pub fn log_level() -> String {
        "info".into()
    }
    pub fn max_body_bytes() -> usize {
        1024 * 1024
    }
    pub fn max_connections() -> usize {
        512
    }
    pub fn header_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn body_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn api_url() -> String {
        "https://api.github.com".into()
    }
    pub fn runner_group() -> String {
        "Default".into()
    }
    pub fn api_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn libvirt_uri() -> String {
        "qemu:///system".into()
    }
    pub fn storage_pool() -> String {
        "runnervisor".into()
    }
    pub fn domain_type() -> DomainType {
        DomainType::Kvm
    }
    pub fn network_name() -> String {
        "runnervisor".into()
    }
    pub fn filter_name() -> String {
        "runnervisor-fence".into()
    }
    pub fn console_log_dir() -> PathBuf {
        "/var/log/runnervisor/console".into()
    }
    pub fn metrics_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9464))
    }
    pub fn admin_socket() -> PathBuf {
        "/run/runnervisor/admin.sock".into()
    }
    pub fn sweep_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn github_interval() -> Duration {
        Duration::from_secs(60)
    }
    pub fn stop_grace() -> Duration {
        Duration::from_secs(60)
    }
    pub fn shutdown_grace() -> Duration {
        Duration::from_secs(30)
    }
    pub fn provision_timeout() -> Duration {
        Duration::from_secs(600)
    }
    pub fn vcpus() -> u32 {
        2
    }
    pub fn memory_mib() -> u64 {
        4096
    }
    pub fn disk_gib() -> u64 {
        20
    }
    pub fn max_vms() -> usize {
        2
    }
    pub fn runner_user() -> String {
        "runner".into()
    }
    pub fn runner_dir() -> String {
        "/opt/actions-runner".into()
    }
    pub fn yes() -> bool {
        true
    }
    pub fn registration_timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(20)
    }
    pub fn max_lifetime() -> Duration {
        Duration::from_secs(6 * 3600)
    }
    pub fn max_attempts() -> u32 {
        3
    }
    pub fn runner_max_age() -> Duration {
        Duration::from_secs(30 * 86400)
    }
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        LibvirtConfig {
            uri: defaults::libvirt_uri(),
            storage_pool: defaults::storage_pool(),
            domain_type: defaults::domain_type(),
            network: NetworkConfig::default(),
            console_log_dir: defaults::console_log_dir(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { socket: defaults::admin_socket(), group: None }
    }
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            sweep_interval: defaults::sweep_interval(),
            github_interval: defaults::github_interval(),
            stop_grace: defaults::stop_grace(),
            shutdown_grace: defaults::shutdown_grace(),
            provision_timeout: defaults::provision_timeout(),
        }
    }
}

/// Durations are written as `"30s"`, `"5m"`, `"6h"`.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{key} = {value}: {reason}")]
    Invalid { key: String, value: String, reason: String },
}

fn invalid(key: impl Into<String>, value: impl std::fmt::Debug, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), value: format!("{value:?}"), reason: reason.into() }
}

/// Where runners are registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Repository { owner: String, name: String },
    Organization(String),
    Enterprise(String),
}

impl Scope {
    /// REST path prefix: `repos/o/r`, `orgs/o`, `enterprises/e`.
    pub fn api_path(&self) -> String {
        match self {
            Scope::Repository { owner, name } => format!("repos/{owner}/{name}"),
            Scope::Organization(o) => format!("orgs/{o}"),
            Scope::Enterprise(e) => format!("enterprises/{e}"),
        }
    }
    /// Whether a delivery about `repository` ("owner/name"), from an enterprise account
    /// `enterprise` (its slug, when the payload names one), is within this scope.
    /// Logins and names compare case-insensitively, as GitHub's do.
    pub fn admits(&self, repository: &str, enterprise: Option<&str>) -> bool {
        match self {
            Scope::Repository { owner, name } => repository.eq_ignore_ascii_case(&format!("{owner}/{name}")),
            Scope::Organization(o) => {
                repository.split_once('/').is_some_and(|(owner, _)| owner.eq_ignore_ascii_case(o))
            }
            Scope::Enterprise(e) => enterprise.is_some_and(|slug| slug.eq_ignore_ascii_case(e)),
        }
    }
    /// Path under the web URL given to `config.sh --url`.
    pub fn web_path(&self) -> String {
        match self {
            Scope::Repository { owner, name } => format!("{owner}/{name}"),
            Scope::Organization(o) => o.clone(),
            Scope::Enterprise(e) => format!("enterprises/{e}"),
        }
    }
}

fn valid_slug(s: &str) -> bool {
    !s.is_empty() && s.len() <= 100 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl GitHubConfig {
    pub fn scope(&self) -> Scope {
        if let Some(r) = &self.repository {
            let (owner, name) = r.split_once('/').unwrap_or((r, ""));
            Scope::Repository { owner: owner.into(), name: name.into() }
        } else if let Some(o) = &self.organization {
            Scope::Organization(o.clone())
        } else {
            Scope::Enterprise(self.enterprise.clone().unwrap_or_default())
        }
    }

    /// `https://github.com` for api.github.com; `https://HOST` for `https://HOST/api/v3`.
    pub fn web_url(&self) -> String {
        if let Some(w) = &self.web_url {
            return w.trim_end_matches('/').to_string();
        }
        let api = self.api_url.trim_end_matches('/');
        if api == "https://api.github.com" {
            "https://github.com".into()
        } else {
            api.trim_end_matches("/api/v3").to_string()
        }
    }
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse(m) => ConfigError::Parse(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// Checks what types cannot: one scope, sane URLs, names, label sets, sizes and timers.
    /// File existence is checked by `runnervisor check` and at start, not here.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let g = &self.github;
        let scopes = [g.repository.is_some(), g.organization.is_some(), g.enterprise.is_some()];
        match scopes.iter().filter(|s| **s).count() {
            1 => {}
            0 => {
                return Err(invalid("github", "(none)", "set exactly one of repository, organization, enterprise"));
            }
            _ => {
                return Err(invalid(
                    "github",
                    "several scopes",
                    "set exactly one of repository, organization, enterprise",
                ));
            }
        }
        if let Some(r) = &g.repository {
            let ok = r.split_once('/').is_some_and(|(o, n)| valid_slug(o) && valid_slug(n));
            if !ok {
                return Err(invalid("github.repository", r, "must be \"owner/name\""));
            }
        }
        if let Some(o) = g.organization.as_ref().filter(|o| !valid_slug(o)) {
            return Err(invalid("github.organization", o, "not a valid organization login"));
        }
        if let Some(e) = g.enterprise.as_ref().filter(|e| !valid_slug(e)) {
            return Err(invalid("github.enterprise", e, "not a valid enterprise slug"));
        }
        for (key, url) in [("github.api_url", Some(&g.api_url)), ("github.web_url", g.web_url.as_ref())] {
            if let Some(u) = url
                && (!(u.starts_with("https://") || u.starts_with("http://")) || u.len() < 10)
            {
                return Err(invalid(key, u, "must be an http(s) URL"));
            }
        }
        match (&g.hook, g.scope(), &g.auth) {
            (Some(HookConfig::Repository { .. }), Scope::Repository { .. }, _)
            | (Some(HookConfig::Organization { .. }), Scope::Organization(_), _)
            | (Some(HookConfig::App), _, AuthConfig::App { .. })
            | (None, _, _) => {}
            (Some(h), _, _) => {
                return Err(invalid(
                    "github.hook",
                    h,
                    "a repository hook needs repository scope, an organization hook organization scope, an app hook App auth",
                ));
            }
        }
        if g.runner_group.trim().is_empty() {
            return Err(invalid("github.runner_group", &g.runner_group, "must not be empty"));
        }
        if !(1024..=25 * 1024 * 1024).contains(&self.server.max_body_bytes) {
            return Err(invalid(
                "server.max_body_bytes",
                self.server.max_body_bytes,
                "must be 1024 to 26214400 (GitHub's 25 MiB)",
            ));
        }
        if !(1..=65536).contains(&self.server.max_connections) {
            return Err(invalid("server.max_connections", self.server.max_connections, "must be 1 to 65536"));
        }
        for (key, d) in
            [("server.header_timeout", self.server.header_timeout), ("server.body_timeout", self.server.body_timeout)]
        {
            if !(Duration::from_millis(100)..=Duration::from_secs(300)).contains(&d) {
                return Err(invalid(key, d, "must be 100ms to 5m"));
            }
        }
        if self.libvirt.storage_pool.is_empty() {
            return Err(invalid("libvirt.storage_pool", "", "must not be empty"));
        }
        if let NetworkConfig::Network { name, filter, .. } | NetworkConfig::Bridge { name, filter, .. } =
            &self.libvirt.network
        {
            if name.is_empty() || name.contains('/') {
                return Err(invalid("libvirt.network.name", name, "must be a network or bridge name"));
            }
            let ok = !filter.is_empty()
                && filter.len() <= 64
                && filter.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(invalid(
                    "libvirt.network.filter",
                    filter,
                    "use 1-64 characters of a-z, 0-9, '-', '_', '.'",
                ));
            }
        }
        if self.reconcile.sweep_interval < Duration::from_secs(1) {
            return Err(invalid("reconcile.sweep_interval", self.reconcile.sweep_interval, "must be at least 1s"));
        }
        if self.reconcile.github_interval < Duration::from_secs(5) {
            return Err(invalid("reconcile.github_interval", self.reconcile.github_interval, "must be at least 5s"));
        }
        if self.reconcile.provision_timeout < Duration::from_secs(30) {
            return Err(invalid(
                "reconcile.provision_timeout",
                self.reconcile.provision_timeout,
                "must be at least 30s (creating volumes and starting a domain takes seconds)",
            ));
        }
        if self.pools.is_empty() {
            return Err(invalid("pool", "[]", "configure at least one [[pool]]"));
        }
        if let Some(n) = self.capacity.max_vms
            && !(1..=10_000).contains(&n)
        {
            return Err(invalid("capacity.max_vms", n, "must be 1 to 10000"));
        }
        let mut label_sets: Vec<(String, Vec<String>)> = Vec::new();
        for (i, p) in self.pools.iter().enumerate() {
            let key = |k: &str| format!("pool[{i}].{k}");
            let name_ok = !p.name.is_empty()
                && p.name.len() <= 20
                && p.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !p.name.starts_with('-')
                && !p.name.ends_with('-');
            if !name_ok {
                return Err(invalid(key("name"), &p.name, "use 1-20 characters of a-z, 0-9 and '-' (not at the ends)"));
            }
            if self.pools[..i].iter().any(|q| q.name == p.name) {
                return Err(invalid(key("name"), &p.name, "another pool has this name"));
            }
            if p.labels.is_empty() || p.labels.len() > 100 {
                return Err(invalid(key("labels"), &p.labels, "give 1 to 100 labels"));
            }
            let mut normalized: Vec<String> = Vec::new();
            for l in &p.labels {
                if l.trim().is_empty() || l.trim() != l || l.contains(',') || l.len() > 256 {
                    return Err(invalid(
                        key("labels"),
                        l,
                        "labels are non-empty, without commas or surrounding spaces",
                    ));
                }
                let n = l.to_lowercase();
                if normalized.contains(&n) {
                    return Err(invalid(key("labels"), l, "duplicate label (labels compare case-insensitively)"));
                }
                normalized.push(n);
            }
            normalized.sort();
            if let Some((other, _)) = label_sets.iter().find(|(_, s)| *s == normalized) {
                return Err(invalid(key("labels"), &p.labels, format!("pool {other:?} has the same label set")));
            }
            label_sets.push((p.name.clone(), normalized));
            if !p.image.is_absolute() {
                return Err(invalid(key("image"), &p.image, "must be an absolute path"));
            }
            for (k, v) in [("kernel", &p.kernel), ("initrd", &p.initrd)] {
                if let Some(path) = v.as_ref().filter(|p| !p.is_absolute()) {
                    return Err(invalid(key(k), path, "must be an absolute path"));
                }
            }
            if p.initrd.is_some() && p.kernel.is_none() {
                return Err(invalid(key("initrd"), &p.initrd, "needs pool.kernel too"));
            }
            if !(1..=256).contains(&p.vcpus) {
                return Err(invalid(key("vcpus"), p.vcpus, "must be 1 to 256"));
            }
            if !(128..=4 * 1024 * 1024).contains(&p.memory_mib) {
                return Err(invalid(key("memory_mib"), p.memory_mib, "must be 128 to 4194304"));
            }
            if !(1..=65536).contains(&p.disk_gib) {
                return Err(invalid(key("disk_gib"), p.disk_gib, "must be 1 to 65536"));
            }
            if !(1..=1000).contains(&p.max_vms) {
                return Err(invalid(key("max_vms"), p.max_vms, "must be 1 to 1000"));
            }
            if p.runner_user.is_empty()
                || p.runner_user == "root"
                || !p.runner_user.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(invalid(key("runner_user"), &p.runner_user, "a plain, non-root user name"));
            }
            if !p.runner_dir.starts_with('/') {
                return Err(invalid(key("runner_dir"), &p.runner_dir, "must be an absolute path in the image"));
            }
            if let Some(n) = p.max_vms_per_repository
                && !(1..=p.max_vms).contains(&n)
            {
                return Err(invalid(key("max_vms_per_repository"), n, format!("must be 1 to max_vms ({})", p.max_vms)));
            }
            if p.max_attempts == 0 {
                return Err(invalid(key("max_attempts"), p.max_attempts, "must be at least 1"));
            }
            if p.max_lifetime <= p.registration_timeout {
                return Err(invalid(key("max_lifetime"), p.max_lifetime, "must be longer than registration_timeout"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [server]
        listen = "127.0.0.1:8080"
        [github]
        organization = "octo-org"
        auth = { type = "pat", token = { file = "/etc/runnervisor/pat" } }
        webhook_secret = { credential = "webhook-secret" }
        [[pool]]
        name = "small"
        labels = ["self-hosted", "linux"]
        image = "/var/lib/runnervisor/images/golden.qcow2"
    "#;

    fn with(extra_github: &str, pool: &str) -> String {
        MINIMAL.replace("organization = \"octo-org\"", extra_github).replace("name = \"small\"", pool)
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../../../config.toml.example");
        let c = Config::parse(text).unwrap_or_else(|e| panic!("config.toml.example: {e}"));
        assert!(!c.pools.is_empty());
    }

    #[test]
    fn defaults_are_filled_in() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.libvirt.uri, "qemu:///system");
        assert_eq!(c.libvirt.domain_type, DomainType::Kvm);
        assert_eq!(
            c.libvirt.network,
            NetworkConfig::Network { name: "runnervisor".into(), filter: "runnervisor-fence".into(), allow: vec![] },
            "the default network is the fenced one"
        );
        assert_eq!(c.server.max_body_bytes, 1024 * 1024);
        assert_eq!(c.server.max_connections, 512);
        assert_eq!(
            (c.server.header_timeout, c.server.body_timeout),
            (Duration::from_secs(10), Duration::from_secs(10))
        );
        assert_eq!(c.pools[0].registration, Registration::Jit);
        assert_eq!(c.github.web_url(), "https://github.com");
        assert_eq!(c.github.scope(), Scope::Organization("octo-org".into()));
        assert_eq!(c.github.scope().api_path(), "orgs/octo-org");
        assert!(matches!(c.github.auth, AuthConfig::Pat { .. }));
    }

    #[test]
    fn network_modes_and_the_allow_list() {
        let net =
            |line: &str| Config::parse(&format!("{MINIMAL}\n[libvirt]\nnetwork = {line}\n")).map(|c| c.libvirt.network);
        let n = net(r#"{ type = "network", allow = ["10.20.0.5:443", "192.168.10.0/24:3128-3130"] }"#).unwrap();
        let (filter, allow) = n.fence().unwrap();
        assert_eq!(filter, "runnervisor-fence");
        assert_eq!(
            allow.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["10.20.0.5:443", "192.168.10.0/24:3128-3130"]
        );
        let n = net(r#"{ type = "bridge", name = "br0", filter = "lan-fence" }"#).unwrap();
        assert_eq!(n.fence().unwrap().0, "lan-fence");
        assert_eq!(net(r#"{ type = "user" }"#).unwrap(), NetworkConfig::User { accept_unfenced: false });
        assert!(net(r#"{ type = "user" }"#).unwrap().fence().is_none(), "slirp is not fenced");
        let e = net(r#"{ type = "network", allow = ["10.20.0.5"] }"#).unwrap_err().to_string();
        assert!(e.contains("allow") && e.contains("\"10.20.0.5\"") && e.contains("PORT"), "{e}");
        let e = net(r#"{ type = "network", allow = ["10.20.0.0/8:443"] }"#).unwrap_err().to_string();
        assert!(e.contains("10.20.0.0/8") && e.contains("host bits"), "{e}");
        let e = net(r#"{ type = "network", filter = "a b" }"#).unwrap_err().to_string();
        assert!(e.contains("libvirt.network.filter") && e.contains("a b"), "{e}");
        let e = net(r#"{ type = "user", allow = ["1.2.3.4:80"] }"#).unwrap_err().to_string();
        assert!(e.contains("allow"), "slirp takes no allow-list: {e}");
    }

    #[test]
    fn scope_admits_deliveries_of_its_own_only() {
        let repo = Scope::Repository { owner: "octo-org".into(), name: "app".into() };
        let org = Scope::Organization("octo-org".into());
        let ent = Scope::Enterprise("octo-ent".into());
        let table: &[(&Scope, &str, Option<&str>, bool)] = &[
            (&repo, "octo-org/app", None, true),
            (&repo, "Octo-Org/App", None, true),
            (&repo, "octo-org/app2", None, false),
            (&repo, "other/app", None, false),
            (&org, "octo-org/anything", None, true),
            (&org, "OCTO-ORG/x", Some("octo-ent"), true),
            (&org, "octo-org2/x", None, false),
            (&org, "evil/octo-org", None, false),
            (&ent, "any-org/x", Some("octo-ent"), true),
            (&ent, "any-org/x", Some("Octo-Ent"), true),
            (&ent, "any-org/x", Some("other-ent"), false),
            (&ent, "any-org/x", None, false),
        ];
        for (scope, repository, enterprise, want) in table {
            assert_eq!(scope.admits(repository, *enterprise), *want, "{scope:?} {repository} {enterprise:?}");
        }
    }

    #[test]
    fn ghes_web_url_is_derived() {
        let c = Config::parse(&MINIMAL.replace("[github]", "[github]\napi_url = \"https://ghe.example.com/api/v3\""))
            .unwrap();
        assert_eq!(c.github.web_url(), "https://ghe.example.com");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let e = err(&MINIMAL.replace("[server]", "[server]\nlisten_port = 1"));
        assert!(e.contains("listen_port"), "{e}");
        let e = err(&format!("{MINIMAL}\nbogus = 1\n"));
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let e = err(&with("organization = \"octo-org\"\nrepository = \"a/b\"", "name = \"small\""));
        assert!(e.contains("exactly one"), "{e}");
        let e = err(&with("repository = \"nonsense\"", "name = \"small\""));
        assert!(e.contains("github.repository") && e.contains("nonsense"), "{e}");
        let e = err(&with("organization = \"octo-org\"", "name = \"Big_Pool\""));
        assert!(e.contains("pool[0].name") && e.contains("Big_Pool"), "{e}");
        let e = err(&MINIMAL.replace("[\"self-hosted\", \"linux\"]", "[\"self-hosted\", \"a,b\"]"));
        assert!(e.contains("pool[0].labels") && e.contains("a,b"), "{e}");
        let e = err(&MINIMAL.replace("[\"self-hosted\", \"linux\"]", "[\"Linux\", \"linux\"]"));
        assert!(e.contains("duplicate"), "{e}");
        let e = err(&MINIMAL.replace("image = \"/var", "image = \"var"));
        assert!(e.contains("pool[0].image"), "{e}");
        let e = err(&format!("{MINIMAL}\nmax_vms = 2\nmax_vms_per_repository = 3\n"));
        assert!(e.contains("pool[0].max_vms_per_repository") && e.contains('3'), "{e}");
        let e = err(&MINIMAL.replace("[[pool]]", "[capacity]\nmax_vms = 0\n[[pool]]"));
        assert!(e.contains("capacity.max_vms"), "{e}");
        let e = err(&format!("{MINIMAL}\nmax_vms = 0\n"));
        assert!(e.contains("pool[0].max_vms") && e.contains('0'), "{e}");
        let e = err(&format!("{MINIMAL}\nidle_timeout = \"soon\"\n"));
        assert!(e.contains("invalid duration") && e.contains("soon"), "{e}");
        let e = err(&MINIMAL.replace("listen = \"127.0.0.1:8080\"", "listen = \"localhost\""));
        assert!(e.contains("listen"), "{e}");
        let e = err(&format!("{MINIMAL}\nrunner_user = \"root\"\n"));
        assert!(e.contains("runner_user"), "{e}");
        let e = err(&MINIMAL.replace("type = \"pat\"", "type = \"oauth\""));
        assert!(e.contains("oauth"), "{e}");
        let dup = format!(
            "{MINIMAL}\n[[pool]]\nname = \"other\"\nlabels = [\"LINUX\", \"self-hosted\"]\nimage = \"/x.qcow2\"\n"
        );
        assert!(err(&dup).contains("same label set"));
        let no_pools = format!("pool = []\n{}", &MINIMAL[..MINIMAL.find("[[pool]]").unwrap()]);
        let e = err(&no_pools);
        assert!(e.contains("at least one"), "{e}");
    }
}

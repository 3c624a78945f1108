//! The configuration file: one struct per TOML table, unknown keys refused, named
//! defaults, and [`Config::validate`] naming the key and the value that is wrong.
//! [`Config::parse`] takes text; [`Config::load`] reads a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::fence::AllowEntry;
use crate::secret::SecretSource;

mod reload;
mod scope;
mod validate;

pub use reload::{ReloadReport, Reloaded, reload};
pub use scope::Scope;
pub use validate::redact_url;

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
    /// Fleet mode: this host is one of several sharing one job queue on PostgreSQL.
    /// Absent: a single host, with its embedded store alone.
    #[serde(default)]
    pub fleet: Option<FleetConfig>,
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
    /// Deadline for a request's body once its headers are in, and for a response once the
    /// peer stops taking it (a peer that pipelines requests and reads no answer).
    #[serde(default = "defaults::body_timeout", deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// Connections one source address (IPv6: its /64) holds at once; beyond, closed at
    /// accept. Behind a reverse proxy every connection comes from the proxy: set it to
    /// `max_connections` there.
    #[serde(default = "defaults::max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// Sources that may connect at all (CIDRs, and `"github"` for GitHub's published hook
    /// ranges); absent: any. Others are closed at accept.
    #[serde(default)]
    pub allow_sources: Option<Vec<crate::sources::SourceRule>>,
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

    /// The libvirt network VMs join (`network` mode), where each gets a reserved address.
    pub fn libvirt_network(&self) -> Option<&str> {
        match self {
            NetworkConfig::Network { name, .. } => Some(name),
            _ => None,
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
    /// The longest provisioning may take (image check, credential, volumes, define, start),
    /// and a snapshot slot's save: beyond it the pool backs off and the job stays queued
    /// (for another VM); the VM is torn down once its hung call returns.
    #[serde(default = "defaults::provision_timeout", deserialize_with = "duration")]
    pub provision_timeout: Duration,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Registration {
    /// `generate-jitconfig`; the guest unpacks it into the runner's files, then `run.sh`.
    #[default]
    Jit,
    /// A registration token (in `config.sh`'s environment), `config.sh ... --ephemeral`,
    /// then `run.sh`.
    Token,
}

/// Where a pool's jobs come from.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Intake {
    /// `workflow_job` webhooks (and the reconciler's polling): a job whose labels are
    /// exactly the pool's.
    #[default]
    Webhook,
    /// The pool is a runner scale set (GitHub's Runner Scale Set protocol): the agent
    /// long-polls GitHub for the jobs GitHub assigns to the set; nothing inbound.
    ScaleSet,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Short name (`[a-z0-9-]`, at most 20 characters); VMs are `rv-<pool>-<job id>` (warm
    /// ones `rv-<pool>-w<seq>`).
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
    /// With `registration = "token"`: the operator accepts that a job with root in its VM
    /// can read the registration token (the guest's memory keeps it after `config.sh` has
    /// used it): valid for an hour, for the whole scope, enough to register runners that
    /// take other repositories' jobs. Refused without it.
    #[serde(default)]
    pub accept_token_exposure: bool,
    /// `webhook` (default) or `scale_set`: see [`Intake`].
    #[serde(default)]
    pub intake: Intake,
    /// With `intake = "scale_set"`: the scale set's name at the scope, in `github.runner_group`
    /// (made at start when missing; jobs ask for it with `runs-on: <name>`). Default: the
    /// pool's name.
    #[serde(default)]
    pub scale_set_name: Option<String>,
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
    /// VMs kept booted and waiting, without any credential, for the pool's next jobs
    /// (within `max_vms`). A job's runner credential is delivered into one when it arrives.
    #[serde(default)]
    pub warm: usize,
    /// VMs kept saved (memory and disk, by libvirt), not running, for the pool's next jobs:
    /// a job that finds no warm VM waiting gets one restored onto a fresh overlay (about
    /// 2 s) instead of a cold boot. Each slot costs its saved state and disk on the job
    /// storage pool, no CPU and no RAM while it waits. Needs a libvirt network (the saved
    /// VM keeps its fixed address) and an image of bind protocol 3 or later.
    #[serde(default)]
    pub snapshot_slots: usize,
    /// A warm VM waiting longer than this is replaced by a fresh one.
    #[serde(default = "defaults::warm_max_age", deserialize_with = "duration")]
    pub warm_max_age: Duration,
    /// A warm VM that has not acknowledged its job's runner command in this time is
    /// destroyed, and the job goes the cold path.
    #[serde(default = "defaults::bind_timeout", deserialize_with = "duration")]
    pub bind_timeout: Duration,
    /// Removed from the configuration by a reload: it takes no jobs and makes no VM; its
    /// VMs finish, and it is forgotten once it has none. Never read from the file.
    #[serde(skip)]
    pub retiring: bool,
}

/// `[fleet]`: the members of a fleet share one job queue (PostgreSQL); each serves the
/// jobs it claims, up to its capacity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// This member's name, unique in the fleet; its VMs and claims carry it. Default: the
    /// host name.
    #[serde(default)]
    pub host_id: Option<String>,
    pub postgres: PostgresConfig,
    /// How long a member holds a job it claimed without renewing the claim: a member that
    /// dies or is cut off loses its unserved jobs to the others after this.
    #[serde(default = "defaults::lease", deserialize_with = "duration")]
    pub lease: Duration,
    /// A member that would boot a VM cold leaves a job this long to the others (unless the
    /// job is older), while another member keeps warm VMs (`warm` in its pools).
    #[serde(default = "defaults::cold_head_start", deserialize_with = "duration")]
    pub cold_head_start: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// A libpq connection URI or key=value string, without the password:
    /// `postgres://runnervisor@db.example:5432/runnervisor?sslmode=require`. With
    /// `sslmode=prefer|require` the server's certificate is verified (system roots and
    /// `ca_file`) and must name the host. Off this host (not loopback, not a Unix socket)
    /// TLS is required unless it says `sslmode=disable`: `prefer`, written or not, counts
    /// as `require` there, since it would fall back to plain text for whoever refuses TLS.
    pub url: String,
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// A CA certificate (PEM) the server's certificate may chain to.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Pooled connections this member keeps to the database at most (intake, reads,
    /// claims); besides them it holds one for renewals and the lead and one that listens.
    #[serde(default = "defaults::pg_connections")]
    pub max_connections: usize,
}

impl FleetConfig {
    /// `host_id`, or this machine's host name.
    pub fn host_id(&self) -> String {
        self.host_id.clone().unwrap_or_else(|| {
            nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
        })
    }
}

mod defaults {
    use super::*;
    pub fn lease() -> Duration {
        Duration::from_secs(60)
    }
    pub fn cold_head_start() -> Duration {
        Duration::from_secs(1)
    }
    pub fn pg_connections() -> usize {
        8
    }
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
    pub fn max_connections_per_source() -> usize {
        16
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
    pub fn warm_max_age() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn bind_timeout() -> Duration {
        Duration::from_secs(15)
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

impl PoolConfig {
    /// The scale set's name (`scale_set_name`, or the pool's), for `intake = "scale_set"`.
    pub fn scale_set(&self) -> Option<&str> {
        (self.intake == Intake::ScaleSet).then(|| self.scale_set_name.as_deref().unwrap_or(&self.name))
    }

    /// What the fleet's queue files this pool's jobs under ([`crate::model::JobInfo::queue_labels`]).
    pub fn queue_labels(&self) -> Vec<String> {
        match self.scale_set() {
            Some(set) => crate::model::scale_set_key(set),
            None => self.labels.clone(),
        }
    }

    /// Whether this pool's scale set takes a job asking for `labels`: GitHub routes a job
    /// to the set whose name and labels include all of its own (case-insensitively).
    pub fn scale_set_covers(&self, labels: &[String]) -> bool {
        let Some(name) = self.scale_set() else { return false };
        labels.iter().all(|l| l.eq_ignore_ascii_case(name) || self.labels.iter().any(|x| x.eq_ignore_ascii_case(l)))
    }

    /// A retiring pool of this name with the default settings (see [`reload`]): what the
    /// agent knows of a pool its store has VMs of and its configuration does not.
    pub fn retiring(name: &str) -> Result<PoolConfig, toml::de::Error> {
        let mut t = toml::Table::new();
        t.insert("name".into(), name.into());
        t.insert("labels".into(), toml::Value::Array(Vec::new()));
        t.insert("image".into(), "/nonexistent".into());
        let pool: PoolConfig = toml::Value::Table(t).try_into()?;
        Ok(PoolConfig { retiring: true, ..pool })
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

    /// The `max_attempts` of pool `name`; 1 for a pool no longer configured.
    pub fn max_attempts(&self, name: &str) -> u32 {
        self.pool(name).map_or(1, |p| p.max_attempts)
    }
}

#[cfg(test)]
mod tests;

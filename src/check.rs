//! `runnervisor check`: validates a configuration against the real world — secrets,
//! state directory, libvirt, storage pool, domain type, golden images, GitHub credentials
//! and permissions, webhook access — one ✔/✘ line per check, with the fix for each ✘.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{AuthConfig, Config, NetworkConfig, Scope};
use crate::github::GitHub;
use crate::github::app::AppSigner;
use crate::github::http::{Auth, HttpGitHub, RetryPolicy};
use crate::hypervisor::libvirt::Libvirt;
use crate::hypervisor::network;
use crate::hypervisor::{self, Hypervisor};
use crate::images;
use crate::secret::{Credentials, credentials_outside_service};

#[derive(Debug, Clone)]
pub struct Line {
    pub ok: bool,
    /// Passes, but deserves the operator's attention (shown with ⚠).
    pub warn: bool,
    pub what: String,
    pub detail: String,
    pub fix: Option<String>,
}

fn ok(what: impl Into<String>, detail: impl Into<String>) -> Line {
    Line { ok: true, warn: false, what: what.into(), detail: detail.into(), fix: None }
}

fn warn(what: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Line {
    Line { ok: true, warn: true, what: what.into(), detail: detail.into(), fix: Some(fix.into()) }
}

fn bad(what: impl Into<String>, detail: impl std::fmt::Display, fix: impl Into<String>) -> Line {
    Line { ok: false, warn: false, what: what.into(), detail: detail.to_string(), fix: Some(fix.into()) }
}

pub fn render(lines: &[Line]) -> String {
    let mut out = String::new();
    for l in lines {
        let mark = match (l.ok, l.warn) {
            (false, _) => "✘",
            (true, true) => "⚠",
            (true, false) => "✔",
        };
        out.push_str(&format!("{mark} {}: {}\n", l.what, l.detail));
        if let Some(f) = &l.fix {
            out.push_str(&format!("    fix: {f}\n"));
        }
    }
    let failed = lines.iter().filter(|l| !l.ok).count();
    let warned = lines.iter().filter(|l| l.warn).count();
    let warnings = if warned == 0 { String::new() } else { format!(" ({warned} with a warning)") };
    out.push_str(&if failed == 0 {
        format!("all {} checks passed{warnings}\n", lines.len())
    } else {
        format!("{failed} of {} checks failed{warnings}\n", lines.len())
    });
    out
}

fn permission_hint(scope: &Scope, app: bool) -> String {
    match (scope, app) {
        (Scope::Repository { .. }, false) => "a fine-grained PAT needs repository permission \"Administration: Read and write\" (classic: scope `repo`)".into(),
        (Scope::Repository { .. }, true) => "the GitHub App needs repository permission \"Administration: Read and write\" and must be installed on the repository".into(),
        (Scope::Organization(_), false) => "a fine-grained PAT needs organization permission \"Self-hosted runners: Read and write\" (classic: scope `admin:org`)".into(),
        (Scope::Organization(_), true) => "the GitHub App needs organization permission \"Self-hosted runners: Read and write\" and must be installed on the organization".into(),
        (Scope::Enterprise(_), _) => "enterprise runners need a classic PAT with scope `manage_runners:enterprise` of an enterprise owner".into(),
    }
}

pub async fn run(path: &Path) -> Vec<Line> {
    let mut lines = Vec::new();
    let config = match Config::load(path) {
        Ok(c) => {
            lines.push(ok("configuration", format!("{} is valid ({} pools)", path.display(), c.pools.len())));
            c
        }
        Err(e) => {
            lines.push(bad("configuration", e, "fix the key named above (see config.toml.example)"));
            return lines;
        }
    };
    // Outside the service (from a shell): the files its unit loads, as it would get them.
    let creds = credentials_outside_service();
    let named = [
        Some(&config.github.webhook_secret),
        match &config.github.auth {
            AuthConfig::Pat { token } => Some(token),
            AuthConfig::App { private_key, .. } => Some(private_key),
        },
        config.fleet.as_ref().and_then(|f| f.postgres.password.as_ref()),
    ]
    .into_iter()
    .flatten()
    .any(|s| matches!(s, crate::secret::SecretSource::Credential(_)));
    if let (true, Some(Credentials::Unit { unit, .. })) = (named, &creds) {
        lines.push(ok("credentials", format!("read from the files {unit}'s LoadCredential= names")));
    }
    match config.github.webhook_secret.load(creds.as_ref()) {
        Ok(_) => lines.push(ok("webhook secret", "readable, not world-readable")),
        Err(e) => lines.push(bad(
            "webhook secret",
            e,
            "write the secret GitHub signs with into that file, mode 0600 (or LoadCredential=webhook-secret:FILE)",
        )),
    }
    let auth = match &config.github.auth {
        AuthConfig::Pat { token } => match token.load(creds.as_ref()) {
            Ok(t) => {
                lines.push(ok("GitHub token", "readable, not world-readable"));
                Some(Auth::Pat(t))
            }
            Err(e) => {
                lines.push(bad("GitHub token", e, "store the PAT in that file, mode 0600 (or LoadCredential=)"));
                None
            }
        },
        AuthConfig::App { app_id, installation_id, private_key } => match private_key
            .load(creds.as_ref())
            .map_err(|e| e.to_string())
            .and_then(|k| AppSigner::new(*app_id, &k).map_err(|e| e.to_string()))
        {
            Ok(signer) => {
                lines.push(ok("GitHub App key", format!("app {app_id}: RSA private key loaded")));
                Some(Auth::App { signer: Box::new(signer), installation_id: *installation_id })
            }
            Err(e) => {
                lines.push(bad("GitHub App key", e, "download the App's private key (PEM) into that file, mode 0600"));
                None
            }
        },
    };
    lines.push(state_dir(&config.state_dir));
    if let Some(fleet) = &config.fleet {
        lines.push(check_fleet(fleet, creds.as_ref()).await);
    }
    check_libvirt(&config, &mut lines).await;
    for pool in &config.pools {
        check_pool_image(pool, &mut lines);
    }
    if let Some(auth) = auth {
        check_github(&config, auth, &mut lines).await;
    }
    lines
}

/// The fleet's database: reachable with these credentials, its schema, the privileges.
pub async fn check_fleet(fleet: &crate::config::FleetConfig, creds: Option<&Credentials>) -> Line {
    let what = "fleet database";
    let password = match &fleet.postgres.password {
        Some(p) => match p.load(creds) {
            Ok(s) => Some(s),
            Err(e) => return bad(what, e, "store the database password in that file, mode 0600 (or LoadCredential=)"),
        },
        None => None,
    };
    let member = match crate::fleet::Member::new(fleet, password.as_ref()) {
        Ok(m) => m,
        Err(e) => return bad(what, e, "check fleet.postgres (url, ca_file)"),
    };
    let url = crate::config::redact_url(&fleet.postgres.url);
    let probe = match tokio::time::timeout(Duration::from_secs(10), crate::fleet::probe(&member.pool)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            return bad(
                what,
                format!("{url}: {e}"),
                "is PostgreSQL reachable from this host? are the user, password, sslmode and ca_file right?",
            );
        }
        Err(_) => return bad(what, format!("{url}: no answer in 10 s"), "is PostgreSQL reachable from this host?"),
    };
    let latest = crate::fleet::schema::latest();
    let schema = match probe.schema {
        0 => format!("no schema yet (created at start, version {latest})"),
        v if v < latest => format!("schema version {v} (migrated to {latest} at start)"),
        v if v == latest => format!("schema version {v}"),
        v => {
            return bad(
                what,
                format!("schema version {v} is newer than this agent knows ({latest})"),
                "upgrade runnervisor on this host (another member is newer)",
            );
        }
    };
    let detail = format!(
        "PostgreSQL {} at {url}, database {} as {}: {schema}; this member is {:?}",
        probe.server_version,
        probe.database,
        probe.user,
        fleet.host_id()
    );
    if !probe.missing.is_empty() {
        return bad(
            what,
            format!("{detail}; missing privileges: {}", probe.missing.join(", ")),
            "GRANT them to the agent's database user",
        );
    }
    ok(what, detail)
}

const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";

/// Whether a VM's console log has a size cap, from `qemu.conf`'s text: with libvirt's
/// default `stdio_handler = "logd"` QEMU writes the console through virtlogd, which rolls
/// the file over (`virtlogd.conf`: `max_size` 2 MiB, `max_backups` 3; measured here: QEMU
/// holds a pipe, virtlogd the file); with `"file"` QEMU writes the file itself, without
/// a cap, and a job with root in its VM can fill `console_log_dir`'s file system.
fn console_line(qemu_conf: Option<&str>) -> Line {
    let handler = qemu_conf.into_iter().flat_map(str::lines).find_map(|l| {
        let (key, value) = l.split('#').next()?.split_once('=')?;
        (key.trim() == "stdio_handler").then(|| value.trim().trim_matches('"').to_string())
    });
    match handler.as_deref() {
        Some("file") => warn(
            "console logs",
            format!(
                "{QEMU_CONF} says stdio_handler = \"file\": QEMU writes each VM's console log itself, with no size cap (a job with root in its VM can fill the disk)"
            ),
            format!(
                "set stdio_handler = \"logd\" (libvirt's default) in {QEMU_CONF} and restart libvirtd: virtlogd rolls each log over (virtlogd.conf max_size, max_backups)"
            ),
        ),
        _ => {
            ok("console logs", "written through virtlogd, which rolls each over (virtlogd.conf max_size, max_backups)")
        }
    }
}

fn state_dir(dir: &Path) -> Line {
    // Made new (O_EXCL: never through a link someone left under this name, which `check`,
    // run as root, would otherwise follow and truncate).
    let probe = dir.join(format!(".runnervisor-check-{}", std::process::id()));
    match std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::OpenOptions::new().write(true).create_new(true).open(&probe))
        .and_then(|_| std::fs::remove_file(&probe))
    {
        Ok(()) => ok("state directory", format!("{} is writable", dir.display())),
        Err(e) => bad(
            "state directory",
            format!("{}: {e}", dir.display()),
            format!("create {} writable by the service user (StateDirectory= does it under systemd)", dir.display()),
        ),
    }
}

async fn check_libvirt(config: &Config, lines: &mut Vec<Line>) {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let lv: Arc<Libvirt> = Libvirt::start(&config.libvirt.uri, &config.libvirt.storage_pool, tx);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lv.connected() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !lv.connected() {
        lines.push(bad(
            "libvirt",
            format!("cannot connect to {}", config.libvirt.uri),
            "start libvirtd (systemctl start libvirtd) and put the service user in group libvirt",
        ));
        return;
    }
    lines.push(ok(
        "libvirt",
        format!("connected to {} (libvirt {})", config.libvirt.uri, lv.version().unwrap_or_default()),
    ));
    let lv2 = lv.clone();
    match tokio::task::spawn_blocking(move || lv2.check_pool()).await.expect("join") {
        Ok(()) => lines.push(ok("storage pool", format!("{} is active", config.libvirt.storage_pool))),
        Err(e) => {
            let p = &config.libvirt.storage_pool;
            lines.push(bad("storage pool", e, format!("virsh pool-define-as {p} dir --target /var/lib/runnervisor/pool && virsh pool-start {p} && virsh pool-autostart {p}")))
        }
    }
    let dt = config.libvirt.domain_type.as_str();
    match lv.supports_domain_type(dt) {
        Ok(true) => lines.push(ok("domain type", format!("{dt} guests are supported on this host"))),
        Ok(false) => lines.push(bad(
            "domain type",
            format!("this host cannot run {dt} guests"),
            "load kvm_intel or kvm_amd (and check /dev/kvm), or set libvirt.domain_type = \"qemu\" (TCG, slow)",
        )),
        Err(e) => lines.push(bad("domain type", e, "check `virsh capabilities`")),
    }
    lines.push(check_fence(config, &lv).await);
    let mut subnet = None;
    if let NetworkConfig::Network { name, .. } = &config.libvirt.network {
        let (lv, n) = (lv.clone(), name.clone());
        if let Ok(dhcp) = tokio::task::spawn_blocking(move || lv.network_dhcp(&n)).await.expect("join") {
            lines.push(dhcp_line(name, &dhcp));
            lines.push(dns_line(name, &dhcp));
            subnet = dhcp.subnet;
        }
    }
    if let Some((_, allow)) = config.libvirt.network.fence() {
        let said = crate::fence::unopened(allow, &crate::fence::host_addresses().unwrap_or_default(), subnet);
        if !said.is_empty() {
            lines.push(warn(
                "allow-list",
                said.join("; "),
                "give each address jobs need there an entry of its own (\"ADDRESS:PORT\")",
            ));
        }
    }
    match lv.security_models() {
        Ok(models) if models.iter().any(|m| m == "apparmor" || m == "selinux") => {
            lines.push(ok("security driver", format!("QEMU is confined by {}", models.join(" + "))))
        }
        Ok(models) => lines.push(warn(
            "security driver",
            format!(
                "QEMU runs unconfined (libvirt security drivers: {}): a guest escaping QEMU is not contained by AppArmor/SELinux",
                if models.is_empty() { "none".to_string() } else { models.join(", ") }
            ),
            "install apparmor (and apparmor-profiles) and restart libvirtd, or enable SELinux with svirt",
        )),
        Err(e) => lines.push(bad("security driver", e, "check `virsh capabilities`")),
    }
    // The console logs are written by this host's libvirt (a remote one's config is not here).
    if ["qemu:///", "qemu+unix:///"].iter().any(|p| config.libvirt.uri.starts_with(p)) {
        lines.push(match std::fs::read_to_string(QEMU_CONF) {
            Ok(text) => console_line(Some(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => console_line(None),
            Err(e) => warn(
                "console logs",
                format!("cannot read {QEMU_CONF} ({e}): whether QEMU writes consoles through virtlogd is unknown"),
                "run check as root",
            ),
        });
    } else {
        lines.push(warn(
            "remote libvirt",
            format!("{} is another host's libvirt: the fence drops this host's addresses, not that hypervisor's own (its VMs reach them unless they are private)", config.libvirt.uri),
            "run the agent on the hypervisor itself (qemu:///system)",
        ));
    }
    let need = crate::capacity::worst_case(&config.pools, config.capacity.max_vms);
    match lv.host_resources() {
        Ok(host) => {
            let problems = crate::capacity::findings(&need, &host);
            let summary = format!(
                "worst case {} VMs: {} vCPUs, {} MiB, {} GiB of disk; host: {} CPUs, {} MiB, storage pool {} GiB",
                need.vms, need.vcpus, need.memory_mib, need.disk_gib, host.cpus, host.memory_mib, host.pool_gib
            );
            if problems.is_empty() {
                lines.push(ok("capacity", summary));
            } else {
                lines.push(warn("capacity", format!("{summary}. {}", problems.join("; ")), "see the sentences above"));
            }
        }
        Err(e) => lines.push(bad("capacity", e, "check `virsh nodeinfo` and `virsh pool-info`")),
    }
}

/// The fence of job VMs: network up, fenced mode, what the allow-list opens.
async fn check_fence(config: &Config, lv: &Arc<Libvirt>) -> Line {
    let what = "network fence";
    let allow = |allow: &[crate::fence::AllowEntry]| {
        if allow.is_empty() {
            "no private endpoints allowed".to_string()
        } else {
            format!("allowed: {}", allow.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "))
        }
    };
    match &config.libvirt.network {
        NetworkConfig::User { accept_unfenced: false } => bad(
            what,
            "network type \"user\" (slirp) is not fenced: the guest reaches this host's loopback (10.0.2.2), e.g. the webhook and metrics listeners",
            "use the default libvirt network (remove libvirt.network, run scripts/setup-host), or set accept_unfenced = true for a lab",
        ),
        NetworkConfig::User { accept_unfenced: true } => {
            ok(what, "NOT fenced: network type \"user\" (slirp), accepted by accept_unfenced = true (labs only)")
        }
        NetworkConfig::Bridge { name, filter, allow: a } => {
            if crate::fence::bridge_exists(name) {
                warn(
                    what,
                    format!(
                        "bridge {name}, isolated ports, nwfilter {filter}; {}. Weaker than the libvirt network: a VM learns its address by DHCP, and while it holds none (booting, or after releasing its lease, which a job with root can do) libvirt lets it send DHCP requests to any address from any source address; the LAN's own subnet is not dropped unless private",
                        allow(a)
                    ),
                    "use the default libvirt network (its VMs' addresses are fixed by the agent) where jobs are not trusted",
                )
            } else {
                bad(
                    what,
                    format!("host bridge {name:?} not found"),
                    "create the bridge, or use the default libvirt network",
                )
            }
        }
        NetworkConfig::Network { name, filter, allow: a } => {
            let (lv, n) = (lv.clone(), name.clone());
            match tokio::task::spawn_blocking(move || lv.network_dhcp(&n)).await.expect("join") {
                Ok(dhcp) => ok(
                    what,
                    format!(
                        "libvirt network {name} is active (gateway {}), isolated ports, nwfilter {filter}; {}",
                        dhcp.subnet.map(|s| s.gateway.to_string()).unwrap_or_else(|| "none".into()),
                        allow(a)
                    ),
                ),
                Err(e) => {
                    bad(what, e, "run scripts/setup-host (or reinstall the package): it defines and starts the network")
                }
            }
        }
    }
}

/// Whether the network's DHCP server answers the VMs' reserved addresses only.
fn dhcp_line(name: &str, dhcp: &network::Dhcp) -> Line {
    let what = "network addresses";
    let (start, end) = match dhcp.range {
        Some((a, b)) => (a.to_string(), b.to_string()),
        None => {
            return warn(what, format!("libvirt network {name} has no DHCP range: VMs get no address"), NETWORK_FIX);
        }
    };
    match dhcp.fixes_addresses() {
        Err(reason) => bad(what, format!("libvirt network {name}: {reason}"), NETWORK_FIX),
        Ok(true) => ok(
            what,
            format!(
                "each VM gets a fixed address of {start}–{end} in its seed ({} held now) and talks no DHCP; the DHCP server answers no other client",
                dhcp.hosts.len()
            ),
        ),
        Ok(false) => warn(
            what,
            format!(
                "libvirt network {name} leases {start}–{end} to any client: a job can take every address (and VMs get learned addresses, not fixed ones)"
            ),
            NETWORK_FIX,
        ),
    }
}

/// Whether the network's DNS server keeps this host's `/etc/hosts` from the jobs.
fn dns_line(name: &str, dhcp: &network::Dhcp) -> Line {
    if dhcp.no_hosts {
        ok("network DNS", format!("libvirt network {name} answers its own names, never from this host's /etc/hosts"))
    } else {
        warn(
            "network DNS",
            format!(
                "libvirt network {name} answers the jobs' DNS from this host's /etc/hosts (a network defined by an older release)"
            ),
            "run runnervisor-network again, with the arguments it was first given (--address, --uplink, --domain, --dns-host, --dns-forwarder): it adds dnsmasq's no-hosts (stop runnervisor first: it is not redefined under running VMs)",
        )
    }
}

const NETWORK_FIX: &str = "define the network again: runnervisor-network (scripts/setup-host in the lab) adds dnsmasq's dhcp-ignore=tag:!known";

fn check_pool_image(pool: &crate::config::PoolConfig, lines: &mut Vec<Line>) {
    let what = format!("pool {} image", pool.name);
    match hypervisor::check_image(&pool.image) {
        Ok(info) if info.virtual_size > pool.disk_gib << 30 => lines.push(bad(
            what,
            format!(
                "{} is {} GiB, more than disk_gib = {}",
                pool.image.display(),
                info.virtual_size >> 30,
                pool.disk_gib
            ),
            "raise pool.disk_gib",
        )),
        Ok(info) => lines.push(ok(
            what,
            format!("{} is qcow2, {} GiB virtual", pool.image.display(), info.virtual_size.div_ceil(1 << 30)),
        )),
        Err(e) => lines.push(bad(
            what,
            e,
            "build or copy the golden image there (images/README.md); it must be qcow2 and readable by libvirt",
        )),
    }
    for (k, p) in [("kernel", &pool.kernel), ("initrd", &pool.initrd)] {
        if let Some(p) = p {
            match std::fs::metadata(p) {
                Ok(_) => lines.push(ok(format!("pool {} {k}", pool.name), p.display().to_string())),
                Err(e) => lines.push(bad(
                    format!("pool {} {k}", pool.name),
                    format!("{}: {e}", p.display()),
                    format!("put the {k} there or remove pool.{k}"),
                )),
            }
        }
    }
    if let Some(manifest) = images::read_manifest(&pool.image) {
        if let Some(p) = images::bind_protocol_problem(&manifest) {
            lines.push(bad(
                format!("pool {} guest unit", pool.name),
                p,
                "rebuild the image (images/production/build installs the current images/guest unit)",
            ));
        }
        match images::runner_age_problem(&manifest, pool.runner_max_age, std::time::SystemTime::now()) {
            None => lines.push(ok(
                format!("pool {} runner", pool.name),
                format!("actions/runner {} (released {})", manifest.runner_version, manifest.runner_released),
            )),
            Some(p) => lines.push(bad(
                format!("pool {} runner", pool.name),
                p,
                "rebuild the image with a current actions/runner (images/README.md)",
            )),
        }
    }
}

async fn check_github(config: &Config, auth: Auth, lines: &mut Vec<Line>) {
    let scope = config.github.scope();
    let app = matches!(auth, Auth::App { .. });
    let gh = match HttpGitHub::new(
        &config.github.api_url,
        scope.clone(),
        config.github.hook.clone(),
        auth,
        Duration::from_secs(15),
    ) {
        Ok(g) => g.with_retry(RetryPolicy {
            attempts: 2,
            base: Duration::from_millis(300),
            cap: Duration::from_secs(1),
            max_wait: Duration::from_secs(2),
        }),
        Err(e) => {
            lines.push(bad("GitHub", e, "check github.api_url"));
            return;
        }
    };
    match gh.registration_token().await {
        Ok(_) => lines.push(ok(
            "GitHub permissions",
            format!("can register runners at {} ({})", scope.api_path(), config.github.api_url),
        )),
        Err(e) => {
            let fix = match e.status() {
                Some(401) => "the credential is wrong or expired: replace it".to_string(),
                Some(403) | Some(404) => permission_hint(&scope, app),
                _ => format!("check that {} is reachable from this host", config.github.api_url),
            };
            lines.push(bad("GitHub permissions", e, fix));
            return;
        }
    }
    match gh.list_runners().await {
        Ok(r) => lines.push(ok("GitHub runners", format!("{} registered at {}", r.len(), scope.api_path()))),
        Err(e) => lines.push(bad("GitHub runners", e, permission_hint(&scope, app))),
    }
    if !matches!(scope, Scope::Repository { .. }) {
        match gh.runner_group_id(&config.github.runner_group).await {
            Ok(id) => lines.push(ok("runner group", format!("{:?} has id {id}", config.github.runner_group))),
            Err(e) => lines.push(bad(
                "runner group",
                e,
                "create the runner group, or set github.runner_group to an existing one",
            )),
        }
    }
    if config.github.hook.is_some() {
        match gh.list_deliveries(std::time::UNIX_EPOCH, 1).await {
            Ok(_) => lines.push(ok("webhook deliveries", "readable: missed deliveries can be redelivered")),
            Err(e) => lines.push(bad("webhook deliveries", e, "check github.hook (type and id); the credential needs webhook read access (repo/org Administration or admin:*_hook)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_log_without_virtlogd_is_warned_about() {
        let table: [(Option<&str>, bool); 6] = [
            (None, false),
            (Some("# stdio_handler = \"file\"\n"), false),
            (Some("stdio_handler = \"logd\"\n"), false),
            (Some("user = \"libvirt-qemu\"\nstdio_handler = \"file\"\n"), true),
            (Some("  stdio_handler=\"file\"   # no cap\n"), true),
            (Some("stdio_handler_x = \"file\"\n"), false),
        ];
        for (conf, warned) in table {
            let line = console_line(conf);
            assert_eq!(line.warn, warned, "{conf:?}: {}", line.detail);
        }
    }

    /// `check` runs as root in a directory the service user writes: a link left under
    /// its probe's name is not followed (its target is not truncated).
    #[test]
    fn the_state_directory_probe_follows_no_link() {
        let dir = crate::test_support::tempdir();
        let target = dir.join("precious");
        std::fs::write(&target, b"keep").unwrap();
        assert!(state_dir(&dir).ok, "a writable directory passes");
        std::os::unix::fs::symlink(&target, dir.join(format!(".runnervisor-check-{}", std::process::id()))).unwrap();
        let line = state_dir(&dir);
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(!line.ok, "{}", line.detail);
    }

    #[test]
    fn a_network_leasing_to_anyone_is_warned_about() {
        use crate::hypervisor::network::Dhcp;
        let range = Some(("198.51.100.10".parse().unwrap(), "198.51.100.250".parse().unwrap()));
        let open =
            dhcp_line("runnervisor", &Dhcp { subnet: None, range, hosts: vec![], known_only: false, no_hosts: true });
        let text = render(&[open]);
        assert!(
            text.contains("leases 198.51.100.10–198.51.100.250 to any client") && text.contains("dhcp-ignore"),
            "{text}"
        );
        let subnet = Some(network::Subnet { gateway: "198.51.100.1".parse().unwrap(), prefix: 24 });
        let known = render(&[dhcp_line(
            "runnervisor",
            &Dhcp { subnet, range, hosts: vec![], known_only: true, no_hosts: true },
        )]);
        assert!(known.contains("fixed address") && !known.contains("dhcp-ignore"), "{known}");
        let no_subnet =
            dhcp_line("runnervisor", &Dhcp { subnet: None, range, hosts: vec![], known_only: true, no_hosts: true });
        assert!(!no_subnet.ok && render(&[no_subnet]).contains("no IPv4 address"));
        // DNS from this host's /etc/hosts: a network defined by an older release.
        let old = Dhcp { subnet, range, hosts: vec![], known_only: true, no_hosts: false };
        assert!(dns_line("runnervisor", &old).warn && !dns_line("runnervisor", &Dhcp { no_hosts: true, ..old }).warn);
    }
}

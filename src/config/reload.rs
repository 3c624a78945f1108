//! Reload (SIGHUP): what of a new, valid configuration applies to the running agent, and
//! what waits for a restart. Pure: the scheduler installs the result.

use super::{Config, PoolConfig};

/// The outcome of a reload, as logged and answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// What changed and applies now (`log_level`, `reconcile`, `pool linux`, ...).
    pub applied: Vec<String>,
    /// What changed but cannot change while the agent runs: the old value stays until a
    /// restart.
    pub kept: Vec<String>,
}

/// The configuration to run with after a reload, and what changed.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub config: Config,
    pub report: ReloadReport,
}

/// Whether two values differ (every config type is `Debug`; secrets appear there only as
/// their source, a path or a credential name).
fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

/// Merges `new` (already validated) into the running `old`:
/// - live: `log_level`, `libvirt.domain_type`, `libvirt.network` (the fence's allow-list),
///   `libvirt.console_log_dir`, `reconcile` (but `shutdown_grace`), `capacity`, pools
///   (added, removed, resized: any pool key);
/// - kept: `state_dir`, `server`, `github`, `libvirt.uri`, `libvirt.storage_pool`, `admin`,
///   `metrics`, `reconcile.shutdown_grace`, `fleet` (listeners, the stores, the GitHub
///   client and the libvirt connection are made once, at start).
///
/// A pool that is gone from `new` stays as a *retiring* pool: it takes no jobs and makes no
/// VM, its VMs finish, and the scheduler drops it once it has none.
pub fn reload(old: &Config, new: Config) -> Reloaded {
    let mut report = ReloadReport::default();
    let mut config = new;
    let mut keep = |name: &str, changed: bool| {
        if changed {
            report.kept.push(name.to_string());
        }
    };
    keep("state_dir", differs(&old.state_dir, &config.state_dir));
    config.state_dir = old.state_dir.clone();
    keep("server", differs(&old.server, &config.server));
    config.server = old.server.clone();
    keep("github", differs(&old.github, &config.github));
    config.github = old.github.clone();
    keep("libvirt.uri", old.libvirt.uri != config.libvirt.uri);
    config.libvirt.uri = old.libvirt.uri.clone();
    keep("libvirt.storage_pool", old.libvirt.storage_pool != config.libvirt.storage_pool);
    config.libvirt.storage_pool = old.libvirt.storage_pool.clone();
    keep("admin", differs(&old.admin, &config.admin));
    config.admin = old.admin.clone();
    keep("metrics", differs(&old.metrics, &config.metrics));
    config.metrics = old.metrics.clone();
    keep("reconcile.shutdown_grace", old.reconcile.shutdown_grace != config.reconcile.shutdown_grace);
    config.reconcile.shutdown_grace = old.reconcile.shutdown_grace;
    keep("fleet", differs(&old.fleet, &config.fleet));
    config.fleet = old.fleet.clone();

    // A pool that is a runner scale set has its listener from the start: adding one,
    // removing one, or changing what a pool's scale set is waits for a restart.
    let scale_set = |p: &PoolConfig| (p.intake, p.scale_set_name.clone(), p.scale_set().map(|_| p.labels.clone()));
    let mut pools = Vec::new();
    for mut pool in std::mem::take(&mut config.pools) {
        match old.pool(&pool.name).filter(|was| !was.retiring) {
            None if pool.scale_set().is_some() => {
                keep(&format!("pool {} (a scale set: added at the next restart)", pool.name), true);
                continue;
            }
            Some(was) if scale_set(was) != scale_set(&pool) => {
                keep(&format!("pool {}: intake, scale_set_name, a scale set's labels", pool.name), true);
                (pool.intake, pool.scale_set_name, pool.labels) =
                    (was.intake, was.scale_set_name.clone(), was.labels.clone());
            }
            _ => {}
        }
        pools.push(pool);
    }
    for was in old.pools.iter().filter(|p| p.scale_set().is_some() && !p.retiring) {
        if !pools.iter().any(|p| p.name == was.name) {
            keep(&format!("pool {} (a scale set: removed at the next restart)", was.name), true);
            pools.push(was.clone());
        }
    }
    config.pools = pools;

    let mut apply = |name: String, changed: bool| {
        if changed {
            report.applied.push(name);
        }
    };
    apply("log_level".into(), old.log_level != config.log_level);
    apply("libvirt.domain_type".into(), old.libvirt.domain_type != config.libvirt.domain_type);
    apply("libvirt.network".into(), old.libvirt.network != config.libvirt.network);
    apply("libvirt.console_log_dir".into(), old.libvirt.console_log_dir != config.libvirt.console_log_dir);
    apply("reconcile".into(), differs(&old.reconcile, &config.reconcile));
    apply("capacity".into(), differs(&old.capacity, &config.capacity));
    for pool in &config.pools {
        match old.pool(&pool.name) {
            None => apply(format!("pool {} (added)", pool.name), true),
            Some(was) if was.retiring => apply(format!("pool {} (back)", pool.name), true),
            Some(was) => apply(format!("pool {}", pool.name), differs(was, pool)),
        }
    }
    let gone: Vec<PoolConfig> = old.pools.iter().filter(|p| config.pool(&p.name).is_none()).cloned().collect();
    for gone in gone {
        if !gone.retiring {
            apply(format!("pool {} (removed: its VMs finish, its queued jobs are dropped)", gone.name), true);
        }
        config.pools.push(PoolConfig { retiring: true, ..gone });
    }
    Reloaded { config, report }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::MINIMAL;

    /// The minimal config with `top` keys before its tables, another webhook listen
    /// address when `listen` says so, and `tables` after.
    fn with(top: &str, listen: Option<&str>, tables: &str) -> Config {
        let text = MINIMAL.replace("127.0.0.1:8080", listen.unwrap_or("127.0.0.1:8080"));
        Config::parse(&format!("{top}\n{text}\n{tables}\n")).unwrap()
    }

    #[test]
    fn what_applies_live_and_what_waits_for_a_restart() {
        let old = with("", None, "");
        // (top-level keys, listen, tables, applied, kept)
        let table: &[(&str, Option<&str>, &str, &[&str], &[&str])] = &[
            ("", None, "", &[], &[]),
            ("log_level = \"debug\"", None, "", &["log_level"], &[]),
            ("state_dir = \"/elsewhere\"", None, "", &[], &["state_dir"]),
            ("", Some("127.0.0.1:9999"), "", &[], &["server"]),
            ("", None, "[reconcile]\ngithub_interval = \"2m\"", &["reconcile"], &[]),
            ("", None, "[reconcile]\nshutdown_grace = \"1m\"", &[], &["reconcile.shutdown_grace"]),
            ("", None, "[capacity]\nmax_vms = 9", &["capacity"], &[]),
            ("", None, "[metrics]\nlisten = \"127.0.0.1:9999\"", &[], &["metrics"]),
            (
                "",
                None,
                "[libvirt]\nuri = \"qemu:///session\"\ndomain_type = \"qemu\"",
                &["libvirt.domain_type"],
                &["libvirt.uri"],
            ),
        ];
        for (top, listen, tables, applied, kept) in table {
            let r = reload(&old, with(top, *listen, tables));
            assert_eq!(r.report.applied, *applied, "{top} {tables}");
            assert_eq!(r.report.kept, *kept, "{top} {tables}");
            // What is kept, the running agent keeps.
            assert_eq!(r.config.state_dir, old.state_dir);
            assert_eq!(r.config.server.listen, old.server.listen);
            assert_eq!(r.config.metrics.listen, old.metrics.listen);
            assert_eq!(r.config.libvirt.uri, old.libvirt.uri);
            assert_eq!(r.config.reconcile.shutdown_grace, old.reconcile.shutdown_grace);
        }
        let r = reload(&old, with("", None, "[reconcile]\ngithub_interval = \"2m\""));
        assert_eq!(r.config.reconcile.github_interval, std::time::Duration::from_secs(120));
    }

    #[test]
    fn pools_are_added_resized_and_retired() {
        let old = with("", None, "");
        let name = old.pools[0].name.clone();
        let mut new = old.clone();
        new.pools[0].max_vms += 1;
        let mut added = old.pools[0].clone();
        added.name = "big".into();
        added.labels = vec!["self-hosted".into(), "big".into()];
        new.pools.push(added);
        let r = reload(&old, new);
        assert_eq!(r.report.applied, [format!("pool {name}"), "pool big (added)".to_string()]);
        assert_eq!(r.config.pool(&name).unwrap().max_vms, old.pools[0].max_vms + 1);
        assert!(r.config.pools.iter().all(|p| !p.retiring));

        // Removed: kept as retiring until its VMs are gone; reported once.
        let mut without = r.config.clone();
        without.pools.retain(|p| p.name != name);
        let r2 = reload(&r.config, without.clone());
        assert_eq!(r2.report.applied, [format!("pool {name} (removed: its VMs finish, its queued jobs are dropped)")]);
        assert!(r2.config.pool(&name).unwrap().retiring);
        let r3 = reload(&r2.config, without);
        assert!(r3.report.applied.is_empty() && r3.config.pool(&name).unwrap().retiring);
        // Configured again: back in service.
        let r4 = reload(&r3.config, r.config.clone());
        assert_eq!(r4.report.applied, [format!("pool {name} (back)")]);
        assert!(!r4.config.pool(&name).unwrap().retiring);
    }

    /// A scale set's listener is made at start: adding, removing or changing a scale-set
    /// pool waits for a restart (the running agent keeps what it has).
    #[test]
    fn scale_set_pools_change_at_the_next_restart() {
        let old = with("", None, "");
        let mut set = old.pools[0].clone();
        set.name = "sets".into();
        set.labels = vec!["rv-sets".into()];
        set.intake = crate::config::Intake::ScaleSet;
        // Added: not now.
        let mut new = old.clone();
        new.pools.push(set.clone());
        let r = reload(&old, new.clone());
        assert_eq!(r.report.kept, ["pool sets (a scale set: added at the next restart)"]);
        assert!(r.config.pool("sets").is_none());
        // Running with it: its intake and labels stay, and removing it waits too.
        let mut changed = new.clone();
        changed.pools[1].labels = vec!["rv-other".into()];
        changed.pools[1].max_vms += 1;
        let r = reload(&new, changed);
        assert_eq!(r.report.kept, ["pool sets: intake, scale_set_name, a scale set's labels"]);
        assert_eq!(r.report.applied, ["pool sets"], "what else changed applies");
        assert_eq!(r.config.pool("sets").unwrap().labels, ["rv-sets"]);
        let r = reload(&new, old.clone());
        assert_eq!(r.report.kept, ["pool sets (a scale set: removed at the next restart)"]);
        assert!(r.config.pool("sets").is_some_and(|p| !p.retiring && p.scale_set() == Some("sets")));
    }
}

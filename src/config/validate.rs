//! [`Config::validate`]: what types cannot check, each error naming the key and the value.

use std::time::Duration;

use super::*;

fn valid_slug(s: &str) -> bool {
    !s.is_empty() && s.len() <= 100 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Config {
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
        if let Err(e) = crate::logging::filter(&self.log_level) {
            return Err(invalid("log_level", &self.log_level, e));
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
        if !(1..=self.server.max_connections).contains(&self.server.max_connections_per_source) {
            return Err(invalid(
                "server.max_connections_per_source",
                self.server.max_connections_per_source,
                format!("must be 1 to server.max_connections ({})", self.server.max_connections),
            ));
        }
        if self.server.allow_sources.as_ref().is_some_and(|a| a.is_empty()) {
            return Err(invalid(
                "server.allow_sources",
                Vec::<String>::new(),
                "an empty list would refuse every connection: leave it out to admit any source",
            ));
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
            if p.registration == Registration::Token && !p.accept_token_exposure && p.intake != Intake::ScaleSet {
                return Err(invalid(
                    key("registration"),
                    "token",
                    "a job with root in its VM can read the registration token from the guest's memory: valid for an \
                     hour for the whole scope, enough to register runners that take other repositories' jobs. Use \
                     registration = \"jit\" (the default), or set accept_token_exposure = true where every job is trusted",
                ));
            }
            if p.max_lifetime <= p.registration_timeout {
                return Err(invalid(key("max_lifetime"), p.max_lifetime, "must be longer than registration_timeout"));
            }
            if p.warm > p.max_vms {
                return Err(invalid(key("warm"), p.warm, format!("must be 0 to max_vms ({})", p.max_vms)));
            }
            if p.warm_max_age < Duration::from_secs(60) || (p.warm > 0 && p.warm_max_age >= p.max_lifetime) {
                return Err(invalid(key("warm_max_age"), p.warm_max_age, "must be at least 1m and below max_lifetime"));
            }
            if p.snapshot_slots > MAX_SNAPSHOT_SLOTS {
                return Err(invalid(
                    key("snapshot_slots"),
                    p.snapshot_slots,
                    format!("must be 0 to {MAX_SNAPSHOT_SLOTS}"),
                ));
            }
            if p.snapshot_slots > 0 && self.libvirt.network.libvirt_network().is_none() {
                return Err(invalid(
                    key("snapshot_slots"),
                    p.snapshot_slots,
                    "needs [libvirt.network] type = \"network\" (a VM restored from a slot keeps the fixed address it was saved with)",
                ));
            }
            if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&p.bind_timeout) {
                return Err(invalid(key("bind_timeout"), p.bind_timeout, "must be 1s to 10m"));
            }
            if p.scale_set_name.is_some() && p.intake != Intake::ScaleSet {
                return Err(invalid(key("scale_set_name"), &p.scale_set_name, "needs intake = \"scale_set\""));
            }
            if let Some(set) = p.scale_set() {
                // GitHub routes a job to the set whose labels (and name) cover its own: a
                // webhook pool of such labels would take the set's jobs too.
                if let Some(q) = self.pools.iter().find(|q| q.scale_set().is_none() && p.scale_set_covers(&q.labels)) {
                    return Err(invalid(
                        key("labels"),
                        &p.labels,
                        format!(
                            "the scale set's labels cover webhook pool {:?}'s: GitHub would route its jobs to the set",
                            q.name
                        ),
                    ));
                }
                // ASCII: set names are compared case-insensitively here, in PostgreSQL and at
                // GitHub, and only ASCII folds the same everywhere.
                if set.is_empty()
                    || set.len() > 100
                    || set.trim() != set
                    || set.contains(',')
                    || !set.chars().all(|c| c.is_ascii_graphic() || c == ' ')
                {
                    return Err(invalid(
                        key("scale_set_name"),
                        set,
                        "1 to 100 printable ASCII characters, no commas or surrounding spaces",
                    ));
                }
                if p.registration != Registration::Jit {
                    return Err(invalid(
                        key("registration"),
                        "token",
                        "a scale set's runners get JIT configs from it: use registration = \"jit\" with intake = \"scale_set\"",
                    ));
                }
                if let Some(q) =
                    self.pools[..i].iter().find(|q| q.scale_set().is_some_and(|s| s.eq_ignore_ascii_case(set)))
                {
                    return Err(invalid(key("scale_set_name"), set, format!("pool {:?} is that scale set", q.name)));
                }
            }
        }
        if let Some(f) = &self.fleet {
            validate_fleet(f)?;
        }
        Ok(())
    }
}

/// Most snapshot slots of one pool (each is a save file and a disk on the storage pool).
pub const MAX_SNAPSHOT_SLOTS: usize = 64;

/// `url` as an error or a log line may show it: only what is known to hold no secret.
/// The value of a parameter is shown when its name is one of [`SHOWN_PARAMETERS`] (a
/// password, or a name the driver would not take, shows `***`). A URI (`postgres://`,
/// `postgresql://`, as the driver tells them): its user info is what precedes the first
/// `@` anywhere (as the driver reads it), of which only a user name before a `:` is
/// shown, and nothing if it reaches into the path or the query. A key=value string is
/// read as the driver reads it (spaces around `=`, quoted values); past anything it
/// cannot read, nothing is shown.
pub fn redact_url(url: &str) -> String {
    let Some(rest) = ["postgres://", "postgresql://"].iter().find_map(|p| url.strip_prefix(p)) else {
        return redact_key_values(url);
    };
    let mut out = url[..url.len() - rest.len()].to_string();
    let rest = match rest.split_once('@') {
        Some((user_info, after)) => {
            let user = user_info.split(':').next().unwrap_or("");
            if user.contains(['/', '?', '=', '&']) {
                out.push_str(HIDDEN);
            } else if user_info.contains(':') {
                out.push_str(&format!("{user}:{HIDDEN}"));
            } else {
                out.push_str(user);
            }
            out.push('@');
            after
        }
        None => rest,
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    out.push_str(path);
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, value)) if SHOWN_PARAMETERS.contains(&key) => format!("{key}={value}"),
                Some((key, _)) if !key.contains('%') => format!("{key}={HIDDEN}"),
                _ => HIDDEN.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

const HIDDEN: &str = "***";

/// Connection parameters whose values an error may show (tokio-postgres' names): none
/// holds a secret.
const SHOWN_PARAMETERS: &[&str] = &[
    "user",
    "dbname",
    "options",
    "application_name",
    "sslmode",
    "sslnegotiation",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

/// [`redact_url`] of a key=value string, tokenized as tokio-postgres does.
fn redact_key_values(s: &str) -> String {
    const UNREAD: &str = "[the rest is not shown]";
    let mut out: Vec<String> = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        let key_end = rest.find(|c: char| c.is_whitespace() || c == '=').unwrap_or(rest.len());
        let key = &rest[..key_end];
        let Some(after_eq) = rest[key_end..].trim_start().strip_prefix('=') else {
            out.push(UNREAD.into());
            break;
        };
        let value_start = after_eq.trim_start();
        let value_len = match value_start.strip_prefix('\'') {
            Some(quoted) => match end_of_quoted(quoted) {
                Some(n) => n + 2,
                None => 0,
            },
            None => end_of_simple(value_start),
        };
        if key.is_empty() || value_len == 0 {
            out.push(if key.is_empty() { UNREAD.into() } else { format!("{key}={UNREAD}") });
            break;
        }
        let value = &value_start[..value_len];
        out.push(if SHOWN_PARAMETERS.contains(&key) { format!("{key}={value}") } else { format!("{key}={HIDDEN}") });
        rest = value_start[value_len..].trim_start();
    }
    out.join(" ")
}

/// Bytes of a quoted value before its closing quote (a backslash escapes the next character).
fn end_of_quoted(s: &str) -> Option<usize> {
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '\'' => return Some(i),
            _ => {}
        }
    }
    None
}

/// Bytes of an unquoted value: up to whitespace (a backslash escapes the next character).
fn end_of_simple(s: &str) -> usize {
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            c if c.is_whitespace() => return i,
            _ => {}
        }
    }
    s.len()
}

fn validate_fleet(f: &FleetConfig) -> Result<(), ConfigError> {
    if let Some(h) = &f.host_id
        && !(h.len() <= 63 && valid_slug(h))
    {
        return Err(invalid("fleet.host_id", h, "1 to 63 letters, digits, '-', '_' or '.'"));
    }
    let url = &f.postgres.url;
    let parsed: tokio_postgres::Config = url.parse().map_err(|e| {
        invalid(
            "fleet.postgres.url",
            redact_url(url),
            format!("not a PostgreSQL connection URI or key=value string: {e}"),
        )
    })?;
    if parsed.get_password().is_some() {
        return Err(invalid(
            "fleet.postgres.url",
            redact_url(url),
            "holds a password: put it in fleet.postgres.password ({ file = ... } or { credential = ... })",
        ));
    }
    if parsed.get_hosts().is_empty() {
        return Err(invalid("fleet.postgres.url", redact_url(url), "names no host"));
    }
    if !(1..=64).contains(&f.postgres.max_connections) {
        return Err(invalid("fleet.postgres.max_connections", f.postgres.max_connections, "must be 1 to 64"));
    }
    if !(Duration::from_secs(10)..=Duration::from_secs(3600)).contains(&f.lease) {
        return Err(invalid("fleet.lease", f.lease, "must be 10s to 1h"));
    }
    if f.cold_head_start > f.lease / 2 {
        return Err(invalid("fleet.cold_head_start", f.cold_head_start, "must be at most half of fleet.lease"));
    }
    Ok(())
}

//! Metrics in one place, rendered as OpenMetrics text (Prometheus scrapes it) by
//! `prometheus-client`: each family has a typed label set, so a label cannot be misspelt
//! or forgotten at a call site. Almost a leaf module: the GitHub client and the scheduler
//! write into it; it depends on neither (only on `model`'s VM states).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::model::VmState;

/// A label value as the exposition can carry it: `prometheus-client` writes label values
/// unescaped, so anything that is not plainly printable (quotes, backslashes, line breaks)
/// becomes `_`, and values are capped. Values from outside (a job's conclusion, an event
/// name) go through here; an API path names no repository (`github::http::endpoint_name`).
fn value(v: &str) -> String {
    let plain = |c: char| c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ';
    // Most values (pool names, states) need nothing: copied whole (this runs for every
    // series the gauges set, at most turns of the scheduler).
    if v.len() <= 128 && v.chars().all(plain) {
        return v.to_string();
    }
    v.chars().take(128).map(|c| if plain(c) { c } else { '_' }).collect()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pool: String,
}

/// The label set of one pool's series.
pub fn pool(pool: &str) -> PoolLabels {
    PoolLabels { pool: value(pool) }
}

/// One count of GitHub's statistics of a pool's runner scale set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleSetLabels {
    pool: String,
    /// `available`, `acquired`, `assigned`, `running` (jobs), `registered`, `busy`, `idle`
    /// (runners).
    kind: &'static str,
}

impl ScaleSetLabels {
    pub fn new(pool_name: &str, kind: &'static str) -> Self {
        ScaleSetLabels { pool: value(pool_name), kind }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    event: String,
    /// `accepted`, `duplicate`, `ignored`, `invalid`, `out_of_scope`.
    outcome: String,
}

impl WebhookLabels {
    pub fn new(event: &str, outcome: &str) -> Self {
        WebhookLabels { event: value(event), outcome: value(outcome) }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmStateLabels {
    pool: String,
    state: String,
}

impl VmStateLabels {
    pub fn new(pool: &str, state: &str) -> Self {
        VmStateLabels { pool: value(pool), state: value(state) }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pool: String,
    /// The provisioning step that failed (`image`, `network`, `credential`, ..., `timeout`).
    step: String,
}

impl StepLabels {
    pub fn new(pool: &str, step: &str) -> Self {
        StepLabels { pool: value(pool), step: value(step) }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConclusionLabels {
    pool: String,
    conclusion: String,
}

impl ConclusionLabels {
    pub fn new(pool: &str, conclusion: &str) -> Self {
        ConclusionLabels { pool: value(pool), conclusion: value(conclusion) }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    reason: String,
}

impl ReasonLabels {
    pub fn new(reason: &str) -> Self {
        ReasonLabels { reason: value(reason) }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiCallLabels {
    /// Method and route, ids replaced by `{id}`.
    endpoint: String,
    /// HTTP status; 0: no response.
    status: u16,
}

impl ApiCallLabels {
    pub fn new(endpoint: &str, status: u16) -> Self {
        ApiCallLabels { endpoint: value(endpoint), status }
    }
}

/// A GitHub API endpoint (method and route, ids replaced by `{id}`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    endpoint: String,
}

impl EndpointLabels {
    pub fn new(endpoint: &str) -> Self {
        EndpointLabels { endpoint: value(endpoint) }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pool: String,
    /// `warm`: a waiting warm VM took the job's credential; `cold`: a VM booted for it.
    path: String,
}

impl PathLabels {
    pub fn new(pool: &str, path: &str) -> Self {
        PathLabels { pool: value(pool), path: value(path) }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `applied` or `rejected`.
    result: String,
}

impl ResultLabels {
    pub fn new(result: &str) -> Self {
        ResultLabels { result: value(result) }
    }
}

type Seconds<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds_buckets() -> Histogram {
    Histogram::new([
        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0,
    ])
}

/// Finer buckets for what takes milliseconds (binding a warm VM).
fn short_seconds_buckets() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0])
}

pub struct Metrics {
    registry: Registry,
    pub webhooks: Family<WebhookLabels, Counter>,
    pub webhook_signature_failures: Counter,
    /// Connections closed at accept: `not_allowed`, `per_source`.
    pub webhook_connections_refused: Family<ReasonLabels, Counter>,
    pub jobs_received: Family<PoolLabels, Counter>,
    pub jobs_unmatched: Counter,
    pub jobs_started: Family<PoolLabels, Counter>,
    pub jobs_completed: Family<ConclusionLabels, Counter>,
    pub jobs_failed: Family<PoolLabels, Counter>,
    pub queue_depth: Family<PoolLabels, Gauge>,
    pub vms: Family<VmStateLabels, Gauge>,
    pub vms_started: Family<PoolLabels, Counter>,
    pub provision_failures: Family<StepLabels, Counter>,
    pub teardowns: Family<ReasonLabels, Counter>,
    pub teardown_failures: Counter,
    pub provision_seconds: Seconds<PoolLabels>,
    pub queued_to_runner_online_seconds: Seconds<PoolLabels>,
    pub teardown_seconds: Histogram,
    pub github_api_calls: Family<ApiCallLabels, Counter>,
    pub github_api_calls_held: Family<EndpointLabels, Counter>,
    pub github_rate_limit_remaining: Gauge,
    pub libvirt_reconnects: Counter,
    pub deliveries_redelivered: Counter,
    pub draining: Gauge,
    /// 1 while the hypervisor can make VMs (`status`'s `libvirt_connected`; 0 until a
    /// first sweep answers).
    pub hypervisor_ready: Gauge,
    pub image_runner_outdated: Family<PoolLabels, Gauge>,
    pub job_runners: Family<PathLabels, Counter>,
    pub bind_seconds: Seconds<PoolLabels>,
    pub bind_failures: Family<StepLabels, Counter>,
    /// Snapshot slots saved and not in use, per pool.
    pub slots_ready: Family<PoolLabels, Gauge>,
    /// Slots whose save or restore failed (step: save, restore), per pool.
    pub slot_failures: Family<StepLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub fleet_claims: Family<ResultLabels, Counter>,
    pub fleet_claims_held: Gauge,
    pub fleet_takeovers: Counter,
    pub fleet_rows_unreadable: Counter,
    /// GitHub's statistics of each scale-set pool's set, as its last message said.
    pub scale_set_statistics: Family<ScaleSetLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            webhooks: Family::default(),
            webhook_signature_failures: Counter::default(),
            webhook_connections_refused: Family::default(),
            jobs_received: Family::default(),
            jobs_unmatched: Counter::default(),
            jobs_started: Family::default(),
            jobs_completed: Family::default(),
            jobs_failed: Family::default(),
            queue_depth: Family::default(),
            vms: Family::default(),
            vms_started: Family::default(),
            provision_failures: Family::default(),
            teardowns: Family::default(),
            teardown_failures: Counter::default(),
            provision_seconds: Family::new_with_constructor(seconds_buckets),
            queued_to_runner_online_seconds: Family::new_with_constructor(seconds_buckets),
            teardown_seconds: seconds_buckets(),
            github_api_calls: Family::default(),
            github_api_calls_held: Family::default(),
            github_rate_limit_remaining: Gauge::default(),
            libvirt_reconnects: Counter::default(),
            deliveries_redelivered: Counter::default(),
            draining: Gauge::default(),
            hypervisor_ready: Gauge::default(),
            image_runner_outdated: Family::default(),
            job_runners: Family::default(),
            bind_seconds: Family::new_with_constructor(short_seconds_buckets),
            bind_failures: Family::default(),
            slots_ready: Family::default(),
            slot_failures: Family::default(),
            config_reloads: Family::default(),
            fleet_claims: Family::default(),
            fleet_claims_held: Gauge::default(),
            fleet_takeovers: Counter::default(),
            fleet_rows_unreadable: Counter::default(),
            scale_set_statistics: Family::default(),
        };
        // Families are cheap handles onto shared series: the registry holds clones.
        let r = &mut m.registry;
        r.register("runnervisor_webhooks", "Webhook deliveries by event and outcome", m.webhooks.clone());
        r.register(
            "runnervisor_webhook_signature_failures",
            "Deliveries refused for a missing or wrong signature",
            m.webhook_signature_failures.clone(),
        );
        r.register(
            "runnervisor_webhook_connections_refused",
            "Webhook listener connections closed at accept, by reason (not_allowed: outside server.allow_sources; per_source: over server.max_connections_per_source)",
            m.webhook_connections_refused.clone(),
        );
        r.register("runnervisor_jobs_received", "Queued jobs matched to a pool", m.jobs_received.clone());
        r.register(
            "runnervisor_fleet_claims",
            "Fleet mode: job claims by result (won, lost to another member, error, given_back: held but this member could not serve it, so given back to the fleet)",
            m.fleet_claims.clone(),
        );
        r.register("runnervisor_fleet_claims_held", "Fleet mode: jobs this member holds", m.fleet_claims_held.clone());
        r.register(
            "runnervisor_fleet_takeovers",
            "Fleet mode: jobs taken over from a member whose lease ran out",
            m.fleet_takeovers.clone(),
        );
        r.register(
            "runnervisor_fleet_rows_unreadable",
            "Fleet mode: job rows skipped because this agent cannot read them (a newer agent's)",
            m.fleet_rows_unreadable.clone(),
        );
        r.register(
            "runnervisor_scale_set_statistics",
            "GitHub's statistics of a scale-set pool's runner scale set, as the last message of the session said (jobs: available, acquired, assigned, running; runners: registered, busy, idle)",
            m.scale_set_statistics.clone(),
        );
        r.register(
            "runnervisor_jobs_unmatched",
            "Queued jobs whose labels no pool has (counted, not tracked)",
            m.jobs_unmatched.clone(),
        );
        r.register("runnervisor_jobs_started", "Jobs a runnervisor runner started", m.jobs_started.clone());
        r.register(
            "runnervisor_jobs_completed",
            "Jobs completed on a runnervisor runner, by conclusion",
            m.jobs_completed.clone(),
        );
        r.register("runnervisor_jobs_failed", "Jobs given up after too many failed VMs", m.jobs_failed.clone());
        r.register("runnervisor_queue_depth", "Jobs waiting for a runner, per pool", m.queue_depth.clone());
        r.register("runnervisor_vms", "VMs per pool and state", m.vms.clone());
        r.register("runnervisor_vms_started", "VMs provisioned and started", m.vms_started.clone());
        r.register(
            "runnervisor_provision_failures",
            "Provisioning failures by pool and step",
            m.provision_failures.clone(),
        );
        r.register("runnervisor_teardowns", "VMs torn down, by reason", m.teardowns.clone());
        r.register(
            "runnervisor_teardown_failures",
            "Teardown steps that failed (retried)",
            m.teardown_failures.clone(),
        );
        r.register_with_unit(
            "runnervisor_provision_duration",
            "Job picked for a VM to domain started",
            Unit::Seconds,
            m.provision_seconds.clone(),
        );
        r.register_with_unit(
            "runnervisor_queued_to_runner_online",
            "Webhook received to the job starting on a runnervisor runner",
            Unit::Seconds,
            m.queued_to_runner_online_seconds.clone(),
        );
        r.register_with_unit(
            "runnervisor_teardown_duration",
            "Teardown of one VM (domain, volumes, runner)",
            Unit::Seconds,
            m.teardown_seconds.clone(),
        );
        r.register(
            "runnervisor_github_api_calls",
            "GitHub API calls by endpoint and HTTP status (0: no response)",
            m.github_api_calls.clone(),
        );
        r.register(
            "runnervisor_github_api_calls_held",
            "GitHub API calls not sent, by endpoint: a rate limit GitHub answered still held (they failed at once; their callers try later)",
            m.github_api_calls_held.clone(),
        );
        r.register(
            "runnervisor_github_rate_limit_remaining",
            "x-ratelimit-remaining of the last GitHub response",
            m.github_rate_limit_remaining.clone(),
        );
        r.register(
            "runnervisor_libvirt_reconnects",
            "libvirt connections re-established",
            m.libvirt_reconnects.clone(),
        );
        r.register(
            "runnervisor_webhook_redeliveries_requested",
            "Failed webhook deliveries the reconciler asked GitHub to redeliver",
            m.deliveries_redelivered.clone(),
        );
        r.register("runnervisor_draining", "1 while the agent takes no new jobs", m.draining.clone());
        r.register(
            "runnervisor_hypervisor_ready",
            "1 while the hypervisor can make VMs: a sweep answered since the agent started or libvirt came back, the storage pool is there, no sweep is overdue (why not: runnervisor status)",
            m.hypervisor_ready.clone(),
        );
        r.register(
            "runnervisor_image_runner_outdated",
            "1 when a pool's image declares a runner older than allowed",
            m.image_runner_outdated.clone(),
        );
        r.register(
            "runnervisor_job_runners",
            "Runners made for queued jobs: path=warm (a waiting warm VM took the job's credential), restored (a VM restored from a snapshot slot) or cold (a VM booted for it)",
            m.job_runners.clone(),
        );
        r.register_with_unit(
            "runnervisor_bind_duration",
            "A job's runner credential made and delivered into a waiting warm VM, until the guest acknowledged it",
            Unit::Seconds,
            m.bind_seconds.clone(),
        );
        r.register(
            "runnervisor_config_reloads",
            "Configuration reloads (SIGHUP): applied, or rejected as a whole (the running one stays)",
            m.config_reloads.clone(),
        );
        r.register(
            "runnervisor_slots_ready",
            "Snapshot slots saved and free to restore a job's VM from",
            m.slots_ready.clone(),
        );
        r.register(
            "runnervisor_slot_failures",
            "Snapshot slots that failed (step: save, restore, saved_state (its saved state gone from the storage pool): the slot is re-made after a back-off, a job whose restore failed boots cold; image: the pool's image cannot serve slots, its jobs boot cold)",
            m.slot_failures.clone(),
        );
        r.register(
            "runnervisor_bind_failures",
            "Warm VMs that failed to take a job (step: credential, delivery, task, timeout); the job went cold",
            m.bind_failures.clone(),
        );
        m
    }
}

/// One pool's gauges the scheduler counts into after its turns (its queue, its VMs by
/// state, its ready slots): handles onto the families' series, kept so that a count is 12
/// stores, not 12 `get_or_create`s (labels made and hashed, the family's lock taken).
pub struct PoolGauges {
    pub queue_depth: Gauge,
    /// In the order of [`VmState::ALL`].
    pub vms: [Gauge; VmState::ALL.len()],
    pub slots_ready: Gauge,
}

impl Metrics {
    /// `pool`'s gauges (its series made if new).
    pub fn pool_gauges(&self, pool: &str) -> PoolGauges {
        let labels = self::pool(pool);
        PoolGauges {
            queue_depth: self.queue_depth.get_or_create(&labels).clone(),
            vms: VmState::ALL.map(|s| self.vms.get_or_create(&VmStateLabels::new(pool, s.as_str())).clone()),
            slots_ready: self.slots_ready.get_or_create(&labels).clone(),
        }
    }

    /// A removed pool's gauges leave the exposition (handles kept onto them count into
    /// nothing: drop them with it).
    pub fn forget_pool(&self, pool: &str) {
        self.queue_depth.remove(&self::pool(pool));
        self.slots_ready.remove(&self::pool(pool));
        for s in VmState::ALL {
            self.vms.remove(&VmStateLabels::new(pool, s.as_str()));
        }
    }

    /// The OpenMetrics text exposition, `# EOF` included.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_keep_what_is_plain_and_replace_the_rest() {
        let long = "p".repeat(200);
        for (input, want) in [
            ("ubuntu-22", "ubuntu-22".to_string()),
            ("in progress", "in progress".into()),
            ("a\"b\\c\nd", "a_b_c_d".into()),
            ("café", "caf_".into()),
            (long.as_str(), "p".repeat(128)),
            (&format!("\"{long}"), format!("_{}", "p".repeat(127))),
        ] {
            assert_eq!(value(input), want, "{input:?}");
        }
    }

    #[test]
    fn renders_openmetrics() {
        let m = Metrics::default();
        m.jobs_received.get_or_create(&pool("small")).inc();
        m.jobs_received.get_or_create(&pool("small")).inc();
        m.vms.get_or_create(&VmStateLabels::new("small", "busy")).set(2);
        m.provision_seconds.get_or_create(&pool("small")).observe(0.3);
        m.webhooks.get_or_create(&WebhookLabels::new("we\"ird\nvalue", "x")).inc();
        m.jobs_unmatched.inc();
        let text = m.render();
        assert!(text.contains("runnervisor_jobs_received_total{pool=\"small\"} 2\n"), "{text}");
        assert!(text.contains("runnervisor_jobs_unmatched_total 1\n"), "{text}");
        assert!(text.contains("runnervisor_vms{pool=\"small\",state=\"busy\"} 2\n"), "{text}");
        assert!(
            text.contains("runnervisor_provision_duration_seconds_bucket{le=\"0.5\",pool=\"small\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("runnervisor_provision_duration_seconds_bucket{le=\"0.25\",pool=\"small\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("runnervisor_provision_duration_seconds_count{pool=\"small\"} 1\n"), "{text}");
        assert!(text.contains("# UNIT runnervisor_provision_duration_seconds seconds\n"), "{text}");
        // An odd value cannot break the exposition's line or quoting.
        assert!(text.contains("runnervisor_webhooks_total{event=\"we_ird_value\",outcome=\"x\"} 1\n"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    /// Every string field of the dashboard that holds a query (`expr`, `definition`).
    fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                for (k, v) in o {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(q)) => out.push(q.clone()),
                        _ => queries(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| queries(v, out)),
            _ => {}
        }
    }

    /// The Grafana dashboard shipped in the package asks only for series the agent exports,
    /// by labels they have (besides those Prometheus adds when it scrapes).
    #[test]
    fn the_grafana_dashboard_queries_only_what_the_agent_exports() {
        use std::collections::{BTreeMap, BTreeSet};
        let m = Metrics::default();
        // One series in every family, so that the exposition shows each name and its labels.
        m.webhooks.get_or_create(&WebhookLabels::new("workflow_job", "accepted")).inc();
        m.webhook_signature_failures.inc();
        m.webhook_connections_refused.get_or_create(&ReasonLabels::new("per_source")).inc();
        for f in [&m.jobs_received, &m.jobs_started, &m.jobs_failed, &m.vms_started] {
            f.get_or_create(&pool("p")).inc();
        }
        m.jobs_unmatched.inc();
        m.jobs_completed.get_or_create(&ConclusionLabels::new("p", "success")).inc();
        m.queue_depth.get_or_create(&pool("p")).set(1);
        m.image_runner_outdated.get_or_create(&pool("p")).set(0);
        m.vms.get_or_create(&VmStateLabels::new("p", "busy")).set(1);
        m.provision_failures.get_or_create(&StepLabels::new("p", "define")).inc();
        m.bind_failures.get_or_create(&StepLabels::new("p", "timeout")).inc();
        m.teardowns.get_or_create(&ReasonLabels::new("stopped")).inc();
        m.teardown_failures.inc();
        for h in [&m.provision_seconds, &m.queued_to_runner_online_seconds, &m.bind_seconds] {
            h.get_or_create(&pool("p")).observe(1.0);
        }
        m.teardown_seconds.observe(1.0);
        m.github_api_calls.get_or_create(&ApiCallLabels::new("GET /x", 200)).inc();
        m.github_rate_limit_remaining.set(1);
        m.libvirt_reconnects.inc();
        m.deliveries_redelivered.inc();
        m.draining.set(0);
        m.hypervisor_ready.set(1);
        m.job_runners.get_or_create(&PathLabels::new("p", "warm")).inc();
        m.config_reloads.get_or_create(&ResultLabels::new("applied")).inc();
        // Series name -> its labels.
        let mut exported: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for line in m.render().lines().filter(|l| !l.starts_with('#')) {
            let end = line.find(['{', ' ']).unwrap();
            let labels = line[end..].strip_prefix('{').and_then(|r| r.split_once('}')).map_or("", |(l, _)| l);
            let set = exported.entry(line[..end].to_string()).or_default();
            set.extend(labels.split(',').filter(|p| !p.is_empty()).map(|p| p.split('=').next().unwrap().to_string()));
        }
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../grafana/runnervisor.json")).expect("the dashboard is JSON");
        let mut all = Vec::new();
        queries(&dashboard, &mut all);
        assert!(all.len() >= 20, "{} queries", all.len());
        let scrape = ["instance", "job", "le"];
        for q in &all {
            let mut names = Vec::new();
            let mut rest = q.as_str();
            while let Some(i) = rest.find("runnervisor_") {
                let at = &rest[i..];
                let end = at.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(at.len());
                let name = &at[..end];
                let labels = exported
                    .get(name)
                    .unwrap_or_else(|| panic!("the dashboard asks for {name}, which the agent does not export: {q}"));
                if let Some(selector) = at[end..].strip_prefix('{') {
                    for matcher in selector.split('}').next().unwrap().split(',') {
                        let label = matcher.split(['=', '!', '~']).next().unwrap().trim();
                        assert!(scrape.contains(&label) || labels.contains(label), "{name} has no label {label}: {q}");
                    }
                }
                names.push(name);
                rest = &at[end..];
            }
            assert!(!names.is_empty(), "a query without a runnervisor metric: {q}");
            let mut rest = q.as_str();
            while let Some(i) = rest.find("by (") {
                let inner = &rest[i + 4..];
                let close = inner.find(')').unwrap();
                for label in inner[..close].split(',').map(str::trim) {
                    assert!(
                        scrape.contains(&label) || names.iter().any(|n| exported[*n].contains(label)),
                        "no metric of this query has the label {label}: {q}"
                    );
                }
                rest = &inner[close..];
            }
        }
    }
}

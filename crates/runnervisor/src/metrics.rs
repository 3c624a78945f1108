//! Metrics in one place, rendered as OpenMetrics text (Prometheus scrapes it).
//! A deliberately small implementation: labelled counters, gauges and histograms.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

type Labels = Vec<(String, String)>;

fn key(labels: &[(&str, &str)]) -> Labels {
    labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn render_labels(labels: &Labels, extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() { String::new() } else { format!("{{{}}}", parts.join(",")) }
}

fn fmt_f64(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 { format!("{}", v as i64) } else { format!("{v}") }
}

pub struct Counter {
    name: &'static str,
    help: &'static str,
    values: Mutex<BTreeMap<Labels, f64>>,
}

impl Counter {
    const fn new(name: &'static str, help: &'static str) -> Self {
        Counter { name, help, values: Mutex::new(BTreeMap::new()) }
    }
    pub fn inc(&self, labels: &[(&str, &str)]) {
        self.add(labels, 1.0);
    }
    pub fn add(&self, labels: &[(&str, &str)], v: f64) {
        *self.values.lock().unwrap_or_else(|p| p.into_inner()).entry(key(labels)).or_default() += v;
    }
    pub fn get(&self, labels: &[(&str, &str)]) -> f64 {
        self.values.lock().unwrap_or_else(|p| p.into_inner()).get(&key(labels)).copied().unwrap_or(0.0)
    }
    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# TYPE {} counter\n# HELP {} {}", self.name, self.name, self.help);
        for (l, v) in self.values.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "{}_total{} {}", self.name, render_labels(l, None), fmt_f64(*v));
        }
    }
}

/// A counter without labels.
pub struct Plain(Counter);
impl Plain {
    pub fn inc(&self) {
        self.0.inc(&[]);
    }
    pub fn get(&self) -> f64 {
        self.0.get(&[])
    }
}

pub struct Gauge {
    name: &'static str,
    help: &'static str,
    values: Mutex<BTreeMap<Labels, f64>>,
}

impl Gauge {
    const fn new(name: &'static str, help: &'static str) -> Self {
        Gauge { name, help, values: Mutex::new(BTreeMap::new()) }
    }
    pub fn set(&self, labels: &[(&str, &str)], v: f64) {
        self.values.lock().unwrap_or_else(|p| p.into_inner()).insert(key(labels), v);
    }
    pub fn get(&self, labels: &[(&str, &str)]) -> f64 {
        self.values.lock().unwrap_or_else(|p| p.into_inner()).get(&key(labels)).copied().unwrap_or(0.0)
    }
    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# TYPE {} gauge\n# HELP {} {}", self.name, self.name, self.help);
        for (l, v) in self.values.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "{}{} {}", self.name, render_labels(l, None), fmt_f64(*v));
        }
    }
}

const BUCKETS: &[f64] =
    &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0];

pub struct Histogram {
    name: &'static str,
    help: &'static str,
    values: Mutex<BTreeMap<Labels, (Vec<u64>, f64, u64)>>,
}

impl Histogram {
    const fn new(name: &'static str, help: &'static str) -> Self {
        Histogram { name, help, values: Mutex::new(BTreeMap::new()) }
    }
    pub fn observe(&self, labels: &[(&str, &str)], seconds: f64) {
        let mut m = self.values.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(key(labels)).or_insert_with(|| (vec![0; BUCKETS.len()], 0.0, 0));
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                e.0[i] += 1;
            }
        }
        e.1 += seconds;
        e.2 += 1;
    }
    pub fn count(&self, labels: &[(&str, &str)]) -> u64 {
        self.values.lock().unwrap_or_else(|p| p.into_inner()).get(&key(labels)).map(|e| e.2).unwrap_or(0)
    }
    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# TYPE {} histogram\n# HELP {} {}\n# UNIT {} seconds",
            self.name, self.name, self.help, self.name
        );
        for (l, (buckets, sum, count)) in self.values.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ =
                    writeln!(out, "{}_bucket{} {}", self.name, render_labels(l, Some(("le", fmt_f64(*b)))), buckets[i]);
            }
            let _ = writeln!(out, "{}_bucket{} {}", self.name, render_labels(l, Some(("le", "+Inf".into()))), count);
            let _ = writeln!(out, "{}_sum{} {}", self.name, render_labels(l, None), sum);
            let _ = writeln!(out, "{}_count{} {}", self.name, render_labels(l, None), count);
        }
    }
}

pub struct Metrics {
    pub webhooks: Counter,
    pub webhook_signature_failures: Plain,
    pub jobs_received: Counter,
    pub jobs_unmatched: Plain,
    pub jobs_started: Counter,
    pub jobs_completed: Counter,
    pub jobs_failed: Counter,
    pub queue_depth: Gauge,
    pub vms: Gauge,
    pub vms_started: Counter,
    pub provision_failures: Counter,
    pub teardowns: Counter,
    pub teardown_failures: Plain,
    pub provision_seconds: Histogram,
    pub queued_to_runner_online_seconds: Histogram,
    pub teardown_seconds: Histogram,
    pub github_api_calls: Counter,
    pub github_rate_limit_remaining: Gauge,
    pub libvirt_reconnects: Plain,
    pub deliveries_redelivered: Plain,
    pub draining: Gauge,
    pub image_runner_outdated: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            webhooks: Counter::new("runnervisor_webhooks", "Webhook deliveries by event and outcome."),
            webhook_signature_failures: Plain(Counter::new(
                "runnervisor_webhook_signature_failures",
                "Deliveries refused for a missing or wrong signature.",
            )),
            jobs_received: Counter::new("runnervisor_jobs_received", "Queued jobs matched to a pool."),
            jobs_unmatched: Plain(Counter::new(
                "runnervisor_jobs_unmatched",
                "Queued jobs whose labels no pool has (counted, not tracked).",
            )),
            jobs_started: Counter::new("runnervisor_jobs_started", "Jobs a runnervisor runner started."),
            jobs_completed: Counter::new(
                "runnervisor_jobs_completed",
                "Jobs completed on a runnervisor runner, by conclusion.",
            ),
            jobs_failed: Counter::new("runnervisor_jobs_failed", "Jobs given up after too many failed VMs."),
            queue_depth: Gauge::new("runnervisor_queue_depth", "Jobs waiting for a runner, per pool."),
            vms: Gauge::new("runnervisor_vms", "VMs per pool and state."),
            vms_started: Counter::new("runnervisor_vms_started", "VMs provisioned and started."),
            provision_failures: Counter::new(
                "runnervisor_provision_failures",
                "Provisioning failures by pool and step.",
            ),
            teardowns: Counter::new("runnervisor_teardowns", "VMs torn down, by reason."),
            teardown_failures: Plain(Counter::new(
                "runnervisor_teardown_failures",
                "Teardown steps that failed (retried).",
            )),
            provision_seconds: Histogram::new(
                "runnervisor_provision_duration_seconds",
                "Job picked for a VM to domain started.",
            ),
            queued_to_runner_online_seconds: Histogram::new(
                "runnervisor_queued_to_runner_online_seconds",
                "Webhook received to the job starting on a runnervisor runner.",
            ),
            teardown_seconds: Histogram::new(
                "runnervisor_teardown_duration_seconds",
                "Teardown of one VM (domain, volumes, runner).",
            ),
            github_api_calls: Counter::new(
                "runnervisor_github_api_calls",
                "GitHub API calls by endpoint and HTTP status (0: no response).",
            ),
            github_rate_limit_remaining: Gauge::new(
                "runnervisor_github_rate_limit_remaining",
                "x-ratelimit-remaining of the last GitHub response.",
            ),
            libvirt_reconnects: Plain(Counter::new(
                "runnervisor_libvirt_reconnects",
                "libvirt connections re-established.",
            )),
            deliveries_redelivered: Plain(Counter::new(
                "runnervisor_webhook_redeliveries_requested",
                "Failed webhook deliveries the reconciler asked GitHub to redeliver.",
            )),
            draining: Gauge::new("runnervisor_draining", "1 while the agent takes no new jobs."),
            image_runner_outdated: Gauge::new(
                "runnervisor_image_runner_outdated",
                "1 when a pool's image declares a runner older than allowed.",
            ),
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in [
            &self.webhooks,
            &self.webhook_signature_failures.0,
            &self.jobs_received,
            &self.jobs_unmatched.0,
            &self.jobs_started,
            &self.jobs_completed,
            &self.jobs_failed,
            &self.vms_started,
            &self.provision_failures,
            &self.teardowns,
            &self.teardown_failures.0,
            &self.github_api_calls,
            &self.libvirt_reconnects.0,
            &self.deliveries_redelivered.0,
        ] {
            c.render(&mut out);
        }
        for g in [
            &self.queue_depth,
            &self.vms,
            &self.github_rate_limit_remaining,
            &self.draining,
            &self.image_runner_outdated,
        ] {
            g.render(&mut out);
        }
        for h in [&self.provision_seconds, &self.queued_to_runner_online_seconds, &self.teardown_seconds] {
            h.render(&mut out);
        }
        out.push_str("# EOF\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openmetrics() {
        let m = Metrics::default();
        m.jobs_received.inc(&[("pool", "small")]);
        m.jobs_received.inc(&[("pool", "small")]);
        m.vms.set(&[("pool", "small"), ("state", "busy")], 2.0);
        m.provision_seconds.observe(&[("pool", "small")], 0.3);
        m.webhooks.inc(&[("event", "we\"ird"), ("outcome", "x")]);
        let text = m.render();
        assert!(text.contains("runnervisor_jobs_received_total{pool=\"small\"} 2\n"), "{text}");
        assert!(text.contains("runnervisor_vms{pool=\"small\",state=\"busy\"} 2\n"));
        assert!(text.contains("runnervisor_provision_duration_seconds_bucket{pool=\"small\",le=\"0.5\"} 1\n"));
        assert!(text.contains("runnervisor_provision_duration_seconds_bucket{pool=\"small\",le=\"0.25\"} 0\n"));
        assert!(text.contains("runnervisor_provision_duration_seconds_count{pool=\"small\"} 1\n"));
        assert!(text.contains("event=\"we\\\"ird\""));
        assert!(text.ends_with("# EOF\n"));
    }
}

//! SIGHUP (`systemctl reload runnervisor`): the configuration file is read again and
//! validated; a valid one goes to the scheduler, which applies what can change live
//! ([`crate::config::reload`]) and answers what it applied and what waits for a restart.
//! An invalid one is rejected as a whole, with the error naming the key and the value,
//! and the running configuration stays. systemd hears RELOADING=1, then READY=1.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, ReloadReport};
use crate::metrics::{Metrics, ResultLabels};

/// A validated configuration for the scheduler, and where its answer goes.
pub type Request = (Arc<Config>, oneshot::Sender<ReloadReport>);

/// Reloads `path` on every SIGHUP until the agent stops (`to_agent` closes). `set_log_level`
/// applies a changed `log_level` (the logging is the binary's).
pub async fn on_sighup(
    path: PathBuf,
    to_agent: mpsc::UnboundedSender<Request>,
    metrics: Arc<Metrics>,
    set_log_level: impl Fn(&str) -> Result<(), String>,
) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: the configuration cannot be reloaded");
            return;
        }
    };
    while hup.recv().await.is_some() {
        crate::systemd::reloading();
        let applied = reload_once(&path, &to_agent, &metrics, &set_log_level).await;
        crate::systemd::ready();
        if applied.is_none() && to_agent.is_closed() {
            return;
        }
    }
}

/// One reload; the report, or `None` if it was rejected or the agent is stopping.
async fn reload_once(
    path: &std::path::Path,
    to_agent: &mpsc::UnboundedSender<Request>,
    metrics: &Metrics,
    set_log_level: &impl Fn(&str) -> Result<(), String>,
) -> Option<ReloadReport> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            metrics.config_reloads.get_or_create(&ResultLabels::new("rejected")).inc();
            tracing::error!(config = %path.display(), "configuration NOT reloaded, the running one stays: {e}");
            return None;
        }
    };
    let level = config.log_level.clone();
    let (reply, answer) = oneshot::channel();
    to_agent.send((Arc::new(config), reply)).ok()?;
    let report = answer.await.ok()?;
    if report.applied.iter().any(|a| a == "log_level")
        && let Err(e) = set_log_level(&level)
    {
        tracing::warn!("log_level not changed: {e}");
    }
    metrics.config_reloads.get_or_create(&ResultLabels::new("applied")).inc();
    if report.kept.is_empty() {
        tracing::info!(config = %path.display(), applied = ?report.applied, "configuration reloaded");
    } else {
        tracing::warn!(config = %path.display(), applied = ?report.applied, kept = ?report.kept, "configuration reloaded; what is under `kept` cannot change while the agent runs and applies at the next restart");
    }
    Some(report)
}

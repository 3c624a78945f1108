//! Fault injection: what `POST /_sim/faults` arms. Each fault fires `count` times
//! (forever when absent) and then disarms itself.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// REST calls answer `status` (5xx) with a GitHub-style error body.
    ApiError {
        status: u16,
        #[serde(default)]
        count: Option<u32>,
        /// Only calls whose path contains this.
        #[serde(default)]
        path: Option<String>,
    },
    /// REST calls are rate limited: 429/403 with `retry-after` (secondary limit), or with
    /// `primary: true` a 403 with `x-ratelimit-remaining: 0` and a reset `reset_in` seconds away.
    RateLimit {
        status: u16,
        #[serde(default)]
        retry_after: Option<u64>,
        #[serde(default)]
        primary: bool,
        #[serde(default)]
        reset_in: Option<u64>,
        #[serde(default)]
        count: Option<u32>,
        #[serde(default)]
        path: Option<String>,
    },
    /// REST calls take `ms` longer.
    Latency {
        ms: u64,
        #[serde(default)]
        count: Option<u32>,
        #[serde(default)]
        path: Option<String>,
    },
    /// A runner's first contact (registration, or the first poll of a JIT runner) never
    /// gets an answer, nor does any later request of that runner: it never comes online,
    /// like a VM that never boots properly.
    RunnerStall {
        #[serde(default)]
        count: Option<u32>,
    },
    /// Webhook deliveries are not sent; they show as failed in the deliveries API. With
    /// `redeliveries`, the redeliveries asked for fail too (and count).
    WebhookDrop {
        #[serde(default)]
        count: Option<u32>,
        #[serde(default)]
        action: Option<String>,
        #[serde(default)]
        redeliveries: bool,
    },
    /// Webhook deliveries are sent twice (same GUID, or a new one with `new_guid`).
    WebhookDuplicate {
        #[serde(default)]
        count: Option<u32>,
        #[serde(default)]
        action: Option<String>,
        #[serde(default)]
        new_guid: bool,
    },
    /// The next `count` deliveries are held back and then sent in reverse order
    /// (released early if nothing new comes for 3 seconds).
    WebhookReorder { count: u32 },
}

impl Fault {
    fn count_mut(&mut self) -> Option<&mut Option<u32>> {
        match self {
            Fault::ApiError { count, .. }
            | Fault::RateLimit { count, .. }
            | Fault::Latency { count, .. }
            | Fault::RunnerStall { count }
            | Fault::WebhookDrop { count, .. }
            | Fault::WebhookDuplicate { count, .. } => Some(count),
            Fault::WebhookReorder { .. } => None,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        match self {
            Fault::ApiError { status, .. } if !(500..600).contains(status) => {
                Err(format!("api_error status must be 5xx, got {status}"))
            }
            Fault::RateLimit { status, .. } if *status != 403 && *status != 429 => {
                Err(format!("rate_limit status must be 403 or 429, got {status}"))
            }
            Fault::WebhookReorder { count } if *count < 2 => Err("webhook_reorder count must be at least 2".into()),
            _ => Ok(()),
        }
    }
}

/// What the REST layer must do to one call.
#[derive(Debug, Default, PartialEq)]
pub struct ApiVerdict {
    pub latency_ms: u64,
    pub error: Option<Fault>,
}

/// What the webhook sender must do to one delivery.
#[derive(Debug, Default, PartialEq)]
pub struct WebhookVerdict {
    pub drop: bool,
    pub duplicate: Option<bool>, // Some(new_guid)
    pub reorder_batch: Option<u32>,
}

#[derive(Debug, Default)]
pub struct Faults {
    armed: Vec<Fault>,
}

/// Consumes one firing of a fault; returns false when it is already spent.
fn fire(f: &mut Fault) -> bool {
    match f.count_mut() {
        Some(Some(0)) => false,
        Some(Some(n)) => {
            *n -= 1;
            true
        }
        _ => true,
    }
}

fn path_matches(filter: &Option<String>, path: &str) -> bool {
    filter.as_deref().is_none_or(|p| path.contains(p))
}

impl Faults {
    pub fn arm(&mut self, fault: Fault) {
        self.armed.push(fault);
    }

    pub fn clear(&mut self) {
        self.armed.clear();
    }

    pub fn list(&self) -> &[Fault] {
        &self.armed
    }

    fn gc(&mut self) {
        self.armed.retain(|f| !matches!(f.clone().count_mut(), Some(Some(0))));
    }

    // `fire` needs the fault mutably, which a match guard cannot borrow.
    #[allow(clippy::collapsible_match)]
    pub fn on_api_call(&mut self, path: &str) -> ApiVerdict {
        let mut v = ApiVerdict::default();
        for f in self.armed.iter_mut() {
            match f {
                Fault::Latency { ms, path: p, .. } if path_matches(p, path) => {
                    let ms = *ms;
                    if fire(f) {
                        v.latency_ms += ms;
                    }
                }
                Fault::ApiError { path: p, .. } | Fault::RateLimit { path: p, .. }
                    if v.error.is_none() && path_matches(p, path) =>
                {
                    if fire(f) {
                        v.error = Some(f.clone());
                    }
                }
                _ => {}
            }
        }
        self.gc();
        v
    }

    pub fn on_runner_first_contact(&mut self) -> bool {
        let stall = self.armed.iter_mut().any(|f| matches!(f, Fault::RunnerStall { .. }) && fire(f));
        self.gc();
        stall
    }

    /// What happens to a delivery of `action`; a redelivery (`redelivery`) is only dropped
    /// (by a drop that says so), never duplicated or reordered.
    pub fn on_webhook(&mut self, action: Option<&str>, redelivery: bool) -> WebhookVerdict {
        let mut v = WebhookVerdict::default();
        let action_matches = |a: &Option<String>| a.as_deref().is_none_or(|a| Some(a) == action);
        // A dropped delivery is not sent at all: no other fault spends a firing on it.
        for f in self.armed.iter_mut() {
            if let Fault::WebhookDrop { action: a, redeliveries, .. } = f
                && action_matches(a)
                && (*redeliveries || !redelivery)
                && fire(f)
            {
                v.drop = true;
                break;
            }
        }
        if v.drop || redelivery {
            self.gc();
            return v;
        }
        for f in self.armed.iter_mut() {
            match f {
                Fault::WebhookDuplicate { action: a, new_guid, .. } if v.duplicate.is_none() && action_matches(a) => {
                    let new_guid = *new_guid;
                    if fire(f) {
                        v.duplicate = Some(new_guid);
                    }
                }
                Fault::WebhookReorder { count } if v.reorder_batch.is_none() => {
                    v.reorder_batch = Some(*count);
                }
                _ => {}
            }
        }
        self.gc();
        v
    }

    /// The held-back batch was released: a reorder fault fires once.
    pub fn reorder_released(&mut self) {
        if let Some(i) = self.armed.iter().position(|f| matches!(f, Fault::WebhookReorder { .. })) {
            self.armed.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_faults_disarm_themselves() {
        let mut f = Faults::default();
        f.arm(Fault::ApiError { status: 502, count: Some(2), path: Some("jitconfig".into()) });
        assert!(f.on_api_call("/orgs/o/actions/runners").error.is_none(), "path filter");
        assert!(f.on_api_call("/orgs/o/actions/runners/generate-jitconfig").error.is_some());
        assert!(f.on_api_call("/orgs/o/actions/runners/generate-jitconfig").error.is_some());
        assert!(f.on_api_call("/orgs/o/actions/runners/generate-jitconfig").error.is_none());
        assert!(f.list().is_empty());
    }

    #[test]
    fn latency_adds_up_and_uncounted_faults_stay() {
        let mut f = Faults::default();
        f.arm(Fault::Latency { ms: 100, count: None, path: None });
        f.arm(Fault::Latency { ms: 50, count: Some(1), path: None });
        f.arm(Fault::RateLimit {
            status: 429,
            retry_after: Some(1),
            primary: false,
            reset_in: None,
            count: None,
            path: None,
        });
        let v = f.on_api_call("/x");
        assert_eq!(v.latency_ms, 150);
        assert!(matches!(v.error, Some(Fault::RateLimit { status: 429, .. })));
        assert_eq!(f.on_api_call("/x").latency_ms, 100);
        assert_eq!(f.list().len(), 2);
    }

    #[test]
    fn webhook_faults_filter_by_action() {
        let mut f = Faults::default();
        f.arm(Fault::WebhookDrop { count: Some(1), action: Some("queued".into()), redeliveries: false });
        assert!(!f.on_webhook(Some("completed"), false).drop);
        assert!(!f.on_webhook(Some("queued"), true).drop, "a redelivery is sent");
        assert!(f.on_webhook(Some("queued"), false).drop);
        assert!(!f.on_webhook(Some("queued"), false).drop);
        f.arm(Fault::WebhookDrop { count: Some(2), action: None, redeliveries: true });
        assert!(f.on_webhook(Some("queued"), true).drop, "a redelivery fails too");
        assert!(f.on_webhook(Some("queued"), false).drop);
        assert!(!f.on_webhook(Some("queued"), true).drop);
    }

    #[test]
    fn validation() {
        assert!(Fault::ApiError { status: 404, count: None, path: None }.validate().is_err());
        assert!(
            Fault::RateLimit {
                status: 500,
                retry_after: None,
                primary: false,
                reset_in: None,
                count: None,
                path: None
            }
            .validate()
            .is_err()
        );
        assert!(serde_json::from_str::<Fault>(r#"{"kind":"api_error","status":500,"bogus":1}"#).is_err());
        let f: Fault = serde_json::from_str(r#"{"kind":"webhook_duplicate","count":3}"#).unwrap();
        assert_eq!(f, Fault::WebhookDuplicate { count: Some(3), action: None, new_guid: false });
    }
}

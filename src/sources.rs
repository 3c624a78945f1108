//! Who may hold connections to a listener, decided at accept before a byte is read:
//! - `server.allow_sources`: CIDRs, and `"github"` for the ranges GitHub publishes for
//!   its webhooks (`GET /meta`, `hooks`), refreshed daily by [`keep_github_ranges`];
//!   a connection from anywhere else is closed at once;
//! - `server.max_connections_per_source`: connections one source holds at once (an IPv6
//!   source is its /64, what one host is usually given); beyond it, closed at once.
//!
//! Without the per-source cap one noisy address holding slow-loris connections could fill
//! the listener's whole connection cap and push GitHub's deliveries into the backlog.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use tokio_util::sync::CancellationToken;

use crate::github::GitHub;
use crate::logging::Throttle;
use crate::metrics::{Metrics, ReasonLabels};

/// One `server.allow_sources` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRule {
    /// An address or network, `ADDRESS[/PREFIX]`.
    Net(IpNet),
    /// The ranges GitHub sends webhooks from (`GET /meta`, field `hooks`).
    GitHub,
}

impl FromStr for SourceRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "github" {
            return Ok(SourceRule::GitHub);
        }
        let net = match s.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => match s.parse::<IpAddr>() {
                Ok(a) => IpNet::from(a),
                Err(_) => return Err(format!("{s:?} is not \"github\", an IP address or a CIDR (e.g. 192.0.2.0/24)")),
            },
        };
        if net.trunc() != net {
            return Err(format!("{net} has host bits set (the network is {})", net.trunc()));
        }
        Ok(SourceRule::Net(net))
    }
}

impl fmt::Display for SourceRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceRule::Net(n) => write!(f, "{n}"),
            SourceRule::GitHub => f.write_str("github"),
        }
    }
}

impl<'de> Deserialize<'de> for SourceRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e| serde::de::Error::custom(format!("allow_sources entry {s:?}: {e}")))
    }
}

/// The address a per-source count is kept under: IPv4 (also when mapped into IPv6) as it
/// is, IPv6 by its /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source is not in `server.allow_sources`.
    NotAllowed,
    /// Its source already holds `server.max_connections_per_source` connections.
    PerSource,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "not_allowed",
            Refusal::PerSource => "per_source",
        }
    }
}

/// The admission rules of one listener, and the connections each source holds now.
pub struct Admission {
    /// `None`: every source may connect.
    allow: Option<Vec<SourceRule>>,
    /// GitHub's hook ranges, as last fetched (empty until the first fetch succeeds: the
    /// listener fails closed for them).
    github: RwLock<Vec<IpNet>>,
    per_source: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
    metrics: Option<Arc<Metrics>>,
    /// One log line per kind of refusal every so often, whatever the rate of attempts.
    throttles: [Throttle; 2],
}

impl Admission {
    pub fn new(allow: Option<Vec<SourceRule>>, per_source: usize, metrics: Option<Arc<Metrics>>) -> Arc<Admission> {
        Arc::new(Admission {
            allow,
            github: RwLock::new(Vec::new()),
            per_source: per_source.max(1),
            held: Mutex::new(HashMap::new()),
            metrics,
            throttles: [Throttle::new(Duration::from_secs(10)), Throttle::new(Duration::from_secs(10))],
        })
    }

    /// Whether the allow-list names GitHub's ranges (which then need fetching).
    pub fn wants_github(&self) -> bool {
        self.allow.as_ref().is_some_and(|a| a.contains(&SourceRule::GitHub))
    }

    pub fn set_github_ranges(&self, ranges: Vec<IpNet>) {
        *self.github.write().unwrap_or_else(|e| e.into_inner()) = ranges;
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        let Some(rules) = &self.allow else { return true };
        // An IPv4 address mapped into IPv6 (a dual-stack listener's view) as itself.
        let ip = ip.to_canonical();
        rules.iter().any(|r| match r {
            SourceRule::Net(n) => n.contains(&ip),
            SourceRule::GitHub => self.github.read().unwrap_or_else(|e| e.into_inner()).iter().any(|n| n.contains(&ip)),
        })
    }

    /// Admits a connection from `peer`, or says why not (counted and, throttled, logged).
    /// The slot is given back when the returned guard drops.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<SourceSlot, Refusal> {
        let refusal = if !self.allowed(peer) {
            Refusal::NotAllowed
        } else {
            let key = source_key(peer);
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let n = held.entry(key).or_insert(0);
            if *n < self.per_source {
                *n += 1;
                return Ok(SourceSlot { admission: self.clone(), key });
            }
            Refusal::PerSource
        };
        if let Some(m) = &self.metrics {
            m.webhook_connections_refused.get_or_create(&ReasonLabels::new(refusal.label())).inc();
        }
        let throttle = &self.throttles[refusal as usize];
        if let Some(suppressed) = throttle.check() {
            match refusal {
                Refusal::NotAllowed => {
                    tracing::warn!(source = %peer, suppressed, "connection refused: source not in server.allow_sources")
                }
                Refusal::PerSource => tracing::warn!(
                    source = %source_key(peer), suppressed, max = self.per_source,
                    "connection refused: the source holds server.max_connections_per_source connections"
                ),
            }
        }
        Err(refusal)
    }

    /// Connections `peer`'s source holds now.
    pub fn held(&self, peer: IpAddr) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).get(&source_key(peer)).copied().unwrap_or(0)
    }
}

/// A connection's place in its source's count.
pub struct SourceSlot {
    admission: Arc<Admission>,
    key: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.admission.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// How often GitHub's hook ranges are fetched again once known.
pub const GITHUB_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// Fetches GitHub's hook ranges into `admission` now and every [`GITHUB_REFRESH`]; after
/// a failure, again within minutes (1, 2, 4, ... 60). The last good list stays in force
/// meanwhile; before the first, only the allow-list's own networks get in.
pub async fn keep_github_ranges<G: GitHub>(github: Arc<G>, admission: Arc<Admission>, shutdown: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let wait = match github.hook_ranges().await {
            Ok(ranges) => {
                tracing::info!(ranges = ranges.len(), "GitHub's webhook source ranges fetched (server.allow_sources)");
                admission.set_github_ranges(ranges);
                failures = 0;
                GITHUB_REFRESH
            }
            Err(e) => {
                failures += 1;
                let wait = Duration::from_secs(60 << (failures - 1).min(6)).min(Duration::from_secs(3600));
                let known = !admission.github.read().unwrap_or_else(|e| e.into_inner()).is_empty();
                tracing::error!(
                    error = %e, retry_in_s = wait.as_secs(), keeping_last_list = known,
                    "cannot fetch GitHub's webhook source ranges (GET /meta)"
                );
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rules_parse_and_say_what_is_wrong() {
        let ok: &[(&str, &str)] = &[
            ("github", "github"),
            ("192.0.2.0/24", "192.0.2.0/24"),
            ("198.51.100.7", "198.51.100.7/32"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("::1", "::1/128"),
        ];
        for (text, shown) in ok {
            let r: SourceRule = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(r.to_string(), *shown);
        }
        let bad: &[(&str, &str)] = &[
            ("GitHub", "not \"github\""),
            ("192.0.2.1/24", "host bits set (the network is 192.0.2.0/24)"),
            ("192.0.2.0/33", "not \"github\""),
            ("example.com", "not \"github\""),
            ("", "not \"github\""),
        ];
        for (text, want) in bad {
            let e = text.parse::<SourceRule>().expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn sources_are_counted_by_address_and_ipv6_by_its_64() {
        let table: &[(&str, &str)] = &[
            ("127.0.0.2", "127.0.0.2"),
            ("::ffff:127.0.0.2", "127.0.0.2"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::"),
            ("2001:db8:1:2::ffff", "2001:db8:1:2::"),
        ];
        for (a, key) in table {
            assert_eq!(source_key(ip(a)), ip(key), "{a}");
        }
    }

    #[test]
    fn a_source_holds_at_most_its_cap_and_gets_slots_back() {
        let adm = Admission::new(None, 2, None);
        let a = adm.admit(ip("127.0.0.2")).unwrap();
        let b = adm.admit(ip("::ffff:127.0.0.2")).unwrap();
        assert_eq!(adm.admit(ip("127.0.0.2")).err(), Some(Refusal::PerSource));
        // Another source is not affected; another host of the same /64 is the same source.
        let c = adm.admit(ip("127.0.0.1")).unwrap();
        let _d = adm.admit(ip("2001:db8::1")).unwrap();
        let _e = adm.admit(ip("2001:db8::2")).unwrap();
        assert_eq!(adm.admit(ip("2001:db8::3")).err(), Some(Refusal::PerSource));
        drop(a);
        assert_eq!(adm.held(ip("127.0.0.2")), 1);
        let _f = adm.admit(ip("127.0.0.2")).unwrap();
        drop((b, c));
        assert_eq!(adm.held(ip("127.0.0.1")), 0);
        assert!(!adm.held.lock().unwrap().contains_key(&ip("127.0.0.1")), "no entry kept for a source gone");
    }

    #[test]
    fn the_allow_list_admits_its_networks_and_githubs_once_known() {
        let rules = vec!["10.1.0.0/16".parse().unwrap(), "github".parse().unwrap(), "2001:db8::/48".parse().unwrap()];
        let adm = Admission::new(Some(rules), 100, None);
        assert!(adm.wants_github());
        assert!(adm.admit(ip("10.1.2.3")).is_ok());
        assert!(adm.admit(ip("::ffff:10.1.2.3")).is_ok());
        assert!(adm.admit(ip("2001:db8:0:5::1")).is_ok());
        // GitHub's ranges are not known yet: closed for them.
        assert_eq!(adm.admit(ip("192.30.252.7")).err(), Some(Refusal::NotAllowed));
        adm.set_github_ranges(vec!["192.30.252.0/22".parse().unwrap()]);
        assert!(adm.admit(ip("192.30.252.7")).is_ok());
        assert_eq!(adm.admit(ip("192.30.248.1")).err(), Some(Refusal::NotAllowed));
        assert_eq!(adm.admit(ip("127.0.0.1")).err(), Some(Refusal::NotAllowed));
        assert!(!Admission::new(None, 1, None).wants_github());
    }
}

//! What a golden image declares about itself: a manifest next to it,
//! `<image>.manifest.json`, written by the image recipe (`images/production/build`):
//! `{"runner_version": "2.330.0", "runner_released": "2026-11-01", "built_at": "...",
//! "bind_protocol": 3}` (2: takes its runner over the bind port; 3: also makes itself a
//! fresh instance from the bind message, [`crate::cloudinit::GUEST_FRESHENS`]).
//! GitHub refuses runners more than 30 days behind a newer release, so the agent warns
//! (log + `runnervisor_image_runner_outdated`) when an image's runner is older than the
//! pool's `runner_max_age`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub runner_version: String,
    /// `YYYY-MM-DD`, the runner release's date.
    pub runner_released: String,
    #[serde(default)]
    pub built_at: Option<String>,
    /// The bind protocol its `runnervisor-warm` unit speaks; absent: 1 (images baked before
    /// every VM got its credential over the bind port).
    #[serde(default)]
    pub bind_protocol: Option<u32>,
}

/// Why the image cannot serve jobs of this agent, if it cannot: its guest unit speaks an
/// older bind protocol than [`crate::cloudinit::BIND_PROTOCOL`] (its VMs would never take
/// their runner's command, and their jobs would be given up).
pub fn bind_protocol_problem(m: &Manifest) -> Option<String> {
    let has = m.bind_protocol.unwrap_or(1);
    (has < crate::cloudinit::BIND_PROTOCOL).then(|| {
        format!(
            "the image's runnervisor-warm unit speaks bind protocol {has}; this agent sends {}: its VMs would not take their runner's command",
            crate::cloudinit::BIND_PROTOCOL
        )
    })
}

pub fn manifest_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".manifest.json");
    p.into()
}

pub fn read_manifest(image: &Path) -> Option<Manifest> {
    let text = std::fs::read_to_string(manifest_path(image)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Why the image's runner is too old, if it is.
pub fn runner_age_problem(m: &Manifest, max_age: Duration, now: SystemTime) -> Option<String> {
    let released = match humantime::parse_rfc3339_weak(&format!("{} 00:00:00", m.runner_released)) {
        Ok(t) => t,
        Err(_) => {
            return Some(format!("runner_released {:?} is not a YYYY-MM-DD date", m.runner_released));
        }
    };
    let age = now.duration_since(released).unwrap_or_default();
    (age > max_age).then(|| {
        format!(
            "actions/runner {} was released {} days ago, more than runner_max_age ({} days): GitHub stops accepting runners 30 days behind a newer release",
            m.runner_version,
            age.as_secs() / 86400,
            max_age.as_secs() / 86400
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_rule() {
        let m = Manifest {
            runner_version: "2.330.0".into(),
            runner_released: "2026-11-01".into(),
            built_at: None,
            bind_protocol: Some(2),
        };
        let day = Duration::from_secs(86400);
        let nov1 = humantime::parse_rfc3339("2026-11-01T00:00:00Z").unwrap();
        assert_eq!(runner_age_problem(&m, 30 * day, nov1 + 29 * day), None);
        let p = runner_age_problem(&m, 30 * day, nov1 + 31 * day).unwrap();
        assert!(p.contains("31 days ago"), "{p}");
        let bad = Manifest { runner_released: "last week".into(), ..m };
        assert!(runner_age_problem(&bad, day, nov1).is_some());
    }

    #[test]
    fn manifest_sits_next_to_the_image() {
        let dir = crate::test_support::tempdir();
        let img = dir.join("runner.qcow2");
        assert_eq!(manifest_path(&img), dir.join("runner.qcow2.manifest.json"));
        assert_eq!(read_manifest(&img), None);
        std::fs::write(manifest_path(&img), r#"{"runner_version":"2.1.0","runner_released":"2026-01-02"}"#).unwrap();
        assert_eq!(read_manifest(&img).unwrap().runner_version, "2.1.0");
    }

    #[test]
    fn images_of_an_older_bind_protocol_are_named() {
        let m = |p| Manifest {
            runner_version: "2.330.0".into(),
            runner_released: "2026-11-01".into(),
            built_at: None,
            bind_protocol: p,
        };
        assert_eq!(bind_protocol_problem(&m(Some(2))), None);
        let old = bind_protocol_problem(&m(None)).unwrap();
        assert!(old.contains("bind protocol 1") && old.contains("sends 2"), "{old}");
        assert!(bind_protocol_problem(&m(Some(1))).is_some());
    }
}

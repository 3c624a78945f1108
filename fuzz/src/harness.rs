#![allow(dead_code)] // each binary uses one target of the shared harness
//! The fuzz targets' bodies, shared by the AFL binaries (`src/bin/*`) and by the
//! regression test that replays every seed and every crash ever found
//! (`tests/fuzz_regressions.rs`). Each takes arbitrary bytes, must
//! never panic, and checks the invariants of what it gets back.

use std::time::SystemTime;

use hmac::{Hmac, KeyInit, Mac};
use runnervisor::config::{Config, Scope};
use runnervisor::github::responses;
use runnervisor::webhook::{self, Decision};
use sha2::Sha256;

pub const SECRET: &[u8] = b"fuzz-webhook-secret";

/// A whole HTTP request to the webhook: headers parsed as hyper would (httparse), then
/// the intake's decision. The first byte's low bit signs the body with the right secret
/// (so that inputs reach the payload parser, not only the HMAC check).
pub fn webhook(data: &[u8]) {
    let Some((&flags, raw)) = data.split_first() else { return };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(head_len)) = req.parse(raw) else { return };
    let body = &raw[head_len..];
    let mut map = http::HeaderMap::new();
    for h in req.headers.iter() {
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(h.name.as_bytes()), http::HeaderValue::from_bytes(h.value))
        {
            map.append(name, value);
        }
    }
    if flags & 1 == 1 {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(SECRET).expect("any key length");
        mac.update(body);
        let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        map.insert("x-hub-signature-256", http::HeaderValue::from_str(&format!("sha256={hex}")).expect("ascii"));
    }
    let scope = Scope::Organization("octo-org".into());
    match webhook::decide(SECRET, &scope, &map, body, SystemTime::UNIX_EPOCH) {
        Decision::Persist(ev) => {
            // Only signed, in-scope workflow_job events with a sane delivery id get persisted.
            assert!(
                webhook::verify_signature(SECRET, body, map.get("x-hub-signature-256").and_then(|v| v.to_str().ok()))
                    .is_ok()
            );
            assert!(scope.admits(&ev.job.repository, None));
            assert!(!ev.delivery.is_empty() && ev.delivery.len() <= 100);
        }
        Decision::Answer { status, .. } => assert!(status.as_u16() >= 200 && status.as_u16() < 500),
    }
}

/// The configuration file's text.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = Config::parse(text) {
        // What validate() promises.
        assert!(!c.pools.is_empty());
        for p in &c.pools {
            assert!(p.max_vms >= 1 && !p.labels.is_empty() && p.image.is_absolute());
        }
        if let Some((filter, _)) = c.libvirt.network.fence() {
            assert!(!filter.is_empty());
        }
    }
}

/// The admin socket: a request line as the agent reads it; a reply line as the CLI
/// reads it, and the status table it renders from one.
pub fn admin(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = runnervisor::admin::parse_request(text);
    if let Ok(runnervisor::admin::Reply::Status(s)) = runnervisor::admin::parse_reply(text) {
        let _ = runnervisor::admin::render_status(&s);
    }
}

/// GitHub's REST responses: the first byte picks the parser, the rest is the body.
pub fn github(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else { return };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return };
    match which % 7 {
        0 => drop(responses::jit_config(v)),
        1 => drop(responses::registration_token(v)),
        2 => drop(responses::runner_group_id(v, "Default")),
        3 => drop(responses::runners(v)),
        4 => drop(responses::job_status(v)),
        5 => {
            let _ = responses::run_ids(v.clone());
            let _ = responses::queued_jobs_of_run(v, "octo-org/app", 1);
        }
        _ => drop(responses::deliveries(v)),
    }
}

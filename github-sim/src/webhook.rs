//! Webhook deliveries as GitHub makes them: `workflow_job` payloads, the `X-GitHub-*`
//! headers, `X-Hub-Signature-256` over the raw body. Deliveries are sent one at a time,
//! recorded with their outcome, and never retried (GitHub does not redeliver by itself).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::Sim;
use crate::model::{Delivery, Job, JobStatus};

/// One delivery waiting to be sent.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub guid: String,
    pub event: String,
    pub action: Option<String>,
    pub payload: Value,
    pub redelivery: bool,
}

/// `sha256=<hex HMAC-SHA256 of body>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in mac.finalize().into_bytes() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

/// A stable repository id derived from its name (GitHub ids are opaque u64s).
pub fn repo_id(full_name: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in full_name.to_ascii_lowercase().bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    1_000_000_000 + h % 1_000_000_000
}

/// The `workflow_job` object of webhooks and of the jobs API.
pub fn job_json(job: &Job, base: &str) -> Value {
    let status = match job.status {
        JobStatus::Queued => "queued",
        JobStatus::InProgress => "in_progress",
        JobStatus::Completed => "completed",
    };
    let ts = |t: Option<SystemTime>| t.map(crate::time::rfc3339);
    let repo = &job.repo;
    json!({
        "id": job.id,
        "run_id": job.run_id,
        "run_attempt": job.run_attempt,
        "workflow_name": job.workflow_name,
        "head_branch": job.head_branch,
        "head_sha": format!("{:040x}", job.run_id),
        "node_id": format!("CR_kwDO{}", job.id),
        "name": job.name,
        "url": format!("{base}/api/v3/repos/{repo}/actions/jobs/{}", job.id),
        "html_url": format!("{base}/{repo}/actions/runs/{}/job/{}", job.run_id, job.id),
        "run_url": format!("{base}/api/v3/repos/{repo}/actions/runs/{}", job.run_id),
        "check_run_url": format!("{base}/api/v3/repos/{repo}/check-runs/{}", job.id),
        "status": status,
        "conclusion": job.conclusion,
        "created_at": crate::time::rfc3339(job.created_at),
        "started_at": ts(job.started_at).unwrap_or_else(|| crate::time::rfc3339(job.created_at)),
        "completed_at": ts(job.completed_at),
        "labels": job.labels,
        "steps": [],
        "runner_id": job.runner.as_ref().map(|r| r.id),
        "runner_name": job.runner.as_ref().map(|r| r.name.clone()),
        "runner_group_id": job.runner.as_ref().map(|r| r.group_id),
        "runner_group_name": job.runner.as_ref().map(|r| r.group_name.clone()),
    })
}

fn envelope(sim: &Sim, repo: &str, base: &str) -> Value {
    let (owner, name) = repo.split_once('/').unwrap_or((repo, repo));
    let owner_id = repo_id(owner);
    let mut envelope = json!({
        "repository": {
            "id": repo_id(repo),
            "node_id": format!("R_kgDO{}", repo_id(repo)),
            "name": name,
            "full_name": repo,
            "private": true,
            "owner": {"login": owner, "id": owner_id, "type": "Organization"},
            "html_url": format!("{base}/{repo}"),
            "url": format!("{base}/api/v3/repos/{repo}"),
        },
        "organization": {"login": owner, "id": owner_id, "url": format!("{base}/api/v3/orgs/{owner}")},
        "sender": {"login": "octocat", "id": 583231, "type": "User"},
        "installation": {"id": sim.config.installation_id, "node_id": format!("MDIzOkludGVncmF0aW9uSW5zdGFsbGF0aW9u{}", sim.config.installation_id)},
    });
    if let Some(slug) = &sim.config.enterprise {
        // As GitHub does for an organization that belongs to an enterprise.
        envelope["enterprise"] = json!({
            "id": repo_id(slug),
            "slug": slug,
            "name": slug,
            "node_id": format!("E_kgDO{}", repo_id(slug)),
            "html_url": format!("{base}/enterprises/{slug}"),
        });
    }
    envelope
}

/// Queues a `workflow_job` delivery for `job` with `action`.
pub fn job_event(sim: &Sim, job: &Job, action: &str, base: &str) {
    let mut payload = envelope(sim, &job.repo, base);
    payload["action"] = json!(action);
    payload["workflow_job"] = job_json(job, base);
    sim.send_webhook(Outgoing {
        guid: crate::model::guid(),
        event: "workflow_job".into(),
        action: Some(action.into()),
        payload,
        redelivery: false,
    });
}

pub fn ping(sim: &Sim) {
    let payload = json!({
        "zen": "Keep it logically awesome.",
        "hook_id": sim.config.hook_id,
        "hook": {"type": "Organization", "id": sim.config.hook_id, "active": true, "events": ["workflow_job"]},
    });
    sim.send_webhook(Outgoing {
        guid: crate::model::guid(),
        event: "ping".into(),
        action: None,
        payload,
        redelivery: false,
    });
}

/// The sender task: applies webhook faults, sends, records.
pub async fn run(sim: Arc<Sim>, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let client = reqwest::Client::builder().timeout(sim.config.webhook_timeout).build().expect("http client");
    let mut held: Vec<Outgoing> = Vec::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(sim.config.webhook_concurrency.max(1)));
    loop {
        let next = if held.is_empty() {
            rx.recv().await
        } else {
            match tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
                Ok(m) => m,
                Err(_) => {
                    release(&sim, &client, &mut held).await;
                    continue;
                }
            }
        };
        let Some(out) = next else { return };
        let verdict = sim.faults().on_webhook(out.action.as_deref(), out.redelivery);
        if out.redelivery && !verdict.drop {
            deliver(&sim, &client, out).await;
            continue;
        }
        if verdict.drop {
            record(
                &sim,
                &out,
                "failed to connect to host (dropped by github-sim fault)",
                0,
                0.0,
                String::new(),
                BTreeMap::new(),
            );
            continue;
        }
        let mut batch = vec![out.clone()];
        if let Some(new_guid) = verdict.duplicate {
            let mut dup = out;
            if new_guid {
                dup.guid = crate::model::guid();
            }
            batch.push(dup);
        }
        if let Some(n) = verdict.reorder_batch {
            held.extend(batch);
            if held.len() >= n as usize {
                release(&sim, &client, &mut held).await;
            }
            continue;
        }
        for o in batch {
            if sim.config.webhook_concurrency <= 1 {
                deliver(&sim, &client, o).await;
                continue;
            }
            // Up to `webhook_concurrency` in flight (their answers may come in any order).
            let permit = in_flight.clone().acquire_owned().await.expect("never closed");
            let (sim, client) = (sim.clone(), client.clone());
            tokio::spawn(async move {
                deliver(&sim, &client, o).await;
                drop(permit);
            });
        }
    }
}

async fn release(sim: &Sim, client: &reqwest::Client, held: &mut Vec<Outgoing>) {
    sim.faults().reorder_released();
    while let Some(o) = held.pop() {
        deliver(sim, client, o).await;
    }
}

async fn deliver(sim: &Sim, client: &reqwest::Client, out: Outgoing) {
    let body = serde_json::to_vec(&out.payload).expect("json");
    let mut headers = BTreeMap::new();
    headers.insert("Accept".to_string(), "*/*".to_string());
    headers.insert("Content-Type".into(), "application/json".into());
    headers.insert("User-Agent".into(), "GitHub-Hookshot/github-sim".into());
    headers.insert("X-GitHub-Event".into(), out.event.clone());
    headers.insert("X-GitHub-Delivery".into(), out.guid.clone());
    headers.insert("X-GitHub-Hook-ID".into(), sim.config.hook_id.to_string());
    headers.insert("X-GitHub-Hook-Installation-Target-Type".into(), "organization".into());
    headers.insert("X-GitHub-Hook-Installation-Target-ID".into(), sim.config.installation_id.to_string());
    headers.insert("X-Hub-Signature-256".into(), signature(sim.config.webhook_secret.as_bytes(), &body));
    let Some(url) = sim.config.webhook_url.clone() else {
        record(sim, &out, "failed to connect to host", 0, 0.0, String::new(), headers);
        return;
    };
    let started = Instant::now();
    // A relay in front of a fleet: the delivery goes to every URL (to each at once, as a
    // relay would; each URL still gets deliveries in order); it succeeded if one of them
    // took it (the first 2xx is what GitHub records, else the first URL's answer).
    let all: Vec<String> = std::iter::once(url).chain(sim.config.fanout.iter().cloned()).collect();
    let first = match sim.config.fanout_each {
        Some(_) => sim.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        None => 0,
    };
    let each = sim.config.fanout_each.unwrap_or(all.len()).clamp(1, all.len());
    let sends: Vec<_> = (0..each)
        .map(|i| {
            let mut req = client.post(all[(first + i) % all.len()].clone()).body(body.clone());
            for (k, v) in &headers {
                req = req.header(k, v);
            }
            tokio::spawn(req.send())
        })
        .collect();
    let mut result = None;
    for send in sends {
        let r = send.await.expect("a send task does not panic");
        let ok = r.as_ref().is_ok_and(|resp| resp.status().is_success());
        let had_ok = result.as_ref().is_some_and(|r: &reqwest::Result<reqwest::Response>| {
            r.as_ref().is_ok_and(|resp| resp.status().is_success())
        });
        if result.is_none() || (ok && !had_ok) {
            result = Some(r);
        }
    }
    let result = result.expect("one URL at least");
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(resp) => {
            let code = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            let status =
                if (200..300).contains(&code) { "OK".to_string() } else { format!("Invalid HTTP Response: {code}") };
            record(sim, &out, &status, code, secs, text, headers);
        }
        Err(e) if e.is_timeout() => record(sim, &out, "timed out", 0, secs, String::new(), headers),
        Err(_) => record(sim, &out, "failed to connect to host", 0, secs, String::new(), headers),
    }
}

fn record(
    sim: &Sim,
    out: &Outgoing,
    status: &str,
    code: u16,
    duration: f64,
    response: String,
    headers: BTreeMap<String, String>,
) {
    let repository_id = out.payload["repository"]["id"].as_u64();
    let mut world = sim.world();
    let id = world.next_delivery_id();
    world.deliveries.push(Delivery {
        id,
        guid: out.guid.clone(),
        event: out.event.clone(),
        action: out.action.clone(),
        redelivery: out.redelivery,
        delivered_at: SystemTime::now(),
        duration,
        status: status.into(),
        status_code: code,
        repository_id,
        installation_id: Some(sim.config.installation_id),
        request_headers: headers,
        payload: out.payload.clone(),
        response_body: response,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitHub's published example: secret "It's a Secret to Everybody", payload "Hello, World!".
    #[test]
    fn signature_matches_githubs_test_vector() {
        assert_eq!(
            signature(b"It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn repo_ids_are_stable_and_case_insensitive() {
        assert_eq!(repo_id("octo-org/app"), repo_id("Octo-Org/App"));
        assert_ne!(repo_id("octo-org/app"), repo_id("octo-org/web"));
    }
}

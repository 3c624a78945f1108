//! A signed-webhook load generator: keep-alive HTTP/1.1 connections on loopback, each
//! sending `workflow_job` deliveries of GitHub's shape (~1.6 KB, signed with the test
//! secret, a fresh delivery GUID and job id each) and waiting for the answer before the
//! next. Requests are written and answers read directly on the socket (`httparse` for the
//! answer's head), so the generator itself costs a few microseconds per delivery.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::SECRET;

/// One delivery: its GUID, and the answer's status (0: no answer, the connection failed).
#[derive(Debug, Clone)]
pub struct Sent {
    pub guid: String,
    pub status: u16,
    pub micros: u32,
}

/// A `workflow_job` `queued` payload as GitHub sends it (organization webhook), ~1.6 KB.
pub fn payload(job_id: u64, labels: &[&str]) -> Vec<u8> {
    let repo = "octo-org/app";
    let base = "https://github.com";
    let api = "https://api.github.com";
    serde_json::to_vec(&json!({
        "action": "queued",
        "workflow_job": {
            "id": job_id,
            "run_id": job_id,
            "run_attempt": 1,
            "workflow_name": "CI",
            "head_branch": "feature/load",
            "head_sha": format!("{job_id:040}"),
            "node_id": format!("CR_kwDOABCDEF{job_id}"),
            "name": "build (linux)",
            "url": format!("{api}/repos/{repo}/actions/jobs/{job_id}"),
            "html_url": format!("{base}/{repo}/actions/runs/{job_id}/job/{job_id}"),
            "run_url": format!("{api}/repos/{repo}/actions/runs/{job_id}"),
            "check_run_url": format!("{api}/repos/{repo}/check-runs/{job_id}"),
            "status": "queued",
            "conclusion": null,
            "created_at": "2026-12-01T12:00:00Z",
            "started_at": "2026-12-01T12:00:00Z",
            "completed_at": null,
            "labels": labels,
            "steps": [],
            "runner_id": null,
            "runner_name": null,
            "runner_group_id": null,
            "runner_group_name": null,
        },
        "repository": {
            "id": 123456789, "node_id": "R_kgDOHb1Tzw", "name": "app", "full_name": repo, "private": true,
            "owner": {"login": "octo-org", "id": 987654, "node_id": "O_kgDOAA8xWg", "type": "Organization",
                      "html_url": format!("{base}/octo-org"), "site_admin": false},
            "html_url": format!("{base}/{repo}"), "description": "The application", "fork": false,
            "url": format!("{api}/repos/{repo}"), "default_branch": "main", "visibility": "private",
        },
        "organization": {"login": "octo-org", "id": 987654, "node_id": "O_kgDOAA8xWg",
                         "url": format!("{api}/orgs/octo-org"), "description": null},
        "sender": {"login": "octocat", "id": 583231, "node_id": "MDQ6VXNlcjU4MzIzMQ==", "type": "User",
                   "html_url": format!("{base}/octocat"), "site_admin": false},
        "installation": {"id": 4242, "node_id": "MDIzOkludGVncmF0aW9uSW5zdGFsbGF0aW9uNDI0Mg=="},
    }))
    .unwrap()
}

/// Payloads of one shape for a run of job ids, made cheaply: rendered once, with a
/// 13-digit job id whose digits are then overwritten for each job (the generator shares
/// the agent's cores, so what it spends per delivery is taken from the agent).
struct Template {
    body: Vec<u8>,
    /// Where the job id's digits are.
    at: Vec<usize>,
}

const ID_DIGITS: usize = 13;

impl Template {
    /// Job ids `first..` (all of 13 digits).
    fn new(first: u64, labels: &[&str]) -> Template {
        assert!((1_000_000_000_000..9_000_000_000_000).contains(&first), "13-digit job ids");
        let body = payload(first, labels);
        let digits = first.to_string();
        let at = body.windows(ID_DIGITS).enumerate().filter(|(_, w)| *w == digits.as_bytes()).map(|(i, _)| i).collect();
        let mut t = Template { body, at };
        // The shortcut makes exactly what `payload` makes.
        let probe = first + 987_654_321;
        assert_eq!(t.body(probe), payload(probe, labels).as_slice(), "the template renders job ids as payload does");
        t
    }

    fn body(&mut self, job_id: u64) -> &[u8] {
        let mut digits = [0u8; ID_DIGITS];
        let mut n = job_id;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        for &i in &self.at {
            self.body[i..i + ID_DIGITS].copy_from_slice(&digits);
        }
        &self.body
    }
}

/// The whole request for one delivery, signed.
pub fn request(guid: &str, body: &[u8]) -> Vec<u8> {
    let sig = github_sim::webhook::signature(SECRET.as_bytes(), body);
    let mut r = format!(
        "POST /webhook HTTP/1.1\r\nhost: 127.0.0.1\r\nuser-agent: GitHub-Hookshot/load\r\n\
         content-type: application/json\r\nx-github-event: workflow_job\r\nx-github-delivery: {guid}\r\n\
         x-hub-signature-256: {sig}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Sends `request` and reads the answer; its status.
async fn exchange(conn: &mut TcpStream, buf: &mut Vec<u8>, request: &[u8]) -> std::io::Result<u16> {
    conn.write_all(request).await?;
    buf.clear();
    loop {
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = resp.parse(buf) {
            let len = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                .unwrap_or(0);
            let status = resp.code.unwrap_or(0);
            if buf.len() >= head + len {
                return Ok(status);
            }
        }
    }
}

/// How a load run is shaped.
pub struct Load {
    pub addr: SocketAddr,
    pub conns: usize,
    /// Sending stops at this deadline, or after `max` deliveries in all.
    pub duration: Duration,
    pub max: u64,
    pub labels: Vec<String>,
    /// Tells the GUIDs and job ids of this run from other runs'.
    pub tag: String,
}

/// What a load run saw.
pub struct Outcome {
    pub sent: Vec<Sent>,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn answered(&self, status: u16) -> usize {
        self.sent.iter().filter(|s| s.status == status).count()
    }
    /// Deliveries answered per second.
    pub fn rate(&self) -> f64 {
        self.sent.iter().filter(|s| s.status != 0).count() as f64 / self.elapsed.as_secs_f64()
    }
    /// The `p`-th percentile of the answered deliveries' latency, in milliseconds.
    pub fn latency_ms(&self, p: usize) -> f64 {
        let mut v: Vec<u32> = self.sent.iter().filter(|s| s.status != 0).map(|s| s.micros).collect();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_unstable();
        v[((v.len() - 1) * p + 50) / 100] as f64 / 1000.0
    }
}

/// Runs `load.conns` connections until the deadline, the count, or `stop`; a connection
/// that fails is reopened (its delivery counted unanswered).
pub async fn run(load: &Load, stop: Arc<AtomicBool>) -> Outcome {
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + load.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..load.conns {
        let (next, stop) = (next.clone(), stop.clone());
        let (addr, max, tag) = (load.addr, load.max, load.tag.clone());
        let labels = load.labels.clone();
        tasks.push(tokio::spawn(async move {
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            let mut sent = Vec::new();
            let mut conn = None;
            let mut buf = Vec::with_capacity(4096);
            // Each tag's job ids (so bodies) its own: the agent takes one body under one
            // delivery id only (a body again under another is a replay).
            let tag_hash = tag.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)) % 100_000;
            let first = 1_000_000_000_000 + tag_hash * 10_000_000;
            let mut template = Template::new(first, &labels);
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= max {
                    break;
                }
                let guid = format!("{tag}-{c}-{i}");
                let req = request(&guid, template.body(first + i));
                let t = Instant::now();
                if conn.is_none() {
                    match TcpStream::connect(addr).await {
                        Ok(s) => {
                            s.set_nodelay(true).ok();
                            conn = Some(s)
                        }
                        Err(_) => {
                            sent.push(Sent { guid, status: 0, micros: 0 });
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    }
                }
                let status = match exchange(conn.as_mut().unwrap(), &mut buf, &req).await {
                    Ok(s) => s,
                    Err(_) => {
                        conn = None;
                        0
                    }
                };
                sent.push(Sent { guid, status, micros: t.elapsed().as_micros().min(u32::MAX as u128) as u32 });
            }
            sent
        }));
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.extend(t.await.unwrap());
    }
    Outcome { sent, elapsed: started.elapsed() }
}

/// Sends each delivery of `guids` again (same GUID) over `conns` connections; per GUID,
/// whether the agent already knew it (answered 200 "duplicate delivery": its id was
/// committed with its event).
pub async fn known(addr: SocketAddr, guids: &[String], labels: &[&str], conns: usize) -> Vec<bool> {
    let chunk = guids.len().div_ceil(conns.max(1)).max(1);
    let mut tasks = Vec::new();
    for (c, part) in guids.chunks(chunk).enumerate() {
        let part = part.to_vec();
        let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        tasks.push(tokio::spawn(async move {
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            let mut conn = TcpStream::connect(addr).await.unwrap();
            let mut buf = Vec::new();
            let mut known = Vec::with_capacity(part.len());
            for (i, guid) in part.iter().enumerate() {
                let req = request(guid, &payload(999_000_000_000 + (c * chunk + i) as u64, &labels));
                known.push(exchange(&mut conn, &mut buf, &req).await.unwrap() == 200);
            }
            known
        }));
    }
    let mut out = Vec::with_capacity(guids.len());
    for t in tasks {
        out.extend(t.await.unwrap());
    }
    out
}

//! The webhook listener under abuse, with real clients over TCP and the real store: more
//! slow-loris connections than the connection cap, bodies that stall, and a flood of large
//! unsigned bodies must not starve signed deliveries; each kind gets its answer in time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use runnervisor::metrics::Metrics;
use runnervisor::secret::Secret;
use runnervisor::store::Store;
use runnervisor::{server, webhook};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "listener-test-secret";
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
const BODY_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_CONNECTIONS: usize = 32;
const MAX_BODY: usize = 64 * 1024;

fn sign(body: &[u8]) -> String {
    github_sim::webhook::signature(SECRET.as_bytes(), body)
}

fn payload(id: u64) -> Vec<u8> {
    payload_for(id, "octo-org/app")
}

fn payload_for(id: u64, repository: &str) -> Vec<u8> {
    serde_json::json!({
        "action": "queued",
        "workflow_job": {"id": id, "run_id": 1, "run_attempt": 1, "name": "build", "workflow_name": "CI",
            "labels": ["self-hosted", "nowhere"], "html_url": "https://x", "runner_name": null,
            "runner_id": null, "conclusion": null, "status": "queued"},
        "repository": {"full_name": repository},
    })
    .to_string()
    .into_bytes()
}

async fn start() -> (std::net::SocketAddr, CancellationToken, Arc<Metrics>, Arc<Store>) {
    // The store's file stays open (and usable) after its directory is removed.
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::default());
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let intake = Arc::new(webhook::Intake {
        secret: Secret::new(SECRET),
        accepter: runnervisor::store::Writer::start(store.clone()).into(),
        inbox_ready: Arc::new(tokio::sync::Notify::new()),
        metrics: metrics.clone(),
        scope: runnervisor::config::Scope::Organization("octo-org".into()),
        max_body_bytes: MAX_BODY,
        body_timeout: BODY_TIMEOUT,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let limits = server::Limits {
        max_connections: MAX_CONNECTIONS,
        header_timeout: HEADER_TIMEOUT,
        shutdown_grace: Duration::from_secs(1),
    };
    tokio::spawn(server::serve(listener, webhook::router(intake), limits, stop.clone()));
    (addr, stop, metrics, store)
}

/// Opens a connection, writes `head`, and returns it (the caller decides what follows).
async fn open(addr: std::net::SocketAddr, head: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// Reads until the server answers or closes: the status code (0 if closed without one).
async fn status_of(mut s: TcpStream) -> u16 {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// A client that opens a connection per request (no pooled connection to wait for) and
/// gives up after 30 s, so a request the server never answers fails the test instead of
/// hanging it.
fn client() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(0).timeout(Duration::from_secs(30)).build().unwrap()
}

async fn deliver(client: &reqwest::Client, addr: std::net::SocketAddr, id: u64) -> (u16, Duration) {
    deliver_body(client, addr, id, payload(id)).await
}

async fn deliver_body(client: &reqwest::Client, addr: std::net::SocketAddr, id: u64, body: Vec<u8>) -> (u16, Duration) {
    let t = Instant::now();
    let r = client
        .post(format!("http://{addr}/webhook"))
        .header("X-GitHub-Event", "workflow_job")
        .header("X-GitHub-Delivery", format!("guid-{id}"))
        .header("X-Hub-Signature-256", sign(&body))
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_and_unsigned_floods_do_not_starve_signed_deliveries() {
    let (addr, stop, metrics, _) = start().await;

    // Twice the connection cap in slow-loris connections: headers begun, never finished.
    let mut loris = Vec::new();
    for _ in 0..2 * MAX_CONNECTIONS {
        loris.push(open(addr, "POST /webhook HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: workflow").await);
    }
    // Signed headers, a body announced and never sent in full.
    let body = payload(7);
    let stall_head = format!(
        "POST /webhook HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: workflow_job\r\nX-GitHub-Delivery: stall\r\n\
         X-Hub-Signature-256: {}\r\nContent-Length: {}\r\n\r\n{}",
        sign(&body),
        body.len(),
        String::from_utf8_lossy(&body[..10])
    );
    let mut stalls = Vec::new();
    for _ in 0..4 {
        stalls.push(open(addr, &stall_head).await);
    }
    // A flood of large unsigned bodies, for the whole test.
    let flood_stop = CancellationToken::new();
    let flood = {
        let stop = flood_stop.clone();
        tokio::spawn(async move {
            let client = client();
            let big = vec![b'x'; MAX_BODY - 100];
            // Answered 401 before the body is read; the client may then see the connection
            // closed under its upload instead of the answer. Nothing else is acceptable.
            let (mut sent, mut refused, mut other) = (0u32, 0u32, Vec::new());
            while !stop.is_cancelled() {
                let r = client
                    .post(format!("http://{addr}/webhook"))
                    .header("X-GitHub-Event", "workflow_job")
                    .body(big.clone())
                    .send()
                    .await;
                sent += 1;
                match r {
                    Ok(r) if r.status() == 401 => refused += 1,
                    // Not answered in 30 s: a failure, whatever the kind of error.
                    Err(e) if e.is_timeout() => other.push(1),
                    Err(e) if e.is_request() || e.is_body() || e.is_connect() => refused += 1,
                    Ok(r) => other.push(r.status().as_u16()),
                    Err(e) => other.push(if e.is_timeout() { 1 } else { 2 }),
                }
            }
            (sent, refused, other)
        })
    };

    // Signed deliveries still get through: at worst they wait for header deadlines to
    // free slots held by slow-loris connections.
    let client = client();
    let mut worst = Duration::ZERO;
    for id in 1..=20 {
        let (status, took) = deliver(&client, addr, id).await;
        assert_eq!(status, 202, "delivery {id}");
        worst = worst.max(took);
    }
    eprintln!("20 signed deliveries accepted under abuse; slowest {worst:?}");
    // Twice the cap in slow-loris connections sit ahead of it in the listen backlog: two
    // rounds of header deadlines at most (without them, it would never be served).
    assert!(worst < 2 * HEADER_TIMEOUT + Duration::from_secs(3), "slowest signed delivery took {worst:?}");

    // Each abuser got its answer: slow-loris closed by the header deadline (408 or closed),
    // stalled bodies 408 by the body deadline.
    let t = Instant::now();
    for s in loris {
        let code = tokio::time::timeout(HEADER_TIMEOUT * 3, status_of(s)).await.expect("slow-loris left open");
        assert!(code == 408 || code == 0, "slow-loris answered {code}");
    }
    for s in stalls {
        let code = tokio::time::timeout(BODY_TIMEOUT * 3, status_of(s)).await.expect("stalled body left open");
        assert_eq!(code, 408, "stalled body");
    }
    eprintln!("abusive connections all closed {:?} after the deliveries", t.elapsed());
    flood_stop.cancel();
    let (sent, refused, other) = flood.await.unwrap();
    eprintln!("unsigned flood: {sent} requests of {} KiB, {refused} refused (401 or closed unread)", MAX_BODY / 1024);
    assert!(sent > 0 && other.is_empty(), "unsigned requests answered otherwise: {other:?}");

    // A signed body over the cap is refused from its Content-Length, without reading it.
    let huge = format!(
        "POST /webhook HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: workflow_job\r\nX-GitHub-Delivery: big\r\n\
         X-Hub-Signature-256: {}\r\nContent-Length: {}\r\n\r\n",
        sign(b"x"),
        MAX_BODY + 1
    );
    let code = tokio::time::timeout(Duration::from_secs(5), status_of(open(addr, &huge).await)).await.unwrap();
    assert_eq!(code, 413);
    assert!(metrics.render().contains("runnervisor_webhook_signature_failures_total"));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_outside_the_scope_are_answered_and_ignored() {
    let (addr, stop, metrics, store) = start().await;
    let client = client();
    // Scope is organization octo-org: another organization's repository, and a repository
    // whose name merely contains it, are not ours.
    for (id, repo) in [(11, "evil-org/app"), (12, "evil/octo-org"), (13, "octo-org2/app")] {
        let (status, _) = deliver_body(&client, addr, id, payload_for(id, repo)).await;
        assert_eq!(status, 202, "{repo}");
    }
    let (status, _) = deliver_body(&client, addr, 14, payload_for(14, "Octo-Org/app")).await;
    assert_eq!(status, 202);
    let inbox: Vec<u64> = store.inbox(0, usize::MAX).unwrap().into_iter().map(|(_, e)| e.job.id).collect();
    assert_eq!(inbox, [14], "only the in-scope delivery is persisted");
    let text = metrics.render();
    assert!(text.contains("runnervisor_webhooks_total{event=\"workflow_job\",outcome=\"out_of_scope\"} 3"), "{text}");
    stop.cancel();
}

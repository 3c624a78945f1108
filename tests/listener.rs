//! The webhook listener under abuse, with real clients over TCP and the real store: more
//! slow-loris connections than the connection cap, bodies that stall, and a flood of large
//! unsigned bodies must not starve signed deliveries; each kind gets its answer in time.
//! From one address (a reverse proxy's view), the connection cap and the deadlines bound
//! the wait; from an attacker's own address (127.0.0.2, GitHub on 127.0.0.1), the
//! per-source cap keeps GitHub's deliveries answered at once, and the log stays small.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use runnervisor::metrics::Metrics;
use runnervisor::secret::Secret;
use runnervisor::sources::{Admission, SourceRule};
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

async fn start() -> (SocketAddr, CancellationToken, Arc<Metrics>, Arc<Store>) {
    // One source may take the whole cap here: the abuse comes from where GitHub's
    // deliveries come from, as behind a reverse proxy.
    let (addr, stop, metrics, store, _) = start_with(MAX_CONNECTIONS, None).await;
    (addr, stop, metrics, store)
}

async fn start_with(
    per_source: usize,
    allow: Option<Vec<SourceRule>>,
) -> (SocketAddr, CancellationToken, Arc<Metrics>, Arc<Store>, Arc<Admission>) {
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
        clock: Arc::new(runnervisor::clock::SystemClock),
        scale_sets: Vec::new(),
        replays: webhook::Replays::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let limits = server::Limits {
        max_connections: MAX_CONNECTIONS,
        header_timeout: HEADER_TIMEOUT,
        write_timeout: BODY_TIMEOUT,
        shutdown_grace: Duration::from_secs(1),
    };
    let admission = Admission::new(allow, per_source, Some(metrics.clone()));
    tokio::spawn(server::serve(listener, webhook::router(intake), limits, admission.clone(), stop.clone()));
    (addr, stop, metrics, store, admission)
}

/// A request's headers begun and never ended (slow-loris).
const SLOW_LORIS_HEAD: &str = "POST /webhook HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: workflow";

/// Signed headers of a body announced and never sent in full (10 bytes of it sent).
fn stalled_body_head() -> String {
    let body = payload(7);
    format!(
        "POST /webhook HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: workflow_job\r\nX-GitHub-Delivery: stall\r\n\
         X-Hub-Signature-256: {}\r\nContent-Length: {}\r\n\r\n{}",
        sign(&body),
        body.len(),
        String::from_utf8_lossy(&body[..10])
    )
}

/// Opens a connection, writes `head`, and returns it (the caller decides what follows).
async fn open(addr: SocketAddr, head: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// A connection from `from` (any 127.0.0.0/8 address is this host's), `head` written; `None`
/// when the server closed it first.
async fn open_from(from: Ipv4Addr, addr: SocketAddr, head: &str) -> Option<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
    let mut s = socket.connect(addr).await.ok()?;
    s.write_all(head.as_bytes()).await.ok()?;
    Some(s)
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
    client_from(Ipv4Addr::LOCALHOST)
}

fn client_from(from: Ipv4Addr) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .local_address(IpAddr::V4(from))
        .build()
        .unwrap()
}

async fn deliver(client: &reqwest::Client, addr: SocketAddr, id: u64) -> (u16, Duration) {
    deliver_body(client, addr, id, payload(id)).await
}

async fn deliver_body(client: &reqwest::Client, addr: SocketAddr, id: u64, body: Vec<u8>) -> (u16, Duration) {
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
        loris.push(open(addr, SLOW_LORIS_HEAD).await);
    }
    // Signed headers, a body announced and never sent in full.
    let stall_head = stalled_body_head();
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

/// Whoever holds one signed body (the signature covers the body alone) sends it again
/// under fresh delivery ids, and under made-up event names: one delivery is written, the
/// replays are answered as duplicates and written nowhere, and the event names share one
/// label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_body_replayed_under_fresh_delivery_ids_is_written_once() {
    let (addr, stop, metrics, store) = start().await;
    let client = client();
    let body = payload(21);
    let (status, _) = deliver_body(&client, addr, 1, body.clone()).await;
    assert_eq!(status, 202);
    for id in 2..=200 {
        let (status, _) = deliver_body(&client, addr, id, body.clone()).await;
        assert_eq!(status, 200, "replay {id}");
    }
    // The original's own id again (GitHub's redelivery): a duplicate, as before.
    assert_eq!(deliver_body(&client, addr, 1, body.clone()).await.0, 200);
    // Another job's body is a delivery of its own.
    assert_eq!(deliver_body(&client, addr, 201, payload(22)).await.0, 202);
    let inbox: Vec<u64> = store.inbox(0, usize::MAX).unwrap().into_iter().map(|(_, e)| e.job.id).collect();
    assert_eq!(inbox, [21, 22], "one entry a job");
    assert!(!store.delivery_seen("guid-2").unwrap(), "a replay's id is not kept");
    for event in (0..50).map(|i| format!("made-up-{i}")) {
        let r = client
            .post(format!("http://{addr}/webhook"))
            .header("X-GitHub-Event", event)
            .header("X-GitHub-Delivery", "x")
            .header("X-Hub-Signature-256", sign(&body))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let text = metrics.render();
    assert!(text.contains("runnervisor_webhooks_total{event=\"workflow_job\",outcome=\"replayed\"} 199"), "{text}");
    assert!(text.contains("runnervisor_webhooks_total{event=\"other\",outcome=\"ignored\"} 50"), "{text}");
    assert!(!text.contains("made-up"), "{text}");
    stop.cancel();
}

const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const PER_SOURCE: usize = 8;

/// Counts the lines the agent logs at WARN and above (the listener's part of the journal).
struct CountWarnings(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountWarnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() <= tracing::Level::WARN {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Keeps `n` connections of one kind open from the attacker's address until `stop`: each
/// writes `head` and holds until the server closes it, then the next one is opened.
fn attack(n: usize, addr: SocketAddr, head: String, stop: CancellationToken) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..n)
        .map(|_| {
            let (head, stop) = (head.clone(), stop.clone());
            tokio::spawn(async move {
                let mut opened = 0u64;
                while !stop.is_cancelled() {
                    opened += 1;
                    if let Some(s) = open_from(ATTACKER, addr, &head).await {
                        tokio::select! {
                            _ = status_of(s) => {}
                            _ = stop.cancelled() => {}
                        }
                    }
                    // A reconnecting attacker, not a tight loop (the machine has two cores).
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                opened
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_source_cannot_push_githubs_deliveries_out() {
    let warnings = Arc::new(AtomicUsize::new(0));
    {
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(CountWarnings(warnings.clone()));
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber of this test binary");
    }
    let (addr, stop, metrics, _, _) = start_with(PER_SOURCE, None).await;
    let attack_stop = CancellationToken::new();
    let mut attackers = Vec::new();
    // Four times the connection cap in slow-loris connections (headers begun, never ended)...
    attackers.extend(attack(4 * MAX_CONNECTIONS, addr, SLOW_LORIS_HEAD.into(), attack_stop.clone()));
    // ... as many signed requests whose bodies stall ...
    attackers.extend(attack(4 * MAX_CONNECTIONS, addr, stalled_body_head(), attack_stop.clone()));
    // ... and a flood of unsigned 60 KiB bodies with forged delivery ids (log injection).
    let floods: Vec<_> = (0..8)
        .map(|_| {
            let stop = attack_stop.clone();
            tokio::spawn(async move {
                let client = client_from(ATTACKER);
                let big = vec![b'x'; 60 * 1024];
                let mut sent = 0u64;
                while !stop.is_cancelled() {
                    sent += 1;
                    let _ = client
                        .post(format!("http://{addr}/webhook"))
                        .header("X-GitHub-Event", "workflow_job")
                        .header("X-GitHub-Delivery", "forged\" level=ERROR message=\"pwned")
                        .body(big.clone())
                        .send()
                        .await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                sent
            })
        })
        .collect();
    // The attack is under way once the attacker's surplus is being refused.
    let refused = |m: &Metrics| -> u64 {
        let text = m.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("runnervisor_webhook_connections_refused_total{reason=\"per_source\"}"));
        line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let t = Instant::now();
    while refused(&metrics) < 100 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let warnings_before = warnings.load(Ordering::Relaxed);
    let attack_began = Instant::now();

    // GitHub's deliveries meanwhile, from 127.0.0.1, four at a time for 10 s: longer than
    // the header and body deadlines, so that the attacker's connections turn over.
    const DELIVERIES: u64 = 400;
    let github = client_from(Ipv4Addr::LOCALHOST);
    let mut results = Vec::new();
    for batch in (1..=DELIVERIES).collect::<Vec<_>>().chunks(4) {
        let calls = batch.iter().map(|id| deliver(&github, addr, 1000 + id));
        results.extend(futures_util::future::join_all(calls).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let within =
        results.iter().filter(|(status, took)| (200..300).contains(status) && *took < Duration::from_secs(1)).count();
    let mut took: Vec<Duration> = results.iter().map(|(_, t)| *t).collect();
    took.sort();
    let attack_secs = attack_began.elapsed().as_secs_f64();
    let warnings_during = warnings.load(Ordering::Relaxed) - warnings_before;
    attack_stop.cancel();
    let mut opened = 0;
    for a in attackers {
        opened += a.await.unwrap();
    }
    let mut flooded = 0;
    for f in floods {
        flooded += f.await.unwrap();
    }
    eprintln!(
        "under attack from {ATTACKER} ({opened} connections opened, {flooded} unsigned requests, {} refused at accept): \
         {within} of {DELIVERIES} signed deliveries answered 2xx within 1 s (p50 {:?}, max {:?}); \
         {warnings_during} warning lines in {attack_secs:.1} s",
        refused(&metrics),
        took[took.len() / 2],
        took[took.len() - 1],
    );
    assert!(within * 100 >= 99 * DELIVERIES as usize, "only {within} of {DELIVERIES} answered 2xx within 1 s");
    assert!(refused(&metrics) >= 100, "the attacker's surplus connections were not refused at accept");
    // A line per kind of refusal every 10 s at most (unsigned, stalled body, per-source cap,
    // accept errors, the global cap): the log does not follow the attacker's rate. (The
    // other tests of this binary log a few lines of their own meanwhile: 10 of headroom.)
    let bound = 5 * (attack_secs / 10.0).ceil() as usize + 10;
    assert!(warnings_during <= bound, "{warnings_during} warning lines in {attack_secs:.1} s (bound {bound})");
    stop.cancel();
}

/// A client that pipelines requests and never reads the answers (its receive window shut;
/// its kernel still answers TCP's probes, so the connection never dies by itself): once
/// the server's writes stall, it has `write_timeout` to take them, then its connection
/// (and its source's slot) is closed. hyper's header deadline is off while a response
/// waits to be written: without that deadline the slot is held for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_answers_loses_its_connection() {
    const READER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
    let (addr, stop, _, _, admission) = start_with(1, None).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(1024).unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(READER), 0)).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (_unread, mut write) = stream.into_split();
    // Far more requests than the server's socket and hyper buffer (~6 MiB here), and answers
    // than the two sockets buffer.
    let requests = "GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n".repeat(800_000);
    let all_written = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let all_written = all_written.clone();
        tokio::spawn(async move {
            if write.write_all(requests.as_bytes()).await.is_ok() {
                all_written.store(true, Ordering::Relaxed);
            }
            write
        })
    };
    let t = Instant::now();
    while admission.held(IpAddr::V4(READER)) == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "the connection was never admitted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while admission.held(IpAddr::V4(READER)) == 1 && t.elapsed() < 3 * (HEADER_TIMEOUT + BODY_TIMEOUT) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(admission.held(IpAddr::V4(READER)), 0, "the connection is still held {:?} after it began", t.elapsed());
    eprintln!("a client that reads no answer: its connection closed {:?} after it began", t.elapsed());
    // The server stalled on its writes and stopped reading (else the test proves nothing).
    assert!(!all_written.load(Ordering::Relaxed), "the server read every request: the answers fit the buffers");
    // Its slot is free: the source is served again.
    let again = open_from(READER, addr, "GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let code = tokio::time::timeout(Duration::from_secs(5), status_of(again.expect("admitted"))).await.unwrap();
    assert_eq!(code, 404);
    writer.abort();
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_outside_the_allow_list_are_closed_before_a_byte_is_read() {
    let allow = vec!["127.0.0.1/32".parse().unwrap()];
    let (addr, stop, metrics, store, _) = start_with(PER_SOURCE, Some(allow)).await;
    let (status, _) = deliver(&client(), addr, 21).await;
    assert_eq!(status, 202);
    // From 127.0.0.2 the connection is closed unanswered, whatever it sends.
    let s = open_from(ATTACKER, addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let code = match s {
        Some(s) => tokio::time::timeout(Duration::from_secs(5), status_of(s)).await.unwrap(),
        None => 0,
    };
    assert_eq!(code, 0, "answered from outside the allow-list");
    let r = client_from(ATTACKER)
        .post(format!("http://{addr}/webhook"))
        .header("X-GitHub-Event", "workflow_job")
        .header("X-GitHub-Delivery", "guid-22")
        .header("X-Hub-Signature-256", sign(&payload(22)))
        .body(payload(22))
        .send()
        .await;
    assert!(r.is_err(), "a signed delivery from outside the allow-list got {:?}", r.map(|r| r.status()));
    let inbox: Vec<u64> = store.inbox(0, usize::MAX).unwrap().into_iter().map(|(_, e)| e.job.id).collect();
    assert_eq!(inbox, [21]);
    let text = metrics.render();
    assert!(text.contains("runnervisor_webhook_connections_refused_total{reason=\"not_allowed\"} 2"), "{text}");
    stop.cancel();
}

/// `allow_sources = ["github"]`: GitHub's hook ranges come from `GET /meta` (the simulator
/// lists 127.0.0.1/32 here); until they are fetched nothing gets in, then only they do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn githubs_published_hook_ranges_are_fetched_and_enforced() {
    use runnervisor::github::http::{Auth, HttpGitHub};
    let mut sim = github_sim::SimConfig::new("pat", SECRET);
    sim.hook_ranges = vec!["127.0.0.1/32".into()];
    let sim = github_sim::SimHandle::start(sim).await.unwrap();
    let github = HttpGitHub::new(
        &sim.url(),
        runnervisor::config::Scope::Organization("octo-org".into()),
        None,
        Auth::Pat(Secret::new("pat")),
        Duration::from_secs(5),
    )
    .unwrap();
    let (addr, stop, _, store, admission) = start_with(PER_SOURCE, Some(vec![SourceRule::GitHub])).await;
    // Not fetched yet: closed for everyone.
    assert!(client().get(format!("http://{addr}/webhook")).send().await.is_err(), "served before the ranges are known");
    let keeper = CancellationToken::new();
    tokio::spawn(runnervisor::sources::keep_github_ranges(Arc::new(github), admission.clone(), keeper.clone()));
    let t = Instant::now();
    loop {
        if let Ok(r) = client().get(format!("http://{addr}/webhook")).send().await {
            assert_eq!(r.status(), 405, "GET /webhook");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "GitHub's ranges never fetched");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = deliver(&client(), addr, 31).await;
    assert_eq!(status, 202);
    let r = client_from(ATTACKER).get(format!("http://{addr}/webhook")).send().await;
    assert!(r.is_err(), "127.0.0.2 is outside the published ranges: {:?}", r.map(|r| r.status()));
    keeper.cancel();
    let inbox: Vec<u64> = store.inbox(0, usize::MAX).unwrap().into_iter().map(|(_, e)| e.job.id).collect();
    assert_eq!(inbox, [31]);
    stop.cancel();
}

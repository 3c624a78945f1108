//! The agent in process: `run()` with the fake GitHub and the fake hypervisor, real HTTP
//! on 127.0.0.1 port 0, the real store and the real admin socket. What needs no libvirt is
//! checked here: the webhook's status table end to end, the admin protocol, the metrics.

mod common;

use std::sync::Arc;

use common::inproc::{self, queued, sign};
use runnervisor::admin::{self, Reply, Request};
use runnervisor::github::fake::FakeGitHub;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

async fn start() -> inproc::Agent {
    let agent = inproc::start("", Arc::new(FakeGitHub::default()), None).await;
    agent.wait("libvirt connected", |s| s.libvirt_connected).await;
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_status_table_admin_protocol_and_metrics() {
    let agent = start().await;
    let http = reqwest::Client::new();
    let body = queued(7001, "octo-org/app");
    let other_body = queued(7002, "octo-org/app");
    // (what, X-GitHub-Event, delivery id, body, signature, expected status)
    let table: Vec<(&str, &str, Option<&str>, String, Option<String>, u16)> = vec![
        ("no signature", "workflow_job", Some("d-1"), body.clone(), None, 401),
        (
            "a signature of another body",
            "workflow_job",
            Some("d-1"),
            body.clone(),
            Some(sign(other_body.as_bytes())),
            401,
        ),
        ("malformed signature", "workflow_job", Some("d-1"), body.clone(), Some("sha1=00".into()), 401),
        ("ping", "ping", Some("d-2"), "{}".into(), Some(sign(b"{}")), 200),
        ("another event", "push", Some("d-3"), "{}".into(), Some(sign(b"{}")), 202),
        ("bad JSON", "workflow_job", Some("d-4"), "{".into(), Some(sign(b"{")), 400),
        ("no delivery id", "workflow_job", None, body.clone(), Some(sign(body.as_bytes())), 400),
        (
            "outside the scope",
            "workflow_job",
            Some("d-5"),
            queued(7003, "elsewhere/x"),
            Some(sign(queued(7003, "elsewhere/x").as_bytes())),
            202,
        ),
        ("queued", "workflow_job", Some("d-6"), body.clone(), Some(sign(body.as_bytes())), 202),
        ("the same delivery again", "workflow_job", Some("d-6"), body.clone(), Some(sign(body.as_bytes())), 200),
    ];
    for (what, event, delivery, body, signature, want) in table {
        let mut req = http.post(&agent.webhook).header("X-GitHub-Event", event).body(body);
        if let Some(d) = delivery {
            req = req.header("X-GitHub-Delivery", d);
        }
        if let Some(s) = signature {
            req = req.header("X-Hub-Signature-256", s);
        }
        let status = req.send().await.unwrap().status().as_u16();
        assert_eq!(status, want, "{what}");
    }

    // The accepted job gets a VM; nothing else does.
    let hv = agent.hv.clone();
    let s = agent.wait("a VM for job 7001", |_| hv.running() == ["rv-small-7001"]).await;
    assert_eq!(s.queued.iter().map(|q| q.job_id).collect::<Vec<_>>(), [7001], "{s:#?}");
    assert_eq!(s.vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["rv-small-7001"], "{s:#?}");

    // The admin protocol: drain, undrain, destroy, errors.
    let ask = async |req: Request| admin::request(&agent.socket, &req).await;
    assert!(matches!(ask(Request::Drain).await.unwrap(), Reply::Ok(_)));
    assert!(agent.status().await.unwrap().draining);
    assert!(matches!(ask(Request::Undrain).await.unwrap(), Reply::Ok(_)));
    let Reply::Error(e) = ask(Request::Destroy { vm: "rv-nope-1".into() }).await.unwrap() else { panic!() };
    assert!(e.contains("rv-nope-1"), "{e}");
    assert!(matches!(ask(Request::Destroy { vm: "rv-small-7001".into() }).await.unwrap(), Reply::Ok(_)));
    // The job is still queued: it gets another VM.
    agent
        .wait("a second VM", |s| {
            s.vms.iter().map(|v| v.name.as_str()).eq(["rv-small-7001-2"]) && hv.running() == ["rv-small-7001-2"]
        })
        .await;
    // A line that is not a request gets an error line, not a dropped connection.
    let mut conn = tokio::net::UnixStream::connect(&agent.socket).await.unwrap();
    conn.write_all(b"{\"cmd\":\"reboot\"}\n").await.unwrap();
    let mut line = String::new();
    BufReader::new(&mut conn).read_line(&mut line).await.unwrap();
    let Ok(Reply::Error(e)) = admin::parse_reply(&line) else { panic!("{line}") };
    assert!(e.starts_with("bad request"), "{e}");

    // Metrics: what happened above, counted.
    let resp = http.get(&agent.metrics).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = resp.text().await.unwrap();
    for line in [
        r#"runnervisor_webhooks_total{event="workflow_job",outcome="accepted"} 1"#,
        r#"runnervisor_webhooks_total{event="workflow_job",outcome="duplicate"} 1"#,
        r#"runnervisor_webhooks_total{event="workflow_job",outcome="out_of_scope"} 1"#,
        r#"runnervisor_webhooks_total{event="workflow_job",outcome="invalid"} 1"#,
        r#"runnervisor_webhooks_total{event="other",outcome="ignored"} 1"#,
        r#"runnervisor_jobs_received_total{pool="small"} 1"#,
        r#"runnervisor_vms_started_total{pool="small"} 2"#,
        r#"runnervisor_teardowns_total{reason="operator"} 1"#,
    ] {
        assert!(text.contains(line), "{line} missing in:\n{text}");
    }
    // libvirt answered (the test waited for it): what an operator alerts on says so (a whole
    // line: its help begins "1 while").
    assert!(text.lines().any(|l| l == "runnervisor_hypervisor_ready 1"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("runnervisor_webhook_signature_failures_total 3")), "{text}");

    // Stopping: run() returns, the socket goes, the VM keeps running.
    let (socket, hv) = (agent.socket.clone(), agent.hv.clone());
    agent.stop().await.unwrap();
    assert!(!socket.exists());
    assert_eq!(hv.running(), ["rv-small-7001-2"]);
}

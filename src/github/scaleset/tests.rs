//! The client against github-sim's Actions service, over HTTP.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use super::*;
use crate::config::Scope;
use crate::github::http::{Auth, HttpGitHub};

const SET: &str = "rv-linux";

/// A simulator (long polls of 300 ms, changed by `tweak`) and a client of it.
pub(crate) async fn start(
    tweak: impl FnOnce(&mut github_sim::SimConfig),
) -> (github_sim::SimHandle, HttpScaleSets<HttpGitHub>) {
    let mut config = github_sim::SimConfig::new("pat", "secret");
    config.message_poll_window = Duration::from_millis(300);
    tweak(&mut config);
    let sim = github_sim::SimHandle::start(config).await.unwrap();
    let client = client_of(&sim);
    (sim, client)
}

/// A client of `sim`'s organization `octo-org`.
pub(crate) fn client_of(sim: &github_sim::SimHandle) -> HttpScaleSets<HttpGitHub> {
    let github = HttpGitHub::new(
        &sim.url(),
        Scope::Organization("octo-org".into()),
        None,
        Auth::Pat(Secret::new("pat")),
        Duration::from_secs(5),
    )
    .unwrap();
    HttpScaleSets::new(&sim.url(), &format!("{}/octo-org", sim.url()), Arc::new(github), Duration::from_secs(5))
        .unwrap()
}

fn spec(labels: &[&str]) -> ScaleSetSpec {
    ScaleSetSpec {
        name: SET.into(),
        labels: labels.iter().map(|l| l.to_string()).collect(),
        runner_group: "default".into(),
    }
}

pub(crate) async fn queue_job(sim: &github_sim::SimHandle, labels: &[&str], secs: f64) -> u64 {
    let r: Value = reqwest::Client::new()
        .post(format!("{}/_sim/jobs", sim.url()))
        .json(&json!({"repo": "octo-org/app", "labels": labels, "duration_secs": secs}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["id"].as_u64().unwrap()
}

/// The runner's credential in a JIT config (what the fake runner in a VM reads).
pub(crate) fn credential(jit: &JitRunner) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let files: Value = serde_json::from_slice(&b64.decode(jit.encoded.expose()).unwrap()).unwrap();
    let creds: Value = serde_json::from_slice(&b64.decode(files[".credentials"].as_str().unwrap()).unwrap()).unwrap();
    creds["data"]["token"].as_str().unwrap().to_string()
}

/// The runner of `jit` takes its next job (as the fake runner in a VM does); its id.
pub(crate) async fn take_job(sim: &github_sim::SimHandle, jit: &JitRunner) -> u64 {
    let taken: Value = reqwest::Client::new()
        .get(format!("{}/_runner/jobs/next?wait=5", sim.url()))
        .bearer_auth(credential(jit))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    taken["id"].as_u64().unwrap()
}

/// The runner of `jit` reports `job` done, a success.
pub(crate) async fn complete_job(sim: &github_sim::SimHandle, jit: &JitRunner, job: u64) {
    let done = reqwest::Client::new()
        .post(format!("{}/_runner/jobs/{job}/complete", sim.url()))
        .bearer_auth(credential(jit))
        .json(&json!({"conclusion": "success"}))
        .send()
        .await
        .unwrap();
    assert!(done.status().is_success(), "{done:?}");
}

/// The next message, acknowledged.
async fn next(client: &HttpScaleSets<HttpGitHub>, session: &Session, last: &mut u64) -> Message {
    for _ in 0..20 {
        if let Some(m) = client.poll(session, *last, 10).await.unwrap() {
            *last = m.id;
            client.ack(session, m.id).await.unwrap();
            return m;
        }
    }
    panic!("no message came");
}

/// A job the set covers: offered, acquired, taken by the set's runner and done, each a
/// message; the set is adopted by name and its labels brought to the config's.
#[tokio::test]
async fn a_scale_sets_job_goes_from_offered_to_done_through_the_message_queue() {
    let (sim, client) = start(|_| {}).await;
    let set = client.ensure(&spec(&[SET])).await.unwrap();
    assert_eq!((set.name.as_str(), set.runner_group_id), (SET, 1));
    let again = client.ensure(&spec(&[SET, "gpu"])).await.unwrap();
    assert_eq!(again.id, set.id, "adopted by name, not made twice");
    assert_eq!(again.labels, [SET, "gpu"], "labels brought to the config's, its name among them");
    let named = client.ensure(&spec(&["gpu"])).await.unwrap();
    assert_eq!(named.labels, [SET, "gpu"], "the set's name stays a label");

    let session = client.create_session(set.id, "host-a").await.unwrap();
    assert_eq!(session.statistics, Statistics::default());
    // Nothing yet: the long poll answers none.
    assert_eq!(client.poll(&session, 0, 10).await.unwrap(), None);

    let job = queue_job(&sim, &[SET], 0.2).await;
    let mut last = 0;
    let m = next(&client, &session, &mut last).await;
    let offered = match &m.jobs[..] {
        [JobMessage::Available(j)] => j.clone(),
        _ => panic!("{m:?}"),
    };
    assert_eq!(offered.repository, "octo-org/app");
    assert_eq!(m.statistics.unwrap().available, 1);
    assert_eq!(client.acquire(set.id, &session, &[offered.request_id]).await.unwrap(), [offered.request_id]);
    let m = next(&client, &session, &mut last).await;
    assert!(matches!(&m.jobs[..], [JobMessage::Assigned(j)] if j.request_id == offered.request_id), "{m:?}");
    assert_eq!(m.statistics.unwrap().assigned, 1);

    // The set's runner takes it.
    let jit = client.generate_jit_config(set.id, "rv-linux-1").await.unwrap();
    assert_eq!(take_job(&sim, &jit).await, job);
    let m = next(&client, &session, &mut last).await;
    assert!(matches!(&m.jobs[..], [JobMessage::Started { runner_name: Some(r), .. }] if r == "rv-linux-1"), "{m:?}");
    // Busy: not deleted.
    assert_eq!(client.delete_runner(jit.runner_id).await.unwrap(), Deleted::Busy);
    complete_job(&sim, &jit, job).await;
    let m = next(&client, &session, &mut last).await;
    assert!(
        matches!(&m.jobs[..], [JobMessage::Completed { result, runner_name: Some(r), .. }] if result == "succeeded" && r == "rv-linux-1"),
        "{m:?}"
    );
    // Ephemeral: gone with its job.
    assert_eq!(client.delete_runner(jit.runner_id).await.unwrap(), Deleted::NotFound);
    client.delete_session(set.id, &session.id).await.unwrap();
}

/// One session per set: another client's create is refused until it is deleted; an
/// expired queue token is [`SsError::QueueToken`] and a refresh renews it; a refresh of a
/// session the service lost is [`SsError::SessionGone`].
#[tokio::test]
async fn a_sets_session_is_held_by_one_client_and_its_queue_token_is_refreshed() {
    let (_sim, client) = start(|c| c.queue_token_ttl = Duration::from_millis(400)).await;
    let set = client.ensure(&spec(&[])).await.unwrap();
    let held = client.create_session(set.id, "host-a").await.unwrap();
    let err = client.create_session(set.id, "host-b").await.unwrap_err();
    assert!(matches!(err, SsError::Conflict(_)), "{err}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = client.poll(&held, 0, 1).await.unwrap_err();
    assert!(matches!(err, SsError::QueueToken), "{err}");
    let renewed = client.refresh_session(set.id, &held.id).await.unwrap();
    assert_eq!(client.poll(&renewed, 0, 1).await.unwrap(), None);

    client.delete_session(set.id, &held.id).await.unwrap();
    let err = client.refresh_session(set.id, &held.id).await.unwrap_err();
    assert!(matches!(err, SsError::SessionGone(_)), "{err}");
    client.create_session(set.id, "host-b").await.unwrap();
}

/// The service's token expires: the next call exchanges a new one and goes through.
#[tokio::test]
async fn an_expired_service_token_is_exchanged_again() {
    let (_sim, client) = start(|c| c.admin_token_ttl = Duration::from_millis(300)).await;
    let set = client.ensure(&spec(&[])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The simulator's JWT says it lasts a second (its `exp` is in whole seconds), so the
    // client would renew it in a minute: only the 401 tells it the token is gone.
    assert_eq!(client.ensure(&spec(&[])).await.unwrap().id, set.id);
}

#[test]
fn a_jwts_times_are_read_and_other_tokens_have_none() {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
    let jwt = format!("{}.{}.sig", b64.encode(r#"{"alg":"RS256"}"#), b64.encode(r#"{"exp":1800000000}"#));
    assert_eq!(jwt_times(&jwt), Some((None, t(1_800_000_000))));
    let jwt = format!("a.{}.b", b64.encode(r#"{"iat":1700000000,"exp":1700003600}"#));
    assert_eq!(jwt_times(&jwt), Some((Some(t(1_700_000_000)), t(1_700_003_600))));
    assert_eq!(jwt_times("rs_opaque"), None);
    assert_eq!(jwt_times("a.!!!.c"), None);
}

/// A token is exchanged again a minute before it expires, by its lifetime as received:
/// a clock here ahead of the service's neither renews it at every call nor lets it lapse.
#[test]
fn a_token_is_renewed_a_minute_before_its_lifetime_ends_whatever_this_clocks_skew() {
    let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s);
    // (received at, iat, exp) → renewed at
    let table = [
        ((t(0), Some(t(0)), t(3600)), t(3540)),
        // This clock 2 h ahead of the service's: still an hour's lifetime.
        ((t(7200), Some(t(0)), t(3600)), t(7200 + 3540)),
        // This clock behind: the lifetime as issued, not until `exp` by this clock.
        ((t(0), Some(t(600)), t(4200)), t(3540)),
        // No `iat`: until `exp` by this clock.
        ((t(0), None, t(600)), t(540)),
        // Already past by this clock, or a short lifetime: a minute on, not at every call.
        ((t(7200), None, t(3600)), t(7260)),
        ((t(0), Some(t(0)), t(30)), t(60)),
    ];
    for ((now, iat, exp), want) in table {
        assert_eq!(renew_at(now, iat, exp), want, "{now:?} {iat:?} {exp:?}");
    }
}

/// Error answers that are no JSON keep their status: a queue 401 is still the expired
/// token, a proxy's 502 page still a 502.
#[test]
fn an_error_answer_that_is_no_json_keeps_its_status() {
    let v = error_body(b"<html>502 Bad Gateway</html>");
    let e = status_error("GET", "message queue", StatusCode::BAD_GATEWAY, &v);
    assert_eq!(e.status(), Some(502));
    assert!(e.to_string().contains("502 Bad Gateway"), "{e}");
    let gone = json!({"typeName": "GitHub.DistributedTask.WebApi.RunnerAdminException", "message": "runner referenced a session ID that doesn't exist"});
    assert!(matches!(status_error("PATCH", "x/sessions/1", StatusCode::NOT_FOUND, &gone), SsError::SessionGone(_)));
    let set_gone = json!({"typeName": "NotFoundException", "message": "runner scale set 3 not found"});
    assert!(matches!(status_error("PATCH", "x/sessions/1", StatusCode::NOT_FOUND, &set_gone), SsError::Status { .. }));
    let expired = json!({"typeName": "GitHub.DistributedTask.WebApi.RunnerScaleSetSessionExpiredException", "message": "The session has expired"});
    assert!(matches!(
        status_error("PATCH", "x/sessions/1", StatusCode::BAD_REQUEST, &expired),
        SsError::SessionGone(_)
    ));
    assert!(matches!(
        status_error("DELETE", "x/sessions/1", StatusCode::BAD_REQUEST, &expired),
        SsError::SessionGone(_)
    ));
}

/// Messages as the service writes them: a BOM first, the body a JSON array in a string;
/// job message types this client does not know are skipped.
#[test]
fn a_message_is_read_past_its_bom_and_its_body_in_a_string() {
    let body = json!([
        {"messageType": "JobAvailable", "runnerRequestId": 7, "ownerName": "o", "repositoryName": "r",
         "workflowRunId": 3, "requestLabels": ["rv"]},
        {"messageType": "JobSomethingNew", "runnerRequestId": 8, "ownerName": "o", "repositoryName": "r"},
        {"messageType": "JobCompleted", "runnerRequestId": 6, "ownerName": "o", "repositoryName": "r",
         "result": "canceled", "runnerName": ""},
    ]);
    let envelope = json!({"messageId": 12, "messageType": "RunnerScaleSetJobMessages",
        "body": body.to_string(), "statistics": {"totalAssignedJobs": 2}});
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(envelope.to_string().bytes());
    let m = message_of(&json_of(&bytes).unwrap()).unwrap();
    assert_eq!(m.id, 12);
    assert_eq!(m.statistics.unwrap().assigned, 2);
    assert_eq!(m.jobs.len(), 2, "{m:?}");
    assert_eq!(m.unreadable, None);
    assert!(
        matches!(&m.jobs[0], JobMessage::Available(j) if j.request_id == 7 && j.repository == "o/r" && j.labels == ["rv"])
    );
    assert!(matches!(&m.jobs[1], JobMessage::Completed { result, runner_name: None, .. } if result == "canceled"));
    // What cannot be read is said, and the message is still one (to be acknowledged).
    let other = json!({"messageId": 1, "messageType": "Unknown", "body": ""});
    assert!(message_of(&other).unwrap().unreadable.unwrap().contains("Unknown"));
    let bad = json!({"messageId": 2, "messageType": "RunnerScaleSetJobMessages", "body": "[{\"messageType\": \"JobAssigned\"}, 7]"});
    let m = message_of(&bad).unwrap();
    assert!(m.jobs.is_empty() && m.unreadable.is_some(), "{m:?}");
    assert_eq!(m.statistics, None, "no statistics: none, not zeros");
    assert_eq!(json_of(b"  ").unwrap(), Value::Null);
}

/// A message acknowledged is gone (a poll from the start sees the next one); one not
/// acknowledged comes again. A job the set had no capacity for when offered is offered
/// again, and acquired once the poll announces room.
#[tokio::test]
async fn acknowledged_messages_go_and_a_job_offered_without_room_is_offered_again() {
    // Offered again a second after (a quarter of `reassign_after`).
    let (sim, client) = start(|c| c.reassign_after = Duration::from_secs(4)).await;
    let set = client.ensure(&spec(&[])).await.unwrap();
    let session = client.create_session(set.id, "host-a").await.unwrap();
    queue_job(&sim, &[SET], 0.2).await;
    // Announced capacity 0: nothing is acquired.
    let m = client.poll(&session, 0, 0).await.unwrap().unwrap();
    let JobMessage::Available(j) = &m.jobs[0] else { panic!("{m:?}") };
    assert_eq!(client.acquire(set.id, &session, &[j.request_id]).await.unwrap(), Vec::<u64>::new());
    // Not acknowledged: it comes again.
    assert_eq!(client.poll(&session, 0, 0).await.unwrap().unwrap().id, m.id);
    client.ack(&session, m.id).await.unwrap();
    // Offered again, and acquired with room.
    let again = loop {
        if let Some(n) = client.poll(&session, 0, 1).await.unwrap() {
            break n;
        }
    };
    assert_ne!(again.id, m.id, "the acknowledged message is gone");
    let JobMessage::Available(k) = &again.jobs[0] else { panic!("{again:?}") };
    assert_eq!(k.request_id, j.request_id);
    assert_eq!(client.acquire(set.id, &session, &[k.request_id]).await.unwrap(), [k.request_id]);
}

#[test]
fn calls_are_counted_by_route_without_their_ids() {
    let sid = "0f8fad5b-d9cb-469f-a165-70867728950e";
    assert_eq!(
        endpoint(&Method::PATCH, &format!("_apis/runtime/runnerscalesets/42/sessions/{sid}")),
        "PATCH scale set _apis/runtime/runnerscalesets/{id}/sessions/{id}"
    );
    assert_eq!(endpoint(&Method::GET, "message queue"), "GET scale set message queue");
    assert_eq!(endpoint(&Method::POST, "actions/runner-registration"), "POST scale set actions/runner-registration");
    assert_eq!(
        endpoint(&Method::GET, "_apis/distributedtask/pools/0/agents"),
        "GET scale set _apis/distributedtask/pools/{id}/agents"
    );
}

/// A call with the queue's token is named, and timed, by its method and the URL's last
/// segment: GHES's queue URL lies under `_apis/runtime/runnerscalesets` too, where every
/// poll was taken for `acquirejobs` and cut at the API timeout (an independent read).
#[test]
fn the_long_poll_is_told_by_its_method_not_by_a_path_it_shares() {
    let ghes =
        "https://ghes.example/_services/pipelines/_apis/runtime/runnerscalesets/1/messages?sessionId=s&lastMessageId=3";
    let table = [
        (Method::GET, ghes, ("message queue", true)),
        (
            Method::DELETE,
            "https://ghes.example/_apis/runtime/runnerscalesets/1/messages/3?sessionId=s",
            ("message queue", false),
        ),
        (
            Method::POST,
            "https://pipelines.example/_apis/runtime/runnerscalesets/1/acquirejobs?api-version=6.0-preview",
            ("acquirejobs", false),
        ),
        (
            Method::GET,
            "https://broker.actions.githubusercontent.com/rsv/scalesets/message?sessionId=s",
            ("message queue", true),
        ),
    ];
    for (method, url, want) in table {
        assert_eq!(queue_call(&method, url), want, "{method} {url}");
    }
}

/// A session's statistics absent or null: the session is taken all the same (the service
/// made it; refused, it would block every later create with a 409 until it expired).
#[test]
fn a_session_without_statistics_is_taken() {
    let base = json!({"sessionId": "s1", "messageQueueUrl": "https://q.example/m", "messageQueueAccessToken": "t"});
    let mut null = base.clone();
    null["statistics"] = Value::Null;
    for v in [base, null] {
        let s = session_of(&v).unwrap();
        assert_eq!((s.id.as_str(), s.statistics.assigned), ("s1", 0), "{v}");
    }
    let mut bad = json!({"sessionId": "s1", "messageQueueUrl": "u", "messageQueueAccessToken": "t"});
    bad["statistics"] = json!("x");
    assert!(session_of(&bad).unwrap_err().contains("statistics"));
}

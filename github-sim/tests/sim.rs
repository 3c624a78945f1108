//! github-sim over real HTTP: REST shapes and errors, pagination, JIT rules, App auth,
//! webhooks (signature, no retry, redelivery keeps the GUID), fault injection, and the
//! test image's fake runner (run on the host) going through a whole job.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use github_sim::{SimConfig, SimHandle};
use serde_json::{Value, json};

const PAT: &str = "ghp_testtoken";
const SECRET: &str = "It's a Secret to Everybody";

#[derive(Clone, Debug)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

/// A webhook receiver answering `status`; records what arrives.
async fn receiver(status: StatusCode) -> (String, Arc<Mutex<Vec<Received>>>) {
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/webhook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let g = g.clone();
            async move {
                g.lock().unwrap().push(Received { headers, body });
                status
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/webhook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, got)
}

async fn sim_with(webhook_url: Option<String>, tweak: impl FnOnce(&mut SimConfig)) -> SimHandle {
    let mut c = SimConfig::new(PAT, SECRET);
    c.webhook_url = webhook_url;
    tweak(&mut c);
    SimHandle::start(c).await.unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn api(sim: &SimHandle, method: reqwest::Method, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut r = client()
        .request(method, format!("{}{path}", sim.url()))
        .header("authorization", format!("Bearer {PAT}"))
        .header("x-github-api-version", "2022-11-28");
    if let Some(b) = body {
        r = r.json(&b);
    }
    r.send().await.unwrap()
}

async fn queue_job(sim: &SimHandle, body: Value) -> u64 {
    let r = client().post(format!("{}/_sim/jobs", sim.url())).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap()["id"].as_u64().unwrap()
}

async fn wait_for<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn auth_errors_and_rate_limit_headers() {
    let sim = sim_with(None, |_| {}).await;
    let r = client().get(format!("{}/orgs/o/actions/runners", sim.url())).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-ratelimit-limit"], "60");
    assert_eq!(r.json::<Value>().await.unwrap()["message"], "Requires authentication");
    let r = client()
        .get(format!("{}/orgs/o/actions/runners", sim.url()))
        .header("authorization", "token wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["message"], "Bad credentials");

    let r = api(&sim, reqwest::Method::GET, "/api/v3/orgs/o/actions/runners", None).await;
    assert_eq!(r.status(), 200, "GHES base path works");
    for h in
        ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-used", "x-ratelimit-reset", "x-ratelimit-resource"]
    {
        assert!(r.headers().contains_key(h), "{h} missing");
    }
    let remaining: u64 = r.headers()["x-ratelimit-remaining"].to_str().unwrap().parse().unwrap();
    let r = api(&sim, reqwest::Method::GET, "/orgs/o/actions/runners", None).await;
    let after: u64 = r.headers()["x-ratelimit-remaining"].to_str().unwrap().parse().unwrap();
    assert_eq!(after, remaining - 1);

    let r = client()
        .get(format!("{}/orgs/o/actions/runners", sim.url()))
        .header("authorization", format!("Bearer {PAT}"))
        .header("x-github-api-version", "1999-01-01")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let r = api(&sim, reqwest::Method::GET, "/no/such/thing", None).await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["message"], "Not Found");
}

#[tokio::test]
async fn jit_config_rules_and_runner_crud_with_pagination() {
    let sim = sim_with(None, |_| {}).await;
    let path = "/orgs/octo-org/actions/runners/generate-jitconfig";
    let r = api(&sim, reqwest::Method::POST, path, Some(json!({"name": "a", "labels": ["self-hosted"]}))).await;
    assert_eq!(r.status(), 422, "runner_group_id is required");
    assert!(r.json::<Value>().await.unwrap()["message"].as_str().unwrap().contains("runner_group_id"));
    let r =
        api(&sim, reqwest::Method::POST, path, Some(json!({"name": "a", "runner_group_id": 1, "labels": []}))).await;
    assert_eq!(r.status(), 422, "labels must not be empty");
    let r = client()
        .post(format!("{}{path}", sim.url()))
        .header("authorization", format!("Bearer {PAT}"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let mut ids = Vec::new();
    for i in 0..5 {
        let r = api(
            &sim,
            reqwest::Method::POST,
            path,
            Some(json!({
                "name": format!("rv-p-{i}"), "runner_group_id": 1, "labels": ["self-hosted", "Linux", "<odd&label>"]
            })),
        )
        .await;
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["runner"]["labels"].as_array().unwrap().len(), 3, "labels taken exactly as given");
        assert_eq!(v["runner"]["status"], "offline");
        let decoded =
            base64::engine::general_purpose::STANDARD.decode(v["encoded_jit_config"].as_str().unwrap()).unwrap();
        let files: Value = serde_json::from_slice(&decoded).unwrap();
        assert!(files[".runner"].is_string() && files[".credentials"].is_string());
        ids.push(v["runner"]["id"].as_u64().unwrap());
    }
    assert!(ids[0] > u64::from(u32::MAX));
    let r =
        api(&sim, reqwest::Method::POST, path, Some(json!({"name": "rv-p-0", "runner_group_id": 1, "labels": ["x"]})))
            .await;
    assert_eq!(r.status(), 409, "duplicate name");

    let r = api(&sim, reqwest::Method::GET, "/orgs/octo-org/actions/runners?per_page=2&page=2", None).await;
    let link = r.headers()["link"].to_str().unwrap().to_string();
    assert!(link.contains("page=3>; rel=\"next\"") && link.contains("rel=\"prev\""), "{link}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["total_count"], 5);
    assert_eq!(v["runners"].as_array().unwrap().len(), 2);
    assert_eq!(v["runners"][0]["name"], "rv-p-2");
    let r = api(&sim, reqwest::Method::GET, "/orgs/octo-org/actions/runners?per_page=2&page=3", None).await;
    assert!(!r.headers()["link"].to_str().unwrap().contains("rel=\"next\""));

    let r = api(&sim, reqwest::Method::GET, &format!("/orgs/octo-org/actions/runners/{}", ids[0]), None).await;
    assert_eq!(r.json::<Value>().await.unwrap()["name"], "rv-p-0");
    let r = api(&sim, reqwest::Method::DELETE, &format!("/orgs/octo-org/actions/runners/{}", ids[0]), None).await;
    assert_eq!(r.status(), 204);
    let r = api(&sim, reqwest::Method::DELETE, &format!("/orgs/octo-org/actions/runners/{}", ids[0]), None).await;
    assert_eq!(r.status(), 404);
    let r = api(&sim, reqwest::Method::GET, &format!("/repos/octo-org/app/actions/runners/{}", ids[1]), None).await;
    assert_eq!(r.status(), 404, "org runner is not visible at repo scope");

    let r = api(&sim, reqwest::Method::GET, "/orgs/octo-org/actions/runner-groups", None).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["runner_groups"][0]["name"], "Default");

    for scope in ["/repos/octo-org/app", "/orgs/octo-org", "/enterprises/octo-ent"] {
        let r = api(&sim, reqwest::Method::POST, &format!("{scope}/actions/runners/registration-token"), None).await;
        assert_eq!(r.status(), 201, "{scope}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["token"].as_str().unwrap().len(), 29);
        assert!(v["expires_at"].as_str().unwrap().ends_with('Z'));
    }
}

#[tokio::test]
async fn app_jwt_gives_installation_tokens_that_expire() {
    let key_dir = tempdir();
    let key = key_dir.path().join("app.pem");
    let pubkey = key_dir.path().join("app.pub.pem");
    assert!(
        Command::new("openssl")
            .args(["genrsa", "-traditional", "-out"])
            .arg(&key)
            .arg("2048")
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&pubkey)
            .status()
            .unwrap()
            .success()
    );
    let pem = std::fs::read_to_string(&pubkey).unwrap();
    let sim = sim_with(None, |c| {
        c.app = Some(github_sim::auth::AppKey::from_pem(77, None, &pem).unwrap());
        c.installation_token_ttl = Duration::from_secs(2);
    })
    .await;
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    let jwt = sign_jwt(&key, json!({"iat": now - 60, "exp": now + 540, "iss": "77"}));
    let post = |auth: String| {
        let url = format!("{}/app/installations/1/access_tokens", sim.url());
        async move { client().post(url).header("authorization", auth).send().await.unwrap() }
    };
    let r = post(format!("Bearer {jwt}")).await;
    assert_eq!(r.status(), 201);
    let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("ghs_"));
    let r = client()
        .get(format!("{}/orgs/octo-org/actions/runners", sim.url()))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = post(format!("Bearer {PAT}")).await;
    assert_eq!(r.status(), 401, "a PAT cannot mint installation tokens");
    let expired = sign_jwt(&key, json!({"iat": now - 700, "exp": now - 100, "iss": "77"}));
    assert_eq!(post(format!("Bearer {expired}")).await.status(), 401);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = client()
        .get(format!("{}/orgs/octo-org/actions/runners", sim.url()))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "installation token expired");
}

/// Removed when dropped.
fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("github-sim-test-").tempdir().unwrap()
}

/// Signs a JWT with openssl (the test does not trust the simulator's own code to sign).
fn sign_jwt(key: &std::path::Path, claims: Value) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let input = format!("{}.{}", b64(br#"{"alg":"RS256","typ":"JWT"}"#), b64(claims.to_string().as_bytes()));
    let dir = tempdir();
    std::fs::write(dir.path().join("in"), &input).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .arg(dir.path().join("in"))
        .output()
        .unwrap();
    assert!(out.status.success());
    format!("{input}.{}", b64(&out.stdout))
}

#[tokio::test]
async fn webhooks_are_signed_not_retried_and_redelivered_with_the_same_guid() {
    let (url, got) = receiver(StatusCode::INTERNAL_SERVER_ERROR).await;
    let sim = sim_with(Some(url), |c| c.hook_id = 42).await;
    let job = queue_job(&sim, json!({"repo": "octo-org/app", "labels": ["self-hosted", "linux"]})).await;
    let first = wait_for("delivery", async || got.lock().unwrap().first().cloned()).await;
    let h = &first.headers;
    assert_eq!(h["x-github-event"], "workflow_job");
    assert_eq!(h["x-github-hook-id"], "42");
    let sig = h["x-hub-signature-256"].to_str().unwrap();
    assert_eq!(sig, github_sim::webhook::signature(SECRET.as_bytes(), &first.body));
    let payload: Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(payload["action"], "queued");
    assert_eq!(payload["workflow_job"]["id"], job);
    assert!(payload["workflow_job"]["runner_name"].is_null());
    assert!(payload["workflow_job"]["runner_id"].is_null());
    assert_eq!(payload["repository"]["full_name"], "octo-org/app");
    assert_eq!(payload["organization"]["login"], "octo-org");
    assert_eq!(payload["installation"]["id"], 1);
    assert!(payload.get("enterprise").is_none(), "no enterprise unless configured");

    // Failed (500) and not retried.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(got.lock().unwrap().len(), 1);
    let r = api(&sim, reqwest::Method::GET, "/orgs/octo-org/hooks/42/deliveries", None).await;
    let list: Value = r.json().await.unwrap();
    assert_eq!(list[0]["status_code"], 500);
    assert_eq!(list[0]["status"], "Invalid HTTP Response: 500");
    assert_eq!(list[0]["redelivery"], false);
    let delivery_id = list[0]["id"].as_u64().unwrap();
    assert_eq!(api(&sim, reqwest::Method::GET, "/orgs/octo-org/hooks/7/deliveries", None).await.status(), 404);

    let r = api(
        &sim,
        reqwest::Method::POST,
        &format!("/repos/octo-org/app/hooks/42/deliveries/{delivery_id}/attempts"),
        None,
    )
    .await;
    assert_eq!(r.status(), 202);
    let second = wait_for("redelivery", async || got.lock().unwrap().get(1).cloned()).await;
    assert_eq!(second.headers["x-github-delivery"], first.headers["x-github-delivery"]);
    assert_eq!(second.body, first.body);
    let r = api(&sim, reqwest::Method::GET, &format!("/orgs/octo-org/hooks/42/deliveries/{delivery_id}"), None).await;
    let full: Value = r.json().await.unwrap();
    assert_eq!(full["request"]["payload"]["workflow_job"]["id"], job);
}

/// An organization in an enterprise: deliveries name the enterprise; its runner endpoints
/// answer for that slug only; a runner registered there records the scope.
#[tokio::test]
async fn enterprise_scope_payloads_and_endpoints() {
    let (url, got) = receiver(StatusCode::OK).await;
    let sim = sim_with(Some(url), |c| c.enterprise = Some("octo-ent".into())).await;
    queue_job(&sim, json!({"repo": "octo-org/app", "labels": ["self-hosted"]})).await;
    let first = wait_for("delivery", async || got.lock().unwrap().first().cloned()).await;
    let payload: Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(payload["enterprise"]["slug"], "octo-ent");
    assert!(payload["enterprise"]["id"].is_u64());

    let jit = json!({"name": "ent-1", "runner_group_id": 1, "labels": ["self-hosted"]});
    let r = api(
        &sim,
        reqwest::Method::POST,
        "/enterprises/other-ent/actions/runners/generate-jitconfig",
        Some(jit.clone()),
    )
    .await;
    assert_eq!(r.status(), 404, "another enterprise");
    let r =
        api(&sim, reqwest::Method::POST, "/enterprises/octo-ent/actions/runners/generate-jitconfig", Some(jit)).await;
    assert_eq!(r.status(), 201);
    let r = api(&sim, reqwest::Method::GET, "/enterprises/octo-ent/actions/runners", None).await;
    let list: Value = r.json().await.unwrap();
    assert_eq!(list["runners"][0]["name"], "ent-1");
    let r = api(&sim, reqwest::Method::GET, "/orgs/octo-org/actions/runners", None).await;
    assert_eq!(r.json::<Value>().await.unwrap()["total_count"], 0, "an enterprise runner is not the org's");
    let r = api(&sim, reqwest::Method::GET, "/enterprises/octo-ent/actions/runner-groups", None).await;
    assert_eq!(r.status(), 200);
    let history: Value =
        client().get(format!("{}/_sim/runner-history", sim.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(history["ent-1"]["scope"], "enterprises/octo-ent");
}

#[tokio::test]
async fn delivery_list_paginates_by_cursor() {
    let (url, got) = receiver(StatusCode::OK).await;
    let sim = sim_with(Some(url), |_| {}).await;
    for _ in 0..5 {
        queue_job(&sim, json!({"repo": "octo-org/app", "labels": ["x"]})).await;
    }
    wait_for("5 deliveries", async || (got.lock().unwrap().len() == 5).then_some(())).await;
    let mut seen = Vec::new();
    let mut next = Some(format!("{}/orgs/octo-org/hooks/1/deliveries?per_page=2", sim.url()));
    while let Some(u) = next.take() {
        let r = client().get(&u).header("authorization", format!("token {PAT}")).send().await.unwrap();
        next = r.headers().get("link").map(|l| {
            let l = l.to_str().unwrap();
            l[l.find('<').unwrap() + 1..l.find('>').unwrap()].to_string()
        });
        let page: Value = r.json().await.unwrap();
        assert!(page.as_array().unwrap().len() <= 2);
        seen.extend(page.as_array().unwrap().iter().map(|d| d["id"].as_u64().unwrap()));
    }
    assert_eq!(seen.len(), 5);
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "newest first: {seen:?}");
}

#[tokio::test]
async fn faults_inject_errors_rate_limits_and_webhook_drops() {
    let (url, got) = receiver(StatusCode::OK).await;
    let sim = sim_with(Some(url), |_| {}).await;
    let arm = |f: Value| {
        let u = format!("{}/_sim/faults", sim.url());
        async move { client().post(u).json(&f).send().await.unwrap() }
    };
    assert_eq!(arm(json!({"kind": "api_error", "status": 404})).await.status(), 422, "only 5xx");
    assert_eq!(arm(json!({"kind": "nonsense"})).await.status(), 422);
    assert_eq!(arm(json!([{"kind": "api_error", "status": 503, "count": 2}])).await.status(), 201);
    for expected in [503, 503, 200] {
        assert_eq!(api(&sim, reqwest::Method::GET, "/orgs/o/actions/runners", None).await.status(), expected);
    }
    arm(json!({"kind": "rate_limit", "status": 429, "retry_after": 7, "count": 1})).await;
    let r = api(&sim, reqwest::Method::GET, "/orgs/o/actions/runners", None).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    arm(json!({"kind": "rate_limit", "status": 403, "primary": true, "reset_in": 30, "count": 1})).await;
    let r = api(&sim, reqwest::Method::GET, "/orgs/o/actions/runners", None).await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    arm(json!({"kind": "latency", "ms": 300, "count": 1})).await;
    let t = std::time::Instant::now();
    api(&sim, reqwest::Method::GET, "/orgs/o/actions/runners", None).await;
    assert!(t.elapsed() >= Duration::from_millis(300));

    arm(json!({"kind": "webhook_drop", "count": 1, "action": "queued"})).await;
    arm(json!({"kind": "webhook_duplicate", "count": 1})).await;
    let dropped = queue_job(&sim, json!({"repo": "octo-org/app", "labels": ["x"]})).await;
    let duplicated = queue_job(&sim, json!({"repo": "octo-org/app", "labels": ["x"]})).await;
    wait_for("2 deliveries", async || (got.lock().unwrap().len() == 2).then_some(())).await;
    let ids: Vec<u64> = got
        .lock()
        .unwrap()
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["workflow_job"]["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![duplicated, duplicated]);
    let r = api(&sim, reqwest::Method::GET, "/orgs/octo-org/hooks/1/deliveries", None).await;
    let list: Value = r.json().await.unwrap();
    let failed: Vec<&Value> = list.as_array().unwrap().iter().filter(|d| d["status_code"] == 0).collect();
    assert_eq!(failed.len(), 1, "the dropped delivery shows as failed");
    let _ = dropped;

    arm(json!({"kind": "webhook_reorder", "count": 2})).await;
    let a = queue_job(&sim, json!({"repo": "octo-org/app", "labels": ["x"]})).await;
    let b = queue_job(&sim, json!({"repo": "octo-org/app", "labels": ["x"]})).await;
    wait_for("reordered", async || (got.lock().unwrap().len() == 4).then_some(())).await;
    let order: Vec<u64> = got.lock().unwrap()[2..]
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["workflow_job"]["id"].as_u64().unwrap())
        .collect();
    assert_eq!(order, vec![b, a]);
}

#[tokio::test]
async fn a_relay_sends_each_delivery_to_all_urls_or_to_n_of_them_in_turn() {
    let mut receivers = Vec::new();
    for _ in 0..3 {
        receivers.push(receiver(StatusCode::OK).await);
    }
    let urls: Vec<String> = receivers.iter().map(|(u, _)| u.clone()).collect();
    let counts = || receivers.iter().map(|(_, g)| g.lock().unwrap().len()).collect::<Vec<_>>();
    let all = sim_with(Some(urls[0].clone()), |c| c.fanout = urls[1..].to_vec()).await;
    queue_job(&all, json!({"repo": "octo-org/app", "labels": ["x"]})).await;
    wait_for("one delivery to each", async || (counts() == [1, 1, 1]).then_some(())).await;
    drop(all);
    let two = sim_with(Some(urls[0].clone()), |c| {
        c.fanout = urls[1..].to_vec();
        c.fanout_each = Some(2);
    })
    .await;
    for _ in 0..3 {
        queue_job(&two, json!({"repo": "octo-org/app", "labels": ["x"]})).await;
    }
    // Three deliveries, two URLs each, starting one further each time: 0+1, 1+2, 2+0.
    wait_for("two URLs each, in turn", async || (counts() == [3, 3, 3]).then_some(())).await;
    let guids = |i: usize| -> Vec<String> {
        receivers[i].1.lock().unwrap()[1..]
            .iter()
            .map(|r| r.headers["x-github-delivery"].to_str().unwrap().into())
            .collect()
    };
    let (a, b, c) = (guids(0), guids(1), guids(2));
    assert_eq!(
        (a[0].clone(), b[1].clone(), c[1].clone()),
        (b[0].clone(), c[0].clone(), a[1].clone()),
        "{a:?} {b:?} {c:?}"
    );
    drop(two);
    // Several deliveries in flight at once: all of them arrive, each once per URL.
    let concurrent = sim_with(Some(urls[0].clone()), |c| {
        c.fanout = urls[1..].to_vec();
        c.webhook_concurrency = 4;
    })
    .await;
    for _ in 0..10 {
        queue_job(&concurrent, json!({"repo": "octo-org/app", "labels": ["x"]})).await;
    }
    wait_for("ten more to each", async || (counts() == [13, 13, 13]).then_some(())).await;
}

#[tokio::test]
async fn cancelling_a_queued_job_completes_it_with_null_runner() {
    let (url, got) = receiver(StatusCode::OK).await;
    let sim = sim_with(Some(url), |_| {}).await;
    let job = queue_job(&sim, json!({"repo": "octo-org/app", "labels": ["x"]})).await;
    let r = client().post(format!("{}/_sim/jobs/{job}/cancel", sim.url())).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let second = wait_for("completed", async || got.lock().unwrap().get(1).cloned()).await;
    let v: Value = serde_json::from_slice(&second.body).unwrap();
    assert_eq!(v["action"], "completed");
    assert_eq!(v["workflow_job"]["conclusion"], "cancelled");
    assert!(v["workflow_job"]["runner_name"].is_null());
    let r = client().post(format!("{}/_sim/jobs/{job}/cancel", sim.url())).send().await.unwrap();
    assert_eq!(r.status(), 409);
    let r = client().post(format!("{}/_sim/jobs", sim.url())).body("{\"repo\":1}").send().await.unwrap();
    assert_eq!(r.status(), 422);
    let r = client()
        .post(format!("{}/_sim/jobs", sim.url()))
        .json(&json!({"repo": "noslash", "labels": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    // The queued-runs API lists it as completed now.
    let r = api(&sim, reqwest::Method::GET, "/repos/octo-org/app/actions/runs?status=queued", None).await;
    assert_eq!(r.json::<Value>().await.unwrap()["total_count"], 0);
}

/// The fake runner of the test image, copied to a temp dir (removed with the guard) and
/// run on the host.
fn fake_runner_dir() -> (tempfile::TempDir, PathBuf) {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images/test/files/opt/actions-runner");
    let tmp = tempdir();
    let dst = tmp.path().join("actions-runner");
    assert!(Command::new("cp").arg("-a").arg(&src).arg(&dst).status().unwrap().success());
    (tmp, dst)
}

async fn run_script(dir: &std::path::Path, script: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(dir.join(script)).args(args).env("RUNNER_ALLOW_RUNASROOT", "1").output().await.unwrap()
}

#[tokio::test]
async fn fake_runner_token_mode_runs_one_job_and_is_removed() {
    let (url, got) = receiver(StatusCode::OK).await;
    let sim = sim_with(Some(url), |_| {}).await;
    let (_tmp, dir) = fake_runner_dir();
    let r = api(&sim, reqwest::Method::POST, "/repos/octo-org/app/actions/runners/registration-token", None).await;
    let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_string();
    let job =
        queue_job(&sim, json!({"repo": "octo-org/app", "labels": ["self-hosted", "linux"], "duration_secs": 1})).await;
    let other_repo = queue_job(&sim, json!({"repo": "octo-org/web", "labels": ["self-hosted", "linux"]})).await;

    let bad = run_script(
        &dir,
        "config.sh",
        &["--url", &format!("{}/octo-org/app", sim.url()), "--token", "WRONG", "--unattended"],
    )
    .await;
    assert!(!bad.status.success(), "bad token must fail");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("404"));

    let out = run_script(
        &dir,
        "config.sh",
        &[
            "--url",
            &format!("{}/octo-org/app", sim.url()),
            "--token",
            &token,
            "--name",
            "runner-1",
            "--labels",
            "self-hosted,linux",
            "--no-default-labels",
            "--ephemeral",
            "--unattended",
            "--disableupdate",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run_script(&dir, "run.sh", &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("completed with result: Succeeded"), "{stdout}");

    let j: Value = client().get(format!("{}/_sim/jobs/{job}", sim.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(j["status"], "completed");
    assert_eq!(j["runner_name"], "runner-1");
    let o: Value =
        client().get(format!("{}/_sim/jobs/{other_repo}", sim.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(o["status"], "queued", "a repo runner does not take another repo's job");
    let runners: Value =
        client().get(format!("{}/_sim/runners", sim.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(runners.as_array().unwrap().len(), 0, "ephemeral runner removed after its job");
    let actions = wait_for("3 deliveries", async || {
        let g = got.lock().unwrap();
        let actions: Vec<String> = g
            .iter()
            .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap())
            .filter(|v| v["workflow_job"]["id"] == job)
            .map(|v| v["action"].as_str().unwrap().to_string())
            .collect();
        (actions.len() == 3).then_some(actions)
    })
    .await;
    assert_eq!(actions, ["queued", "in_progress", "completed"]);
    // Unconfigured run.sh fails with the real runner's message.
    let (_tmp, fresh) = fake_runner_dir();
    let out = run_script(&fresh, "run.sh", &[]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Not configured"));
}

#[tokio::test]
async fn fake_runner_jit_mode_and_refusals() {
    let sim = sim_with(None, |_| {}).await;
    let (_tmp, dir) = fake_runner_dir();
    let job =
        queue_job(&sim, json!({"repo": "octo-org/app", "labels": ["self-hosted", "gpu"], "script": "exit 3"})).await;
    let r = api(
        &sim,
        reqwest::Method::POST,
        "/orgs/octo-org/actions/runners/generate-jitconfig",
        Some(json!({
            "name": "jit-1", "runner_group_id": 1, "labels": ["self-hosted", "GPU"]
        })),
    )
    .await;
    let v: Value = r.json().await.unwrap();
    let encoded = v["encoded_jit_config"].as_str().unwrap().to_string();
    let out = tokio::process::Command::new(dir.join("run.sh")).args(["--jitconfig", &encoded]).output().await.unwrap();
    assert!(!out.status.success(), "refuses root without RUNNER_ALLOW_RUNASROOT");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Must not run with sudo"));
    let out = run_script(&dir, "run.sh", &["--jitconfig", "bm90IGpzb24="]).await;
    assert!(!out.status.success());
    let out = run_script(&dir, "run.sh", &["--jitconfig", &encoded]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: Value = client().get(format!("{}/_sim/jobs/{job}", sim.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(j["conclusion"], "failure", "script exit status decides the conclusion");
    // A deleted JIT runner's credential no longer works.
    let r = api(
        &sim,
        reqwest::Method::POST,
        "/orgs/octo-org/actions/runners/generate-jitconfig",
        Some(json!({
            "name": "jit-2", "runner_group_id": 1, "labels": ["self-hosted"]
        })),
    )
    .await;
    let v: Value = r.json().await.unwrap();
    let id = v["runner"]["id"].as_u64().unwrap();
    api(&sim, reqwest::Method::DELETE, &format!("/orgs/octo-org/actions/runners/{id}"), None).await;
    let out =
        run_script(&fake_runner_dir().1, "run.sh", &["--jitconfig", v["encoded_jit_config"].as_str().unwrap()]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("deleted"));
}

//! Fleet mode against a real PostgreSQL (`scripts/test-postgres` starts one on loopback):
//! the schema's migrations, the intake's writes before the answer, the job rows as members
//! read them, claims and leads. No VM: this is the shared queue alone.

mod common;

use std::time::{Duration, SystemTime};

use common::pg::TestDb;
use runnervisor::fleet::claims::{Claims, JobRow, PgClaims, ReadQuery};
use runnervisor::fleet::{FleetError, intake, schema};
use runnervisor::model::{JobAction, JobEvent, JobInfo};

fn event(delivery: &str, job: u64, action: JobAction) -> JobEvent {
    JobEvent {
        delivery: delivery.into(),
        action,
        job: JobInfo {
            id: job,
            run_id: job * 10,
            run_attempt: 1,
            name: "build".into(),
            workflow_name: "CI".into(),
            labels: vec!["self-hosted".into(), "linux".into()],
            repository: "octo-org/app".into(),
            html_url: format!("https://github.com/octo-org/app/actions/runs/{}/job/{job}", job * 10),
            runner_name: None,
            conclusion: None,
            scale_set: None,
        },
        received_at: SystemTime::now(),
    }
}

/// Member `host`'s heartbeat: one place, nothing running, its number not given yet.
fn member(host: &str) -> runnervisor::fleet::claims::MemberInfo {
    runnervisor::fleet::claims::MemberInfo {
        host_id: host.into(),
        max_vms: 1,
        vms: 0,
        warm_waiting: 0,
        warm_target: 0,
        held: 0,
        version: "test".into(),
        seen_secs_ago: 0,
        addresses: vec![],
        number: None,
        scale_sets: Default::default(),
    }
}

async fn migrated(tag: &str) -> TestDb {
    let db = TestDb::new(tag).await;
    schema::migrate(&mut db.connect().await).await.unwrap();
    db
}

#[tokio::test(flavor = "multi_thread")]
async fn members_starting_together_migrate_once_and_a_newer_schema_is_refused() {
    let db = TestDb::new("migrate").await;
    let mut runs = Vec::new();
    for _ in 0..4 {
        let mut client = db.connect().await;
        runs.push(tokio::spawn(async move { schema::migrate(&mut client).await.unwrap() }));
    }
    let mut applied = Vec::new();
    for r in runs {
        applied.extend(r.await.unwrap());
    }
    assert_eq!(applied, (1..=schema::latest()).collect::<Vec<_>>(), "each version applied once");
    let mut client = db.connect().await;
    assert_eq!(schema::version(&client).await.unwrap(), schema::latest());
    assert!(schema::migrate(&mut client).await.unwrap().is_empty(), "current: nothing to do");
    // A database a newer agent migrated: refused, not touched.
    client.execute("INSERT INTO rv_schema (version) VALUES ($1)", &[&(schema::latest() + 1)]).await.unwrap();
    match schema::migrate(&mut client).await {
        Err(e @ FleetError::SchemaTooNew { .. }) => assert!(e.to_string().contains("upgrade the agent"), "{e}"),
        other => panic!("{other:?}"),
    }
}

/// One group written at once (deliveries arriving while the writer was busy): the first
/// of each delivery id not seen before is fresh, and each job's row moves to the furthest
/// of its fresh events, the first among equals.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_of_deliveries_is_written_as_the_events_one_at_a_time_would_be() {
    let db = migrated("group").await;
    let pool = db.pool(1);
    intake::FleetIntake::start(pool.clone(), None).accept(event("seen", 4, JobAction::InProgress)).await.unwrap();
    let group = [
        event("q1", 1, JobAction::Queued),
        event("p1", 1, JobAction::InProgress),
        event("p1", 1, JobAction::Completed), // the same id again: not fresh
        event("q1b", 1, JobAction::Queued),
        event("q2", 2, JobAction::Queued),
        event("c3", 3, JobAction::Completed),
        event("p3", 3, JobAction::InProgress),
        event("seen", 4, JobAction::Completed), // seen before this group
        event("q4", 4, JobAction::Queued),      // behind the row's in progress
    ];
    let refs: Vec<&JobEvent> = group.iter().collect();
    let (fresh, claimed) = intake::write(&pool, &refs, None).await.unwrap();
    assert_eq!(fresh, [true, true, false, true, true, true, true, false, true]);
    assert!(claimed.is_empty());
    let c = db.connect().await;
    let rows: Vec<(i64, String, String)> = c
        .query("SELECT id, state, info->>'name' FROM rv_jobs ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let row = |id: i64, state: &str, name: &str| (id, state.to_string(), name.to_string());
    assert_eq!(
        rows,
        [
            row(1, "in_progress", "build"),
            row(2, "queued", "build"),
            row(3, "completed", "build"),
            row(4, "in_progress", "build")
        ]
    );
    // Of two fresh events as far along, the first makes the row.
    let (fresh, _) = intake::write(
        &pool,
        &[&event("q5a", 5, JobAction::Queued), &{
            let mut e = event("q5b", 5, JobAction::Queued);
            e.job.name = "later".into();
            e
        }],
        None,
    )
    .await
    .unwrap();
    assert_eq!(fresh, [true, true]);
    let name: String = c.query_one("SELECT info->>'name' FROM rv_jobs WHERE id = 5", &[]).await.unwrap().get(0);
    assert_eq!(name, "build");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_intake_accepts_each_delivery_once_fleet_wide_and_jobs_only_move_forward() {
    let db = migrated("intake").await;
    // Two members' intakes on one database: GitHub (or a relay) may send to either.
    let (a, b) = (intake::FleetIntake::start(db.pool(4), None), intake::FleetIntake::start(db.pool(4), None));
    let mut calls = Vec::new();
    for i in 0..200u64 {
        // Every tenth delivery is also sent to the other member.
        let e = event(&format!("d{i}"), 1000 + i, JobAction::Queued);
        let first = if i % 2 == 0 { a.clone() } else { b.clone() };
        calls.push(tokio::spawn({
            let e = e.clone();
            async move { first.accept(e).await.unwrap() }
        }));
        if i % 10 == 0 {
            let other = if i % 2 == 0 { b.clone() } else { a.clone() };
            calls.push(tokio::spawn(async move { other.accept(e).await.unwrap() }));
        }
    }
    let mut fresh = 0;
    for c in calls {
        fresh += c.await.unwrap() as usize;
    }
    assert_eq!(fresh, 200, "220 deliveries, 200 delivery ids");
    let client = db.connect().await;
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    assert_eq!(count("SELECT count(*) FROM rv_jobs WHERE state = 'queued' AND info IS NOT NULL").await, 200);

    // Completed, then a late in_progress and a late queued (new delivery ids): the row
    // stays completed, with the completed event's job.
    let mut done = event("late-1", 1000, JobAction::Completed);
    (done.job.runner_name, done.job.conclusion) = (Some("rv-small-1000".into()), Some("success".into()));
    assert!(a.accept(done.clone()).await.unwrap());
    assert!(b.accept(event("late-2", 1000, JobAction::InProgress)).await.unwrap());
    assert!(a.accept(event("late-3", 1000, JobAction::Queued)).await.unwrap());
    let row = client.query_one("SELECT state, info, runner_name FROM rv_jobs WHERE id = 1000", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "completed");
    assert_eq!(serde_json::from_value::<JobInfo>(row.get(1)).unwrap(), done.job);
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("rv-small-1000"));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_postgres_a_delivery_is_refused_not_accepted() {
    // Nothing listens on port 9 of loopback: the connection is refused at once.
    let mut config = common::pg::config("postgres");
    config.port(9);
    let pool = runnervisor::fleet::pool(config, runnervisor::fleet::tls(None).unwrap(), 2).unwrap();
    let intake = intake::FleetIntake::start(pool, None);
    let started = std::time::Instant::now();
    let err = intake.accept(event("d1", 1, JobAction::Queued)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert!(matches!(*err, FleetError::Db(_) | FleetError::Pool(_)), "{err:?}");
}

fn query(known: &[u64], runners: &[&str], ready: u32) -> ReadQuery {
    ReadQuery {
        // Pools match a job whose label set equals theirs, whatever the case and order.
        pools: vec![vec!["LINUX".into(), "self-hosted".into()], vec!["gpu".into()]],
        ready,
        known: known.to_vec(),
        runners: runners.iter().map(|r| r.to_string()).collect(),
    }
}

fn ids(rows: &[JobRow]) -> Vec<u64> {
    let mut ids: Vec<u64> = rows.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    ids
}

/// Found by an independent read of the mirror this replaced (issue 25, finding 1): event
/// sequence numbers were taken before commit, and a gap older than 10 s was passed for
/// good, so a transaction that committed later than that was never seen by any member.
/// The rows have no order to miss: a job is read once its writer commits, however late.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_writer_commits_late_is_read_all_the_same() {
    let db = migrated("late").await;
    let me = PgClaims::new(db.pool(2), "hv-a".into(), Duration::from_secs(60));
    // A writer that began before job 2's and commits after it (a paused client).
    let mut slow = db.connect().await;
    let tx = slow.transaction().await.unwrap();
    let info = serde_json::to_value(event("d1", 1, JobAction::Queued).job).unwrap();
    tx.execute(
        "INSERT INTO rv_jobs (id, state, rank, labels, repository, received_at, info, label_key) \
         VALUES (1, 'queued', 0, $1, 'octo-org/app', now(), $2, rv_label_key($1))",
        &[&vec!["self-hosted".to_string(), "linux".to_string()], &info],
    )
    .await
    .unwrap();
    let intake = intake::FleetIntake::start(db.pool(2), None);
    intake.accept(event("d2", 2, JobAction::Queued)).await.unwrap();
    assert_eq!(ids(&me.read(query(&[], &[], 10)).await.unwrap()), [2]);
    tx.commit().await.unwrap();
    let rows = me.read(query(&[2], &[], 10)).await.unwrap();
    assert_eq!(ids(&rows), [1, 2], "{rows:?}");
    let one = rows.iter().find(|r| r.id == 1).unwrap();
    assert_eq!((one.action, one.info.as_ref().map(|i| i.id), one.held_elsewhere), (JobAction::Queued, Some(1), None));
}

#[tokio::test(flavor = "multi_thread")]
async fn members_read_the_oldest_unheld_jobs_of_their_pools_and_the_jobs_they_know() {
    let db = migrated("read").await;
    let intake = intake::FleetIntake::start(db.pool(2), None);
    for i in 1..=5u64 {
        intake.accept(event(&format!("q{i}"), i, JobAction::Queued)).await.unwrap();
    }
    // Other label sets: a superset and another case of the same set.
    let mut more = event("q6", 6, JobAction::Queued);
    more.job.labels.push("gpu".into());
    intake.accept(more).await.unwrap();
    let mut cased = event("q7", 7, JobAction::Queued);
    cased.job.labels = vec!["Linux".into(), "SELF-HOSTED".into(), "linux".into()];
    intake.accept(cased).await.unwrap();
    let (a, b) = (
        PgClaims::new(db.pool(1), "hv-a".into(), Duration::from_secs(60)),
        PgClaims::new(db.pool(1), "hv-b".into(), Duration::from_secs(60)),
    );
    assert_eq!(ids(&a.read(query(&[], &[], 10)).await.unwrap()), [1, 2, 3, 4, 5, 7], "6's labels are no pool's");
    assert_eq!(ids(&a.read(query(&[], &[], 2)).await.unwrap()), [1, 2], "the oldest first");
    // b holds 1 and 2: a no longer reads them as ready, and reads them held if it knows them.
    assert_eq!(b.claim(vec![1, 2]).await.unwrap().len(), 2);
    let rows = a.read(query(&[2], &[], 2)).await.unwrap();
    assert_eq!(ids(&rows), [2, 3, 4]);
    let held = rows.iter().find(|r| r.id == 2).unwrap().held_elsewhere.expect("held by b");
    assert!(held > Duration::from_secs(50) && held <= Duration::from_secs(60), "{held:?}");
    assert!(b.read(query(&[2], &[], 0)).await.unwrap()[0].held_elsewhere.is_none(), "its own");
    // Job 3 runs on a's runner, then completes: a reads it by its runner's name.
    let mut run = event("r3", 3, JobAction::InProgress);
    run.job.runner_name = Some("rv-small-3".into());
    intake.accept(run.clone()).await.unwrap();
    let rows = a.read(query(&[], &["rv-small-3"], 0)).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].action, rows[0].info.clone()), (JobAction::InProgress, Some(run.job)));
    // A row whose job this agent cannot read (a newer agent's) comes without it.
    db.connect().await.execute("UPDATE rv_jobs SET info = '{\"id\": \"x\"}' WHERE id = 4", &[]).await.unwrap();
    let rows = a.read(query(&[4], &[], 0)).await.unwrap();
    assert_eq!((rows.len(), rows[0].info.is_none()), (1, true), "{rows:?}");
}

/// Found by an independent read (helper-61): the ready window was one for all of a
/// member's pools, so a pool whose jobs wait for room (at its max_vms, or its repository
/// cap) hid every other pool's newer jobs from every member, a dead member's among them,
/// until its backlog drained. Each pool's label set has a window of its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_pool_whose_jobs_wait_for_room_hides_no_other_pools_jobs() {
    let db = migrated("windows").await;
    queued_jobs(&db, 5).await;
    let intake = intake::FleetIntake::start(db.pool(2), None);
    let mut gpu = event("g9", 9, JobAction::Queued);
    gpu.job.labels = vec!["gpu".into()];
    intake.accept(gpu).await.unwrap();
    let a = PgClaims::new(db.pool(1), "hv-a".into(), Duration::from_secs(60));
    assert_eq!(ids(&a.read(query(&[], &[], 2)).await.unwrap()), [1, 2, 9], "the oldest two of each pool");
    // The same label set twice (two pools of one set) is one window.
    let mut twice = query(&[], &[], 2);
    twice.pools.push(vec!["self-hosted".into(), "linux".into()]);
    assert_eq!(ids(&a.read(twice).await.unwrap()), [1, 2, 9]);
}

/// A database an older agent wrote (schema 4, no job in the rows) gets its rows' jobs from
/// their events when migrated, so members read the jobs queued before the upgrade.
#[tokio::test(flavor = "multi_thread")]
async fn jobs_queued_before_the_rows_carried_their_job_are_read_after_the_upgrade() {
    let db = TestDb::new("upgrade").await;
    let client = db.connect().await;
    client
        .batch_execute(
            "CREATE TABLE rv_schema (version integer NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .unwrap();
    for (v, sql) in schema::MIGRATIONS.iter().filter(|(v, _)| *v <= 4) {
        client.batch_execute(sql).await.unwrap();
        client.execute("INSERT INTO rv_schema (version) VALUES ($1)", &[v]).await.unwrap();
    }
    let old = event("old", 41, JobAction::Queued);
    client
        .execute("INSERT INTO rv_events (job_id, event) VALUES (41, $1)", &[&serde_json::to_value(&old).unwrap()])
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO rv_jobs (id, state, rank, labels, repository, received_at) VALUES (41, 'queued', 0, $1, 'octo-org/app', now())",
            &[&old.job.labels],
        )
        .await
        .unwrap();
    assert!(schema::migrate(&mut db.connect().await).await.unwrap().contains(&5));
    let rows =
        PgClaims::new(db.pool(1), "hv-a".into(), Duration::from_secs(60)).read(query(&[], &[], 10)).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].info.as_ref(), Some(&old.job));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_is_woken_by_each_job_left_to_claim_and_by_nothing_else() {
    use std::sync::{Arc, Mutex};
    let db = migrated("listen").await;
    let woken = Arc::new(tokio::sync::Notify::new());
    let heard: Arc<Mutex<Vec<String>>> = Arc::default();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let tls = runnervisor::fleet::tls(None).unwrap();
    let (w, h) = (woken.clone(), heard.clone());
    let joined = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let task = tokio::spawn(runnervisor::fleet::listen(
        db.config(),
        tls,
        ("hv-listen".into(), Duration::from_secs(60)),
        joined.clone(),
        move |payload: String| {
            h.lock().unwrap().push(payload);
            w.notify_one()
        },
        shutdown.clone(),
    ));
    let next = || async {
        let got = tokio::time::timeout(Duration::from_secs(10), woken.notified()).await;
        let heard = heard.lock().unwrap().clone();
        assert!(got.is_ok(), "not woken; heard so far: {heard:?}");
        heard
    };
    // Once connected, holding the member's lock.
    assert_eq!(next().await, [""], "woken when listening");
    assert!(joined.load(std::sync::atomic::Ordering::Acquire));
    let intake = intake::FleetIntake::start(db.pool(2), None);
    for i in 0..3u64 {
        intake.accept(event(&format!("d{i}"), i, JobAction::Queued)).await.unwrap();
        assert_eq!(next().await.len(), 2 + i as usize);
    }
    // Jobs moving on (a runner named or not) and a job claimed as it is written wake no
    // one. (Notifications come in commit order: had any of these woken the member, it would
    // have been before the next one's.)
    intake.accept(event("p0", 0, JobAction::InProgress)).await.unwrap();
    intake.accept(event("c1", 1, JobAction::Completed)).await.unwrap();
    let reserve = Arc::new(intake::Reserve::default());
    let labels = runnervisor::model::label_set(&event("x", 0, JobAction::Queued).job.labels);
    reserve.set(std::collections::BTreeMap::from([(labels, 1)]));
    let on_write =
        intake::OnWrite { host: "hv-other".into(), lease: Duration::from_secs(60), reserve, claimed: Box::new(|_| {}) };
    let claiming = intake::FleetIntake::start(db.pool(1), Some(on_write));
    claiming.accept(event("d8", 8, JobAction::Queued)).await.unwrap();
    let mut took = event("p2", 2, JobAction::InProgress);
    took.job.runner_name = Some("rv-small-2-1".into());
    intake.accept(took).await.unwrap();
    intake.accept(event("d9", 9, JobAction::Queued)).await.unwrap();
    assert_eq!(next().await, ["", "", "", "", ""], "only job 9 was left to claim");
    // A claim given back while its job is queued leaves it to claim; one given back once
    // its job moved on does not.
    let other = PgClaims::new(db.pool(1), "hv-other".into(), Duration::from_secs(60));
    assert_eq!(other.claim(vec![9]).await.unwrap().len(), 1);
    intake.accept(event("p9", 9, JobAction::InProgress)).await.unwrap();
    other.release(vec![(9, 1)]).await.unwrap();
    other.release(vec![(8, 1)]).await.unwrap();
    assert_eq!(next().await.len(), 6, "woken by the release of job 8 only");
    assert_eq!(heard.lock().unwrap().last().map(String::as_str), Some(""));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("stops").unwrap().unwrap();
}

/// Jobs rows as the intake makes them, `n` queued jobs from 1.
async fn queued_jobs(db: &TestDb, n: u64) {
    let intake = intake::FleetIntake::start(db.pool(2), None);
    for i in 1..=n {
        intake.accept(event(&format!("q{i}"), i, JobAction::Queued)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn members_claiming_together_never_win_the_same_job() {
    let db = migrated("claims").await;
    queued_jobs(&db, 200).await;
    let all: Vec<u64> = (1..=200).collect();
    let members: Vec<PgClaims> =
        (0..8).map(|i| PgClaims::new(db.pool(1), format!("hv-{i}"), Duration::from_secs(60))).collect();
    let rounds: Vec<_> = members.iter().map(|m| m.claim(all.clone())).collect();
    let mut won: Vec<u64> = Vec::new();
    for r in futures_util::future::join_all(rounds).await {
        won.extend(r.unwrap().into_iter().map(|c| {
            assert_eq!((c.attempt, c.taken_over_from), (1, None));
            c.job
        }));
    }
    won.sort_unstable();
    assert_eq!(won, all, "every job claimed exactly once by 8 members claiming at once");
    // Renewal keeps only one's own; release frees them for another.
    let mine: Vec<u64> = {
        let rows = db.connect().await.query("SELECT id FROM rv_jobs WHERE holder = 'hv-0'", &[]).await.unwrap();
        rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect()
    };
    let renewed = members[0].renew(all.iter().map(|j| (*j, 1)).collect()).await.unwrap();
    assert_eq!(renewed.len(), mine.len());
    members[0].release(mine.iter().map(|j| (*j, 1)).collect()).await.unwrap();
    let again = members[1].claim(mine.clone()).await.unwrap();
    assert_eq!(again.len(), mine.len());
    assert!(again.iter().all(|c| c.attempt == 2 && c.taken_over_from.is_none()), "released, not taken over");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_whose_lease_ran_out_is_taken_over_and_a_served_job_is_not_claimed() {
    let db = migrated("lease").await;
    queued_jobs(&db, 2).await;
    let short = PgClaims::new(db.pool(1), "hv-gone".into(), Duration::from_millis(300));
    let other = PgClaims::new(db.pool(1), "hv-other".into(), Duration::from_secs(60));
    assert_eq!(short.claim(vec![1, 2]).await.unwrap().len(), 2);
    assert!(other.claim(vec![1, 2]).await.unwrap().is_empty(), "held");
    // Job 2 starts running (its webhook): no longer claimable by anyone.
    intake::FleetIntake::start(db.pool(1), None).accept(event("q2-run", 2, JobAction::InProgress)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let taken = other.claim(vec![1, 2]).await.unwrap();
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!((taken[0].job, taken[0].attempt, taken[0].taken_over_from.as_deref()), (1, 2, Some("hv-gone")));
    assert!(short.renew(vec![(1, 1)]).await.unwrap().is_empty(), "the old holder's renewal fails: it lost the job");
}

/// The attempt is the claim's epoch: a renewal or release of an earlier claim of a job
/// taken again since (by the same member too: a restart, a second VM) touches nothing,
/// and an adopted claim (attempt 0) learns which it is.
#[tokio::test(flavor = "multi_thread")]
async fn renewal_and_release_act_only_on_the_claim_they_name() {
    let db = migrated("epoch").await;
    queued_jobs(&db, 1).await;
    let a = PgClaims::new(db.pool(1), "hv-a".into(), Duration::from_secs(60));
    assert_eq!(a.claim(vec![1]).await.unwrap()[0].attempt, 1);
    assert_eq!(a.claim(vec![1]).await.unwrap()[0].attempt, 2, "taken again");
    assert!(a.renew(vec![(1, 1)]).await.unwrap().is_empty(), "the earlier claim is not renewed");
    assert_eq!(a.renew(vec![(1, 2)]).await.unwrap(), [(1, 2)]);
    assert_eq!(a.renew(vec![(1, 0)]).await.unwrap(), [(1, 2)], "adopted: learns its attempt");
    a.release(vec![(1, 1)]).await.unwrap();
    let c = db.connect().await;
    let holder = "SELECT holder FROM rv_jobs WHERE id = 1";
    let h: Option<String> = c.query_one(holder, &[]).await.unwrap().get(0);
    assert_eq!(h.as_deref(), Some("hv-a"), "the earlier claim's release leaves the later one");
    a.release(vec![(1, 2)]).await.unwrap();
    assert_eq!(c.query_one(holder, &[]).await.unwrap().get::<_, Option<String>>(0), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_member_leads_the_fleets_github_work_until_its_lease_runs_out_and_shares_the_runner_list() {
    let db = migrated("lead").await;
    let a = PgClaims::new(db.pool(1), "hv-a".into(), Duration::from_millis(300));
    let b = PgClaims::new(db.pool(1), "hv-b".into(), Duration::from_millis(300));
    assert!(a.lead("github").await.unwrap());
    assert!(!b.lead("github").await.unwrap(), "a leads");
    assert!(a.lead("github").await.unwrap(), "renewed");
    assert!(b.lead("other").await.unwrap(), "leads are per work");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(b.lead("github").await.unwrap(), "a stopped renewing: b takes over");
    assert!(!a.lead("github").await.unwrap());
    // The lead shares the runner list as of when it began listing (a runner that came up
    // during a long, paginated listing is missing from it); the others read it with its age.
    assert_eq!(a.runners().await.unwrap(), None, "nothing shared yet");
    let list = vec![runnervisor::github::RunnerInfo { id: 7, name: "rv-p-1".into(), online: true, busy: false }];
    let ago = |secs| tokio::time::Instant::now() - Duration::from_secs(secs);
    assert!(!a.publish_runners(list.clone(), ago(0)).await.unwrap(), "a lost the lead while listing");
    assert_eq!(a.runners().await.unwrap(), None, "so its list is not shared");
    assert!(b.lead("github").await.unwrap());
    assert!(b.publish_runners(list.clone(), ago(3)).await.unwrap());
    let (read, age) = a.runners().await.unwrap().unwrap();
    assert_eq!(read, list);
    assert!(age >= Duration::from_secs(3) && age < Duration::from_secs(8), "as old as the listing: {age:?}");
    assert!(!b.publish_runners(Vec::new(), ago(60)).await.unwrap(), "an older listing");
    assert_eq!(a.runners().await.unwrap().unwrap().0, list, "does not replace a newer one");
    assert!(b.publish_runners(Vec::new(), ago(0)).await.unwrap());
    assert_eq!(a.runners().await.unwrap().unwrap().0, vec![], "replaced whole");
    // How far the lead read the delivery log: kept for the next lead, set only by the lead,
    // never moved back.
    let t = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs);
    assert_eq!(b.deliveries_checked().await.unwrap(), None);
    b.check_deliveries(t(10)).await.unwrap();
    a.check_deliveries(t(20)).await.unwrap();
    assert_eq!(a.deliveries_checked().await.unwrap(), Some(t(10)), "only the lead (b) records it");
    b.check_deliveries(t(5)).await.unwrap();
    assert_eq!(a.deliveries_checked().await.unwrap(), Some(t(10)), "never back");
}

/// Members sharing a libvirtd name their warm VMs and slots with their number: the
/// database gives each its own (a hash of 20 host ids into 1,000 values collides one time
/// in six), keeps it by host id, and gives a long-gone member's back once none is free.
#[tokio::test(flavor = "multi_thread")]
async fn each_member_is_given_a_number_of_its_own_and_keeps_it() {
    use runnervisor::fleet::claims::MemberInfo;
    let db = migrated("numbers").await;
    let me = member;
    let number = |members: &[MemberInfo], host: &str| members.iter().find(|m| m.host_id == host).and_then(|m| m.number);
    // Twenty members join at once.
    let joins = (0..20).map(|i| {
        let claims = PgClaims::new(db.pool(1), format!("hv-{i}"), Duration::from_secs(60));
        let info = me(&format!("hv-{i}"));
        async move {
            // Two given the same number at once: the later heartbeat is refused, the next
            // one is given another.
            loop {
                if let Ok(m) = claims.heartbeat(info.clone()).await
                    && let Some(n) = number(&m, &info.host_id)
                {
                    return n;
                }
            }
        }
    });
    let given = futures_util::future::join_all(joins).await;
    let mut numbers = given.clone();
    numbers.sort();
    assert_eq!(numbers, (0..20).collect::<Vec<u32>>(), "each its own, the lowest free");
    let a = PgClaims::new(db.pool(1), "hv-3".into(), Duration::from_secs(60));
    assert_eq!(number(&a.heartbeat(me("hv-3")).await.unwrap(), "hv-3"), Some(given[3]), "kept");
    // A member gone for 30 days keeps its number while others are free.
    let c = db.connect().await;
    c.execute("UPDATE rv_members SET seen_at = now() - interval '31 days' WHERE host_id = 'hv-5'", &[]).await.unwrap();
    let new = PgClaims::new(db.pool(1), "hv-new".into(), Duration::from_secs(60));
    assert_eq!(number(&new.heartbeat(me("hv-new")).await.unwrap(), "hv-new"), Some(20), "the lowest free");
    let kept: Option<i32> =
        c.query_one("SELECT number FROM rv_members WHERE host_id = 'hv-5'", &[]).await.unwrap().get(0);
    assert_eq!(kept, Some(given[5] as i32), "a long-gone member's number is not taken while others are free");
    c.execute("UPDATE rv_members SET seen_at = now() WHERE host_id = 'hv-5'", &[]).await.unwrap();
    // The fleet is full: a newcomer takes the number of a member gone for 30 days.
    c.execute(
        "INSERT INTO rv_members (host_id, max_vms, vms, warm_waiting, held, version, number) \
         SELECT 'filler-' || n, 0, 0, 0, 0, 'x', n FROM generate_series(21, 999) n",
        &[],
    )
    .await
    .unwrap();
    let late = PgClaims::new(db.pool(1), "hv-late".into(), Duration::from_secs(60));
    assert_eq!(number(&late.heartbeat(me("hv-late")).await.unwrap(), "hv-late"), None, "none free");
    c.execute("UPDATE rv_members SET seen_at = now() - interval '32 days' WHERE host_id = 'filler-500'", &[])
        .await
        .unwrap();
    assert_eq!(number(&late.heartbeat(me("hv-late")).await.unwrap(), "hv-late"), Some(500), "a long-gone member's");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_the_database_its_schema_and_what_is_wrong() {
    let db = TestDb::new("check").await;
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("pg-password");
    std::fs::write(&password, common::pg::password()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = common::pg::port();
    let fleet = |url: String| runnervisor::config::FleetConfig {
        host_id: Some("hv-check".into()),
        postgres: runnervisor::config::PostgresConfig {
            url,
            password: Some(runnervisor::secret::SecretSource::File(password.clone())),
            ca_file: None,
            max_connections: 1,
        },
        lease: Duration::from_secs(60),
        cold_head_start: Duration::from_secs(1),
    };
    let good = fleet(format!("postgres://{}@127.0.0.1:{port}/{}?sslmode=disable", common::pg::ROLE, db.name));
    let line = runnervisor::check::check_fleet(&good, None).await;
    assert!(line.ok && line.detail.contains("no schema yet") && line.detail.contains("hv-check"), "{line:?}");
    schema::migrate(&mut db.connect().await).await.unwrap();
    let line = runnervisor::check::check_fleet(&good, None).await;
    assert!(line.ok && line.detail.contains(&format!("schema version {}", schema::latest())), "{line:?}");
    // Every table the agent writes is checked: the shared runner list and the members too;
    // and the tables the lead prunes for DELETE.
    for (table, privilege) in [("rv_runner_list", "UPDATE"), ("rv_members", "UPDATE"), ("rv_jobs", "DELETE")] {
        let c = db.connect().await;
        c.batch_execute(&format!("REVOKE {privilege} ON {table} FROM {}", common::pg::ROLE)).await.unwrap();
        let line = runnervisor::check::check_fleet(&good, None).await;
        assert!(!line.ok && line.detail.contains(&format!("{privilege} on {table}")), "{line:?}");
        c.batch_execute(&format!("GRANT {privilege} ON {table} TO {}", common::pg::ROLE)).await.unwrap();
    }
    // Nobody listens there: a clear failure with a fix, no password in it.
    let line =
        runnervisor::check::check_fleet(&fleet(format!("postgres://rv@127.0.0.1:9/{}?sslmode=disable", db.name)), None)
            .await;
    assert!(!line.ok && line.fix.is_some() && line.detail.contains("127.0.0.1:9"), "{line:?}");
    assert!(!line.detail.contains(&common::pg::password()));
}

mod in_process {
    //! Members as the binary runs them (`run()`), with the fake GitHub and fake
    //! hypervisors, real HTTP and a real PostgreSQL: webhooks to any member, each job one VM
    //! in the fleet; a member without its database answers 503.

    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use runnervisor::admin;
    use runnervisor::github::fake::FakeGitHub;

    use super::common::inproc::{self, Agent as Member};

    /// A fleet member named `host` (lease 12 s, no head start) on the database `pg`.
    async fn start(host: &str, pg: tokio_postgres::Config, gh: Arc<FakeGitHub>) -> Member {
        let fleet = format!(
            "[fleet]\nhost_id = \"{host}\"\nlease = \"12s\"\ncold_head_start = \"0s\"\n\
             postgres = {{ url = \"postgres://127.0.0.1/unused\" }}"
        );
        let pool = runnervisor::fleet::pool(pg.clone(), runnervisor::fleet::tls(None).unwrap(), 4).unwrap();
        inproc::start(&fleet, gh, Some((pg, pool))).await
    }

    /// Each job id with the members' VMs made for it.
    async fn vms_by_job(members: &[&Member]) -> BTreeMap<u64, Vec<String>> {
        let mut by_job: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for m in members {
            for v in m.status().await.map(|s| s.vms).unwrap_or_default() {
                by_job.entry(v.job_id).or_default().push(v.name);
            }
        }
        by_job
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn webhooks_to_any_member_give_each_job_one_vm_in_the_fleet() {
        let db = super::migrated("inproc").await;
        let gh = Arc::new(FakeGitHub::default());
        let a = start("hv-a", db.config(), gh.clone()).await;
        let b = start("hv-b", db.config(), gh.clone()).await;
        // Jobs 1-4 go to a, 5 and 6 to b; jobs 1 and 5 to both (a relay sending to all).
        for id in 1..=6u64 {
            let delivery = format!("g-{id}");
            let first = if id <= 4 { &a } else { &b };
            assert_eq!(first.post(id, &delivery).await, 202, "job {id}");
            if id == 1 || id == 5 {
                let other = if id <= 4 { &b } else { &a };
                assert_eq!(other.post(id, &delivery).await, 200, "a duplicate, fleet-wide");
            }
        }
        // Two slots on each member: four jobs get one VM each; no job gets two; every
        // member knows its own jobs and the two nobody holds (another member's it knows
        // only if it read them before they were claimed: the rows it reads are the unheld
        // ones, the ones it knows and the ones its runners took).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let (mut seen, mut queued) = (BTreeMap::new(), Vec::new());
        while std::time::Instant::now() < deadline {
            seen = vms_by_job(&[&a, &b]).await;
            assert!(seen.values().all(|v| v.len() == 1), "one VM per job: {seen:?}");
            queued = Vec::new();
            for m in [&a, &b] {
                queued.push(m.status().await.map(|s| (s.vms.len(), s.pools[0].queued)).unwrap_or_default());
            }
            if seen.len() == 4 && queued.iter().all(|(vms, q)| *vms == 2 && *q >= 4) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(
            queued.iter().all(|(vms, q)| *vms == 2 && *q >= 4),
            "each member: two VMs, its jobs and the unheld ones: {queued:?}"
        );
        assert_eq!(a.hv.lock().started_total + b.hv.lock().started_total, 4, "no VM made and dropped");
        // `runnervisor status` shows the fleet: both members, their VMs and claims.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let fleet = loop {
            let f = a.status().await.and_then(|s| s.fleet).unwrap();
            if f.members.len() == 2 && f.members.iter().all(|m| m.vms == 2 && m.held == 2) {
                break f;
            }
            assert!(std::time::Instant::now() < deadline, "{f:#?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!((fleet.host_id.as_str(), fleet.held), ("hv-a", 2));
        let text = admin::render_status(&a.status().await.unwrap());
        assert!(text.contains("hv-a (this)") && text.contains("hv-b"), "{text}");
        let _ = a.stop().await;
        let _ = b.stop().await;
    }

    /// A second agent with a member's host id would claim, name VMs and renew as that
    /// member: it stops, naming the reason, and the member goes on. An agent finding a
    /// schema newer than it knows stops too (it would write rows it does not understand).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_with_a_members_host_id_or_facing_a_newer_schema_stops_with_the_reason() {
        use runnervisor::fleet::FleetError;
        let db = super::migrated("identity").await;
        let gh = Arc::new(FakeGitHub::default());
        let a = start("hv-same", db.config(), gh.clone()).await;
        let joined =
            |s: &admin::Status| s.fleet.as_ref().is_some_and(|f| f.members.iter().any(|m| m.host_id == "hv-same"));
        a.wait("a member", joined).await;
        let mut twin = start("hv-same", db.config(), gh.clone()).await;
        match twin.ended_within(Duration::from_secs(15)).await {
            Some(Err(runnervisor::RunError::Fleet(e @ FleetError::HostTaken { .. }))) => {
                assert!(e.to_string().contains("\"hv-same\"") && e.to_string().contains("its own host_id"), "{e}")
            }
            other => panic!("the twin did not stop for its host id: {other:?}"),
        }
        assert_eq!(a.post(1, "id-1").await, 202, "the member goes on");
        a.wait("its job served", |s| s.vms.iter().any(|v| v.job_id == 1)).await;
        let newer = runnervisor::fleet::schema::latest() + 1;
        db.connect().await.execute("INSERT INTO rv_schema (version) VALUES ($1)", &[&newer]).await.unwrap();
        let mut old = start("hv-old", db.config(), gh.clone()).await;
        match old.ended_within(Duration::from_secs(15)).await {
            Some(Err(runnervisor::RunError::Fleet(FleetError::SchemaTooNew { .. }))) => {}
            other => panic!("an agent older than the schema did not stop: {other:?}"),
        }
        let _ = a.stop().await;
    }

    /// Found by an independent read (helper-61): a member that took over a job whose
    /// holder went away, and learned at GitHub that it had been served, kept that to
    /// itself: the job's row stayed queued, and member after member took it over and asked
    /// again, for good. What it learns is the fleet's: the row is completed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_a_member_learns_of_a_taken_over_job_is_the_fleets() {
        let db = super::migrated("takeover").await;
        // Job 7, queued, held by a member that went away (its lease ran out).
        let intake = super::intake::FleetIntake::start(db.pool(2), None);
        intake.accept(super::event("g7", 7, super::JobAction::Queued)).await.unwrap();
        let gone = "UPDATE rv_jobs SET holder = 'hv-gone', attempts = 1, lease_until = now() - interval '1 second' WHERE id = 7";
        assert_eq!(db.connect().await.execute(gone, &[]).await.unwrap(), 1);
        let gh = Arc::new(FakeGitHub::default());
        let done = runnervisor::github::JobStatus {
            status: "completed".into(),
            conclusion: Some("success".into()),
            runner_name: Some("rv-small-7".into()),
        };
        gh.lock().jobs.insert(7, done);
        let b = start("hv-b", db.config(), gh.clone()).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let row = db.connect().await.query_one("SELECT state FROM rv_jobs WHERE id = 7", &[]).await.unwrap();
            if row.get::<_, String>(0) == "completed" {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the row is still {:?}", row.get::<_, String>(0));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(gh.lock().calls.iter().any(|c| c == "job"), "asked GitHub: {:?}", gh.lock().calls);
        assert_eq!(b.hv.lock().started_total, 0, "no VM for a served job");
        let _ = b.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_whose_database_is_away_answers_503() {
        let mut pg = super::common::pg::config("postgres");
        pg.port(9);
        let m = start("hv-lonely", pg, Arc::new(FakeGitHub::default())).await;
        assert_eq!(m.post(1, "g-1").await, 503);
        let _ = m.stop().await;
    }
}

/// A member's lock on its host id is refused while a live member holds it (a second agent
/// with that id), and taken from a session no live member has: the member's own previous
/// one (the server may keep it after a cut path), or any once no member with the host id
/// has written its heartbeat for a lease (an agent that died, its session not noticed
/// gone yet).
#[tokio::test(flavor = "multi_thread")]
async fn a_host_id_is_one_members_and_a_session_no_live_member_has_gives_it_back() {
    let db = migrated("join").await;
    let lease = Duration::from_secs(60);
    let join = |c, stale| runnervisor::fleet::join(c, "hv-x", stale, lease);
    let (first, twin) = (db.connect().await, db.connect().await);
    let (locked, first_pid) = join(&first, None).await.unwrap();
    assert!(locked);
    // hv-x is a live member: it wrote its heartbeat just now.
    first
        .execute(
            "INSERT INTO rv_members (host_id, max_vms, vms, warm_waiting, held, version) VALUES ('hv-x', 1, 0, 0, 0, 'x')",
            &[],
        )
        .await
        .unwrap();
    assert!(!join(&twin, None).await.unwrap().0, "held by a live member");
    assert!(runnervisor::fleet::join(&twin, "hv-y", None, lease).await.unwrap().0, "one lock per host id");
    // The member reconnects: its first session is still alive at the server.
    let again = db.connect().await;
    let (locked, _) = join(&again, Some(first_pid)).await.unwrap();
    assert!(locked, "taken back from its own previous session");
    assert!(first.query_one("SELECT 1", &[]).await.is_err(), "which was ended");
    assert!(!join(&twin, Some(first_pid)).await.unwrap().0, "a session gone is no claim on it");
    assert!(again.query_one("SELECT 1", &[]).await.is_ok(), "the holder is left alone");
    // No heartbeat of hv-x for a lease: whoever holds the lock is no live member.
    twin.execute("UPDATE rv_members SET seen_at = now() - interval '5 minutes' WHERE host_id = 'hv-x'", &[])
        .await
        .unwrap();
    assert!(join(&twin, None).await.unwrap().0, "taken from a member gone quiet");
    assert!(again.query_one("SELECT 1", &[]).await.is_err());
}

/// A migration waits at most 10 s for a lock (every member's statements would queue behind
/// it meanwhile): it fails, and is tried again once the lock is free; it has no statement
/// timeout of its own (large tables).
#[tokio::test(flavor = "multi_thread")]
async fn a_migration_gives_up_on_a_lock_held_long_and_succeeds_once_it_is_free() {
    let db = migrated("locktimeout").await;
    let latest = schema::latest();
    let c = db.connect().await;
    // Back to the version before the last (its one change undone).
    c.batch_execute(&format!(
        "ALTER TABLE rv_members DROP COLUMN scale_sets; DELETE FROM rv_schema WHERE version = {latest}"
    ))
    .await
    .unwrap();
    let mut holder = db.connect().await;
    let tx = holder.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE rv_members IN ACCESS SHARE MODE").await.unwrap();
    let started = std::time::Instant::now();
    let mut client = db.connect().await;
    let r = tokio::time::timeout(Duration::from_secs(60), schema::migrate(&mut client)).await.expect("it gives up");
    assert!(matches!(r, Err(FleetError::Migration { .. })), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    tx.rollback().await.unwrap();
    assert_eq!(schema::migrate(&mut client).await.unwrap(), vec![latest]);
}

/// The lead prunes in batches what the fleet no longer needs: finished jobs past a week,
/// delivery ids past the redelivery window, members gone half a year, the old log; what
/// is recent or unfinished stays.
#[tokio::test(flavor = "multi_thread")]
async fn pruning_removes_only_what_is_past_its_retention_a_batch_at_a_time() {
    use runnervisor::fleet::claims::retention::BATCH;
    let db = migrated("prune").await;
    let c = db.connect().await;
    c.batch_execute(&format!(
        "INSERT INTO rv_jobs (id, state, rank, labels, repository, received_at, updated_at) \
           SELECT n, 'completed', 2, '{{a}}', 'o/r', now(), now() - interval '8 days' FROM generate_series(1, {n}) n; \
         INSERT INTO rv_jobs (id, state, rank, labels, repository, received_at, updated_at) VALUES \
           (100001, 'completed', 2, '{{a}}', 'o/r', now(), now() - interval '6 days'), \
           (100002, 'queued', 0, '{{a}}', 'o/r', now() - interval '9 days', now() - interval '9 days'); \
         INSERT INTO rv_deliveries (guid, received_at) VALUES ('old', now() - interval '4 days'), ('new', now() - interval '2 days'); \
         INSERT INTO rv_members (host_id, max_vms, vms, warm_waiting, held, version, seen_at) VALUES \
           ('gone', 1, 0, 0, 0, 'x', now() - interval '181 days'), ('here', 1, 0, 0, 0, 'x', now() - interval '31 days'); \
         INSERT INTO rv_events (job_id, event) VALUES (1, '{{}}'), (2, '{{}}');",
        n = BATCH + 5
    ))
    .await
    .unwrap();
    let lead = PgClaims::new(db.pool(1), "hv-a".into(), Duration::from_secs(60));
    let first = lead.prune().await.unwrap();
    assert_eq!((first.jobs, first.deliveries, first.members, first.events), (BATCH as u64, 1, 1, 2));
    assert!(first.more(), "a full batch: more is left");
    let second = lead.prune().await.unwrap();
    assert_eq!(second.jobs, 5);
    assert!(!second.more());
    let left: Vec<i64> =
        c.query("SELECT id FROM rv_jobs ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(left, [100001, 100002], "a job finished 6 days ago and an unfinished one stay");
    let guids: Vec<String> =
        c.query("SELECT guid FROM rv_deliveries", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(guids, ["new"]);
    let members: Vec<String> =
        c.query("SELECT host_id FROM rv_members", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(members, ["here"]);
}

/// Claim on write: the member receiving a new queued job claims it in the transaction that
/// writes it, within the room its scheduler left (each claim counted until the scheduler
/// has it), never a job written before or held by another member, never a duplicate
/// delivery; room taken for a job it could not claim is given back.
#[tokio::test(flavor = "multi_thread")]
async fn a_member_claims_a_new_job_as_it_writes_it_within_its_room() {
    use intake::{ClaimedOnWrite, OnWrite, Reserve};
    use std::sync::{Arc, Mutex};
    let db = migrated("onwrite").await;
    let reserve = Arc::new(Reserve::default());
    let got: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let on_write = OnWrite {
        host: "hv-a".into(),
        lease: Duration::from_secs(60),
        reserve: reserve.clone(),
        claimed: Box::new({
            let got = got.clone();
            move |c: ClaimedOnWrite| got.lock().unwrap().push((c.event.job.id, c.attempt))
        }),
    };
    let a = intake::FleetIntake::start(db.pool(1), Some(on_write));
    let b = intake::FleetIntake::start(db.pool(1), None);
    let labels = runnervisor::model::label_set(&event("x", 0, JobAction::Queued).job.labels);
    // Job 1 was written by b before and b holds it: a's delivery of it (another id)
    // claims nothing.
    assert!(b.accept(event("b-1", 1, JobAction::Queued)).await.unwrap());
    let b_claims = PgClaims::new(db.pool(1), "hv-b".into(), Duration::from_secs(60));
    assert_eq!(b_claims.claim(vec![1]).await.unwrap().len(), 1);
    reserve.set(std::collections::BTreeMap::from([(labels.clone(), 2)]));
    assert!(a.accept(event("a-1", 1, JobAction::Queued)).await.unwrap());
    assert!(a.accept(event("a-2", 2, JobAction::Queued)).await.unwrap());
    assert!(a.accept(event("a-3", 3, JobAction::Queued)).await.unwrap());
    assert!(!a.accept(event("a-2", 2, JobAction::Queued)).await.unwrap(), "a duplicate");
    assert!(a.accept(event("a-4", 4, JobAction::Queued)).await.unwrap());
    assert_eq!(*got.lock().unwrap(), [(2, 1), (3, 1)], "job 1 is held (the room it took given back); room for two");
    // The scheduler has both claims, and its next pass sees room for one more.
    reserve.arrived(&labels);
    reserve.arrived(&labels);
    reserve.set(std::collections::BTreeMap::from([(labels.clone(), 1)]));
    assert!(a.accept(event("a-5", 5, JobAction::Queued)).await.unwrap());
    assert!(a.accept(event("a-6", 6, JobAction::Queued)).await.unwrap());
    assert_eq!(*got.lock().unwrap(), [(2, 1), (3, 1), (5, 1)]);
    let c = db.connect().await;
    let held: Vec<(i64, Option<String>, i32, bool)> = c
        .query("SELECT id, holder, attempts, first_claimed_at IS NOT NULL FROM rv_jobs ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let a_ = Some("hv-a".to_string());
    assert_eq!(
        held,
        [
            (1, Some("hv-b".into()), 1, true),
            (2, a_.clone(), 1, true),
            (3, a_.clone(), 1, true),
            (4, None, 0, false),
            (5, a_, 1, true),
            (6, None, 0, false)
        ]
    );
    // The claim is an ordinary one: renewed by its attempt.
    let claims = PgClaims::new(db.pool(1), "hv-a".into(), Duration::from_secs(60));
    assert_eq!(claims.renew(vec![(2, 1), (5, 1)]).await.unwrap().len(), 2);
}

/// A scale set's job is filed under its set, not its labels: members read it by the set
/// (whatever its labels), a webhook pool with the same labels does not, and its row
/// carries the set to every member. Each member's heartbeat carries what its pools of each
/// set could run at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_scale_sets_jobs_are_read_by_their_set_and_members_say_their_sets_capacity() {
    use runnervisor::fleet::claims::MemberInfo;
    use runnervisor::model::scale_set_key;
    let db = migrated("scale-sets").await;
    let intake = intake::FleetIntake::start(db.pool(1), None);
    let mut set_job = event("scale-set-9-11-assigned-1", 11, JobAction::Queued);
    set_job.job.labels = vec!["rv-linux".into()];
    set_job.job.scale_set = Some("rv-linux".into());
    intake.accept(set_job.clone()).await.unwrap();
    let mut hooked = event("q12", 12, JobAction::Queued);
    hooked.job.labels = vec!["rv-linux".into()];
    intake.accept(hooked).await.unwrap();
    let a = PgClaims::new(db.pool(1), "hv-a".into(), Duration::from_secs(60));
    let by_set = ReadQuery { pools: vec![scale_set_key("rv-linux")], ready: 10, ..ReadQuery::default() };
    let rows = a.read(by_set.clone()).await.unwrap();
    assert_eq!(ids(&rows), [11], "the set's job, by its set");
    assert_eq!(rows[0].info.as_ref().and_then(|i| i.scale_set.as_deref()), Some("rv-linux"));
    let by_labels = ReadQuery { pools: vec![vec!["rv-linux".into()]], ready: 10, ..ReadQuery::default() };
    assert_eq!(ids(&a.read(by_labels).await.unwrap()), [12], "a webhook pool's read is not the set's");
    assert!(ids(&a.read(ReadQuery { pools: vec![scale_set_key("rv-other")], ..by_set }).await.unwrap()).is_empty());

    let me = MemberInfo { scale_sets: [("rv-linux".to_string(), 3)].into(), ..member("hv-a") };
    let members = a.heartbeat(me).await.unwrap();
    assert_eq!(members[0].scale_sets.get("rv-linux"), Some(&3));
}

/// A scale set's request the set gave up on (`cancelled`, no runner took it) and assigned
/// again under the same id is queued again, unheld, for any member to claim (rows move
/// forward only otherwise: a webhook's job cancelled and queued again stays done).
#[tokio::test(flavor = "multi_thread")]
async fn a_scale_sets_request_given_up_and_assigned_again_is_queued_again() {
    use runnervisor::model::scale_set_key;
    let db = migrated("reassigned").await;
    let intake = intake::FleetIntake::start(db.pool(1), None);
    let set_event = |delivery: &str, action: JobAction| {
        let mut e = event(delivery, 21, action);
        e.job.labels = vec!["rv-linux".into()];
        e.job.scale_set = Some("rv-linux".into());
        e
    };
    intake.accept(set_event("scale-set-9-21-assigned-1", JobAction::Queued)).await.unwrap();
    let a = PgClaims::new(db.pool(1), "hv-a".into(), Duration::from_secs(60));
    assert_eq!(a.claim(vec![21]).await.unwrap().len(), 1);
    let mut gave_up = set_event("scale-set-9-21-completed", JobAction::Completed);
    gave_up.job.conclusion = Some("cancelled".into());
    intake.accept(gave_up).await.unwrap();
    intake.accept(set_event("scale-set-9-21-assigned-5", JobAction::Queued)).await.unwrap();
    let b = PgClaims::new(db.pool(1), "hv-b".into(), Duration::from_secs(60));
    let ready = ReadQuery { pools: vec![scale_set_key("rv-linux")], ready: 10, ..ReadQuery::default() };
    let rows = b.read(ready).await.unwrap();
    assert_eq!((ids(&rows), rows[0].action, rows[0].held_elsewhere), (vec![21], JobAction::Queued, None));
    assert_eq!(b.claim(vec![21]).await.unwrap()[0].attempt, 2, "claimed again, by anyone");

    // Request `id`'s event.
    let of = |id: u64, delivery: &str, action: JobAction| {
        let mut e = set_event(delivery, action);
        e.job.id = id;
        e
    };
    // A set's request done by a runner (or given up on with a runner named): done is done.
    let mut ran = of(23, "scale-set-9-23-completed", JobAction::Completed);
    (ran.job.conclusion, ran.job.runner_name) = (Some("success".into()), Some("rv-linux-23".into()));
    intake.accept(ran).await.unwrap();
    intake.accept(of(23, "scale-set-9-23-assigned-7", JobAction::Queued)).await.unwrap();
    assert_eq!(b.read(query(&[23], &[], 0)).await.unwrap()[0].action, JobAction::Completed);

    // Its start on runner rv-linux-<id>, then its cancelled end that names no runner.
    let ran_then_cancelled = |id: u64, end: &str| {
        let mut started = of(id, &format!("scale-set-9-{id}-started"), JobAction::InProgress);
        started.job.runner_name = Some(format!("rv-linux-{id}"));
        let mut cancelled = of(id, end, JobAction::Completed);
        cancelled.job.conclusion = Some("cancelled".into());
        (started, cancelled)
    };
    // Cancelled once a runner took it, the completion naming none: its start named one, and
    // its assignment seen again (a message grouped anew after a crash) is old news.
    intake.accept(of(24, "scale-set-9-24-assigned-8", JobAction::Queued)).await.unwrap();
    let (started, cancelled) = ran_then_cancelled(24, "scale-set-9-24-completed-9");
    intake.accept(started).await.unwrap();
    intake.accept(cancelled).await.unwrap();
    intake.accept(of(24, "scale-set-9-24-assigned-10", JobAction::Queued)).await.unwrap();
    assert_eq!(b.read(query(&[24], &[], 0)).await.unwrap()[0].action, JobAction::Completed, "it ran");
    // Its start and its end written in one group: the end is the row's, the runner the start's.
    intake.accept(of(25, "scale-set-9-25-assigned-11", JobAction::Queued)).await.unwrap();
    let (started, cancelled) = ran_then_cancelled(25, "scale-set-9-25-completed-12");
    intake::write(&db.pool(1), &[&started, &cancelled], None).await.unwrap();
    intake.accept(of(25, "scale-set-9-25-assigned-13", JobAction::Queued)).await.unwrap();
    let rows = b.read(query(&[], &["rv-linux-25"], 0)).await.unwrap();
    assert_eq!((ids(&rows), rows[0].action), (vec![25], JobAction::Completed), "found by its runner, done");
    // Read, its end names the runner it started on (the member serving it finishes that VM).
    let info = rows[0].info.as_ref().unwrap();
    assert_eq!((info.runner_name.as_deref(), info.conclusion.as_deref()), (Some("rv-linux-25"), Some("cancelled")));

    // A webhook's job: done is done.
    intake.accept(event("q22", 22, JobAction::Queued)).await.unwrap();
    let mut cancelled = event("c22", 22, JobAction::Completed);
    cancelled.job.conclusion = Some("cancelled".into());
    intake.accept(cancelled).await.unwrap();
    intake.accept(event("q22b", 22, JobAction::Queued)).await.unwrap();
    let rows = b.read(query(&[22], &[], 0)).await.unwrap();
    assert_eq!(rows[0].action, JobAction::Completed);
}

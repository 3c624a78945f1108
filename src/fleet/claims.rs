//! Claims: which member serves a job. A member claims queued jobs for its pools up to its
//! free capacity (`FOR UPDATE SKIP LOCKED`: members claiming together never wait on each
//! other and never both win); a claim is a lease that the member renews while the job is
//! still queued. A member that dies or is cut off stops renewing, and once the lease has
//! run out another member may claim the job. Each claim counts an attempt: VM and runner
//! names (`rv-<pool>-<job>-<attempt>`) stay unique across the fleet.

use std::sync::{Arc, Mutex};
use std::time::Duration;
#[cfg(test)]
use std::{
    collections::{BTreeSet, HashMap},
    time::SystemTime,
};

use std::time::SystemTime as WallTime;

use futures_util::future::BoxFuture;

use super::{FleetError, Pool, client};
use crate::github::RunnerInfo;
use crate::model::{JobAction, JobInfo};

/// A job's row as a member reads it ([`Claims::read`]): the fleet's truth about the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    pub id: u64,
    /// How far it is: `Queued`, `InProgress` or `Completed`.
    pub action: JobAction,
    /// The job as its furthest event described it, its runner the last one any event named
    /// (`rv_jobs.runner_name`: an end that names none is the start's runner's); `None` when
    /// the row has none (written before schema 5) or it does not decode (a newer agent's).
    pub info: Option<JobInfo>,
    pub received_at: WallTime,
    /// Queued and held by another member: how long its lease has left.
    pub held_elsewhere: Option<Duration>,
}

/// What a member reads of the fleet's jobs ([`Claims::read`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadQuery {
    /// Its pools' label sets: the oldest queued jobs of each that no live claim holds,
    /// `ready` at most of each (one window for all, a pool whose jobs wait for room would
    /// hide the others' behind its own, a dead member's among them).
    pub pools: Vec<Vec<String>>,
    pub ready: u32,
    /// The jobs it knows of that are not over.
    pub known: Vec<u64>,
    /// Its VMs: the jobs their runners took.
    pub runners: Vec<String>,
}

/// The action a row's state stands for.
fn action(state: &str) -> Option<JobAction> {
    match state {
        "queued" => Some(JobAction::Queued),
        "in_progress" => Some(JobAction::InProgress),
        "completed" => Some(JobAction::Completed),
        _ => None,
    }
}

/// A job this member now holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub job: u64,
    /// The fleet-wide attempt this claim starts (1 for the first).
    pub attempt: u32,
    /// The member that held it before, whose lease ran out (it died, or was cut off).
    pub taken_over_from: Option<String>,
}

/// A member as the fleet sees it (its last heartbeat).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberInfo {
    pub host_id: String,
    pub max_vms: u32,
    pub vms: u32,
    pub warm_waiting: u32,
    /// Warm VMs its pools keep (configured).
    #[serde(default)]
    pub warm_target: u32,
    /// Jobs it holds claims on.
    pub held: u32,
    pub version: String,
    /// Seconds since its last heartbeat (filled when read).
    #[serde(default)]
    pub seen_secs_ago: u64,
    /// Its IPv4 addresses (the other members' fences drop them).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Its number in the fleet (0–999; given by the database at its first heartbeat).
    #[serde(default)]
    pub number: Option<u32>,
    /// Per runner scale set (by name), the jobs its pool of the set could run at once: the
    /// member that holds the set's session announces the fleet's sum to GitHub.
    #[serde(default)]
    pub scale_sets: std::collections::BTreeMap<String, u32>,
}

/// The seam between the scheduler and the fleet's claims (PostgreSQL, or memory in tests).
pub trait Claims: Send + Sync + 'static {
    /// The rows `query` asks for, each as it is now (no log: nothing is missed however
    /// late a writer commits).
    fn read(&self, query: ReadQuery) -> BoxFuture<'static, Result<Vec<JobRow>, FleetError>>;
    /// Claims those of `jobs` that are queued and unheld (or held by a lease that ran
    /// out, or by this member already).
    fn claim(&self, jobs: Vec<u64>) -> BoxFuture<'static, Result<Vec<Claimed>, FleetError>>;
    /// Extends the leases of the claims `jobs` (job, attempt) whose attempt is still the
    /// job's (the epoch: a claim taken again since, by anyone, is not this one; attempt 0:
    /// whichever this member holds, for claims adopted after a restart); returns those it
    /// still holds, with their attempt.
    fn renew(&self, jobs: Vec<(u64, u32)>) -> BoxFuture<'static, Result<Vec<(u64, u32)>, FleetError>>;
    /// Gives the claims `jobs` (job, attempt, as for [`Claims::renew`]) up: this member
    /// will not serve them. A claim taken again since is left alone.
    fn release(&self, jobs: Vec<(u64, u32)>) -> BoxFuture<'static, Result<(), FleetError>>;
    /// Holds (or takes, once its holder's lease ran out) the lead of `work` for a lease;
    /// whether this member leads it now.
    fn lead(&self, work: &str) -> BoxFuture<'static, Result<bool, FleetError>>;
    /// Records this member's state; returns every member heard from in the last hour.
    fn heartbeat(&self, me: MemberInfo) -> BoxFuture<'static, Result<Vec<MemberInfo>, FleetError>>;
    /// The lead member shares the runner list it began reading from GitHub at `listed` (a
    /// runner that registered since may be missing from it). Kept only while this member
    /// leads the GitHub work and only over an older list: whether it was kept.
    fn publish_runners(
        &self,
        runners: Vec<RunnerInfo>,
        listed: tokio::time::Instant,
    ) -> BoxFuture<'static, Result<bool, FleetError>>;
    /// The runner list the lead shared last, and how long ago it read it (none yet: `None`).
    fn runners(&self) -> BoxFuture<'static, Result<Option<(Vec<RunnerInfo>, Duration)>, FleetError>>;
    /// The lead removes one batch of what the fleet no longer needs ([`retention`]): rows
    /// removed, per table.
    fn prune(&self) -> BoxFuture<'static, Result<Pruned, FleetError>>;
    /// How far back the hook's delivery log has been handled, by any lead (none yet: `None`).
    fn deliveries_checked(&self) -> BoxFuture<'static, Result<Option<WallTime>, FleetError>>;
    /// The lead has handled the delivery log back to `until`: kept only while this member
    /// leads, and never moved back.
    fn check_deliveries(&self, until: WallTime) -> BoxFuture<'static, Result<(), FleetError>>;
}

/// How long the fleet keeps what it no longer serves from.
pub mod retention {
    use std::time::Duration;
    /// A finished job's row: longer than a delivery's id is kept, so that a redelivery of
    /// its `queued` (which GitHub allows for three days) finds the row done, not gone.
    pub const DONE_JOBS: Duration = Duration::from_secs(7 * 86400);
    /// A delivery's id: GitHub redelivers for three days.
    pub const DELIVERIES: Duration = Duration::from_secs(3 * 86400 + 3600);
    /// A member not heard from (its number is free again; a member back after that gets a
    /// new one: half a year, longer than any VM of its may wait on a shared libvirtd).
    pub const MEMBERS: Duration = Duration::from_secs(180 * 86400);
    /// Rows removed per table and statement: a statement stays short on large tables.
    pub const BATCH: i64 = 1000;
}

/// Rows one [`Claims::prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: u64,
    pub deliveries: u64,
    pub members: u64,
    /// Of `rv_events`, the log earlier versions wrote (no longer read).
    pub events: u64,
}

impl Pruned {
    /// A batch was full: more is left (the next sync prunes again).
    pub fn more(&self) -> bool {
        let full = retention::BATCH as u64;
        self.jobs >= full || self.deliveries >= full || self.members >= full || self.events >= full
    }
}

/// The work one member at a time leads: reading GitHub (its hook's deliveries, stale jobs,
/// the runner list it shares). Every member asks about the jobs beside its own waiting
/// runners (see `scheduler::sync`).
pub const GITHUB_WORK: &str = "github";

/// The key of the shared runner list (one list: the fleet serves one GitHub scope), which
/// only the lead of [`GITHUB_WORK`] writes.
const RUNNER_LIST: &str = GITHUB_WORK;

pub struct PgClaims {
    pool: Pool,
    /// For renewals and the lead: a connection of their own, so that a burst of deliveries
    /// or reads holding every pooled connection cannot make a lease run out.
    leases: Pool,
    host: String,
    lease: Duration,
    /// The label keys (`rv_label_key`) of the pools' label sets last read for, by those
    /// sets, and when they were asked: asked of the database again when the sets change (a
    /// reload) and after [`KEYS_KEPT`] (a newer member's migration could change the
    /// function). Read as an array, the planner knows how many there are and reads the
    /// rows by their keys (measured on 200,000 rows: 3.4 ms a read; 37–46 ms as one
    /// statement that made them, whose estimate of 100 keys turned the read into a scan of
    /// the table).
    keys: Arc<Mutex<Option<(Vec<Vec<String>>, Vec<String>, std::time::Instant)>>>,
}

/// How long the pools' label keys are kept before they are asked again ([`PgClaims`]).
const KEYS_KEPT: Duration = Duration::from_secs(60);

impl PgClaims {
    pub fn new(pool: Pool, host: String, lease: Duration) -> PgClaims {
        PgClaims { leases: pool.clone(), pool, host, lease, keys: Default::default() }
    }

    /// Renewals and the lead use `leases` (see `Member::leases`).
    pub fn with_leases(self, leases: Pool) -> PgClaims {
        PgClaims { leases, ..self }
    }
}

fn ids(jobs: &[u64]) -> Vec<i64> {
    jobs.iter().map(|j| *j as i64).collect()
}

/// Claims as two arrays for `unnest`: job ids, attempts.
fn epochs(jobs: &[(u64, u32)]) -> (Vec<i64>, Vec<i32>) {
    // In id order, the order the intake writes rows in: fewer chances for a renewal and an
    // intake to wait on each other's rows (PostgreSQL would abort one as a deadlock).
    let mut sorted = jobs.to_vec();
    sorted.sort_unstable();
    sorted.iter().map(|(j, a)| (*j as i64, *a as i32)).unzip()
}

impl Claims for PgClaims {
    fn read(&self, query: ReadQuery) -> BoxFuture<'static, Result<Vec<JobRow>, FleetError>> {
        let (pool, host, cache) = (self.pool.clone(), self.host.clone(), self.keys.clone());
        Box::pin(async move {
            let c = client(&pool).await?;
            let cached = cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .filter(|(pools, _, asked)| *pools == query.pools && asked.elapsed() < KEYS_KEPT)
                .map(|(_, keys, _)| keys.clone());
            let keys = match cached {
                Some(keys) => keys,
                None => {
                    let pools = serde_json::to_value(&query.pools).expect("label sets serialize");
                    let keys: Vec<String> = c
                        .query(
                            "SELECT DISTINCT rv_label_key(ARRAY(SELECT jsonb_array_elements_text(p))) \
                             FROM jsonb_array_elements($1::jsonb) p",
                            &[&pools],
                        )
                        .await?
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                    *cache.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((query.pools.clone(), keys.clone(), std::time::Instant::now()));
                    keys
                }
            };
            // Each key's oldest unheld queued jobs, `ready` of each; the jobs it knows;
            // the jobs its runners took: each read by its index, then the rows by id.
            let rows = c
                .query(
                    "WITH ready AS ( \
                       SELECT r.id FROM unnest($1::text[]) AS keys(k) CROSS JOIN LATERAL ( \
                         SELECT id FROM rv_jobs WHERE state = 'queued' AND label_key = keys.k \
                           AND (holder IS NULL OR lease_until < now()) \
                         ORDER BY received_at LIMIT $2) r), \
                     wanted AS ( \
                       SELECT id FROM ready \
                       UNION SELECT id FROM rv_jobs WHERE id = ANY($3) \
                       UNION SELECT id FROM rv_jobs WHERE runner_name = ANY($4)) \
                     SELECT j.id, j.state, j.info, j.received_at, j.holder, \
                       extract(epoch FROM j.lease_until - now())::float8, j.runner_name \
                     FROM wanted w JOIN rv_jobs j ON j.id = w.id",
                    &[&keys, &(query.ready as i64), &ids(&query.known), &query.runners],
                )
                .await?;
            Ok(rows
                .iter()
                .filter_map(|r| {
                    let id = r.get::<_, i64>(0) as u64;
                    let action = action(r.get(1))?;
                    let runner: Option<String> = r.get(6);
                    let info = r
                        .get::<_, Option<serde_json::Value>>(2)
                        .and_then(|v| serde_json::from_value::<JobInfo>(v).ok())
                        .filter(|i| i.id == id)
                        .map(|i| JobInfo { runner_name: i.runner_name.or(runner), ..i });
                    let holder: Option<String> = r.get(4);
                    let left = r.get::<_, Option<f64>>(5).filter(|s| *s > 0.0).map(Duration::from_secs_f64);
                    let elsewhere = action == JobAction::Queued && holder.is_some_and(|h| h != host);
                    Some(JobRow { id, action, info, received_at: r.get(3), held_elsewhere: left.filter(|_| elsewhere) })
                })
                .collect())
        })
    }

    fn claim(&self, jobs: Vec<u64>) -> BoxFuture<'static, Result<Vec<Claimed>, FleetError>> {
        let (pool, host, lease_ms) = (self.pool.clone(), self.host.clone(), self.lease.as_millis() as f64);
        Box::pin(async move {
            let rows = client(&pool)
                .await?
                .query(
                    "WITH c AS ( \
                       SELECT id, holder FROM rv_jobs \
                       WHERE id = ANY($1) AND state = 'queued' \
                         AND (holder IS NULL OR holder = $2 OR lease_until < now()) \
                       ORDER BY received_at FOR UPDATE SKIP LOCKED) \
                     UPDATE rv_jobs j SET holder = $2, \
                       lease_until = now() + make_interval(secs => $3::float8 / 1000), attempts = j.attempts + 1, \
                       first_claimed_at = coalesce(j.first_claimed_at, clock_timestamp()) \
                     FROM c WHERE j.id = c.id \
                     RETURNING j.id, j.attempts, c.holder",
                    &[&ids(&jobs), &host, &lease_ms],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    let before: Option<String> = r.get(2);
                    Claimed {
                        job: r.get::<_, i64>(0) as u64,
                        attempt: r.get::<_, i32>(1) as u32,
                        taken_over_from: before.filter(|b| *b != host),
                    }
                })
                .collect())
        })
    }

    fn renew(&self, jobs: Vec<(u64, u32)>) -> BoxFuture<'static, Result<Vec<(u64, u32)>, FleetError>> {
        let (pool, host, lease_ms) = (self.leases.clone(), self.host.clone(), self.lease.as_millis() as f64);
        Box::pin(async move {
            let (ids, attempts) = epochs(&jobs);
            let rows = client(&pool)
                .await?
                .query(
                    "UPDATE rv_jobs j SET lease_until = now() + make_interval(secs => $3::float8 / 1000) \
                     FROM unnest($1::int8[], $4::int4[]) AS c(id, attempt) \
                     WHERE j.id = c.id AND j.holder = $2 AND (c.attempt = 0 OR j.attempts = c.attempt) \
                     RETURNING j.id, j.attempts",
                    &[&ids, &host, &lease_ms, &attempts],
                )
                .await?;
            Ok(rows.iter().map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i32>(1) as u32)).collect())
        })
    }

    fn heartbeat(&self, me: MemberInfo) -> BoxFuture<'static, Result<Vec<MemberInfo>, FleetError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let c = client(&pool).await?;
            let n = |v: u32| v as i32;
            c.execute(
                "INSERT INTO rv_members (host_id, max_vms, vms, warm_waiting, held, version, warm_target, addresses, \
                   scale_sets, seen_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now()) \
                 ON CONFLICT (host_id) DO UPDATE SET max_vms = EXCLUDED.max_vms, vms = EXCLUDED.vms, \
                   warm_waiting = EXCLUDED.warm_waiting, held = EXCLUDED.held, version = EXCLUDED.version, \
                   warm_target = EXCLUDED.warm_target, addresses = EXCLUDED.addresses, \
                   scale_sets = EXCLUDED.scale_sets, seen_at = now()",
                &[
                    &me.host_id,
                    &n(me.max_vms),
                    &n(me.vms),
                    &n(me.warm_waiting),
                    &n(me.held),
                    &me.version,
                    &n(me.warm_target),
                    &me.addresses,
                    &serde_json::to_value(&me.scale_sets).expect("capacities serialize"),
                ],
            )
            .await?;
            // A member's number, given once: the lowest free; none free, that of the member
            // gone longest (over 30 days). Two members given the same number at once: the
            // unique index refuses the second, whose next heartbeat tries again.
            c.execute(
                "UPDATE rv_members SET number = NULL \
                 WHERE host_id = (SELECT host_id FROM rv_members WHERE number IS NOT NULL \
                     AND seen_at < now() - interval '30 days' ORDER BY seen_at LIMIT 1) \
                   AND (SELECT count(number) FROM rv_members) >= 1000 \
                   AND EXISTS (SELECT 1 FROM rv_members WHERE host_id = $1 AND number IS NULL)",
                &[&me.host_id],
            )
            .await?;
            c.execute(
                "UPDATE rv_members SET number = (SELECT min(n) FROM generate_series(0, 999) n \
                   WHERE n NOT IN (SELECT number FROM rv_members WHERE number IS NOT NULL)) \
                 WHERE host_id = $1 AND number IS NULL",
                &[&me.host_id],
            )
            .await?;
            let rows = c
                .query(
                    "SELECT host_id, max_vms, vms, warm_waiting, held, version, \
                       extract(epoch FROM now() - seen_at)::int8, warm_target, addresses, number, scale_sets \
                     FROM rv_members WHERE seen_at > now() - interval '1 hour' ORDER BY host_id",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| MemberInfo {
                    host_id: r.get(0),
                    max_vms: r.get::<_, i32>(1) as u32,
                    vms: r.get::<_, i32>(2) as u32,
                    warm_waiting: r.get::<_, i32>(3) as u32,
                    held: r.get::<_, i32>(4) as u32,
                    version: r.get(5),
                    seen_secs_ago: r.get::<_, i64>(6).max(0) as u64,
                    warm_target: r.get::<_, i32>(7) as u32,
                    addresses: r.get(8),
                    number: r.get::<_, Option<i32>>(9).map(|n| n as u32),
                    // A newer agent's that does not read: none.
                    scale_sets: serde_json::from_value(r.get(10)).unwrap_or_default(),
                })
                .collect())
        })
    }

    fn lead(&self, work: &str) -> BoxFuture<'static, Result<bool, FleetError>> {
        let (pool, host, lease_ms) = (self.leases.clone(), self.host.clone(), self.lease.as_millis() as f64);
        let work = work.to_string();
        Box::pin(async move {
            let rows = client(&pool)
                .await?
                .query(
                    "INSERT INTO rv_leader (name, holder, expires_at)                      VALUES ($1, $2, now() + make_interval(secs => $3::float8 / 1000))                      ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at                      WHERE rv_leader.holder = EXCLUDED.holder OR rv_leader.expires_at < now()                      RETURNING holder",
                    &[&work, &host, &lease_ms],
                )
                .await?;
            Ok(!rows.is_empty())
        })
    }

    fn publish_runners(
        &self,
        runners: Vec<RunnerInfo>,
        listed: tokio::time::Instant,
    ) -> BoxFuture<'static, Result<bool, FleetError>> {
        let (pool, host) = (self.pool.clone(), self.host.clone());
        Box::pin(async move {
            let list = serde_json::to_value(&runners).expect("runners serialize");
            let c = client(&pool).await?;
            // As of when the listing began (measured once connected: waiting for a
            // connection ages it too); only by the lead (a member that lost the lead while
            // listing keeps quiet) and never over a newer list.
            let age_ms = listed.elapsed().as_millis() as f64;
            let n = c
                .execute(
                    "INSERT INTO rv_runner_list (name, runners, fetched_at) \
                     SELECT $1, $2, now() - make_interval(secs => $4::float8 / 1000) \
                     WHERE EXISTS (SELECT 1 FROM rv_leader WHERE name = $1 AND holder = $3 AND expires_at > now()) \
                     ON CONFLICT (name) DO UPDATE SET runners = EXCLUDED.runners, fetched_at = EXCLUDED.fetched_at \
                     WHERE rv_runner_list.fetched_at < EXCLUDED.fetched_at",
                    &[&RUNNER_LIST, &list, &host, &age_ms],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn runners(&self) -> BoxFuture<'static, Result<Option<(Vec<RunnerInfo>, Duration)>, FleetError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let row = client(&pool)
                .await?
                .query_opt(
                    "SELECT runners, extract(epoch FROM now() - fetched_at)::float8 FROM rv_runner_list WHERE name = $1",
                    &[&RUNNER_LIST],
                )
                .await?;
            let Some(row) = row else { return Ok(None) };
            let list: Vec<RunnerInfo> = serde_json::from_value(row.get(0))
                .map_err(|e| FleetError::Pool(format!("the shared runner list: {e}")))?;
            Ok(Some((list, Duration::from_secs_f64(row.get::<_, f64>(1).max(0.0)))))
        })
    }

    fn release(&self, jobs: Vec<(u64, u32)>) -> BoxFuture<'static, Result<(), FleetError>> {
        let (pool, host) = (self.pool.clone(), self.host.clone());
        Box::pin(async move {
            let (ids, attempts) = epochs(&jobs);
            client(&pool)
                .await?
                .execute(
                    // A job given back while queued is there to claim: the members are woken.
                    "WITH r AS (UPDATE rv_jobs j SET holder = NULL, lease_until = NULL \
                       FROM unnest($1::int8[], $3::int4[]) AS c(id, attempt) \
                       WHERE j.id = c.id AND j.holder = $2 AND (c.attempt = 0 OR j.attempts = c.attempt) \
                       RETURNING j.state) \
                     SELECT pg_notify($4, '') WHERE EXISTS (SELECT 1 FROM r WHERE state = 'queued')",
                    &[&ids, &host, &attempts, &super::intake::CHANNEL],
                )
                .await?;
            Ok(())
        })
    }
    fn prune(&self) -> BoxFuture<'static, Result<Pruned, FleetError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            use retention::*;
            let c = client(&pool).await?;
            // Each a batch, oldest first, through an index: (table, key, what ages it, kept).
            #[rustfmt::skip]
            let aged = [
                ("rv_jobs", "id", "updated_at", "AND state = 'completed'", DONE_JOBS),
                ("rv_deliveries", "guid", "received_at", "", DELIVERIES),
                ("rv_members", "host_id", "seen_at", "", MEMBERS),
            ];
            let mut removed = [0u64; 3];
            for ((table, key, at, filter, kept), n) in aged.into_iter().zip(&mut removed) {
                *n = c
                    .execute(
                        &format!(
                            "DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} \
                               WHERE {at} < now() - make_interval(secs => $1) {filter} ORDER BY {at} LIMIT $2)"
                        ),
                        &[&kept.as_secs_f64(), &BATCH],
                    )
                    .await?;
            }
            let [jobs, deliveries, members] = removed;
            let events = c
                .execute(
                    "DELETE FROM rv_events WHERE seq IN (SELECT seq FROM rv_events ORDER BY seq LIMIT $1)",
                    &[&BATCH],
                )
                .await?;
            Ok(Pruned { jobs, deliveries, members, events })
        })
    }

    fn deliveries_checked(&self) -> BoxFuture<'static, Result<Option<WallTime>, FleetError>> {
        let pool = self.leases.clone();
        Box::pin(async move {
            let row = client(&pool)
                .await?
                .query_opt("SELECT deliveries_checked FROM rv_leader WHERE name = $1", &[&GITHUB_WORK])
                .await?;
            Ok(row.and_then(|r| r.get(0)))
        })
    }

    fn check_deliveries(&self, until: WallTime) -> BoxFuture<'static, Result<(), FleetError>> {
        let (pool, host) = (self.leases.clone(), self.host.clone());
        Box::pin(async move {
            client(&pool)
                .await?
                .execute(
                    "UPDATE rv_leader SET deliveries_checked = $3 WHERE name = $1 AND holder = $2 \
                     AND expires_at > now() AND (deliveries_checked IS NULL OR deliveries_checked < $3)",
                    &[&GITHUB_WORK, &host, &until],
                )
                .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
/// Claims in memory, shared by the members of a unit test (the same rules as
/// [`PgClaims`], on the caller's clock).
#[derive(Default)]
pub struct MemoryBoard {
    /// job → (holder, lease until, attempts, queued)
    jobs: Mutex<HashMap<u64, (Option<String>, SystemTime, u32, bool)>>,
    /// work → (holder, until)
    pub leads: Mutex<HashMap<String, (String, SystemTime)>>,
    /// host → (its last heartbeat, when it was written: `None` for [`MemoryBoard::heard`]'s,
    /// whose age is as given)
    members: Mutex<std::collections::BTreeMap<String, (MemberInfo, Option<SystemTime>)>>,
    /// The shared runner list and when it was read.
    runner_list: Mutex<Option<(Vec<RunnerInfo>, SystemTime)>>,
    /// The job rows members read: job → (how far, the job as its furthest event said,
    /// received, its runner: the last one an event named, `rv_jobs.runner_name`).
    rows: Mutex<HashMap<u64, (JobAction, JobInfo, SystemTime, Option<String>)>>,
    /// Prunes asked for.
    pub prunes: std::sync::atomic::AtomicU32,
    /// How far back the lead has handled the delivery log.
    pub deliveries_checked: Mutex<Option<SystemTime>>,
    /// The leases' connection is away (`Member::leases`): leads and renewals fail.
    pub leases_away: std::sync::atomic::AtomicBool,
    /// Members whose heartbeats never finish (a lookup or a pool that hangs).
    pub stalled_heartbeats: Mutex<BTreeSet<String>>,
}

#[cfg(test)]
impl MemoryBoard {
    /// The failure of a call on the leases' connection while it is away.
    fn away<T: Send + 'static>(&self) -> Option<BoxFuture<'static, Result<T, FleetError>>> {
        let away = self.leases_away.load(std::sync::atomic::Ordering::SeqCst);
        away.then(|| -> BoxFuture<'static, Result<T, FleetError>> {
            Box::pin(std::future::ready(Err(FleetError::Pool("the database is away".into()))))
        })
    }

    /// A member's heartbeat, as if it had written it.
    pub fn heard(&self, member: MemberInfo) {
        self.members.lock().expect("board").insert(member.host_id.clone(), (member, None));
    }

    /// The job is in the fleet's queue (or no longer queued).
    pub fn set_queued(&self, job: u64, queued: bool) {
        let mut jobs = self.jobs.lock().expect("board");
        jobs.entry(job).or_insert((None, SystemTime::UNIX_EPOCH, 0, true)).3 = queued;
    }

    /// A delivery written as the intake writes it: the job's row moves forward only.
    pub fn write(&self, ev: &crate::model::JobEvent) {
        use super::intake::rank;
        let mut rows = self.rows.lock().expect("board");
        let row =
            rows.entry(ev.job.id).or_insert((ev.action, ev.job.clone(), ev.received_at, ev.job.runner_name.clone()));
        // As the intake's statement: a scale set's request given up on and assigned again.
        let again = rank(ev.action) == 0
            && row.0 == JobAction::Completed
            && row.3.is_none()
            && row.1.conclusion.as_deref() == Some("cancelled")
            && ev.job.scale_set.is_some();
        if rank(ev.action) > rank(row.0) || again {
            (row.0, row.1) = (ev.action, ev.job.clone());
            // Its runner is the last one an event named (`COALESCE` in the statement).
            row.3 = ev.job.runner_name.clone().or(row.3.take());
            if again {
                row.2 = ev.received_at;
            }
        }
        let queued = rank(row.0) == 0;
        drop(rows);
        if again && let Some(j) = self.jobs.lock().expect("board").get_mut(&ev.job.id) {
            j.0 = None;
        }
        self.set_queued(ev.job.id, queued);
    }

    pub fn holder(&self, job: u64) -> Option<String> {
        self.jobs.lock().expect("board").get(&job).and_then(|j| j.0.clone())
    }

    /// Every claim and lead of `host` runs out now (as if it had stopped renewing long ago).
    pub fn expire(&self, host: &str) {
        for j in self.jobs.lock().expect("board").values_mut() {
            if j.0.as_deref() == Some(host) {
                j.1 = SystemTime::UNIX_EPOCH;
            }
        }
        for l in self.leads.lock().expect("board").values_mut() {
            if l.0 == host {
                l.1 = SystemTime::UNIX_EPOCH;
            }
        }
    }
}

#[cfg(test)]
/// One member's view of a [`MemoryBoard`].
pub struct MemoryClaims {
    pub board: Arc<MemoryBoard>,
    pub host: String,
    pub lease: Duration,
    pub clock: Arc<dyn crate::clock::Clock>,
}

#[cfg(test)]
impl Claims for MemoryClaims {
    fn read(&self, q: ReadQuery) -> BoxFuture<'static, Result<Vec<JobRow>, FleetError>> {
        use crate::model::label_set as set;
        let now = self.clock.now();
        let pools: Vec<Vec<String>> = q.pools.iter().map(|p| set(p)).collect();
        let claims = self.board.jobs.lock().expect("board");
        let rows = self.board.rows.lock().expect("board");
        let held = |id: &u64| {
            claims.get(id).and_then(|(h, until, _, _)| h.clone().filter(|_| *until > now).map(|h| (h, *until)))
        };
        let mut ready: Vec<u64> = Vec::new();
        for pool in &pools {
            let mut of_pool: Vec<(&u64, &(JobAction, JobInfo, SystemTime, Option<String>))> = rows
                .iter()
                .filter(|(id, (a, info, _, _))| {
                    *a == JobAction::Queued && held(id).is_none() && set(&info.queue_labels()) == *pool
                })
                .collect();
            of_pool.sort_by_key(|(id, (_, _, at, _))| (*at, **id));
            ready.extend(of_pool.into_iter().take(q.ready as usize).map(|(id, _)| *id));
        }
        let out = rows
            .iter()
            .filter(|(id, (_, _, _, runner))| {
                ready.contains(id) || q.known.contains(id) || runner.as_ref().is_some_and(|r| q.runners.contains(r))
            })
            .map(|(id, (action, info, at, runner))| JobRow {
                id: *id,
                action: *action,
                info: Some(JobInfo { runner_name: info.runner_name.clone().or(runner.clone()), ..info.clone() }),
                received_at: *at,
                held_elsewhere: held(id)
                    .filter(|(h, _)| *h != self.host && *action == JobAction::Queued)
                    .map(|(_, until)| until.duration_since(now).unwrap_or_default()),
            })
            .collect();
        Box::pin(std::future::ready(Ok(out)))
    }

    fn publish_runners(
        &self,
        runners: Vec<RunnerInfo>,
        listed: tokio::time::Instant,
    ) -> BoxFuture<'static, Result<bool, FleetError>> {
        let now = self.clock.now();
        let listed_at = now - listed.elapsed();
        let leads = self.board.leads.lock().expect("board").get(RUNNER_LIST).cloned();
        let leading = leads.is_some_and(|(holder, until)| holder == self.host && until > now);
        let mut list = self.board.runner_list.lock().expect("board");
        let kept = leading && list.as_ref().is_none_or(|(_, at)| *at < listed_at);
        if kept {
            *list = Some((runners, listed_at));
        }
        Box::pin(std::future::ready(Ok(kept)))
    }

    fn runners(&self) -> BoxFuture<'static, Result<Option<(Vec<RunnerInfo>, Duration)>, FleetError>> {
        let now = self.clock.now();
        let list = self.board.runner_list.lock().expect("board").clone();
        Box::pin(std::future::ready(Ok(list.map(|(l, at)| (l, now.duration_since(at).unwrap_or_default())))))
    }

    fn heartbeat(&self, mut me: MemberInfo) -> BoxFuture<'static, Result<Vec<MemberInfo>, FleetError>> {
        if self.board.stalled_heartbeats.lock().expect("board").contains(&me.host_id) {
            return Box::pin(std::future::pending());
        }
        let now = self.clock.now();
        let mut members = self.board.members.lock().expect("board");
        me.number = members.get(&me.host_id).and_then(|(m, _)| m.number).or_else(|| {
            let taken: BTreeSet<u32> = members.values().filter_map(|(m, _)| m.number).collect();
            (0..1000).find(|n| !taken.contains(n))
        });
        members.insert(me.host_id.clone(), (me, Some(now)));
        // Aged as the database ages them (`now() - seen_at`).
        let age = |m: &MemberInfo, seen: &Option<SystemTime>| match seen {
            Some(t) => now.duration_since(*t).unwrap_or_default().as_secs(),
            None => m.seen_secs_ago,
        };
        let list = members.values().map(|(m, seen)| MemberInfo { seen_secs_ago: age(m, seen), ..m.clone() }).collect();
        Box::pin(std::future::ready(Ok(list)))
    }

    fn lead(&self, work: &str) -> BoxFuture<'static, Result<bool, FleetError>> {
        if let Some(away) = self.board.away() {
            return away;
        }
        let now = self.clock.now();
        let mut leads = self.board.leads.lock().expect("board");
        let lead = leads.entry(work.to_string()).or_insert((self.host.clone(), SystemTime::UNIX_EPOCH));
        let mine = lead.0 == self.host || lead.1 < now;
        if mine {
            *lead = (self.host.clone(), now + self.lease);
        }
        Box::pin(std::future::ready(Ok(mine)))
    }

    fn claim(&self, want: Vec<u64>) -> BoxFuture<'static, Result<Vec<Claimed>, FleetError>> {
        let now = self.clock.now();
        let mut jobs = self.board.jobs.lock().expect("board");
        let mut won = Vec::new();
        for id in want {
            let j = jobs.entry(id).or_insert((None, SystemTime::UNIX_EPOCH, 0, true));
            let free = j.0.is_none() || j.0.as_deref() == Some(&self.host) || j.1 < now;
            if j.3 && free {
                let before = j.0.replace(self.host.clone()).filter(|b| *b != self.host);
                j.1 = now + self.lease;
                j.2 += 1;
                won.push(Claimed { job: id, attempt: j.2, taken_over_from: before });
            }
        }
        Box::pin(std::future::ready(Ok(won)))
    }

    fn renew(&self, want: Vec<(u64, u32)>) -> BoxFuture<'static, Result<Vec<(u64, u32)>, FleetError>> {
        if let Some(away) = self.board.away() {
            return away;
        }
        let now = self.clock.now();
        let mut jobs = self.board.jobs.lock().expect("board");
        let held = want
            .into_iter()
            .filter_map(|(id, attempt)| match jobs.get_mut(&id) {
                Some(j) if j.0.as_deref() == Some(&self.host) && (attempt == 0 || j.2 == attempt) => {
                    j.1 = now + self.lease;
                    Some((id, j.2))
                }
                _ => None,
            })
            .collect();
        Box::pin(std::future::ready(Ok(held)))
    }

    fn prune(&self) -> BoxFuture<'static, Result<Pruned, FleetError>> {
        self.board.prunes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::pin(std::future::ready(Ok(Pruned::default())))
    }

    fn deliveries_checked(&self) -> BoxFuture<'static, Result<Option<WallTime>, FleetError>> {
        Box::pin(std::future::ready(Ok(*self.board.deliveries_checked.lock().expect("board"))))
    }

    fn check_deliveries(&self, until: WallTime) -> BoxFuture<'static, Result<(), FleetError>> {
        let now = self.clock.now();
        let leads = self.board.leads.lock().expect("board").get(GITHUB_WORK).cloned();
        if leads.is_some_and(|(holder, t)| holder == self.host && t > now) {
            let mut checked = self.board.deliveries_checked.lock().expect("board");
            *checked = Some(checked.map_or(until, |c| c.max(until)));
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn release(&self, want: Vec<(u64, u32)>) -> BoxFuture<'static, Result<(), FleetError>> {
        let mut jobs = self.board.jobs.lock().expect("board");
        for (id, attempt) in want {
            if let Some(j) =
                jobs.get_mut(&id).filter(|j| j.0.as_deref() == Some(&self.host) && (attempt == 0 || j.2 == attempt))
            {
                j.0 = None;
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

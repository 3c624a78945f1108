//! The fleet's PostgreSQL schema: versioned migrations the agent applies itself, one
//! migrator at a time (a session advisory lock), each version in its own transaction.
//! A database whose schema is newer than this agent knows is refused, never altered.

use tokio_postgres::Client;

use super::FleetError;

/// The advisory lock every migrator takes (`pg_advisory_lock`), so that members starting
/// together migrate one after another.
pub const MIGRATION_LOCK: i64 = 0x7276_6d69_6772_6174; // "rvmigrat"

/// Every version of the schema, in order. Never edit a released entry: add one.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
-- Delivery ids seen by any member: a redelivery or a delivery sent to several members
-- is accepted once.
CREATE TABLE rv_deliveries (
    guid        text PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rv_deliveries_received_at ON rv_deliveries (received_at);

-- The fleet's log of job events, in the order they were committed (almost: a sequence
-- value is taken before its transaction commits; readers wait for gaps to fill).
CREATE TABLE rv_events (
    seq         bigserial PRIMARY KEY,
    job_id      bigint NOT NULL,
    event       jsonb NOT NULL,
    inserted_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Each job's latest state (forward only: queued < in_progress < completed), and who
-- holds it: the member that claimed it, until its lease runs out.
CREATE TABLE rv_jobs (
    id          bigint PRIMARY KEY,
    state       text NOT NULL,
    rank        smallint NOT NULL,
    labels      text[] NOT NULL,
    repository  text NOT NULL,
    received_at timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    holder      text,
    lease_until timestamptz,
    attempts    integer NOT NULL DEFAULT 0
);
CREATE INDEX rv_jobs_queued ON rv_jobs (received_at) WHERE state = 'queued';
"#,
    ),
    (
        2,
        r#"
-- Work one member does for the fleet (GitHub's delivery log and job polling): whoever
-- holds the row until it expires; another member takes it over after.
CREATE TABLE rv_leader (
    name       text PRIMARY KEY,
    holder     text NOT NULL,
    expires_at timestamptz NOT NULL
);

-- Each member's last word (`runnervisor status` shows the fleet from it).
CREATE TABLE rv_members (
    host_id      text PRIMARY KEY,
    max_vms      integer NOT NULL,
    vms          integer NOT NULL,
    warm_waiting integer NOT NULL,
    held         integer NOT NULL,
    version      text NOT NULL,
    seen_at      timestamptz NOT NULL DEFAULT now()
);
"#,
    ),
    (
        3,
        r#"
-- When a job was first claimed (claim latency: first_claimed_at - received_at).
ALTER TABLE rv_jobs ADD COLUMN first_claimed_at timestamptz;
-- How many warm VMs a member keeps: members that would boot cold leave a young job to
-- those (cold_head_start) only while one exists.
ALTER TABLE rv_members ADD COLUMN warm_target integer NOT NULL DEFAULT 0;

-- The runner list the lead member read from GitHub last: the others follow their VMs'
-- runners on it instead of each listing them (one call per interval for the fleet).
CREATE TABLE rv_runner_list (
    name       text PRIMARY KEY,
    runners    jsonb NOT NULL,
    fetched_at timestamptz NOT NULL
);
"#,
    ),
    (
        4,
        r#"
-- Each member's IPv4 addresses: every member's fence drops the other members' too (their
-- webhook and metrics listeners may be on public addresses a job could otherwise reach).
ALTER TABLE rv_members ADD COLUMN addresses text[] NOT NULL DEFAULT '{}';
"#,
    ),
    // `rv_label_key` names a label set for good: members keep the keys of their pools'
    // sets for a minute (`PgClaims::keys`), and rows keep theirs; another key needs
    // another function and column.
    (
        5,
        r#"
-- The job rows are the queue: each member reads the rows it needs (the oldest unheld
-- queued jobs of its pools' label sets, the jobs it knows of, the jobs its runners took)
-- instead of a log in sequence order, whose numbers are taken before commit.
-- A label set as pools match it: lowercase, without duplicates, in byte order.
CREATE FUNCTION rv_label_key(text[]) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT array_to_string(ARRAY(SELECT DISTINCT lower(l) COLLATE "C" FROM unnest($1) l ORDER BY 1), E'\x1f')
$$;
ALTER TABLE rv_jobs ADD COLUMN info jsonb;
ALTER TABLE rv_jobs ADD COLUMN runner_name text;
ALTER TABLE rv_jobs ADD COLUMN label_key text;
-- The rows of jobs queued before this version, from their last event.
UPDATE rv_jobs j SET label_key = rv_label_key(j.labels),
    info = (SELECT e.event->'job' FROM rv_events e WHERE e.job_id = j.id ORDER BY e.seq DESC LIMIT 1);
UPDATE rv_jobs SET runner_name = info->>'runner_name' WHERE info IS NOT NULL;
CREATE INDEX rv_jobs_ready ON rv_jobs (label_key, received_at) WHERE state = 'queued';
CREATE INDEX rv_jobs_runner ON rv_jobs (runner_name) WHERE runner_name IS NOT NULL;
"#,
    ),
    (
        6,
        r#"
-- Each member's number (0-999), given by the database once and kept by its host id: the
-- tail of its warm VMs' and snapshot slots' numbers, so that members sharing a libvirtd
-- never share a VM's name (a hash of the host id would collide among a few dozen).
ALTER TABLE rv_members ADD COLUMN number integer UNIQUE CHECK (number BETWEEN 0 AND 999);
"#,
    ),
    (
        7,
        r#"
-- The lead prunes finished jobs in batches, oldest first (`Claims::prune`).
CREATE INDEX rv_jobs_done ON rv_jobs (updated_at) WHERE state = 'completed';
"#,
    ),
    (
        8,
        r#"
-- How far back the hook's delivery log has been handled, by whichever member led: a new
-- lead reads on from there instead of the whole redelivery window again.
ALTER TABLE rv_leader ADD COLUMN deliveries_checked timestamptz;
"#,
    ),
    (
        9,
        r#"
-- Per runner scale set (by name), the jobs each member's pool of it could run at once: the
-- member holding the set's session (the lead of `scale-sets`) announces their sum.
ALTER TABLE rv_members ADD COLUMN scale_sets jsonb NOT NULL DEFAULT '{}';
"#,
    ),
];

/// The newest version this agent knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map(|(v, _)| *v).unwrap_or(0)
}

/// Brings the schema to [`latest`]; returns the versions applied (none: it was current).
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, FleetError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await?;
    let result = migrate_locked(client).await;
    // The lock is the session's: released here, or when the connection goes.
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    let applied = result?;
    unlocked?;
    Ok(applied)
}

/// A migration's limits, for its transaction only.
const MIGRATION_LIMITS: &str = "SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = '10s'";

async fn migrate_locked(client: &mut Client) -> Result<Vec<i32>, FleetError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS rv_schema (version integer NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let current = version(client).await?;
    if current > latest() {
        return Err(FleetError::SchemaTooNew { found: current, known: latest() });
    }
    let mut applied = Vec::new();
    for (v, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let tx = client.transaction().await?;
        // A migration may take long on large tables (the pool's statement timeout is for
        // the queue's statements), but must not queue behind a long lock for long: every
        // member's statements would queue behind it. It fails instead, and is tried again.
        tx.batch_execute(MIGRATION_LIMITS).await?;
        tx.batch_execute(sql).await.map_err(|source| FleetError::Migration { version: *v, source })?;
        tx.execute("INSERT INTO rv_schema (version) VALUES ($1)", &[v]).await?;
        tx.commit().await?;
        applied.push(*v);
    }
    Ok(applied)
}

/// The schema version of the database (0: none yet).
pub async fn version(client: &Client) -> Result<i32, FleetError> {
    let exists: bool = client.query_one("SELECT to_regclass('rv_schema') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = client.query_one("SELECT max(version) FROM rv_schema", &[]).await?.get(0);
    Ok(v.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_ascend_from_one_without_gaps() {
        for (i, (v, sql)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*v, i as i32 + 1);
            assert!(!sql.trim().is_empty());
        }
        assert_eq!(latest(), MIGRATIONS.len() as i32);
    }
}

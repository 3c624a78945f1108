//! The fleet's webhook intake: deliveries written to PostgreSQL, with group commit, before
//! they are answered. One writer task; deliveries arriving while it commits go into its
//! next transaction. Per delivery: its id (a delivery seen by any member is a duplicate)
//! and its job's row moved forward (never back), which the members read. A
//! transaction that fails fails its whole group: every caller answers 503 and GitHub's
//! redelivery brings the deliveries again.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{FleetError, Pool, client};
use crate::model::{JobAction, JobEvent};

/// Most deliveries written in one transaction.
const MAX_GROUP: usize = 512;

/// The `NOTIFY` channel members `LISTEN` on: a job row changed.
pub const CHANNEL: &str = "rv_events";

type Reply = oneshot::Sender<Result<bool, Arc<FleetError>>>;

/// How far along a job is; its row only moves to a higher rank.
pub fn rank(action: JobAction) -> i16 {
    match action {
        JobAction::Queued | JobAction::Waiting => 0,
        JobAction::InProgress => 1,
        JobAction::Completed => 2,
    }
}

pub fn state_name(action: JobAction) -> &'static str {
    match action {
        JobAction::Queued | JobAction::Waiting => "queued",
        JobAction::InProgress => "in_progress",
        JobAction::Completed => "completed",
    }
}

/// Which events of a group are new: the first of each delivery id not in `seen` (the
/// ids the database already had).
pub fn fresh(events: &[&JobEvent], inserted: &HashSet<String>) -> Vec<bool> {
    let mut taken = HashSet::new();
    events.iter().map(|e| inserted.contains(&e.delivery) && taken.insert(e.delivery.as_str())).collect()
}

/// Per job, the furthest event of the group (the first one among equals).
pub fn furthest<'a>(events: impl IntoIterator<Item = &'a JobEvent>) -> Vec<&'a JobEvent> {
    let mut by_job: BTreeMap<u64, &JobEvent> = BTreeMap::new();
    for e in events {
        let slot = by_job.entry(e.job.id).or_insert(e);
        if rank(e.action) > rank(slot.action) {
            *slot = e;
        }
    }
    by_job.into_values().collect()
}

#[derive(Clone)]
pub struct FleetIntake {
    tx: mpsc::UnboundedSender<(JobEvent, Reply)>,
}

impl FleetIntake {
    /// Starts the writer task; it ends when the last `FleetIntake` is dropped.
    pub fn start(pool: Pool) -> FleetIntake {
        let (tx, mut rx) = mpsc::unbounded_channel::<(JobEvent, Reply)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(next) => group.push(next),
                        Err(_) => break,
                    }
                }
                let events: Vec<&JobEvent> = group.iter().map(|(e, _)| e).collect();
                let result = write(&pool, &events).await;
                drop(events);
                crate::store::answer_group(group, result);
            }
        });
        FleetIntake { tx }
    }

    /// The delivery, committed to the fleet's database with whatever arrived meanwhile.
    /// `false` when any member accepted this delivery id before.
    pub async fn accept(&self, event: JobEvent) -> Result<bool, Arc<FleetError>> {
        let (reply, answer) = oneshot::channel();
        let gone = || Arc::new(FleetError::Closed);
        self.tx.send((event, reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// One transaction for a group of deliveries.
pub async fn write(pool: &Pool, events: &[&JobEvent]) -> Result<Vec<bool>, FleetError> {
    let mut client = client(pool).await?;
    let tx = client.transaction().await?;
    // In one order on every member (two members given the same deliveries at once would
    // otherwise wait on each other's rows, and PostgreSQL would abort one as a deadlock).
    let mut guids: Vec<&str> = events.iter().map(|e| e.delivery.as_str()).collect();
    guids.sort_unstable();
    let inserted: HashSet<String> = tx
        .query(
            "INSERT INTO rv_deliveries (guid) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING RETURNING guid",
            &[&guids],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let fresh = fresh(events, &inserted);
    let new: Vec<&JobEvent> = events.iter().zip(&fresh).filter(|(_, f)| **f).map(|(e, _)| *e).collect();
    if !new.is_empty() {
        let upsert = tx
            .prepare(
                "INSERT INTO rv_jobs (id, state, rank, labels, repository, received_at, info, runner_name, label_key) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, rv_label_key($4)) \
                 ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, rank = EXCLUDED.rank, info = EXCLUDED.info, \
                   runner_name = EXCLUDED.runner_name, updated_at = now() \
                 WHERE rv_jobs.rank < EXCLUDED.rank",
            )
            .await?;
        for e in furthest(new.iter().copied()) {
            let info = serde_json::to_value(&e.job).expect("a job serializes");
            tx.execute(
                &upsert,
                &[
                    &(e.job.id as i64),
                    &state_name(e.action),
                    &rank(e.action),
                    &e.job.labels,
                    &e.job.repository,
                    &e.received_at,
                    &info,
                    &e.job.runner_name,
                ],
            )
            .await?;
        }
        tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL]).await?;
    }
    tx.commit().await?;
    Ok(fresh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::event;

    #[test]
    fn the_first_of_each_new_delivery_id_is_fresh() {
        let (a, b, a2, c) = (
            event("a", 1, JobAction::Queued),
            event("b", 2, JobAction::Queued),
            event("a", 1, JobAction::Queued),
            event("c", 3, JobAction::Queued),
        );
        let inserted: HashSet<String> = ["a", "b"].map(String::from).into();
        assert_eq!(fresh(&[&a, &b, &a2, &c], &inserted), [true, true, false, false]);
    }

    #[test]
    fn each_job_moves_to_its_furthest_event() {
        let evs = [
            event("1", 7, JobAction::Queued),
            event("2", 7, JobAction::Completed),
            event("3", 7, JobAction::InProgress),
            event("4", 8, JobAction::Waiting),
            event("5", 8, JobAction::Queued),
        ];
        let got: Vec<(u64, &str)> = furthest(&evs).iter().map(|e| (e.job.id, e.delivery.as_str())).collect();
        assert_eq!(got, [(7, "2"), (8, "4")]);
    }
}

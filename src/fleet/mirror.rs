//! Each member mirrors the fleet's event log into its own inbox, so its scheduler sees
//! every job of the fleet exactly as a single host sees its webhooks. The log is read
//! from the member's cursor, woken by `NOTIFY` (a poll is the backstop); the events and
//! the new cursor are committed to the member's store together.
//!
//! A sequence value is taken when an event is inserted, not when its transaction commits:
//! event 11 may be visible before 10 is. Reading past 10 would lose it, so the mirror stops
//! at a gap until it fills, or until the event after it is older than [`GAP_TIMEOUT`]
//! (longer than any intake transaction may take: the gap is a transaction that rolled back).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::intake::CHANNEL;
use super::{FleetError, Pool, STATEMENT_TIMEOUT, client};
use crate::model::JobEvent;
use crate::store::Store;

/// The member's position in the fleet's log (`meta`).
pub const CURSOR_KEY: &str = "fleet_cursor";
/// Events mirrored in one local commit.
const CHUNK: i64 = 1024;
/// A gap older than this will not fill (see the module's documentation).
pub const GAP_TIMEOUT: Duration = Duration::from_secs(10);
/// The backstop poll, in case a notification is missed.
const POLL: Duration = Duration::from_secs(2);
/// How soon a held gap is looked at again.
const GAP_RECHECK: Duration = Duration::from_millis(50);

/// How many of `rows` (seq, milliseconds since the event was inserted), read after
/// `cursor` in order, may be applied, and the cursor after them. Stops before a gap
/// unless the event after it is older than `gap_timeout`.
pub fn ready(cursor: i64, rows: &[(i64, i64)], gap_timeout: Duration) -> (usize, i64) {
    let mut next = cursor;
    for (n, (seq, age_ms)) in rows.iter().enumerate() {
        if *seq != next + 1 && (*age_ms as u128) < gap_timeout.as_millis() {
            return (n, next);
        }
        next = *seq;
    }
    (rows.len(), next)
}

pub fn cursor(store: &Store) -> Result<i64, FleetError> {
    Ok(store
        .meta(CURSOR_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(i64::from_be_bytes)
        .unwrap_or(0))
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub mirrored: usize,
    /// Events already in the inbox by delivery id (none unless the member accepted them
    /// itself before, e.g. from polling GitHub).
    pub duplicates: usize,
    /// The pass stopped at a gap that may still fill.
    pub held: bool,
    /// More events wait beyond this pass's chunk.
    pub more: bool,
}

/// Mirrors what the log holds after the member's cursor, up to one chunk; a gap younger
/// than `gap_timeout` holds it.
pub async fn pass(pool: &Pool, store: &Store, gap_timeout: Duration) -> Result<Pass, FleetError> {
    let from = cursor(store)?;
    let rows = client(pool)
        .await?
        .query(
            "SELECT seq, event, (extract(epoch FROM clock_timestamp() - inserted_at) * 1000)::int8 \
             FROM rv_events WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&from, &CHUNK],
        )
        .await?;
    let ages: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(2))).collect();
    let (n, to) = ready(from, &ages, gap_timeout);
    let mut events = Vec::with_capacity(n);
    for r in &rows[..n] {
        let seq: i64 = r.get(0);
        let body: serde_json::Value = r.get(1);
        events.push(serde_json::from_value::<JobEvent>(body).map_err(|source| FleetError::Decode { seq, source })?);
    }
    let refs: Vec<&JobEvent> = events.iter().collect();
    let mut pass = Pass { held: n < rows.len(), more: rows.len() as i64 == CHUNK, ..Pass::default() };
    if to != from {
        let fresh = store.mirror(&refs, CURSOR_KEY, to)?;
        pass.mirrored = fresh.iter().filter(|f| **f).count();
        pass.duplicates = fresh.len() - pass.mirrored;
    }
    Ok(pass)
}

/// Migrates the schema (retrying until the database answers), then mirrors until
/// `shutdown`: see [`run`].
pub async fn run_member(
    member: super::Member,
    store: Arc<Store>,
    inbox_ready: Arc<Notify>,
    shutdown: CancellationToken,
) {
    if member.migrate(&shutdown).await {
        run(member.pool, member.listen, member.tls, store, inbox_ready, shutdown).await;
    }
}

/// Mirrors until `shutdown`: woken by `NOTIFY` on a connection of its own, polling as a
/// backstop; `inbox_ready` wakes the scheduler after each pass that brought something.
/// Errors are logged and retried (the member keeps serving what it has).
pub async fn run(
    pool: Pool,
    listen: tokio_postgres::Config,
    tls: postgres_native_tls::MakeTlsConnector,
    store: Arc<Store>,
    inbox_ready: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let woken = Arc::new(Notify::new());
    let listener = tokio::spawn(listen_loop(listen, tls, woken.clone(), shutdown.clone()));
    let mut failing = false;
    loop {
        let wait = match pass(&pool, &store, GAP_TIMEOUT).await {
            Ok(p) => {
                if failing {
                    tracing::info!("fleet log readable again");
                    failing = false;
                }
                if p.mirrored > 0 {
                    inbox_ready.notify_one();
                }
                if p.more {
                    Duration::ZERO
                } else if p.held {
                    GAP_RECHECK
                } else {
                    POLL
                }
            }
            Err(e) => {
                if !failing {
                    tracing::error!(error = %e, "cannot read the fleet's event log; retrying");
                    failing = true;
                }
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = woken.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
    listener.abort();
}

/// `LISTEN`s on its own connection (a pooled one cannot deliver notifications) and wakes
/// the mirror for each; reconnects after an error.
async fn listen_loop(
    config: tokio_postgres::Config,
    tls: postgres_native_tls::MakeTlsConnector,
    woken: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let statement = format!("LISTEN {CHANNEL}");
                let listen = client.batch_execute(&statement);
                // The connection must be polled for the LISTEN to complete.
                let mut listen = std::pin::pin!(listen);
                let ok = loop {
                    tokio::select! {
                        r = &mut listen => break r.is_ok(),
                        m = messages.next() => if m.is_none() { break false },
                    }
                };
                if ok {
                    woken.notify_one();
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            m = messages.next() => match m {
                                Some(Ok(AsyncMessage::Notification(_))) => woken.notify_one(),
                                Some(Ok(_)) => {}
                                Some(Err(_)) | None => break,
                            },
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "fleet LISTEN connection failed; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(STATEMENT_TIMEOUT.min(Duration::from_secs(2))) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_holds_the_cursor_until_it_fills_or_is_old() {
        let t = Duration::from_secs(10);
        let table: &[(i64, &[(i64, i64)], (usize, i64))] = &[
            (0, &[], (0, 0)),
            (0, &[(1, 5), (2, 5), (3, 5)], (3, 3)),
            // 2 is not visible yet and 3 is young: 2 may still commit.
            (0, &[(1, 5), (3, 5)], (1, 1)),
            (1, &[(3, 5), (4, 5)], (0, 1)),
            // 3 is older than the timeout: 2 rolled back.
            (1, &[(3, 10_000), (4, 5)], (2, 4)),
            // A later gap holds only what follows it.
            (4, &[(5, 1), (6, 1), (9, 20), (10, 1)], (2, 6)),
            // Sequences start anywhere after a restore: the first gap is judged the same.
            (0, &[(100, 60_000)], (1, 100)),
        ];
        for (cursor, rows, want) in table {
            assert_eq!(ready(*cursor, rows, t), *want, "cursor {cursor} rows {rows:?}");
        }
    }
}

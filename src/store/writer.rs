//! The store's one writer thread (see [`Writer`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use super::{Batch, SchedulerStore, Snapshot, Store, StoreError};
use crate::model::JobEvent;

/// Most deliveries written in one commit.
const MAX_GROUP: usize = 512;

type Reply = tokio::sync::oneshot::Sender<Result<bool, Arc<StoreError>>>;

/// A write the writer thread makes in its turn; it answers through what it captured.
type Write = Box<dyn FnOnce(&Store) + Send>;

// `Accept` is the one sent thousands of times a second: boxing it would cost each an
// allocation to save the rare others a few bytes.
#[allow(clippy::large_enum_variant)]
enum Msg {
    /// A webhook delivery, answered once durable.
    Accept(JobEvent, Reply),
    /// Inbox entries the scheduler has applied (with nothing else to commit): they leave
    /// with the writer's next transaction.
    Release(Vec<u64>),
    /// The scheduler's commits and other writes, in the order they arrive.
    Write(Write),
}

/// The store's one writer: a thread that makes every transaction of a running agent, so
/// that no caller waits on redb's write lock (which is not fair: under a stream of
/// webhooks a second writer could wait for many commits).
///
/// - Webhook deliveries: every delivery that arrives while a commit is being made waits
///   for the next one, which writes them all (group commit). A caller is answered only
///   once the commit that holds its delivery is durable, so a crash loses nothing
///   answered; under load N deliveries cost one fsync, not N.
/// - The scheduler's commits queue behind at most the commit in progress.
/// - Inbox entries the scheduler applied without changing anything else leave with the
///   next transaction, without a commit of their own: if a crash undoes their removal they
///   are applied again and change nothing (job states only move forward).
///
/// In the simulator ([`crate::offload::set_inline`]) there is no thread: each write is made
/// at once by its caller, on the simulator's one thread, so that a seed's run is the same
/// every time (deliveries are not grouped then).
pub struct Writer {
    tx: mpsc::Sender<Msg>,
    store: Arc<Store>,
    commits: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Inline (no thread): applied inbox entries whose removal is not committed yet.
    inline: Option<std::sync::Mutex<Vec<u64>>>,
}

/// Ends the thread once its last transaction is made: the store is closed when the writer
/// is gone (an agent restarted in the same process opens it again).
impl Drop for Writer {
    fn drop(&mut self) {
        drop(std::mem::replace(&mut self.tx, mpsc::channel().0));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Writer {
    /// Starts the writer thread over `store`.
    pub fn start(store: Arc<Store>) -> Writer {
        let (tx, rx) = mpsc::channel::<Msg>();
        let commits = Arc::new(AtomicU64::new(0));
        if crate::offload::is_inline() {
            return Writer { tx, store, commits, thread: None, inline: Some(Default::default()) };
        }
        let (counted, st) = (commits.clone(), store.clone());
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(&st, &rx, &counted))
            .expect("spawn the store's writer thread");
        Writer { tx, store, commits, thread: Some(thread), inline: None }
    }

    /// Inline: the applied entries not committed yet.
    fn released(&self) -> Option<std::sync::MutexGuard<'_, Vec<u64>>> {
        self.inline.as_ref().map(|r| r.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Records the delivery id and queues the event, durably, with whatever else arrives
    /// meanwhile. `false` when this delivery id was already accepted.
    pub async fn accept(&self, event: JobEvent) -> Result<bool, Arc<StoreError>> {
        if let Some(mut released) = self.released() {
            self.commits.fetch_add(1, Ordering::Relaxed);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.store.accept_with_meta(&[&event], None, &released)
            }))
            .unwrap_or(Err(StoreError::Panicked));
            if result.is_ok() {
                released.clear();
            }
            return result.map(|each| each[0]).map_err(Arc::new);
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || Arc::new(StoreError::Closed);
        self.tx.send(Msg::Accept(event, reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Runs `write` on the writer thread, in turn, and waits for its result.
    fn write<T: Send + 'static>(
        &self,
        write: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        if let Some(mut released) = self.released() {
            // As the thread does: released entries leave before a later write.
            if !released.is_empty() {
                self.commits.fetch_add(1, Ordering::Relaxed);
                if self.store.accept_with_meta(&[], None, &released).is_ok() {
                    released.clear();
                }
            }
            drop(released);
            self.commits.fetch_add(1, Ordering::Relaxed);
            return std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write(&self.store)))
                .unwrap_or(Err(StoreError::Panicked));
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let job: Write = Box::new(move |s| {
            let _ = reply.send(write(s));
        });
        self.tx.send(Msg::Write(job)).map_err(|_| StoreError::Closed)?;
        // Dropped unanswered: the write panicked (the thread caught it).
        answer.recv().map_err(|_| StoreError::Panicked)?
    }

    /// Transactions made so far (a group of deliveries counts one).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

fn write_loop(store: &Store, rx: &mpsc::Receiver<Msg>, commits: &AtomicU64) {
    // Applied inbox entries whose removal is not committed yet.
    let mut released: Vec<u64> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut group: Vec<(JobEvent, Reply)> = Vec::new();
        let mut then: Option<Write> = None;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Accept(event, reply) => group.push((event, reply)),
                Msg::Release(seqs) => released.extend(seqs),
                // Written after the group, so that it never waits for more than one commit.
                Msg::Write(w) => then = Some(w),
            }
            if then.is_none() && group.len() < MAX_GROUP {
                next = rx.try_recv().ok();
            }
        }
        if !group.is_empty() || !released.is_empty() {
            let events: Vec<&JobEvent> = group.iter().map(|(e, _)| e).collect();
            // A panic in the store fails this group (503, redelivered later), not the
            // thread: the next deliveries are written again.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                store.accept_with_meta(&events, None, &released)
            }))
            .unwrap_or(Err(StoreError::Panicked));
            commits.fetch_add(1, Ordering::Relaxed);
            // On failure the released entries stay for the next transaction.
            if result.is_ok() {
                released.clear();
            }
            answer_group(group, result);
        }
        if let Some(w) = then {
            commits.fetch_add(1, Ordering::Relaxed);
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w(store)));
        }
    }
}

/// Answers each caller of a group commit: its delivery's own result, or the group's error.
pub(crate) fn answer_group<T, E>(
    group: Vec<(JobEvent, tokio::sync::oneshot::Sender<Result<T, Arc<E>>>)>,
    result: Result<Vec<T>, E>,
) {
    match result {
        Ok(each) => {
            for ((_, reply), one) in group.into_iter().zip(each) {
                let _ = reply.send(Ok(one));
            }
        }
        Err(e) => {
            let e = Arc::new(e);
            for (_, reply) in group {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// The scheduler's store of a single host: reads straight from the store, writes through
/// the writer thread.
impl SchedulerStore for Writer {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.store.load()
    }
    fn inbox(&self, after: u64, max: usize) -> Result<Vec<(u64, JobEvent)>, StoreError> {
        self.store.inbox(after, max)
    }
    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        if batch.only_applies_inbox() {
            if let Some(mut released) = self.released() {
                released.extend(&batch.inbox_done);
                return Ok(());
            }
            return self.tx.send(Msg::Release(batch.inbox_done.clone())).map_err(|_| StoreError::Closed);
        }
        let batch = batch.clone();
        self.write(move |s| s.commit(&batch))
    }
    fn delivery_seen(&self, guid: &str) -> Result<bool, StoreError> {
        self.store.delivery_seen(guid)
    }
    fn prune_deliveries(&self, age: Duration, now: SystemTime) -> Result<usize, StoreError> {
        self.write(move |s| s.prune_deliveries(age, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobAction, JobState};
    use crate::store::tests::event;

    /// Group commit: deliveries arriving together share commits, each caller gets its own
    /// answer (accepted or duplicate, also within one group), and all of them are durable.
    #[test]
    fn deliveries_arriving_together_share_commits_and_each_is_answered() {
        let dir = crate::test_support::tempdir();
        let store = Arc::new(Store::open(&dir).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let accepter = Arc::new(Writer::start(store.clone()));
        let answers: Vec<(u64, bool)> = rt.block_on(async {
            let tasks: Vec<_> = (0..500u64)
                .map(|i| {
                    let a = accepter.clone();
                    // Every tenth delivery id is sent twice.
                    let id = if i % 10 == 9 { i - 1 } else { i };
                    tokio::spawn(async move {
                        (id, a.accept(event(&format!("d{id}"), i, JobAction::Queued)).await.unwrap())
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        assert_eq!(answers.iter().filter(|(_, fresh)| *fresh).count(), 450);
        for id in (8..500).step_by(10) {
            let twice: Vec<bool> = answers.iter().filter(|(i, _)| *i == id).map(|(_, f)| *f).collect();
            assert_eq!(twice.iter().filter(|f| **f).count(), 1, "delivery d{id} accepted once: {twice:?}");
        }
        let commits = accepter.commits();
        assert!((1..=50).contains(&commits), "500 deliveries in {commits} commits");
        // Answered only once committed: every accepted delivery is in the inbox.
        assert_eq!(store.inbox(0, usize::MAX).unwrap().len(), 450);
    }

    fn seqs(s: &Store, after: u64) -> Vec<(u64, String)> {
        s.inbox(after, usize::MAX).unwrap().into_iter().map(|(seq, e)| (seq, e.delivery)).collect()
    }

    /// The writer makes the scheduler's transactions too: applied entries it only releases
    /// leave with the writer's next transaction (before any later write), a batch with
    /// changes is committed before `commit` returns, and entries keep their order across
    /// an emptied inbox, so that the scheduler reads on from the last one it applied.
    #[test]
    fn the_writer_commits_the_schedulers_batches_in_turn_and_releases_applied_entries() {
        let dir = crate::test_support::tempdir();
        let store = Arc::new(Store::open(&dir).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let writer = Writer::start(store.clone());
        let accept = |d: &str| rt.block_on(writer.accept(event(d, 1, JobAction::Queued))).unwrap();
        for d in ["d1", "d2", "d3"] {
            assert!(accept(d));
        }
        assert_eq!(seqs(&store, 0), [(1, "d1".into()), (2, "d2".into()), (3, "d3".into())]);
        assert_eq!(seqs(&store, 2), [(3, "d3".into())]);

        let release = |seqs: &[u64]| Batch { inbox_done: seqs.to_vec(), ..Default::default() };
        writer.commit(&release(&[1, 2])).unwrap();
        assert!(accept("d4"));
        assert_eq!(seqs(&store, 0), [(3, "d3".into()), (4, "d4".into())], "released by the time d4 is durable");

        writer.commit(&release(&[3, 4])).unwrap();
        let mut with_job = Batch::default();
        with_job.jobs.push(crate::scheduler::fixtures::job(7, "p", "o/r", JobState::Queued, 0));
        writer.commit(&with_job).unwrap();
        assert!(store.load().unwrap().jobs.contains_key(&7), "committed before commit returned");
        assert_eq!(seqs(&store, 0), [], "released before the later write");

        assert!(accept("d5"));
        assert!(!accept("d1"), "a released entry's delivery id is still known");
        assert_eq!(seqs(&store, 4), [(5, "d5".into())], "numbered on after the inbox was empty");

        // A write that panics fails alone; the writer goes on.
        assert!(matches!(writer.write(|_| -> Result<(), StoreError> { panic!("boom") }), Err(StoreError::Panicked)));
        assert!(accept("d6"));
        drop(writer);
        drop(store);
        let reopened = Store::open(&dir).unwrap();
        assert_eq!(seqs(&reopened, 0), [(5, "d5".into()), (6, "d6".into())]);
        assert!(reopened.accept(&event("d7", 1, JobAction::Queued)).unwrap());
        assert_eq!(seqs(&reopened, 6), [(7, "d7".into())]);
    }
}

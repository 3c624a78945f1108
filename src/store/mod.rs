//! The embedded store (redb, one file in `state_dir`): delivery ids seen, the inbox of
//! accepted job events not yet applied, jobs, VMs and a few settings. Every write is one
//! durable transaction, made by one writer thread ([`Writer`]): webhook deliveries
//! arriving together share one (group commit), and the scheduler's commits take their turn
//! with them. The file is locked: a second agent on the same state dir fails to start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::model::{JobEvent, JobRec, SlotRec, VmRec};

mod deliveries;
mod writer;

use deliveries::DeliveryIndex;
pub use writer::Writer;
pub(crate) use writer::answer_group;

/// Delivery ids seen, in arrival order: entry → (received, unix seconds; delivery id).
const DELIVERY_LOG: TableDefinition<u64, (u64, &str)> = TableDefinition::new("delivery_log");
/// Before the log: delivery id → received. Moved into the log when the store is opened.
const LEGACY_DELIVERIES: TableDefinition<&str, u64> = TableDefinition::new("deliveries");
const INBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("inbox");
const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SLOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("slots");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("state store: {0}")]
    Db(#[from] redb::Error),
    #[error("state store record: {0}")]
    Encode(#[from] serde_json::Error),
    /// The intake's writer thread is gone (the agent is stopping).
    #[error("state store: the intake writer has stopped")]
    Closed,
    #[error("state store: the write panicked")]
    Panicked,
    #[error("cannot create state directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn dberr<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into())
}

/// Opens the store's database again (after an I/O error, redb refuses every write until
/// it is reopened).
type Reopen = Box<dyn Fn() -> Result<Database, StoreError> + Send + Sync>;

pub struct Store {
    /// `None` only while it is being reopened, or if reopening failed (tried again at the
    /// next use).
    db: std::sync::RwLock<Option<Database>>,
    reopen: Reopen,
    /// The next inbox entry's sequence number: entries are numbered in commit order for as
    /// long as the store is open, even once the inbox has been emptied.
    next_seq: AtomicU64,
    deliveries: Mutex<DeliveryIndex>,
}

/// Changes the scheduler commits together.
#[derive(Default, Clone)]
pub struct Batch {
    pub jobs: Vec<JobRec>,
    pub remove_jobs: Vec<u64>,
    pub vms: Vec<VmRec>,
    pub remove_vms: Vec<String>,
    pub slots: Vec<SlotRec>,
    pub remove_slots: Vec<String>,
    pub inbox_done: Vec<u64>,
    pub meta: Vec<(String, Vec<u8>)>,
}

impl Batch {
    /// Only applied inbox entries leave: nothing that a replay of them would not redo.
    pub fn only_applies_inbox(&self) -> bool {
        self.jobs.is_empty()
            && self.remove_jobs.is_empty()
            && self.vms.is_empty()
            && self.remove_vms.is_empty()
            && self.slots.is_empty()
            && self.remove_slots.is_empty()
            && self.meta.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.only_applies_inbox() && self.inbox_done.is_empty()
    }
}

pub struct Snapshot {
    pub jobs: BTreeMap<u64, JobRec>,
    pub vms: BTreeMap<String, VmRec>,
    pub slots: BTreeMap<String, SlotRec>,
    pub meta: BTreeMap<String, Vec<u8>>,
}

/// What the scheduler needs from its store: the narrow seam a second backend (PostgreSQL,
/// for several hosts) implements without touching the scheduler. The webhook intake writes
/// through [`Writer::accept`] (a fleet member's mirror through [`Store::mirror`]).
pub trait SchedulerStore: Send + Sync + 'static {
    /// Jobs, VMs and settings, as last committed.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Accepted job events not yet applied that follow entry `after`, oldest first, at most
    /// `max` of them (entries are numbered in commit order).
    fn inbox(&self, after: u64, max: usize) -> Result<Vec<(u64, JobEvent)>, StoreError>;
    /// One durable transaction: the scheduler's changes, and the inbox entries applied.
    /// A batch that only applies inbox entries may leave later (see [`Writer`]).
    fn commit(&self, batch: &Batch) -> Result<(), StoreError>;
    fn delivery_seen(&self, guid: &str) -> Result<bool, StoreError>;
    fn prune_deliveries(&self, age: Duration, now: SystemTime) -> Result<usize, StoreError>;
}

impl SchedulerStore for Store {
    fn load(&self) -> Result<Snapshot, StoreError> {
        Store::load(self)
    }
    fn inbox(&self, after: u64, max: usize) -> Result<Vec<(u64, JobEvent)>, StoreError> {
        Store::inbox(self, after, max)
    }
    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        Store::commit(self, batch)
    }
    fn delivery_seen(&self, guid: &str) -> Result<bool, StoreError> {
        Store::delivery_seen(self, guid)
    }
    fn prune_deliveries(&self, age: Duration, now: SystemTime) -> Result<usize, StoreError> {
        Store::prune_deliveries(self, age, now)
    }
}

/// The store's page cache. redb's default (1 GiB) would let the agent's memory grow with
/// every delivery id it keeps for deduplication; the working set (the upper levels of the
/// trees, the inbox, jobs and VMs) fits in a few MiB, and pages beyond it come from the
/// kernel's page cache.
const CACHE_BYTES: usize = 8 << 20;

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::Dir { path: state_dir.into(), source })?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o750));
        let path = state_dir.join("state.redb");
        let open = move || {
            Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create(&path)
                .map_err(|e| StoreError::Open { path: path.clone(), source: e.into() })
        };
        let db = open()?;
        let _ = std::fs::set_permissions(state_dir.join("state.redb"), std::fs::Permissions::from_mode(0o600));
        Store::init(db, Box::new(open))
    }

    /// A store on `backend` instead of a file (the simulator's disk, which a crash can tear).
    pub fn open_on(backend: impl redb::StorageBackend + Clone) -> Result<Store, StoreError> {
        let open = move || {
            Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create_with_backend(backend.clone())
                .map_err(|e| StoreError::Open { path: "(backend)".into(), source: e.into() })
        };
        Store::init(open()?, Box::new(open))
    }

    fn init(db: Database, reopen: Reopen) -> Result<Store, StoreError> {
        let (next_seq, index) = Store::prepare(&db)?;
        Ok(Store {
            db: std::sync::RwLock::new(Some(db)),
            reopen,
            next_seq: AtomicU64::new(next_seq),
            deliveries: Mutex::new(index),
        })
    }

    /// After a write failed on an I/O error (a full file system, say), redb refuses every
    /// later one until the database is opened again: reopened here, and `op` tried once more,
    /// so that the agent writes again as soon as the disk lets it (it stayed stuck before).
    fn retrying<T>(&self, op: impl Fn(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let once = || {
            let db = self.db.read().unwrap_or_else(|p| p.into_inner());
            match db.as_ref() {
                Some(db) => op(db),
                None => Err(StoreError::Db(redb::Error::PreviousIo)),
            }
        };
        match once() {
            Err(StoreError::Db(redb::Error::PreviousIo)) => {
                self.reopen_db()?;
                once()
            }
            other => other,
        }
    }

    fn reopen_db(&self) -> Result<(), StoreError> {
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        // The old one goes first: it holds the file's lock.
        drop(db.take());
        let fresh = (self.reopen)()?;
        let (next_seq, index) = Store::prepare(&fresh)?;
        // Numbering goes on from where it was: the scheduler reads the inbox on from the
        // last entry it applied, and an emptied inbox would number from 1 again (every
        // delivery accepted after the reopen went unread: found by the simulator).
        self.next_seq.fetch_max(next_seq, Ordering::Relaxed);
        *self.deliveries.lock().unwrap_or_else(|e| e.into_inner()) = index;
        *db = Some(fresh);
        tracing::warn!("state store reopened after an I/O error");
        Ok(())
    }

    /// Tables made, the inbox's next number and the delivery index read.
    fn prepare(db: &Database) -> Result<(u64, DeliveryIndex), StoreError> {
        let txn = db.begin_write().map_err(dberr)?;
        {
            txn.open_table(INBOX).map_err(dberr)?;
            txn.open_table(JOBS).map_err(dberr)?;
            txn.open_table(VMS).map_err(dberr)?;
            txn.open_table(META).map_err(dberr)?;
            txn.open_table(SLOTS).map_err(dberr)?;
        }
        let next_seq = {
            let inbox = txn.open_table(INBOX).map_err(dberr)?;
            inbox.last().map_err(dberr)?.map(|(k, _)| k.value() + 1).unwrap_or(1)
        };
        let mut index = DeliveryIndex::default();
        {
            let mut log = txn.open_table(DELIVERY_LOG).map_err(dberr)?;
            // A store from before the log: its ids join the log, oldest first.
            let mut legacy: Vec<(u64, String)> = match txn.open_table(LEGACY_DELIVERIES) {
                Ok(t) => {
                    let mut ids = Vec::new();
                    for row in t.iter().map_err(dberr)? {
                        let (k, v) = row.map_err(dberr)?;
                        ids.push((v.value(), k.value().to_string()));
                    }
                    ids
                }
                Err(redb::TableError::TableDoesNotExist(_)) => Vec::new(),
                Err(e) => return Err(dberr(e)),
            };
            let mut next = log.last().map_err(dberr)?.map(|(k, _)| k.value() + 1).unwrap_or(1);
            legacy.sort_unstable();
            for (received, id) in &legacy {
                log.insert(next, (*received, id.as_str())).map_err(dberr)?;
                next += 1;
            }
            index.next = next;
            index.by_hash.reserve(log.len().map_err(dberr)? as usize);
            for row in log.iter().map_err(dberr)? {
                let (k, v) = row.map_err(dberr)?;
                let h = index.hash(v.value().1);
                index.insert(h, k.value());
            }
        }
        let _ = txn.delete_table(LEGACY_DELIVERIES).map_err(dberr)?;
        txn.commit().map_err(dberr)?;
        Ok((next_seq, index))
    }

    /// Webhook intake: records the delivery id and queues the event, atomically.
    /// `false` when this delivery id was already accepted (a redelivery or duplicate).
    pub fn accept(&self, event: &JobEvent) -> Result<bool, StoreError> {
        Ok(self.accept_many(&[event])?[0])
    }

    /// [`Store::accept`] for several deliveries in one durable transaction. Per event,
    /// `false` when its delivery id was accepted before (or earlier in `events`).
    pub fn accept_many(&self, events: &[&JobEvent]) -> Result<Vec<bool>, StoreError> {
        self.accept_with_meta(events, None, &[])
    }

    /// A setting (`meta`), as last committed.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.retrying(|db| {
            let txn = db.begin_read().map_err(dberr)?;
            let meta = txn.open_table(META).map_err(dberr)?;
            Ok(meta.get(key).map_err(dberr)?.map(|v| v.value().to_vec()))
        })
    }

    /// Deliveries in, applied inbox entries (`release`) out, and a setting, in one
    /// transaction; durable unless it only releases entries (see [`Store::commit`]).
    fn accept_with_meta(
        &self,
        events: &[&JobEvent],
        meta: Option<(&str, &[u8])>,
        release: &[u64],
    ) -> Result<Vec<bool>, StoreError> {
        self.retrying(|db| {
            let mut txn = db.begin_write().map_err(dberr)?;
            if events.is_empty() && meta.is_none() {
                txn.set_durability(redb::Durability::None).map_err(dberr)?;
            }
            let mut fresh = Vec::with_capacity(events.len());
            let mut next = self.next_seq.load(Ordering::Relaxed);
            let mut index = self.deliveries.lock().unwrap_or_else(|e| e.into_inner());
            // Ids indexed by this transaction: taken out again if it fails.
            let mut added: Vec<(u64, u64)> = Vec::new();
            let written = (|| {
                let mut log = txn.open_table(DELIVERY_LOG).map_err(dberr)?;
                let mut inbox = txn.open_table(INBOX).map_err(dberr)?;
                for seq in release {
                    inbox.remove(seq).map_err(dberr)?;
                }
                for event in events {
                    // Also sees the ids written earlier in this transaction.
                    if index.seen(&log, &event.delivery)? {
                        fresh.push(false);
                        continue;
                    }
                    let entry = index.next + added.len() as u64;
                    log.insert(entry, (unix(event.received_at), event.delivery.as_str())).map_err(dberr)?;
                    let h = index.hash(&event.delivery);
                    index.insert(h, entry);
                    added.push((h, entry));
                    inbox.insert(next, serde_json::to_vec(event)?.as_slice()).map_err(dberr)?;
                    next += 1;
                    fresh.push(true);
                }
                if let Some((key, value)) = meta {
                    txn.open_table(META).map_err(dberr)?.insert(key, value).map_err(dberr)?;
                }
                Ok::<_, StoreError>(())
            })()
            .and_then(|()| txn.commit().map_err(dberr));
            if let Err(e) = written {
                for (h, entry) in added {
                    index.remove(h, entry);
                }
                return Err(e);
            }
            index.next += added.len() as u64;
            // Write transactions are one at a time: nothing else moved it meanwhile.
            self.next_seq.store(next, Ordering::Relaxed);
            Ok(fresh)
        })
    }

    pub fn delivery_seen(&self, guid: &str) -> Result<bool, StoreError> {
        self.retrying(|db| {
            let txn = db.begin_read().map_err(dberr)?;
            let log = txn.open_table(DELIVERY_LOG).map_err(dberr)?;
            self.deliveries.lock().unwrap_or_else(|e| e.into_inner()).seen(&log, guid)
        })
    }

    /// Accepted events not yet applied that follow entry `after`, oldest first.
    pub fn inbox(&self, after: u64, max: usize) -> Result<Vec<(u64, JobEvent)>, StoreError> {
        self.retrying(|db| {
            let txn = db.begin_read().map_err(dberr)?;
            let inbox = txn.open_table(INBOX).map_err(dberr)?;
            let mut out = Vec::new();
            for row in inbox.range(after.saturating_add(1)..).map_err(dberr)?.take(max) {
                let (k, v) = row.map_err(dberr)?;
                out.push((k.value(), serde_json::from_slice(v.value())?));
            }
            Ok(out)
        })
    }

    pub fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        self.retrying(|db| {
            if batch.is_empty() {
                return Ok(());
            }
            let mut txn = db.begin_write().map_err(dberr)?;
            if batch.only_applies_inbox() {
                // Nothing but applied inbox entries leaving: if a crash undoes it, they are
                // applied again and change nothing (job states only move forward). Durable with
                // the next durable commit (every intake commit is one), one fsync saved.
                txn.set_durability(redb::Durability::None).map_err(dberr)?;
            }
            // Only the tables the batch changes are opened (an opened table's root is
            // written back at commit).
            if !batch.jobs.is_empty() || !batch.remove_jobs.is_empty() {
                let mut jobs = txn.open_table(JOBS).map_err(dberr)?;
                for j in &batch.jobs {
                    jobs.insert(j.info.id, serde_json::to_vec(j)?.as_slice()).map_err(dberr)?;
                }
                for id in &batch.remove_jobs {
                    jobs.remove(id).map_err(dberr)?;
                }
            }
            if !batch.vms.is_empty() || !batch.remove_vms.is_empty() {
                let mut vms = txn.open_table(VMS).map_err(dberr)?;
                for v in &batch.vms {
                    vms.insert(v.name.as_str(), serde_json::to_vec(v)?.as_slice()).map_err(dberr)?;
                }
                for name in &batch.remove_vms {
                    vms.remove(name.as_str()).map_err(dberr)?;
                }
            }
            if !batch.slots.is_empty() || !batch.remove_slots.is_empty() {
                let mut slots = txn.open_table(SLOTS).map_err(dberr)?;
                for slot in &batch.slots {
                    slots.insert(slot.name.as_str(), serde_json::to_vec(slot)?.as_slice()).map_err(dberr)?;
                }
                for name in &batch.remove_slots {
                    slots.remove(name.as_str()).map_err(dberr)?;
                }
            }
            if !batch.inbox_done.is_empty() {
                let mut inbox = txn.open_table(INBOX).map_err(dberr)?;
                for seq in &batch.inbox_done {
                    inbox.remove(seq).map_err(dberr)?;
                }
            }
            if !batch.meta.is_empty() {
                let mut meta = txn.open_table(META).map_err(dberr)?;
                for (k, v) in &batch.meta {
                    meta.insert(k.as_str(), v.as_slice()).map_err(dberr)?;
                }
            }
            txn.commit().map_err(dberr)?;
            Ok(())
        })
    }

    pub fn load(&self) -> Result<Snapshot, StoreError> {
        self.retrying(|db| {
            let txn = db.begin_read().map_err(dberr)?;
            let mut jobs = BTreeMap::new();
            for row in txn.open_table(JOBS).map_err(dberr)?.iter().map_err(dberr)? {
                let (k, v) = row.map_err(dberr)?;
                jobs.insert(k.value(), serde_json::from_slice(v.value())?);
            }
            let mut vms = BTreeMap::new();
            for row in txn.open_table(VMS).map_err(dberr)?.iter().map_err(dberr)? {
                let (k, v) = row.map_err(dberr)?;
                vms.insert(k.value().to_string(), serde_json::from_slice(v.value())?);
            }
            let mut slots = BTreeMap::new();
            for row in txn.open_table(SLOTS).map_err(dberr)?.iter().map_err(dberr)? {
                let (k, v) = row.map_err(dberr)?;
                slots.insert(k.value().to_string(), serde_json::from_slice(v.value())?);
            }
            let mut meta = BTreeMap::new();
            for row in txn.open_table(META).map_err(dberr)?.iter().map_err(dberr)? {
                let (k, v) = row.map_err(dberr)?;
                meta.insert(k.value().to_string(), v.value().to_vec());
            }
            Ok(Snapshot { jobs, vms, slots, meta })
        })
    }

    /// Forgets delivery ids older than `age` (GitHub redelivers within 3 days), from the
    /// log's oldest end.
    pub fn prune_deliveries(&self, age: Duration, now: SystemTime) -> Result<usize, StoreError> {
        self.retrying(|db| {
            let cutoff = unix(now).saturating_sub(age.as_secs());
            let txn = db.begin_write().map_err(dberr)?;
            let old: Vec<(u64, String)> = {
                let mut log = txn.open_table(DELIVERY_LOG).map_err(dberr)?;
                let mut old = Vec::new();
                for row in log.iter().map_err(dberr)? {
                    let (k, v) = row.map_err(dberr)?;
                    let (received, id) = v.value();
                    if received >= cutoff {
                        break;
                    }
                    old.push((k.value(), id.to_string()));
                }
                for (entry, _) in &old {
                    log.remove(entry).map_err(dberr)?;
                }
                old
            };
            txn.commit().map_err(dberr)?;
            let mut index = self.deliveries.lock().unwrap_or_else(|e| e.into_inner());
            for (entry, id) in &old {
                let h = index.hash(id);
                index.remove(h, *entry);
            }
            Ok(old.len())
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::*;

    pub fn event(delivery: &str, id: u64, action: JobAction) -> JobEvent {
        JobEvent {
            delivery: delivery.into(),
            action,
            job: JobInfo {
                id,
                run_id: 1,
                run_attempt: 1,
                name: "build".into(),
                workflow_name: "CI".into(),
                labels: vec!["self-hosted".into()],
                repository: "o/r".into(),
                html_url: String::new(),
                runner_name: None,
                conclusion: None,
                scale_set: None,
            },
            received_at: SystemTime::now(),
        }
    }

    #[test]
    fn only_a_batch_that_merely_applies_inbox_entries_skips_the_fsync() {
        let only_inbox = Batch { inbox_done: vec![1, 2], ..Default::default() };
        assert!(only_inbox.only_applies_inbox());
        let mut with_job = Batch { inbox_done: vec![1], ..Default::default() };
        with_job.jobs.push(crate::scheduler::fixtures::job(7, "p", "o/r", JobState::Queued, 0));
        assert!(!with_job.only_applies_inbox());
        let with_meta =
            Batch { inbox_done: vec![1], meta: vec![("draining".into(), b"1".to_vec())], ..Default::default() };
        assert!(!with_meta.only_applies_inbox());
        let removing = Batch { remove_vms: vec!["rv-p-1".into()], ..Default::default() };
        assert!(!removing.only_applies_inbox());
    }

    #[test]
    fn deliveries_are_accepted_once_and_survive_reopen() {
        let dir = crate::test_support::tempdir();
        {
            let s = Store::open(&dir).unwrap();
            assert!(s.accept(&event("g1", 1, JobAction::Queued)).unwrap());
            assert!(!s.accept(&event("g1", 1, JobAction::Queued)).unwrap());
            assert!(s.accept(&event("g2", 1, JobAction::Completed)).unwrap());
            let inbox = s.inbox(0, usize::MAX).unwrap();
            assert_eq!(inbox.len(), 2);
            assert_eq!(s.inbox(0, 1).unwrap().iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [inbox[0].0]);
            assert!(inbox[0].0 < inbox[1].0);
            let mut b = Batch::default();
            b.inbox_done.push(inbox[0].0);
            s.commit(&b).unwrap();
        }
        let s = Store::open(&dir).unwrap();
        let inbox = s.inbox(0, usize::MAX).unwrap();
        assert_eq!(inbox.len(), 1);
        assert_eq!(inbox[0].1.delivery, "g2");
        assert!(s.delivery_seen("g1").unwrap());
        assert_eq!(
            s.prune_deliveries(Duration::from_secs(60), SystemTime::now() + Duration::from_secs(3600)).unwrap(),
            2
        );
        assert!(!s.delivery_seen("g1").unwrap());
    }

    /// A store from before the delivery log: its ids are moved into the log, still known,
    /// pruned by age like the others, and the old table is gone.
    #[test]
    fn delivery_ids_of_an_older_store_join_the_log() {
        let dir = crate::test_support::tempdir();
        let now = unix(SystemTime::now());
        {
            let db = Database::create(dir.join("state.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(LEGACY_DELIVERIES).unwrap();
                t.insert("new", now).unwrap();
                t.insert("old", now - 7200).unwrap();
            }
            txn.commit().unwrap();
        }
        let s = Store::open(&dir).unwrap();
        assert!(s.delivery_seen("new").unwrap() && s.delivery_seen("old").unwrap());
        assert!(!s.accept(&event("old", 1, JobAction::Queued)).unwrap(), "a known id is a duplicate");
        assert!(s.accept(&event("fresh", 1, JobAction::Queued)).unwrap());
        let db = s.db.read().unwrap();
        let txn = db.as_ref().unwrap().begin_read().unwrap();
        assert!(txn.open_table(LEGACY_DELIVERIES).is_err(), "the old table is gone");
        let log: Vec<String> =
            txn.open_table(DELIVERY_LOG).unwrap().iter().unwrap().map(|r| r.unwrap().1.value().1.to_string()).collect();
        assert_eq!(log, ["old", "new", "fresh"], "oldest first");
        drop(txn);
        drop(db);
        assert_eq!(s.prune_deliveries(Duration::from_secs(3600), SystemTime::now()).unwrap(), 1);
        assert!(!s.delivery_seen("old").unwrap());
        assert!(s.delivery_seen("new").unwrap() && s.delivery_seen("fresh").unwrap());
    }

    #[test]
    fn a_second_agent_cannot_open_the_same_store() {
        let dir = crate::test_support::tempdir();
        let _first = Store::open(&dir).unwrap();
        let err = Store::open(&dir).err().expect("locked");
        assert!(err.to_string().contains("state.redb"), "{err}");
    }

    #[test]
    fn jobs_and_vms_round_trip() {
        let dir = crate::test_support::tempdir();
        let s = Store::open(&dir).unwrap();
        let now = SystemTime::now();
        let job = JobRec {
            info: event("g", 7, JobAction::Queued).job,
            pool: Some("p".into()),
            state: JobState::Queued,
            received_at: now,
            vms_made: 1,
            failed_vms: 0,
            updated_at: now,
        };
        let vm = VmRec {
            job_id: 7,
            run_id: 1,
            repository: "o/r".into(),
            runner_id: Some(3),
            state: VmState::Booting,
            ..VmRec::new("rv-p-7".into(), "p", false, now)
        };
        s.commit(&Batch {
            jobs: vec![job.clone()],
            vms: vec![vm.clone()],
            meta: vec![("draining".into(), b"1".to_vec())],
            ..Default::default()
        })
        .unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.jobs[&7], job);
        assert_eq!(snap.vms["rv-p-7"], vm);
        assert_eq!(snap.meta["draining"], b"1");
        s.commit(&Batch { remove_jobs: vec![7], remove_vms: vec!["rv-p-7".into()], ..Default::default() }).unwrap();
        let snap = s.load().unwrap();
        assert!(snap.jobs.is_empty() && snap.vms.is_empty());
    }
}

//! The simulator's disk under the store: redb's file in memory, where a crash keeps what
//! was synced and, of what was written since, what the seed says (torn writes included).

use std::sync::{Arc, Mutex};

use redb::StorageBackend;

/// What a write replaced, to undo it if a crash loses it.
#[derive(Debug)]
enum Undo {
    Bytes {
        offset: u64,
        old: Vec<u8>,
    },
    /// The file's length before, and what a shrink cut off.
    Len {
        len: usize,
        tail: Vec<u8>,
    },
}

#[derive(Debug, Default)]
struct Inner {
    bytes: Vec<u8>,
    /// Writes since the last sync, oldest first.
    unsynced: Vec<Undo>,
    /// The file system is full: writes fail.
    full: bool,
    /// The process dies at the write after this many more (`Some(0)`: it is dead): what
    /// it writes from then on never reaches the disk.
    dies_in: Option<u32>,
}

/// One store file; clones share it (the agent's store and the simulator's hand on it).
#[derive(Debug, Clone, Default)]
pub struct Disk(Arc<Mutex<Inner>>);

impl Disk {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A crash: of the writes since the last sync, those `keep` says survive; a write
    /// lost is undone from its `torn_at`-th byte when `keep` answers `Some(n)`, whole on
    /// `None`. Undone newest first, so what survives is a prefix-closed mix as a page cache
    /// flushing in any order leaves it. Returns how many writes were lost.
    pub fn crash(&self, mut keep: impl FnMut() -> Option<Option<usize>>) -> usize {
        let mut inner = self.lock();
        inner.dies_in = None;
        let undo = std::mem::take(&mut inner.unsynced);
        let mut lost = 0;
        for u in undo.into_iter().rev() {
            let Some(torn_at) = keep() else { continue };
            lost += 1;
            match u {
                Undo::Bytes { offset, old } => {
                    let from = torn_at.unwrap_or(0).min(old.len());
                    let at = offset as usize + from;
                    let end = (offset as usize + old.len()).min(inner.bytes.len());
                    if at < end {
                        inner.bytes[at..end].copy_from_slice(&old[from..from + (end - at)]);
                    }
                }
                Undo::Len { len, tail } => {
                    // Back to its old length, with what a shrink cut off (a grow's new
                    // bytes go; they were zeros or writes undone before this).
                    inner.bytes.resize(len - tail.len(), 0);
                    inner.bytes.extend_from_slice(&tail);
                }
            }
        }
        lost
    }

    /// The agent's process dies after `writes` more writes (in the middle of a commit,
    /// likely): see [`Disk::dead`].
    pub fn die_after(&self, writes: u32) {
        self.lock().dies_in = Some(writes);
    }

    /// A death still to come is called off (the world heals); one that happened stays.
    pub fn spare(&self) {
        let mut inner = self.lock();
        if inner.dies_in != Some(0) {
            inner.dies_in = None;
        }
    }

    /// Whether the process died writing (the simulator then kills the agent).
    pub fn dead(&self) -> bool {
        self.lock().dies_in == Some(0)
    }

    /// The file system fills up (writes fail with ENOSPC) or has room again.
    pub fn set_full(&self, full: bool) {
        self.lock().full = full;
    }

    /// Bytes held (the store's size).
    pub fn len(&self) -> usize {
        self.lock().bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Counts a write towards the process's death; an error once it is dead.
    fn dying(&mut self) -> Result<(), std::io::Error> {
        match &mut self.dies_in {
            Some(0) => Err(io("the process is dead")),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

fn io(e: &str) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn full() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::StorageFull)
}

impl StorageBackend for Disk {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.lock().bytes.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let inner = self.lock();
        let end = offset as usize + out.len();
        if end > inner.bytes.len() {
            return Err(io("read past the end"));
        }
        out.copy_from_slice(&inner.bytes[offset as usize..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut inner = self.lock();
        inner.dying()?;
        let (old, new) = (inner.bytes.len(), len as usize);
        if inner.full && new > old {
            return Err(full());
        }
        let tail = inner.bytes.get(new..).map(<[u8]>::to_vec).unwrap_or_default();
        inner.unsynced.push(Undo::Len { len: old, tail });
        inner.bytes.resize(new, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut inner = self.lock();
        inner.dying()?;
        inner.unsynced.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut inner = self.lock();
        inner.dying()?;
        if inner.full {
            return Err(full());
        }
        let end = offset as usize + data.len();
        if end > inner.bytes.len() {
            return Err(io("write past the end"));
        }
        let old = inner.bytes[offset as usize..end].to_vec();
        inner.unsynced.push(Undo::Bytes { offset, old });
        inner.bytes[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
}

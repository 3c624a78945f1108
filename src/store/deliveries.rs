//! The delivery ids seen, kept for deduplication (see [`DeliveryIndex`]).

use std::collections::HashMap;
use std::hash::BuildHasher;

use redb::ReadableTable;

use super::{StoreError, dberr};

/// The delivery ids seen, for deduplication: on disk a log in arrival order
/// ([`super::DELIVERY_LOG`]), appended by each intake commit, and in memory an index from a hash
/// of each id to its log entry, rebuilt when the store is opened.
///
/// GitHub's delivery ids are random: in a B-tree keyed by them every delivery of a commit
/// lands in a leaf of its own, and each such leaf is rewritten and synced (measured:
/// without those writes the intake takes ~60 % more deliveries a second). Appending to the
/// log writes one or two pages a commit. The index costs ~20 bytes per id kept (ids are
/// kept `JOB_RETENTION`, 3 days).
#[derive(Default)]
pub(super) struct DeliveryIndex {
    hasher: std::hash::RandomState,
    /// Hash → log entry. Ids whose hashes collide keep their further entries in `more`.
    pub(super) by_hash: HashMap<u64, u64>,
    pub(super) more: HashMap<u64, Vec<u64>>,
    /// The next log entry.
    pub(super) next: u64,
}

impl DeliveryIndex {
    pub(super) fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    /// The log entries whose id has hash `h`: the id is seen if one of them holds it.
    pub(super) fn candidates(&self, h: u64) -> impl Iterator<Item = u64> + '_ {
        self.by_hash.get(&h).copied().into_iter().chain(self.more.get(&h).into_iter().flatten().copied())
    }

    pub(super) fn insert(&mut self, h: u64, entry: u64) {
        match self.by_hash.entry(h) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(entry);
            }
            std::collections::hash_map::Entry::Occupied(_) => self.more.entry(h).or_default().push(entry),
        }
    }

    pub(super) fn remove(&mut self, h: u64, entry: u64) {
        if self.by_hash.get(&h) == Some(&entry) {
            match self.more.get_mut(&h).and_then(Vec::pop) {
                Some(other) => self.by_hash.insert(h, other),
                None => self.by_hash.remove(&h),
            };
        } else if let Some(v) = self.more.get_mut(&h) {
            v.retain(|e| *e != entry);
        }
        if self.more.get(&h).is_some_and(Vec::is_empty) {
            self.more.remove(&h);
        }
    }

    /// Whether `id` is in `log` (the index names the entries to look at).
    pub(super) fn seen<T: ReadableTable<u64, (u64, &'static str)>>(
        &self,
        log: &T,
        id: &str,
    ) -> Result<bool, StoreError> {
        for entry in self.candidates(self.hash(id)) {
            if log.get(entry).map_err(dberr)?.is_some_and(|v| v.value().1 == id) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids whose hashes collide are told apart by the log; removing one keeps the others.
    #[test]
    fn the_delivery_index_keeps_ids_whose_hashes_collide() {
        let mut index = DeliveryIndex::default();
        index.insert(7, 1);
        index.insert(7, 2);
        index.insert(7, 3);
        index.insert(8, 4);
        let candidates = |index: &DeliveryIndex, h| {
            let mut v: Vec<u64> = index.candidates(h).collect();
            v.sort();
            v
        };
        assert_eq!(candidates(&index, 7), [1, 2, 3]);
        index.remove(7, 1);
        assert_eq!(candidates(&index, 7), [2, 3]);
        index.remove(7, 2);
        index.remove(7, 3);
        assert!(candidates(&index, 7).is_empty());
        assert!(index.more.is_empty() && index.by_hash.len() == 1);
        assert_eq!(candidates(&index, 8), [4]);
    }
}

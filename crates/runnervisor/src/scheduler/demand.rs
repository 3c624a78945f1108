//! Which queued jobs get a new VM now: a pure function of the queue and the VMs, tested
//! from a table.

use std::collections::{BTreeMap, BTreeSet};

/// The limits a pick respects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// New VMs this pool may start (its deficit within its `max_vms`).
    pub pool: usize,
    /// New VMs this host may start across pools (`capacity.max_vms`); `usize::MAX`: no cap.
    pub host: usize,
    /// VMs of this pool one repository may have at once (`max_vms_per_repository`).
    pub per_repository: Option<usize>,
}

/// Oldest first, `unserved` jobs (id, repository) not already `covered` by an available
/// runner, within `room`; `alive_by_repo` counts the pool's VMs per repository now.
pub fn pick(
    unserved: &[(u64, &str)],
    covered: &BTreeSet<u64>,
    alive_by_repo: &BTreeMap<String, usize>,
    room: Room,
) -> Vec<u64> {
    let mut by_repo = alive_by_repo.clone();
    let mut picks = Vec::new();
    for (id, repo) in unserved {
        if picks.len() >= room.pool.min(room.host) {
            break;
        }
        if covered.contains(id) {
            continue;
        }
        let n = by_repo.entry(repo.to_string()).or_insert(0);
        if room.per_repository.is_some_and(|cap| *n >= cap) {
            continue;
        }
        *n += 1;
        picks.push(*id);
    }
    picks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks() {
        let q = [(1, "a/x"), (2, "a/x"), (3, "a/x"), (4, "b/y"), (5, "c/z")];
        let none = BTreeSet::new();
        let alive = |list: &[(&str, usize)]| list.iter().map(|(r, n)| (r.to_string(), *n)).collect();
        let room = |pool, host, per| Room { pool, host, per_repository: per };
        #[rustfmt::skip]
        let table: Vec<(&str, BTreeSet<u64>, BTreeMap<String, usize>, Room, Vec<u64>)> = vec![
            ("oldest first within the pool's room", none.clone(), alive(&[]), room(2, usize::MAX, None), vec![1, 2]),
            ("the host cap binds first", none.clone(), alive(&[]), room(5, 1, None), vec![1]),
            ("no room, no pick", none.clone(), alive(&[]), room(0, 5, None), vec![]),
            ("covered jobs are skipped", [1, 2].into(), alive(&[]), room(2, 9, None), vec![3, 4]),
            ("one repository cannot take every slot", none.clone(), alive(&[]), room(4, 9, Some(1)), vec![1, 4, 5]),
            ("VMs it already has count", none.clone(), alive(&[("a/x", 2)]), room(4, 9, Some(2)), vec![4, 5]),
            ("cap 2: two of a/x, then others", none.clone(), alive(&[]), room(5, 9, Some(2)), vec![1, 2, 4, 5]),
        ];
        for (what, covered, alive, room, want) in table {
            assert_eq!(pick(&q, &covered, &alive, room), want, "{what}");
        }
    }
}

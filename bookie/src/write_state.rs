//! The ledger writer's bookkeeping without I/O: entry ids, write sets over
//! the ensemble, ack counting and the last-add-confirmed (LAC).
//!
//! An entry is confirmed once `ack_quorum` distinct bookies of its write set
//! acked it *and* every earlier entry is confirmed; the LAC only moves forward.

use std::collections::VecDeque;

#[derive(Debug)]
struct Pending {
    entry_id: u64,
    acked: u64,
}

#[derive(Debug)]
pub struct WriteState {
    ensemble_size: usize,
    write_quorum: usize,
    ack_quorum: usize,
    next_entry: u64,
    lac: i64,
    pending: VecDeque<Pending>,
}

impl WriteState {
    /// `first_entry` is the id the next add gets (0 for a new ledger).
    pub fn new(
        ensemble_size: usize,
        write_quorum: usize,
        ack_quorum: usize,
        first_entry: u64,
    ) -> WriteState {
        assert!(
            ensemble_size <= 64,
            "ensembles are tracked in a 64-bit mask"
        );
        assert!(ensemble_size >= write_quorum && write_quorum >= ack_quorum && ack_quorum >= 1);
        WriteState {
            ensemble_size,
            write_quorum,
            ack_quorum,
            next_entry: first_entry,
            lac: first_entry as i64 - 1,
            pending: VecDeque::new(),
        }
    }

    /// Positions in the ensemble of the bookies that store `entry_id`.
    pub fn write_set(&self, entry_id: u64) -> impl Iterator<Item = usize> + use<> {
        write_set(self.ensemble_size, self.write_quorum, entry_id)
    }

    /// Assigns the next entry id.
    pub fn assign(&mut self) -> u64 {
        let id = self.next_entry;
        self.next_entry += 1;
        self.pending.push_back(Pending {
            entry_id: id,
            acked: 0,
        });
        id
    }

    pub fn lac(&self) -> i64 {
        self.lac
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Records bookie `position`'s ack of `entry_id`; returns the entries this
    /// ack confirmed, in order (possibly none, possibly several).
    pub fn on_ack(&mut self, entry_id: u64, position: usize) -> Vec<u64> {
        if !self.write_set(entry_id).any(|p| p == position) {
            return Vec::new();
        }
        let Some(front) = self.pending.front().map(|p| p.entry_id) else {
            return Vec::new();
        };
        if entry_id < front {
            return Vec::new();
        }
        let Some(p) = self.pending.get_mut((entry_id - front) as usize) else {
            return Vec::new();
        };
        debug_assert_eq!(p.entry_id, entry_id);
        p.acked |= 1 << position;
        let mut confirmed = Vec::new();
        while let Some(p) = self.pending.front() {
            if (p.acked.count_ones() as usize) < self.ack_quorum {
                break;
            }
            let id = p.entry_id;
            self.pending.pop_front();
            assert!(id as i64 > self.lac, "LAC must never go backwards");
            self.lac = id as i64;
            confirmed.push(id);
        }
        confirmed
    }
}

impl WriteState {
    /// The bookie at `position` was replaced: acks it gave for entries still
    /// pending no longer count (the new bookie must ack them again).
    pub fn forget_position(&mut self, position: usize) {
        for p in &mut self.pending {
            p.acked &= !(1u64 << position);
        }
    }

    /// Entry ids assigned but not yet confirmed, oldest first.
    pub fn pending_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.pending.iter().map(|p| p.entry_id)
    }
}

pub fn write_set(
    ensemble_size: usize,
    write_quorum: usize,
    entry_id: u64,
) -> impl Iterator<Item = usize> {
    let start = (entry_id % ensemble_size as u64) as usize;
    (0..write_quorum).map(move |i| (start + i) % ensemble_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn striping() {
        assert_eq!(write_set(3, 2, 0).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(write_set(3, 2, 2).collect::<Vec<_>>(), vec![2, 0]);
        assert_eq!(write_set(5, 3, 4).collect::<Vec<_>>(), vec![4, 0, 1]);
    }

    #[test]
    fn confirms_in_order_after_ack_quorum() {
        let mut w = WriteState::new(3, 3, 2, 0);
        let (e0, e1, e2) = (w.assign(), w.assign(), w.assign());
        assert!(w.on_ack(e1, 0).is_empty());
        assert!(w.on_ack(e1, 1).is_empty(), "e1 has quorum but e0 does not");
        assert!(w.on_ack(e0, 2).is_empty());
        assert!(w.on_ack(e0, 2).is_empty(), "a repeated ack counts once");
        assert_eq!(w.on_ack(e0, 0), vec![e0, e1]);
        assert_eq!(w.lac(), 1);
        assert!(w.on_ack(e2, 1).is_empty());
        assert_eq!(w.on_ack(e2, 2), vec![e2]);
        assert_eq!(w.pending(), 0);
        assert!(w.on_ack(e2, 0).is_empty(), "late acks are ignored");
    }

    #[test]
    fn a_replaced_position_must_ack_again() {
        let mut w = WriteState::new(3, 3, 3, 0);
        let e = w.assign();
        assert!(w.on_ack(e, 0).is_empty());
        assert!(w.on_ack(e, 1).is_empty());
        w.forget_position(1);
        assert!(
            w.on_ack(e, 2).is_empty(),
            "position 1's old ack is forgotten"
        );
        assert_eq!(w.on_ack(e, 1), vec![0]);
    }

    #[test]
    fn acks_from_outside_the_write_set_do_not_count() {
        let mut w = WriteState::new(3, 2, 2, 10);
        let e = w.assign();
        assert_eq!(w.write_set(e).collect::<Vec<_>>(), vec![1, 2]);
        assert!(w.on_ack(e, 0).is_empty());
        assert!(w.on_ack(e, 1).is_empty());
        assert_eq!(w.on_ack(e, 2), vec![10]);
    }

    #[test]
    fn exhaustive_ack_orders_never_confirm_early() {
        // Every order of the 6 acks of 3 entries on E=Qw=2, Qa=2.
        let acks: Vec<(u64, usize)> = (0..3).flat_map(|e| [(e, 0), (e, 1)]).collect();
        let mut idx: Vec<usize> = (0..acks.len()).collect();
        permute(&mut idx, 0, &mut |order| {
            let mut w = WriteState::new(2, 2, 2, 0);
            for _ in 0..3 {
                w.assign();
            }
            let mut seen = [0u32; 3];
            let mut confirmed = Vec::new();
            for &i in order {
                let (e, b) = acks[i];
                seen[e as usize] += 1;
                for c in w.on_ack(e, b) {
                    assert!((0..=c as usize).all(|x| seen[x] == 2));
                    confirmed.push(c);
                }
            }
            assert_eq!(confirmed, vec![0, 1, 2]);
        });
    }

    fn permute(v: &mut Vec<usize>, k: usize, f: &mut impl FnMut(&[usize])) {
        if k == v.len() {
            f(v);
            return;
        }
        for i in k..v.len() {
            v.swap(k, i);
            permute(v, k + 1, f);
            v.swap(k, i);
        }
    }
}

//! The ledger writer's bookkeeping without I/O: entry ids, write sets over
//! the ensemble, ack counting and the last-add-confirmed (LAC).
//!
//! An entry is confirmed once `ack_quorum` distinct bookies of its write set
//! acked it *and* every earlier entry is confirmed; the LAC only moves forward.
//! Each pending entry carries the caller's value for it (the writer's: the
//! payload to resend and the adder to answer), handed back on confirmation.

use std::collections::VecDeque;

#[derive(Debug)]
struct Pending<T> {
    entry_id: u64,
    acked: u64,
    value: T,
}

#[derive(Debug)]
pub struct WriteState<T> {
    ensemble_size: usize,
    write_quorum: usize,
    ack_quorum: usize,
    next_entry: u64,
    lac: i64,
    pending: VecDeque<Pending<T>>,
}

impl<T> WriteState<T> {
    /// `first_entry` is the id the next add gets (0 for a new ledger).
    pub fn new(
        ensemble_size: usize,
        write_quorum: usize,
        ack_quorum: usize,
        first_entry: u64,
    ) -> WriteState<T> {
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
    pub fn write_set(&self, entry_id: u64) -> impl Iterator<Item = usize> + use<T> {
        write_set(self.ensemble_size, self.write_quorum, entry_id)
    }

    /// The id the next [`WriteState::assign`] gives.
    pub fn next_entry(&self) -> u64 {
        self.next_entry
    }

    /// Assigns the next entry id, pending with `value`.
    pub fn assign(&mut self, value: T) -> u64 {
        let id = self.next_entry;
        self.next_entry += 1;
        self.pending.push_back(Pending {
            entry_id: id,
            acked: 0,
            value,
        });
        id
    }

    pub fn lac(&self) -> i64 {
        self.lac
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Records bookie `position`'s ack of `entry_id`; appends the entries
    /// this ack confirmed to `confirmed`, in order, with their values
    /// (possibly none, possibly several).
    pub fn on_ack(&mut self, entry_id: u64, position: usize, confirmed: &mut Vec<(u64, T)>) {
        if !self.write_set(entry_id).any(|p| p == position) {
            return;
        }
        let Some(front) = self.pending.front().map(|p| p.entry_id) else {
            return;
        };
        let Some(p) = entry_id
            .checked_sub(front)
            .and_then(|i| self.pending.get_mut(i as usize))
        else {
            return;
        };
        debug_assert_eq!(p.entry_id, entry_id);
        p.acked |= 1 << position;
        let quorum = self.ack_quorum;
        while let Some(p) = self
            .pending
            .pop_front_if(|p| p.acked.count_ones() as usize >= quorum)
        {
            assert!(p.entry_id as i64 > self.lac, "LAC must never go backwards");
            self.lac = p.entry_id as i64;
            confirmed.push((p.entry_id, p.value));
        }
    }
}

impl<T> WriteState<T> {
    /// The ensemble became `ensemble_size` bookies wide (a shrunk fragment
    /// starting at the first pending entry): positions mean other bookies
    /// now, so no ack given so far for a pending entry counts; each must be
    /// sent again to its new write set.
    pub fn reshape(&mut self, ensemble_size: usize) {
        assert!(ensemble_size >= self.write_quorum && ensemble_size <= 64);
        self.ensemble_size = ensemble_size;
        for p in &mut self.pending {
            p.acked = 0;
        }
    }

    /// The bookie at `position` was replaced: acks it gave for entries still
    /// pending no longer count (the new bookie must ack them again).
    pub fn forget_position(&mut self, position: usize) {
        for p in &mut self.pending {
            p.acked &= !(1u64 << position);
        }
    }

    /// Entries assigned but not yet confirmed, oldest first.
    pub fn pending_entries(&self) -> impl Iterator<Item = (u64, &T)> + '_ {
        self.pending.iter().map(|p| (p.entry_id, &p.value))
    }

    /// The values of the entries not yet confirmed, oldest first.
    pub fn pending_values_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        self.pending.iter_mut().map(|p| &mut p.value)
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

    /// The entries this ack confirmed.
    fn ack(w: &mut WriteState<()>, entry_id: u64, position: usize) -> Vec<u64> {
        let mut confirmed = Vec::new();
        w.on_ack(entry_id, position, &mut confirmed);
        confirmed.into_iter().map(|(id, ())| id).collect()
    }

    #[test]
    fn striping() {
        assert_eq!(write_set(3, 2, 0).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(write_set(3, 2, 2).collect::<Vec<_>>(), vec![2, 0]);
        assert_eq!(write_set(5, 3, 4).collect::<Vec<_>>(), vec![4, 0, 1]);
    }

    #[test]
    fn confirms_in_order_after_ack_quorum() {
        let mut w = WriteState::new(3, 3, 2, 0);
        let (e0, e1, e2) = (w.assign(()), w.assign(()), w.assign(()));
        assert!(ack(&mut w, e1, 0).is_empty());
        assert!(
            ack(&mut w, e1, 1).is_empty(),
            "e1 has quorum but e0 does not"
        );
        assert!(ack(&mut w, e0, 2).is_empty());
        assert!(ack(&mut w, e0, 2).is_empty(), "a repeated ack counts once");
        assert_eq!(ack(&mut w, e0, 0), vec![e0, e1]);
        assert_eq!(w.lac(), 1);
        assert!(ack(&mut w, e2, 1).is_empty());
        assert_eq!(ack(&mut w, e2, 2), vec![e2]);
        assert_eq!(w.pending(), 0);
        assert!(ack(&mut w, e2, 0).is_empty(), "late acks are ignored");
    }

    #[test]
    fn a_replaced_position_must_ack_again() {
        let mut w = WriteState::new(3, 3, 3, 0);
        let e = w.assign(());
        assert!(ack(&mut w, e, 0).is_empty());
        assert!(ack(&mut w, e, 1).is_empty());
        w.forget_position(1);
        assert!(
            ack(&mut w, e, 2).is_empty(),
            "position 1's old ack is forgotten"
        );
        assert_eq!(ack(&mut w, e, 1), vec![0]);
    }

    #[test]
    fn acks_from_outside_the_write_set_do_not_count() {
        let mut w = WriteState::new(3, 2, 2, 10);
        let e = w.assign(());
        assert_eq!(w.write_set(e).collect::<Vec<_>>(), vec![1, 2]);
        assert!(ack(&mut w, e, 0).is_empty());
        assert!(ack(&mut w, e, 1).is_empty());
        assert_eq!(ack(&mut w, e, 2), vec![10]);
    }

    #[test]
    fn exhaustive_ack_orders_never_confirm_early() {
        // Every order of the 6 acks of 3 entries on E=Qw=2, Qa=2.
        let acks: Vec<(u64, usize)> = (0..3).flat_map(|e| [(e, 0), (e, 1)]).collect();
        let mut idx: Vec<usize> = (0..acks.len()).collect();
        permute(&mut idx, 0, &mut |order| {
            let mut w = WriteState::new(2, 2, 2, 0);
            for _ in 0..3 {
                w.assign(());
            }
            let mut seen = [0u32; 3];
            let mut confirmed = Vec::new();
            for &i in order {
                let (e, b) = acks[i];
                seen[e as usize] += 1;
                for c in ack(&mut w, e, b) {
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

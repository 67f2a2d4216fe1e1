//! Where a ledger's entries go, without I/O: how wide a new ledger is with
//! the bookies that are writable, which bookies it is placed on (spread
//! over racks), and what an ensemble change does with the spares there are
//! — swap every failed bookie for a spare; with too few spares, shrink the
//! fragment to the bookies left as long as a write quorum remains (every
//! entry still gets Qw copies and Qa acks, striped over fewer bookies);
//! below that, wait for bookies.

use std::collections::BTreeSet;

use crate::registry::BookieInfo;

/// What to do with an ensemble some of whose bookies failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Each failed bookie replaced in place: the new ensemble and the
    /// positions that changed.
    Swap {
        ensemble: Vec<String>,
        changed: Vec<usize>,
    },
    /// Fewer spares than failures: the bookies left (and any spares) form a
    /// narrower fragment.
    Shrink { ensemble: Vec<String> },
    /// Fewer than a write quorum would be left.
    Short { have: usize, need: usize },
}

/// `current` with `failed` (members of it) taken out, given `spares`
/// (outside it, at most as many as are failed) and the write quorum.
pub fn plan(
    current: &[String],
    failed: &[String],
    spares: &[String],
    write_quorum: usize,
) -> Change {
    let failed: Vec<&String> = failed.iter().filter(|f| current.contains(f)).collect();
    if spares.len() >= failed.len() {
        let mut ensemble = current.to_vec();
        let mut changed = Vec::new();
        for (old, new) in failed.iter().zip(spares) {
            if let Some(pos) = ensemble.iter().position(|b| b == *old) {
                ensemble[pos] = new.clone();
                changed.push(pos);
            }
        }
        return Change::Swap { ensemble, changed };
    }
    let mut ensemble: Vec<String> = current
        .iter()
        .filter(|b| !failed.contains(b))
        .cloned()
        .collect();
    for s in spares {
        if !ensemble.contains(s) {
            ensemble.push(s.clone());
        }
    }
    if ensemble.len() >= write_quorum.max(1) {
        Change::Shrink { ensemble }
    } else {
        Change::Short {
            have: ensemble.len(),
            need: write_quorum,
        }
    }
}

/// How many bookies a new ledger of `ensemble_size` is placed on when
/// `writable` are: all it asks for, else as many as there are down to the
/// write quorum; `Err((need, have))` below that.
pub fn create_width(
    ensemble_size: usize,
    write_quorum: usize,
    writable: usize,
) -> Result<usize, (usize, usize)> {
    if writable >= ensemble_size {
        Ok(ensemble_size)
    } else if writable >= write_quorum.max(1) {
        Ok(writable)
    } else {
        Err((write_quorum, writable))
    }
}

/// `ensemble` with `old[i]` replaced by `new[i]` (pairs beyond the shorter
/// list are left alone); also the positions that changed.
pub fn swap_bookies(
    ensemble: &[String],
    old: &[String],
    new: &[String],
) -> (Vec<String>, Vec<usize>) {
    let mut out = ensemble.to_vec();
    let mut changed = Vec::new();
    for (o, n) in old.iter().zip(new) {
        if let Some(pos) = out.iter().position(|b| b == o) {
            out[pos] = n.clone();
            changed.push(pos);
        }
    }
    (out, changed)
}

/// Chooses `n` bookies from `candidates`, spreading over racks: first one
/// per rack not in `used_racks`, then any. `None` when there are too few.
/// The candidates are taken from position `turn` (mod their number) on:
/// callers pass something that moves (the clock), so load spreads.
pub fn place(
    mut candidates: Vec<BookieInfo>,
    n: usize,
    used_racks: &BTreeSet<Option<String>>,
    turn: usize,
) -> Option<Vec<String>> {
    if candidates.len() < n {
        return None;
    }
    let start = turn % candidates.len().max(1);
    candidates.rotate_left(start);
    let mut racks = used_racks.clone();
    let mut chosen: Vec<String> = Vec::with_capacity(n);
    for b in &candidates {
        if chosen.len() < n && b.rack.is_some() && racks.insert(b.rack.clone()) {
            chosen.push(b.addr.clone());
        }
    }
    for b in &candidates {
        if chosen.len() < n && !chosen.contains(&b.addr) {
            chosen.push(b.addr.clone());
        }
    }
    Some(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::write_state::write_set;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn spares_replace_failed_bookies_in_place() {
        let c = plan(&v(&["a", "b", "c"]), &v(&["b"]), &v(&["d"]), 2);
        assert_eq!(
            c,
            Change::Swap {
                ensemble: v(&["a", "d", "c"]),
                changed: vec![1]
            }
        );
    }

    #[test]
    fn without_spares_the_fragment_shrinks_but_never_below_the_write_quorum() {
        assert_eq!(
            plan(&v(&["a", "b", "c"]), &v(&["b"]), &[], 2),
            Change::Shrink {
                ensemble: v(&["a", "c"])
            }
        );
        assert_eq!(
            plan(&v(&["a", "b", "c"]), &v(&["a", "b"]), &[], 2),
            Change::Short { have: 1, need: 2 }
        );
        // One spare for two failures: the spare joins the survivors.
        assert_eq!(
            plan(&v(&["a", "b", "c", "d"]), &v(&["a", "b"]), &v(&["e"]), 2),
            Change::Shrink {
                ensemble: v(&["c", "d", "e"])
            }
        );
        // A failed bookie that is not a member changes nothing.
        assert_eq!(
            plan(&v(&["a", "b"]), &v(&["z"]), &[], 2),
            Change::Swap {
                ensemble: v(&["a", "b"]),
                changed: vec![]
            }
        );
    }

    #[test]
    fn a_shrunk_fragment_never_puts_a_bookie_twice_in_a_write_set() {
        for width in 2..=5usize {
            for qw in 1..=width {
                for e in 0..50u64 {
                    let mut set: Vec<usize> = write_set(width, qw, e).collect();
                    set.sort_unstable();
                    set.dedup();
                    assert_eq!(set.len(), qw, "width {width}, Qw {qw}, entry {e}");
                }
            }
        }
    }

    #[test]
    fn new_ledgers_take_what_is_writable_down_to_the_write_quorum() {
        assert_eq!(create_width(3, 2, 5), Ok(3));
        assert_eq!(create_width(3, 2, 3), Ok(3));
        assert_eq!(create_width(3, 2, 2), Ok(2), "shrunk");
        assert_eq!(create_width(3, 2, 1), Err((2, 1)));
        assert_eq!(create_width(1, 1, 0), Err((1, 0)));
    }

    fn info(addr: &str, rack: Option<&str>) -> BookieInfo {
        BookieInfo {
            addr: addr.into(),
            rack: rack.map(String::from),
            writable: true,
        }
    }

    #[test]
    fn placement_spreads_over_racks_before_doubling_up() {
        let c = vec![
            info("a", Some("r1")),
            info("b", Some("r1")),
            info("c", Some("r2")),
            info("d", Some("r3")),
        ];
        for turn in 0..8 {
            let got = place(c.clone(), 3, &BTreeSet::new(), turn).unwrap();
            assert_eq!(got.len(), 3);
            let racks: BTreeSet<_> = got
                .iter()
                .map(|a| c.iter().find(|b| &b.addr == a).unwrap().rack.clone())
                .collect();
            assert_eq!(racks.len(), 3, "one per rack at turn {turn}: {got:?}");
        }
        // A rack the staying bookies cover is taken last.
        let used: BTreeSet<_> = [Some("r1".to_string()), Some("r2".to_string())].into();
        assert_eq!(
            place(c.clone(), 1, &used, 0).unwrap(),
            vec!["d".to_string()]
        );
        assert_eq!(place(c.clone(), 5, &BTreeSet::new(), 0), None, "too few");
        // Without racks, the turn spreads the choice.
        let plain = vec![info("a", None), info("b", None), info("c", None)];
        let firsts: BTreeSet<_> = (0..3)
            .map(|t| place(plain.clone(), 1, &BTreeSet::new(), t).unwrap()[0].clone())
            .collect();
        assert_eq!(firsts.len(), 3);
    }
}

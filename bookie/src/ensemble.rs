//! The ledger writer's ensemble decisions without I/O: how wide a new
//! ledger is with the bookies that are writable, and what an ensemble
//! change does with the spares there are — swap every failed bookie for a
//! spare; with too few spares, shrink the fragment to the bookies left as
//! long as a write quorum remains (every entry still gets Qw copies and Qa
//! acks, striped over fewer bookies); below that, wait for bookies.

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write_state::write_set;

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
}

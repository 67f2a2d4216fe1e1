//! Re-replication: the entries a gone bookie held in one fragment of a
//! closed ledger are copied from the surviving replicas to a replacement
//! bookie, and the replacement is recorded in the ledger's metadata by CAS.
//! The auditor calls [`LedgerClient::replicate_fragment`] until it answers
//! `None`. Which fragment and which entries is decided by [`plan`], without
//! I/O.

use magnetar_proto::ledger::{
    entry_digest, AddRequest, BookieRequest, BookieResponse, MAX_BATCH_ADDS,
};

use super::client::LedgerClient;
use super::error::LedgerError;
use super::meta::LedgerMetadata;
use super::write_state::write_set;

/// The copy of one fragment a gone bookie was part of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FragmentCopy {
    /// The fragment's index in the ledger's metadata.
    pub fragment: usize,
    /// The gone bookie's position in the fragment's ensemble.
    pub position: usize,
    /// The fragment's last entry (-1 and below: it holds none).
    pub last: i64,
    /// The first entry of each stripe (entries equal mod the fragment's
    /// width) whose write set includes `position`: the gone bookie held
    /// `start`, `start + width`, … up to `last` of each.
    pub stripes: Vec<u64>,
    /// The fragment's width: the step between a stripe's entries.
    pub width: u64,
}

/// What to copy for `gone` in `meta`: its first fragment that names it,
/// or `None` when no fragment does (nothing left to do).
pub fn plan(meta: &LedgerMetadata, gone: &str) -> Option<FragmentCopy> {
    let fi = meta
        .fragments
        .iter()
        .position(|f| f.bookies.iter().any(|b| b == gone))?;
    let frag = &meta.fragments[fi];
    let position = frag.bookies.iter().position(|b| b == gone)?;
    let last = match meta.fragments.get(fi + 1) {
        Some(next) => next.first_entry as i64 - 1,
        None => meta.last_entry_id,
    };
    let width = frag.bookies.len().max(1);
    let stripes = if last >= frag.first_entry as i64 {
        (frag.first_entry..=last as u64)
            .take(width)
            .filter(|&start| {
                write_set(width, meta.write_quorum.min(width), start).any(|p| p == position)
            })
            .collect()
    } else {
        Vec::new()
    };
    Some(FragmentCopy {
        fragment: fi,
        position,
        last,
        stripes,
        width: width as u64,
    })
}

/// Whether `bookie` holds (or may still be given) an entry of `meta`: some
/// fragment naming it has an entry whose write set includes it. A fragment
/// cut short before its first entry reached the bookie — a ledger created
/// just as the bookie died, then moved off it — holds nothing of it; the
/// last fragment of a ledger still open counts, its end being unknown.
pub fn holds_entries_on(meta: &LedgerMetadata, bookie: &str) -> bool {
    meta.fragments.iter().enumerate().any(|(fi, frag)| {
        let Some(position) = frag.bookies.iter().position(|b| b == bookie) else {
            return false;
        };
        let last = match meta.fragments.get(fi + 1) {
            Some(next) => next.first_entry as i64 - 1,
            None if meta.state == crate::ledger::LedgerState::Closed => meta.last_entry_id,
            None => return true,
        };
        let width = frag.bookies.len().max(1);
        last >= frag.first_entry as i64
            && (frag.first_entry..=last as u64).take(width).any(|start| {
                write_set(width, meta.write_quorum.min(width), start).any(|p| p == position)
            })
    })
}

/// One fragment re-replicated: where to, and how many entries were copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replicated {
    pub fragment: usize,
    pub target: String,
    pub entries: u64,
}

impl LedgerClient {
    /// Copies the entries `gone` held in the first fragment of `ledger_id`
    /// that names it to a replacement bookie (on a rack the others do not
    /// cover when possible), then records the replacement by CAS. `None`
    /// when no fragment names `gone` any more. On a CAS conflict (the
    /// metadata changed meanwhile) nothing is recorded: `Some` with the
    /// copy, and the next call plans again from the stored metadata.
    pub async fn replicate_fragment(
        &self,
        ledger_id: u64,
        gone: &str,
    ) -> Result<Option<Replicated>, LedgerError> {
        let (mut meta, version) = self.metadata(ledger_id).await?;
        let Some(copy) = plan(&meta, gone) else {
            return Ok(None);
        };
        let frag = meta.fragments[copy.fragment].clone();
        let target = self.place_replacement(&frag.bookies).await?;
        let mut entries = 0u64;
        if copy.last >= 0 {
            for &start in &copy.stripes {
                entries += copy_stripe(
                    self,
                    &meta,
                    gone,
                    &target,
                    start,
                    copy.last as u64,
                    copy.width,
                )
                .await?;
            }
        }
        meta.fragments[copy.fragment].bookies[copy.position] = target.clone();
        if self.store_metadata(&meta, version).await? {
            tracing::info!(
                ledger_id,
                gone,
                target,
                fragment = copy.fragment,
                entries,
                "re-replicated a lost bookie's entries"
            );
        }
        Ok(Some(Replicated {
            fragment: copy.fragment,
            target,
            entries,
        }))
    }
}

/// Copies entries `start`, `start + step`, … up to `last` to `target`: read
/// from the surviving replicas a `ReadRange` at a time (as catch-up reads
/// are, next replica after a delay) and stored with one `AddBatch` per
/// answer (recovery adds, with the LAC each was stored with, so the digest
/// is the same). An entry no range answer brings is read on its own.
/// Returns how many were copied.
async fn copy_stripe(
    ledgers: &LedgerClient,
    meta: &LedgerMetadata,
    gone: &str,
    target: &str,
    start: u64,
    last: u64,
    step: u64,
) -> Result<u64, LedgerError> {
    let sources: Vec<String> = meta
        .bookies_for(start)
        .into_iter()
        .filter(|b| b != gone)
        .collect();
    let ledger_id = meta.ledger_id;
    let add = |entry_id: u64, lac: i64, payload: bytes::Bytes, digest: u32| AddRequest {
        ledger_id,
        entry_id,
        master_key: meta.master_key,
        lac,
        payload,
        digest,
        recovery: true,
    };
    let mut copied = 0;
    let mut next = start;
    while next <= last {
        let mut batch: Vec<AddRequest> = ledgers
            .range_read(ledger_id, &sources, next, last, step)
            .await
            .into_iter()
            .take(MAX_BATCH_ADDS)
            .map(|e| add(e.entry_id, e.lac, e.payload, e.digest))
            .collect();
        if batch.is_empty() {
            // No range answer: this entry alone, from any survivor.
            let (lac, payload) = read_with_lac(ledgers, meta, next, gone).await?;
            let digest = entry_digest(ledger_id, next, lac, &payload);
            batch.push(add(next, lac, payload, digest));
        }
        let n = batch.len() as u64;
        let first = batch[0].entry_id;
        match ledgers
            .call(target, &BookieRequest::AddBatch(batch))
            .await?
        {
            BookieResponse::AddedBatch(results) if results.iter().all(|r| r.is_ok()) => {}
            other => {
                return Err(LedgerError::Unreadable(
                    ledger_id,
                    first,
                    format!("copy to {target}: {other:?}"),
                ))
            }
        }
        copied += n;
        next = match next.checked_add(n * step) {
            Some(n) => n,
            None => break,
        };
    }
    Ok(copied)
}

/// Reads an entry from a surviving replica, with the LAC it was stored with
/// (the copy must carry the same digest input).
async fn read_with_lac(
    ledgers: &LedgerClient,
    meta: &LedgerMetadata,
    entry: u64,
    gone: &str,
) -> Result<(i64, bytes::Bytes), LedgerError> {
    let mut errors = Vec::new();
    for b in meta.bookies_for(entry).into_iter().filter(|b| b != gone) {
        let req = BookieRequest::Read {
            ledger_id: meta.ledger_id,
            entry_id: entry,
        };
        match ledgers.call(&b, &req).await {
            Ok(BookieResponse::Entry {
                ledger_id,
                entry_id,
                lac,
                payload,
                digest,
            }) if ledger_id == meta.ledger_id
                && entry_id == entry
                && entry_digest(ledger_id, entry_id, lac, &payload) == digest =>
            {
                return Ok((lac, payload));
            }
            Ok(other) => errors.push(format!("{b}: {other:?}")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(LedgerError::Unreadable(
        meta.ledger_id,
        entry,
        errors.join("; "),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Fragment, LedgerState};

    fn meta(fragments: &[(u64, &[&str])], qw: usize, last: i64) -> LedgerMetadata {
        LedgerMetadata {
            ledger_id: 1,
            ensemble_size: 3,
            write_quorum: qw,
            ack_quorum: 2,
            fragments: fragments
                .iter()
                .map(|(first, b)| Fragment {
                    first_entry: *first,
                    bookies: b.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
            state: LedgerState::Closed,
            last_entry_id: last,
            length_bytes: 0,
            master_key: [0; 16],
            created_ms: 0,
            properties: Default::default(),
        }
    }

    #[test]
    fn the_first_fragment_naming_the_gone_bookie_is_copied() {
        let m = meta(&[(0, &["a", "b", "c"]), (10, &["a", "d", "c"])], 2, 19);
        let c = plan(&m, "b").unwrap();
        assert_eq!((c.fragment, c.position, c.last, c.width), (0, 1, 9, 3));
        // Write sets of 2 over 3: entry 0 -> {0,1}, 1 -> {1,2}, 2 -> {2,0}.
        assert_eq!(c.stripes, vec![0, 1]);
        let c = plan(&m, "d").unwrap();
        assert_eq!((c.fragment, c.position, c.last), (1, 1, 19));
        // Write sets go by entry id mod width: 10 -> {1,2}, 11 -> {2,0}, 12 -> {0,1}.
        assert_eq!(c.stripes, vec![10, 12]);
        assert_eq!(plan(&m, "a").unwrap().fragment, 0);
        assert_eq!(plan(&m, "zz"), None, "nothing names it: done");
    }

    #[test]
    fn a_shrunk_fragment_is_striped_over_its_own_width() {
        // 3 wide, then shrunk to 2 at entry 6 (Qw 2: every entry on both).
        let m = meta(&[(0, &["a", "b", "c"]), (6, &["a", "c"])], 2, 11);
        let c = plan(&m, "c").unwrap();
        assert_eq!((c.fragment, c.position, c.width), (0, 2, 3));
        assert_eq!(c.stripes, vec![1, 2]);
        let m2 = meta(&[(0, &["a", "b", "x"]), (6, &["a", "c"])], 2, 11);
        let c = plan(&m2, "c").unwrap();
        assert_eq!((c.fragment, c.position, c.last, c.width), (1, 1, 11, 2));
        assert_eq!(c.stripes, vec![6, 7], "both stripes: each entry is on both");
    }

    #[test]
    fn a_bookie_cut_off_before_its_first_entry_holds_nothing() {
        // Created on a, b, x just as x died: entry 0 went to {a, b}; entry 1
        // (write set {b, x}) failed and the writer moved on to a, b, c.
        let mut m = meta(&[(0, &["a", "b", "x"]), (1, &["a", "b", "c"])], 2, 40);
        assert!(!holds_entries_on(&m, "x"));
        assert!(holds_entries_on(&m, "a") && holds_entries_on(&m, "c"));
        // Still open: the last fragment's end is unknown, so its bookies count.
        m.state = LedgerState::Open;
        m.last_entry_id = -1;
        assert!(holds_entries_on(&m, "c"));
        assert!(!holds_entries_on(&m, "x"));
        // Moved off x after entry 1: x held entry 1.
        let m = meta(&[(0, &["a", "b", "x"]), (2, &["a", "b", "c"])], 2, 40);
        assert!(holds_entries_on(&m, "x"));
        assert!(!holds_entries_on(&m, "zz"));
    }

    #[test]
    fn an_empty_fragment_has_nothing_to_copy() {
        let m = meta(&[(0, &["a", "b", "c"])], 2, -1);
        let c = plan(&m, "b").unwrap();
        assert!(c.stripes.is_empty());
        // A fragment that ended before it began (replaced before any add).
        let m = meta(&[(5, &["a", "b", "c"]), (5, &["a", "d", "c"])], 2, 9);
        assert!(plan(&m, "b").unwrap().stripes.is_empty());
    }
}

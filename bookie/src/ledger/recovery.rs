//! Recovery: fence a ledger whose writer went away, find the last entry
//! that may have been confirmed, re-replicate the tail to a write quorum,
//! and close it there. The decisions (fence quorum, where the tail ends,
//! how far to read) are the pure functions at the top, unit-tested.

use futures::future::join_all;
use magnetar_proto::ledger::{
    entry_digest, AddRequest, BookieErrorCode, BookieRequest, BookieResponse, MasterKey,
};

use super::client::LedgerClient;
use super::error::LedgerError;
use super::meta::{LedgerMetadata, LedgerState};
use super::placement::swap_bookies;

/// Recovery reads the ledger's tail this many entries at a time at first,
/// then as many as fit [`RECOVERY_WINDOW_BYTES`] (at most
/// [`RECOVERY_WINDOW_MAX`]).
const RECOVERY_WINDOW_FIRST: usize = 16;

const RECOVERY_WINDOW_BYTES: u64 = 8 * 1024 * 1024;

const RECOVERY_WINDOW_MAX: usize = 256;

/// One tail entry as recovery finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailRead<T> {
    /// On some bookie, with a good digest: the add to re-replicate.
    Found(T),
    /// Missing on too many bookies to have been confirmed: the tail ends.
    Missing,
    /// Neither: too few bookies answered.
    Unknown,
}

/// How many bookies of a fragment `width` wide must answer a fence before
/// recovery may go on: with at most Qa - 1 unfenced, no write set can
/// gather Qa acks any more.
pub fn fence_quorum(width: usize, ack_quorum: usize) -> usize {
    width.saturating_sub(ack_quorum) + 1
}

/// The fence's outcome from each bookie's answer (its LAC, or `None` when
/// it did not fence): the highest LAC, or `Err((fenced, need))` when too
/// few fenced.
pub fn fenced_lac(answers: &[Option<i64>], ack_quorum: usize) -> Result<i64, (usize, usize)> {
    let fenced = answers.iter().flatten().count();
    let need = fence_quorum(answers.len(), ack_quorum);
    if fenced < need {
        return Err((fenced, need));
    }
    Ok(answers
        .iter()
        .flatten()
        .copied()
        .max()
        .unwrap_or(-1)
        .max(-1))
}

/// The first entry recovery looks for: after the highest LAC a bookie
/// reported, and no earlier than the last fragment's first entry.
pub fn first_tail_entry(lac: i64, fragment_first: u64) -> u64 {
    (lac + 1).max(fragment_first as i64) as u64
}

/// What one entry's reads say: found on some bookie; missing on more than
/// `tolerance` (Qw - Qa) of its write set, so it cannot have been
/// confirmed; or neither.
pub fn judge_entry<T>(found: Option<T>, missing: usize, tolerance: usize) -> TailRead<T> {
    match found {
        Some(v) => TailRead::Found(v),
        None if missing > tolerance => TailRead::Missing,
        None => TailRead::Unknown,
    }
}

/// A window of tail reads, in entry order: the entries found up to the
/// first one that is missing (and whether one was: the tail ends there),
/// or `Err(i)` when entry `i` of the window is unknown before the end.
pub fn tail_of<T>(reads: Vec<TailRead<T>>) -> Result<(Vec<T>, bool), usize> {
    let mut found = Vec::new();
    for (i, r) in reads.into_iter().enumerate() {
        match r {
            TailRead::Found(v) => found.push(v),
            TailRead::Missing => return Ok((found, true)),
            TailRead::Unknown => return Err(i),
        }
    }
    Ok((found, false))
}

/// How many entries the next window reads: as many as fit
/// [`RECOVERY_WINDOW_BYTES`] judged by the last window (`bytes` over
/// `entries`), between 1 and [`RECOVERY_WINDOW_MAX`].
pub fn next_window(bytes: u64, entries: usize) -> usize {
    let per_entry = (bytes / entries.max(1) as u64).max(1);
    ((RECOVERY_WINDOW_BYTES / per_entry) as usize).clamp(1, RECOVERY_WINDOW_MAX)
}

impl LedgerClient {
    /// Fences the ledger so its writer can no longer add, finds the last
    /// entry that may have been confirmed, re-replicates it, and closes the
    /// ledger there. Safe to run concurrently: all runs agree on the end.
    pub async fn recover(&self, ledger_id: u64) -> Result<LedgerMetadata, LedgerError> {
        loop {
            let (mut meta, version) = self.metadata(ledger_id).await?;
            if meta.state == LedgerState::Closed {
                return Ok(meta);
            }
            if meta.state == LedgerState::Open {
                meta.state = LedgerState::InRecovery;
                if !self.store_metadata(&meta, version).await? {
                    continue;
                }
                return self.finish_recovery(meta, version + 1).await;
            }
            match self.finish_recovery(meta, version).await {
                // Another recovery changed the metadata (replaced a bookie,
                // or closed it): start over from what it stored.
                Err(LedgerError::Conflict(_)) => continue,
                r => return r,
            }
        }
    }

    /// Reads entry `e` of the ledger's tail from every bookie of `set`
    /// (its write set, less the unreachable) for recovery: found with a
    /// good digest on any; or missing on more than `tolerance` (Qw - Qa) of
    /// them, so it cannot have been confirmed; or neither.
    async fn read_tail_entry(
        &self,
        ledger_id: u64,
        master_key: MasterKey,
        e: u64,
        set: Vec<String>,
        tolerance: usize,
    ) -> TailRead<AddRequest> {
        let read = BookieRequest::Read {
            ledger_id,
            entry_id: e,
        };
        let reads = join_all(set.iter().map(|b| self.call(b, &read))).await;
        let mut missing = 0;
        for r in reads {
            match r {
                Ok(BookieResponse::Entry {
                    lac,
                    payload,
                    digest,
                    ..
                }) if entry_digest(ledger_id, e, lac, &payload) == digest => {
                    return judge_entry(
                        Some(AddRequest {
                            ledger_id,
                            entry_id: e,
                            master_key,
                            lac,
                            payload,
                            digest,
                            recovery: true,
                        }),
                        missing,
                        tolerance,
                    );
                }
                Err(LedgerError::Bookie {
                    code: BookieErrorCode::NoSuchEntry | BookieErrorCode::NoSuchLedger,
                    ..
                }) => missing += 1,
                _ => {}
            }
        }
        judge_entry(None, missing, tolerance)
    }

    async fn finish_recovery(
        &self,
        mut meta: LedgerMetadata,
        version: u64,
    ) -> Result<LedgerMetadata, LedgerError> {
        let id = meta.ledger_id;
        let last = meta
            .fragments
            .last()
            .cloned()
            .ok_or(LedgerError::Metadata("ledger without fragments".into()))?;
        let fence = BookieRequest::Fence {
            ledger_id: id,
            master_key: meta.master_key,
        };
        let fences = join_all(last.bookies.iter().map(|b| self.call(b, &fence))).await;
        let answers: Vec<Option<i64>> = last
            .bookies
            .iter()
            .zip(&fences)
            .map(|(b, r)| match r {
                Ok(BookieResponse::Lac { lac, .. }) => Some(*lac),
                other => {
                    tracing::warn!(bookie = %b, ledger_id = id, result = ?other, "fence failed");
                    None
                }
            })
            .collect();
        let lac = fenced_lac(&answers, meta.ack_quorum).map_err(|(fenced, need)| {
            LedgerError::WriterFailed(id, format!("fenced {fenced} bookies, need {need}"))
        })?;
        let mut entry = first_tail_entry(lac, last.first_entry);
        // Entries are looked for on the last fragment as the writer left
        // it; bookies of it that are unreachable are replaced first (a new
        // fragment from `entry`, stored by CAS) so the tail can be
        // re-replicated to a full write quorum.
        let found_on = meta.clone();
        let mut version = version;
        let unreachable: Vec<String> = last
            .bookies
            .iter()
            .zip(&fences)
            .filter(|(_, r)| matches!(r, Err(LedgerError::Unreachable { .. })))
            .map(|(b, _)| b.clone())
            .collect();
        if !unreachable.is_empty() {
            let new = self
                .place_replacements(&last.bookies, &unreachable, unreachable.len())
                .await
                .unwrap_or_default();
            if new.len() < unreachable.len() {
                tracing::warn!(
                    ledger_id = id,
                    "recovery: not enough bookies to replace every unreachable one"
                );
            }
            let (ensemble, _) = swap_bookies(&last.bookies, &unreachable, &new);
            if ensemble != last.bookies {
                meta.start_fragment(entry, ensemble);
                if !self.store_metadata(&meta, version).await? {
                    return Err(LedgerError::Conflict(id));
                }
                version += 1;
                tracing::info!(ledger_id = id, replaced = ?unreachable, first_entry = entry, "recovery replaced unreachable bookies");
            }
        }
        let mut length = 0u64;
        // Bookies that did not answer the fence are not asked again: each
        // attempt would cost a connection timeout per entry.
        let alive = |b: &String| !unreachable.contains(b);
        // A writer with many adds in flight leaves the bookies' LAC that
        // far behind its last entry: the tail is read a window of entries
        // at a time (all reads at once), and re-replicated the same way —
        // one entry at a time cost two round trips per entry.
        let mut window = RECOVERY_WINDOW_FIRST;
        let tolerance = meta.write_quorum - meta.ack_quorum;
        loop {
            let ids: Vec<u64> = (entry..entry + window as u64).collect();
            let reads = join_all(ids.iter().map(|&e| {
                let set: Vec<String> = found_on.bookies_for(e).into_iter().filter(alive).collect();
                self.read_tail_entry(id, meta.master_key, e, set, tolerance)
            }))
            .await;
            // The tail ends at the first entry missing on enough bookies
            // that it cannot have been confirmed.
            let (found, ended) = tail_of(reads).map_err(|i| {
                LedgerError::Unreadable(
                    id,
                    ids[i],
                    "too few bookies answered during recovery".into(),
                )
            })?;
            // Re-replicate to the whole write set so the end is durable at Qw.
            let bytes: u64 = found.iter().map(|a| a.payload.len() as u64).sum();
            let acks = join_all(found.into_iter().map(|add| {
                let targets: Vec<String> = meta
                    .bookies_for(add.entry_id)
                    .into_iter()
                    .filter(alive)
                    .collect();
                async move {
                    let add = BookieRequest::Add(add);
                    join_all(targets.iter().map(|b| self.call(b, &add)))
                        .await
                        .into_iter()
                        .filter(|r| r.is_ok())
                        .count()
                }
            }))
            .await;
            for (i, n) in acks.iter().enumerate() {
                if *n < meta.ack_quorum {
                    return Err(LedgerError::WriterFailed(
                        id,
                        format!(
                            "re-replication of entry {} reached {n} bookies",
                            entry + i as u64
                        ),
                    ));
                }
            }
            length += bytes;
            entry += acks.len() as u64;
            if ended {
                break;
            }
            window = next_window(bytes, acks.len());
        }
        meta.state = LedgerState::Closed;
        meta.last_entry_id = entry as i64 - 1;
        meta.length_bytes += length;
        if !self.store_metadata(&meta, version).await? {
            let (now, _) = self.metadata(id).await?;
            if now.state == LedgerState::Closed {
                return Ok(now);
            }
            return Err(LedgerError::Conflict(id));
        }
        tracing::info!(
            ledger_id = id,
            last_entry_id = meta.last_entry_id,
            "ledger recovered and closed"
        );
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_needs_all_but_qa_minus_one_bookies() {
        assert_eq!(fence_quorum(3, 2), 2);
        assert_eq!(fence_quorum(5, 2), 4);
        assert_eq!(fence_quorum(2, 2), 1, "a shrunk fragment of two");
        assert_eq!(fence_quorum(3, 1), 3);
        assert_eq!(fenced_lac(&[Some(4), None, Some(7)], 2), Ok(7));
        assert_eq!(fenced_lac(&[Some(4), None, None], 2), Err((1, 2)));
        assert_eq!(fenced_lac(&[None, None], 2), Err((0, 1)));
        assert_eq!(
            fenced_lac(&[Some(-1), Some(-1)], 2),
            Ok(-1),
            "nothing confirmed yet"
        );
    }

    #[test]
    fn the_tail_starts_after_the_lac_within_the_last_fragment() {
        assert_eq!(first_tail_entry(-1, 0), 0);
        assert_eq!(first_tail_entry(9, 0), 10);
        assert_eq!(
            first_tail_entry(9, 40),
            40,
            "the LAC is from an earlier fragment"
        );
    }

    #[test]
    fn an_entry_is_missing_only_beyond_the_tolerance() {
        // Qw 3, Qa 2: missing on two of three means it never had 2 acks.
        assert_eq!(judge_entry(None::<u8>, 2, 1), TailRead::Missing);
        assert_eq!(judge_entry(None::<u8>, 1, 1), TailRead::Unknown);
        assert_eq!(judge_entry(Some(5u8), 3, 1), TailRead::Found(5));
        // Qw = Qa: one missing copy is enough to say so.
        assert_eq!(judge_entry(None::<u8>, 1, 0), TailRead::Missing);
    }

    #[test]
    fn the_tail_ends_at_the_first_missing_entry() {
        use TailRead::*;
        assert_eq!(
            tail_of(vec![Found(1), Found(2), Missing, Found(4)]),
            Ok((vec![1, 2], true))
        );
        assert_eq!(tail_of(vec![Found(1), Found(2)]), Ok((vec![1, 2], false)));
        assert_eq!(tail_of::<u8>(vec![Missing]), Ok((vec![], true)));
        assert_eq!(tail_of(vec![Found(1), Unknown, Missing]), Err(1));
        // Unknown after the end does not matter: the tail ended before it.
        assert_eq!(
            tail_of(vec![Found(1), Missing, Unknown]),
            Ok((vec![1], true))
        );
    }

    #[test]
    fn windows_follow_the_byte_budget() {
        assert_eq!(
            next_window(16 * 1024, 16),
            RECOVERY_WINDOW_MAX,
            "1 KiB entries"
        );
        assert_eq!(next_window(16 << 20, 16), 8, "1 MiB entries");
        assert_eq!(next_window(64 << 20, 1), 1, "never below one");
        assert_eq!(next_window(0, 0), RECOVERY_WINDOW_MAX);
    }
}

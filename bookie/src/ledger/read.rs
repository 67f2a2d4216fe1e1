//! Reads: single entries (speculative over the write set, digests
//! checked), long-polls of the LAC, and range reads striped over the
//! ensemble with read-ahead.

use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use magnetar_proto::ledger::{
    entry_digest, BookieRequest, BookieResponse, RangeEntry, MAX_RANGE_BYTES,
};

use super::client::LedgerClient;
use super::error::LedgerError;
use super::meta::LedgerMetadata;

/// How long a read waits for one replica before asking the next as well.
pub const SPECULATIVE_READ_DELAY: Duration = Duration::from_millis(50);

/// Single-entry reads in flight at once when a range read falls back to
/// reading entry by entry.
pub const READ_AHEAD_PARALLEL: usize = 16;

/// A range read asks a bookie for this many entries of one stripe at a
/// time (one `ReadRange` request; fewer when their payloads pass
/// [`MAX_RANGE_BYTES`]).
const RANGE_STRIPE_ENTRIES: u64 = 256;

/// How long a range read waits for one bookie's answer before asking the
/// next of the write set as well (an answer carries up to 1 MiB, some of
/// it from disk: longer than a single read's delay).
pub const SPECULATIVE_RANGE_READ_DELAY: Duration = Duration::from_millis(200);

/// Stretches of [`RANGE_STRIPE_ENTRIES`] × E entries a range read has in
/// flight at once (read-ahead).
const RANGE_CHUNKS_IN_FLIGHT: usize = 4;

impl LedgerClient {
    /// Reads one entry from a bookie of its write set, checking its digest.
    /// Bookies that failed recently are asked last; when one does not answer
    /// within [`SPECULATIVE_READ_DELAY`], the next is asked too and the
    /// first good answer wins. A corrupt copy is reported and skipped.
    pub async fn read(&self, meta: &LedgerMetadata, entry_id: u64) -> Result<Bytes, LedgerError> {
        let mut order = meta.bookies_for(entry_id);
        order.sort_by_key(|b| self.is_suspect(b));
        let req = BookieRequest::Read {
            ledger_id: meta.ledger_id,
            entry_id,
        };
        let launch = |b: String| {
            let req = &req;
            async move { (self.call(&b, req).await, b) }
        };
        let mut inflight = futures::stream::FuturesUnordered::new();
        let mut next = 0;
        let mut errors = Vec::new();
        loop {
            // Nothing in flight (start, or every asked replica failed): ask the next.
            if inflight.is_empty() {
                match order.get(next) {
                    Some(b) => {
                        inflight.push(launch(b.clone()));
                        next += 1;
                    }
                    None => break,
                }
            }
            let delay = tokio::time::sleep(SPECULATIVE_READ_DELAY);
            tokio::select! {
                Some((r, bookie)) = futures::StreamExt::next(&mut inflight) => {
                    match r {
                        Ok(BookieResponse::Entry { ledger_id, entry_id: e, lac, payload, digest }) => {
                            if ledger_id == meta.ledger_id
                                && e == entry_id
                                && entry_digest(ledger_id, e, lac, &payload) == digest
                            {
                                return Ok(payload);
                            }
                            tracing::error!(bookie, ledger_id, entry_id, "entry from bookie fails its digest; trying another replica");
                            errors.push(format!("{bookie}: bad digest"));
                        }
                        Ok(other) => errors.push(format!("{bookie}: unexpected {other:?}")),
                        Err(e) => {
                            if matches!(e, LedgerError::Unreachable { .. }) {
                                self.suspect(&bookie);
                            }
                            errors.push(e.to_string());
                        }
                    }
                }
                _ = delay, if next < order.len() => {
                    inflight.push(launch(order[next].clone()));
                    next += 1;
                }
            }
        }
        Err(LedgerError::Unreadable(
            meta.ledger_id,
            entry_id,
            errors.join("; "),
        ))
    }

    /// For readers tailing an open ledger: waits until some bookie of the
    /// current ensemble knows a LAC above `previous` (or `timeout`), and
    /// returns the highest LAC known then. Entries up to it are readable.
    pub async fn wait_for_lac(
        &self,
        meta: &LedgerMetadata,
        previous: i64,
        timeout: Duration,
    ) -> Result<i64, LedgerError> {
        use futures::StreamExt;
        let bookies = meta
            .fragments
            .last()
            .map(|f| f.bookies.clone())
            .unwrap_or_default();
        let req = BookieRequest::ReadLacLongPoll {
            ledger_id: meta.ledger_id,
            previous_lac: previous,
            timeout_ms: timeout.as_millis() as u64,
        };
        let mut rpc = self.rpc.clone();
        rpc.timeout = timeout + Duration::from_secs(2);
        let mut polls: futures::stream::FuturesUnordered<_> = bookies
            .iter()
            .map(|b| Self::call_with(&rpc, b, &req))
            .collect();
        let mut best = previous;
        let mut answered = 0;
        while let Some(r) = polls.next().await {
            if let Ok(BookieResponse::Lac { lac, .. }) = r {
                answered += 1;
                best = best.max(lac);
                if lac > previous {
                    return Ok(best);
                }
            }
        }
        if answered == 0 {
            return Err(LedgerError::Unreadable(
                meta.ledger_id,
                (previous + 1).max(0) as u64,
                "no bookie answered the LAC poll".into(),
            ));
        }
        Ok(best)
    }

    /// Reads entries `first..=last`, for catch-up readers; one result per
    /// entry, in order. The range is read in stretches of
    /// [`RANGE_STRIPE_ENTRIES`] × E entries ([`RANGE_CHUNKS_IN_FLIGHT`] at
    /// once), each with one `ReadRange` request per stripe — the entries
    /// whose ids are equal mod E, which share a write set — to its first
    /// bookie not suspected of failing: a request carries hundreds of
    /// entries instead of one. What a bookie does not return (it failed,
    /// answered short, or sent a copy that fails its digest) is read entry
    /// by entry as [`LedgerClient::read`] does, from any replica.
    pub async fn read_range(
        &self,
        meta: &LedgerMetadata,
        first: u64,
        last: u64,
    ) -> Vec<Result<Bytes, LedgerError>> {
        let started = std::time::Instant::now();
        let out = self.read_range_inner(meta, first, last).await;
        metrics::histogram!(crate::metrics::LEDGER_READ).record(started.elapsed().as_secs_f64());
        out
    }

    async fn read_range_inner(
        &self,
        meta: &LedgerMetadata,
        first: u64,
        last: u64,
    ) -> Vec<Result<Bytes, LedgerError>> {
        use futures::StreamExt;
        let e = (meta.ensemble_size as u64).max(1);
        let mut chunks = Vec::new();
        let mut at = first;
        while at <= last {
            // Within one fragment: a stripe's write set is then the same
            // for all its entries.
            let fragment_end = meta
                .fragments
                .iter()
                .find(|f| f.first_entry > at)
                .map(|f| f.first_entry - 1)
                .unwrap_or(u64::MAX);
            let end = last
                .min(fragment_end)
                .min(at.saturating_add(RANGE_STRIPE_ENTRIES * e - 1));
            chunks.push((at, end));
            match end.checked_add(1) {
                Some(next) => at = next,
                None => break,
            }
        }
        futures::stream::iter(chunks)
            .map(|(a, b)| self.read_chunk(meta, a, b))
            .buffered(RANGE_CHUNKS_IN_FLIGHT)
            .flat_map(futures::stream::iter)
            .collect()
            .await
    }

    /// Entries `first..=last` of one fragment: a `ReadRange` per stripe,
    /// then entry by entry for what those did not bring.
    async fn read_chunk(
        &self,
        meta: &LedgerMetadata,
        first: u64,
        last: u64,
    ) -> Vec<Result<Bytes, LedgerError>> {
        use futures::StreamExt;
        let step = meta.width_at(first) as u64;
        let n = (last - first + 1) as usize;
        let mut got: Vec<Option<Bytes>> = vec![None; n];
        let stripes = (first..=last).take(step as usize);
        for (start, entries) in
            join_all(stripes.map(|s| self.read_stripe(meta, s, last, step))).await
        {
            for (k, payload) in entries.into_iter().enumerate() {
                got[(start - first) as usize + k * step as usize] = Some(payload);
            }
        }
        let missing: Vec<usize> = (0..n).filter(|i| got[*i].is_none()).collect();
        let filled: Vec<Result<Bytes, LedgerError>> = futures::stream::iter(missing)
            .map(|i| self.read(meta, first + i as u64))
            .buffered(READ_AHEAD_PARALLEL)
            .collect()
            .await;
        // The gaps, in order, take the single reads, in the same order.
        let mut filled = filled.into_iter();
        got.into_iter()
            .map(|g| match g {
                Some(payload) => Ok(payload),
                None => filled.next().unwrap_or_else(|| {
                    Err(LedgerError::Unreadable(
                        meta.ledger_id,
                        first,
                        "lost read".into(),
                    ))
                }),
            })
            .collect()
    }

    /// Entries `start`, `start + step`, … up to `last` from the first
    /// bookie of their write set not suspected of failing, in as many
    /// `ReadRange` requests as it takes: the payloads of the first entries
    /// of the stripe that came back, in order, with good digests (maybe
    /// none). Returns `start` with them.
    async fn read_stripe(
        &self,
        meta: &LedgerMetadata,
        start: u64,
        last: u64,
        step: u64,
    ) -> (u64, Vec<Bytes>) {
        let mut got = Vec::new();
        let mut order = meta.bookies_for(start);
        order.sort_by_key(|b| self.is_suspect(b));
        let mut next = start;
        while next <= last {
            let entries = self
                .range_read(meta.ledger_id, &order, next, last, step)
                .await;
            if entries.is_empty() {
                break; // no progress: the rest entry by entry
            }
            let n = entries.len() as u64;
            got.extend(entries.into_iter().map(|e| e.payload));
            match n.checked_mul(step).and_then(|d| next.checked_add(d)) {
                Some(after) => next = after,
                None => break,
            }
        }
        (start, got)
    }

    /// One `ReadRange` for entries `first`, `first + step`, … up to `last`,
    /// from the bookies of `order` (see [`Self::range_call`]): the entries
    /// of the answer that follow in sequence from `first` with good digests
    /// — maybe none (a spoilt copy is reported and ends them).
    pub(super) async fn range_read(
        &self,
        ledger_id: u64,
        order: &[String],
        first: u64,
        last: u64,
        step: u64,
    ) -> Vec<RangeEntry> {
        let req = BookieRequest::ReadRange {
            ledger_id,
            first,
            last,
            step,
            max_bytes: MAX_RANGE_BYTES,
        };
        let Some((entries, bookie)) = self.range_call(ledger_id, order, &req).await else {
            return Vec::new();
        };
        let mut good = Vec::with_capacity(entries.len());
        let mut expect = Some(first);
        for re in entries {
            if expect != Some(re.entry_id) || re.entry_id > last {
                break;
            }
            if entry_digest(ledger_id, re.entry_id, re.lac, &re.payload) != re.digest {
                tracing::error!(
                    bookie = %bookie,
                    ledger_id,
                    entry_id = re.entry_id,
                    "entry from bookie fails its digest; trying another replica"
                );
                break;
            }
            expect = re.entry_id.checked_add(step);
            good.push(re);
        }
        good
    }

    /// Sends a `ReadRange` to the first bookie of `order`, and to the next
    /// as well each time [`SPECULATIVE_RANGE_READ_DELAY`] passes with no
    /// answer (a stalled bookie would otherwise hold a catch-up reader for
    /// the whole RPC timeout); the first answer with entries wins, with the
    /// bookie that sent it. `None` when every bookie failed or had none.
    async fn range_call(
        &self,
        ledger_id: u64,
        order: &[String],
        req: &BookieRequest,
    ) -> Option<(Vec<RangeEntry>, String)> {
        let launch = |b: &String| {
            let b = b.clone();
            async move { (self.call(&b, req).await, b) }
        };
        let mut inflight = futures::stream::FuturesUnordered::new();
        let mut next = 0;
        loop {
            if inflight.is_empty() {
                inflight.push(launch(order.get(next)?));
                next += 1;
            }
            let delay = tokio::time::sleep(SPECULATIVE_RANGE_READ_DELAY);
            tokio::select! {
                Some((r, bookie)) = futures::StreamExt::next(&mut inflight) => match r {
                    Ok(BookieResponse::Entries { ledger_id: l, entries })
                        if l == ledger_id && !entries.is_empty() =>
                    {
                        return Some((entries, bookie));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if matches!(e, LedgerError::Unreachable { .. }) {
                            self.suspect(&bookie);
                        }
                    }
                },
                _ = delay, if next < order.len() => {
                    inflight.push(launch(&order[next]));
                    next += 1;
                }
            }
        }
    }
}

//! The task of a topic's delayed-delivery index
//! (`subscription::delayed_index`): reads bucket chunks as they are needed,
//! seals the in-memory part into a bucket ledger when it is full, drops
//! released buckets, and tells the subscriptions what is due.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;

use super::persistent::Topic;
use crate::managed_ledger::cursor::Position;
use crate::managed_ledger::{DelayedBucket, ManagedLedger, MlError};
use crate::subscription::delayed_index::{decode_chunk, encode_chunk, DelayedIndex};
use crate::subscription::{now_ms, SubEvent};

/// How long the task waits at most between looks (a failed read or write
/// is retried after it).
const IDLE: Duration = Duration::from_secs(1);

/// The topic's task: reads bucket chunks as they are needed, seals the
/// in-memory part when it is full, drops released buckets, and tells the
/// subscriptions what is due. Ends when the topic closes.
pub async fn run(index: Arc<DelayedIndex>, ml: Arc<ManagedLedger>, topic: Weak<Topic>) {
    loop {
        let alive = topic.upgrade().is_some_and(|t| !t.is_closing());
        if !alive {
            return;
        }
        let mut trouble = false;
        for (ledger_id, chunk) in index.wanted_chunks() {
            let read = ml.read_side_ledger(ledger_id, chunk, chunk).await;
            let records = match read.map(|v| v.into_iter().next()) {
                Ok(Some(data)) => decode_chunk(&data),
                Ok(None) => Err("chunk missing".to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = &records {
                tracing::warn!(topic = %ml.name, ledger_id, chunk, error = %e, "reading the delayed-delivery index failed; will retry");
                trouble = true;
            }
            index.chunk_read(ledger_id, chunk, records.ok());
        }
        for ledger_id in index.take_exhausted() {
            match ml.change_delayed_buckets(None, Some(ledger_id)).await {
                Ok(()) => ml.delete_side_ledger(ledger_id).await,
                Err(e) => {
                    tracing::warn!(topic = %ml.name, ledger_id, error = %e, "could not drop a released delayed-index bucket; it is read again after a reload")
                }
            }
        }
        if let Some((records, last)) = index.take_for_seal() {
            let stored = store_bucket(&ml, &records, last, index.chunk_size()).await;
            match stored {
                Ok(ledger_id) => {
                    tracing::debug!(topic = %ml.name, ledger_id, records = records.len(), "delayed-delivery index sealed a bucket");
                    index.sealed(ledger_id);
                }
                Err(e) => {
                    tracing::warn!(topic = %ml.name, error = %e, "sealing the delayed-delivery index failed; it stays in memory and is retried");
                    index.seal_failed();
                    trouble = true;
                }
            }
        }
        let due = index.pop_due(now_ms());
        if !due.is_empty() {
            let Some(t) = topic.upgrade() else { return };
            let due: Arc<[Position]> = due.into();
            for h in t.subscription_handles().await {
                h.tell(SubEvent::DelayedDue(due.clone())).await;
            }
            continue;
        }
        let wait = match index.next_due() {
            _ if trouble => IDLE,
            Some(at) => Duration::from_millis(at.saturating_sub(now_ms())).min(IDLE),
            // Nothing waits: only an insert or the topic's close wakes it.
            None if index.is_empty() => Duration::from_secs(30),
            None => IDLE,
        };
        let _ = tokio::time::timeout(wait, index.wake.notified()).await;
    }
}

/// Writes sealed records as a bucket ledger and names it in the managed
/// ledger's record; its ledger id.
async fn store_bucket(
    ml: &ManagedLedger,
    records: &[(u64, Position)],
    last: Position,
    chunk: usize,
) -> Result<u64, MlError> {
    let chunks: Vec<Bytes> = records.chunks(chunk).map(encode_chunk).collect();
    let (ledger_id, written) = ml.write_side_ledger("delayed-index", chunks).await?;
    let bucket = DelayedBucket {
        ledger_id,
        chunks: written,
        entries: records.len() as u64,
        last,
    };
    if let Err(e) = ml.change_delayed_buckets(Some(bucket), None).await {
        ml.delete_side_ledger(ledger_id).await;
        return Err(e);
    }
    Ok(ledger_id)
}

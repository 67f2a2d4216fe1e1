//! Topic compaction: the latest message of each key up to a horizon, kept
//! in a ledger beside the topic's, which subscriptions with
//! `read_compacted` read instead of the topic up to the horizon.
//!
//! As Pulsar does: a message without a key is not kept; a message with an
//! empty payload (or `null_value`) deletes its key. Entries keep their
//! positions: a batch that keeps some of its messages is stored with the
//! others marked `compacted_out` (clients skip them), so message ids do not
//! change. An entry whose messages cannot be read (a compressed batch) is
//! kept whole.
//!
//! Two passes, so memory holds keys, not payloads: `plan` learns the latest
//! position of each key; `rewrite` builds each kept entry. A compacted
//! entry is `[ledger id u64][entry id i64][the entry]`. The
//! `pulsar.compaction` cursor stands at the horizon, so the entries after
//! it stay until the next compaction.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use magnetar_proto::frame::{decode_batch, encode_batch};
use magnetar_proto::pulsar::CompressionType;
use magnetar_proto::Payload;

pub use crate::managed_ledger::compacted::{decode, encode, CompactedView};
use crate::managed_ledger::cursor::Position;

/// The cursor standing at the horizon (Pulsar's is `__compaction`).
pub const CURSOR: &str = "pulsar.compaction";

/// One message of an entry, as compaction sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub key: Option<String>,
    /// Deletes its key.
    pub tombstone: bool,
}

/// The messages of a stored entry, or `None` when they cannot be read.
pub fn messages(entry: &Bytes) -> Option<Vec<Msg>> {
    let pl = Payload::parse(entry.clone()).ok()?;
    let md = &pl.metadata;
    let compressed = md
        .compression
        .is_some_and(|c| c != CompressionType::None as i32);
    match md.num_messages_in_batch {
        Some(n) if !compressed => Some(
            decode_batch(pl.payload(), n.max(0) as usize)
                .ok()?
                .into_iter()
                .map(|it| Msg {
                    // A message compacted out before stays out.
                    key: if it.metadata.compacted_out == Some(true) {
                        None
                    } else {
                        it.metadata.partition_key.clone()
                    },
                    tombstone: it.metadata.null_value == Some(true) || it.payload.is_empty(),
                })
                .collect(),
        ),
        Some(_) => None,
        None => Some(vec![Msg {
            key: md.partition_key.clone(),
            tombstone: md.null_value == Some(true) || pl.payload().is_empty(),
        }]),
    }
}

/// What of an entry the compacted view keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// All of it (it could not be read).
    Whole,
    /// These messages (indexes in its batch; `[0]` for a lone message).
    Messages(BTreeSet<usize>),
}

/// The first pass, fed entries in position order.
#[derive(Debug, Default)]
pub struct Plan {
    latest: HashMap<String, (Position, usize, bool)>,
    whole: BTreeSet<Position>,
}

impl Plan {
    pub fn add(&mut self, p: Position, msgs: Option<Vec<Msg>>) {
        let Some(msgs) = msgs else {
            self.whole.insert(p);
            return;
        };
        for (i, m) in msgs.into_iter().enumerate() {
            if let Some(k) = m.key {
                self.latest.insert(k, (p, i, m.tombstone));
            }
        }
    }

    /// Keys held now.
    pub fn keys(&self) -> usize {
        self.latest.values().filter(|(_, _, t)| !t).count()
    }

    /// The kept entries, in position order.
    pub fn finish(self) -> BTreeMap<Position, Keep> {
        let mut out: BTreeMap<Position, Keep> =
            self.whole.into_iter().map(|p| (p, Keep::Whole)).collect();
        for (p, i, tombstone) in self.latest.into_values() {
            if tombstone {
                continue;
            }
            match out
                .entry(p)
                .or_insert_with(|| Keep::Messages(BTreeSet::new()))
            {
                Keep::Messages(set) => {
                    set.insert(i);
                }
                Keep::Whole => {}
            }
        }
        out
    }
}

/// The entry as the compacted view stores it: whole, or a batch with the
/// messages not kept marked `compacted_out` (and emptied).
pub fn rewrite(entry: &Bytes, keep: &Keep) -> Bytes {
    let Keep::Messages(kept) = keep else {
        return entry.clone();
    };
    let Ok(pl) = Payload::parse(entry.clone()) else {
        return entry.clone();
    };
    let Some(n) = pl.metadata.num_messages_in_batch else {
        return entry.clone();
    };
    let Ok(mut items) = decode_batch(pl.payload(), n.max(0) as usize) else {
        return entry.clone();
    };
    if items.len() == kept.len() {
        return entry.clone();
    }
    for (i, it) in items.iter_mut().enumerate() {
        if !kept.contains(&i) {
            it.metadata.compacted_out = Some(true);
            it.metadata.payload_size = 0;
            it.payload = Bytes::new();
        }
    }
    let batch = encode_batch(&items);
    let mut md = pl.metadata.clone();
    md.uncompressed_size = Some(batch.len() as u32);
    Payload::build(md, &batch).headers_and_payload
}

/// Whether a compaction is running or how the last one ended (Pulsar's
/// `LongRunningProcessStatus`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Status {
    #[default]
    NotRun,
    Running,
    Success,
    Error(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use magnetar_proto::frame::BatchItem;
    use magnetar_proto::pulsar::{MessageMetadata, SingleMessageMetadata};

    fn single(key: Option<&str>, payload: &[u8]) -> Bytes {
        let md = MessageMetadata {
            producer_name: "p".into(),
            partition_key: key.map(String::from),
            ..Default::default()
        };
        Payload::build(md, payload).headers_and_payload
    }

    fn batch(items: &[(&str, &[u8])]) -> Bytes {
        let items: Vec<BatchItem> = items
            .iter()
            .map(|(k, p)| BatchItem {
                metadata: SingleMessageMetadata {
                    partition_key: Some(k.to_string()),
                    payload_size: p.len() as i32,
                    ..Default::default()
                },
                payload: Bytes::copy_from_slice(p),
            })
            .collect();
        let md = MessageMetadata {
            producer_name: "p".into(),
            num_messages_in_batch: Some(items.len() as i32),
            ..Default::default()
        };
        Payload::build(md, &encode_batch(&items)).headers_and_payload
    }

    fn pos(e: i64) -> Position {
        Position::new(3, e)
    }

    #[test]
    fn the_latest_message_of_each_key_is_kept_and_tombstones_delete() {
        let entries = [
            single(Some("a"), b"a1"),
            single(Some("b"), b"b1"),
            single(None, b"no key"),
            single(Some("a"), b"a2"),
            single(Some("b"), b""), // deletes b
            single(Some("c"), b"c1"),
        ];
        let mut plan = Plan::default();
        for (i, e) in entries.iter().enumerate() {
            plan.add(pos(i as i64), messages(e));
        }
        assert_eq!(plan.keys(), 2);
        let kept: Vec<Position> = plan.finish().into_keys().collect();
        assert_eq!(kept, vec![pos(3), pos(5)]);
    }

    #[test]
    fn a_batch_keeps_its_positions_with_the_rest_compacted_out() {
        let b = batch(&[("a", b"a1"), ("b", b"b1"), ("c", b"c1")]);
        let mut plan = Plan::default();
        plan.add(pos(0), messages(&b));
        plan.add(pos(1), messages(&single(Some("b"), b"b2")));
        let kept = plan.finish();
        assert_eq!(kept[&pos(0)], Keep::Messages(BTreeSet::from([0, 2])));
        let out = rewrite(&b, &kept[&pos(0)]);
        let pl = Payload::parse(out).unwrap();
        let items = decode_batch(pl.payload(), 3).unwrap();
        assert_eq!(items[0].payload, Bytes::from_static(b"a1"));
        assert_eq!(items[1].metadata.compacted_out, Some(true));
        assert!(items[1].payload.is_empty());
        assert_eq!(items[2].payload, Bytes::from_static(b"c1"));
        // Compacting again keeps what was compacted out out.
        let again = messages(&rewrite(&b, &kept[&pos(0)])).unwrap();
        assert_eq!(again[1].key, None);
    }

    #[test]
    fn compacted_entries_carry_their_position() {
        let e = single(Some("k"), b"v");
        let (p, back) = decode(encode(pos(9), &e)).unwrap();
        assert_eq!((p, back), (pos(9), e));
        assert!(decode(Bytes::from_static(b"short")).is_none());
    }
}

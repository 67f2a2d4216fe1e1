//! Reassembly of chunked messages, without I/O. A producer splits a message
//! larger than the broker's maximum into chunks sent as consecutive entries
//! whose metadata carries the message's `uuid`, the `chunk_id`, the number
//! of chunks and the whole size; the consumer joins them back in order.
//!
//! Bounded: at most `max_pending` messages are being assembled at once and
//! none waits longer than `expire_after`; a message dropped for either
//! reason (or because a chunk came out of order, as after a redelivery
//! midway) gives its chunks' ids back so the consumer asks for them again —
//! a chunked message is never acknowledged unless delivered whole.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::MessageId;

/// One chunk as it arrived.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub uuid: String,
    pub chunk_id: u32,
    pub num_chunks: u32,
    pub total_size: usize,
    pub id: MessageId,
    pub payload: Bytes,
}

/// What adding a chunk gave.
#[derive(Debug, Default)]
pub struct Added {
    /// The whole payload and every chunk's id, once the last chunk came.
    pub complete: Option<(Bytes, Vec<MessageId>)>,
    /// Chunks of messages given up on: to be redelivered.
    pub dropped: Vec<MessageId>,
}

#[derive(Debug)]
struct Partial {
    num_chunks: u32,
    total_size: usize,
    data: BytesMut,
    ids: Vec<MessageId>,
    started: Instant,
}

#[derive(Debug)]
pub struct Assembler {
    max_pending: usize,
    expire_after: Duration,
    partials: HashMap<String, Partial>,
}

impl Assembler {
    pub fn new(max_pending: usize, expire_after: Duration) -> Assembler {
        Assembler {
            max_pending: max_pending.max(1),
            expire_after,
            partials: HashMap::new(),
        }
    }

    /// Messages being assembled.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.partials.len()
    }

    /// Forgets everything (the subscription starts over); the ids of what
    /// was being assembled.
    pub fn clear(&mut self) -> Vec<MessageId> {
        self.partials.drain().flat_map(|(_, p)| p.ids).collect()
    }

    pub fn add(&mut self, c: Chunk, now: Instant) -> Added {
        let mut out = Added::default();
        // Expired ones first.
        let expire_after = self.expire_after;
        let expired: Vec<String> = self
            .partials
            .iter()
            .filter(|(_, p)| now.duration_since(p.started) >= expire_after)
            .map(|(u, _)| u.clone())
            .collect();
        for u in expired {
            if let Some(p) = self.partials.remove(&u) {
                out.dropped.extend(p.ids);
            }
        }
        let bad = c.num_chunks == 0 || c.chunk_id >= c.num_chunks;
        if bad {
            out.dropped.push(c.id);
            return out;
        }
        if c.chunk_id == 0 {
            // A new message (or the same one again, from its start).
            if let Some(old) = self.partials.remove(&c.uuid) {
                out.dropped.extend(old.ids);
            }
            if self.partials.len() >= self.max_pending {
                let oldest = self
                    .partials
                    .iter()
                    .min_by_key(|(_, p)| p.started)
                    .map(|(u, _)| u.clone());
                if let Some(p) = oldest.and_then(|u| self.partials.remove(&u)) {
                    out.dropped.extend(p.ids);
                }
            }
            self.partials.insert(
                c.uuid.clone(),
                Partial {
                    num_chunks: c.num_chunks,
                    total_size: c.total_size,
                    data: BytesMut::with_capacity(c.total_size.min(64 << 20)),
                    ids: Vec::new(),
                    started: now,
                },
            );
        }
        let Some(p) = self.partials.get_mut(&c.uuid) else {
            // A middle chunk of a message whose start we do not have.
            out.dropped.push(c.id);
            return out;
        };
        let in_order = c.chunk_id as usize == p.ids.len()
            && c.num_chunks == p.num_chunks
            && p.data.len() + c.payload.len() <= p.total_size;
        if !in_order {
            if let Some(p) = self.partials.remove(&c.uuid) {
                out.dropped.extend(p.ids);
            }
            out.dropped.push(c.id);
            return out;
        }
        p.data.extend_from_slice(&c.payload);
        p.ids.push(c.id);
        if p.ids.len() as u32 == p.num_chunks {
            if let Some(p) = self.partials.remove(&c.uuid) {
                if p.data.len() == p.total_size {
                    out.complete = Some((p.data.freeze(), p.ids));
                } else {
                    out.dropped.extend(p.ids);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(e: u64) -> MessageId {
        MessageId {
            ledger_id: 1,
            entry_id: e,
            partition: -1,
            batch_index: -1,
        }
    }

    fn chunks(uuid: &str, data: &[u8], size: usize, first_entry: u64) -> Vec<Chunk> {
        let n = data.len().div_ceil(size) as u32;
        data.chunks(size)
            .enumerate()
            .map(|(i, part)| Chunk {
                uuid: uuid.into(),
                chunk_id: i as u32,
                num_chunks: n,
                total_size: data.len(),
                id: id(first_entry + i as u64),
                payload: Bytes::copy_from_slice(part),
            })
            .collect()
    }

    #[test]
    fn interleaved_messages_are_joined_in_order() {
        let t = Instant::now();
        let mut a = Assembler::new(10, Duration::from_secs(60));
        let x: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let y = vec![9u8; 250];
        let (cx, cy) = (chunks("x", &x, 300, 0), chunks("y", &y, 100, 10));
        let mut done = Vec::new();
        for c in cx
            .iter()
            .zip(cy.iter())
            .flat_map(|(a, b)| [a.clone(), b.clone()])
        {
            let r = a.add(c, t);
            assert!(r.dropped.is_empty());
            done.extend(r.complete);
        }
        let r = a.add(cx[3].clone(), t);
        done.extend(r.complete);
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].0, y);
        assert_eq!(done[0].1, vec![id(10), id(11), id(12)]);
        assert_eq!(done[1].0, x);
        assert_eq!(done[1].1.len(), 4);
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn gaps_restarts_overflow_and_expiry_give_chunks_back() {
        let t = Instant::now();
        let mut a = Assembler::new(2, Duration::from_secs(60));
        let c = chunks("m", &[1u8; 30], 10, 0);
        a.add(c[0].clone(), t);
        // A gap (chunk 2 before 1): the message is dropped, its chunks back.
        let r = a.add(c[2].clone(), t);
        assert_eq!(r.dropped, vec![id(0), id(2)]);
        // A middle chunk without its start.
        assert_eq!(a.add(c[1].clone(), t).dropped, vec![id(1)]);
        // Redelivered from the start: assembled.
        for x in &c[..2] {
            assert!(a.add(x.clone(), t).complete.is_none());
        }
        assert!(a.add(c[2].clone(), t).complete.is_some());
        // Three messages started, room for two: the oldest goes.
        a.add(chunks("p", &[1; 20], 10, 20)[0].clone(), t);
        a.add(
            chunks("q", &[1; 20], 10, 30)[0].clone(),
            t + Duration::from_secs(1),
        );
        let r = a.add(
            chunks("r", &[1; 20], 10, 40)[0].clone(),
            t + Duration::from_secs(2),
        );
        assert_eq!(r.dropped, vec![id(20)]);
        // Expired after a minute (q started at 1 s, r at 2 s).
        let r = a.add(
            chunks("s", &[1; 20], 10, 50)[0].clone(),
            t + Duration::from_secs(61),
        );
        assert_eq!(r.dropped, vec![id(30)]);
        let mut left = a.clear();
        left.sort();
        assert_eq!(left, vec![id(40), id(50)]);
    }

    #[test]
    fn nonsense_metadata_is_dropped() {
        let t = Instant::now();
        let mut a = Assembler::new(2, Duration::from_secs(60));
        let mut c = chunks("m", &[1u8; 30], 10, 0);
        c[0].chunk_id = 5;
        assert_eq!(a.add(c[0].clone(), t).dropped, vec![id(0)]);
        let mut c = chunks("n", &[1u8; 30], 10, 0);
        c[1].payload = Bytes::from(vec![0u8; 50]); // more than the total
        a.add(c[0].clone(), t);
        assert_eq!(a.add(c[1].clone(), t).dropped, vec![id(0), id(1)]);
    }
}

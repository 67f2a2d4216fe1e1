//! The ledger protocol between ledger clients (brokers) and bookies.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A writer's credential for a ledger: the bookie binds the first key it sees
/// for a ledger and refuses adds and fences that carry another.
pub type MasterKey = [u8; 16];

/// A [`MasterKey`] on the wire as one byte string (a length and 16 bytes):
/// as an array it went through the encoder and decoder byte by byte, on
/// every add to every bookie.
mod key_bytes {
    use super::MasterKey;
    use serde::de::{Deserializer, Error, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(key: &MasterKey, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(key)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MasterKey, D::Error> {
        d.deserialize_bytes(Key)
    }

    struct Key;

    impl Visitor<'_> for Key {
        type Value = MasterKey;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a 16-byte master key")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<MasterKey, E> {
            v.try_into().map_err(|_| E::invalid_length(v.len(), &self))
        }
    }
}

/// Largest entry a bookie accepts.
pub const MAX_ENTRY_BYTES: usize = 6 * 1024 * 1024;

/// Digest of an entry: CRC32C over its identity, LAC and payload, so that an
/// entry stored or returned under the wrong (ledger, entry) is detected too.
pub fn entry_digest(ledger_id: u64, entry_id: u64, lac: i64, payload: &[u8]) -> u32 {
    let mut head = [0u8; 24];
    head[..8].copy_from_slice(&ledger_id.to_be_bytes());
    head[8..16].copy_from_slice(&entry_id.to_be_bytes());
    head[16..].copy_from_slice(&lac.to_be_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&head), payload)
}

/// One entry for a bookie to store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddRequest {
    pub ledger_id: u64,
    pub entry_id: u64,
    #[serde(with = "key_bytes")]
    pub master_key: MasterKey,
    /// Last add confirmed known to the writer when it sent this add.
    pub lac: i64,
    /// Shared with the received message: the bookie journals it and lets
    /// it go.
    #[serde(with = "crate::shared_bytes")]
    pub payload: Bytes,
    pub digest: u32,
    /// Set by recovery: allowed on a fenced ledger.
    pub recovery: bool,
}

/// Most adds a writer packs into one [`BookieRequest::AddBatch`].
pub const MAX_BATCH_ADDS: usize = 1024;
/// A writer stops packing a batch once its payloads reach this size, so a
/// batch stays under the RPC message limit even with one maximal entry last.
pub const BATCH_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BookieRequest {
    Add(AddRequest),
    /// Several adds (of any ledgers) in one message; answered by
    /// [`BookieResponse::AddedBatch`] with one result per add, in order.
    /// Each add is handled exactly as a single [`BookieRequest::Add`].
    AddBatch(Vec<AddRequest>),
    Read {
        ledger_id: u64,
        entry_id: u64,
    },
    /// Answers once the bookie knows a LAC above `previous_lac`, or after
    /// `timeout_ms` with what it knows — for readers tailing a ledger.
    ReadLacLongPoll {
        ledger_id: u64,
        previous_lac: i64,
        timeout_ms: u64,
    },
    ReadLac {
        ledger_id: u64,
    },
    /// Fences the ledger (persisted before the answer) and returns its LAC.
    Fence {
        ledger_id: u64,
        #[serde(with = "key_bytes")]
        master_key: MasterKey,
    },
    /// Entries `first`, `first + step`, … up to `last`, in order, for
    /// catch-up readers: answered by [`BookieResponse::Entries`] with those
    /// the bookie holds from `first` on, ending before the first it cannot
    /// return or once their payloads pass `max_bytes` (one entry at least);
    /// by an error when it cannot return `first`.
    ReadRange {
        ledger_id: u64,
        first: u64,
        last: u64,
        step: u64,
        max_bytes: u32,
    },
}

/// Most payload bytes a [`BookieRequest::ReadRange`] may ask for: with
/// one maximal entry past it, an answer stays under the RPC message limit.
pub const MAX_RANGE_BYTES: u32 = 1024 * 1024;
/// Most entries a bookie returns for one [`BookieRequest::ReadRange`]
/// (tiny entries: their per-entry overhead stays far below the limit).
pub const MAX_RANGE_ENTRIES: usize = 4096;

/// One entry of a [`BookieResponse::Entries`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeEntry {
    pub entry_id: u64,
    pub lac: i64,
    pub payload: Bytes,
    pub digest: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum BookieErrorCode {
    #[error("ledger is fenced")]
    Fenced,
    #[error("no such entry")]
    NoSuchEntry,
    #[error("no such ledger")]
    NoSuchLedger,
    #[error("digest mismatch")]
    BadDigest,
    #[error("wrong master key")]
    Unauthorized,
    #[error("bookie is read-only")]
    ReadOnly,
    #[error("entry too large")]
    TooLarge,
    #[error("bookie I/O error")]
    Io,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BookieResponse {
    Added {
        ledger_id: u64,
        entry_id: u64,
    },
    Entry {
        ledger_id: u64,
        entry_id: u64,
        lac: i64,
        // Copied, not shared: a reader may keep entries (a cache), and a
        // slice would keep the whole receive buffer it came in alive.
        payload: Bytes,
        digest: u32,
    },
    /// LAC as the bookie knows it (highest LAC piggybacked on its adds),
    /// plus the highest entry it stores for the ledger (-1: none).
    Lac {
        ledger_id: u64,
        lac: i64,
        last_entry: i64,
    },
    /// The outcome of each add of an `AddBatch`, in the batch's order.
    AddedBatch(Vec<Result<(), BookieErrorCode>>),
    Error(BookieErrorCode),
    /// The answer to a [`BookieRequest::ReadRange`].
    Entries {
        ledger_id: u64,
        entries: Vec<RangeEntry>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use bincode::Options;

    #[test]
    fn a_master_key_travels_as_one_byte_string() {
        let codec = bincode::DefaultOptions::new();
        let fence = BookieRequest::Fence {
            ledger_id: 9,
            master_key: *b"sixteen byte key",
        };
        let body = codec.serialize(&fence).unwrap();
        // Variant, ledger id, then the key as a length and its bytes.
        assert_eq!(&body[2..], b"\x10sixteen byte key");
        assert_eq!(codec.deserialize::<BookieRequest>(&body).unwrap(), fence);
        // A key of another length is refused, not cut or padded.
        let mut short = body.clone();
        short[2] = 15;
        short.pop();
        let err = codec.deserialize::<BookieRequest>(&short).unwrap_err();
        assert!(err.to_string().contains("16-byte master key"), "{err}");
    }
}

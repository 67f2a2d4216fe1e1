//! Replay at start: the journal after the last checkpoint is read back a
//! chunk at a time into the index, and a torn tail is found.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use magnetar_proto::ledger::{entry_digest, BookieErrorCode};

use super::index::{Index, Location};
use super::record::{
    ADD_HEADER, REC_ADD, REC_ADD_SEALED, REC_DELETE, REC_FENCE, REC_HEADER, REC_PAD,
};

/// Bytes of a segment replay reads at a time (small in tests, so that
/// records straddle chunks there).
pub(super) const REPLAY_CHUNK: usize = if cfg!(test) {
    64 * 1024
} else {
    8 * 1024 * 1024
};
/// No journal record is longer (an add of the largest entry is ~6 MiB); a
/// length field above it is a torn or spoilt record, not one to read on for.
const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// Replays segment `seg` (at `path`) from offset `from`, reading it a chunk
/// at a time (a whole segment in memory would be hundreds of megabytes at
/// every restart); returns where its valid records end and its length.
pub(super) fn replay_file(
    path: &Path,
    seg: u64,
    from: u64,
    index: &mut Index,
) -> std::io::Result<(u64, u64)> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    // `buf` holds the segment from `pos` on, as far as read.
    let mut pos = from.min(len);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let read_to = pos + buf.len() as u64;
        let n = (len - read_to).min(REPLAY_CHUNK as u64) as usize;
        if n > 0 {
            let have = buf.len();
            buf.resize(have + n, 0);
            file.read_exact_at(&mut buf[have..], read_to)?;
        }
        let used = replay(seg, &buf, pos, index);
        pos += used as u64;
        buf.drain(..used);
        let rest = &buf[..];
        let at_end = pos + rest.len() as u64 >= len;
        // Stopped at a record that is there in full (so it is spoilt), or
        // at the end of the file: the valid records end here.
        if at_end || !record_incomplete(rest) {
            return Ok((pos, len));
        }
    }
}

/// Whether `rest` is the start of a record that continues past it (read
/// more), rather than a complete record that failed its checks.
fn record_incomplete(rest: &[u8]) -> bool {
    if rest.len() < REC_HEADER {
        return true;
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    (1..=MAX_RECORD_BYTES).contains(&len) && 8 + len > rest.len()
}

/// Paired check: what was read back must be what was written.
pub(super) fn check_digest(
    ledger_id: u64,
    entry_id: u64,
    loc: &Location,
    payload: &[u8],
) -> Result<(), BookieErrorCode> {
    if entry_digest(ledger_id, entry_id, loc.lac, payload) != loc.digest {
        tracing::error!(ledger_id, entry_id, "stored entry fails its digest");
        return Err(BookieErrorCode::BadDigest);
    }
    Ok(())
}

/// Replays the records of `data`, which starts at `base` in segment `seg`;
/// returns how many bytes of it are valid records.
pub(super) fn replay(seg: u64, data: &[u8], base: u64, index: &mut Index) -> usize {
    let mut pos = 0usize;
    while data.len() - pos >= REC_HEADER {
        let len =
            u32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let crc = u32::from_be_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        if len < 1 || len - 1 > data.len() - pos - REC_HEADER {
            break;
        }
        let rec = &data[pos + 8..pos + 8 + len];
        let covered = if rec[0] == REC_ADD_SEALED {
            (1 + ADD_HEADER).min(rec.len())
        } else {
            rec.len()
        };
        if crc32c::crc32c(&rec[..covered]) != crc {
            break;
        }
        let body = &rec[1..];
        let u64_at = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().unwrap_or([0; 8]));
        match rec[0] {
            REC_ADD | REC_ADD_SEALED if body.len() >= ADD_HEADER => {
                let (ledger, entry, lac) = (u64_at(0), u64_at(8), u64_at(16) as i64);
                let digest = u32::from_be_bytes(body[24..28].try_into().unwrap_or([0; 4]));
                if rec[0] == REC_ADD_SEALED
                    && entry_digest(ledger, entry, lac, &body[ADD_HEADER..]) != digest
                {
                    break; // a torn payload
                }
                let mut key = [0u8; 16];
                key.copy_from_slice(&body[28..44]);
                let offset = base + (pos + REC_HEADER + ADD_HEADER) as u64;
                let loc = Location {
                    segment: seg,
                    offset,
                    len: (body.len() - ADD_HEADER) as u32,
                    lac,
                    digest,
                };
                index.journaled(ledger, entry, loc, key);
            }
            REC_DELETE => {
                for id in body.chunks_exact(8) {
                    index.drop_ledger(u64::from_be_bytes(id.try_into().unwrap_or([0; 8])));
                }
            }
            REC_PAD => {}
            REC_FENCE if body.len() >= 24 => {
                let l = index.ledger(u64_at(0));
                let mut key = [0u8; 16];
                key.copy_from_slice(&body[8..24]);
                l.master_key.get_or_insert(key);
                l.fenced = true;
            }
            _ => break,
        }
        pos += 8 + len;
    }
    pos
}

//! The journal's record format: `[u32 len][u32 crc32c][type]` then the
//! body; adds, fences, deletions and the padding that fills a group to the
//! block size.

use super::direct_io::DIRECT_ALIGN;

pub(super) const REC_ADD: u8 = 1;
pub(super) const REC_FENCE: u8 = 2;
pub(super) const REC_DELETE: u8 = 3;
/// Fills a group up to the block size; replay skips it.
pub(super) const REC_PAD: u8 = 4;
/// An add whose record CRC covers its header only: the payload is covered
/// by the entry's digest, which was checked when the add came in and is
/// checked again at replay — one CRC pass over every payload fewer on the
/// journal thread. (`REC_ADD`, CRC over everything, still replays.)
pub(super) const REC_ADD_SEALED: u8 = 5;

/// `[u32 len][u32 crc32c][type]` then the body.
pub(super) const REC_HEADER: usize = 9;
/// Add body before the payload: ledger, entry, lac, digest, master key.
pub(super) const ADD_HEADER: usize = 8 + 8 + 8 + 4 + 16;

/// Pads the group staged in `buf` from `base` to the block size with a
/// record replay skips (a record needs a header, so a gap shorter than one
/// takes a block more).
pub(super) fn pad_group(buf: &mut Vec<u8>, base: usize) {
    static ZEROS: [u8; DIRECT_ALIGN] = [0; DIRECT_ALIGN];
    let len = buf.len() - base;
    let mut pad = len.next_multiple_of(DIRECT_ALIGN) - len;
    if pad == 0 {
        return;
    }
    if pad < REC_HEADER {
        pad += DIRECT_ALIGN;
    }
    put_record(buf, REC_PAD, &[&ZEROS[..pad - REC_HEADER]]);
}

/// Appends `[len][crc32c][kind][parts…]` to `buf`; returns where the body starts.
pub(super) fn put_record(buf: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) -> usize {
    put_record_sealed(buf, kind, parts, &[])
}

/// As [`put_record`], with `tail` appended after `parts` and left out of
/// the CRC (see [`REC_ADD_SEALED`]).
pub(super) fn put_record_sealed(
    buf: &mut Vec<u8>,
    kind: u8,
    parts: &[&[u8]],
    tail: &[u8],
) -> usize {
    let start = buf.len();
    let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>() + tail.len();
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.push(kind);
    for p in parts {
        buf.extend_from_slice(p);
    }
    let crc = crc32c::crc32c(&buf[start + 8..]);
    buf.extend_from_slice(tail);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    start + REC_HEADER
}

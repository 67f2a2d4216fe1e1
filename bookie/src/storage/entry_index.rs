//! Where an entry log's entries are. Its `.eidx` file lists every entry of
//! the log — (ledger, entry, offset, length, LAC, digest), fixed-size
//! records in the log's order, which is sorted by (ledger, entry) one
//! checkpoint window at a time — and after the list a table of *runs*: the
//! stretches of the list that hold one ledger's entries in rising order.
//!
//! Only the runs are kept in memory (a few dozen bytes per ledger per
//! checkpoint window, where a map of every entry cost ~95 bytes an entry:
//! gigabytes for a bookie holding tens of millions of entries), and a
//! restart reads only the run tables. An entry is found by reading the few
//! records around where it should be — one read, usually from the page
//! cache — guessing its place from the run's first and last entry ids.
//!
//! Layout (little-endian, as the format written before runs existed, whose
//! files still open — their runs are rebuilt from the records):
//! `[u64 count][count × record][u64 runs][runs × run][u32 crc32c of the run table]`.

use std::fs::File;
use std::io::{Error, ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Bytes of one entry record: ledger, entry, offset, len (u32), LAC, digest (u32).
pub(crate) const RECORD: usize = 8 + 8 + 8 + 4 + 8 + 4;
/// Bytes of one run in the table: ledger, first, last, start, count, bytes.
const RUN: usize = 6 * 8;
/// Records read per probe of a run (about a page).
const PROBE: u64 = 102;
/// Records read at a time when a whole run (or file) is walked.
const SCAN: u64 = 64 * 1024;

/// One entry's place in an entry log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub ledger: u64,
    pub entry: u64,
    pub offset: u64,
    pub len: u32,
    pub lac: i64,
    pub digest: u32,
}

impl Record {
    fn encode(&self) -> [u8; RECORD] {
        let mut b = [0u8; RECORD];
        b[0..8].copy_from_slice(&self.ledger.to_le_bytes());
        b[8..16].copy_from_slice(&self.entry.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..36].copy_from_slice(&self.lac.to_le_bytes());
        b[36..40].copy_from_slice(&self.digest.to_le_bytes());
        b
    }

    /// `b` is at least [`RECORD`] bytes.
    fn decode(b: &[u8]) -> Record {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        Record {
            ledger: u64_at(0),
            entry: u64_at(8),
            offset: u64_at(16),
            len: u32_at(24),
            lac: u64_at(28) as i64,
            digest: u32_at(36),
        }
    }
}

/// Records `start..start + count` of entry log `log`'s index: one ledger's
/// entries `first..=last` (not necessarily every id between), in rising
/// order (an entry written twice is listed twice, the later copy last).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub log: u64,
    pub first: u64,
    pub last: u64,
    pub start: u64,
    pub count: u64,
    /// Payload bytes of its entries.
    pub bytes: u64,
}

/// Cuts a list of records into runs as they go by.
struct Runs {
    log: u64,
    done: Vec<(u64, Run)>,
    at: u64,
}

impl Runs {
    fn new(log: u64) -> Runs {
        Runs {
            log,
            done: Vec::new(),
            at: 0,
        }
    }

    fn push(&mut self, r: &Record) {
        match self.done.last_mut() {
            Some((ledger, run)) if *ledger == r.ledger && r.entry >= run.last => {
                run.last = r.entry;
                run.count += 1;
                run.bytes += r.len as u64;
            }
            _ => self.done.push((
                r.ledger,
                Run {
                    log: self.log,
                    first: r.entry,
                    last: r.entry,
                    start: self.at,
                    count: 1,
                    bytes: r.len as u64,
                },
            )),
        }
        self.at += 1;
    }
}

fn invalid(what: String) -> Error {
    Error::new(ErrorKind::InvalidData, what)
}

/// Writes the index of entry log `log` listing `records` (in the log's
/// order) and returns its runs, by ledger.
pub(crate) fn write(
    out: &mut impl Write,
    log: u64,
    records: impl ExactSizeIterator<Item = Record>,
) -> std::io::Result<Vec<(u64, Run)>> {
    out.write_all(&(records.len() as u64).to_le_bytes())?;
    let mut runs = Runs::new(log);
    for r in records {
        out.write_all(&r.encode())?;
        runs.push(&r);
    }
    let mut table = Vec::with_capacity(8 + runs.done.len() * RUN + 4);
    table.extend_from_slice(&(runs.done.len() as u64).to_le_bytes());
    for (ledger, run) in &runs.done {
        for v in [
            *ledger, run.first, run.last, run.start, run.count, run.bytes,
        ] {
            table.extend_from_slice(&v.to_le_bytes());
        }
    }
    let crc = crc32c::crc32c(&table);
    table.extend_from_slice(&crc.to_le_bytes());
    out.write_all(&table)?;
    Ok(runs.done)
}

fn read_u64(file: &File, at: u64) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, at)?;
    Ok(u64::from_le_bytes(b))
}

/// The runs of entry log `log`, by ledger, from its index's run table — or
/// built from its records when the file has none (written before run
/// tables existed) or a spoilt one.
pub(crate) fn load_runs(file: &File, log: u64) -> std::io::Result<Vec<(u64, Run)>> {
    let size = file.metadata()?.len();
    let count = read_u64(file, 0)?;
    let records_end = count
        .checked_mul(RECORD as u64)
        .and_then(|n| n.checked_add(8))
        .filter(|end| *end <= size)
        .ok_or_else(|| invalid(format!("{count} records do not fit {size} bytes")))?;
    if let Some(runs) = run_table(file, log, records_end, size, count)? {
        return Ok(runs);
    }
    let mut runs = Runs::new(log);
    let mut buf = vec![0u8; (SCAN as usize) * RECORD];
    let mut i = 0;
    while i < count {
        let n = (count - i).min(SCAN);
        let chunk = &mut buf[..n as usize * RECORD];
        file.read_exact_at(chunk, 8 + i * RECORD as u64)?;
        for b in chunk.chunks_exact(RECORD) {
            runs.push(&Record::decode(b));
        }
        i += n;
    }
    Ok(runs.done)
}

/// The run table after `count` records ending at `at`, if the file has a
/// sound one.
fn run_table(
    file: &File,
    log: u64,
    at: u64,
    size: u64,
    count: u64,
) -> std::io::Result<Option<Vec<(u64, Run)>>> {
    if size.saturating_sub(at) < 8 {
        return Ok(None);
    }
    let n = read_u64(file, at)?;
    let fits = |len: &u64| {
        len.checked_add(at + 8 + 4)
            .is_some_and(|end| n > 0 && end <= size)
    };
    let Some(len) = n.checked_mul(RUN as u64).filter(fits) else {
        return Ok(None);
    };
    let mut table = vec![0u8; 8 + len as usize + 4];
    file.read_exact_at(&mut table, at)?;
    let (body, crc) = table.split_at(8 + len as usize);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().unwrap_or([0; 4])) {
        tracing::warn!(
            log,
            "entry index: spoilt run table; rebuilding it from the records"
        );
        return Ok(None);
    }
    let mut runs = Vec::with_capacity(n as usize);
    for b in body[8..].chunks_exact(RUN) {
        let v = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let run = Run {
            log,
            first: v(1),
            last: v(2),
            start: v(3),
            count: v(4),
            bytes: v(5),
        };
        let end = run.start.checked_add(run.count);
        if run.count == 0 || run.first > run.last || end.is_none_or(|end| end > count) {
            return Err(invalid(format!(
                "entry index of log {log}: bad run {run:?}"
            )));
        }
        runs.push((v(0), run));
    }
    Ok(Some(runs))
}

/// Reads records `from..from + n` of the index into `buf`.
fn read_records<'a>(
    file: &File,
    buf: &'a mut Vec<u8>,
    from: u64,
    n: u64,
) -> std::io::Result<&'a [u8]> {
    buf.resize(n as usize * RECORD, 0);
    file.read_exact_at(buf, 8 + from * RECORD as u64)?;
    Ok(buf)
}

/// The records of a run `find` read last, kept for the next look-up: a
/// range read asks for entries in order, and one read of the index then
/// serves the ~100 entries of a block instead of one.
#[derive(Default)]
pub(crate) struct Block {
    /// The index file and run they are from.
    file: Option<Arc<File>>,
    run_start: u64,
    bytes: Vec<u8>,
}

/// The record of `entry` of `ledger` in `run` of index `file` (the later
/// copy where it is listed twice), or `None` when the run does not hold
/// it; `block` is looked in first and left holding the records read.
pub(crate) fn find(
    file: &Arc<File>,
    ledger: u64,
    run: &Run,
    entry: u64,
    block: &mut Block,
) -> std::io::Result<Option<Record>> {
    if entry < run.first || entry > run.last {
        return Ok(None);
    }
    let same_run = block
        .file
        .as_ref()
        .is_some_and(|f| Arc::ptr_eq(f, file) && block.run_start == run.start);
    if same_run {
        if let Some(found) = within(&block.bytes, entry) {
            return Ok(found);
        }
    }
    block.file = Some(file.clone());
    block.run_start = run.start;
    // Records lo..hi of the run may hold it; lo_e and hi_e bound their ids.
    let (mut lo, mut hi) = (0u64, run.count);
    let (mut lo_e, mut hi_e) = (run.first, run.last);
    while lo < hi {
        let span = hi - lo;
        let from = if span <= PROBE {
            lo
        } else {
            // Its place if the ids were spread evenly over the records.
            let guess = lo
                + ((entry - lo_e) as u128 * (span - 1) as u128 / (hi_e - lo_e).max(1) as u128)
                    as u64;
            guess.saturating_sub(PROBE / 2).clamp(lo, hi - PROBE)
        };
        let n = (hi - from).min(PROBE);
        let bytes = read_records(file, &mut block.bytes, run.start + from, n)?;
        let (head, tail) = (
            Record::decode(bytes),
            Record::decode(&bytes[bytes.len() - RECORD..]),
        );
        if head.ledger != ledger || tail.ledger != ledger {
            block.bytes.clear();
            return Err(invalid(format!(
                "entry index of log {}: run {run:?} holds ledger {} records",
                run.log, head.ledger
            )));
        }
        if entry < head.entry {
            (hi, hi_e) = (from, head.entry);
        } else if entry > tail.entry {
            (lo, lo_e) = (from + n, tail.entry);
        } else {
            return Ok(within(bytes, entry).flatten());
        }
    }
    Ok(None)
}

/// In `bytes` (whole records, ids rising): `Some` with the last record of
/// `entry` (or `None` if it has none) when their ids span `entry`; `None`
/// when it lies outside them.
fn within(bytes: &[u8], entry: u64) -> Option<Option<Record>> {
    let n = bytes.len() / RECORD;
    if n == 0 {
        return None;
    }
    let at = |i: usize| Record::decode(&bytes[i * RECORD..]);
    if entry < at(0).entry || entry > at(n - 1).entry {
        return None;
    }
    let (mut a, mut b) = (0, n);
    while a < b {
        let m = (a + b) / 2;
        if at(m).entry <= entry {
            a = m + 1;
        } else {
            b = m;
        }
    }
    // a ≥ 1: the first id is at most `entry`.
    Some(Some(at(a - 1)).filter(|r| r.entry == entry))
}

/// Calls `f` with every record of `run`, in order.
pub(crate) fn visit(file: &File, run: &Run, mut f: impl FnMut(&Record)) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut i = 0;
    while i < run.count {
        let n = (run.count - i).min(SCAN);
        for b in read_records(file, &mut buf, run.start + i, n)?.chunks_exact(RECORD) {
            f(&Record::decode(b));
        }
        i += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ledger: u64, entry: u64, offset: u64) -> Record {
        Record {
            ledger,
            entry,
            offset,
            len: 10 + (entry % 7) as u32,
            lac: entry as i64 - 1,
            digest: (ledger * 31 + entry) as u32,
        }
    }

    /// Ledger 1 with the ids a bookie of a 3/2/2 ensemble holds (two of
    /// every three), squared ids for ledger 2 (far from evenly spread),
    /// then ledger 1 again with a re-written entry listed twice.
    fn listing() -> Vec<Record> {
        let mut v = Vec::new();
        let ids1 = (0..3000u64).filter(|e| e % 3 != 1);
        let ids2 = (0..400u64).map(|i| i * i);
        let mut offset = 0;
        for (l, e) in ids1.map(|e| (1, e)).chain(ids2.map(|e| (2, e))) {
            v.push(record(l, e, offset));
            offset += 100;
        }
        for e in [5000u64, 5001, 5001, 5002] {
            v.push(record(1, e, offset));
            offset += 100;
        }
        v
    }

    fn written(records: &[Record]) -> (tempfile::NamedTempFile, Vec<(u64, Run)>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let runs = write(&mut f, 7, records.iter().copied()).unwrap();
        // As `LogWriter` leaves it: padded to a block.
        let len = f.as_file().metadata().unwrap().len();
        f.as_file().set_len(len.next_multiple_of(4096)).unwrap();
        (f, runs)
    }

    #[test]
    fn runs_follow_ledgers_and_rising_ids() {
        let (_f, runs) = written(&listing());
        let spans: Vec<(u64, u64, u64, u64)> = runs
            .iter()
            .map(|(l, r)| (*l, r.first, r.last, r.count))
            .collect();
        assert_eq!(
            spans,
            vec![
                (1, 0, 2999, 2000),
                (2, 0, 399 * 399, 400),
                (1, 5000, 5002, 4)
            ]
        );
        assert_eq!(runs[1].1.start, 2000);
        assert!(runs.iter().all(|(_, r)| r.log == 7));
    }

    #[test]
    fn every_listed_entry_is_found_and_no_other() {
        let listed = listing();
        let (f, runs) = written(&listed);
        let file = &Arc::new(f.reopen().unwrap());
        // Each look-up on its own, then all through one block (in order, as
        // a range read asks, and backwards).
        let mut shared = Block::default();
        let order: Vec<usize> = (0..listed.len()).chain((0..listed.len()).rev()).collect();
        for (k, &i) in order.iter().enumerate() {
            let want = &listed[i];
            let (_, run) = runs
                .iter()
                .find(|(l, r)| {
                    *l == want.ledger && (r.start..r.start + r.count).contains(&(i as u64))
                })
                .unwrap();
            let got = if k < listed.len() {
                find(file, want.ledger, run, want.entry, &mut Block::default())
            } else {
                find(file, want.ledger, run, want.entry, &mut shared)
            };
            let got = got.unwrap().unwrap();
            if want.entry == 5001 {
                // Listed twice: the later copy.
                assert_eq!(got, listed[listed.len() - 2]);
            } else {
                assert_eq!(&got, want);
            }
            // A missing id next to it, through the same block.
            if want.ledger == 1 && want.entry < 3000 && want.entry.is_multiple_of(3) {
                assert_eq!(
                    find(file, 1, run, want.entry + 1, &mut shared).unwrap(),
                    None
                );
            }
        }
        let (ledger1, ledger2) = (&runs[0].1, &runs[1].1);
        let fresh = || Block::default();
        for missing in [1u64, 4, 2998, 3000, 99_999] {
            assert_eq!(
                find(file, 1, ledger1, missing, &mut fresh()).unwrap(),
                None,
                "{missing}"
            );
        }
        for missing in [2u64, 399 * 399 - 1, 200 * 200 + 1] {
            assert_eq!(
                find(file, 2, ledger2, missing, &mut fresh()).unwrap(),
                None,
                "{missing}"
            );
        }
        // A run that does not match the file is an error, not a wrong entry.
        assert!(find(file, 2, ledger1, 3, &mut fresh()).is_err());
    }

    #[test]
    fn a_missing_or_spoilt_run_table_is_rebuilt_from_the_records() {
        let listed = listing();
        let (f, runs) = written(&listed);
        assert_eq!(load_runs(f.as_file(), 7).unwrap(), runs);
        // A bit flipped in the table: caught by its CRC.
        let table_at = 8 + (listed.len() * RECORD) as u64 + 8 + 3;
        let mut b = [0u8; 1];
        f.as_file().read_exact_at(&mut b, table_at).unwrap();
        f.as_file().write_all_at(&[b[0] ^ 1], table_at).unwrap();
        assert_eq!(load_runs(f.as_file(), 7).unwrap(), runs);
        // The format before run tables (a bincode list of the same
        // records, padded with zeros) opens too.
        #[derive(serde::Serialize)]
        struct Old {
            ledger: u64,
            entry: u64,
            offset: u64,
            len: u32,
            lac: i64,
            digest: u32,
        }
        let old: Vec<Old> = listed
            .iter()
            .map(|r| Old {
                ledger: r.ledger,
                entry: r.entry,
                offset: r.offset,
                len: r.len,
                lac: r.lac,
                digest: r.digest,
            })
            .collect();
        let mut bytes = bincode::serialize(&old).unwrap();
        assert_eq!(bytes.len(), 8 + listed.len() * RECORD);
        bytes.resize(bytes.len().next_multiple_of(4096), 0);
        let g = tempfile::NamedTempFile::new().unwrap();
        g.as_file().write_all_at(&bytes, 0).unwrap();
        assert_eq!(load_runs(g.as_file(), 7).unwrap(), runs);
        let (_, run) = runs[1];
        let g_file = Arc::new(g.reopen().unwrap());
        let found = find(&g_file, 2, &run, 100, &mut Block::default()).unwrap();
        assert_eq!(found, Some(listed[2010]));
        // Unpadded, too.
        g.as_file()
            .set_len((8 + listed.len() * RECORD) as u64)
            .unwrap();
        assert_eq!(load_runs(g.as_file(), 7).unwrap(), runs);
        // A count that the file cannot hold is an error.
        g.as_file()
            .write_all_at(&u64::MAX.to_le_bytes(), 0)
            .unwrap();
        assert!(load_runs(g.as_file(), 7).is_err());
    }

    /// Index files of random bytes (a spoilt disk, a stray file) give
    /// errors or runs that `find` and `visit` handle — never a panic.
    #[test]
    fn random_index_files_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..300 {
            let f = tempfile::NamedTempFile::new().unwrap();
            let len = (next() % 4096) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 3 == 0 && len >= 8 {
                // A believable record count, so the run table is read.
                let count = next() % (len as u64 / RECORD as u64 + 1);
                bytes[..8].copy_from_slice(&count.to_le_bytes());
            }
            if round % 5 == 0 {
                // A sound file with some bytes spoilt.
                let (g, _) = written(&listing());
                let mut good = std::fs::read(g.path()).unwrap();
                for _ in 0..4 {
                    let at = (next() as usize) % good.len();
                    good[at] = next() as u8;
                }
                bytes = good;
            }
            f.as_file().write_all_at(&bytes, 0).unwrap();
            let Ok(runs) = load_runs(f.as_file(), 7) else {
                continue;
            };
            let file = Arc::new(f.reopen().unwrap());
            let mut block = Block::default();
            for (ledger, run) in runs.iter().take(8) {
                for entry in [run.first, run.last, run.first / 2 + run.last / 2, next()] {
                    let _ = find(&file, *ledger, run, entry, &mut block);
                }
                let _ = visit(f.as_file(), run, |_| {});
            }
        }
    }
}

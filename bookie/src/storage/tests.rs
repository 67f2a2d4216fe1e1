//! Tests of the storage engine as a whole.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use bytes::Bytes;
use magnetar_proto::ledger::{entry_digest, BookieErrorCode, MasterKey};

use super::direct_io::*;
use super::index::*;
use super::record::*;
use super::replay::*;
use super::*;

fn key() -> MasterKey {
    [7; 16]
}

async fn add(j: &Storage, l: u64, e: u64, data: &[u8]) -> Result<(), BookieErrorCode> {
    let p = Bytes::copy_from_slice(data);
    j.add(
        l,
        e,
        e as i64 - 1,
        key(),
        p.clone(),
        entry_digest(l, e, e as i64 - 1, &p),
        false,
    )
    .await
}

#[tokio::test]
async fn acked_entries_survive_restart_and_torn_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Storage::open(dir.path()).unwrap();
        let adds: Vec<_> = (0..200u64)
            .map(|e| {
                let j = j.clone();
                tokio::spawn(
                    async move { add(&j, 1 + e % 3, e, format!("entry-{e}").as_bytes()).await },
                )
            })
            .collect();
        for a in adds {
            a.await.unwrap().unwrap();
        }
        j.fence(2, key()).await.unwrap();
    }
    // Simulate a crash in the middle of a write: garbage after the last record.
    let seg = segment_path(dir.path(), 0);
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&[0, 0, 1, 0, 9, 9]).unwrap();
    drop(f);
    let j = Storage::open(dir.path()).unwrap();
    for e in 0..200u64 {
        let got = j.read(1 + e % 3, e).unwrap();
        assert_eq!(&got.payload[..], format!("entry-{e}").as_bytes());
    }
    assert_eq!(
        add(&j, 2, 1000, b"late").await,
        Err(BookieErrorCode::Fenced),
        "fence survives restart"
    );
    assert!(
        add(&j, 1, 1000, b"ok").await.is_ok(),
        "journal writable after the torn tail was cut"
    );
    let wrong = j
        .add(
            1,
            1001,
            0,
            [9; 16],
            Bytes::from_static(b"x"),
            entry_digest(1, 1001, 0, b"x"),
            false,
        )
        .await;
    assert_eq!(wrong, Err(BookieErrorCode::Unauthorized));
    let bad = j
        .add(1, 1002, 0, key(), Bytes::from_static(b"x"), 12345, false)
        .await;
    assert_eq!(bad, Err(BookieErrorCode::BadDigest));
}

/// Adds are journaled with a CRC over their header only (the entry's
/// digest covers the payload): a payload torn or spoilt on disk ends the
/// replay there like a bad CRC would; records of the older kind (CRC
/// over everything) still replay.
#[test]
fn a_sealed_add_with_a_spoilt_payload_ends_replay_and_old_adds_replay() {
    let add_record = |buf: &mut Vec<u8>, sealed: bool, e: u64, p: &[u8]| {
        let digest = entry_digest(1, e, e as i64 - 1, p);
        let (id, lac, digest) = (e.to_be_bytes(), (e as i64 - 1).to_be_bytes(), digest);
        let head: [&[u8]; 5] = [
            &1u64.to_be_bytes(),
            &id,
            &lac,
            &digest.to_be_bytes(),
            &key(),
        ];
        if sealed {
            put_record_sealed(buf, REC_ADD_SEALED, &head, p);
        } else {
            put_record(
                buf,
                REC_ADD,
                &[head[0], head[1], head[2], head[3], head[4], p],
            );
        }
    };
    let mut data = Vec::new();
    add_record(&mut data, false, 0, b"old kind, all covered");
    add_record(&mut data, true, 1, b"header covered");
    let spoilt_at = data.len();
    add_record(&mut data, true, 2, b"spoilt on disk");
    add_record(&mut data, true, 3, b"after the spoilt one");
    let mut index = Index::default();
    assert_eq!(replay(0, &data, 0, &mut index), data.len());
    assert_eq!(index.ledgers[&1].journaled.len(), 4);
    // One payload byte of entry 2 flipped: replay stops before it.
    let last = data.len() - 1;
    let mut spoilt = data.clone();
    let in_payload = spoilt_at + REC_HEADER + ADD_HEADER + 3;
    spoilt[in_payload] ^= 0x20;
    let mut index = Index::default();
    assert_eq!(replay(0, &spoilt, 0, &mut index), spoilt_at);
    assert_eq!(index.ledgers[&1].journaled.len(), 2);
    // A flipped header byte is caught by the CRC.
    let mut spoilt = data.clone();
    spoilt[spoilt_at + REC_HEADER + 2] ^= 1;
    let mut index = Index::default();
    assert_eq!(replay(0, &spoilt, 0, &mut index), spoilt_at);
    // A torn last payload, likewise.
    let mut index = Index::default();
    assert!(replay(0, &data[..last], 0, &mut index) < last);
    assert_eq!(index.ledgers[&1].journaled.len(), 3);
}

#[tokio::test]
async fn lone_adds_are_padded_to_blocks_and_replay_skips_the_padding() {
    let dir = tempfile::tempdir().unwrap();
    let mut probe = OpenOptions::new();
    probe.write(true).create(true);
    let (_, direct) = open_direct(&probe, &dir.path().join("probe")).unwrap();
    std::fs::remove_file(dir.path().join("probe")).unwrap();
    // One add per group; 4,039 bytes leave a gap shorter than a record
    // header before the block end, so its padding takes a block more.
    let sizes = [1usize, 4039, 4096, 5000, 100];
    let payload = |e: u64| vec![e as u8; sizes[e as usize % sizes.len()]];
    {
        let j = Storage::open(dir.path()).unwrap();
        for e in 0..10u64 {
            add(&j, 1, e, &payload(e)).await.unwrap();
            let len = std::fs::metadata(segment_path(dir.path(), 0))
                .unwrap()
                .len();
            if direct {
                assert_eq!(len % DIRECT_ALIGN as u64, 0, "group {e} padded");
            }
        }
    }
    // A torn last group: its padding record is cut short, so replay
    // keeps the add before it and the segment then ends off a block
    // boundary — the reopened journal goes on in a new segment, and a
    // checkpoint reads the old one's last entry up to its end.
    // (Without O_DIRECT there is no padding to cut.)
    let seg = segment_path(dir.path(), 0);
    let len = std::fs::metadata(&seg).unwrap().len();
    if direct {
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
    }
    {
        let j = Storage::open(dir.path()).unwrap();
        for e in 0..10u64 {
            assert_eq!(&j.read(1, e).unwrap().payload[..], &payload(e)[..]);
        }
        for e in 10..20u64 {
            add(&j, 1, e, &payload(e)).await.unwrap();
        }
        assert_eq!(segment_path(dir.path(), 1).exists(), direct);
        let stats = j.checkpoint().await.unwrap();
        assert_eq!(stats.entries_flushed, 20);
    }
    let j = Storage::open(dir.path()).unwrap();
    for e in 0..20u64 {
        assert_eq!(&j.read(1, e).unwrap().payload[..], &payload(e)[..]);
    }
    assert_eq!(j.lac(1).unwrap().1, 19);
}

#[tokio::test]
async fn a_group_larger_than_the_staging_buffer_is_written_and_replayed() {
    let dir = tempfile::tempdir().unwrap();
    // Over twice the group size: the staging buffer grows and moves, so
    // the group is written through the aligned scratch buffer, and the
    // next group starts in a fresh aligned buffer.
    let big: Vec<u8> = (0..9u32 << 20).map(|i| (i % 253) as u8).collect();
    {
        let j = Storage::open(dir.path()).unwrap();
        add(&j, 1, 0, b"before").await.unwrap();
        add(&j, 1, 1, &big).await.unwrap();
        add(&j, 1, 2, b"after").await.unwrap();
        assert_eq!(&j.read(1, 1).unwrap().payload[..], &big[..]);
    }
    let j = Storage::open(dir.path()).unwrap();
    assert_eq!(&j.read(1, 0).unwrap().payload[..], b"before");
    assert_eq!(&j.read(1, 1).unwrap().payload[..], &big[..]);
    assert_eq!(&j.read(1, 2).unwrap().payload[..], b"after");
    j.checkpoint().await.unwrap();
    assert_eq!(&j.read(1, 1).unwrap().payload[..], &big[..]);
}

#[tokio::test]
async fn deleted_ledgers_are_compacted_away_and_stay_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let payload = vec![9u8; 1000];
    {
        let j = Storage::open_with(dir.path(), 64 * 1024).unwrap();
        // Three ledgers interleaved over many small segments.
        for e in 0..150u64 {
            for l in 1..=3u64 {
                add(&j, l, e, &payload).await.unwrap();
            }
        }
        j.fence(2, key()).await.unwrap();
        let before = count(dir.path(), ".jnl");
        assert!(before > 5, "{before} segments");
        j.delete_ledgers(vec![1, 3]).await.unwrap();
        assert_eq!(j.ledger_ids(), vec![2]);
        let stats = j.compact(0.5).await.unwrap();
        assert!(stats.segments_removed > 0, "{stats:?}");
        let after = count(dir.path(), ".jnl");
        assert!(after < before, "{before} -> {after} segments");
        for e in 0..150u64 {
            assert_eq!(j.read(2, e).unwrap().payload.as_ref(), &payload[..]);
        }
        // Compaction moved entries no checkpoint had taken yet (and
        // removed their old segments): the next checkpoint takes them
        // from where they are now.
        let cp = j.checkpoint().await.unwrap();
        assert!(cp.entries_flushed >= 150, "{cp:?}");
        for e in 0..150u64 {
            assert_eq!(j.read(2, e).unwrap().payload.as_ref(), &payload[..]);
        }
        assert_eq!(
            add(&j, 2, 150, &payload).await,
            Err(BookieErrorCode::Fenced),
            "the fence survives compaction"
        );
    }
    // After a restart: deleted ledgers stay deleted, the fence and the
    // live entries are still there.
    let j = Storage::open_with(dir.path(), 64 * 1024).unwrap();
    assert_eq!(j.ledger_ids(), vec![2]);
    assert!(matches!(j.read(1, 0), Err(BookieErrorCode::NoSuchLedger)));
    for e in 0..150u64 {
        assert_eq!(j.read(2, e).unwrap().payload.as_ref(), &payload[..]);
    }
    assert_eq!(
        add(&j, 2, 150, &payload).await,
        Err(BookieErrorCode::Fenced)
    );
}

/// Once checkpoints run, compaction leaves journal segments whose adds
/// the next checkpoint will move anyway (moving them would copy them
/// twice); the checkpoint frees those segments.
#[tokio::test]
async fn compaction_leaves_pending_journal_segments_to_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let payload = vec![7u8; 1000];
    let j = Storage::open_with(dir.path(), 64 * 1024).unwrap();
    add(&j, 9, 0, &payload).await.unwrap();
    j.checkpoint().await.unwrap();
    for e in 0..100u64 {
        add(&j, 1, e, &payload).await.unwrap();
        add(&j, 2, e, &payload).await.unwrap();
    }
    j.delete_ledgers(vec![1]).await.unwrap();
    let st = j.compact(0.4).await.unwrap();
    assert_eq!(st.entries_moved, 0, "{st:?}");
    let cp = j.checkpoint().await.unwrap();
    assert_eq!(cp.entries_flushed, 100, "{cp:?}");
    assert!(cp.journal_segments_removed > 0, "{cp:?}");
    for e in 0..100u64 {
        assert_eq!(j.read(2, e).unwrap().payload.as_ref(), &payload[..]);
    }
    assert!(matches!(j.read(1, 0), Err(BookieErrorCode::NoSuchLedger)));
}

fn count(dir: &Path, suffix: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(suffix)
        })
        .count()
}

#[tokio::test]
async fn checkpoint_moves_adds_to_entry_logs_and_restart_replays_the_tail() {
    checkpoint_round_trip(DEFAULT_CACHE_BYTES).await;
}

/// The same with no tail cache: the checkpoint reads the journal back.
#[tokio::test]
async fn checkpoint_without_a_tail_cache_reads_the_journal_back() {
    checkpoint_round_trip(0).await;
}

#[tokio::test]
async fn checkpoint_copies_from_the_tail_cache_and_releases_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = |e: u64| format!("entry-{e:04}-").repeat(40).into_bytes();
    let j = Storage::open_with(dir.path(), 1024 * 1024).unwrap();
    for e in 0..200u64 {
        add(&j, 1, e, &data(e)).await.unwrap();
    }
    assert!(j.cache.bytes() >= 200 * data(0).len());
    // Spoil entry 7 on disk: the checkpoint must not read it from there.
    let needle = data(7);
    let mut spoiled = 0;
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let path = f.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == &needle[..]) {
            bytes[at + 5] ^= 0xff;
            std::fs::write(&path, &bytes).unwrap();
            spoiled += 1;
        }
    }
    assert_eq!(spoiled, 1);
    assert_eq!(j.checkpoint().await.unwrap().entries_flushed, 200);
    assert!(
        j.cache.bytes() <= crate::storage::tail_cache::CHUNK,
        "released"
    );
    drop(j);
    let j = Storage::open_with(dir.path(), 1024 * 1024).unwrap();
    for e in 0..200u64 {
        assert_eq!(j.read(1, e).unwrap().payload.as_ref(), &data(e)[..]);
    }
}

async fn checkpoint_round_trip(cache_bytes: u64) {
    let dir = tempfile::tempdir().unwrap();
    let data = |l: u64, e: u64| format!("l{l}-e{e}").repeat(50).into_bytes();
    {
        let j = Storage::open_with_cache(dir.path(), 32 * 1024, cache_bytes).unwrap();
        for e in 0..100u64 {
            for l in [5u64, 3, 9] {
                add(&j, l, e, &data(l, e)).await.unwrap();
            }
        }
        let before = count(dir.path(), ".jnl");
        let stats = j.checkpoint().await.unwrap();
        assert_eq!(stats.entries_flushed, 300);
        assert!(stats.journal_segments_removed > 0, "{stats:?}");
        assert!(count(dir.path(), ".jnl") < before);
        assert_eq!(count(dir.path(), ".elog"), 1);
        // Sorted by ledger a window at a time (here: a journal segment
        // each): a few runs per segment, not one per add, entries in
        // order within a run.
        let idx = File::open(entry_index_path(dir.path(), 1 | ENTRY_LOG)).unwrap();
        let runs = entry_index::load_runs(&idx, 1 | ENTRY_LOG).unwrap();
        assert_eq!(runs.iter().map(|(_, r)| r.count).sum::<u64>(), 300);
        assert!(
            runs.len() <= 3 * before,
            "{} runs over {before} segments",
            runs.len()
        );
        for (ledger, run) in &runs {
            let mut seen = Vec::new();
            entry_index::visit(&idx, run, |r| {
                assert_eq!(r.ledger, *ledger);
                seen.push(r.entry);
            })
            .unwrap();
            assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
            assert_eq!((seen[0], seen[seen.len() - 1]), (run.first, run.last));
        }
        // Only the runs are in memory now.
        let stats = j.index_stats();
        assert_eq!(stats.journaled_entries, 0, "{stats:?}");
        assert_eq!(stats.runs, runs.len(), "{stats:?}");
        // Reads now come from the entry log.
        for e in 0..100u64 {
            assert_eq!(j.read(3, e).unwrap().payload.as_ref(), &data(3, e)[..]);
        }
        // After the checkpoint: more adds, a fence, a deletion.
        for e in 100..120u64 {
            add(&j, 5, e, &data(5, e)).await.unwrap();
        }
        j.fence(3, key()).await.unwrap();
        j.delete_ledgers(vec![9]).await.unwrap();
    }
    let j = Storage::open_with_cache(dir.path(), 32 * 1024, cache_bytes).unwrap();
    let mut ids = j.ledger_ids();
    ids.sort();
    assert_eq!(ids, vec![3, 5]);
    for e in 0..120u64 {
        assert_eq!(j.read(5, e).unwrap().payload.as_ref(), &data(5, e)[..]);
    }
    assert_eq!(j.lac(5).unwrap().1, 119);
    assert_eq!(
        add(&j, 3, 100, &data(3, 100)).await,
        Err(BookieErrorCode::Fenced)
    );
    // A second checkpoint, compaction of the deleted ledger's share, restart again.
    j.checkpoint().await.unwrap();
    let stats = j.compact(0.2).await.unwrap();
    // The first entry log (a third of it ledger 9's) is gone, index and all.
    assert!(stats.segments_removed > 0, "{stats:?}");
    assert!(!segment_path(dir.path(), 1 | ENTRY_LOG).exists());
    assert!(!entry_index_path(dir.path(), 1 | ENTRY_LOG).exists());
    drop(j);
    let j = Storage::open_with_cache(dir.path(), 32 * 1024, cache_bytes).unwrap();
    for e in 0..100u64 {
        assert_eq!(j.read(3, e).unwrap().payload.as_ref(), &data(3, e)[..]);
        assert_eq!(j.read(5, e).unwrap().payload.as_ref(), &data(5, e)[..]);
    }
    assert!(matches!(j.read(9, 0), Err(BookieErrorCode::NoSuchLedger)));
    assert_eq!(
        add(&j, 3, 100, &data(3, 100)).await,
        Err(BookieErrorCode::Fenced)
    );
}

#[tokio::test]
async fn the_newest_copy_of_a_rewritten_entry_wins_across_entry_logs() {
    let dir = tempfile::tempdir().unwrap();
    let add_with_lac = |j: &Storage, e: u64, lac: i64| {
        let p = Bytes::from(format!("entry {e}").into_bytes());
        let digest = entry_digest(1, e, lac, &p);
        let j = j.clone();
        async move { j.add(1, e, lac, key(), p, digest, true).await.unwrap() }
    };
    let lac_of = |j: &Storage| j.read(1, 10).unwrap().lac;
    let j = Storage::open(dir.path()).unwrap();
    for e in 0..50u64 {
        add_with_lac(&j, e, e as i64 - 1).await;
    }
    j.checkpoint().await.unwrap();
    // Written again (recovery re-replicating it, say) with a later LAC.
    add_with_lac(&j, 10, 40).await;
    assert_eq!(lac_of(&j), 40, "the journal's copy");
    j.checkpoint().await.unwrap();
    assert_eq!(j.index_stats().journaled_entries, 0);
    assert_eq!(lac_of(&j), 40, "the second entry log's copy");
    assert_eq!(j.read(1, 11).unwrap().lac, 10);
    drop(j);
    let j = Storage::open(dir.path()).unwrap();
    assert_eq!(lac_of(&j), 40, "after a restart");
    assert_eq!(j.lac(1).unwrap(), (48, 49));
    // Compacting everything moves each entry once, the current copy.
    j.compact(0.0).await.unwrap();
    j.checkpoint().await.unwrap();
    assert_eq!(lac_of(&j), 40, "after compaction");
    for e in (0..50u64).filter(|e| *e != 10) {
        assert_eq!(j.read(1, e).unwrap().lac, e as i64 - 1);
    }
    drop(j);
    let j = Storage::open(dir.path()).unwrap();
    assert_eq!(lac_of(&j), 40);
    assert!(matches!(j.read(1, 50), Err(BookieErrorCode::NoSuchEntry)));
}

#[tokio::test]
async fn a_range_read_stops_at_its_entry_cap_and_before_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let j = Storage::open(dir.path()).unwrap();
    for e in (0..10u64).chain(11..15) {
        add(&j, 1, e, b"0123456789").await.unwrap();
    }
    let ids = |r: Result<Vec<(u64, StoredEntry)>, BookieErrorCode>| match r {
        Ok(v) => Ok(v.into_iter().map(|(e, _)| e).collect::<Vec<_>>()),
        Err(code) => Err(code),
    };
    assert_eq!(
        ids(j.read_range(1, 0, 100, 1, u64::MAX, 3)),
        Ok(vec![0, 1, 2])
    );
    assert_eq!(ids(j.read_range(1, 0, 100, 4, 25, 100)), Ok(vec![0, 4, 8]));
    assert_eq!(
        ids(j.read_range(1, 8, 100, 1, u64::MAX, 100)),
        Ok(vec![8, 9])
    );
    assert_eq!(
        ids(j.read_range(1, 10, 100, 1, u64::MAX, 100)),
        Err(BookieErrorCode::NoSuchEntry)
    );
    assert_eq!(
        ids(j.read_range(2, 0, 5, 1, 100, 10)),
        Err(BookieErrorCode::NoSuchLedger)
    );
    // No overflow at the top of the id space.
    assert_eq!(
        ids(j.read_range(1, 14, u64::MAX, u64::MAX, u64::MAX, 100)),
        Ok(vec![14])
    );
}

#[tokio::test]
async fn replay_reads_a_segment_in_chunks_and_stops_at_a_spoilt_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = |e: u64| {
        // Entry 100 is longer than a replay chunk.
        let n = if e == 100 { 3 * REPLAY_CHUNK } else { 3000 };
        format!("e{e:04}-").repeat(n / 6).into_bytes()
    };
    {
        let j = Storage::open_with(dir.path(), 64 * 1024 * 1024).unwrap();
        for e in 0..=110u64 {
            add(&j, 1, e, &data(e)).await.unwrap();
        }
    }
    let seg = segment_path(dir.path(), 0);
    let before = std::fs::metadata(&seg).unwrap().len();
    assert!(before > 4 * REPLAY_CHUNK as u64);
    let j = Storage::open_with(dir.path(), 64 * 1024 * 1024).unwrap();
    for e in 0..=110u64 {
        assert_eq!(j.read(1, e).unwrap().payload.as_ref(), &data(e)[..], "{e}");
    }
    drop(j);
    // One byte of entry 105's payload spoilt on disk: replay ends before
    // it, and the segment is cut there.
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.windows(6).position(|w| w == b"e0105-").unwrap();
    bytes[at + 100] ^= 1;
    std::fs::write(&seg, &bytes).unwrap();
    let j = Storage::open_with(dir.path(), 64 * 1024 * 1024).unwrap();
    for e in 0..105u64 {
        assert_eq!(j.read(1, e).unwrap().payload.as_ref(), &data(e)[..], "{e}");
    }
    for e in 105..=110u64 {
        assert!(
            matches!(j.read(1, e), Err(BookieErrorCode::NoSuchEntry)),
            "{e}"
        );
    }
    let after = std::fs::metadata(&seg).unwrap().len();
    assert!(
        after < at as u64 && after > (at - 4096) as u64,
        "{after} vs {at}"
    );
}

#[tokio::test]
async fn a_range_read_takes_side_by_side_entries_in_one_read_and_stops_at_a_spoilt_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = |e: u64| format!("entry-{e:03}-").repeat(20).into_bytes();
    // No tail cache: the entries are read from the entry log on disk.
    let j = Storage::open_with_cache(dir.path(), SEGMENT_BYTES, 0).unwrap();
    for e in 0..20u64 {
        add(&j, 1, e, &data(e)).await.unwrap();
    }
    j.checkpoint().await.unwrap();
    assert_eq!(j.index_stats().journaled_entries, 0);
    let read = |first: u64, step: u64| {
        j.read_range(1, first, 19, step, u64::MAX, 100).map(|v| {
            v.into_iter()
                .map(|(e, s)| {
                    assert_eq!(s.payload.as_ref(), &data(e)[..], "{e}");
                    e
                })
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(read(0, 1), Ok((0..20).collect()));
    // Every fourth entry: the three between are read along (small gaps).
    assert_eq!(read(1, 4), Ok(vec![1, 5, 9, 13, 17]));
    // One byte of entry 7 spoilt in the entry log.
    let log = segment_path(dir.path(), 1 | ENTRY_LOG);
    let mut bytes = std::fs::read(&log).unwrap();
    let at = bytes.windows(10).position(|w| w == b"entry-007-").unwrap();
    bytes[at + 3] ^= 1;
    std::fs::write(&log, &bytes).unwrap();
    assert_eq!(read(0, 1), Ok((0..7).collect()), "ends before it");
    assert_eq!(read(1, 2), Ok(vec![1, 3, 5]), "read across gaps, likewise");
    assert_eq!(read(7, 1), Err(BookieErrorCode::BadDigest));
    assert_eq!(read(8, 1), Ok((8..20).collect()));
}

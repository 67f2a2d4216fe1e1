//! Storage conformance: one suite of behaviours every way a bookie can hold
//! its data must show, run against each of them —
//! - `journal`: adds read back from journal segments (no checkpoint taken),
//! - `entry-log`: a checkpoint after every step, so reads come from entry
//!   logs and restarts replay only the journal tail,
//! - `compacting`: small segments, checkpoints and compaction after every step.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;

use bytes::Bytes;
use magnetar_bookie::storage::Storage;
use magnetar_proto::ledger::{entry_digest, BookieErrorCode, MasterKey};

#[derive(Clone, Copy, Debug)]
enum Mode {
    Storage,
    EntryLog,
    Compacting,
}

struct Store {
    mode: Mode,
    journal: Storage,
}

impl Store {
    fn open(mode: Mode, dir: &Path) -> Store {
        let segment = match mode {
            Mode::Compacting => 16 * 1024,
            _ => 64 * 1024 * 1024,
        };
        Store {
            mode,
            journal: Storage::open_with(dir, segment).unwrap(),
        }
    }

    /// What the mode does between steps.
    async fn settle(&self) {
        match self.mode {
            Mode::Storage => {}
            Mode::EntryLog => {
                self.journal.checkpoint().await.unwrap();
            }
            Mode::Compacting => {
                self.journal.checkpoint().await.unwrap();
                self.journal.compact(0.01).await.unwrap();
            }
        }
    }

    async fn add(
        &self,
        ledger: u64,
        entry: u64,
        key: MasterKey,
        recovery: bool,
    ) -> Result<(), BookieErrorCode> {
        let p = payload(ledger, entry);
        let lac = entry as i64 - 1;
        self.journal
            .add(
                ledger,
                entry,
                lac,
                key,
                p.clone(),
                entry_digest(ledger, entry, lac, &p),
                recovery,
            )
            .await
    }
}

const KEY: MasterKey = [1; 16];
const OTHER_KEY: MasterKey = [2; 16];

fn payload(ledger: u64, entry: u64) -> Bytes {
    Bytes::from(
        format!("ledger {ledger} entry {entry} ")
            .repeat(20)
            .into_bytes(),
    )
}

async fn suite(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(mode, dir.path());
        // Adds of interleaved ledgers read back exactly, with LAC and last entry.
        for e in 0..200 {
            for l in [1, 2, 3] {
                s.add(l, e, KEY, false).await.unwrap();
            }
        }
        s.settle().await;
        for l in [1, 2, 3] {
            for e in 0..200 {
                let got = s.journal.read(l, e).unwrap();
                assert_eq!(got.payload, payload(l, e), "{mode:?} ledger {l} entry {e}");
                assert_eq!(got.lac, e as i64 - 1);
            }
            assert_eq!(s.journal.lac(l).unwrap(), (198, 199));
        }
        // Unknown ledger and entry are told apart.
        assert!(matches!(
            s.journal.read(77, 0),
            Err(BookieErrorCode::NoSuchLedger)
        ));
        assert!(matches!(
            s.journal.read(1, 500),
            Err(BookieErrorCode::NoSuchEntry)
        ));
        // A payload that does not match its digest is refused.
        let p = payload(1, 200);
        assert_eq!(
            s.journal.add(1, 200, 199, KEY, p, 0xdead_beef, false).await,
            Err(BookieErrorCode::BadDigest)
        );
        // The wrong writer credential is refused, for adds and fences.
        assert_eq!(
            s.add(1, 200, OTHER_KEY, false).await,
            Err(BookieErrorCode::Unauthorized)
        );
        assert_eq!(
            s.journal.fence(1, OTHER_KEY).await,
            Err(BookieErrorCode::Unauthorized)
        );
        // Fencing: the writer's adds are refused, recovery's are not.
        assert_eq!(s.journal.fence(2, KEY).await, Ok(198));
        assert_eq!(
            s.add(2, 200, KEY, false).await,
            Err(BookieErrorCode::Fenced)
        );
        s.add(2, 200, KEY, true).await.unwrap();
        // Deletion.
        s.journal.delete_ledgers(vec![3]).await.unwrap();
        s.settle().await;
        assert!(matches!(
            s.journal.read(3, 0),
            Err(BookieErrorCode::NoSuchLedger)
        ));
    }
    // Everything holds across a restart.
    let s = Store::open(mode, dir.path());
    for e in 0..200 {
        assert_eq!(
            s.journal.read(1, e).unwrap().payload,
            payload(1, e),
            "{mode:?}"
        );
    }
    assert_eq!(s.journal.read(2, 200).unwrap().payload, payload(2, 200));
    assert_eq!(
        s.add(2, 201, KEY, false).await,
        Err(BookieErrorCode::Fenced)
    );
    assert_eq!(
        s.add(1, 200, OTHER_KEY, false).await,
        Err(BookieErrorCode::Unauthorized)
    );
    assert!(matches!(
        s.journal.read(3, 0),
        Err(BookieErrorCode::NoSuchLedger)
    ));
    // And it keeps taking writes.
    s.add(1, 200, KEY, false).await.unwrap();
    s.settle().await;
    assert_eq!(s.journal.read(1, 200).unwrap().payload, payload(1, 200));
}

#[tokio::test]
async fn journal_only_storage_conforms() {
    suite(Mode::Storage).await;
}

#[tokio::test]
async fn entry_log_storage_conforms() {
    suite(Mode::EntryLog).await;
}

#[tokio::test]
async fn compacting_storage_conforms() {
    suite(Mode::Compacting).await;
}

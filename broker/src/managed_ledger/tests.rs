//! The managed ledger on in-memory ledgers and metadata: ordering, rolls,
//! a second owner fencing the first, cursors, trimming, close, the gate.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use bytes::Bytes;

use super::cursor::{CursorState, Position};
use super::store::{MemoryLedgers, MemoryMeta};
use super::*;

fn cfg(max_entries: u64) -> ManagedLedgerConfig {
    ManagedLedgerConfig {
        max_entries_per_ledger: max_entries,
        ..Default::default()
    }
}

fn stores(ledgers: &Arc<MemoryLedgers>, meta: &Arc<MemoryMeta>) -> Stores {
    Stores::new(Arc::new(ledgers.clone()), Arc::new(meta.clone()))
}

#[tokio::test]
async fn appends_complete_in_order_and_roll_at_the_entry_limit() {
    let (l, m) = (MemoryLedgers::new(), MemoryMeta::new());
    let ml = ManagedLedger::open("t", cfg(3), stores(&l, &m))
        .await
        .unwrap();
    let mut positions = Vec::new();
    for i in 0..7u8 {
        positions.push(ml.append_wait(Bytes::from(vec![i])).await.unwrap());
    }
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    assert_eq!(ml.ledger_ids().len(), 3, "3 + 3 + 1 entries");
    assert_eq!(ml.last_confirmed(), positions[6]);
    for (i, p) in positions.iter().enumerate() {
        assert_eq!(ml.read(*p).await.unwrap(), Bytes::from(vec![i as u8]));
    }
    assert_eq!(ml.entries(), 7);
}

#[tokio::test]
async fn a_new_owner_fences_the_old_one() {
    let (l, m) = (MemoryLedgers::new(), MemoryMeta::new());
    let old = ManagedLedger::open("t", cfg(100), stores(&l, &m))
        .await
        .unwrap();
    let p = old.append_wait(Bytes::from_static(b"a")).await.unwrap();
    let new = ManagedLedger::open("t", cfg(100), stores(&l, &m))
        .await
        .unwrap();
    assert!(
        old.append_wait(Bytes::from_static(b"b")).await.is_err(),
        "the old owner's ledger is fenced"
    );
    // The old owner's roll to a new ledger fails its CAS on the ledger list.
    assert!(old.append_wait(Bytes::from_static(b"c")).await.is_err());
    assert_eq!(new.read(p).await.unwrap(), Bytes::from_static(b"a"));
    let q = new.append_wait(Bytes::from_static(b"d")).await.unwrap();
    assert!(q > p);
    assert_eq!(new.entries(), 2, "nothing of the old owner after the fence");
}

#[tokio::test]
async fn cursors_survive_reopen_and_consumed_ledgers_are_trimmed() {
    let (l, m) = (MemoryLedgers::new(), MemoryMeta::new());
    let ml = ManagedLedger::open("t", cfg(2), stores(&l, &m))
        .await
        .unwrap();
    let mut ps = Vec::new();
    for i in 0..5u8 {
        ps.push(ml.append_wait(Bytes::from(vec![i])).await.unwrap());
    }
    let mut c = CursorState::new(ml.before_first());
    ml.persist_cursor("sub", &c).await.unwrap();
    let next = |q: Position| ml.next_after(q);
    c.ack_cumulative(ps[2], &next);
    ml.persist_cursor("sub", &c).await.unwrap();
    let before = ml.ledger_ids();
    ml.trim().await.unwrap();
    let after = ml.ledger_ids();
    assert_eq!(after.len(), before.len() - 1, "{before:?} -> {after:?}");
    assert!(!l.ledger_ids().contains(&before[0]), "its data deleted");
    ml.close().await.unwrap();
    ml.close_cursor_ledgers().await;

    let again = ManagedLedger::open("t", cfg(2), stores(&l, &m))
        .await
        .unwrap();
    let cursors = again.open_cursors().await.unwrap();
    assert_eq!(cursors.len(), 1);
    assert_eq!(cursors[0].1.mark_delete, ps[2]);
    assert_eq!(again.read(ps[4]).await.unwrap(), Bytes::from(vec![4u8]));
    again.delete_cursor("sub").await.unwrap();
    assert!(again.open_cursors().await.unwrap().is_empty());
    // No subscription needs anything: every closed ledger goes.
    for i in 0..4u8 {
        again.append_wait(Bytes::from(vec![i])).await.unwrap();
    }
    assert!(again.ledger_ids().len() > 1);
    again.trim().await.unwrap();
    assert_eq!(again.ledger_ids().len(), 1, "only the open ledger stays");
}

#[tokio::test]
async fn close_completes_what_was_queued_then_refuses() {
    let (l, m) = (MemoryLedgers::new(), MemoryMeta::new());
    let ml = ManagedLedger::open("t", cfg(100), stores(&l, &m))
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..10u8 {
        let tx = tx.clone();
        ml.append(
            Bytes::from(vec![i]),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .await;
    }
    ml.close().await.unwrap();
    for _ in 0..10 {
        assert!(rx.recv().await.unwrap().is_ok());
    }
    assert!(matches!(
        ml.append_wait(Bytes::from_static(b"late")).await,
        Err(MlError::Closed(_))
    ));
    let again = ManagedLedger::open("t", cfg(100), stores(&l, &m))
        .await
        .unwrap();
    assert_eq!(again.entries(), 10);
}

#[tokio::test]
async fn a_closed_gate_refuses_appends() {
    let (l, m) = (MemoryLedgers::new(), MemoryMeta::new());
    let open = Arc::new(AtomicBool::new(true));
    let mut s = stores(&l, &m);
    let o = open.clone();
    s.gate = Arc::new(move || o.load(std::sync::atomic::Ordering::SeqCst));
    let ml = ManagedLedger::open("t", cfg(100), s).await.unwrap();
    ml.append_wait(Bytes::from_static(b"a")).await.unwrap();
    open.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(
        ml.append_wait(Bytes::from_static(b"b")).await,
        Err(MlError::NotWritable(_))
    ));
    assert_eq!(l.stored_bytes(), 1);
}

#[tokio::test]
async fn finding_by_publish_time_searches_across_ledgers() {
    let (l, m) = (MemoryLedgers::new(), MemoryMeta::new());
    let ml = ManagedLedger::open("t", cfg(4), stores(&l, &m))
        .await
        .unwrap();
    let mut positions = Vec::new();
    for i in 0..11u64 {
        let md = magnetar_proto::pulsar::MessageMetadata {
            producer_name: "p".into(),
            sequence_id: i,
            publish_time: 1_000 + 10 * i,
            ..Default::default()
        };
        let entry = magnetar_proto::Payload::build(md, b"x").headers_and_payload;
        positions.push(ml.append_wait(entry).await.unwrap());
    }
    assert_eq!(ml.ledger_ids().len(), 3);
    assert_eq!(ml.find_by_publish_time(0).await.unwrap(), positions[0]);
    assert_eq!(ml.find_by_publish_time(1_000).await.unwrap(), positions[0]);
    assert_eq!(ml.find_by_publish_time(1_001).await.unwrap(), positions[1]);
    assert_eq!(ml.find_by_publish_time(1_040).await.unwrap(), positions[4]);
    assert_eq!(ml.find_by_publish_time(1_095).await.unwrap(), positions[10]);
    assert_eq!(
        ml.find_by_publish_time(1_101).await.unwrap(),
        positions[10].bump(),
        "after the last"
    );
}

#[tokio::test]
async fn catch_up_readers_get_every_entry_through_background_read_ahead() {
    let (l, m) = (MemoryLedgers::new(), MemoryMeta::new());
    let config = ManagedLedgerConfig {
        max_entries_per_ledger: 700,
        tail_cache_bytes: 0,
        ..Default::default()
    };
    let ml = ManagedLedger::open("t", config, stores(&l, &m))
        .await
        .unwrap();
    let mut positions = Vec::new();
    for i in 0..2_000u32 {
        positions.push(
            ml.append_wait(Bytes::from(i.to_be_bytes().to_vec()))
                .await
                .unwrap(),
        );
    }
    assert!(ml.ledger_ids().len() >= 3);
    // Two readers, one behind the other, both from the start: the
    // read-ahead of one must not cost the other an entry.
    let (a, b) = (ml.clone(), ml.clone());
    let ps = Arc::new(positions);
    let (pa, pb) = (ps.clone(), ps.clone());
    let first = tokio::spawn(async move {
        for (i, p) in pa.iter().enumerate() {
            assert_eq!(a.read(*p).await.unwrap()[..], (i as u32).to_be_bytes());
        }
    });
    let second = tokio::spawn(async move {
        for (i, p) in pb.iter().enumerate() {
            if i % 97 == 0 {
                tokio::task::yield_now().await;
            }
            assert_eq!(b.read(*p).await.unwrap()[..], (i as u32).to_be_bytes());
        }
    });
    first.await.unwrap();
    second.await.unwrap();
}

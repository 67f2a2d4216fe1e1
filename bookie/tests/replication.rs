//! Replicated ledgers over real bookies (in-process, real QUIC and disks):
//! ensemble change when a bookie fails mid-stream, fencing of an old writer,
//! recovery closing at the right entry, concurrent recoveries agreeing,
//! rack-aware placement, disk watermarks and auto-recovery of a lost bookie.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use magnetar_bookie::registry::BOOKIES_PREFIX;
use magnetar_bookie::{
    Bookie, BookieConfig, BookieError, BookieInfo, LedgerClient, LedgerError, LedgerState,
    LedgerWriter,
};
use magnetar_metadata::{MetadataClient, MetadataConfig, MetadataNode};
use magnetar_proto::ledger::{
    entry_digest, AddRequest, BookieErrorCode, BookieRequest, BookieResponse,
};
use magnetar_proto::rpc::{client_endpoint, serve, server_endpoint, RpcClient};
use magnetar_proto::tls::TlsMaterial;

struct Tier {
    _dir: tempfile::TempDir,
    tls: TlsMaterial,
    node: Arc<MetadataNode>,
    bookies: Vec<Option<Arc<Bookie>>>,
    rpc: RpcClient,
    metadata: MetadataClient,
}

impl Tier {
    async fn start(racks: &[Option<&str>]) -> Tier {
        Self::start_tuned(racks, |_| {}).await
    }

    /// As `start`, with `tune` applied to every bookie's configuration.
    async fn start_tuned(racks: &[Option<&str>], tune: impl Fn(&mut BookieConfig)) -> Tier {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("MAGNETAR_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let tls = TlsMaterial::load_or_generate(&dir.path().join("tls")).unwrap();
        let cfg = MetadataConfig::new(1, "127.0.0.1:0".parse().unwrap(), dir.path().join("meta"));
        let node = MetadataNode::start(cfg, &tls).await.unwrap();
        assert!(node.wait_for_leader(Duration::from_secs(10)).await);
        let rpc = RpcClient::new(client_endpoint(&tls).unwrap());
        let metadata = MetadataClient::new(rpc.clone(), vec![node.local_addr()]);
        let mut tier = Tier {
            _dir: dir,
            tls,
            node,
            bookies: Vec::new(),
            rpc,
            metadata,
        };
        for rack in racks {
            tier.add_bookie(*rack, &tune).await;
        }
        tier
    }

    /// Starts one more bookie (in the rack given), `tune` applied to its
    /// configuration.
    async fn add_bookie(&mut self, rack: Option<&str>, tune: impl Fn(&mut BookieConfig)) {
        let dir = self._dir.path();
        let mut cfg = BookieConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            dir.join(format!("bookie-{}", self.bookies.len())),
        );
        cfg.rack = rack.map(String::from);
        cfg.registration_ttl_ms = 2_000;
        cfg.disk_check_interval_ms = 100;
        cfg.auditor_grace_ms = 1_000;
        cfg.auditor_interval_ms = 200;
        cfg.journal_segment_bytes = 64 * 1024;
        cfg.gc_interval_ms = 200;
        cfg.checkpoint_interval_ms = 150;
        tune(&mut cfg);
        let bookie = Bookie::start(cfg, &self.tls, &self.metadata).await.unwrap();
        self.bookies.push(Some(bookie));
    }

    /// A server of the cluster's certificates that takes requests and never
    /// answers them (a hung disk, a paused process); its address.
    async fn stalled_bookie(&self) -> String {
        let stalled = server_endpoint("127.0.0.1:0".parse().unwrap(), &self.tls)
            .await
            .unwrap();
        let addr = stalled.local_addr().unwrap().to_string();
        tokio::spawn(serve(
            stalled,
            "stalled",
            |_: BookieRequest, send, _| async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(send);
            },
        ));
        addr
    }

    fn client(&self) -> LedgerClient {
        LedgerClient::new(self.metadata.clone(), self.rpc.clone())
            .with_add_timeout(Duration::from_secs(2))
    }

    async fn stop_bookie(&mut self, addr: &str) {
        for slot in &mut self.bookies {
            if slot.as_ref().is_some_and(|b| b.addr() == addr) {
                slot.take().unwrap().shutdown().await;
                return;
            }
        }
        panic!("no bookie {addr}");
    }

    /// Reads an entry straight from one bookie.
    async fn read_from(&self, bookie: &str, ledger_id: u64, entry_id: u64) -> Option<Bytes> {
        match self
            .rpc
            .call::<_, BookieResponse>(
                bookie.parse().unwrap(),
                &BookieRequest::Read {
                    ledger_id,
                    entry_id,
                },
            )
            .await
        {
            Ok(BookieResponse::Entry { payload, .. }) => Some(payload),
            _ => None,
        }
    }

    /// Stores entry `e` (with `lac`) on `bookie` alone, as a writer's add
    /// that reached only that bookie would.
    async fn add_by_hand(
        &self,
        meta: &magnetar_bookie::LedgerMetadata,
        bookie: &str,
        e: u64,
        lac: i64,
    ) {
        let id = meta.ledger_id;
        let add = BookieRequest::Add(AddRequest {
            ledger_id: id,
            entry_id: e,
            master_key: meta.master_key,
            lac,
            payload: payload(e),
            digest: entry_digest(id, e, lac, &payload(e)),
            recovery: false,
        });
        let r: BookieResponse = self.rpc.call(bookie.parse().unwrap(), &add).await.unwrap();
        assert!(matches!(r, BookieResponse::Added { .. }), "{r:?}");
    }

    /// Every entry of `entries` is on every bookie of its write set.
    async fn assert_on_write_quorum(
        &self,
        meta: &magnetar_bookie::LedgerMetadata,
        entries: impl Iterator<Item = u64>,
    ) {
        for e in entries {
            for b in meta.bookies_for(e) {
                assert_eq!(
                    self.read_from(&b, meta.ledger_id, e).await,
                    Some(payload(e)),
                    "ledger {} entry {e} missing on {b}",
                    meta.ledger_id
                );
            }
        }
    }

    /// Waits until every entry of `entries` is on every bookie of its write
    /// set: an add is confirmed at Qa acks, the rest of its write quorum may
    /// still be on the way.
    async fn wait_on_write_quorum(
        &self,
        meta: &magnetar_bookie::LedgerMetadata,
        entries: impl Iterator<Item = u64> + Clone,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        'poll: loop {
            for e in entries.clone() {
                for b in meta.bookies_for(e) {
                    if self.read_from(&b, meta.ledger_id, e).await.is_none() {
                        assert!(
                            tokio::time::Instant::now() < deadline,
                            "ledger {} entry {e} never reached {b}",
                            meta.ledger_id
                        );
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue 'poll;
                    }
                }
            }
            return;
        }
    }

    fn journal_bytes(&self) -> u64 {
        let mut total = 0;
        for i in 0..self.bookies.len() {
            let dir = self._dir.path().join(format!("bookie-{i}/journal"));
            // Files may vanish under the listing (GC runs meanwhile).
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                total += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
        total
    }

    async fn shutdown(self) {
        for b in self.bookies.into_iter().flatten() {
            b.shutdown().await;
        }
        self.node.shutdown().await;
    }
}

fn payload(i: u64) -> Bytes {
    Bytes::from(format!("entry-{i:05}").into_bytes())
}

/// Entries `first..=last` through a range read, each of which must be read.
async fn read_all(
    lc: &LedgerClient,
    meta: &magnetar_bookie::LedgerMetadata,
    first: u64,
    last: u64,
) -> Vec<Bytes> {
    let got = lc.read_range(meta, first, last).await;
    got.into_iter().map(|r| r.unwrap()).collect()
}

/// A new E/Qw/Qa ledger with entries 0..n added one by one (each confirmed).
async fn ledger_with(
    lc: &LedgerClient,
    (e, qw, qa): (usize, usize, usize),
    n: u64,
) -> LedgerWriter {
    let w = lc.create(e, qw, qa, BTreeMap::new()).await.unwrap();
    for i in 0..n {
        w.add(payload(i)).await.unwrap();
    }
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writer_replaces_a_failed_bookie_and_loses_nothing() {
    let mut tier = Tier::start(&[None; 5]).await;
    let lc = tier.client();
    let w = lc.create(3, 2, 2, BTreeMap::new()).await.unwrap();
    let victim = w.metadata().fragments[0].bookies[1].clone();
    let mut pending = Vec::new();
    for i in 0..1000u64 {
        pending.push(w.add(payload(i)));
        if i == 300 {
            tier.stop_bookie(&victim).await;
        }
        if pending.len() >= 100 {
            for (j, p) in pending.drain(..).enumerate() {
                let id = p.await.unwrap();
                assert_eq!(id % 100, j as u64, "confirmed in order");
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    let meta = w.close().await.unwrap();
    assert_eq!(meta.last_entry_id, 999);
    assert!(meta.fragments.len() >= 2, "an ensemble change happened");
    let last = meta.fragments.last().unwrap();
    assert!(!last.bookies.contains(&victim));
    assert!(last.first_entry <= 400);
    // Every entry: readable through the client, and on every bookie of its
    // write set (the replacement got the resent entries).
    let (meta, _) = lc.metadata(w.ledger_id()).await.unwrap();
    // A range read over both fragments, with the gone bookie first in the
    // write set of a third of the first fragment's entries (a new client:
    // it does not know yet that the bookie is gone).
    let all = read_all(&tier.client(), &meta, 0, 999).await;
    assert_eq!(all, (0..1000).map(payload).collect::<Vec<_>>());
    for e in 0..1000u64 {
        assert_eq!(lc.read(&meta, e).await.unwrap(), payload(e));
    }
    tier.assert_on_write_quorum(&meta, last.first_entry..1000)
        .await;
    tier.shutdown().await;
}

/// Waits (10 s at most) until `n` bookies are registered writable (a
/// stopped bookie's registration lasts until its lease expires).
async fn wait_writable(lc: &LedgerClient, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while lc.writable_bookies().await.unwrap().len() > n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "registrations linger"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three bookies, ensemble 3/2/2, one stops: with no spare the writer
/// shrinks the fragment to the two left (every entry still on a write
/// quorum of two) and goes on; a new ledger is created on those two; two
/// of three gone, adds wait and then fail naming the shortfall.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_spare_the_writer_shrinks_to_the_bookies_left() {
    let mut tier = Tier::start(&[None; 3]).await;
    let lc = tier.client();
    let w = lc.create(3, 2, 2, BTreeMap::new()).await.unwrap();
    let victim = w.metadata().fragments[0].bookies[1].clone();
    let mut pending = Vec::new();
    for i in 0..600u64 {
        pending.push(w.add(payload(i)));
        if i == 200 {
            tier.stop_bookie(&victim).await;
        }
        if pending.len() >= 50 {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    let meta = w.close().await.unwrap();
    assert_eq!(meta.last_entry_id, 599);
    let last = meta.fragments.last().unwrap();
    assert_eq!(last.bookies.len(), 2, "shrunk to the two left: {meta:?}");
    assert!(!last.bookies.contains(&victim));
    assert!(last.first_entry <= 300, "{meta:?}");
    let (meta, _) = lc.metadata(w.ledger_id()).await.unwrap();
    let all = read_all(&tier.client(), &meta, 0, 599).await;
    assert_eq!(all, (0..600).map(payload).collect::<Vec<_>>());
    tier.assert_on_write_quorum(&meta, last.first_entry..600)
        .await;
    // A recovery of the shrunk ledger agrees on its end.
    let recovered = tier.client().recover(meta.ledger_id).await.unwrap();
    assert_eq!(recovered.last_entry_id, 599);

    // A new ledger once only two are registered: 2 wide, every entry on both.
    wait_writable(&lc, 2).await;
    let w2 = lc.create(3, 2, 2, BTreeMap::new()).await.unwrap();
    assert_eq!(w2.metadata().fragments[0].bookies.len(), 2);
    for i in 0..20u64 {
        w2.add(payload(i)).await.unwrap();
    }
    let meta2 = w2.close().await.unwrap();
    tier.assert_on_write_quorum(&meta2, 0..20).await;

    // Below the write quorum: the add waits, then fails naming the shortfall.
    let lc = tier.client().with_below_quorum_wait(Duration::from_secs(2));
    let w3 = lc.create(2, 2, 2, BTreeMap::new()).await.unwrap();
    w3.add(payload(0)).await.unwrap();
    let second = w3.metadata().fragments[0].bookies[0].clone();
    tier.stop_bookie(&second).await;
    let started = tokio::time::Instant::now();
    let err = w3.add(payload(1)).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("not enough writable bookies: need 2"),
        "{err}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "it waited first"
    );
    wait_writable(&lc, 1).await;
    assert!(matches!(
        lc.create(2, 2, 2, BTreeMap::new()).await,
        Err(LedgerError::NotEnoughBookies { need: 2, have: 1 })
    ));
    tier.shutdown().await;
}

/// A bookie of the ensemble that takes adds and never answers them (no
/// error, no closed connection) is replaced once the add timeout passes, as
/// one that fails outright: nothing is lost, the order is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writer_replaces_a_bookie_that_stops_answering() {
    let mut tier = Tier::start(&[None; 2]).await;
    let stalled = tier.stalled_bookie().await;
    let info = BookieInfo {
        addr: stalled.clone(),
        rack: None,
        writable: true,
    };
    tier.metadata
        .put(
            &format!("{BOOKIES_PREFIX}{stalled}"),
            serde_json::to_vec(&info).unwrap(),
        )
        .await
        .unwrap();
    let lc = tier.client(); // 2 s add timeout
    let w = lc.create(3, 2, 2, BTreeMap::new()).await.unwrap();
    assert!(w.metadata().fragments[0].bookies.contains(&stalled));
    tier.add_bookie(None, |_| {}).await; // the replacement
    let adds: Vec<_> = (0..200u64).map(|i| w.add(payload(i))).collect();
    for (i, add) in adds.into_iter().enumerate() {
        assert_eq!(add.await.unwrap(), i as u64, "confirmed in order");
    }
    let meta = w.close().await.unwrap();
    assert_eq!(meta.last_entry_id, 199);
    // Entry 0 or 1 is the first whose write set holds the stalled bookie,
    // so the fragment that replaced it starts there (a fragment left
    // without entries is replaced rather than kept), and no later one
    // names it.
    let replaced = meta
        .fragments
        .iter()
        .position(|f| !f.bookies.contains(&stalled))
        .unwrap_or_else(|| panic!("{stalled} never replaced: {meta:?}"));
    assert!(meta.fragments[replaced].first_entry <= 1, "{meta:?}");
    assert!(
        meta.fragments[replaced..]
            .iter()
            .all(|f| !f.bookies.contains(&stalled)),
        "{meta:?}"
    );
    let first = meta.fragments[replaced].first_entry;
    tier.assert_on_write_quorum(&meta, first..200).await;
    let all = read_all(&tier.client(), &meta, 0, 199).await;
    assert_eq!(all, (0..200).map(payload).collect::<Vec<_>>());
    tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_writer_cannot_confirm_and_recovery_closes_the_ledger() {
    let tier = Tier::start(&[None; 3]).await;
    let old = tier.client();
    let w = ledger_with(&old, (3, 3, 2), 10).await;
    // Another broker takes over: recovery fences the ledger.
    let new = tier.client();
    let meta = new.recover(w.ledger_id()).await.unwrap();
    assert_eq!(meta.state, LedgerState::Closed);
    assert_eq!(meta.last_entry_id, 9);
    match w.add(payload(10)).await {
        Err(LedgerError::WriterFailed(_, why)) => assert!(why.contains("fenced"), "{why}"),
        other => panic!("the fenced writer's add must fail, got {other:?}"),
    }
    assert!(w.is_failed());
    tier.shutdown().await;
}

/// Recovery while the old writer is still streaming adds (many in flight):
/// every add the old writer saw confirmed lies within the recovered ledger
/// and reads back, and every later add fails as "outcome unknown" — none is
/// confirmed past the end recovery chose.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_during_writes_keeps_every_confirmed_add() {
    for (e, qw, qa) in [(3, 3, 2), (3, 2, 2)] {
        let tier = Tier::start(&[None; 3]).await;
        let old = tier.client();
        let w = old.create(e, qw, qa, BTreeMap::new()).await.unwrap();
        let id = w.ledger_id();
        // The writer goes on until it is fenced, or until told to stop (2 s
        // after recovery ended: a writer still going then was not fenced).
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (w, stop) = (w.clone(), stop.clone());
            tokio::spawn(async move {
                let mut confirmed = Vec::new();
                let mut in_flight = std::collections::VecDeque::new();
                for i in 0.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    in_flight.push_back((i, w.add(payload(i))));
                    if in_flight.len() >= 200 {
                        let (i, add) = in_flight.pop_front().unwrap();
                        match add.await {
                            Ok(got) => confirmed.push((i, got)),
                            Err(LedgerError::WriterFailed(..)) => break,
                            Err(other) => panic!("add {i}: {other:?}"),
                        }
                    }
                }
                for (i, add) in in_flight {
                    match add.await {
                        Ok(got) => confirmed.push((i, got)),
                        Err(LedgerError::WriterFailed(_, why)) => {
                            assert!(why.contains("fenced"), "{why}")
                        }
                        Err(other) => panic!("add {i}: {other:?}"),
                    }
                }
                confirmed
            })
        };
        // Let a few thousand adds through, then another client takes over.
        while w.lac() < 2_000 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Bounded: with fencing broken, recovery would chase the writer's
        // tail for ever.
        let closed = tokio::time::timeout(Duration::from_secs(60), tier.client().recover(id))
            .await
            .expect("recovery ended")
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let confirmed = writer.await.unwrap();
        assert!(w.is_failed(), "the old writer is fenced out");
        assert!(confirmed.len() >= 2_000);
        for (i, (sent, got)) in confirmed.iter().enumerate() {
            assert_eq!((*sent, *got), (i as u64, i as u64), "confirmed in order");
        }
        let last = confirmed.len() as i64 - 1;
        assert!(
            closed.last_entry_id >= last,
            "{e}/{qw}/{qa}: add {last} was confirmed but recovery closed at {}",
            closed.last_entry_id
        );
        let all = read_all(&tier.client(), &closed, 0, closed.last_entry_id as u64).await;
        assert_eq!(
            all,
            (0..=closed.last_entry_id as u64)
                .map(payload)
                .collect::<Vec<_>>()
        );
        match w.add(payload(0)).await {
            Err(LedgerError::WriterFailed(_, why)) => assert!(why.contains("fenced"), "{why}"),
            other => panic!("the fenced writer's add must fail, got {other:?}"),
        }
        tier.shutdown().await;
    }
}

/// Entries 0..5 confirmed; entry 5 written by hand to `copies` of the 3
/// bookies (Qa = 2); recovery must close at 5 when any copy exists (it may
/// have been confirmed) and at 4 when none does, leaving the end on a full
/// write quorum.
async fn recovery_with_tail_on(copies: usize) {
    let tier = Tier::start(&[None; 3]).await;
    let lc = tier.client();
    let w = ledger_with(&lc, (3, 3, 2), 5).await;
    let meta = w.metadata();
    // Confirmed means Qa = 2 acks; let the third copy of each land before
    // the writer dies, or recovery's fence may refuse it — entries up to
    // the LAC are only promised on Qa bookies, and this test is about the
    // tail.
    tier.wait_on_write_quorum(&meta, 0..5).await;
    let id = meta.ledger_id;
    for b in meta.bookies_for(5).iter().take(copies) {
        tier.add_by_hand(&meta, b, 5, 4).await;
    }
    drop(w); // the writer dies without closing
    let closed = tier.client().recover(id).await.unwrap();
    let expected = if copies > 0 { 5 } else { 4 };
    assert_eq!(closed.last_entry_id, expected, "tail on {copies} bookies");
    tier.assert_on_write_quorum(&closed, 0..=expected as u64)
        .await;
    tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_closes_at_the_right_entry_for_0_1_and_qa_copies() {
    // With E = Qw = 3 and Qa = 2: 0 copies, 1 copy (= Qa - 1), Qa copies.
    for copies in [0, 1, 2] {
        recovery_with_tail_on(copies).await;
    }
}

/// A writer with many adds in flight leaves the LAC far behind: entries
/// 5..=44 reached one bookie each (LAC 4), 45 none, 46 one again. Recovery
/// reads the tail in windows, closes at 44 — not past the hole — and leaves
/// 0..=44 on their full write sets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_reads_a_long_tail_and_stops_at_the_first_hole() {
    let tier = Tier::start(&[None; 3]).await;
    let lc = tier.client();
    let w = ledger_with(&lc, (3, 2, 2), 5).await;
    let meta = w.metadata();
    let id = meta.ledger_id;
    for e in (5..45).chain([46]) {
        // Alternate which bookie of the write set has it.
        let b = &meta.bookies_for(e)[(e % 2) as usize];
        tier.add_by_hand(&meta, b, e, 4).await;
    }
    drop(w);
    let closed = tier.client().recover(id).await.unwrap();
    assert_eq!(closed.last_entry_id, 44);
    tier.assert_on_write_quorum(&closed, 5..=44).await;
    for e in 0..=44 {
        assert_eq!(lc.read(&closed, e).await.unwrap(), payload(e));
    }
    tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_recoveries_agree_on_the_end() {
    let tier = Tier::start(&[None; 3]).await;
    let lc = tier.client();
    let w = lc.create(3, 2, 2, BTreeMap::new()).await.unwrap();
    let mut adds = Vec::new();
    for i in 0..200 {
        adds.push(w.add(payload(i)));
    }
    for a in adds {
        a.await.unwrap();
    }
    let id = w.ledger_id();
    let (c1, c2, c3) = (tier.client(), tier.client(), tier.client());
    let (a, b, c) = tokio::join!(c1.recover(id), c2.recover(id), c3.recover(id));
    let ends: Vec<i64> = [a, b, c]
        .into_iter()
        .map(|r| r.unwrap().last_entry_id)
        .collect();
    assert_eq!(ends, vec![199, 199, 199]);
    tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn placement_spreads_an_ensemble_over_racks() {
    let tier = Tier::start(&[
        Some("a"),
        Some("a"),
        Some("a"),
        Some("b"),
        Some("b"),
        Some("c"),
    ])
    .await;
    let lc = tier.client();
    let rack_of: BTreeMap<String, String> = tier
        .bookies
        .iter()
        .flatten()
        .zip(["a", "a", "a", "b", "b", "c"])
        .map(|(b, r)| (b.addr().to_string(), r.to_string()))
        .collect();
    for _ in 0..5 {
        let w = lc.create(3, 2, 2, BTreeMap::new()).await.unwrap();
        let mut racks: Vec<&String> = w.metadata().fragments[0]
            .bookies
            .iter()
            .map(|b| &rack_of[b])
            .collect();
        racks.sort();
        assert_eq!(racks, vec!["a", "b", "c"]);
        w.close().await.unwrap();
        tokio::time::sleep(Duration::from_millis(7)).await;
    }
    tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_bookie_turns_read_only_and_writers_route_around_it() {
    let tier = Tier::start(&[None; 4]).await;
    let lc = tier.client();
    let w = lc.create(3, 2, 2, BTreeMap::new()).await.unwrap();
    let full = w.metadata().fragments[0].bookies[0].clone();
    let bookie = tier
        .bookies
        .iter()
        .flatten()
        .find(|b| b.addr() == full)
        .unwrap()
        .clone();
    for i in 0..50 {
        w.add(payload(i)).await.unwrap();
    }
    // Its disk crosses the high watermark (95 %).
    bookie.set_disk_usage_override(Some(0.97));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while lc
        .writable_bookies()
        .await
        .unwrap()
        .iter()
        .any(|b| b.addr == full)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "registration still writable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(bookie.is_read_only());
    // The open writer's adds to it are refused; the writer replaces it.
    for i in 50..100 {
        w.add(payload(i)).await.unwrap();
    }
    let meta = w.close().await.unwrap();
    assert!(!meta.fragments.last().unwrap().bookies.contains(&full));
    // New ledgers are placed around it.
    for _ in 0..5 {
        let w = lc.create(3, 2, 2, BTreeMap::new()).await.unwrap();
        assert!(!w.metadata().fragments[0].bookies.contains(&full));
        w.close().await.unwrap();
    }
    // Data it holds stays readable.
    for e in 0..100 {
        assert_eq!(lc.read(&meta, e).await.unwrap(), payload(e));
    }
    // Between the marks it stays read-only; below the low mark (90 %) it is writable again.
    bookie.set_disk_usage_override(Some(0.92));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        bookie.is_read_only(),
        "hysteresis: 92 % is above the low mark"
    );
    bookie.set_disk_usage_override(Some(0.50));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !lc
        .writable_bookies()
        .await
        .unwrap()
        .iter()
        .any(|b| b.addr == full)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "registration not writable again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!bookie.is_read_only());
    tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_recovery_restores_write_quorum_after_a_bookie_is_gone() {
    lose_a_bookie_and_wait_for_auto_recovery(200).await;
}

/// Not in the default run — the figure of docs/benchmarks.md:
/// `cargo test --release -p magnetar-bookie --test replication -- --ignored --nocapture auto_recovery_of_many_entries`
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn auto_recovery_of_many_entries() {
    let took = lose_a_bookie_and_wait_for_auto_recovery(20_000).await;
    println!("auto-recovery: 3 ledgers of 20,000 entries back at write quorum {took:?} after the bookie's registration expired");
}

/// Three closed 3/2/2 ledgers of `entries` entries over 4 bookies; one of
/// them goes away for good; waits until the auditor has copied everything it
/// held (checked entry by entry). Returns the time from its registration
/// expiring to nothing being under-replicated (grace period included).
async fn lose_a_bookie_and_wait_for_auto_recovery(entries: u64) -> Duration {
    let mut tier = Tier::start(&[None; 4]).await;
    let lc = tier.client();
    let mut closed = Vec::new();
    for _ in 0..3 {
        let w = lc.create(3, 2, 2, BTreeMap::new()).await.unwrap();
        let mut adds = Vec::new();
        for i in 0..entries {
            adds.push(w.add(payload(i)));
            if adds.len() == 1000 {
                for a in adds.drain(..) {
                    a.await.unwrap();
                }
            }
        }
        for a in adds {
            a.await.unwrap();
        }
        closed.push(w.close().await.unwrap());
    }
    // A bookie of the first ledger's ensemble goes away for good.
    let gone = closed[0].fragments[0].bookies[0].clone();
    tier.stop_bookie(&gone).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // Its registration expires with its lease (2 s here)...
    while lc
        .writable_bookies()
        .await
        .unwrap()
        .iter()
        .any(|b| b.addr == gone)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "registration lingers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... then, after the grace period, the auditor copies its entries.
    let expired = std::time::Instant::now();
    loop {
        let under = magnetar_bookie::auditor::under_replicated(&tier.metadata)
            .await
            .unwrap();
        if under.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still under-replicated: {under:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = expired.elapsed();
    // Every entry of every ledger is back on all Qw bookies of its write set.
    for old in &closed {
        let (meta, _) = lc.metadata(old.ledger_id).await.unwrap();
        assert!(meta.fragments.iter().all(|f| !f.bookies.contains(&gone)));
        tier.assert_on_write_quorum(&meta, 0..entries).await;
    }
    tier.shutdown().await;
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_use_stays_bounded_when_ledgers_are_written_and_deleted() {
    let tier = Tier::start(&[None, None]).await;
    let lc = tier.client();
    let data = Bytes::from(vec![3u8; 1024]);
    let mut peak = 0;
    for _ in 0..12 {
        let w = lc.create(2, 2, 2, BTreeMap::new()).await.unwrap();
        let adds: Vec<_> = (0..300).map(|_| w.add(data.clone())).collect();
        for a in adds {
            a.await.unwrap();
        }
        w.close().await.unwrap();
        lc.delete(w.ledger_id()).await.unwrap();
        peak = peak.max(tier.journal_bytes());
    }
    // Written: 12 ledgers x 300 KiB on each of 2 bookies (~7.4 MB in all).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = tier.journal_bytes();
        if now < 512 * 1024 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "journals hold {now} bytes after every ledger was deleted (peak {peak})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_replaces_a_dead_bookie_of_the_last_fragment() {
    let mut tier = Tier::start(&[None; 4]).await;
    let lc = tier.client();
    let w = lc.create(3, 2, 2, BTreeMap::new()).await.unwrap();
    let adds: Vec<_> = (0..300).map(|i| w.add(payload(i))).collect();
    for a in adds {
        a.await.unwrap();
    }
    // The writer's broker and one bookie of its ensemble die together.
    let dead = w.metadata().fragments[0].bookies[2].clone();
    let id = w.ledger_id();
    drop(w);
    tier.stop_bookie(&dead).await;
    let closed = tier.client().recover(id).await.unwrap();
    assert_eq!(closed.state, LedgerState::Closed);
    assert_eq!(closed.last_entry_id, 299);
    let last = closed.fragments.last().unwrap();
    assert!(!last.bookies.contains(&dead), "{closed:?}");
    for e in 0..300u64 {
        assert_eq!(lc.read(&closed, e).await.unwrap(), payload(e));
    }
    // The recovered tail is on a full write quorum of the new fragment.
    tier.assert_on_write_quorum(&closed, last.first_entry..300)
        .await;
    tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tailing_reader_long_polls_for_the_lac() {
    let tier = Tier::start(&[None; 3]).await;
    let lc = tier.client();
    let w = ledger_with(&lc, (3, 2, 2), 10).await;
    let meta = w.metadata();
    // Bookies learn the LAC from the adds that carry it (entry 9 carries 8).
    // Poll until no bookie knows more: the last poll waits out its timeout
    // and reports the same LAC.
    let mut known = -1;
    loop {
        let t = tokio::time::Instant::now();
        let k = lc
            .wait_for_lac(&meta, known, Duration::from_millis(300))
            .await
            .unwrap();
        if k == known {
            assert!(t.elapsed() >= Duration::from_millis(250), "returned early");
            break;
        }
        assert!(k > known, "the LAC never goes back: {k} after {known}");
        known = k;
    }
    assert_eq!(known, 8, "the highest LAC the bookies were told");
    // A poll in progress returns as soon as an add moves the LAC.
    let poll = {
        let (lc, meta) = (lc.clone(), meta.clone());
        tokio::spawn(async move { lc.wait_for_lac(&meta, known, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = tokio::time::Instant::now();
    w.add(payload(10)).await.unwrap();
    w.add(payload(11)).await.unwrap();
    let moved = poll.await.unwrap().unwrap();
    assert!(moved > known, "{moved} > {known}");
    assert!(t.elapsed() < Duration::from_secs(5));
    for e in 0..=moved as u64 {
        assert_eq!(lc.read(&meta, e).await.unwrap(), payload(e));
    }
    tier.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_copy_is_reported_and_read_from_another_replica() {
    // The bytes on disk are what gets corrupted: without this, the journal's
    // tail cache would still serve the intact copy from memory. And no
    // checkpoint: one that ran while the files were being corrupted could
    // copy entry 5 intact into an entry log (this test failed so once).
    let tier = Tier::start_tuned(&[None; 3], |cfg| {
        cfg.journal_cache_bytes = 0;
        cfg.checkpoint_interval_ms = 3_600_000;
    })
    .await;
    let lc = tier.client();
    let w = ledger_with(&lc, (3, 3, 3), 20).await;
    let meta = w.close().await.unwrap();
    // Flip bytes of entry 5's payload in the first replica's journal files.
    let first = meta.bookies_for(5)[0].clone();
    let idx = tier
        .bookies
        .iter()
        .position(|b| b.as_ref().is_some_and(|b| b.addr() == first))
        .unwrap();
    let needle = payload(5);
    // Every copy the bookie has on disk: its journal, and an entry log if
    // a checkpoint (asked for at once by the empty tail cache) moved the
    // entry there meanwhile. A file a checkpoint removes as we go is
    // skipped (its entries are in an entry log we visit).
    let mut corrupted = false;
    let mut dirs = vec![tier._dir.path().join(format!("bookie-{idx}"))];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let Ok(mut data) = std::fs::read(&path) else {
                continue;
            };
            if let Some(at) = data.windows(needle.len()).position(|w| w == &needle[..]) {
                data[at + 3] ^= 0xff;
                if std::fs::write(&path, &data).is_ok() {
                    corrupted = true;
                }
            }
        }
    }
    assert!(corrupted, "entry 5 not found on disk");
    // That bookie refuses to serve it...
    assert_eq!(tier.read_from(&first, meta.ledger_id, 5).await, None);
    // ...and the client gets the right bytes from another replica.
    assert_eq!(lc.read(&meta, 5).await.unwrap(), payload(5));
    // So does a range read (that bookie's answer for entry 5's stripe ends
    // before it).
    let all = read_all(&lc, &meta, 0, 19).await;
    assert_eq!(all, (0..20).map(payload).collect::<Vec<_>>());
    tier.shutdown().await;
}

/// A batch of adds is answered add by add: a bad digest or a wrong master key
/// refuses only that add, the others are stored and readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_of_adds_is_answered_add_by_add() {
    // Ledgers 900 and 901 have no metadata, so to the bookie's garbage
    // collector they are deleted ledgers, dropped at its next pass (every
    // 200 ms in these tiers; a debug build's first calls on a connection can
    // take longer while MTU discovery probes). No pass runs in this test.
    let tier = Tier::start_tuned(&[None], |cfg| cfg.gc_interval_ms = 3_600_000).await;
    let bookie = tier.bookies[0].as_ref().unwrap().addr().to_string();
    let key = [7u8; 16];
    let add = |ledger_id: u64, entry_id: u64, master_key: [u8; 16]| AddRequest {
        ledger_id,
        entry_id,
        master_key,
        lac: -1,
        payload: payload(entry_id),
        digest: entry_digest(ledger_id, entry_id, -1, &payload(entry_id)),
        recovery: false,
    };
    let mut adds: Vec<AddRequest> = (0..10).map(|e| add(900, e, key)).collect();
    adds[3].digest ^= 1; // corrupted in flight
    adds[6].master_key = [8u8; 16]; // another writer's credential
    adds.push(add(901, 0, key)); // a second ledger in the same batch
    let r: BookieResponse = tier
        .rpc
        .call(bookie.parse().unwrap(), &BookieRequest::AddBatch(adds))
        .await
        .unwrap();
    let BookieResponse::AddedBatch(results) = r else {
        panic!("expected per-add results, got {r:?}");
    };
    assert_eq!(results.len(), 11);
    for (i, res) in results.iter().enumerate() {
        match i {
            3 => assert_eq!(*res, Err(BookieErrorCode::BadDigest)),
            6 => assert_eq!(*res, Err(BookieErrorCode::Unauthorized)),
            _ => assert_eq!(*res, Ok(()), "add {i}"),
        }
    }
    for e in (0..10).filter(|e| *e != 3 && *e != 6) {
        assert_eq!(tier.read_from(&bookie, 900, e).await, Some(payload(e)));
    }
    assert_eq!(tier.read_from(&bookie, 900, 3).await, None);
    assert_eq!(tier.read_from(&bookie, 901, 0).await, Some(payload(0)));
    tier.shutdown().await;
}

/// `ReadRange` as a bookie answers it: a stripe of entries in order, cut
/// at the byte budget (one entry at least) or before an entry it lacks, an
/// error when it lacks the first; and the client's range read over large
/// entries, which takes several requests per stripe.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn range_reads_come_in_stripes_cut_at_the_byte_budget() {
    let tier = Tier::start(&[None]).await;
    let bookie: std::net::SocketAddr = tier.bookies[0].as_ref().unwrap().addr().parse().unwrap();
    let lc = tier.client();
    let big = |i: u64| Bytes::from(vec![i as u8; 300 * 1024]);
    let w = lc.create(1, 1, 1, BTreeMap::new()).await.unwrap();
    for i in 0..12u64 {
        w.add(big(i)).await.unwrap();
    }
    let meta = w.close().await.unwrap();
    let range = |first: u64, last: u64, step: u64, max_bytes: u32| {
        let rpc = tier.rpc.clone();
        let req = BookieRequest::ReadRange {
            ledger_id: meta.ledger_id,
            first,
            last,
            step,
            max_bytes,
        };
        async move { rpc.call::<_, BookieResponse>(bookie, &req).await.unwrap() }
    };
    let ids = |r: BookieResponse| match r {
        BookieResponse::Entries { entries, .. } => {
            entries.iter().map(|e| e.entry_id).collect::<Vec<_>>()
        }
        other => panic!("{other:?}"),
    };
    // 1 MiB holds three and a bit of these: the fourth passes it, then stop.
    assert_eq!(ids(range(0, 11, 1, 1024 * 1024).await), vec![0, 1, 2, 3]);
    assert_eq!(ids(range(1, 11, 3, 1024 * 1024).await), vec![1, 4, 7, 10]);
    assert_eq!(ids(range(5, 11, 2, 1).await), vec![5], "one entry at least");
    assert_eq!(
        ids(range(10, 20, 1, 1024 * 1024).await),
        vec![10, 11],
        "ends before a missing entry"
    );
    assert_eq!(
        range(12, 20, 1, 1024 * 1024).await,
        BookieResponse::Error(BookieErrorCode::NoSuchEntry)
    );
    // Asking beyond the limit gets the limit.
    assert_eq!(ids(range(0, 11, 1, u32::MAX).await).len(), 4);
    let all = read_all(&lc, &meta, 0, 11).await;
    assert_eq!(all, (0..12).map(big).collect::<Vec<_>>());
    // Past the end: an error for each entry that is not there.
    let tail = lc.read_range(&meta, 10, 13).await;
    assert!(tail[0].is_ok() && tail[1].is_ok() && tail[2].is_err() && tail[3].is_err());
    tier.shutdown().await;
}

/// A bookie that takes requests and never answers (a long pause, a hung
/// disk) holds a range read or a single read up only for the speculative
/// delay: the next bookie of the write set is asked as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_go_around_a_stalled_bookie() {
    let tier = Tier::start(&[None; 3]).await;
    let lc = tier.client();
    let w = ledger_with(&lc, (3, 3, 2), 30).await;
    let mut meta = w.close().await.unwrap();
    let addr = tier.stalled_bookie().await;
    // It stands first in the write set of entries 0, 3, 6, ….
    meta.fragments[0].bookies[0] = addr;
    // A client that would wait ten minutes for an answer.
    let mut rpc = tier.rpc.clone();
    rpc.timeout = Duration::from_secs(600);
    let patient = LedgerClient::new(tier.metadata.clone(), rpc);
    let got = tokio::time::timeout(Duration::from_secs(60), read_all(&patient, &meta, 0, 29))
        .await
        .expect("the range read waited on the stalled bookie");
    assert_eq!(got, (0..30).map(payload).collect::<Vec<_>>());
    // So does a single read: its speculative read of the next bookie.
    for e in [0, 3, 27] {
        let one = tokio::time::timeout(Duration::from_secs(10), patient.read(&meta, e))
            .await
            .expect("the read waited on the stalled bookie");
        assert_eq!(one.unwrap(), payload(e));
    }
    tier.shutdown().await;
}

/// A bookie raises its soft limit on open files to the hard one (it keeps
/// two files open per entry log).
#[test]
fn a_bookie_raises_its_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // One below the hard limit (lower could starve the tests running beside).
    setrlimit(Resource::RLIMIT_NOFILE, hard - 1, hard).unwrap();
    assert_eq!(magnetar_bookie::server::raise_open_file_limit(), Some(hard));
    assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
}

/// A journal whose writes fail (its next segment is `/dev/full`: ENOSPC,
/// as on a disk that filled up despite the watermarks): the adds it took
/// get an error, the writer goes on with another bookie, nothing
/// acknowledged is lost, and the bookie registers as not writable, so new
/// ledgers are placed elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_journal_that_fails_a_write_turns_its_bookie_read_only() {
    let tier = Tier::start(&[None; 2]).await;
    let lc = tier.client();
    let w = lc.create(1, 1, 1, BTreeMap::new()).await.unwrap();
    let sick = w.metadata().fragments[0].bookies[0].clone();
    let idx = tier
        .bookies
        .iter()
        .position(|b| b.as_ref().is_some_and(|b| b.addr() == sick))
        .unwrap();
    let dir = tier._dir.path().join(format!("bookie-{idx}/journal"));
    let last = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .strip_suffix(".jnl")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap();
    std::os::unix::fs::symlink("/dev/full", dir.join(format!("{:010}.jnl", last + 1))).unwrap();
    // Segments roll at 64 KiB here; lone adds take a 4 KiB block each.
    for i in 0..100u64 {
        assert_eq!(w.add(payload(i)).await.unwrap(), i);
    }
    let meta = w.close().await.unwrap();
    assert!(
        meta.fragments.len() >= 2,
        "the writer left the failed bookie"
    );
    assert!(!meta.fragments.last().unwrap().bookies.contains(&sick));
    let all = read_all(&lc, &meta, 0, 99).await;
    assert_eq!(all, (0..100).map(payload).collect::<Vec<_>>());
    // It says so in its registration…
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let kvs = tier.metadata.range(BOOKIES_PREFIX, 0).await.unwrap();
        let info: Vec<BookieInfo> = kvs
            .iter()
            .map(|kv| serde_json::from_slice(&kv.value).unwrap())
            .collect();
        if info.iter().any(|b| b.addr == sick && !b.writable) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still writable: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // …so new ledgers go to the other bookie.
    for _ in 0..4 {
        let w = lc.create(1, 1, 1, BTreeMap::new()).await.unwrap();
        assert_ne!(w.metadata().fragments[0].bookies[0], sick);
        w.add(payload(0)).await.unwrap();
        w.close().await.unwrap();
    }
    tier.shutdown().await;
}

/// A bookie that comes back at its address with an empty disk would answer
/// "no such entry" for entries it was trusted with (and recovery counts such
/// answers): it is refused until the address is decommissioned, which
/// copies what it held at once — no grace period — and frees the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bookie_back_with_an_empty_disk_is_refused_until_decommissioned() {
    let mut tier = Tier::start_tuned(&[None; 4], |c| c.auditor_grace_ms = 600_000).await;
    let lc = tier.client();
    let w = lc.create(3, 2, 2, BTreeMap::new()).await.unwrap();
    for i in 0..100 {
        w.add(payload(i)).await.unwrap();
    }
    let meta = w.close().await.unwrap();
    let gone = meta.fragments[0].bookies[0].clone();
    // A restart with its own disk is fine.
    let old_dir = tier
        .bookies
        .iter()
        .flatten()
        .find(|b| b.addr() == gone)
        .unwrap()
        .data_dir()
        .to_path_buf();
    tier.stop_bookie(&gone).await;
    let mut same = BookieConfig::new(gone.parse().unwrap(), old_dir);
    same.registration_ttl_ms = 2_000;
    let b = Bookie::start(same, &tier.tls, &tier.metadata)
        .await
        .unwrap();
    b.shutdown().await;
    drop(b);
    // The aborted tasks let go of the socket as they unwind.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The same address with a new, empty data dir.
    let mut fresh = BookieConfig::new(gone.parse().unwrap(), tier._dir.path().join("new-disk"));
    fresh.registration_ttl_ms = 2_000;
    match Bookie::start(fresh.clone(), &tier.tls, &tier.metadata).await {
        Err(BookieError::Identity(why)) => assert!(why.contains("decommission"), "{why}"),
        Err(e) => panic!("refused for the wrong reason: {e}"),
        Ok(_) => panic!("a bookie with an empty disk took over {gone}"),
    }
    // Decommissioning refuses while the old registration lives, then copies
    // every entry at once (the grace period here is ten minutes).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let started = loop {
        match magnetar_bookie::auditor::decommission(
            &tier.metadata,
            &gone,
            Duration::from_secs(30),
            |_, _| {},
        )
        .await
        {
            Ok(()) => break tokio::time::Instant::now(),
            Err(e) if e.to_string().contains("is running") => {
                assert!(tokio::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("decommission: {e}"),
        }
    };
    assert!(started < deadline);
    let (now, _) = lc.metadata(meta.ledger_id).await.unwrap();
    assert!(now.fragments.iter().all(|f| !f.bookies.contains(&gone)));
    tier.assert_on_write_quorum(&now, 0..100).await;
    // The address is free: the new disk takes it.
    let b = Bookie::start(fresh, &tier.tls, &tier.metadata)
        .await
        .unwrap();
    tier.bookies.push(Some(b));
    tier.shutdown().await;
}

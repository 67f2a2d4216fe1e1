//! Writes go on while a write quorum of bookies is writable, on processes
//! (deploy/local-cluster.sh: 3 metadata nodes, 3 bookies, ensemble 3/2/2,
//! one broker): a bookie of the topic's ensemble killed (-9) under a
//! producer costs less than a second of acknowledgements and a new
//! subscription succeeds during the outage; with two of three gone the
//! sends fail, naming the shortfall; one restarted, writes resume. The
//! queue checker finds nothing acknowledged lost.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::{Duration, Instant};

use magnetar_bookie::LedgerMetadata;
use magnetar_client::{ConsumerOptions, OutgoingMessage};
use magnetar_metadata::MetadataClient;
use magnetar_proto::rpc::{client_endpoint, RpcClient};
use magnetar_proto::tls::TlsMaterial;
use magnetar_tests::{bookie_cluster, init_logs, LocalCluster, QueueChecker};

const TOPIC: &str = "persistent://public/default/bookie-outage";

fn msg(i: u64) -> (String, OutgoingMessage) {
    let v = format!("m{i}");
    (
        v.clone(),
        OutgoingMessage {
            payload: v.into_bytes().into(),
            key: Some("k".into()),
            ..Default::default()
        },
    )
}

/// The bookie member holding the topic's current data ledger.
async fn a_bookie_of_the_topic(cluster: &LocalCluster) -> String {
    let tls = TlsMaterial::load(&TlsMaterial::paths_in(&cluster.dir.join("admin/tls"))).unwrap();
    let endpoints = (0..3)
        .map(|i| ([127, 0, 0, 1], cluster.ports[0] + i).into())
        .collect();
    let md = MetadataClient::new(RpcClient::new(client_endpoint(&tls).unwrap()), endpoints);
    let last: LedgerMetadata = md
        .range(magnetar_bookie::registry::LEDGERS_PREFIX, 0)
        .await
        .unwrap()
        .iter()
        .rev()
        .map(|kv| serde_json::from_slice::<LedgerMetadata>(&kv.value).unwrap())
        .find(|m| m.properties.contains_key("managed-ledger"))
        .unwrap();
    let victim = last.fragments.last().unwrap().bookies[0].clone();
    let port: u16 = victim.rsplit(':').next().unwrap().parse().unwrap();
    format!("bookie-{}", port - cluster.ports[1] + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_with_a_write_quorum_of_bookies_and_resume_when_one_returns() {
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let (cluster, client, producer) = bookie_cluster(tmp.path(), 3, TOPIC, false).await;
    let earliest = || ConsumerOptions {
        earliest: true,
        ..Default::default()
    };
    let mut checker = QueueChecker::default();
    for i in 0..200u64 {
        let (v, m) = msg(i);
        producer.send(m).await.unwrap();
        checker.sent_acked(&v, "k", i);
    }

    // One bookie of the ensemble killed: the writer shrinks to the two left.
    let victim = a_bookie_of_the_topic(&cluster).await;
    let mut longest = Duration::ZERO;
    let mut last_ack = Instant::now();
    let mut i = 200u64;
    cluster.run(&["kill", &victim, "--signal", "KILL"]);
    let killed = Instant::now();
    while killed.elapsed() < Duration::from_secs(4) {
        let (v, m) = msg(i);
        let f = producer.send_async(m);
        match tokio::time::timeout(Duration::from_secs(10), f).await {
            Ok(Ok(_)) => {
                longest = longest.max(last_ack.elapsed());
                last_ack = Instant::now();
                checker.sent_acked(&v, "k", i);
            }
            _ => checker.sent_unknown(&v, "k", i),
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("longest wait for an acknowledgement after the kill: {longest:?}");
    assert!(longest < Duration::from_secs(1), "{longest:?}");
    // A new subscription (a cursor ledger of its own) during the outage.
    let mut during = client
        .subscribe(TOPIC, "during-outage", earliest())
        .await
        .unwrap();
    let first = during
        .receive_timeout(Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.payload.as_ref(), b"m0");
    during.ack(&first).unwrap();

    // Two of three gone: sends fail, naming the shortfall.
    let others: Vec<String> = (1..=3)
        .map(|b| format!("bookie-{b}"))
        .filter(|b| *b != victim)
        .collect();
    cluster.run(&["kill", &others[0], "--signal", "KILL"]);
    let mut failed = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while failed.is_none() && Instant::now() < deadline {
        let (v, m) = msg(i);
        match tokio::time::timeout(Duration::from_secs(30), producer.send(m)).await {
            Ok(Ok(_)) => checker.sent_acked(&v, "k", i),
            Ok(Err(e)) => {
                checker.sent_unknown(&v, "k", i);
                failed = Some(e.to_string());
            }
            Err(_) => checker.sent_unknown(&v, "k", i),
        }
        i += 1;
    }
    let failed = failed.expect("a send failed with only one bookie left");
    println!("with one bookie left: {failed}");
    assert!(failed.contains("not enough writable bookies"), "{failed}");

    // One returns: writes resume by themselves.
    cluster.run(&["start", &others[0]]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut resumed = false;
    while !resumed && Instant::now() < deadline {
        let (v, m) = msg(i);
        match tokio::time::timeout(Duration::from_secs(30), producer.send(m)).await {
            Ok(Ok(_)) => {
                checker.sent_acked(&v, "k", i);
                resumed = true;
            }
            _ => {
                checker.sent_unknown(&v, "k", i);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        i += 1;
    }
    assert!(resumed, "writes resumed once a second bookie was back");
    for j in 0..100u64 {
        let (v, m) = msg(i + j);
        producer.send(m).await.unwrap();
        checker.sent_acked(&v, "k", i + j);
    }

    let mut c = client
        .subscribe(TOPIC, "checker", earliest())
        .await
        .unwrap();
    checker.drain(&mut c, Duration::from_secs(5)).await;
    let v = checker.verdict();
    println!("bookie outage: {v}");
    assert!(v.ok(), "{v:?}");
}

//! End-to-end against an in-process standalone (real metadata, bookie and
//! broker tiers over QUIC and TCP on loopback).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::BytesMut;
use magnetar_client::{
    Client, ConsumerOptions, OutgoingMessage, ProducerOptions, SubscriptionType,
};
use magnetar_tests::{init_logs, StandaloneSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn earliest(sub_type: SubscriptionType) -> ConsumerOptions {
    ConsumerOptions {
        sub_type,
        earliest: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_consume_batched_and_not_with_keys_and_properties() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    for batching in [false, true] {
        let topic = format!("persistent://public/default/kp-{batching}");
        let mut consumer = client
            .subscribe(&topic, "sub", earliest(SubscriptionType::Exclusive))
            .await
            .unwrap();
        let producer = client
            .create_producer(
                &topic,
                ProducerOptions {
                    batching,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let mut receipts = Vec::new();
        for i in 0..50 {
            let msg = OutgoingMessage {
                payload: format!("m{i}").into_bytes().into(),
                key: Some(format!("k{}", i % 3)),
                properties: BTreeMap::from([("i".to_string(), i.to_string())]),
                deliver_at_ms: None,
            };
            receipts.push(producer.send_async(msg));
        }
        producer.flush();
        let mut ids = Vec::new();
        for r in receipts {
            ids.push(r.await.unwrap());
        }
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(
            ids, sorted,
            "receipts come in send order with increasing ids"
        );
        if batching {
            assert!(
                ids.iter().any(|id| id.batch_index > 0),
                "batching puts several messages in one entry"
            );
        }
        for (i, id) in ids.iter().enumerate() {
            let m = consumer
                .receive_timeout(WAIT)
                .await
                .unwrap()
                .expect("message");
            assert_eq!(m.payload, format!("m{i}").as_bytes());
            assert_eq!(m.key.as_deref(), Some(format!("k{}", i % 3).as_str()));
            assert_eq!(m.properties.get("i"), Some(&i.to_string()));
            assert_eq!(m.id, *id);
            consumer.ack(&m).unwrap();
        }
        consumer.close().await.unwrap();
        producer.close().await.unwrap();
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_data_and_subscription_positions_across_ledger_rolls() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    // Small ledgers so the topic spans several of them.
    let s = spec
        .start_with(|c| c.managed_ledger.max_entries_per_ledger = 7)
        .await;
    let topic = "restart-topic";
    {
        let client = Client::connect(&s.service_url()).await.unwrap();
        let mut c1 = client
            .subscribe(topic, "s1", earliest(SubscriptionType::Exclusive))
            .await
            .unwrap();
        let mut c2 = client
            .subscribe(topic, "s2", earliest(SubscriptionType::Failover))
            .await
            .unwrap();
        let p = client
            .create_producer(topic, ProducerOptions::default())
            .await
            .unwrap();
        for i in 0..30 {
            p.send(format!("v{i}").as_str()).await.unwrap();
        }
        // s1 acks the first 20 individually; s2 (Failover: cumulative acks
        // count there, not on Shared) acks cumulatively up to 10.
        for i in 0..20 {
            let m = c1.receive_timeout(WAIT).await.unwrap().unwrap();
            assert_eq!(m.payload, format!("v{i}").as_bytes());
            c1.ack(&m).unwrap();
        }
        let mut last = None;
        for _ in 0..11 {
            last = c2.receive_timeout(WAIT).await.unwrap();
        }
        c2.ack_cumulative(last.as_ref().unwrap()).unwrap();
        // Let the acks reach the broker and be flushed to the cursor ledgers.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    s.shutdown().await;
    let s = spec
        .start_with(|c| c.managed_ledger.max_entries_per_ledger = 7)
        .await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let mut c1 = client
        .subscribe(topic, "s1", earliest(SubscriptionType::Exclusive))
        .await
        .unwrap();
    for i in 20..30 {
        let m = c1
            .receive_timeout(WAIT)
            .await
            .unwrap()
            .expect("s1 resumes after its acks");
        assert_eq!(m.payload, format!("v{i}").as_bytes());
    }
    let mut c2 = client
        .subscribe(topic, "s2", earliest(SubscriptionType::Failover))
        .await
        .unwrap();
    let m = c2.receive_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(
        m.payload,
        b"v11".as_slice(),
        "s2 resumes after its cumulative ack"
    );
    s.shutdown().await;
}

/// Ack receipts (protocol 17): an ack is answered once stored; a cumulative
/// ack on a shared subscription is refused with NotAllowedError. Holes of
/// individually acked messages across ledgers survive a restart: only the
/// unacknowledged messages come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_receipts_and_acked_holes_survive_a_restart() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec
        .start_with(|c| c.managed_ledger.max_entries_per_ledger = 7)
        .await;
    let topic = "receipts-topic";
    {
        let client = Client::connect(&s.service_url()).await.unwrap();
        let mut c = client
            .subscribe(topic, "s", earliest(SubscriptionType::Shared))
            .await
            .unwrap();
        let p = client
            .create_producer(topic, ProducerOptions::default())
            .await
            .unwrap();
        for i in 0..40 {
            p.send(format!("v{i}").as_str()).await.unwrap();
        }
        let mut first = None;
        for i in 0..40 {
            let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
            assert_eq!(m.payload, format!("v{i}").as_bytes());
            if i % 2 == 1 {
                c.ack_with_receipt(&m).await.unwrap();
            }
            first.get_or_insert(m);
        }
        let e = c
            .ack_cumulative_with_receipt(first.as_ref().unwrap())
            .await
            .unwrap_err();
        assert_eq!(
            e.server_error(),
            Some(magnetar_proto::pulsar::ServerError::NotAllowedError),
            "{e}"
        );
    }
    s.shutdown().await;
    let s = spec
        .start_with(|c| c.managed_ledger.max_entries_per_ledger = 7)
        .await;
    // The holes as Pulsar's internal stats show them.
    let url = format!(
        "http://127.0.0.1:{}/admin/v2/persistent/public/default/{topic}/internalStats",
        spec.http_port
    );
    let stats: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    let cursor = &stats["cursors"]["s"];
    assert_eq!(cursor["individuallyAckedEntries"], 20, "{stats}");
    let ranges = cursor["individuallyDeletedMessages"].as_str().unwrap();
    assert_eq!(ranges.matches("..").count(), 20, "{ranges}");
    let client = Client::connect(&s.service_url()).await.unwrap();
    let mut c = client
        .subscribe(topic, "s", earliest(SubscriptionType::Shared))
        .await
        .unwrap();
    for i in (0..40).step_by(2) {
        let m = c
            .receive_timeout(WAIT)
            .await
            .unwrap()
            .expect("an unacked one");
        assert_eq!(m.payload, format!("v{i}").as_bytes());
    }
    assert!(
        c.receive_timeout(Duration::from_millis(700))
            .await
            .unwrap()
            .is_none(),
        "the acknowledged ones stay acknowledged"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_spreads_and_redelivers_unacked() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let s = StandaloneSpec::new(dir.path()).start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "shared-topic";
    let opts = ConsumerOptions {
        sub_type: SubscriptionType::Shared,
        earliest: true,
        receiver_queue: 10,
        ..Default::default()
    };
    let mut a = client.subscribe(topic, "work", opts.clone()).await.unwrap();
    let mut b = client.subscribe(topic, "work", opts.clone()).await.unwrap();
    let p = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .unwrap();
    for i in 0..10 {
        p.send(format!("w{i}").as_str()).await.unwrap();
    }
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    while got_a.len() + got_b.len() < 10 {
        if let Some(m) = a.receive_timeout(Duration::from_millis(200)).await.unwrap() {
            got_a.push(m);
        }
        if let Some(m) = b.receive_timeout(Duration::from_millis(200)).await.unwrap() {
            got_b.push(m);
        }
    }
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "both consumers get work: a {} b {}",
        got_a.len(),
        got_b.len()
    );
    // a acks nothing and closes: its messages go to b.
    for m in &got_b {
        b.ack(m).unwrap();
    }
    let a_count = got_a.len();
    a.close().await.unwrap();
    let mut again = 0;
    while again < a_count {
        let m = b.receive_timeout(WAIT).await.unwrap().expect("redelivered");
        assert!(m.redelivery_count >= 1);
        b.ack(&m).unwrap();
        again += 1;
    }
    // A second Exclusive consumer is refused.
    let _x = client
        .subscribe(topic, "excl", earliest(SubscriptionType::Exclusive))
        .await
        .unwrap();
    let err = client
        .subscribe(topic, "excl", earliest(SubscriptionType::Exclusive))
        .await
        .err()
        .expect("busy");
    assert!(
        matches!(err, magnetar_client::Error::Server { code: 5, .. }),
        "ConsumerBusy, got {err:?}"
    );
    // A cumulative ack on a Shared subscription is ignored (as Pulsar does):
    // nothing becomes acknowledged.
    let shared = ConsumerOptions {
        sub_type: SubscriptionType::Shared,
        earliest: true,
        ..Default::default()
    };
    let mut c = client
        .subscribe(topic, "cum", shared.clone())
        .await
        .unwrap();
    let mut last = None;
    for _ in 0..10 {
        last = Some(c.receive_timeout(WAIT).await.unwrap().expect("message"));
    }
    c.ack_cumulative(&last.unwrap()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.close().await.unwrap();
    let mut c = client.subscribe(topic, "cum", shared).await.unwrap();
    let first = c.receive_timeout(WAIT).await.unwrap().expect("still there");
    assert_eq!(first.payload, b"w0".as_slice(), "nothing was acknowledged");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seek_and_redeliver() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let s = StandaloneSpec::new(dir.path()).start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let mut c = client
        .subscribe("seek-topic", "s", earliest(SubscriptionType::Exclusive))
        .await
        .unwrap();
    let p = client
        .create_producer("seek-topic", ProducerOptions::default())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(p.send(format!("s{i}").as_str()).await.unwrap());
    }
    for _ in 0..5 {
        let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
        c.ack(&m).unwrap();
    }
    c.seek(ids[2]).await.unwrap();
    let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(m.payload, b"s2".as_slice());
    // Unacked messages come back on request.
    c.redeliver_unacknowledged().unwrap();
    // Messages already in flight may arrive first; the redelivered s2 follows.
    loop {
        let m = c.receive_timeout(WAIT).await.unwrap().expect("redelivery");
        if m.payload == b"s2".as_slice() {
            assert!(m.redelivery_count >= 1);
            break;
        }
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_errors_and_the_broker_keeps_serving() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let s = StandaloneSpec::new(dir.path()).start().await;
    let addr = s.broker.local_addr;
    // Garbage instead of a frame: the connection is closed.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(&[0, 0, 0, 8, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, raw.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "connection closed after a malformed frame");
    // An oversized frame header: closed before the body is read.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
    let n = tokio::time::timeout(WAIT, raw.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "connection closed after an oversized frame");
    // A truncated frame followed by EOF: no crash.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(&[0, 0, 0, 100, 0, 0]).await.unwrap();
    drop(raw);
    let client = Client::connect(&s.service_url()).await.unwrap();
    // On one raw connection: a corrupt payload is refused with a checksum
    // error (not stored), then a well-formed but unsupported command gets an
    // ERROR answer, and the connection stays open for both answers.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = BytesMut::new();
    let mut hello =
        magnetar_proto::frame::base(magnetar_proto::pulsar::base_command::Type::Connect);
    hello.connect = Some(magnetar_proto::pulsar::CommandConnect {
        client_version: "raw".into(),
        protocol_version: Some(12),
        ..Default::default()
    });
    magnetar_proto::frame::encode_command(&hello, &mut out);
    let mut prod =
        magnetar_proto::frame::base(magnetar_proto::pulsar::base_command::Type::Producer);
    prod.producer = Some(magnetar_proto::pulsar::CommandProducer {
        topic: "crc-topic".into(),
        producer_id: 1,
        request_id: 1,
        ..Default::default()
    });
    magnetar_proto::frame::encode_command(&prod, &mut out);
    let mut send = magnetar_proto::frame::base(magnetar_proto::pulsar::base_command::Type::Send);
    send.send = Some(magnetar_proto::pulsar::CommandSend {
        producer_id: 1,
        sequence_id: 0,
        ..Default::default()
    });
    let md = magnetar_proto::pulsar::MessageMetadata {
        producer_name: "raw".into(),
        sequence_id: 0,
        publish_time: 1,
        ..Default::default()
    };
    let pl = magnetar_proto::Payload::build(md, b"payload");
    let mut bad = pl.headers_and_payload.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    magnetar_proto::frame::encode_payload_command(&send, &bad, &mut out);
    let unsupported =
        magnetar_proto::frame::base(magnetar_proto::pulsar::base_command::Type::GetSchema);
    magnetar_proto::frame::encode_command(&unsupported, &mut out);
    let mut sub =
        magnetar_proto::frame::base(magnetar_proto::pulsar::base_command::Type::Subscribe);
    sub.subscribe = Some(magnetar_proto::pulsar::CommandSubscribe {
        topic: "crc-topic".into(),
        subscription: "s".into(),
        sub_type: 9,
        consumer_id: 1,
        request_id: 7,
        ..Default::default()
    });
    magnetar_proto::frame::encode_command(&sub, &mut out);
    raw.write_all(&out).await.unwrap();
    let mut inbuf = BytesMut::new();
    let (mut saw_checksum_error, mut saw_unsupported_error) = (false, false);
    let mut saw_bad_sub_type = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(saw_checksum_error && saw_unsupported_error && saw_bad_sub_type)
        && tokio::time::Instant::now() < deadline
    {
        let _ = tokio::time::timeout(Duration::from_millis(500), raw.read_buf(&mut inbuf)).await;
        while let Ok(Some(f)) = magnetar_proto::frame::decode(&mut inbuf, 1 << 20) {
            if let Some(e) = f.command.send_error {
                assert_eq!(
                    e.error,
                    magnetar_proto::pulsar::ServerError::ChecksumError as i32
                );
                saw_checksum_error = true;
            }
            if let Some(e) = f.command.error {
                if e.request_id == 7 {
                    assert_eq!(
                        e.error,
                        magnetar_proto::pulsar::ServerError::NotAllowedError as i32,
                        "{e:?}"
                    );
                    assert!(e.message.contains("unknown subscription type 9"), "{e:?}");
                    saw_bad_sub_type = true;
                } else {
                    assert!(e.message.contains("not supported"), "{e:?}");
                    saw_unsupported_error = true;
                }
            }
        }
    }
    assert!(
        saw_checksum_error,
        "corrupt SEND answered with SEND_ERROR ChecksumError"
    );
    assert!(
        saw_unsupported_error,
        "unsupported command answered with ERROR"
    );
    assert!(
        saw_bad_sub_type,
        "an unknown subscription type answered with ERROR NotAllowedError"
    );
    // Unknown namespace and invalid names: clear errors.
    let err = client
        .create_producer("persistent://nope/nope/t", ProducerOptions::default())
        .await
        .err()
        .expect("unknown namespace");
    assert!(
        matches!(err, magnetar_client::Error::Server { code: 11, .. }),
        "TopicNotFound, got {err:?}"
    );
    let err = client
        .create_producer("a/b", ProducerOptions::default())
        .await
        .err()
        .expect("invalid name");
    assert!(
        matches!(err, magnetar_client::Error::Server { code: 17, .. }),
        "InvalidTopicName, got {err:?}"
    );
    // And the broker still serves.
    let p = client
        .create_producer("after-bad-input", ProducerOptions::default())
        .await
        .unwrap();
    p.send("still here").await.unwrap();
    let mut c = client
        .subscribe(
            "after-bad-input",
            "s",
            earliest(SubscriptionType::Exclusive),
        )
        .await
        .unwrap();
    assert_eq!(
        c.receive_timeout(WAIT).await.unwrap().unwrap().payload,
        b"still here".as_slice()
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_ledgers_are_deleted() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let s = StandaloneSpec::new(dir.path())
        .start_with(|c| c.managed_ledger.max_entries_per_ledger = 5)
        .await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "trim-topic";
    let mut c = client
        .subscribe(topic, "s", earliest(SubscriptionType::Exclusive))
        .await
        .unwrap();
    let p = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .unwrap();
    for i in 0..23 {
        p.send(format!("t{i}").as_str()).await.unwrap();
    }
    let name = magnetar_proto::TopicName::parse(topic).unwrap();
    let t = s.broker.topics.get(&name).unwrap();
    let before = t.ml.ledger_ids();
    assert!(before.len() >= 5, "23 entries in ledgers of 5: {before:?}");
    for _ in 0..23 {
        let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
        c.ack(&m).unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = t.ml.ledger_ids();
        if now.len() <= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "consumed ledgers still listed: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The deleted ledgers are gone from the metadata store too.
    let first = before[0];
    assert!(matches!(
        s.ledgers.metadata(first).await,
        Err(magnetar_bookie::LedgerError::NoSuchLedger(_))
    ));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_message_id_and_seek_by_publish_time() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let s = StandaloneSpec::new(dir.path()).start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "time-topic";
    let mut c = client
        .subscribe(topic, "s", earliest(SubscriptionType::Exclusive))
        .await
        .unwrap();
    assert_eq!(
        c.last_message_id().await.unwrap().entry_id,
        u64::MAX,
        "empty topic: entry -1"
    );
    let p = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .unwrap();
    for i in 0..3 {
        p.send(format!("early{i}").as_str()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cut = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut last = None;
    for i in 0..2 {
        last = Some(p.send(format!("late{i}").as_str()).await.unwrap());
    }
    let last = last.unwrap();
    let got = c.last_message_id().await.unwrap();
    assert_eq!(
        (got.ledger_id, got.entry_id),
        (last.ledger_id, last.entry_id)
    );
    for _ in 0..5 {
        let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
        c.ack(&m).unwrap();
    }
    c.seek_time(cut).await.unwrap();
    let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(m.payload, b"late0".as_slice());
    s.shutdown().await;
}

/// Reads frames from a raw connection until `want` ACTIVE_CONSUMER_CHANGE
/// notices came (or the wait ends); returns them as (consumer id, active).
async fn active_notices(
    raw: &mut tokio::net::TcpStream,
    buf: &mut BytesMut,
    want: usize,
) -> Vec<(u64, bool)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < want && tokio::time::Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(200), raw.read_buf(buf)).await;
        while let Ok(Some(f)) = magnetar_proto::frame::decode(buf, 1 << 20) {
            if let Some(c) = f.command.active_consumer_change {
                got.push((c.consumer_id, c.is_active.unwrap_or(false)));
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_has_one_active_consumer_and_the_standby_takes_over() {
    use magnetar_proto::frame::{base, encode_command};
    use magnetar_proto::pulsar::{base_command::Type, CommandConnect, CommandSubscribe};
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let s = StandaloneSpec::new(dir.path()).start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "failover-topic";
    let opts = |name: &str| ConsumerOptions {
        sub_type: SubscriptionType::Failover,
        earliest: true,
        consumer_name: Some(name.into()),
        ..Default::default()
    };
    // "b" first, then "a": "a" sorts first and takes over as the active one.
    let mut b = client.subscribe(topic, "fo", opts("b")).await.unwrap();
    let mut a = client.subscribe(topic, "fo", opts("a")).await.unwrap();
    let p = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .unwrap();
    for i in 0..10 {
        p.send(format!("f{i}").as_str()).await.unwrap();
    }
    for i in 0..6 {
        let m = a
            .receive_timeout(WAIT)
            .await
            .unwrap()
            .expect("active gets it");
        assert_eq!(m.payload, format!("f{i}").as_bytes());
        if i < 3 {
            a.ack(&m).unwrap();
        }
    }
    assert!(
        b.receive_timeout(Duration::from_millis(1000))
            .await
            .unwrap()
            .is_none(),
        "the standby receives nothing"
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // acks are grouped
    a.close().await.unwrap();
    let mut got = Vec::new();
    while got.len() < 7 {
        let m = b.receive_timeout(WAIT).await.unwrap().expect("taken over");
        assert!(m.redelivery_count >= 1, "{m:?}");
        got.push(String::from_utf8(m.payload.to_vec()).unwrap());
        b.ack(&m).unwrap();
    }
    let want: Vec<String> = (3..10).map(|i| format!("f{i}")).collect();
    assert_eq!(got, want, "the unacknowledged rest, in order");

    // The notices, on a raw connection: each consumer learns whether it is
    // the active one when it joins and whenever that changes.
    let mut raw = tokio::net::TcpStream::connect(s.broker.local_addr)
        .await
        .unwrap();
    let mut out = BytesMut::new();
    let mut hello = base(Type::Connect);
    hello.connect = Some(CommandConnect {
        client_version: "raw".into(),
        protocol_version: Some(12),
        ..Default::default()
    });
    encode_command(&hello, &mut out);
    let subscribe = |consumer_id: u64, name: &str| {
        let mut c = base(Type::Subscribe);
        c.subscribe = Some(CommandSubscribe {
            topic: "failover-raw".into(),
            subscription: "fo".into(),
            sub_type: SubscriptionType::Failover as i32,
            consumer_id,
            request_id: consumer_id,
            consumer_name: Some(name.into()),
            ..Default::default()
        });
        c
    };
    encode_command(&subscribe(1, "y"), &mut out);
    raw.write_all(&out).await.unwrap();
    let mut inbuf = BytesMut::new();
    assert_eq!(
        active_notices(&mut raw, &mut inbuf, 1).await,
        vec![(1, true)]
    );
    let mut out = BytesMut::new();
    encode_command(&subscribe(2, "z"), &mut out);
    raw.write_all(&out).await.unwrap();
    assert_eq!(
        active_notices(&mut raw, &mut inbuf, 1).await,
        vec![(2, false)],
        "a standby joins: only it is told"
    );
    let mut out = BytesMut::new();
    encode_command(&subscribe(3, "x"), &mut out);
    raw.write_all(&out).await.unwrap();
    let mut notices = active_notices(&mut raw, &mut inbuf, 3).await;
    notices.sort();
    assert_eq!(
        notices,
        vec![(1, false), (2, false), (3, true)],
        "'x' sorts first: everyone is told"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_shared_keeps_each_key_on_one_consumer_in_order_across_a_leave() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let s = StandaloneSpec::new(dir.path()).start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "key-shared-topic";
    let ks = ConsumerOptions {
        sub_type: SubscriptionType::KeyShared,
        earliest: true,
        ..Default::default()
    };
    let mut a = client.subscribe(topic, "ks", ks.clone()).await.unwrap();
    let mut b = client.subscribe(topic, "ks", ks.clone()).await.unwrap();
    let p = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .unwrap();
    let keys = 16;
    for i in 0..160 {
        let msg = OutgoingMessage {
            payload: i.to_string().into_bytes().into(),
            key: Some(format!("k{}", i % keys)),
            properties: BTreeMap::new(),
            deliver_at_ms: None,
        };
        p.send(msg).await.unwrap();
    }
    // Each consumer takes what comes; b acknowledges nothing and leaves.
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while on_a.len() + on_b.len() < 160 {
        assert!(tokio::time::Instant::now() < deadline, "not all arrived");
        if let Some(m) = a.receive_timeout(Duration::from_millis(20)).await.unwrap() {
            a.ack(&m).unwrap();
            on_a.push(m);
        }
        if let Some(m) = b.receive_timeout(Duration::from_millis(20)).await.unwrap() {
            on_b.push(m);
        }
    }
    let key_of = |m: &magnetar_client::Message| m.key.clone().unwrap();
    let index = |m: &magnetar_client::Message| {
        String::from_utf8(m.payload.to_vec())
            .unwrap()
            .parse::<u32>()
            .unwrap()
    };
    assert!(!on_a.is_empty() && !on_b.is_empty(), "keys spread");
    let b_keys: std::collections::BTreeSet<String> = on_b.iter().map(key_of).collect();
    for m in &on_a {
        assert!(!b_keys.contains(&key_of(m)), "a key on both consumers");
    }
    b.close().await.unwrap();
    // b's keys come to a: its unacknowledged messages first, in order.
    let mut again = Vec::new();
    while again.len() < on_b.len() {
        let m = a.receive_timeout(WAIT).await.unwrap().expect("taken over");
        assert!(m.redelivery_count >= 1);
        a.ack(&m).unwrap();
        again.push(m);
    }
    for key in &b_keys {
        let before: Vec<u32> = on_b
            .iter()
            .filter(|m| &key_of(m) == key)
            .map(index)
            .collect();
        let after: Vec<u32> = again
            .iter()
            .filter(|m| &key_of(m) == key)
            .map(index)
            .collect();
        assert_eq!(before, after, "{key}: the same messages, in the same order");
    }
    // New messages of b's keys now go to a, after the redelivered ones.
    for i in 160..176 {
        let msg = OutgoingMessage {
            payload: i.to_string().into_bytes().into(),
            key: Some(format!("k{}", i % keys)),
            properties: BTreeMap::new(),
            deliver_at_ms: None,
        };
        p.send(msg).await.unwrap();
    }
    for i in 160..176 {
        let m = a.receive_timeout(WAIT).await.unwrap().expect("new ones");
        assert_eq!(index(&m), i);
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_wait_for_their_time_also_across_a_restart() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let topic = "delayed-topic";
    let shared = ConsumerOptions {
        sub_type: SubscriptionType::Shared,
        earliest: true,
        ..Default::default()
    };
    let due = now_ms() + 4_000;
    {
        let client = Client::connect(&s.service_url()).await.unwrap();
        let mut c = client
            .subscribe(topic, "work", shared.clone())
            .await
            .unwrap();
        let mut excl = client
            .subscribe(topic, "audit", earliest(SubscriptionType::Exclusive))
            .await
            .unwrap();
        let p = client
            .create_producer(topic, ProducerOptions::default())
            .await
            .unwrap();
        let delayed = OutgoingMessage {
            payload: "later".into(),
            deliver_at_ms: Some(due),
            ..Default::default()
        };
        p.send(delayed).await.unwrap();
        p.send("now").await.unwrap();
        let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
        assert_eq!(m.payload, b"now".as_slice(), "the undelayed one first");
        c.ack(&m).unwrap();
        assert!(
            c.receive_timeout(Duration::from_millis(500))
                .await
                .unwrap()
                .is_none(),
            "not before its time"
        );
        // Exclusive subscriptions are not delayed (as in Pulsar).
        let first = excl.receive_timeout(WAIT).await.unwrap().unwrap();
        assert_eq!(first.payload, b"later".as_slice());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    s.shutdown().await;
    let s = spec.start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let mut c = client.subscribe(topic, "work", shared).await.unwrap();
    let m = c
        .receive_timeout(Duration::from_secs(15))
        .await
        .unwrap()
        .expect("delivered after the restart");
    assert_eq!(m.payload, b"later".as_slice());
    assert!(now_ms() >= due, "{} ms early", due - now_ms());
    c.ack(&m).unwrap();
    s.shutdown().await;
}

/// The topic's delayed-delivery index is shared by its subscriptions and
/// spills to bucket ledgers past its memory limit (10 records here); across
/// a restart before anything is due, each of two Shared subscriptions gets
/// every delayed message once, none before its time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_index_spills_to_ledgers_is_shared_and_survives_a_restart() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let small = |c: &mut magnetar_broker::standalone::StandaloneConfig| {
        c.managed_ledger.delayed_index_memory_entries = 10;
    };
    let s = spec.start_with(small).await;
    let topic = "delayed-spill";
    let shared = ConsumerOptions {
        sub_type: SubscriptionType::Shared,
        earliest: true,
        ..Default::default()
    };
    const N: u64 = 60;
    let base = now_ms() + 6_000;
    let due = |i: u64| base + (i * 7 % N) * 50;
    let internal = format!(
        "http://127.0.0.1:{}/admin/v2/persistent/public/default/{topic}/internalStats",
        spec.http_port
    );
    {
        let client = Client::connect(&s.service_url()).await.unwrap();
        let mut subs = Vec::new();
        for name in ["a", "b"] {
            subs.push(client.subscribe(topic, name, shared.clone()).await.unwrap());
        }
        let p = client
            .create_producer(topic, ProducerOptions::default())
            .await
            .unwrap();
        for i in 0..N {
            let m = OutgoingMessage {
                payload: format!("d{i}").into_bytes().into(),
                deliver_at_ms: Some(due(i)),
                ..Default::default()
            };
            p.send(m).await.unwrap();
        }
        p.send("now").await.unwrap();
        for c in &mut subs {
            let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
            assert_eq!(m.payload, b"now".as_slice());
            c.ack_with_receipt(&m).await.unwrap();
        }
        let mut stats = serde_json::Value::Null;
        for _ in 0..50 {
            stats = reqwest::get(&internal).await.unwrap().json().await.unwrap();
            if stats["delayedIndex"]["buckets"].as_u64().unwrap_or(0) >= 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let index = &stats["delayedIndex"];
        assert_eq!(
            index["waiting"], N,
            "one record per message, not per subscription: {stats}"
        );
        assert!(index["buckets"].as_u64().unwrap() >= 5, "{stats}");
        assert!(index["inMemory"].as_u64().unwrap() <= 20, "{stats}");
    }
    s.shutdown().await;
    let s = spec.start_with(small).await;
    assert!(now_ms() < base, "restarted before anything was due");
    let client = Client::connect(&s.service_url()).await.unwrap();
    for name in ["a", "b"] {
        let mut c = client.subscribe(topic, name, shared.clone()).await.unwrap();
        let mut got = std::collections::BTreeSet::new();
        while (got.len() as u64) < N {
            let m = c
                .receive_timeout(Duration::from_secs(20))
                .await
                .unwrap()
                .expect("every delayed message comes");
            let i: u64 = std::str::from_utf8(&m.payload).unwrap()[1..]
                .parse()
                .unwrap();
            assert!(
                now_ms() >= due(i),
                "d{i} came {} ms early",
                due(i) - now_ms()
            );
            assert!(got.insert(i), "d{i} twice on {name}");
            c.ack(&m).unwrap();
        }
        assert!(
            c.receive_timeout(Duration::from_millis(800))
                .await
                .unwrap()
                .is_none(),
            "nothing more on {name}"
        );
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_managed_through_pulsars_rest_paths() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://public/default/rest-subs";
    let p = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .unwrap();
    for i in 0..10 {
        p.send(format!("m{i}").as_str()).await.unwrap();
    }
    let web = reqwest::Client::new();
    let base = format!(
        "http://127.0.0.1:{}/admin/v2/persistent/public/default/rest-subs",
        spec.http_port
    );
    let status = |r: reqwest::Response| r.status().as_u16();
    let at_earliest = r#"{"ledgerId":-1,"entryId":-1}"#;
    let put = |sub: &str| {
        web.put(format!("{base}/subscription/{sub}"))
            .body(at_earliest)
            .send()
    };
    assert_eq!(status(put("ops").await.unwrap()), 204);
    assert_eq!(status(put("ops").await.unwrap()), 409, "already exists");
    let list: Vec<String> = web
        .get(format!("{base}/subscriptions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list, vec!["ops".to_string()]);
    let post = |path: String| web.post(format!("{base}/subscription/{path}")).send();
    let first = |client: &Client| {
        let client = client.clone();
        async move {
            let mut c = client
                .subscribe(topic, "ops", earliest(SubscriptionType::Exclusive))
                .await
                .unwrap();
            let m = c
                .receive_timeout(Duration::from_millis(1500))
                .await
                .unwrap();
            c.close().await.unwrap();
            m.map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        }
    };
    assert_eq!(status(post("ops/skip/3".into()).await.unwrap()), 204);
    assert_eq!(first(&client).await.as_deref(), Some("m3"), "three skipped");
    assert_eq!(status(post("ops/resetcursor/0".into()).await.unwrap()), 204);
    assert_eq!(
        first(&client).await.as_deref(),
        Some("m0"),
        "reset to the start"
    );
    assert_eq!(status(post("ops/skip_all".into()).await.unwrap()), 204);
    assert_eq!(first(&client).await, None, "backlog cleared");
    let r = web
        .post(format!("{base}/subscription/ops/resetcursor"))
        .body(at_earliest)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(status(r), 204);
    assert_eq!(
        status(post("ops/expireMessages/0".into()).await.unwrap()),
        204
    );
    assert_eq!(
        first(&client).await,
        None,
        "everything published before now expired"
    );
    assert_eq!(status(post("nope/skip/1".into()).await.unwrap()), 404);
    // Deleting: refused while a consumer is connected, unless forced.
    let _c = client
        .subscribe(topic, "ops", earliest(SubscriptionType::Exclusive))
        .await
        .unwrap();
    let del = |q: &str| web.delete(format!("{base}/subscription/ops{q}")).send();
    assert_eq!(status(del("").await.unwrap()), 412);
    assert_eq!(status(del("?force=true").await.unwrap()), 204);
    let list: Vec<String> = web
        .get(format!("{base}/subscriptions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(list.is_empty(), "{list:?}");
    s.shutdown().await;
}

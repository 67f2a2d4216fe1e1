//! The Rust SDK end to end against an in-process standalone: the builders,
//! consumers as Streams, partitioned topics routed by key the way the Java
//! client routes them, several topics under one subscription, every
//! compression codec, negative acks, the ack timeout, readers and the
//! producer's bounded queue.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt;
use magnetar_client::{
    Client, Compression, DeadLetterPolicy, Error, HashingScheme, InitialPosition, JsonSchema,
    MessageId, OutgoingMessage, Schema, SubscriptionType,
};
use magnetar_tests::{init_logs, StandaloneSpec};

const WAIT: Duration = Duration::from_secs(10);

async fn partitioned(spec: &StandaloneSpec, topic: &str, n: u32) {
    let url = format!(
        "http://127.0.0.1:{}/admin/v2/persistent/public/default/{topic}/partitions",
        spec.http_port
    );
    let r = reqwest::Client::new()
        .put(url)
        .header("content-type", "application/json")
        .body(n.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
}

fn keyed(key: &str, value: String) -> OutgoingMessage {
    OutgoingMessage {
        payload: value.into_bytes().into(),
        key: Some(key.to_string()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_topics_route_keys_like_java_and_consumers_stream_every_partition() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    partitioned(&spec, "orders", 4).await;
    let client = Client::builder(s.service_url())
        .operation_timeout(Duration::from_secs(20))
        .build()
        .await
        .unwrap();
    let topic = "persistent://public/default/orders";
    let mut consumer = client
        .consumer()
        .topic(topic)
        .subscription("all")
        .subscription_type(SubscriptionType::Failover)
        .initial_position(InitialPosition::Earliest)
        .subscribe()
        .await
        .unwrap();
    assert_eq!(consumer.topics().len(), 4);
    for scheme in [HashingScheme::JavaStringHash, HashingScheme::Murmur3_32Hash] {
        let producer = client
            .producer(topic)
            .hashing_scheme(scheme)
            .batched()
            .create()
            .await
            .unwrap();
        assert_eq!(producer.partitions(), 4);
        let mut receipts = Vec::new();
        for i in 0..200 {
            let key = format!("k{}", i % 20);
            receipts.push((
                key.clone(),
                producer.send_async(keyed(&key, format!("{scheme:?}-{i}"))),
            ));
        }
        producer.flush();
        for (key, r) in receipts {
            let id = r.await.unwrap();
            assert_eq!(id.partition as u32, scheme.hash(&key) % 4, "{key}");
        }
        producer.close().await.unwrap();
        // Keyless messages go round every partition (unbatched: one each).
        let round = client.producer(topic).create().await.unwrap();
        let mut per_partition = BTreeMap::new();
        for i in 0..8 {
            let id = round.send(format!("{scheme:?}-nokey-{i}")).await.unwrap();
            *per_partition.entry(id.partition).or_insert(0) += 1;
        }
        assert_eq!(per_partition.into_values().collect::<Vec<_>>(), vec![2; 4]);
        round.close().await.unwrap();

        // The consumer streams all four partitions: every message once, each
        // key in order, each from the partition its hash names.
        let mut last: HashMap<String, usize> = HashMap::new();
        let mut got = 0;
        while got < 208 {
            let m = tokio::time::timeout(WAIT, consumer.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            got += 1;
            assert!(m.topic.starts_with(&format!("{topic}-partition-")));
            assert_eq!(
                m.topic.rsplit('-').next().unwrap(),
                m.id.partition.to_string()
            );
            let value = String::from_utf8(m.payload.to_vec()).unwrap();
            if let Some(key) = m.key.clone() {
                assert_eq!(m.id.partition as u32, scheme.hash(&key) % 4);
                let seq: usize = value.rsplit('-').next().unwrap().parse().unwrap();
                if let Some(prev) = last.insert(key.clone(), seq) {
                    assert!(prev < seq, "{key}: {prev} then {seq}");
                }
            }
            consumer.ack(&m).unwrap();
        }
        assert!(consumer
            .receive_timeout(Duration::from_millis(300))
            .await
            .unwrap()
            .is_none());
    }
    assert_eq!(consumer.last_message_ids().await.unwrap().len(), 4);
    consumer.close().await.unwrap();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codec_batched_or_not_and_several_topics_under_one_subscription() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let codecs = [
        Compression::None,
        Compression::Lz4,
        Compression::Zlib,
        Compression::Zstd,
        Compression::Snappy,
    ];
    let topics: Vec<String> = codecs
        .iter()
        .map(|c| format!("persistent://public/default/codec-{c:?}").to_lowercase())
        .collect();
    let mut consumer = client
        .consumer()
        .topics(topics.clone())
        .subscription("codecs")
        .subscription_type(SubscriptionType::Shared)
        .initial_position(InitialPosition::Earliest)
        .subscribe()
        .await
        .unwrap();
    // Compressible payloads, big enough that every codec shrinks them.
    let body = |i: usize| format!("{i:04}-").repeat(300);
    let mut expected = BTreeMap::new();
    for (codec, topic) in codecs.iter().zip(&topics) {
        for batched in [false, true] {
            let mut b = client.producer(topic).compression(*codec);
            if batched {
                b = b.batched();
            }
            let p = b.create().await.unwrap();
            let mut receipts = Vec::new();
            for i in 0..20 {
                let mut m = keyed("k", body(i));
                m.properties.insert("codec".into(), format!("{codec:?}"));
                receipts.push(p.send_async(m));
            }
            p.flush();
            for r in receipts {
                r.await.unwrap();
            }
            p.close().await.unwrap();
            *expected.entry(topic.clone()).or_insert(0) += 20;
        }
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..expected.values().sum::<usize>() {
        let m = consumer.receive_timeout(WAIT).await.unwrap().unwrap();
        let i: usize = String::from_utf8_lossy(&m.payload[..4]).parse().unwrap();
        assert_eq!(m.payload, body(i).as_bytes(), "inflated intact");
        assert_eq!(m.key.as_deref(), Some("k"));
        assert!(m.topic.contains(&m.properties["codec"].to_lowercase()));
        *seen.entry(m.topic.to_string()).or_insert(0) += 1;
        consumer.ack(&m).unwrap();
    }
    assert_eq!(seen, expected);
    // Stored compressed: every codec's topic takes a fraction of the space.
    let web = reqwest::Client::new();
    let mut sizes = Vec::new();
    for t in &topics {
        let name = t.rsplit('/').next().unwrap();
        let url = format!(
            "http://127.0.0.1:{}/admin/v2/persistent/public/default/{name}/stats",
            spec.http_port
        );
        let v: serde_json::Value = web.get(url).send().await.unwrap().json().await.unwrap();
        sizes.push(v["storageSize"].as_u64().unwrap());
    }
    for (codec, size) in codecs.iter().zip(&sizes).skip(1) {
        assert!(*size * 3 < sizes[0], "{codec:?}: {size} vs {}", sizes[0]);
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_and_timed_out_messages_come_again_with_a_higher_count() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://public/default/again";
    let mut consumer = client
        .consumer()
        .topic(topic)
        .subscription("s")
        .subscription_type(SubscriptionType::Shared)
        .nack_redelivery_delay(Duration::from_millis(300))
        .ack_timeout(Duration::from_millis(1500))
        .subscribe()
        .await
        .unwrap();
    let p = client.producer(topic).create().await.unwrap();
    for v in ["nack-me", "forget-me", "ack-me"] {
        p.send(v).await.unwrap();
    }
    let mut first = BTreeMap::new();
    for _ in 0..3 {
        let m = consumer.receive_timeout(WAIT).await.unwrap().unwrap();
        assert_eq!(m.redelivery_count, 0);
        first.insert(String::from_utf8(m.payload.to_vec()).unwrap(), m);
    }
    let t0 = std::time::Instant::now();
    consumer.nack(&first["nack-me"]).unwrap();
    consumer.ack(&first["ack-me"]).unwrap();
    // The nack comes back after its delay, the forgotten one after the ack
    // timeout, the acked one never.
    let m = consumer.receive_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(&m.payload[..], b"nack-me");
    assert_eq!(m.redelivery_count, 1);
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    consumer.ack(&m).unwrap();
    let m = consumer.receive_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(&m.payload[..], b"forget-me");
    assert_eq!(m.redelivery_count, 1);
    assert!(
        t0.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        t0.elapsed()
    );
    consumer.ack(&m).unwrap();
    assert!(consumer
        .receive_timeout(Duration::from_millis(2500))
        .await
        .unwrap()
        .is_none());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_start_where_told_and_know_what_is_left() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://public/default/replay";
    let p = client.producer(topic).create().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(p.send(format!("single-{i}").as_str()).await.unwrap());
    }
    let b = client.producer(topic).batched().create().await.unwrap();
    let batch: Vec<_> = (0..5)
        .map(|i| b.send_async(format!("batched-{i}").as_str()))
        .collect();
    b.flush();
    for r in batch {
        ids.push(r.await.unwrap());
    }
    let values = |from: usize| -> Vec<String> {
        (from..10)
            .map(|i| {
                if i < 5 {
                    format!("single-{i}")
                } else {
                    format!("batched-{}", i - 5)
                }
            })
            .collect()
    };
    async fn read_all(r: &mut magnetar_client::Reader) -> Vec<String> {
        let mut out = Vec::new();
        while r.has_message_available().await.unwrap() {
            let m = r.next_timeout(WAIT).await.unwrap().unwrap();
            out.push(String::from_utf8(m.payload.to_vec()).unwrap());
        }
        out
    }
    let cases = [
        (MessageId::EARLIEST, false, values(0)),
        (ids[2], false, values(3)),
        (ids[2], true, values(2)),
        (ids[7], false, values(8)),
        (ids[7], true, values(7)),
        (MessageId::LATEST, false, vec![]),
    ];
    for (start, inclusive, expected) in cases {
        let mut r = client
            .reader(topic)
            .start_message_id(start)
            .start_message_id_inclusive(inclusive)
            .create()
            .await
            .unwrap();
        assert_eq!(
            read_all(&mut r).await,
            expected,
            "{start} inclusive {inclusive}"
        );
        assert!(!r.has_message_available().await.unwrap());
        r.close().await.unwrap();
    }
    // A reader at the end sees what comes next, as a Stream.
    let mut r = client
        .reader(topic)
        .start_message_id(MessageId::LATEST)
        .create()
        .await
        .unwrap();
    p.send("later").await.unwrap();
    let m = tokio::time::timeout(WAIT, r.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&m.payload[..], b"later");
    // Seek back: from that message on again.
    r.seek(ids[9]).await.unwrap();
    let m = r.next_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(&m.payload[..], b"batched-4");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_queue_and_bad_settings_are_clear_errors() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://public/default/bounded";
    let p = client
        .producer(topic)
        .batching(100, 1 << 20, Duration::from_secs(30))
        .max_pending_messages(3)
        .create()
        .await
        .unwrap();
    let kept: Vec<_> = (0..3)
        .map(|i| p.send_async(format!("m{i}").as_str()))
        .collect();
    let e = p.send_async("one too many").await.unwrap_err();
    assert!(matches!(e, Error::ProducerQueueFull), "{e}");
    assert!(e.is_retriable());
    p.flush();
    for r in kept {
        r.await.unwrap();
    }
    p.send("room again").await.unwrap();
    let e = client
        .consumer()
        .topic(topic)
        .subscribe()
        .await
        .err()
        .unwrap();
    assert!(matches!(e, Error::Config(_)), "{e}");
    let e = client
        .reader("persistent://no-such-tenant/ns/t")
        .create()
        .await
        .err()
        .unwrap();
    assert!(!e.is_retriable(), "{e}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_dead_letter_and_retry_topics() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://public/default/work";
    let mut dlq = client
        .consumer()
        .topic(format!("{topic}-s-DLQ"))
        .subscription("inspect")
        .initial_position(InitialPosition::Earliest)
        .subscribe()
        .await
        .unwrap();
    let mut policy = DeadLetterPolicy::new(2);
    policy.retry_enabled = true;
    let mut c = client
        .consumer()
        .topic(topic)
        .subscription("s")
        .subscription_type(SubscriptionType::Shared)
        .nack_redelivery_delay(Duration::from_millis(100))
        .dead_letter_policy(policy)
        .subscribe()
        .await
        .unwrap();
    assert_eq!(c.topics().len(), 2, "the retry topic too");
    let p = client.producer(topic).create().await.unwrap();
    let mut poison = OutgoingMessage::from("poison");
    poison.properties.insert("app".into(), "x".into());
    let poison_id = p.send(poison).await.unwrap();
    // Delivered max + 1 = 3 times, nacked each time, then dead-lettered.
    for count in 0..3 {
        let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
        assert_eq!(
            (&m.payload[..], m.redelivery_count),
            (&b"poison"[..], count)
        );
        c.nack(&m).unwrap();
    }
    let d = dlq.receive_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(&d.payload[..], b"poison");
    assert_eq!(d.properties["REAL_TOPIC"], topic);
    assert_eq!(d.properties["ORIGIN_MESSAGE_ID"], poison_id.to_string());
    assert_eq!(d.properties["app"], "x");
    dlq.ack(&d).unwrap();
    assert!(c
        .receive_timeout(Duration::from_millis(800))
        .await
        .unwrap()
        .is_none());

    // Retried twice through the retry topic, then dead-lettered.
    p.send("later").await.unwrap();
    let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
    assert!(!m.properties.contains_key("RECONSUMETIMES"));
    let t0 = std::time::Instant::now();
    c.reconsume_later(&m, Duration::from_millis(500))
        .await
        .unwrap();
    for times in 1..=2 {
        let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
        assert_eq!(&m.payload[..], b"later");
        assert_eq!(m.properties["RECONSUMETIMES"], times.to_string());
        assert_eq!(m.properties["REAL_TOPIC"], topic);
        assert!(m.topic.ends_with("-s-RETRY"), "{}", m.topic);
        assert!(t0.elapsed() >= Duration::from_millis(450 * times as u64));
        c.reconsume_later(&m, Duration::from_millis(500))
            .await
            .unwrap();
    }
    let d = dlq.receive_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(&d.payload[..], b"later");
    assert_eq!(d.properties["REAL_TOPIC"], topic);
    assert!(c
        .receive_timeout(Duration::from_millis(1500))
        .await
        .unwrap()
        .is_none());
    // Retry needs a subscription that delays messages.
    let mut bad = DeadLetterPolicy::new(1);
    bad.retry_enabled = true;
    let e = client
        .consumer()
        .topic(topic)
        .subscription("x")
        .dead_letter_policy(bad)
        .subscribe()
        .await
        .err()
        .unwrap();
    assert!(matches!(e, Error::Config(_)), "{e}");
    s.shutdown().await;
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Reading {
    sensor: String,
    value: f64,
}

impl JsonSchema for Reading {
    fn definition() -> String {
        r#"{"type":"record","name":"Reading","fields":[
            {"name":"sensor","type":"string"},{"name":"value","type":"double"}]}"#
            .into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_json_with_a_registered_schema() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://public/default/readings";
    let mut c = client
        .consumer()
        .topic(topic)
        .subscription("s")
        .subscription_type(SubscriptionType::Shared)
        .nack_redelivery_delay(Duration::from_millis(100))
        .subscribe_typed::<Reading>()
        .await
        .unwrap();
    let p = client
        .producer(topic)
        .create_typed::<Reading>()
        .await
        .unwrap();
    let r = Reading {
        sensor: "t1".into(),
        value: 21.5,
    };
    let mut m = p.message(&r).unwrap();
    m.key = Some("t1".into());
    p.send_message(m).await.unwrap();
    let got = c.receive_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(got.value, r);
    assert_eq!(got.message.key.as_deref(), Some("t1"));
    c.ack(&got).unwrap();
    // The registry has it: a producer with an incompatible schema is refused.
    let e = client
        .producer(topic)
        .schema(Schema::json(
            r#"{"type":"record","name":"Reading","fields":[{"name":"sensor","type":"long"}]}"#,
        ))
        .create()
        .await
        .err()
        .unwrap();
    assert_eq!(
        e.server_error(),
        Some(magnetar_proto::pulsar::ServerError::IncompatibleSchema),
        "{e}"
    );
    // A payload that is not a Reading: a schema error, and it comes again
    // (nacked) rather than being lost.
    let raw = client
        .producer(topic)
        .schema(Reading::schema())
        .create()
        .await
        .unwrap();
    raw.send("not json").await.unwrap();
    let e = c.receive_timeout(WAIT).await.err().unwrap();
    assert!(matches!(e, Error::Schema(_)), "{e}");
    let again = c.consumer().receive_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(&again.payload[..], b"not json");
    assert_eq!(again.redelivery_count, 1);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_above_the_maximum_go_in_chunks_and_come_back_whole() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://public/default/big";
    let mut c = client
        .consumer()
        .topic(topic)
        .subscription("s")
        .subscription_type(SubscriptionType::Shared)
        .receiver_queue_size(4)
        .subscribe()
        .await
        .unwrap();
    // 12 MiB: above the broker's 5 MiB maximum.
    let big: Vec<u8> = (0..12 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let plain = client.producer(topic).create().await.unwrap();
    let e = plain.send(big.clone()).await.unwrap_err();
    assert!(matches!(e, Error::MessageTooBig { .. }), "{e}");
    let chunked = client
        .producer(topic)
        .chunking(true)
        .create()
        .await
        .unwrap();
    let mut m = OutgoingMessage::from(big.clone());
    m.key = Some("k".into());
    m.properties.insert("p".into(), "v".into());
    chunked.send(m).await.unwrap();
    // Small chunks, compressed, interleaved with plain messages of others.
    let small = client
        .producer(topic)
        .chunk_max_size(1000)
        .compression(Compression::Zstd)
        .create()
        .await
        .unwrap();
    let text = "chunk me ".repeat(20_000); // 180 kB, ~1 kB compressed: 1-2 chunks
                                           // Barely compressible: ~30 chunks.
    let mut x = 0x2545_f491_u32;
    let noise: Vec<u8> = (0..30_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let r1 = small.send_async(text.clone());
    let r2 = plain.send_async("between");
    let r3 = small.send_async(noise.clone());
    for r in [r1, r2, r3] {
        r.await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
        c.ack(&m).unwrap();
        got.push(m);
    }
    assert_eq!(got[0].payload.len(), big.len());
    assert!(got[0].payload == big, "the big one, whole");
    assert_eq!(got[0].key.as_deref(), Some("k"));
    assert_eq!(got[0].properties["p"], "v");
    let rest: Vec<&[u8]> = got[1..].iter().map(|m| &m.payload[..]).collect();
    assert!(rest.contains(&text.as_bytes()));
    assert!(rest.contains(&&b"between"[..]));
    assert!(rest.contains(&&noise[..]));
    // Every chunk acknowledged: nothing left in the backlog.
    let url = format!(
        "http://127.0.0.1:{}/admin/v2/persistent/public/default/big/stats",
        spec.http_port
    );
    let mut backlog = u64::MAX;
    for _ in 0..50 {
        let v: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        backlog = v["subscriptions"]["s"]["msgBacklog"].as_u64().unwrap();
        if backlog == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(backlog, 0);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_key_based_batches_and_nack_backoff() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    // The memory limit is the client's, across its producers.
    let client = Client::builder(s.service_url())
        .memory_limit_bytes(10_000)
        .build()
        .await
        .unwrap();
    let topic = "persistent://public/default/limits";
    let slow = || {
        client
            .producer(topic)
            .batching(100, 1 << 20, Duration::from_secs(30))
            .create()
    };
    let (a, b) = (slow().await.unwrap(), slow().await.unwrap());
    let held = vec![
        a.send_async(vec![1u8; 3000]),
        b.send_async(vec![2u8; 3000]),
        a.send_async(vec![3u8; 3000]),
    ];
    let e = b.send_async(vec![4u8; 3000]).await.unwrap_err();
    assert!(matches!(e, Error::ProducerQueueFull), "{e}");
    a.flush();
    b.flush();
    for r in held {
        r.await.unwrap();
    }
    b.send(vec![4u8; 3000]).await.unwrap();

    // Key-based batching: one key per batch, the batch carrying it.
    let topic = "persistent://public/default/by-key";
    let mut c = client
        .consumer()
        .topic(topic)
        .subscription("s")
        .subscription_type(SubscriptionType::Shared)
        .nack_backoff(Duration::from_millis(200), Duration::from_millis(500))
        .subscribe()
        .await
        .unwrap();
    let p = client
        .producer(topic)
        .batching(100, 1 << 20, Duration::from_secs(30))
        .batching_type(magnetar_client::BatchingType::KeyBased)
        .create()
        .await
        .unwrap();
    let receipts: Vec<_> = (0..12)
        .map(|i| p.send_async(keyed(["a", "b", "c"][i % 3], format!("{i}"))))
        .collect();
    p.flush();
    for r in receipts {
        r.await.unwrap();
    }
    let mut entries: BTreeMap<(u64, u64), Vec<(String, usize)>> = BTreeMap::new();
    let mut first = None;
    for _ in 0..12 {
        let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
        let v: usize = String::from_utf8_lossy(&m.payload).parse().unwrap();
        entries
            .entry((m.id.ledger_id, m.id.entry_id))
            .or_default()
            .push((m.key.clone().unwrap(), v));
        if v == 0 {
            first = Some(m);
        } else {
            c.ack(&m).unwrap();
        }
    }
    assert_eq!(entries.len(), 3, "{entries:?}");
    for msgs in entries.values() {
        assert_eq!(msgs.len(), 4);
        assert!(msgs.iter().all(|(k, _)| *k == msgs[0].0), "{msgs:?}");
        assert!(msgs.windows(2).all(|w| w[0].1 < w[1].1), "in order");
    }

    // Nack back-off: 200 ms, then 400 ms, then 500 ms (the most).
    let mut m = first.unwrap();
    for (count, expected) in [(0u32, 200u64), (1, 400), (2, 500)] {
        assert_eq!(m.redelivery_count, count);
        let t = std::time::Instant::now();
        c.nack(&m).unwrap();
        loop {
            let again = c.receive_timeout(WAIT).await.unwrap().unwrap();
            if again.payload[..] == b"0"[..] {
                m = again;
                break;
            }
            // The rest of its batch comes along (redelivered whole).
            c.ack(&again).unwrap();
        }
        let took = t.elapsed().as_millis() as u64;
        assert!(took >= expected * 9 / 10, "{count}: {took} ms");
        assert!(took < expected + 1500, "{count}: {took} ms");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_subscription_reads_matching_topics_and_finds_new_ones() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let ns = "persistent://public/default";
    for t in ["metrics-cpu", "metrics-disk", "logs-app"] {
        client
            .producer(format!("{ns}/{t}"))
            .create()
            .await
            .unwrap()
            .send("before")
            .await
            .unwrap();
    }
    let mut c = client
        .consumer()
        .topics_pattern("metrics-.*")
        .pattern_auto_discovery_period(Duration::from_millis(300))
        .subscription("all-metrics")
        .initial_position(InitialPosition::Earliest)
        .subscribe()
        .await
        .unwrap();
    let mut topics = c.topics();
    topics.sort();
    assert_eq!(
        topics,
        vec![format!("{ns}/metrics-cpu"), format!("{ns}/metrics-disk")]
    );
    for _ in 0..2 {
        let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
        assert!(m.topic.contains("/metrics-"), "{}", m.topic);
        c.ack(&m).unwrap();
    }
    // A new matching topic is found and read; a new other one is not.
    client
        .producer(format!("{ns}/logs-db"))
        .create()
        .await
        .unwrap()
        .send("not for us")
        .await
        .unwrap();
    client
        .producer(format!("{ns}/metrics-net"))
        .create()
        .await
        .unwrap()
        .send("new")
        .await
        .unwrap();
    let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(&*m.topic, format!("{ns}/metrics-net"));
    assert_eq!(&m.payload[..], b"new");
    c.ack(&m).unwrap();
    assert_eq!(c.topics().len(), 3);
    assert!(c
        .receive_timeout(Duration::from_millis(800))
        .await
        .unwrap()
        .is_none());
    // Bad patterns are configuration errors.
    for bad in ["metrics-(", "tenant/metrics-.*"] {
        let e = client
            .consumer()
            .topics_pattern(bad)
            .subscription("x")
            .subscribe()
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::Config(_)), "{bad}: {e}");
    }
    c.close().await.unwrap();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_when_a_client_connects() {
    use magnetar_proto::token::SecretKey;
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("secret.key");
    std::fs::write(&key_path, SecretKey::generate().unwrap()).unwrap();
    let key = SecretKey::load(&key_path).unwrap();
    let spec = StandaloneSpec::new(&dir.path().join("data"));
    let s = spec
        .start_with(|c| c.auth_token_secret_key = Some(key_path.clone()))
        .await;
    let url = s.service_url();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let refused = |e: Error| {
        assert_eq!(
            e.server_error(),
            Some(magnetar_proto::pulsar::ServerError::AuthenticationError),
            "{e}"
        );
        assert!(!e.is_retriable(), "{e}");
    };
    // No token, another key's token, an expired one, garbage: refused.
    refused(Client::connect(&url).await.err().unwrap());
    let other = SecretKey::from_bytes(b"not the cluster's key").sign("app", None);
    for token in [other, key.sign("app", Some(now - 1)), "garbage".to_string()] {
        let e = Client::builder(&url)
            .auth_token(token)
            .build()
            .await
            .err()
            .unwrap();
        refused(e);
    }
    // A good one works end to end.
    let client = Client::builder(&url)
        .auth_token(key.sign("app", Some(now + 3600)))
        .build()
        .await
        .unwrap();
    let topic = "persistent://public/default/secured";
    let mut c = client
        .consumer()
        .topic(topic)
        .subscription("s")
        .subscribe()
        .await
        .unwrap();
    client
        .producer(topic)
        .create()
        .await
        .unwrap()
        .send("let in")
        .await
        .unwrap();
    let m = c.receive_timeout(WAIT).await.unwrap().unwrap();
    assert_eq!(&m.payload[..], b"let in");
    s.shutdown().await;
}

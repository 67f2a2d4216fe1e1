//! `magnetar standalone` as a real process: kill -9 while producing loses no
//! acknowledged message — a subscription made before the crash receives every
//! acknowledged message after the restart, in per-key order.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use magnetar_client::{
    Client, ConsumerOptions, OutgoingMessage, ProducerOptions, SubscriptionType,
};
use magnetar_tests::{init_logs, Process, QueueChecker, StandaloneSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_produce_loses_no_acknowledged_message() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(&dir.path().join("node"));
    let mut proc = Process::start(&spec);
    proc.wait_ready(Duration::from_secs(30)).await;
    let topic = "kill9-topic";
    let mut checker = QueueChecker::default();
    {
        let client = Client::connect(&spec.service_url()).await.unwrap();
        // The subscription exists before the crash, so it must see everything.
        let c = client
            .subscribe(
                topic,
                "checker",
                ConsumerOptions {
                    sub_type: SubscriptionType::Exclusive,
                    earliest: true,
                    receiver_queue: 10,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        drop(c);
        let producer = client
            .create_producer(
                topic,
                ProducerOptions {
                    batching: true,
                    batch_delay_ms: 2,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let mut inflight = Vec::new();
        for i in 0..3000u64 {
            let (value, key) = (format!("msg-{i}"), format!("k{}", i % 4));
            let msg = OutgoingMessage {
                payload: value.clone().into_bytes().into(),
                key: Some(key.clone()),
                ..Default::default()
            };
            inflight.push((value, key, i, producer.send_async(msg)));
            if i == 1000 {
                // What was sent so far is acknowledged before the crash (a
                // fixed pause was not always enough: the first adds wait
                // while the new bookie connection probes its path MTU).
                producer.flush();
                checker
                    .settle(std::mem::take(&mut inflight), Duration::from_secs(20))
                    .await;
            }
            if i == 2000 {
                // Crash in the middle of the stream, with sends in flight.
                producer.flush();
                tokio::time::sleep(Duration::from_millis(20)).await;
                proc.kill9();
            }
            if i % 100 == 0 {
                tokio::task::yield_now().await;
            }
        }
        producer.flush();
        // The producer would resend these once a broker is back; with none,
        // their outcome stays unknown.
        checker.settle(inflight, Duration::from_secs(3)).await;
    }
    let acked = checker.verdict().acked;
    assert!(
        acked > 0,
        "some messages were acknowledged before the crash"
    );
    let proc = Process::start(&spec);
    proc.wait_ready(Duration::from_secs(30)).await;
    let client = Client::connect(&spec.service_url()).await.unwrap();
    let mut c = client
        .subscribe(
            topic,
            "checker",
            ConsumerOptions {
                sub_type: SubscriptionType::Exclusive,
                earliest: true,
                receiver_queue: 1000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    checker.drain(&mut c, Duration::from_secs(3)).await;
    let v = checker.verdict();
    println!("kill -9 run: {v}");
    assert!(v.ok(), "{v:?}");
    drop(proc);
}

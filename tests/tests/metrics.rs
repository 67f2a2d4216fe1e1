//! `/metrics`, `/ready` and `/live` of an in-process standalone and cluster:
//! the exposition passes a strict reader, a topic with traffic carries the
//! right counts under Pulsar's names, histograms have buckets, the
//! topic-level switch folds topics into namespaces, and readiness turns
//! off when a node cannot serve — a broker without its lease, a read-only
//! bookie, a metadata node cut from its majority.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use magnetar_client::{Client, InitialPosition};
use magnetar_tests::cluster::InProcessCluster;
use magnetar_tests::{init_logs, prometheus, StandaloneSpec};

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn scrape(http_port: u16) -> prometheus::Exposition {
    let (status, body) = get(&format!("http://127.0.0.1:{http_port}/metrics")).await;
    assert_eq!(status, 200);
    prometheus::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

async fn traffic(client: &Client, topic: &str, n: usize) {
    let mut consumer = client
        .consumer()
        .topic(topic)
        .subscription("watch")
        .initial_position(InitialPosition::Earliest)
        .subscribe()
        .await
        .unwrap();
    let producer = client.producer(topic).create().await.unwrap();
    for i in 0..n {
        producer.send(vec![b'x'; 100 + i]).await.unwrap();
    }
    for _ in 0..n {
        let m = tokio::time::timeout(Duration::from_secs(10), consumer.receive())
            .await
            .unwrap()
            .unwrap();
        consumer.ack(&m).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_metrics_carry_pulsar_names_and_counts_and_histograms_have_buckets() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://public/default/measured";
    traffic(&client, topic, 10).await;
    let x = scrape(spec.http_port).await;
    let t = [
        ("topic", topic),
        ("namespace", "public/default"),
        ("cluster", "magnetar"),
    ];
    let one = |name: &str| {
        let found = x.find(name, &t);
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        found[0].value
    };
    assert_eq!(x.types["pulsar_in_messages_total"], "counter");
    assert_eq!(one("pulsar_in_messages_total"), 10.0);
    assert_eq!(one("pulsar_out_messages_total"), 10.0);
    let bytes: usize = (0..10).map(|i| 100 + i).sum();
    assert!(one("pulsar_in_bytes_total") >= bytes as f64);
    assert_eq!(one("pulsar_producers_count"), 1.0);
    assert_eq!(one("pulsar_consumers_count"), 1.0);
    assert_eq!(one("pulsar_subscriptions_count"), 1.0);
    assert_eq!(one("pulsar_msg_backlog"), 0.0);
    assert!(one("pulsar_storage_size") >= bytes as f64);
    let sub = x.find(
        "pulsar_subscription_back_log",
        &[("topic", topic), ("subscription", "watch")],
    );
    assert_eq!(sub.len(), 1);
    assert_eq!(
        x.find("pulsar_topics_count", &[("namespace", "public/default")])
            .len(),
        1
    );
    // Our own families: histograms with buckets, counted.
    for h in [
        "magnetar_broker_publish_latency_seconds",
        "magnetar_ledger_add_seconds",
        "magnetar_bookie_journal_sync_seconds",
        "magnetar_bookie_journal_group_entries",
        "magnetar_broker_delivery_lag_seconds",
    ] {
        assert_eq!(x.types.get(h).map(String::as_str), Some("histogram"), "{h}");
        let count = x.samples[h]
            .iter()
            .find(|s| s.name.ends_with("_count"))
            .unwrap();
        assert!(count.value >= 10.0, "{h}: {count:?}");
        assert!(
            x.samples[h]
                .iter()
                .filter(|s| s.name.ends_with("_bucket"))
                .count()
                > 5
        );
    }
    for g in [
        "magnetar_broker_lease_held",
        "magnetar_broker_connections",
        "magnetar_metadata_raft_term",
        "magnetar_bookie_disk_usage_ratio",
    ] {
        assert!(x.samples.contains_key(g), "{g} missing");
    }
    assert_eq!(x.find("magnetar_broker_lease_held", &[])[0].value, 1.0);
    // An error sent to a client is counted by its name.
    let bad = Client::connect(&s.service_url()).await.unwrap();
    assert!(bad
        .producer("persistent://no-such/ns/t")
        .create()
        .await
        .is_err());
    let x = scrape(spec.http_port).await;
    assert!(!x.find("magnetar_broker_errors_total", &[]).is_empty());
    for path in [
        "/live",
        "/ready",
        "/admin/v2/brokers/ready",
        "/admin/v2/brokers/health",
    ] {
        let (status, body) = get(&format!("http://127.0.0.1:{}{path}", spec.http_port)).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_topic_level_metrics_topics_fold_into_their_namespace() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec
        .start_with(|c| c.expose_topic_level_metrics_in_prometheus = false)
        .await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    traffic(&client, "persistent://public/default/a", 3).await;
    traffic(&client, "persistent://public/default/b", 4).await;
    let x = scrape(spec.http_port).await;
    let ns = x.find(
        "pulsar_in_messages_total",
        &[("namespace", "public/default")],
    );
    assert_eq!(ns.len(), 1, "{ns:?}");
    assert!(!ns[0].labels.contains_key("topic"));
    assert_eq!(ns[0].value, 7.0);
    assert!(x.find("pulsar_subscription_back_log", &[]).is_empty());
    assert_eq!(
        x.find("pulsar_topics_count", &[("namespace", "public/default")])[0].value,
        2.0
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_its_lease_is_not_ready() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let ready = format!("http://127.0.0.1:{}/ready", spec.http_port);
    assert_eq!(get(&ready).await.0, 200);
    // The metadata service goes away: keep-alives fail, the lease lapses.
    s.metadata_node.shutdown().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get(&ready).await;
        if status == 503 {
            assert!(body.contains("lease"), "{body}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = get(&format!(
        "http://127.0.0.1:{}/admin/v2/brokers/health",
        spec.http_port
    ))
    .await;
    assert_eq!(status, 503);
    assert_eq!(
        get(&format!("http://127.0.0.1:{}/live", spec.http_port))
            .await
            .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_bookies_and_metadata_nodes_without_a_majority_are_not_ready() {
    init_logs();
    let cluster = InProcessCluster::start(3, 1, 0, (1, 1, 1)).await;
    let bookie = cluster.bookies[0].clone();
    assert_eq!(bookie.is_ready(), Ok(()));
    bookie.set_disk_usage_override(Some(0.999));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while bookie.is_ready().is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "bookie still ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(bookie.is_ready().unwrap_err().contains("read-only"));
    bookie.set_disk_usage_override(None);

    let nodes = cluster.metadata_nodes.clone();
    assert!(nodes.iter().all(|n| n.is_ready()));
    nodes[1].shutdown().await;
    nodes[2].shutdown().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while nodes[0].is_ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 1 still sees a leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

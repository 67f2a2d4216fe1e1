//! `pulsar+ssl://`: brokers with a TLS listener beside the plain one, and
//! the SDK over TLS — trusting a CA file, checking (or not) the broker's
//! name, refusing an untrusted broker, following lookups, redirects and
//! unloads to the brokers' TLS URLs.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use futures::StreamExt;
use magnetar_client::{Client, Error, InitialPosition, SubscriptionType};
use magnetar_proto::tls::TlsMaterial;
use magnetar_tests::cluster::InProcessCluster;
use magnetar_tests::{free_tcp_port, init_logs, StandaloneSpec};

const WAIT: Duration = Duration::from_secs(10);

async fn roundtrip(client: &Client, topic: &str, n: usize) {
    let mut consumer = client
        .consumer()
        .topic(topic)
        .subscription("s")
        .initial_position(InitialPosition::Earliest)
        .subscribe()
        .await
        .unwrap();
    let producer = client.producer(topic).create().await.unwrap();
    for i in 0..n {
        producer.send(format!("m{i}").into_bytes()).await.unwrap();
    }
    for i in 0..n {
        let m = tokio::time::timeout(WAIT, consumer.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.payload.as_ref(), format!("m{i}").as_bytes());
        consumer.ack(&m).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reach_a_standalone_over_tls_and_untrusted_brokers_are_refused() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let tls_port = free_tcp_port();
    let s = spec
        .start_with(|c| c.broker_tls_port = Some(tls_port))
        .await;
    assert_eq!(
        s.broker.service_url_tls.as_deref(),
        Some(format!("pulsar+ssl://127.0.0.1:{tls_port}").as_str())
    );
    let ca = dir.path().join("client-tls/ca.pem");
    let url = format!("pulsar+ssl://127.0.0.1:{tls_port}");

    // Trusting the standalone's CA, the host name checked (127.0.0.1 is in
    // the certificate): lookups answer the TLS URL, messages go round.
    let client = Client::builder(&url)
        .tls_trust_certs_file_path(&ca)
        .build()
        .await
        .unwrap();
    let topic = "persistent://public/default/secret";
    assert_eq!(client.lookup(topic).await.unwrap(), url);
    roundtrip(&client, topic, 20).await;
    // By name too (localhost is in the certificate).
    let by_name = Client::builder(format!("pulsar+ssl://localhost:{tls_port}"))
        .tls_trust_certs_file_path(&ca)
        .build()
        .await
        .unwrap();
    by_name
        .producer(topic)
        .create()
        .await
        .unwrap()
        .send(b"by name".to_vec())
        .await
        .unwrap();

    // The plain listener still serves.
    let plain = Client::connect(&s.service_url()).await.unwrap();
    plain
        .producer(topic)
        .create()
        .await
        .unwrap()
        .send(b"plain".to_vec())
        .await
        .unwrap();

    // A CA the broker's certificate does not come from: refused, not retried
    // for ever.
    let other = dir.path().join("other-ca");
    TlsMaterial::ensure_ca(&other).unwrap();
    let e = tokio::time::timeout(
        WAIT,
        Client::builder(&url)
            .tls_trust_certs_file_path(other.join("ca.pem"))
            .build(),
    )
    .await
    .unwrap()
    .err()
    .unwrap();
    assert!(matches!(e, Error::Tls(_)), "{e}");
    assert!(!e.is_retriable());
    // Anything goes with an insecure client.
    Client::builder(&url)
        .tls_allow_insecure_connection(true)
        .build()
        .await
        .unwrap();
    // A trust file that is not there is a configuration error.
    let e = Client::builder(&url)
        .tls_trust_certs_file_path(dir.path().join("missing.pem"))
        .build()
        .await
        .err()
        .unwrap();
    assert!(matches!(e, Error::Config(_)), "{e}");

    // A plain client on the TLS port, a TLS client on the plain port: an
    // error, not a hang.
    let e = tokio::time::timeout(
        Duration::from_secs(15),
        Client::connect(&format!("pulsar://127.0.0.1:{tls_port}")),
    )
    .await
    .unwrap()
    .err()
    .unwrap();
    assert!(!matches!(e, Error::Config(_)), "{e}");
    let e = tokio::time::timeout(
        Duration::from_secs(15),
        Client::builder(format!("pulsar+ssl://127.0.0.1:{}", spec.broker_port))
            .tls_trust_certs_file_path(&ca)
            .build(),
    )
    .await
    .unwrap()
    .err()
    .unwrap();
    assert!(matches!(e, Error::Tls(_) | Error::Connection(_)), "{e}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_are_checked_unless_told_not_to() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    // A certificate for another name only.
    let certs = dir.path().join("certs");
    let made = TlsMaterial::issue_server(&certs, &["broker.example".to_string()]).unwrap();
    let spec = StandaloneSpec::new(&dir.path().join("data"));
    let tls_port = free_tcp_port();
    let s = spec
        .start_with(|c| {
            c.broker_tls_port = Some(tls_port);
            c.tls_cert_file = Some(made.cert.clone());
            c.tls_key_file = Some(made.key.clone());
        })
        .await;
    let url = format!("pulsar+ssl://127.0.0.1:{tls_port}");
    let e = Client::builder(&url)
        .tls_trust_certs_file_path(&made.ca_cert)
        .build()
        .await
        .err()
        .unwrap();
    assert!(matches!(e, Error::Tls(_)), "{e}");
    let client = Client::builder(&url)
        .tls_trust_certs_file_path(&made.ca_cert)
        .tls_validate_hostname(false)
        .build()
        .await
        .unwrap();
    roundtrip(&client, "persistent://public/default/any-name", 3).await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_follow_lookups_and_unloads_to_other_brokers_tls_urls() {
    init_logs();
    let mut cluster = InProcessCluster::start(1, 1, 0, (1, 1, 1)).await;
    let ca = cluster.enable_client_tls();
    cluster.add_broker().await;
    cluster.add_broker().await;
    let tls_url = |i: usize| cluster.broker(i).service_url_tls.clone().unwrap();
    let (first, second) = (tls_url(0), tls_url(1));
    // The client knows only the first broker, by its TLS address.
    let client = Client::builder(&first)
        .tls_trust_certs_file_path(&ca)
        .operation_timeout(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    let mut on_second = None;
    for i in 0..32 {
        let topic = format!("persistent://public/default/spread-{i}");
        let owner = client.lookup(&topic).await.unwrap();
        assert!(owner == first || owner == second, "{owner}");
        if owner == second {
            on_second = Some(topic);
            break;
        }
    }
    let topic = on_second.expect("some topic lands on the second broker");
    let mut consumer = client
        .consumer()
        .topic(&topic)
        .subscription("follow")
        .subscription_type(SubscriptionType::Shared)
        .subscribe()
        .await
        .unwrap();
    let producer = client.producer(&topic).create().await.unwrap();
    producer.send(b"before".to_vec()).await.unwrap();
    // The second broker stops: its bundles go to the first, and the close
    // names the first's TLS URL.
    cluster.stop_broker(1).await;
    producer.send(b"after".to_vec()).await.unwrap();
    assert_eq!(client.lookup(&topic).await.unwrap(), first);
    // "before" was out, unacknowledged, when its broker stopped: it may
    // come again (at least once).
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.insert(String::from_utf8(m.payload.to_vec()).unwrap());
        consumer.ack(&m).unwrap();
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["after", "before"]);
    cluster.shutdown().await;
}

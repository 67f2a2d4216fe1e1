//! `deploy/local-cluster.sh` end to end: three metadata nodes, three bookies
//! and a broker as separate processes; produce and consume through the
//! broker; kill and restart members; status and down report truthfully.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use magnetar_client::{Client, ConsumerOptions, OutgoingMessage, ProducerOptions};
use magnetar_tests::{free_port_range, init_logs, LocalCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_cluster_up_kill_start_down() {
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let script = LocalCluster {
        dir: tmp.path().join("lc"),
        ports: [free_port_range(3), free_port_range(3), free_port_range(1)],
        http_port: free_port_range(4),
        node_http_ports: [free_port_range(4), free_port_range(4)],
    };
    let up = script.run(&[
        "up",
        "--metadata",
        "3",
        "--bookies",
        "3",
        "--brokers",
        "1",
        "--ensemble",
        "3,2,2",
    ]);
    let url = format!("pulsar://127.0.0.1:{}", script.ports[2]);
    assert!(up.contains(&format!("service URL: {url}")), "{up}");
    for m in [
        "metadata-1",
        "metadata-2",
        "metadata-3",
        "bookie-1",
        "bookie-2",
        "bookie-3",
        "broker-1",
    ] {
        assert_eq!(script.state(m), "running", "{m}");
    }

    let client = Client::connect(&url).await.unwrap();
    let topic = "persistent://public/default/local-cluster";
    let mut consumer = client
        .subscribe(
            topic,
            "sub",
            ConsumerOptions {
                earliest: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let producer = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .unwrap();
    for i in 0..20 {
        producer
            .send(OutgoingMessage {
                payload: format!("m{i}").into_bytes().into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for i in 0..20 {
        let m = consumer
            .receive_timeout(Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.payload.as_ref(), format!("m{i}").as_bytes());
        consumer.ack(&m).unwrap();
    }

    // A metadata follower or leader can be stopped and resumed, killed and started.
    script.run(&["kill", "metadata-2", "--signal", "STOP"]);
    assert_eq!(script.state("metadata-2"), "stopped");
    script.run(&["kill", "metadata-2", "--signal", "CONT"]);
    assert_eq!(script.state("metadata-2"), "running");
    script.run(&["kill", "metadata-1"]);
    assert_eq!(script.state("metadata-1"), "down");
    script.run(&["start", "metadata-1"]);
    assert_eq!(script.state("metadata-1"), "running");

    script.run(&["down"]);
    for m in ["metadata-1", "bookie-1", "broker-1"] {
        assert_eq!(script.state(m), "down", "{m}");
    }
}

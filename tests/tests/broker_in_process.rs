//! The broker tier in one process (3 metadata nodes, 3 bookies, 3 brokers
//! on loopback, `magnetar_tests::cluster`) under a multi-host SDK client on
//! many topics, judged by the queue checker: the busiest owner crashes (its
//! ports close, its lease is neither renewed nor revoked) and comes back;
//! a broker stops gracefully and comes back; a fourth broker is added and
//! takes its share of the bundles. Nothing acknowledged is lost.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::HashMap;
use std::time::{Duration, Instant};

use magnetar_client::Client;
use magnetar_tests::cluster::InProcessCluster;
use magnetar_tests::{init_logs, Workload};

async fn busiest(client: &Client, cluster: &InProcessCluster, topics: &[String]) -> usize {
    let mut n: HashMap<usize, usize> = HashMap::new();
    for t in topics {
        *n.entry(cluster.index_of(&client.lookup(t).await.unwrap()))
            .or_default() += 1;
    }
    n.into_iter().max_by_key(|(i, c)| (*c, *i)).unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_brokers_crash_stop_and_scale_out_without_loss() {
    init_logs();
    let mut cluster = InProcessCluster::start(3, 3, 3, (2, 2, 2)).await;
    let client = Client::connect(&cluster.service_url()).await.unwrap();
    let topics: Vec<String> = (0..10)
        .map(|i| format!("persistent://public/default/inproc-{i}"))
        .collect();
    let mut w = Workload::new(&client, &topics).await;
    w.run(50).await;

    let victim = busiest(&client, &cluster, &topics).await;
    cluster.crash_broker(victim);
    w.run(150).await;
    for t in &topics {
        let owner = cluster.index_of(&client.lookup(t).await.unwrap());
        assert_ne!(owner, victim, "{t} still on the crashed broker");
    }
    cluster.restart_broker(victim).await;
    w.run(50).await;

    let stopped = (victim + 1) % 3;
    cluster.stop_broker(stopped).await;
    w.run(100).await;
    cluster.restart_broker(stopped).await;
    w.run(50).await;

    // A fourth broker takes its share of the 16 bundles (the load manager
    // looks every second here).
    let added = cluster.add_broker().await;
    let id = cluster.broker(added).broker_id.clone();
    let started = Instant::now();
    loop {
        w.run(25).await;
        let owners: Vec<serde_json::Value> = cluster
            .metadata
            .range("/ownership/", 0)
            .await
            .unwrap()
            .iter()
            .map(|kv| serde_json::from_slice::<serde_json::Value>(&kv.value).unwrap())
            .collect();
        let owned = owners.iter().filter(|o| o["broker_id"] == id).count();
        // Its share of the bundles in use, give or take one.
        if owned + 1 >= owners.len() / 4 && owned >= 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the added broker owns {owned} of {} bundles after 30 s",
            owners.len()
        );
    }
    w.run(50).await;
    w.judge(&client, "in-process crash, stop, scale-out").await;
    client.close().await;
    cluster.shutdown().await;
}

//! Scaling out and operating brokers over real HTTP, on processes
//! (deploy/local-cluster.sh: 3 metadata nodes, 3 bookies, 2 brokers, then
//! a third added under load): the new broker gets its share of the bundles
//! within 30 s; Pulsar's admin REST paths answer (brokers, lookup, bundles,
//! unload to a named broker, split); `magnetar admin --url` drives them;
//! and the queue checker finds nothing lost through all of it.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::HashMap;
use std::time::{Duration, Instant};

use magnetar_client::Client;
use magnetar_metadata::MetadataClient;
use magnetar_proto::rpc::{client_endpoint, RpcClient};
use magnetar_proto::tls::TlsMaterial;
use magnetar_tests::{init_logs, magnetar_bin, LocalCluster, Workload};

const TOPICS: usize = 16;

async fn metadata(cluster: &LocalCluster) -> MetadataClient {
    let tls = TlsMaterial::load(&TlsMaterial::paths_in(&cluster.dir.join("admin/tls"))).unwrap();
    let endpoints = (0..3)
        .map(|i| ([127, 0, 0, 1], cluster.ports[0] + i).into())
        .collect();
    MetadataClient::new(RpcClient::new(client_endpoint(&tls).unwrap()), endpoints)
}

/// Bundles each broker owns now (owner keys).
async fn owned(md: &MetadataClient) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for kv in md.range("/ownership/", 0).await.unwrap() {
        let v: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
        *n.entry(v["broker_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    n
}

fn topic(i: usize) -> String {
    format!("persistent://public/default/scale-{i}")
}

async fn get_json(web: &reqwest::Client, url: String) -> serde_json::Value {
    let resp = web.get(&url).send().await.unwrap();
    assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_added_under_load_takes_its_share_and_the_admin_api_moves_bundles() {
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::new(tmp.path().join("lc"), 3);
    cluster.run(&["up", "--metadata", "3", "--bookies", "3", "--brokers", "2"]);
    let http = |b: u16| format!("http://127.0.0.1:{}", cluster.http_port + b - 1);
    let hosts: Vec<String> = (0..3)
        .map(|i| format!("127.0.0.1:{}", cluster.ports[2] + i))
        .collect();
    // All three brokers in the service URL (the third answers once added).
    let url = format!("pulsar://{}", hosts.join(","));
    let client = Client::connect(&url).await.unwrap();
    let md = metadata(&cluster).await;
    let web = reqwest::Client::new();

    let names: Vec<String> = (0..TOPICS).map(topic).collect();
    let mut load = Workload::new(&client, &names).await;
    load.run_for(Duration::from_secs(2)).await;

    // The REST API, as Pulsar's tools call it.
    let brokers: Vec<String> = serde_json::from_value(
        get_json(&web, format!("{}/admin/v2/brokers/magnetar", http(1))).await,
    )
    .unwrap();
    assert_eq!(brokers, hosts[..2].to_vec());
    let lookup: serde_json::Value = get_json(
        &web,
        format!(
            "{}/lookup/v2/topic/persistent/public/default/scale-0",
            http(2)
        ),
    )
    .await;
    let owner0 = lookup["brokerUrl"].as_str().unwrap().to_string();
    assert_eq!(owner0, client.lookup(&topic(0)).await.unwrap());
    assert!(lookup["httpUrl"].as_str().unwrap().starts_with("http://"));
    let bundles: serde_json::Value = get_json(
        &web,
        format!("{}/admin/v2/namespaces/public/default/bundles", http(1)),
    )
    .await;
    assert_eq!(bundles["numBundles"], 16);
    let health = web
        .get(format!("{}/admin/v2/brokers/health", http(2)))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), "ok");
    let missing = web
        .get(format!("{}/admin/v2/namespaces/nope/none/bundles", http(1)))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let reason: serde_json::Value = missing.json().await.unwrap();
    assert!(reason["reason"]
        .as_str()
        .unwrap()
        .contains("does not exist"));

    // Scale out under load: the new broker gets its share within 30 s.
    let before = owned(&md).await;
    let added = cluster.run(&["add", "broker"]);
    assert!(added.contains("broker-3"), "{added}");
    let started = Instant::now();
    let total: usize = before.values().sum();
    let share = loop {
        load.run_for(Duration::from_millis(500)).await;
        let now = owned(&md).await;
        let mine = now.get(&hosts[2]).copied().unwrap_or(0);
        if mine + 1 >= total / 3 {
            break mine;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "broker-3 owns {mine} of {total} bundles after 30 s: {now:?}"
        );
    };
    println!(
        "broker-3 owned {share} of {total} bundles {:.1} s after it was added",
        started.elapsed().as_secs_f64()
    );

    // Unload the bundle of topic 0 to a named broker, through the CLI.
    let owner = client.lookup(&topic(0)).await.unwrap();
    let to = hosts.iter().find(|h| !owner.ends_with(*h)).unwrap().clone();
    let b: Vec<String> = std::process::Command::new(magnetar_bin())
        .args([
            "admin",
            "--url",
            &http(1),
            "namespaces",
            "bundles",
            "public/default",
        ])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(String::from)
                .collect()
        })
        .unwrap();
    assert_eq!(b.len(), 16, "{b:?}");
    let hash = crc32c::crc32c(topic(0).as_bytes());
    let range = b
        .iter()
        .find(|r| {
            let (lo, hi) = r.split_once('_').unwrap();
            let p = |x: &str| u32::from_str_radix(x.trim_start_matches("0x"), 16).unwrap();
            hash >= p(lo) && (hash < p(hi) || p(hi) == u32::MAX)
        })
        .unwrap()
        .clone();
    let out = std::process::Command::new(magnetar_bin())
        .args([
            "admin",
            "--url",
            &http(1),
            "bundles",
            "unload",
            "public/default",
            &range,
        ])
        .args(["--destination", &to])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    load.run_for(Duration::from_secs(1)).await;
    assert_eq!(
        client.lookup(&topic(0)).await.unwrap(),
        format!("pulsar://{to}"),
        "the bundle went where it was sent"
    );
    // Split it, over HTTP at another broker.
    let split = web
        .put(format!(
            "{}/admin/v2/namespaces/public/default/{range}/split",
            http(3)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(split.status(), 204, "{:?}", split.text().await);
    let bundles: serde_json::Value = get_json(
        &web,
        format!("{}/admin/v2/namespaces/public/default/bundles", http(1)),
    )
    .await;
    assert_eq!(bundles["numBundles"], 17);
    load.run_for(Duration::from_secs(2)).await;

    // Nothing acknowledged was lost through the moves.
    load.judge(&client, "scale-out and moves").await;
}

//! Tenants, namespaces, topics and partitioned topics through Pulsar's admin
//! REST paths, with plain HTTP calls against an in-process standalone, and
//! what the binary protocol does with them (our SDK).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use magnetar_client::{Client, ConsumerOptions, Error, ProducerOptions, SubscriptionType};
use magnetar_proto::pulsar::ServerError;
use magnetar_tests::{init_logs, StandaloneSpec};
use serde_json::Value;

struct Http {
    web: reqwest::Client,
    base: String,
}

impl Http {
    fn new(spec: &StandaloneSpec) -> Http {
        Http {
            web: reqwest::Client::new(),
            base: format!("http://127.0.0.1:{}/admin/v2", spec.http_port),
        }
    }

    async fn call(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "GET" => self.web.get(url),
            "PUT" => self.web.put(url),
            "POST" => self.web.post(url),
            "DELETE" => self.web.delete(url),
            m => panic!("method {m}"),
        };
        let req = if body.is_empty() {
            req
        } else {
            req.header("content-type", "application/json")
                .body(body.to_string())
        };
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    async fn status(&self, method: &str, path: &str, body: &str) -> u16 {
        self.call(method, path, body).await.0
    }

    async fn get(&self, path: &str) -> Value {
        let (status, v) = self.call("GET", path, "").await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }
}

fn server_code(e: &Error) -> Option<i32> {
    match e {
        Error::Server { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_and_namespaces_are_created_listed_and_deleted_only_when_empty() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let h = Http::new(&spec);
    assert_eq!(h.get("/tenants").await, serde_json::json!(["public"]));
    assert_eq!(h.status("PUT", "/tenants/acme", "").await, 204);
    assert_eq!(h.status("PUT", "/tenants/acme", "").await, 409, "exists");
    assert_eq!(h.status("PUT", "/tenants/bad%20name", "").await, 412);
    let info = h.get("/tenants/acme").await;
    assert_eq!(info["allowedClusters"].as_array().unwrap().len(), 1);
    assert_eq!(h.status("GET", "/tenants/nope", "").await, 404);
    // Namespaces: under an existing tenant, with the split asked for.
    let body = r#"{"bundles":{"numBundles":4}}"#;
    assert_eq!(h.status("PUT", "/namespaces/nope/prod", body).await, 404);
    assert_eq!(h.status("PUT", "/namespaces/acme/prod", body).await, 204);
    assert_eq!(h.status("PUT", "/namespaces/acme/prod", "").await, 409);
    assert_eq!(
        h.get("/namespaces/acme").await,
        serde_json::json!(["acme/prod"])
    );
    let policies = h.get("/namespaces/acme/prod").await;
    assert_eq!(policies["bundles"]["numBundles"], 4);
    let bundles = h.get("/namespaces/acme/prod/bundles").await;
    assert_eq!(bundles["boundaries"].as_array().unwrap().len(), 5);
    assert_eq!(
        h.status("DELETE", "/tenants/acme", "").await,
        409,
        "has a namespace"
    );

    // A topic in it, used through the binary protocol.
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://acme/prod/orders";
    let p = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .unwrap();
    p.send("one").await.unwrap();
    assert_eq!(
        h.get("/persistent/acme/prod").await,
        serde_json::json!([topic])
    );
    let (status, why) = h.call("DELETE", "/namespaces/acme/prod", "").await;
    assert_eq!(status, 409, "not empty: {why}");
    assert!(why["reason"].as_str().unwrap().contains("orders"), "{why}");
    // Deleting the topic: refused while its producer is connected.
    assert_eq!(
        h.status("DELETE", "/persistent/acme/prod/orders", "").await,
        412
    );
    assert_eq!(
        h.status("DELETE", "/persistent/acme/prod/orders?force=true", "")
            .await,
        204
    );
    p.close().await.ok();
    assert_eq!(
        h.status("DELETE", "/persistent/acme/prod/orders", "").await,
        404
    );
    assert_eq!(h.get("/persistent/acme/prod").await, serde_json::json!([]));
    assert_eq!(h.status("DELETE", "/namespaces/acme/prod", "").await, 204);
    assert_eq!(h.status("GET", "/namespaces/acme/prod", "").await, 404);
    assert_eq!(h.status("DELETE", "/tenants/acme", "").await, 204);
    assert_eq!(h.get("/tenants").await, serde_json::json!(["public"]));
    // A topic of a namespace that does not exist is refused, clearly.
    let e = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(
        server_code(&e),
        Some(ServerError::TopicNotFound as i32),
        "{e}"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_can_forbid_creating_topics_on_first_use() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let h = Http::new(&spec);
    assert_eq!(h.status("PUT", "/namespaces/public/strict", "").await, 204);
    let off = r#"{"allowAutoTopicCreation":false}"#;
    let path = "/namespaces/public/strict/autoTopicCreation";
    assert_eq!(h.status("POST", path, off).await, 204);
    assert_eq!(h.get(path).await["allowAutoTopicCreation"], false);
    let bad = r#"{"allowAutoTopicCreation":true,"topicType":"partitioned"}"#;
    assert_eq!(h.status("POST", path, bad).await, 412, "no partition count");
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://public/strict/t1";
    let e = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(
        server_code(&e),
        Some(ServerError::TopicNotFound as i32),
        "{e}"
    );
    // Created through REST, it may be used.
    assert_eq!(
        h.status("PUT", "/persistent/public/strict/t1", "").await,
        204
    );
    assert_eq!(
        h.status("PUT", "/persistent/public/strict/t1", "").await,
        409
    );
    let p = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .unwrap();
    p.send("x").await.unwrap();
    // With the policy removed, first use creates topics again.
    assert_eq!(h.status("DELETE", path, "").await, 204);
    client
        .create_producer("persistent://public/strict/t2", ProducerOptions::default())
        .await
        .unwrap();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_topics_are_created_grown_used_and_deleted() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let h = Http::new(&spec);
    let path = "/persistent/public/default/orders/partitions";
    assert_eq!(h.get(path).await["partitions"], 0, "not partitioned yet");
    assert_eq!(h.status("PUT", path, "3").await, 204);
    assert_eq!(h.status("PUT", path, "3").await, 409, "exists");
    assert_eq!(h.status("PUT", path, "x").await, 400);
    assert_eq!(h.get(path).await["partitions"], 3);
    assert_eq!(h.status("POST", path, "2").await, 412, "never fewer");
    assert_eq!(h.status("POST", path, "5").await, 204);
    assert_eq!(h.get(path).await["partitions"], 5);
    assert_eq!(
        h.get("/persistent/public/default/partitioned").await,
        serde_json::json!(["persistent://public/default/orders"])
    );
    let all = h.get("/persistent/public/default").await;
    assert_eq!(all.as_array().unwrap().len(), 5, "{all}");
    assert_eq!(
        h.status("PUT", "/persistent/public/default/orders", "")
            .await,
        409,
        "a non-partitioned topic of a partitioned one's name"
    );
    // Partitions are ordinary topics; the count bounds them.
    let client = Client::connect(&s.service_url()).await.unwrap();
    let base = "persistent://public/default/orders";
    let p = client
        .create_producer(&format!("{base}-partition-4"), ProducerOptions::default())
        .await
        .unwrap();
    let mut c = client
        .subscribe(
            &format!("{base}-partition-4"),
            "s",
            ConsumerOptions {
                sub_type: SubscriptionType::Shared,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for i in 0..10 {
        p.send(format!("m{i}").as_str()).await.unwrap();
    }
    for _ in 0..4 {
        let m = c.receive().await.unwrap();
        c.ack(&m).unwrap();
    }
    let e = client
        .create_producer(&format!("{base}-partition-5"), ProducerOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(
        server_code(&e),
        Some(ServerError::TopicNotFound as i32),
        "{e}"
    );
    // The SDK finds the partitions of the base topic and opens one producer
    // per partition under it.
    let whole = client
        .create_producer(base, ProducerOptions::default())
        .await
        .unwrap();
    assert_eq!(whole.partitions(), 5);
    whole.close().await.unwrap();
    // Stats, under Pulsar's field names, counted by the owner.
    let stats_path = "/persistent/public/default/orders-partition-4/stats";
    let mut stats = h.get(stats_path).await;
    for _ in 0..50 {
        if stats["subscriptions"]["s"]["msgBacklog"] == 6 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        stats = h.get(stats_path).await;
    }
    assert_eq!(stats["msgInCounter"], 10, "{stats}");
    assert_eq!(stats["subscriptions"]["s"]["msgBacklog"], 6, "{stats}");
    assert_eq!(stats["subscriptions"]["s"]["type"], "Shared", "{stats}");
    assert_eq!(
        stats["subscriptions"]["s"]["consumers"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(stats["publishers"].as_array().unwrap().len(), 1, "{stats}");
    assert!(stats["storageSize"].as_u64().unwrap() >= 20, "{stats}");
    assert_eq!(
        h.status("GET", "/persistent/public/default/never/stats", "")
            .await,
        404
    );
    let internal = h
        .get("/persistent/public/default/orders-partition-4/internalStats")
        .await;
    assert_eq!(internal["numberOfEntries"], 10, "{internal}");
    assert_eq!(internal["state"], "LedgerOpened", "{internal}");
    assert!(
        internal["cursors"]["s"]["markDeletePosition"].is_string(),
        "{internal}"
    );
    let all = h
        .get("/persistent/public/default/orders/partitioned-stats")
        .await;
    assert_eq!(all["metadata"]["partitions"], 5, "{all}");
    assert_eq!(all["msgInCounter"], 10, "{all}");
    assert!(
        all["partitions"]["persistent://public/default/orders-partition-4"].is_object(),
        "{all}"
    );
    // Deleting: refused while a partition has clients, unless forced.
    assert_eq!(h.status("DELETE", path, "").await, 412);
    assert_eq!(
        h.status("DELETE", &format!("{path}?force=true"), "").await,
        204
    );
    assert_eq!(h.get(path).await["partitions"], 0);
    assert_eq!(
        h.get("/persistent/public/default/partitioned").await,
        serde_json::json!([])
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_topic_refuses_sends_and_ends_its_consumers_also_after_a_restart() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let h = Http::new(&spec);
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://public/default/ending";
    let earliest = ConsumerOptions {
        earliest: true,
        ..Default::default()
    };
    let mut c = client
        .subscribe(topic, "s", earliest.clone())
        .await
        .unwrap();
    let p = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .unwrap();
    let mut last = None;
    for i in 0..5 {
        last = Some(p.send(format!("m{i}").as_str()).await.unwrap());
    }
    for _ in 0..3 {
        let m = c.receive().await.unwrap();
        c.ack(&m).unwrap();
    }
    let path = "/persistent/public/default/ending/terminate";
    let (status, id) = h.call("POST", path, "").await;
    assert_eq!(status, 200, "{id}");
    let last = last.unwrap();
    assert_eq!(id["ledgerId"], last.ledger_id, "{id}");
    assert_eq!(id["entryId"], last.entry_id, "{id}");
    // Again: the same answer.
    assert_eq!(h.call("POST", path, "").await.1, id);
    let e = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(
        server_code(&e),
        Some(ServerError::TopicTerminatedError as i32),
        "{e}"
    );
    // The consumer gets the rest, then end of topic.
    for i in 3..5 {
        let m = c.receive().await.unwrap();
        assert_eq!(&m.payload[..], format!("m{i}").as_bytes());
        c.ack(&m).unwrap();
    }
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), c.receive())
        .await
        .expect("end of topic in time");
    assert!(matches!(end, Err(Error::EndOfTopic)), "{end:?}");
    assert!(c.has_reached_end_of_topic());
    drop(c);
    drop(p);
    drop(client);
    s.shutdown().await;

    // Terminated for good: after a restart too.
    let s = spec.start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let e = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(
        server_code(&e),
        Some(ServerError::TopicTerminatedError as i32),
        "{e}"
    );
    let mut r = client.subscribe(topic, "new", earliest).await.unwrap();
    for i in 0..5 {
        let m = r.receive().await.unwrap();
        assert_eq!(&m.payload[..], format!("m{i}").as_bytes());
    }
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), r.receive())
        .await
        .expect("end of topic in time");
    assert!(matches!(end, Err(Error::EndOfTopic)), "{end:?}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deduplication_is_a_namespace_policy_with_a_topic_override_and_survives_a_restart() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let h = Http::new(&spec);
    let ns = "/namespaces/public/default/deduplication";
    assert_eq!(h.get(ns).await, Value::Null);
    assert_eq!(h.status("POST", ns, "maybe").await, 400);
    assert_eq!(h.status("POST", ns, "true").await, 204);
    assert_eq!(h.get(ns).await, true);
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://public/default/once";
    let named = ProducerOptions {
        name: Some("writer".into()),
        ..Default::default()
    };
    let mut c = client
        .subscribe(topic, "s", ConsumerOptions::default())
        .await
        .unwrap();
    let p = client.create_producer(topic, named.clone()).await.unwrap();
    for i in 0..3 {
        p.send(format!("m{i}").as_str()).await.unwrap();
    }
    p.close().await.unwrap();
    // The same producer again: it continues after what the topic stored.
    let p = client.create_producer(topic, named.clone()).await.unwrap();
    p.send("m3").await.unwrap();
    p.close().await.unwrap();
    drop(c);
    drop(client);
    s.shutdown().await;

    let s = spec.start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let p = client.create_producer(topic, named.clone()).await.unwrap();
    p.send("m4").await.unwrap();
    c = client
        .subscribe(topic, "s", ConsumerOptions::default())
        .await
        .unwrap();
    for i in 0..5 {
        let m = c.receive().await.unwrap();
        assert_eq!(
            &m.payload[..],
            format!("m{i}").as_bytes(),
            "every message once, in order"
        );
        c.ack(&m).unwrap();
    }
    assert!(c
        .receive_timeout(std::time::Duration::from_millis(500))
        .await
        .unwrap()
        .is_none());
    // A topic-level override, read back.
    let tp = "/persistent/public/default/once/deduplicationEnabled";
    assert_eq!(h.get(tp).await, Value::Null);
    assert_eq!(h.status("POST", tp, "false").await, 204);
    assert_eq!(h.get(tp).await, false);
    assert_eq!(h.status("DELETE", tp, "").await, 204);
    assert_eq!(h.get(tp).await, Value::Null);
    s.shutdown().await;
}

/// Polls `f` every 100 ms for up to 10 s until it holds.
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if f().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{what}: not within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_ttl_backlog_quotas_and_retention_are_enforced() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec
        .start_with(|c| {
            c.policy_check_interval_ms = 200;
            c.managed_ledger.max_entries_per_ledger = 5;
        })
        .await;
    let h = Http::new(&spec);
    let client = Client::connect(&s.service_url()).await.unwrap();
    let earliest = ConsumerOptions {
        earliest: true,
        ..Default::default()
    };
    let payload = "x".repeat(100);
    let backlog = |topic: &'static str, sub: &'static str| {
        let h = &h;
        async move {
            let stats = h
                .get(&format!("/persistent/public/default/{topic}/stats"))
                .await;
            stats["subscriptions"][sub]["msgBacklog"].as_u64().unwrap()
        }
    };

    // Message TTL (namespace level): unacknowledged messages expire.
    assert_eq!(h.status("PUT", "/namespaces/public/ttl", "").await, 204);
    assert_eq!(
        h.status("POST", "/namespaces/public/ttl/messageTTL", "1")
            .await,
        204
    );
    assert_eq!(h.get("/namespaces/public/ttl/messageTTL").await, 1);
    let c = client
        .subscribe("persistent://public/ttl/t", "s", earliest.clone())
        .await
        .unwrap();
    let p = client
        .create_producer("persistent://public/ttl/t", ProducerOptions::default())
        .await
        .unwrap();
    for _ in 0..5 {
        p.send(payload.as_str()).await.unwrap();
    }
    drop(c);
    eventually("messages expired by TTL", async || {
        let stats = h.get("/persistent/public/ttl/t/stats").await;
        stats["subscriptions"]["s"]["msgBacklog"] == 0
    })
    .await;

    // A size quota with producer_exception (topic level): producers are
    // closed and new ones refused.
    let q = "/persistent/public/default/capped/backlogQuota";
    let quota = r#"{"limitSize":1500,"policy":"producer_exception"}"#;
    assert_eq!(h.status("POST", q, quota).await, 204);
    assert_eq!(
        h.status(
            "POST",
            q,
            r#"{"limitSize":0,"policy":"producer_exception"}"#
        )
        .await,
        412
    );
    let map = h
        .get("/persistent/public/default/capped/backlogQuotaMap")
        .await;
    assert_eq!(map["destination_storage"]["limitSize"], 1500, "{map}");
    let c = client
        .subscribe(
            "persistent://public/default/capped",
            "slow",
            earliest.clone(),
        )
        .await
        .unwrap();
    let p = client
        .create_producer(
            "persistent://public/default/capped",
            ProducerOptions::default(),
        )
        .await
        .unwrap();
    for _ in 0..30 {
        if p.send(payload.as_str()).await.is_err() {
            break;
        }
    }
    drop(c);
    eventually("a new producer is refused over the quota", async || {
        let r = client
            .create_producer(
                "persistent://public/default/capped",
                ProducerOptions::default(),
            )
            .await;
        matches!(
            r.err().and_then(|e| e.server_error()),
            Some(ServerError::ProducerBlockedQuotaExceededException)
        )
    })
    .await;

    // producer_request_hold: new producers get the retriable error (the
    // client keeps its messages and retries), existing ones are closed.
    let q = "/persistent/public/default/held/backlogQuota";
    let quota = r#"{"limitSize":1500,"policy":"producer_request_hold"}"#;
    assert_eq!(h.status("POST", q, quota).await, 204);
    let c = client
        .subscribe("persistent://public/default/held", "slow", earliest.clone())
        .await
        .unwrap();
    let p = client
        .create_producer(
            "persistent://public/default/held",
            ProducerOptions::default(),
        )
        .await
        .unwrap();
    for _ in 0..30 {
        if p.send(payload.as_str()).await.is_err() {
            break;
        }
    }
    drop(c);
    eventually("a new producer is held over the quota", async || {
        let r = client
            .create_producer(
                "persistent://public/default/held",
                ProducerOptions {
                    operation_timeout_ms: 300,
                    ..Default::default()
                },
            )
            .await;
        matches!(
            r.err().and_then(|e| e.server_error()),
            Some(ServerError::ProducerBlockedQuotaExceededError)
        )
    })
    .await;

    // A compaction threshold (namespace policy) starts compactions.
    assert_eq!(
        h.status("PUT", "/namespaces/public/compacting", "").await,
        204
    );
    let t = "/namespaces/public/compacting/compactionThreshold";
    assert_eq!(h.status("POST", t, "1000").await, 204);
    assert_eq!(h.get(t).await, 1000);
    let p = client
        .create_producer(
            "persistent://public/compacting/kv",
            ProducerOptions::default(),
        )
        .await
        .unwrap();
    for i in 0..30 {
        p.send(magnetar_client::OutgoingMessage {
            payload: payload.clone().into(),
            key: Some(format!("k{}", i % 3)),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    eventually("the threshold started a compaction", async || {
        h.get("/persistent/public/compacting/kv/compaction").await["status"] == "SUCCESS"
    })
    .await;

    // consumer_backlog_eviction: the slow subscription loses its oldest.
    let q = "/persistent/public/default/evicting/backlogQuota";
    let quota = r#"{"limitSize":1500,"policy":"consumer_backlog_eviction"}"#;
    assert_eq!(h.status("POST", q, quota).await, 204);
    let c = client
        .subscribe(
            "persistent://public/default/evicting",
            "slow",
            earliest.clone(),
        )
        .await
        .unwrap();
    let p = client
        .create_producer(
            "persistent://public/default/evicting",
            ProducerOptions::default(),
        )
        .await
        .unwrap();
    for _ in 0..30 {
        p.send(payload.as_str()).await.unwrap();
    }
    drop(c);
    eventually("the backlog was evicted down to the quota", async || {
        let b = backlog("evicting", "slow").await;
        b > 0 && b <= 15
    })
    .await;

    // Retention: consumed ledgers are kept, so a new subscription from the
    // earliest reads everything; without it they go.
    let r = "/persistent/public/default/kept/retention";
    let keep = r#"{"retentionTimeInMinutes":-1,"retentionSizeInMB":-1}"#;
    assert_eq!(h.status("POST", r, keep).await, 204);
    assert_eq!(h.get(r).await["retentionTimeInMinutes"], -1);
    for topic in ["kept", "gone"] {
        let full = format!("persistent://public/default/{topic}");
        let mut c = client
            .subscribe(&full, "s", earliest.clone())
            .await
            .unwrap();
        let p = client
            .create_producer(&full, ProducerOptions::default())
            .await
            .unwrap();
        for i in 0..20 {
            p.send(format!("m{i}").as_str()).await.unwrap();
        }
        for _ in 0..20 {
            let m = c.receive().await.unwrap();
            c.ack(&m).unwrap();
        }
        drop(c);
        // Let the acknowledgements be persisted and the trim run.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let mut fresh = client
            .subscribe(&full, "late", earliest.clone())
            .await
            .unwrap();
        let first = fresh.receive().await.unwrap();
        let first = String::from_utf8(first.payload.to_vec()).unwrap();
        if topic == "kept" {
            assert_eq!(first, "m0", "retention keeps consumed ledgers");
        } else {
            assert_ne!(first, "m0", "consumed ledgers go without retention");
        }
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_dead_letters_what_was_redelivered_too_often_for_any_client() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let h = Http::new(&spec);
    assert_eq!(h.status("PUT", "/namespaces/public/dlq", "").await, 204);
    let path = "/namespaces/public/dlq/deadLetterPolicy";
    assert_eq!(
        h.status("POST", path, r#"{"maxRedeliverCount":0}"#).await,
        412
    );
    assert_eq!(
        h.status("POST", path, r#"{"maxRedeliverCount":2}"#).await,
        204
    );
    assert_eq!(h.get(path).await["maxRedeliverCount"], 2);
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://public/dlq/work";
    let shared = ConsumerOptions {
        sub_type: SubscriptionType::Shared,
        ..Default::default()
    };
    let mut c = client.subscribe(topic, "s", shared.clone()).await.unwrap();
    let mut dlq = client
        .subscribe(&format!("{topic}-s-DLQ"), "inspect", shared)
        .await
        .unwrap();
    let p = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .unwrap();
    let sent = p
        .send(magnetar_client::OutgoingMessage {
            payload: "poison".into(),
            key: Some("k".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    p.send("fine").await.unwrap();
    // The client never acknowledges "poison": delivered 1 + 2 times.
    let mut deliveries = 0;
    loop {
        let m = c
            .receive_timeout(std::time::Duration::from_secs(3))
            .await
            .unwrap();
        let Some(m) = m else { break };
        if &m.payload[..] == b"fine" {
            c.ack(&m).unwrap();
            continue;
        }
        assert_eq!(m.redelivery_count, deliveries);
        deliveries += 1;
        c.redeliver_unacknowledged().unwrap();
    }
    assert_eq!(deliveries, 3, "first delivery and two redeliveries");
    let d = dlq.receive().await.unwrap();
    assert_eq!(&d.payload[..], b"poison");
    assert_eq!(d.key.as_deref(), Some("k"));
    assert_eq!(
        d.properties.get("REAL_TOPIC").map(String::as_str),
        Some(topic)
    );
    assert_eq!(
        d.properties.get("ORIGIN_MESSAGE_ID"),
        Some(&format!("{}:{}:-1", sent.ledger_id, sent.entry_id))
    );
    // Acknowledged on the original subscription once dead-lettered.
    eventually("the subscription's backlog is empty", async || {
        let stats = h.get("/persistent/public/dlq/work/stats").await;
        stats["subscriptions"]["s"]["msgBacklog"] == 0
    })
    .await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn magnetar_admin_manages_tenants_namespaces_topics_and_policies() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let url = format!("http://127.0.0.1:{}", spec.http_port);
    let admin = |args: &'static [&'static str]| {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || magnetar_tests::admin_rest(&url, args))
                .await
                .unwrap()
        }
    };
    admin(&["tenants", "create", "acme"]).await;
    assert_eq!(admin(&["tenants", "list"]).await, "acme\npublic\n");
    admin(&["namespaces", "create", "acme/prod", "--bundles", "4"]).await;
    assert_eq!(admin(&["namespaces", "list", "acme"]).await, "acme/prod\n");
    admin(&["namespaces", "set-policy", "acme/prod", "message-ttl", "60"]).await;
    admin(&[
        "namespaces",
        "set-policy",
        "acme/prod",
        "deduplication",
        "true",
    ])
    .await;
    let p = admin(&["--json", "namespaces", "policies", "acme/prod"]).await;
    let p: Value = serde_json::from_str(&p).unwrap();
    assert_eq!(p["message_ttl_in_seconds"], 60, "{p}");
    assert_eq!(p["deduplicationEnabled"], true, "{p}");
    admin(&[
        "topics",
        "create",
        "persistent://acme/prod/o",
        "--partitions",
        "2",
    ])
    .await;
    admin(&[
        "topics",
        "update-partitions",
        "persistent://acme/prod/o",
        "3",
    ])
    .await;
    assert_eq!(
        admin(&["topics", "list", "acme/prod"])
            .await
            .lines()
            .count(),
        3
    );
    let t = "persistent://acme/prod/o-partition-0";
    let client = Client::connect(&s.service_url()).await.unwrap();
    client
        .create_producer(t, ProducerOptions::default())
        .await
        .unwrap()
        .send("x")
        .await
        .unwrap();
    let stats = admin(&[
        "--json",
        "topics",
        "stats",
        "persistent://acme/prod/o-partition-0",
    ])
    .await;
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["msgInCounter"], 1, "{stats}");
    admin(&[
        "topics",
        "set-policy",
        "persistent://acme/prod/o",
        "retention",
        r#"{"retentionTimeInMinutes":-1,"retentionSizeInMB":100}"#,
    ])
    .await;
    let r = admin(&[
        "--json",
        "topics",
        "get-policy",
        "persistent://acme/prod/o",
        "retention",
    ])
    .await;
    assert!(r.contains("\"retentionSizeInMB\":100"), "{r}");
    admin(&[
        "schemas",
        "upload",
        "persistent://acme/prod/o",
        "--type",
        "JSON",
        r#"{"type":"record","name":"A","fields":[]}"#,
    ])
    .await;
    let schema = admin(&["--json", "schemas", "get", "persistent://acme/prod/o"]).await;
    let schema: Value = serde_json::from_str(&schema).unwrap();
    assert_eq!(
        (schema["version"].clone(), schema["type"].clone()),
        (Value::from(0), Value::from("JSON"))
    );
    admin(&["schemas", "delete", "persistent://acme/prod/o"]).await;
    admin(&[
        "topics",
        "delete",
        "persistent://acme/prod/o",
        "--partitioned",
        "--force",
    ])
    .await;
    admin(&["namespaces", "delete", "acme/prod"]).await;
    admin(&["tenants", "delete", "acme"]).await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_persistent_topics_fan_out_live_and_drop_for_a_slow_consumer_only() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let h = Http::new(&spec);
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "non-persistent://public/default/live";
    let mut fast = client
        .subscribe(topic, "fast", ConsumerOptions::default())
        .await
        .unwrap();
    // Never receives: its queue of 10 fills, the rest is dropped for it.
    let _slow = client
        .subscribe(
            topic,
            "slow",
            ConsumerOptions {
                receiver_queue: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let p = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .unwrap();
    let n = 500;
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < n {
            let m = fast.receive().await.unwrap();
            got.push(String::from_utf8(m.payload.to_vec()).unwrap());
            fast.ack(&m).unwrap();
        }
        got
    });
    for i in 0..n {
        p.send(format!("m{i}").as_str()).await.unwrap();
    }
    let got = tokio::time::timeout(std::time::Duration::from_secs(20), reader)
        .await
        .expect("the fast consumer got every message")
        .unwrap();
    assert_eq!(got, (0..n).map(|i| format!("m{i}")).collect::<Vec<_>>());
    let stats = h.get("/non-persistent/public/default/live/stats").await;
    assert_eq!(stats["msgInCounter"], n as u64, "{stats}");
    let dropped = stats["subscriptions"]["slow"]["msgDropCounter"]
        .as_u64()
        .unwrap();
    assert!(dropped >= (n - 20) as u64, "{stats}");
    assert_eq!(
        stats["subscriptions"]["fast"]["msgDropCounter"], 0,
        "{stats}"
    );
    assert_eq!(stats["storageSize"], 0, "nothing stored: {stats}");
    // A subscription made now gets nothing of what was sent before.
    let mut late = client
        .subscribe(topic, "late", ConsumerOptions::default())
        .await
        .unwrap();
    assert!(late
        .receive_timeout(std::time::Duration::from_millis(500))
        .await
        .unwrap()
        .is_none());
    p.send("after").await.unwrap();
    let m = late.receive().await.unwrap();
    assert_eq!(&m.payload[..], b"after");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_are_versioned_and_checked_through_rest() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let h = Http::new(&spec);
    let base = "/schemas/public/default/people";
    assert_eq!(h.status("GET", &format!("{base}/schema"), "").await, 404);
    let v1 = r#"{"type":"record","name":"P","fields":[{"name":"name","type":"string"}]}"#;
    let v2 = r#"{"type":"record","name":"P","fields":[{"name":"name","type":"string"},{"name":"age","type":"int","default":0}]}"#;
    let bad = r#"{"type":"record","name":"P","fields":[{"name":"name","type":"int"}]}"#;
    let up = |def: &str| {
        serde_json::json!({"type": "AVRO", "schema": def, "properties": {}}).to_string()
    };
    let (status, v) = h.call("POST", &format!("{base}/schema"), &up(v1)).await;
    assert_eq!((status, v["version"].clone()), (200, Value::from(0)));
    let (_, v) = h.call("POST", &format!("{base}/schema"), &up(v1)).await;
    assert_eq!(v["version"], 0, "the same schema: the same version");
    let (_, c) = h
        .call("POST", &format!("{base}/compatibility"), &up(bad))
        .await;
    assert_eq!(c["isCompatible"], false, "{c}");
    assert_eq!(
        h.status("POST", &format!("{base}/schema"), &up(bad)).await,
        409
    );
    let (_, v) = h.call("POST", &format!("{base}/schema"), &up(v2)).await;
    assert_eq!(v["version"], 1);
    let latest = h.get(&format!("{base}/schema")).await;
    assert_eq!(latest["type"], "AVRO");
    assert_eq!(latest["data"], v2);
    assert_eq!(h.get(&format!("{base}/schema/0")).await["data"], v1);
    let all = h.get(&format!("{base}/schemas")).await;
    assert_eq!(all["getSchemaResponses"].as_array().unwrap().len(), 2);
    // ALWAYS_COMPATIBLE lets anything in.
    let strategy = "/namespaces/public/default/schemaCompatibilityStrategy";
    assert_eq!(
        h.status("PUT", strategy, "\"ALWAYS_COMPATIBLE\"").await,
        204
    );
    assert_eq!(h.get(strategy).await, "ALWAYS_COMPATIBLE");
    let (_, v) = h.call("POST", &format!("{base}/schema"), &up(bad)).await;
    assert_eq!(v["version"], 2);
    assert_eq!(
        h.call("DELETE", &format!("{base}/schema"), "").await.1["version"],
        2
    );
    assert_eq!(h.status("GET", &format!("{base}/schema"), "").await, 404);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_the_latest_message_per_key_for_compacted_readers() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let cfg = |c: &mut magnetar_broker::standalone::StandaloneConfig| {
        c.managed_ledger.max_entries_per_ledger = 7;
    };
    let s = spec.start_with(cfg).await;
    let h = Http::new(&spec);
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://public/default/table";
    let keyed = |k: &str, v: &str| magnetar_client::OutgoingMessage {
        payload: v.to_string().into(),
        key: Some(k.into()),
        ..Default::default()
    };
    // A plain subscription sees everything, before and after.
    let mut all = client
        .subscribe(topic, "all", ConsumerOptions::default())
        .await
        .unwrap();
    let p = client
        .create_producer(topic, ProducerOptions::default())
        .await
        .unwrap();
    for round in 0..5 {
        for k in 0..10 {
            p.send(keyed(&format!("k{k}"), &format!("k{k}v{round}")))
                .await
                .unwrap();
        }
    }
    p.send(keyed("k9", "")).await.unwrap(); // deletes k9
    p.send("no key").await.unwrap(); // not kept
                                     // A batch of three keys, one of which is updated later.
    let b = client
        .create_producer(
            topic,
            ProducerOptions {
                batching: true,
                batch_delay_ms: 50,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let sends = ["a", "b", "c"].map(|k| b.send(keyed(k, &format!("{k}1"))));
    for r in futures::future::join_all(sends).await {
        r.unwrap();
    }
    p.send(keyed("b", "b2")).await.unwrap();
    let path = "/persistent/public/default/table/compaction";
    assert_eq!(h.get(path).await["status"], "NOT_RUN");
    assert_eq!(h.status("PUT", path, "").await, 204);
    eventually("compaction finished", async || {
        h.get(path).await["status"] == "SUCCESS"
    })
    .await;
    let expected: Vec<String> = (0..9)
        .map(|k| format!("k{k}v4"))
        .chain(["a1", "c1", "b2"].map(String::from))
        .collect();
    let read_compacted = ConsumerOptions {
        earliest: true,
        read_compacted: true,
        ..Default::default()
    };
    let drain = |mut c: magnetar_client::Consumer| async move {
        let mut got = Vec::new();
        while let Some(m) = c
            .receive_timeout(std::time::Duration::from_millis(800))
            .await
            .unwrap()
        {
            got.push(String::from_utf8(m.payload.to_vec()).unwrap());
            c.ack(&m).unwrap();
        }
        got
    };
    let c = client
        .subscribe(topic, "compacted", read_compacted.clone())
        .await
        .unwrap();
    assert_eq!(drain(c).await, expected);
    // Without read_compacted the same start gives everything.
    let c = client
        .subscribe(
            topic,
            "everything",
            ConsumerOptions {
                earliest: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(drain(c).await.len(), 50 + 1 + 1 + 3 + 1);
    let mut got = 0;
    while all
        .receive_timeout(std::time::Duration::from_millis(300))
        .await
        .unwrap()
        .is_some()
    {
        got += 1;
    }
    assert_eq!(got, 56);
    drop((all, p, b, client));
    s.shutdown().await;

    // After a restart the view is read back from its ledger; what came
    // after the horizon follows it.
    let s = spec.start_with(cfg).await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    client
        .create_producer(topic, ProducerOptions::default())
        .await
        .unwrap()
        .send(keyed("k0", "k0v5"))
        .await
        .unwrap();
    let c = client
        .subscribe(topic, "after-restart", read_compacted)
        .await
        .unwrap();
    let mut want = expected.clone();
    want.push("k0v5".into());
    assert_eq!(drain(c).await, want);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_back_off_is_a_policy_the_broker_applies() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let h = Http::new(&spec);
    let path = "/persistent/public/default/slow-retry/redeliveryBackoff";
    let bad = r#"{"minDelayMs":500,"maxDelayMs":100,"multiplier":2}"#;
    assert_eq!(h.status("POST", path, bad).await, 412);
    let policy = r#"{"minDelayMs":400,"maxDelayMs":1000,"multiplier":2}"#;
    assert_eq!(h.status("POST", path, policy).await, 204);
    assert_eq!(h.get(path).await["minDelayMs"], 400);
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://public/default/slow-retry";
    let mut c = client
        .subscribe(
            topic,
            "s",
            ConsumerOptions {
                sub_type: SubscriptionType::Shared,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    client
        .create_producer(topic, ProducerOptions::default())
        .await
        .unwrap()
        .send("retry me")
        .await
        .unwrap();
    let first = c.receive().await.unwrap();
    assert_eq!(first.redelivery_count, 0);
    // Given back three times: waits of 400, 800 and 1,000 ms (the cap).
    let mut waits = Vec::new();
    for n in 1..=3u32 {
        c.redeliver_unacknowledged().unwrap();
        let t = std::time::Instant::now();
        let m = c.receive().await.unwrap();
        waits.push(t.elapsed());
        assert_eq!(m.redelivery_count, n);
    }
    let ms: Vec<u128> = waits.iter().map(|w| w.as_millis()).collect();
    assert!(ms[0] >= 380 && ms[1] >= 780 && ms[2] >= 980, "{ms:?}");
    assert!(ms[2] < 1_900, "capped at maxDelayMs: {ms:?}");
    s.shutdown().await;
}

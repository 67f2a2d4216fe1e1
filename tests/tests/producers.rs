//! Producer access modes (Pulsar's PIP-68) through our SDK against an
//! in-process standalone: Shared, Exclusive, WaitForExclusive and
//! ExclusiveWithFencing, with the topic epoch that fences a producer
//! pushed out.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use magnetar_client::{AccessMode, Client, ProducerOptions};
use magnetar_proto::pulsar::ServerError;
use magnetar_tests::{init_logs, StandaloneSpec};

fn mode(access_mode: AccessMode) -> ProducerOptions {
    ProducerOptions {
        access_mode,
        send_timeout_ms: 5_000,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_modes_keep_one_writer_and_fence_the_one_pushed_out() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let spec = StandaloneSpec::new(dir.path());
    let s = spec.start().await;
    let client = Client::connect(&s.service_url()).await.unwrap();
    let topic = "persistent://public/default/one-writer";

    // Shared producers share; an exclusive one is refused while they are there.
    let a = client
        .create_producer(topic, mode(AccessMode::Shared))
        .await
        .unwrap();
    let e = client
        .create_producer(topic, mode(AccessMode::Exclusive))
        .await
        .err()
        .unwrap();
    assert_eq!(e.server_error(), Some(ServerError::ProducerBusy), "{e}");
    a.close().await.unwrap();

    // Exclusive: the only one.
    let x = client
        .create_producer(topic, mode(AccessMode::Exclusive))
        .await
        .unwrap();
    x.send("from x").await.unwrap();
    for m in [AccessMode::Shared, AccessMode::Exclusive] {
        let e = client.create_producer(topic, mode(m)).await.err().unwrap();
        assert_eq!(
            e.server_error(),
            Some(ServerError::ProducerBusy),
            "{m:?}: {e}"
        );
    }

    // WaitForExclusive: queued until x leaves, then the writer.
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .create_producer(topic, mode(AccessMode::WaitForExclusive))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!waiting.is_finished(), "created while x holds the topic");
    x.close().await.unwrap();
    let w = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("w became the writer once x left")
        .unwrap()
        .unwrap();
    w.send("from w").await.unwrap();

    // ExclusiveWithFencing: takes the topic; w is fenced for good.
    let f = client
        .create_producer(topic, mode(AccessMode::ExclusiveWithFencing))
        .await
        .unwrap();
    f.send("from f").await.unwrap();
    let e = w.send("from w, fenced").await.err().unwrap();
    assert_eq!(e.server_error(), Some(ServerError::ProducerFenced), "{e}");
    s.shutdown().await;
}

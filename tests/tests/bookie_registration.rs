//! A bookie whose registration lease is lost (cut off from the metadata
//! service past its TTL, or paused) registers again under a new lease and
//! turns ready again — found by the chaos suite: before, it stayed
//! unregistered, and writers never placed a ledger on it again.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use magnetar_tests::cluster::InProcessCluster;
use magnetar_tests::init_logs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bookie_that_loses_its_lease_registers_again() {
    init_logs();
    let cluster = InProcessCluster::start(1, 1, 0, (1, 1, 1)).await;
    let bookie = cluster.bookies[0].clone();
    let key = format!("/bookies/available/{}", bookie.addr());
    assert!(cluster.metadata.get(&key).await.unwrap().is_some());
    let old = bookie.lease_id().unwrap();
    // What the service does to a lease that is not renewed in time.
    cluster.metadata.revoke_lease(old).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = bookie.lease_id().unwrap();
        let registered = cluster.metadata.get(&key).await.unwrap();
        if let Some(kv) = registered.filter(|_| now != old && bookie.is_ready().is_ok()) {
            assert_eq!(kv.lease, Some(now));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not registered again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.shutdown().await;
}

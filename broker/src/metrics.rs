//! The broker's metric names, and the process's Prometheus recorder (one per
//! process, whatever roles it runs). Meanings: `docs/metrics.md`. Pulsar's
//! topic families are not recorded here: `admin/metrics.rs` renders them
//! from the topics' own counters at scrape time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Receipt sent − SEND read, per entry (a batch is one entry).
pub const PUBLISH_LATENCY: &str = "magnetar_broker_publish_latency_seconds";
/// Dispatch − the message's publish time (the producer's clock): how late
/// consumers get messages, backlog included.
pub const DELIVERY_LAG: &str = "magnetar_broker_delivery_lag_seconds";
/// Client connections open now, and opened since start.
pub const CONNECTIONS: &str = "magnetar_broker_connections";
pub const CONNECTIONS_OPENED: &str = "magnetar_broker_connections_opened_total";
/// Errors sent to clients, by `ServerError` name (label `code`).
pub const ERRORS: &str = "magnetar_broker_errors_total";
/// Bundles taken and given up by this broker; owned now.
pub const BUNDLES_ACQUIRED: &str = "magnetar_broker_bundles_acquired_total";
pub const BUNDLES_RELEASED: &str = "magnetar_broker_bundles_released_total";
pub const BUNDLES_OWNED: &str = "magnetar_broker_bundles_owned";
/// How long unloading a bundle took (close clients, release, hand over).
pub const UNLOAD_DURATION: &str = "magnetar_broker_bundle_unload_seconds";
/// How long loading a topic took (ledger recovery at a new owner: the
/// broker's share of a failover).
pub const TOPIC_LOAD_DURATION: &str = "magnetar_broker_topic_load_seconds";
/// 1 while the broker holds its lease, else 0.
pub const LEASE_HELD: &str = "magnetar_broker_lease_held";
/// Topics loaded on this broker.
pub const TOPICS_LOADED: &str = "magnetar_broker_topics_loaded";

/// Bucket bounds of every `*_seconds` histogram.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Bucket bounds of count histograms (`*_entries`, `*_bytes`).
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0, 65536.0,
    262144.0, 1048576.0, 4194304.0, 16777216.0,
];

static DISABLED: AtomicBool = AtomicBool::new(false);
static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Turns metrics off for this process (before any `install`): nothing is
/// recorded, `/metrics` has Pulsar's topic families only. For measuring
/// what metrics cost.
pub fn disable() {
    DISABLED.store(true, Ordering::SeqCst);
}

/// Installs the process's Prometheus recorder once (later calls return the
/// same handle); none when metrics are off or another recorder was
/// installed first.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            if DISABLED.load(Ordering::SeqCst) {
                return None;
            }
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_entries".into()), COUNT_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), COUNT_BUCKETS)
                });
            let handle = match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    return None;
                }
            };
            // Histograms keep samples until upkeep folds them into buckets.
            let h = handle.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(5));
                    h.run_upkeep();
                });
            describe();
            Some(handle)
        })
        .as_ref()
}

/// The recorder's handle, if installed.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE.get().and_then(|h| h.as_ref())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        PUBLISH_LATENCY,
        Unit::Seconds,
        "SEND read to receipt sent, per entry"
    );
    describe_histogram!(
        DELIVERY_LAG,
        Unit::Seconds,
        "dispatch time minus the message's publish time"
    );
    describe_gauge!(CONNECTIONS, "client connections open");
    describe_counter!(CONNECTIONS_OPENED, "client connections opened");
    describe_counter!(ERRORS, "errors sent to clients, by ServerError");
    describe_counter!(BUNDLES_ACQUIRED, "bundles this broker took");
    describe_counter!(BUNDLES_RELEASED, "bundles this broker gave up");
    describe_gauge!(BUNDLES_OWNED, "bundles this broker owns");
    describe_histogram!(UNLOAD_DURATION, Unit::Seconds, "bundle unload duration");
    describe_histogram!(
        TOPIC_LOAD_DURATION,
        Unit::Seconds,
        "topic load duration (ledger recovery included)"
    );
    describe_gauge!(LEASE_HELD, "1 while the broker holds its lease");
    describe_gauge!(TOPICS_LOADED, "topics loaded on this broker");
}

/// Registers the broker's families at zero, so they are exported (and
/// charted) before their first event.
pub fn register_broker() {
    for h in [
        PUBLISH_LATENCY,
        DELIVERY_LAG,
        UNLOAD_DURATION,
        TOPIC_LOAD_DURATION,
    ] {
        let _ = metrics::histogram!(h);
    }
    for c in [CONNECTIONS_OPENED, BUNDLES_ACQUIRED, BUNDLES_RELEASED] {
        metrics::counter!(c).increment(0);
    }
    metrics::gauge!(CONNECTIONS).increment(0.0);
    magnetar_bookie::metrics::register_ledger_client();
}

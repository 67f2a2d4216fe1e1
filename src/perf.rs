//! `magnetar perf produce|consume`: throughput and publish latency, printed
//! every few seconds and summarised at the end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Subcommand;
use hdrhistogram::Histogram;
use magnetar_client::{Client, ConsumerOptions, ProducerOptions, SubscriptionType};

#[derive(Subcommand)]
pub enum PerfCmd {
    /// Publish as fast as allowed and report throughput and latency.
    Produce {
        topic: String,
        /// Messages per second over all producers (0: unlimited).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        producers: usize,
        #[arg(long, default_value_t = 1)]
        topics: usize,
        #[arg(long, default_value_t = 30)]
        duration: u64,
        #[arg(long, default_value_t = false)]
        batching: bool,
        /// Most sends in flight per producer.
        #[arg(long, default_value_t = 1000)]
        max_pending: usize,
        #[arg(long, default_value = "pulsar://127.0.0.1:6650")]
        service_url: String,
    },
    /// The metadata service: CAS writes, reads, leases, watches, failover.
    Metadata(crate::perf_metadata::MetaPerfArgs),
    /// The bookie tier through the ledger client: writes and recovery.
    Ledger(crate::perf_ledger::LedgerPerfArgs),
    /// Consume and report throughput.
    Consume {
        topic: String,
        #[arg(short = 's', long, default_value = "perf")]
        subscription: String,
        #[arg(long, default_value_t = 30)]
        duration: u64,
        #[arg(long, default_value = "pulsar://127.0.0.1:6650")]
        service_url: String,
    },
}

fn topic_name(base: &str, topics: usize, i: usize) -> String {
    if topics <= 1 {
        base.to_string()
    } else {
        format!("{base}-{i}")
    }
}

fn report(label: &str, msgs: u64, bytes: u64, secs: f64, h: Option<&Histogram<u64>>) {
    let lat = h
        .map(|h| {
            format!(
                " | publish latency ms p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.value_at_quantile(0.999) as f64 / 1000.0,
                h.max() as f64 / 1000.0
            )
        })
        .unwrap_or_default();
    println!(
        "{label}: {:.0} msg/s, {:.2} MB/s{lat}",
        msgs as f64 / secs,
        bytes as f64 / secs / 1e6
    );
}

pub async fn run(cmd: PerfCmd) -> anyhow::Result<()> {
    match cmd {
        PerfCmd::Metadata(args) => crate::perf_metadata::run(args).await?,
        PerfCmd::Ledger(args) => crate::perf_ledger::run(args).await?,
        PerfCmd::Produce {
            topic,
            rate,
            size,
            producers,
            topics,
            duration,
            batching,
            max_pending,
            service_url,
        } => {
            let sent = Arc::new(AtomicU64::new(0));
            let window = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
                1, 60_000_000, 3,
            )?));
            let total = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
                1, 60_000_000, 3,
            )?));
            let errors = Arc::new(AtomicU64::new(0));
            let end = Instant::now() + Duration::from_secs(duration);
            let payload = Bytes::from(vec![b'x'; size]);
            let per_producer_rate = if rate == 0 {
                0
            } else {
                (rate / producers as u64).max(1)
            };
            let mut tasks = Vec::new();
            for i in 0..producers {
                let client = Client::connect(&service_url).await?;
                let opts = ProducerOptions {
                    batching,
                    ..Default::default()
                };
                let producer = Arc::new(
                    client
                        .create_producer(&topic_name(&topic, topics, i % topics.max(1)), opts)
                        .await?,
                );
                let (sent, window, total, errors, payload) = (
                    sent.clone(),
                    window.clone(),
                    total.clone(),
                    errors.clone(),
                    payload.clone(),
                );
                let permits = Arc::new(tokio::sync::Semaphore::new(max_pending));
                tasks.push(tokio::spawn(async move {
                    let _client = client;
                    let start = Instant::now();
                    let mut n: u64 = 0;
                    while Instant::now() < end {
                        if per_producer_rate > 0 {
                            let due = start
                                + Duration::from_secs_f64(n as f64 / per_producer_rate as f64);
                            tokio::time::sleep_until(due.into()).await;
                        }
                        let Ok(permit) = permits.clone().acquire_owned().await else {
                            break;
                        };
                        let t0 = Instant::now();
                        let f = producer.send_async(payload.clone());
                        let (sent, window, total, errors) =
                            (sent.clone(), window.clone(), total.clone(), errors.clone());
                        tokio::spawn(async move {
                            match f.await {
                                Ok(_) => {
                                    let us = t0.elapsed().as_micros() as u64;
                                    let _ = window
                                        .lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .record(us.max(1));
                                    let _ = total
                                        .lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .record(us.max(1));
                                    sent.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(_) => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            drop(permit);
                        });
                        n += 1;
                    }
                    producer.flush();
                    let _ = permits.acquire_many(max_pending as u32).await;
                }));
            }
            let started = Instant::now();
            let mut last = (Instant::now(), 0u64);
            while Instant::now() < end {
                tokio::time::sleep(
                    Duration::from_secs(5)
                        .min(end.saturating_duration_since(Instant::now()))
                        .max(Duration::from_millis(10)),
                )
                .await;
                let now = sent.load(Ordering::Relaxed);
                let secs = last.0.elapsed().as_secs_f64();
                let mut h = window.lock().unwrap_or_else(|e| e.into_inner());
                report(
                    "interval",
                    now - last.1,
                    (now - last.1) * size as u64,
                    secs,
                    Some(&h),
                );
                h.reset();
                last = (Instant::now(), now);
            }
            for t in tasks {
                let _ = t.await;
            }
            let n = sent.load(Ordering::Relaxed);
            let h = total.lock().unwrap_or_else(|e| e.into_inner());
            report(
                &format!(
                    "summary ({n} msgs, {} errors, {size} B, batching {batching})",
                    errors.load(Ordering::Relaxed)
                ),
                n,
                n * size as u64,
                started.elapsed().as_secs_f64(),
                Some(&h),
            );
        }
        PerfCmd::Consume {
            topic,
            subscription,
            duration,
            service_url,
        } => {
            let client = Client::connect(&service_url).await?;
            let opts = ConsumerOptions {
                sub_type: SubscriptionType::Shared,
                earliest: true,
                receiver_queue: 5000,
                ..Default::default()
            };
            let mut consumer = client.subscribe(&topic, &subscription, opts).await?;
            let started = Instant::now();
            let end = started + Duration::from_secs(duration);
            let (mut n, mut bytes) = (0u64, 0u64);
            let mut last = (Instant::now(), 0u64, 0u64);
            while Instant::now() < end {
                if let Some(m) = consumer.receive_timeout(Duration::from_millis(200)).await? {
                    n += 1;
                    bytes += m.payload.len() as u64;
                    consumer.ack(&m)?;
                }
                if last.0.elapsed() >= Duration::from_secs(5) {
                    report(
                        "interval",
                        n - last.1,
                        bytes - last.2,
                        last.0.elapsed().as_secs_f64(),
                        None,
                    );
                    last = (Instant::now(), n, bytes);
                }
            }
            report(
                &format!("summary ({n} msgs)"),
                n,
                bytes,
                started.elapsed().as_secs_f64(),
                None,
            );
        }
    }
    Ok(())
}

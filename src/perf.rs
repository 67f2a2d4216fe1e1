//! `magnetar perf produce|consume|topics`: throughput and publish latency,
//! printed every few seconds and summarised at the end; the longest stall
//! of each producer (a failover or a topic move shows there); how fast
//! topics are looked up and opened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Subcommand;
use hdrhistogram::Histogram;
use magnetar_client::{
    Client, ConsumerOptions, OutgoingMessage, ProducerOptions, SubscriptionType,
};

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
        /// Key the messages round-robin over this many keys (0: no key).
        #[arg(long, default_value_t = 0)]
        keys: u64,
        /// Deliver each message this many ms after it is sent (to Shared
        /// and Key_Shared subscriptions; 0: at once).
        #[arg(long, default_value_t = 0)]
        deliver_after_ms: u64,
        /// Most sends in flight per producer.
        #[arg(long, default_value_t = 1000)]
        max_pending: usize,
        /// Stalls are measured from this many seconds after the start (the
        /// first seconds see topics assigned and balanced).
        #[arg(long, default_value_t = 0)]
        stall_after: u64,
        /// At this many seconds: look every topic up, pick the broker that
        /// serves the most of them, run --event-cmd with `{port}` replaced by
        /// its Pulsar port, and report how long after that each topic's
        /// first message sent afterwards took to be acknowledged.
        #[arg(long, default_value_t = 0)]
        event_at: u64,
        #[arg(long, default_value = "")]
        event_cmd: String,
        /// Write the publish latency distribution to this CSV file
        /// (percentile, latency_ms, count) and a per-second series to
        /// `<file>.series.csv` (second, msgs, msg/s, p50/p99/max ms);
        /// `scripts/plot-perf.py` draws them.
        #[arg(long)]
        histogram_out: Option<std::path::PathBuf>,
        #[arg(long, default_value = "pulsar://127.0.0.1:6650")]
        service_url: String,
    },
    /// The metadata service: CAS writes, reads, leases, watches, failover.
    Metadata(crate::perf_metadata::MetaPerfArgs),
    /// The bookie tier through the ledger client: writes and recovery.
    Ledger(crate::perf_ledger::LedgerPerfArgs),
    /// Looks up and opens a producer on each of COUNT topics (many at once),
    /// reports the rate and latency, then holds them idle for HOLD seconds
    /// (to weigh a broker's memory per topic) and closes them.
    Topics {
        prefix: String,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 0)]
        hold: u64,
        #[arg(long, default_value = "pulsar://127.0.0.1:6650")]
        service_url: String,
    },
    /// Consume and report throughput.
    Consume {
        topic: String,
        #[arg(short = 's', long, default_value = "perf")]
        subscription: String,
        #[arg(long, default_value_t = 30)]
        duration: u64,
        /// exclusive, shared, failover or key-shared.
        #[arg(long, default_value = "shared")]
        sub_type: String,
        /// Consumers on the subscription (one connection each).
        #[arg(long, default_value_t = 1)]
        consumers: usize,
        /// Messages were sent to be delivered this many ms after their
        /// publish time: report how late they came (and any early).
        #[arg(long, default_value_t = 0)]
        lateness_after_ms: u64,
        /// Permits each consumer grants (its receiver queue, in messages).
        #[arg(long, default_value_t = 5000)]
        receiver_queue: u32,
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

/// The latency distribution as CSV (each percentile step HdrHistogram
/// reports, 5 per halving of the tail) and the per-second series beside it.
fn write_histogram(path: &std::path::Path, h: &Histogram<u64>, series: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut out = String::from("percentile,latency_ms,count\n");
    for v in h.iter_quantiles(5) {
        out.push_str(&format!(
            "{:.6},{:.3},{}\n",
            v.quantile_iterated_to(),
            v.value_iterated_to() as f64 / 1000.0,
            v.count_since_last_iteration()
        ));
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
    let mut s = path.as_os_str().to_owned();
    s.push(".series.csv");
    std::fs::write(&s, series).with_context(|| format!("writing {s:?}"))?;
    eprintln!(
        "latency distribution in {}, series in {s:?}",
        path.display()
    );
    Ok(())
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
            keys,
            deliver_after_ms,
            stall_after,
            event_at,
            event_cmd,
            histogram_out,
            service_url,
        } => {
            let mut series = String::from("second,msgs,msg_per_s,p50_ms,p99_ms,max_ms\n");
            let tick = if histogram_out.is_some() {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(5)
            };
            let started_at = Instant::now();
            let stall_from = Instant::now() + Duration::from_secs(stall_after);
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
            let mut stalls = Vec::new();
            let client = connect(&service_url).await?;
            for i in 0..producers {
                let client = client.clone();
                let stall = Arc::new(Stall::new(stall_from));
                stalls.push(stall.clone());
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
                        let msg = OutgoingMessage {
                            payload: payload.clone(),
                            key: (keys > 0).then(|| format!("key-{}", n % keys)),
                            deliver_at_ms: (deliver_after_ms > 0)
                                .then(|| epoch_ms() + deliver_after_ms),
                            ..Default::default()
                        };
                        let f = producer.send_async(msg);
                        let (sent, window, total, errors, stall) = (
                            sent.clone(),
                            window.clone(),
                            total.clone(),
                            errors.clone(),
                            stall.clone(),
                        );
                        tokio::spawn(async move {
                            match f.await {
                                Ok(_) => {
                                    stall.receipt();
                                    stall.after_event(t0);
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
            let mut event: Option<tokio::task::JoinHandle<anyhow::Result<String>>> = None;
            if event_at > 0 {
                let (client, stalls, names) = (
                    client.clone(),
                    stalls.clone(),
                    (0..producers)
                        .map(|i| topic_name(&topic, topics, i % topics.max(1)))
                        .collect::<Vec<_>>(),
                );
                let at = started_at + Duration::from_secs(event_at);
                event = Some(tokio::spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    run_event(&client, &stalls, &names, &event_cmd).await
                }));
            }
            while Instant::now() < end {
                tokio::time::sleep(
                    tick.min(end.saturating_duration_since(Instant::now()))
                        .max(Duration::from_millis(10)),
                )
                .await;
                let now = sent.load(Ordering::Relaxed);
                let secs = last.0.elapsed().as_secs_f64();
                let mut h = window.lock().unwrap_or_else(|e| e.into_inner());
                let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
                series.push_str(&format!(
                    "{:.1},{},{:.0},{:.3},{:.3},{:.3}\n",
                    started.elapsed().as_secs_f64(),
                    now - last.1,
                    (now - last.1) as f64 / secs.max(1e-9),
                    ms(0.5),
                    ms(0.99),
                    h.max() as f64 / 1000.0
                ));
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
            {
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
                if let Some(path) = &histogram_out {
                    write_histogram(path, &h, &series)?;
                }
            }
            report_stalls(&stalls);
            if let Some(e) = event {
                let victim = e.await??;
                report_event(&stalls, &victim);
            }
        }
        PerfCmd::Topics {
            prefix,
            count,
            concurrency,
            hold,
            service_url,
        } => topics_bench(&prefix, count, concurrency, hold, &service_url).await?,
        PerfCmd::Consume {
            topic,
            subscription,
            duration,
            sub_type,
            consumers,
            lateness_after_ms,
            receiver_queue,
            service_url,
        } => {
            let sub_type = match sub_type.as_str() {
                "exclusive" => SubscriptionType::Exclusive,
                "shared" => SubscriptionType::Shared,
                "failover" => SubscriptionType::Failover,
                "key-shared" => SubscriptionType::KeyShared,
                other => {
                    anyhow::bail!("--sub-type {other}: exclusive, shared, failover or key-shared")
                }
            };
            let started = Instant::now();
            let end = started + Duration::from_secs(duration);
            let received = Arc::new(AtomicU64::new(0));
            let received_bytes = Arc::new(AtomicU64::new(0));
            // How late each message came after its due time (ms), and how
            // many came early.
            let lateness = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
                1, 3_600_000, 3,
            )?));
            let early = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for i in 0..consumers.max(1) {
                // A client (connection) per consumer, as separate processes would have.
                let client = connect(&service_url).await?;
                let opts = ConsumerOptions {
                    sub_type,
                    earliest: true,
                    receiver_queue,
                    consumer_name: Some(format!("perf-{i}")),
                    ..Default::default()
                };
                let mut consumer = client.subscribe(&topic, &subscription, opts).await?;
                let (received, received_bytes) = (received.clone(), received_bytes.clone());
                let (lateness, early) = (lateness.clone(), early.clone());
                tasks.push(tokio::spawn(async move {
                    let _client = client;
                    while Instant::now() < end {
                        if let Some(m) =
                            consumer.receive_timeout(Duration::from_millis(200)).await?
                        {
                            received.fetch_add(1, Ordering::Relaxed);
                            if lateness_after_ms > 0 {
                                let due = m.publish_time_ms + lateness_after_ms;
                                let now = epoch_ms();
                                if now < due {
                                    early.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    let _ = lateness
                                        .lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .record((now - due).max(1));
                                }
                            }
                            received_bytes.fetch_add(m.payload.len() as u64, Ordering::Relaxed);
                            consumer.ack(&m)?;
                        }
                    }
                    anyhow::Ok(())
                }));
            }
            let mut last = (Instant::now(), 0u64, 0u64);
            while Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if last.0.elapsed() >= Duration::from_secs(5) {
                    let (n, bytes) = (
                        received.load(Ordering::Relaxed),
                        received_bytes.load(Ordering::Relaxed),
                    );
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
            for t in tasks {
                t.await??;
            }
            let (n, bytes) = (
                received.load(Ordering::Relaxed),
                received_bytes.load(Ordering::Relaxed),
            );
            report(
                &format!("summary ({n} msgs)"),
                n,
                bytes,
                started.elapsed().as_secs_f64(),
                None,
            );
            if lateness_after_ms > 0 {
                let h = lateness.lock().unwrap_or_else(|e| e.into_inner());
                println!(
                    "lateness after the due time: p50 {} ms, p99 {} ms, max {} ms; {} early",
                    h.value_at_quantile(0.5),
                    h.value_at_quantile(0.99),
                    h.max(),
                    early.load(Ordering::Relaxed)
                );
            }
        }
    }
    Ok(())
}

/// A producer's longest time without a receipt: from one successful
/// receipt to the next. Under a steady rate it is about the send interval;
/// when the producer's broker dies or its topic moves, it is the time from
/// the last receipt before to the first after.
struct Stall {
    last: Mutex<Option<Instant>>,
    max_us: AtomicU64,
    /// Gaps that begin before this are not counted.
    from: Instant,
    /// The event (see --event-at), this producer's broker then, and how
    /// long after it the first message sent after it was acknowledged.
    event: Mutex<Option<(Instant, String)>>,
    first_after: Mutex<Option<Duration>>,
}

impl Stall {
    fn new(from: Instant) -> Stall {
        Stall {
            last: Mutex::new(None),
            max_us: AtomicU64::new(0),
            from,
            event: Mutex::new(None),
            first_after: Mutex::new(None),
        }
    }

    /// A message sent at `sent` was acknowledged now.
    fn after_event(&self, sent: Instant) {
        let ev = self.event.lock().unwrap_or_else(|e| e.into_inner());
        let Some((at, _)) = &*ev else { return };
        if sent < *at {
            return;
        }
        let mut f = self.first_after.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(Instant::now().saturating_duration_since(*at));
        }
    }

    fn receipt(&self) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = last.filter(|t| *t >= self.from) {
            let gap = now.saturating_duration_since(t).as_micros() as u64;
            self.max_us.fetch_max(gap, Ordering::Relaxed);
        }
        *last = Some(now);
    }
}

fn quantile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

/// The distribution of the producers' longest stalls, and of those above
/// 250 ms (the producers a failover or a move reached).
fn report_stalls(stalls: &[Arc<Stall>]) {
    let mut all: Vec<u64> = stalls
        .iter()
        .map(|s| s.max_us.load(Ordering::Relaxed))
        .collect();
    all.sort_unstable();
    println!(
        "longest stall per producer ms: p50 {:.1} p99 {:.1} max {:.1} ({} producers)",
        quantile(&all, 0.5),
        quantile(&all, 0.99),
        quantile(&all, 1.0),
        all.len()
    );
    let hit: Vec<u64> = all.iter().copied().filter(|us| *us > 250_000).collect();
    if !hit.is_empty() {
        println!(
            "producers stalled over 250 ms: {} — their stall ms p50 {:.1} p99 {:.1} max {:.1}",
            hit.len(),
            quantile(&hit, 0.5),
            quantile(&hit, 0.99),
            quantile(&hit, 1.0)
        );
    }
}

async fn topics_bench(
    prefix: &str,
    count: usize,
    concurrency: usize,
    hold: u64,
    service_url: &str,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let client = connect(service_url).await?;
    let mut lat = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let started = Instant::now();
    let opened: Vec<_> = futures::stream::iter(0..count)
        .map(|i| {
            let client = client.clone();
            let topic = format!("{prefix}-{i}");
            async move {
                let t0 = Instant::now();
                let r = client
                    .create_producer(&topic, ProducerOptions::default())
                    .await;
                (r, t0.elapsed())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let secs = started.elapsed().as_secs_f64();
    let mut producers = Vec::new();
    let mut errors = 0;
    for (r, d) in opened {
        match r {
            Ok(p) => {
                let _ = lat.record((d.as_micros() as u64).max(1));
                producers.push(p);
            }
            Err(e) => {
                errors += 1;
                tracing::warn!(error = %e, "opening a producer failed");
            }
        }
    }
    println!(
        "opened {} producers on as many topics in {secs:.1} s: {:.0}/s (lookup + producer open), {errors} errors | ms p50 {:.1} p99 {:.1} max {:.1}",
        producers.len(),
        producers.len() as f64 / secs,
        lat.value_at_quantile(0.5) as f64 / 1000.0,
        lat.value_at_quantile(0.99) as f64 / 1000.0,
        lat.max() as f64 / 1000.0
    );
    if hold > 0 {
        println!("holding them idle for {hold} s");
        tokio::time::sleep(Duration::from_secs(hold)).await;
    }
    for p in producers {
        let _ = p.close().await;
    }
    Ok(())
}

/// The event of --event-at: owners looked up, the busiest broker chosen,
/// the command run. Returns the chosen broker's URL.
async fn run_event(
    client: &Client,
    stalls: &[Arc<Stall>],
    topics: &[String],
    cmd: &str,
) -> anyhow::Result<String> {
    let mut owners = Vec::new();
    for t in topics {
        owners.push(client.lookup(t).await?);
    }
    let mut counts: std::collections::HashMap<&String, usize> = Default::default();
    for o in &owners {
        *counts.entry(o).or_default() += 1;
    }
    let victim = counts
        .into_iter()
        .max_by_key(|(o, n)| (*n, (*o).clone()))
        .map(|(o, _)| o.clone())
        .ok_or_else(|| anyhow::anyhow!("no topics"))?;
    let port = victim.rsplit(':').next().unwrap_or_default().to_string();
    let at = Instant::now();
    for (s, o) in stalls.iter().zip(&owners) {
        *s.event.lock().unwrap_or_else(|e| e.into_inner()) = Some((at, o.clone()));
    }
    let cmd = cmd.replace("{port}", &port);
    println!(
        "event: `{cmd}` on {victim} (it served {} of {} topics)",
        owners.iter().filter(|o| **o == victim).count(),
        owners.len()
    );
    tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .status()
        .await?;
    Ok(victim)
}

/// How long after the event each topic's first message sent after it took
/// to be acknowledged: for the topics the chosen broker served, and for
/// the others.
fn report_event(stalls: &[Arc<Stall>], victim: &str) {
    let mut hit = Vec::new();
    let mut rest = Vec::new();
    let mut never = 0;
    for s in stalls {
        let on_victim = s
            .event
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|(_, o)| o == victim);
        match *s.first_after.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(d) if on_victim => hit.push(d.as_micros() as u64),
            Some(d) => rest.push(d.as_micros() as u64),
            None => never += 1,
        }
    }
    hit.sort_unstable();
    rest.sort_unstable();
    println!(
        "event -> first acknowledged publish, topics of {victim}: p50 {:.1} ms p99 {:.1} ms max {:.1} ms ({} topics); other topics: p50 {:.1} ms p99 {:.1} ms ({}); never: {never}",
        quantile(&hit, 0.5),
        quantile(&hit, 0.99),
        quantile(&hit, 1.0),
        hit.len(),
        quantile(&rest, 0.5),
        quantile(&rest, 0.99),
        rest.len()
    );
}

/// Milliseconds since the epoch (the clock of publish and delivery times).
fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A client of `url`; over `pulsar+ssl://` it trusts the CA file named by
/// `MAGNETAR_TLS_TRUST_CERTS_FILE` (else the system's roots).
async fn connect(url: &str) -> Result<Client, magnetar_client::Error> {
    let mut b = Client::builder(url);
    if let Some(ca) = std::env::var_os("MAGNETAR_TLS_TRUST_CERTS_FILE") {
        b = b.tls_trust_certs_file_path(std::path::PathBuf::from(ca));
    }
    b.build().await
}

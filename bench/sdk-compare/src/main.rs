//! Our SDK and the `pulsar` crate side by side, in one run, against the same
//! broker: publish throughput and latency (unbatched and batched, 1 KiB,
//! a window of sends in flight), catch-up consume throughput, and the
//! client's CPU per message (this process's user + system time over the
//! phase; the broker runs in another process).
//!
//!     sdk-compare SERVICE_URL [UNBATCHED_COUNT] [BATCHED_COUNT]

use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;

const SIZE: usize = 1024;

/// CPU seconds this process used so far (user + system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after ")".
    (ticks(11) + ticks(12)) / 100.0
}

#[derive(Default)]
struct Phase {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_msg: f64,
}

struct Clock {
    start: Instant,
    cpu: f64,
}

impl Clock {
    fn start() -> Clock {
        Clock {
            start: Instant::now(),
            cpu: cpu_seconds(),
        }
    }

    fn phase(&self, n: usize, lat: Option<&Histogram<u64>>) -> Phase {
        let secs = self.start.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - self.cpu;
        Phase {
            rate: n as f64 / secs,
            p50_ms: lat.map_or(0.0, |h| h.value_at_quantile(0.5) as f64 / 1000.0),
            p99_ms: lat.map_or(0.0, |h| h.value_at_quantile(0.99) as f64 / 1000.0),
            cpu_us_per_msg: cpu * 1e6 / n as f64,
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

async fn ours_publish(url: &str, topic: &str, n: usize, batched: bool, window: usize) -> Phase {
    let client = magnetar_client::Client::builder(url)
        .build()
        .await
        .expect("connect");
    let mut b = client.producer(topic);
    if batched {
        b = b.batching(1000, 128 * 1024, Duration::from_millis(10));
    }
    let producer = b.create().await.expect("producer");
    let payload = bytes_payload();
    let mut lat = histogram();
    let mut inflight = FuturesUnordered::new();
    let clock = Clock::start();
    for _ in 0..n {
        if inflight.len() >= window {
            if let Some(r) = inflight.next().await {
                let d: Duration = r;
                let _ = lat.record(d.as_micros() as u64);
            }
        }
        let t = Instant::now();
        let f = producer.send_async(payload.clone());
        inflight.push(async move {
            f.await.expect("send");
            t.elapsed()
        });
    }
    producer.flush();
    while let Some(d) = inflight.next().await {
        let _ = lat.record(d.as_micros() as u64);
    }
    let phase = clock.phase(n, Some(&lat));
    producer.close().await.expect("close");
    phase
}

async fn ours_consume(url: &str, topic: &str, n: usize) -> Phase {
    let client = magnetar_client::Client::builder(url)
        .build()
        .await
        .expect("connect");
    let mut consumer = client
        .consumer()
        .topic(topic)
        .subscription("catch-up")
        .initial_position(magnetar_client::InitialPosition::Earliest)
        .receiver_queue_size(1000)
        .subscribe()
        .await
        .expect("subscribe");
    let clock = Clock::start();
    for _ in 0..n {
        let m = consumer.next().await.expect("open").expect("message");
        consumer.ack(&m).expect("ack");
    }
    let phase = clock.phase(n, None);
    consumer.close().await.expect("close");
    phase
}

fn bytes_payload() -> Vec<u8> {
    (0..SIZE).map(|i| (i % 251) as u8).collect()
}

async fn theirs_publish(url: &str, topic: &str, n: usize, batched: bool, window: usize) -> Phase {
    // Its connections' outbound queue holds 100 frames unless told; room
    // for the window of sends in flight (it answers SlowDown beyond it).
    let pulsar: pulsar::Pulsar<_> = pulsar::Pulsar::builder(url, pulsar::TokioExecutor)
        .with_outbound_channel_size(20_000)
        .build()
        .await
        .expect("connect");
    let options = pulsar::producer::ProducerOptions {
        batch_size: batched.then_some(1000),
        batch_byte_size: batched.then_some(128 * 1024),
        batch_timeout: batched.then_some(Duration::from_millis(10)),
        ..Default::default()
    };
    let mut producer = pulsar
        .producer()
        .with_topic(topic)
        .with_options(options)
        .build()
        .await
        .expect("producer");
    let payload = bytes_payload();
    let mut lat = histogram();
    let mut inflight = FuturesUnordered::new();
    let clock = Clock::start();
    for _ in 0..n {
        if inflight.len() >= window {
            if let Some(d) = inflight.next().await {
                let d: Duration = d;
                let _ = lat.record(d.as_micros() as u64);
            }
        }
        let t = Instant::now();
        let f = loop {
            match producer.send_non_blocking(payload.clone()).await {
                Ok(f) => break f,
                // Its queue is full: wait for a receipt, then again.
                Err(e) if e.to_string().contains("SlowDown") => match inflight.next().await {
                    Some(d) => {
                        let d: Duration = d;
                        let _ = lat.record(d.as_micros() as u64);
                    }
                    None => tokio::time::sleep(Duration::from_millis(1)).await,
                },
                Err(e) => panic!("send: {e}"),
            }
        };
        inflight.push(async move {
            f.await.expect("receipt");
            t.elapsed()
        });
    }
    let _ = producer.send_batch().await;
    while let Some(d) = inflight.next().await {
        let _ = lat.record(d.as_micros() as u64);
    }
    clock.phase(n, Some(&lat))
}

async fn theirs_consume(url: &str, topic: &str, n: usize) -> Phase {
    // Its connections' outbound queue holds 100 frames unless told; room
    // for the window of sends in flight (it answers SlowDown beyond it).
    let pulsar: pulsar::Pulsar<_> = pulsar::Pulsar::builder(url, pulsar::TokioExecutor)
        .with_outbound_channel_size(20_000)
        .build()
        .await
        .expect("connect");
    let mut consumer: pulsar::Consumer<Vec<u8>, _> = pulsar
        .consumer()
        .with_topic(topic)
        .with_subscription("catch-up")
        .with_subscription_type(pulsar::SubType::Exclusive)
        .with_batch_size(1000)
        .with_options(
            pulsar::ConsumerOptions::default()
                .with_initial_position(pulsar::consumer::InitialPosition::Earliest),
        )
        .build()
        .await
        .expect("subscribe");
    let clock = Clock::start();
    for _ in 0..n {
        let m = consumer.try_next().await.expect("open").expect("message");
        consumer.ack(&m).await.expect("ack");
    }
    clock.phase(n, None)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "pulsar://127.0.0.1:6650".into());
    let unbatched: usize = args.next().and_then(|v| v.parse().ok()).unwrap_or(50_000);
    let batched: usize = args.next().and_then(|v| v.parse().ok()).unwrap_or(500_000);
    let run = std::process::id();
    let mut rows = Vec::new();
    // FIRST=pulsar runs the `pulsar` crate first (the first phase also
    // warms the standalone up).
    let mut order = ["magnetar-client", "pulsar 6.9"];
    if std::env::var("FIRST").is_ok_and(|v| v == "pulsar") {
        order.reverse();
    }
    for who in order {
        let t = |kind: &str| format!("persistent://public/default/sdk-{run}-{}-{kind}", who.len());
        let (u, b, c) = if who == "magnetar-client" {
            let u = ours_publish(&url, &t("u"), unbatched, false, 1000).await;
            let b = ours_publish(&url, &t("b"), batched, true, 10_000).await;
            let c = ours_consume(&url, &t("b"), batched).await;
            (u, b, c)
        } else {
            let u = theirs_publish(&url, &t("u"), unbatched, false, 1000).await;
            let b = theirs_publish(&url, &t("b"), batched, true, 10_000).await;
            let c = theirs_consume(&url, &t("b"), batched).await;
            (u, b, c)
        };
        eprintln!("{who}: done");
        rows.push((who, u, b, c));
    }
    println!("| client | publish unbatched msg/s | p50 / p99 ms | client CPU µs/msg | publish batched msg/s | p50 / p99 ms | client CPU µs/msg | catch-up msg/s | client CPU µs/msg |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (who, u, b, c) in rows {
        println!(
            "| {who} | {:.0} | {:.1} / {:.1} | {:.1} | {:.0} | {:.1} / {:.1} | {:.2} | {:.0} | {:.2} |",
            u.rate,
            u.p50_ms,
            u.p99_ms,
            u.cpu_us_per_msg,
            b.rate,
            b.p50_ms,
            b.p99_ms,
            b.cpu_us_per_msg,
            c.rate,
            c.cpu_us_per_msg
        );
    }
}

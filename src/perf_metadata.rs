//! `magnetar perf metadata`: the metadata service's figures — CAS writes,
//! linearizable reads, many leases kept alive, watch notification latency,
//! and the time from a leader kill to the first successful write.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use magnetar_metadata::MetadataClient;
use magnetar_proto::tls::TlsMaterial;

#[derive(Args)]
pub struct MetaPerfArgs {
    /// Metadata endpoints, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    metadata: Vec<SocketAddr>,
    /// Directory with ca.pem, node.pem and node-key.pem signed by the cluster CA.
    #[arg(long)]
    tls_dir: PathBuf,
    #[command(subcommand)]
    cmd: MetaPerfCmd,
}

#[derive(Subcommand)]
enum MetaPerfCmd {
    /// Compare-and-swap writes, each worker on its own key.
    Cas {
        #[arg(long, default_value_t = 64)]
        workers: usize,
        #[arg(long, default_value_t = 20)]
        duration: u64,
        #[arg(long, default_value_t = 128)]
        value_size: usize,
    },
    /// Linearizable reads (read-index through the leader).
    Read {
        #[arg(long, default_value_t = 64)]
        workers: usize,
        #[arg(long, default_value_t = 20)]
        duration: u64,
    },
    /// Grants this many leases, keeps them all alive and reports what it
    /// costs: log entries/s (should be ~0: keep-alives stay
    /// on the leader) and the CPU of the given processes.
    Leases {
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        #[arg(long, default_value_t = 10_000)]
        ttl_ms: u64,
        #[arg(long, default_value_t = 30)]
        duration: u64,
        /// Process ids of metadata nodes whose CPU use to report.
        #[arg(long, value_delimiter = ',')]
        pids: Vec<u32>,
    },
    /// Latency from a put being acknowledged to a watcher seeing it.
    Watch {
        #[arg(long, default_value_t = 5_000)]
        count: usize,
        /// Puts per second.
        #[arg(long, default_value_t = 500)]
        rate: u64,
    },
    /// Repeatedly kills the leader with --kill (`{id}` is replaced by its
    /// node id), measures the time until a CAS write succeeds again, then
    /// brings it back with --start and waits until it caught up.
    Failover {
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        #[arg(long)]
        kill: String,
        #[arg(long)]
        start: String,
    },
}

fn client(args: &MetaPerfArgs) -> anyhow::Result<MetadataClient> {
    let tls = TlsMaterial::load(&TlsMaterial::paths_in(&args.tls_dir))
        .with_context(|| format!("loading certificates from {}", args.tls_dir.display()))?;
    crate::metadata_client(&tls, args.metadata.clone())
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 120_000_000, 3)?)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn latency_line(h: &Histogram<u64>) -> String {
    format!(
        "latency ms p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    )
}

/// Runs `workers` copies of `op` for `duration` seconds and reports ops/s
/// and latency.
async fn closed_loop<F, Fut>(
    label: &str,
    workers: usize,
    duration: u64,
    op: F,
) -> anyhow::Result<()>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let hist = Arc::new(Mutex::new(histogram()?));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(duration);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (op, hist, done) = (op.clone(), hist.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = histogram()?;
            let mut i = 0u64;
            while Instant::now() < stop {
                let t = Instant::now();
                op(w, i).await?;
                local.record(t.elapsed().as_micros().max(1) as u64)?;
                i += 1;
            }
            done.fetch_add(i, Ordering::Relaxed);
            hist.lock().unwrap_or_else(|e| e.into_inner()).add(&local)?;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let h = hist.lock().unwrap_or_else(|e| e.into_inner());
    println!(
        "{label}: {:.0} ops/s with {workers} workers over {secs:.1} s | {}",
        done.load(Ordering::Relaxed) as f64 / secs,
        latency_line(&h)
    );
    Ok(())
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub async fn run(args: MetaPerfArgs) -> anyhow::Result<()> {
    let c = client(&args)?;
    match args.cmd {
        MetaPerfCmd::Cas {
            workers,
            duration,
            value_size,
        } => {
            let run_id: u32 = std::process::id();
            let versions = Arc::new((0..workers).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
            closed_loop("cas", workers, duration, move |w, _| {
                let (c, versions) = (c.clone(), versions.clone());
                async move {
                    let key = format!("/perf/cas/{run_id}/{w}");
                    let v = versions[w].load(Ordering::Relaxed);
                    if !c.cas(&key, v, vec![7; value_size], None).await? {
                        bail!("CAS on {key} at version {v} failed: another writer?");
                    }
                    versions[w].store(v + 1, Ordering::Relaxed);
                    Ok(())
                }
            })
            .await?;
        }
        MetaPerfCmd::Read { workers, duration } => {
            c.put("/perf/read", vec![1; 128]).await?;
            closed_loop("linearizable read", workers, duration, move |_, _| {
                let c = c.clone();
                async move {
                    c.get("/perf/read").await?;
                    Ok(())
                }
            })
            .await?;
        }
        MetaPerfCmd::Leases {
            count,
            ttl_ms,
            duration,
            pids,
        } => {
            let t = Instant::now();
            let mut leases = Vec::with_capacity(count);
            for chunk in 0..count.div_ceil(256) {
                let n = (count - chunk * 256).min(256);
                let grants = (0..n).map(|_| c.grant_lease(ttl_ms));
                for l in futures::future::join_all(grants).await {
                    leases.push(l?);
                }
            }
            println!(
                "granted {count} leases (TTL {ttl_ms} ms) in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            let before = c.status().await?;
            let cpu0: Vec<Option<u64>> = pids.iter().map(|p| cpu_ticks(*p)).collect();
            let t = Instant::now();
            tokio::time::sleep(Duration::from_secs(duration)).await;
            let secs = t.elapsed().as_secs_f64();
            let after = c.status().await?;
            let lost = leases.iter().filter(|l| *l.lost.borrow()).count();
            // Every lease renews every TTL/4.
            println!(
                "kept {count} leases alive for {secs:.1} s (each renewed every TTL/4, so ~{:.0} keep-alives/s by design): {:.1} log entries/s, {lost} lost",
                count as f64 * 4000.0 / ttl_ms as f64,
                (after.last_applied.saturating_sub(before.last_applied)) as f64 / secs
            );
            // Clock ticks are 100 per second on Linux.
            for (pid, c0) in pids.iter().zip(cpu0) {
                if let (Some(a), Some(b)) = (c0, cpu_ticks(*pid)) {
                    println!("  pid {pid}: {:.1} % of one core", (b - a) as f64 / secs);
                }
            }
            if lost > 0 {
                bail!("{lost} leases were lost");
            }
        }
        MetaPerfCmd::Watch { count, rate } => {
            let prefix = format!("/perf/watch/{}/", std::process::id());
            let mut w = c.watch(&prefix, 0);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let writer = {
                let (c, prefix) = (c.clone(), prefix.clone());
                tokio::spawn(async move {
                    let every = Duration::from_micros(1_000_000 / rate.max(1));
                    let mut tick = tokio::time::interval(every);
                    for i in 0..count {
                        tick.tick().await;
                        // The value is the write's start time; the latency
                        // counted is write commit + notification.
                        c.put(
                            &format!("{prefix}{}", i % 100),
                            now_micros().to_le_bytes().to_vec(),
                        )
                        .await?;
                    }
                    anyhow::Ok(())
                })
            };
            let mut h = histogram()?;
            for _ in 0..count {
                let ev = tokio::time::timeout(Duration::from_secs(30), w.next())
                    .await
                    .context("watch stalled")?
                    .context("watch ended")?;
                let sent = u64::from_le_bytes(ev.kv.value[..8].try_into()?);
                h.record(now_micros().saturating_sub(sent).max(1))?;
            }
            writer.await??;
            println!(
                "watch: {count} puts at {rate}/s, put-to-notification {}",
                latency_line(&h)
            );
        }
        MetaPerfCmd::Failover {
            rounds,
            kill,
            start,
        } => {
            let key = format!("/perf/failover/{}", std::process::id());
            let mut h = histogram()?;
            for round in 0..rounds {
                // One CAS per round: the key's version is the round number.
                let version = round as u64;
                let leader = c.status().await?.leader.context("no leader")?;
                let sh = |cmd: &str| {
                    std::process::Command::new("sh")
                        .arg("-c")
                        .arg(cmd.replace("{id}", &leader.to_string()))
                        .stdout(std::process::Stdio::null())
                        .status()
                };
                if !sh(&kill)?.success() {
                    bail!("kill command failed");
                }
                let killed = Instant::now();
                if !c.cas(&key, version, vec![1], None).await? {
                    bail!("CAS at version {version} failed");
                }
                let outage = killed.elapsed();
                h.record(outage.as_micros().max(1) as u64)?;
                println!(
                    "round {round}: killed leader {leader}; first write after {:.0} ms",
                    outage.as_secs_f64() * 1000.0
                );
                if !sh(&start)?.success() {
                    bail!("start command failed");
                }
                // Wait until every endpoint answers and has caught up.
                let target = c.status().await?.revision;
                let deadline = Instant::now() + Duration::from_secs(60);
                'wait: loop {
                    let mut all = true;
                    for ep in c.endpoints() {
                        match c.status_of(*ep).await {
                            Ok(s) if s.revision >= target && s.leader.is_some() => {}
                            _ => all = false,
                        }
                    }
                    if all {
                        break 'wait;
                    }
                    if Instant::now() > deadline {
                        bail!("node {leader} did not catch up");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            println!(
                "failover: {rounds} leader kills, time to first successful write ms p50 {:.0} p99 {:.0} max {:.0}",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99)),
                ms(h.max())
            );
        }
    }
    Ok(())
}

//! `magnetar perf ledger`: the bookie tier through the ledger client —
//! adds/s, MB/s and add latency for a given ensemble, entry size and number
//! of ledgers written at once; catch-up reads of a closed ledger; and the
//! time to recover a ledger whose writer died.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use magnetar_bookie::LedgerClient;
use magnetar_proto::rpc::{client_endpoint, RpcClient};
use magnetar_proto::tls::TlsMaterial;

#[derive(Args)]
pub struct LedgerPerfArgs {
    /// Metadata endpoints, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    metadata: Vec<SocketAddr>,
    /// Directory with ca.pem, node.pem and node-key.pem signed by the cluster CA.
    #[arg(long)]
    tls_dir: PathBuf,
    /// Ensemble size, write quorum and ack quorum.
    #[arg(long, default_value = "1,1,1")]
    ensemble: String,
    #[command(subcommand)]
    cmd: LedgerPerfCmd,
}

#[derive(Subcommand)]
enum LedgerPerfCmd {
    /// Adds as fast as allowed, spread over --ledgers ledgers.
    Write {
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        ledgers: usize,
        /// Adds in flight over all ledgers.
        #[arg(long, default_value_t = 1000)]
        inflight: usize,
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// Also print adds/s for every second of the run (to stderr).
        #[arg(long)]
        progress: bool,
    },
    /// Writes --entries to a ledger and closes it, then reads them all
    /// back as a catch-up reader does (--readers ranges at once, each with
    /// the client's read-ahead) and prints reads/s and MB/s. Entries
    /// written long enough before are read from the bookies' entry logs.
    Read {
        #[arg(long, default_value_t = 1_000_000)]
        entries: u64,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 4)]
        readers: u64,
    },
    /// Writes --entries to a ledger, abandons the writer, and times recovery.
    Recover {
        #[arg(long, default_value_t = 10_000)]
        entries: u64,
        #[arg(long, default_value_t = 1024)]
        size: usize,
    },
}

/// How long a write run waits for its last adds after its duration.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

fn quorums(s: &str) -> anyhow::Result<(usize, usize, usize)> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse())
        .collect::<Result<_, _>>()
        .context("--ensemble E,Qw,Qa")?;
    match v[..] {
        [e, w, a] if e >= w && w >= a && a >= 1 => Ok((e, w, a)),
        _ => bail!("--ensemble needs E,Qw,Qa with E >= Qw >= Qa >= 1"),
    }
}

pub async fn run(args: LedgerPerfArgs) -> anyhow::Result<()> {
    let tls = TlsMaterial::load(&TlsMaterial::paths_in(&args.tls_dir))
        .with_context(|| format!("loading certificates from {}", args.tls_dir.display()))?;
    let metadata = crate::metadata_client(&tls, args.metadata.clone())?;
    let lc = LedgerClient::new(metadata, RpcClient::new(client_endpoint(&tls)?));
    let (e, w, a) = quorums(&args.ensemble)?;
    match args.cmd {
        LedgerPerfCmd::Write {
            size,
            ledgers,
            inflight,
            duration,
            progress,
        } => {
            let mut writers = Vec::new();
            for _ in 0..ledgers {
                writers.push(lc.create(e, w, a, BTreeMap::new()).await?);
            }
            let payload = Bytes::from(vec![0x5a; size]);
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut done = 0u64;
            // One task drives every add (no task per add): the figure is
            // the ledger client's, not the harness's.
            let mut pending = FuturesUnordered::new();
            let stop = Instant::now() + Duration::from_secs(duration);
            let started = Instant::now();
            let mut i = 0usize;
            let mut failed = 0u64;
            let (mut tick, mut at_tick) = (started + Duration::from_secs(1), 0u64);
            loop {
                if progress && Instant::now() >= tick {
                    eprintln!(
                        "{:>4} s: {} adds/s",
                        (tick - started).as_secs(),
                        done - at_tick
                    );
                    (tick, at_tick) = (tick + Duration::from_secs(1), done);
                }
                let running = Instant::now() < stop;
                while running && pending.len() < inflight {
                    let add = writers[i % writers.len()].add(payload.clone());
                    i += 1;
                    let t = Instant::now();
                    pending.push(async move { (add.await, t) });
                }
                // Adds still unconfirmed long after the run (no writable
                // bookie left, say) end it with an error, not a hang.
                let next = tokio::time::timeout_at((stop + DRAIN_LIMIT).into(), pending.next());
                let Ok(next) = next.await else {
                    bail!(
                        "{} adds still unconfirmed {} s after the run ended ({failed} failed)",
                        pending.len(),
                        DRAIN_LIMIT.as_secs()
                    );
                };
                match next {
                    Some((Ok(_), t)) => {
                        done += 1;
                        let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                    }
                    Some((Err(_), _)) => failed += 1,
                    None => break,
                }
            }
            if failed > 0 {
                bail!("{failed} adds failed");
            }
            let secs = started.elapsed().as_secs_f64();
            let (n, h) = (done, hist);
            println!(
                "ledger write E/Qw/Qa {e}/{w}/{a}, {size} B entries, {ledgers} ledger(s), {inflight} in flight: \
                 {:.0} adds/s, {:.1} MB/s | add latency ms p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
                n as f64 / secs,
                n as f64 * size as f64 / secs / 1e6,
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.value_at_quantile(0.999) as f64 / 1000.0,
                h.max() as f64 / 1000.0
            );
            for wr in writers {
                wr.close().await?;
            }
        }
        LedgerPerfCmd::Read {
            entries,
            size,
            readers,
        } => {
            if entries == 0 {
                bail!("--entries must be at least 1");
            }
            let wr = lc.create(e, w, a, BTreeMap::new()).await?;
            let t = Instant::now();
            fill(&wr, entries, size).await?;
            let id = wr.ledger_id();
            wr.close().await?;
            println!(
                "wrote ledger {id}: {entries} entries of {size} B in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            let (meta, _) = lc.metadata(id).await?;
            let readers = readers.clamp(1, entries);
            let per = entries.div_ceil(readers);
            let t = Instant::now();
            let ranges = (0..readers).map(|r| {
                let (lc, meta) = (&lc, &meta);
                async move {
                    let (first, last) = (r * per, ((r + 1) * per).min(entries) - 1);
                    let mut bytes = 0u64;
                    // In slices, as a consumer catching up reads a backlog.
                    let mut from = first;
                    while from <= last {
                        let to = (from + 9_999).min(last);
                        for got in lc.read_range(meta, from, to).await {
                            bytes += got?.len() as u64;
                        }
                        from = to + 1;
                    }
                    anyhow::Ok(bytes)
                }
            });
            let mut bytes = 0;
            for b in futures::future::join_all(ranges).await {
                bytes += b?;
            }
            let secs = t.elapsed().as_secs_f64();
            if bytes != entries * size as u64 {
                bail!("read {bytes} bytes, wrote {}", entries * size as u64);
            }
            println!(
                "ledger read E/Qw/Qa {e}/{w}/{a}, {size} B entries, {readers} reader(s): \
                 {:.0} reads/s, {:.1} MB/s ({entries} entries in {secs:.1} s)",
                entries as f64 / secs,
                bytes as f64 / secs / 1e6,
            );
        }
        LedgerPerfCmd::Recover { entries, size } => {
            let wr = lc.create(e, w, a, BTreeMap::new()).await?;
            fill(&wr, entries, size).await?;
            let id = wr.ledger_id();
            drop(wr); // the writer "dies" without closing
            let t = Instant::now();
            let meta = lc.recover(id).await?;
            println!(
                "recovered ledger {id} ({entries} entries, E/Qw/Qa {e}/{w}/{a}) in {:.0} ms; closed at entry {}",
                t.elapsed().as_secs_f64() * 1000.0,
                meta.last_entry_id
            );
        }
    }
    Ok(())
}

/// Adds `entries` entries of `size` bytes, 1,000 in flight.
async fn fill(wr: &magnetar_bookie::LedgerWriter, entries: u64, size: usize) -> anyhow::Result<()> {
    let payload = Bytes::from(vec![0x5a; size]);
    let mut pending = Vec::new();
    for _ in 0..entries {
        pending.push(wr.add(payload.clone()));
        if pending.len() >= 1000 {
            for p in pending.drain(..) {
                p.await?;
            }
        }
    }
    for p in pending {
        p.await?;
    }
    Ok(())
}

//! The chaos suite: the compose cluster of `deploy/docker-compose.yml` (3
//! metadata nodes, 3 bookies with ledgers 3/2/2, brokers scaled 2 → 3 → 2)
//! broken on purpose while producers write to it, judged by the queue
//! checker. Run by `deploy/chaos.sh` (which builds the image first); not in
//! the default test run, since it needs Docker:
//!
//!   deploy/chaos.sh [--duration 10m] [--seed N]
//!
//! Faults, alone and combined, on one role at a time: kill -9 and restart
//! (`docker kill`), a pause past the lease (`docker pause`), a network
//! partition of one member (`docker network disconnect`), a rolling restart
//! of every broker, a broker added and removed, the metadata leader killed.
//! After healing and draining, the checker fails the run on any
//! acknowledged message not delivered, any delivery never produced, any
//! per-key reordering; it counts duplicates. Each run prints a table:
//! faults injected, messages acknowledged, lost, duplicated, reordered, and
//! the longest time each topic could not take a message.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use magnetar_client::{Client, OutgoingMessage, ProducerOptions};
use magnetar_tests::{init_logs, Workload};

/// `docker-compose` on our compose file under a project of its own.
struct Compose {
    project: String,
    file: PathBuf,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run docker");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Compose {
    fn compose(&self, args: &[&str]) -> String {
        run(Command::new("docker-compose")
            .arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(&self.file)
            .args(args))
    }

    fn docker(&self, args: &[&str]) -> String {
        run(Command::new("docker").args(args))
    }

    /// The container of `service` replica `n` (compose v1 names).
    fn container(&self, service: &str, n: usize) -> String {
        format!("{}_{service}_{n}", self.project)
    }

    /// Metadata node or bookie `n` (a service each: `bookie-2`, …).
    fn member(&self, role: &str, n: usize) -> String {
        self.container(&format!("{role}-{n}"), 1)
    }

    fn network(&self) -> String {
        format!("{}_magnetar", self.project)
    }

    /// Waits until every running member reports healthy.
    fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ids = self.compose(&["ps", "-q"]);
            let ids: Vec<&str> = ids.split_whitespace().collect();
            let mut args = vec![
                "inspect",
                "-f",
                "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
            ];
            args.extend(ids.iter().copied());
            let states = self.docker(&args);
            let waiting: Vec<&str> = states
                .lines()
                .filter(|l| l.contains(" running ") && !l.ends_with(" healthy"))
                .collect();
            if waiting.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "not healthy: {waiting:?}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The metadata node that leads now (from its /metrics).
    async fn metadata_leader(&self) -> Option<usize> {
        for n in 1..=3 {
            let url = format!("http://172.28.0.1{n}:2389/metrics");
            let Ok(r) = reqwest::get(&url).await else {
                continue;
            };
            let body = r.text().await.unwrap_or_default();
            if body
                .lines()
                .any(|l| l.starts_with("magnetar_metadata_raft_is_leader") && l.ends_with(" 1"))
            {
                return Some(n);
            }
        }
        None
    }
}

/// One fault: what was done, to whom, for how long.
struct Injected {
    what: String,
    at: Duration,
}

/// A probe's send: value, key, sequence, acknowledged.
type Outcome = (String, String, u64, bool);

/// Sends one message at a time to each topic and records the longest
/// stretch without a successful send, and every outcome for the checker.
struct Probe {
    gaps: Arc<Mutex<BTreeMap<String, Duration>>>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Probe {
    async fn start(client: &Client, topics: &[String]) -> Probe {
        let gaps: Arc<Mutex<BTreeMap<String, Duration>>> = Arc::default();
        let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
        let stop: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let mut tasks = Vec::new();
        for (i, t) in topics.iter().enumerate() {
            let p = client
                .create_producer(t, ProducerOptions::default())
                .await
                .unwrap();
            let (gaps, outcomes, stop, t) =
                (gaps.clone(), outcomes.clone(), stop.clone(), t.clone());
            tasks.push(tokio::spawn(async move {
                let mut last_ok = Instant::now();
                let mut seq = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    seq += 1;
                    let (value, key) = (format!("probe{i}-{seq}"), format!("probe{i}"));
                    let f = p.send_async(OutgoingMessage {
                        payload: value.clone().into_bytes().into(),
                        key: Some(key.clone()),
                        ..Default::default()
                    });
                    let ok = matches!(
                        tokio::time::timeout(Duration::from_secs(60), f).await,
                        Ok(Ok(_))
                    );
                    outcomes.lock().unwrap().push((value, key, seq, ok));
                    if ok {
                        let gap = last_ok.elapsed();
                        let mut g = gaps.lock().unwrap();
                        let worst = g.entry(t.clone()).or_default();
                        *worst = (*worst).max(gap);
                        last_ok = Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }
        Probe {
            gaps,
            outcomes,
            stop,
            tasks,
        }
    }

    async fn stop(self, w: &mut Workload) -> BTreeMap<String, Duration> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        for (value, key, seq, ok) in self.outcomes.lock().unwrap().drain(..) {
            if ok {
                w.checker.sent_acked(&value, &key, seq);
            } else {
                w.checker.sent_unknown(&value, &key, seq);
            }
        }
        self.gaps.lock().unwrap().clone()
    }
}

fn env_secs(name: &str, default: u64) -> Duration {
    let v = std::env::var(name).ok();
    let s = v.as_deref().unwrap_or("");
    let n = if let Some(m) = s.strip_suffix('m') {
        m.parse::<u64>().map(|m| m * 60).ok()
    } else if let Some(h) = s.strip_suffix('h') {
        h.parse::<u64>().map(|h| h * 3600).ok()
    } else {
        s.trim_end_matches('s').parse().ok()
    };
    Duration::from_secs(n.unwrap_or(default))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker and the magnetar:local image: deploy/chaos.sh runs it"]
async fn compose_cluster_loses_nothing_under_faults() {
    init_logs();
    let duration = env_secs("MAGNETAR_CHAOS_DURATION", 300);
    let seed: u64 = std::env::var("MAGNETAR_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let c = Compose {
        project: std::env::var("MAGNETAR_CHAOS_PROJECT").unwrap_or_else(|_| "magnetarchaos".into()),
        file: root.join("deploy/docker-compose.yml"),
    };
    let _ = Command::new("docker-compose")
        .args(["-p", &c.project, "-f"])
        .arg(&c.file)
        .args(["down", "-v", "--remove-orphans"])
        .output();
    c.compose(&["up", "-d"]);
    c.wait_healthy(Duration::from_secs(180));
    // Each broker by its published port and by its address on the compose
    // network (a multi-host URL tries the next when one is down).
    let mut hosts = Vec::new();
    for n in 1..=2 {
        let b = c.container("broker", n);
        let port = c.docker(&["port", &b, "6650/tcp"]);
        if let Some(p) = port.lines().next().and_then(|l| l.rsplit(':').next()) {
            hosts.push(format!("127.0.0.1:{}", p.trim()));
        }
        let ip = c.docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &b,
        ]);
        hosts.push(format!("{}:6650", ip.trim()));
    }
    let url = format!("pulsar://{}", hosts.join(","));
    println!("service URL {url}");
    let client = Client::builder(&url)
        .operation_timeout(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let topics: Vec<String> = (0..4)
        .map(|i| format!("persistent://public/default/chaos-{i}"))
        .collect();
    let mut w = Workload::new(&client, &topics).await;
    let probe = Probe::start(&client, &topics).await;
    let started = Instant::now();
    let mut faults: Vec<Injected> = Vec::new();
    // Faults drawn at random from the seed (the same seed, the same run),
    // each kind once before any repeats; each gets a share of the
    // duration: break, keep writing, heal, settle.
    let schedule = [
        "kill-broker",
        "pause-broker",
        "kill-bookie",
        "partition-bookie",
        "kill-metadata-leader",
        "partition-broker",
        "rolling-restart-brokers",
        "scale-brokers",
        "kill-broker-and-bookie",
    ];
    let slot = (duration / schedule.len() as u32).max(Duration::from_secs(20));
    let mut rng = seed.max(1);
    let mut draw = move || {
        // xorshift64
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng as usize
    };
    let mut bag: Vec<&str> = Vec::new();
    let mut k = 0usize;
    while started.elapsed() + slot <= duration + Duration::from_secs(5) {
        if bag.is_empty() {
            bag = schedule.to_vec();
        }
        let fault = bag.swap_remove(draw() % bag.len());
        k = k.wrapping_add(draw());
        let victim = 1 + (k % 2);
        let at = started.elapsed();
        let what = match fault {
            "kill-broker" => {
                let b = c.container("broker", victim);
                c.docker(&["kill", "-s", "KILL", &b]);
                w.run_for(Duration::from_secs(5)).await;
                c.docker(&["start", &b]);
                format!("kill -9 {b}, restarted after 5 s")
            }
            "pause-broker" => {
                let b = c.container("broker", victim);
                c.docker(&["pause", &b]);
                w.run_for(Duration::from_secs(8)).await;
                c.docker(&["unpause", &b]);
                format!("pause {b} for 8 s (lease 5 s)")
            }
            "kill-bookie" => {
                let b = c.member("bookie", 1 + k % 3);
                c.docker(&["kill", "-s", "KILL", &b]);
                w.run_for(Duration::from_secs(5)).await;
                c.docker(&["start", &b]);
                format!("kill -9 {b}, restarted after 5 s")
            }
            "partition-bookie" => {
                let n = 1 + k % 3;
                let b = c.member("bookie", n);
                c.docker(&["network", "disconnect", &c.network(), &b]);
                w.run_for(Duration::from_secs(10)).await;
                let ip = format!("172.28.0.2{n}");
                c.docker(&["network", "connect", "--ip", &ip, &c.network(), &b]);
                format!("cut {b} off the network for 10 s")
            }
            "kill-metadata-leader" => {
                let n = c.metadata_leader().await.unwrap_or(1);
                let m = c.member("metadata", n);
                c.docker(&["kill", "-s", "KILL", &m]);
                w.run_for(Duration::from_secs(5)).await;
                c.docker(&["start", &m]);
                format!("kill -9 the metadata leader {m}, restarted after 5 s")
            }
            "partition-broker" => {
                let b = c.container("broker", victim);
                c.docker(&["network", "disconnect", &c.network(), &b]);
                w.run_for(Duration::from_secs(10)).await;
                c.docker(&["network", "connect", &c.network(), &b]);
                format!("cut {b} off the network for 10 s")
            }
            "rolling-restart-brokers" => {
                for n in 1..=2 {
                    let b = c.container("broker", n);
                    c.docker(&["stop", "-t", "30", &b]);
                    c.docker(&["start", &b]);
                    c.wait_healthy(Duration::from_secs(60));
                    w.run_for(Duration::from_secs(2)).await;
                }
                "rolling restart of both brokers (SIGTERM, then start)".to_string()
            }
            "scale-brokers" => {
                c.compose(&["up", "-d", "--no-recreate", "--scale", "broker=3"]);
                c.wait_healthy(Duration::from_secs(60));
                w.run_for(Duration::from_secs(8)).await;
                c.compose(&["up", "-d", "--no-recreate", "--scale", "broker=2"]);
                "a third broker added, then removed".to_string()
            }
            _ => {
                let b = c.container("broker", victim);
                let k2 = c.member("bookie", 1 + k % 3);
                c.docker(&["kill", "-s", "KILL", &b, &k2]);
                w.run_for(Duration::from_secs(5)).await;
                c.docker(&["start", &b, &k2]);
                format!("kill -9 {b} and {k2} together, restarted after 5 s")
            }
        };
        println!("[{:>5.1}s] {what}", at.as_secs_f64());
        faults.push(Injected { what, at });
        c.wait_healthy(Duration::from_secs(120));
        let rest = slot.saturating_sub(started.elapsed() - at);
        w.run_for(rest.max(Duration::from_secs(2))).await;
    }
    let gaps = probe.stop(&mut w).await;
    let v = w.judge(&client, "chaos").await;
    println!(
        "\nchaos run: {:.0} s, seed {seed}",
        started.elapsed().as_secs_f64()
    );
    println!("| faults injected | acknowledged | lost | duplicated | reordered |");
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} |",
        faults.len(),
        v.acked,
        v.lost.len(),
        v.duplicates,
        v.order_violations.len()
    );
    println!("\n| topic | longest unavailability |\n|---|---|");
    for (t, g) in &gaps {
        println!("| {t} | {:.1} s |", g.as_secs_f64());
    }
    for f in &faults {
        println!("- [{:>5.1}s] {}", f.at.as_secs_f64(), f.what);
    }
    client.close().await;
    if std::env::var_os("MAGNETAR_CHAOS_KEEP").is_none() {
        c.compose(&["down", "-v"]);
    }
}

//! Cluster test harness: start Magnetar in-process or as a real process, and
//! the queue checker that judges end-to-end runs.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod cluster;
pub mod prometheus;

use magnetar_broker::standalone::{Standalone, StandaloneConfig};

/// A UDP port free right now (QUIC tiers need stable ports across restarts,
/// because ledger metadata names bookies by address).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("no free UDP port")
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("no free TCP port")
}

/// A base port with `n` consecutive ports free on loopback (UDP and TCP),
/// for scripts that number their ports from a base. It is taken below the
/// kernel's ephemeral range: ports handed out for outgoing connections
/// would otherwise land on a cluster's ports not bound yet (a member added
/// later, say).
pub fn free_port_range(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let low = 10_000u16;
    let high = ephemeral_low.saturating_sub(n).max(low + n + 1);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ ((std::process::id() as u64) << 32)
        ^ CALLS
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for _ in 0..500 {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let base = low + ((seed >> 33) % u64::from(high - low)) as u16;
        let all_free = (base..base + n).all(|p| {
            UdpSocket::bind(("127.0.0.1", p)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
        });
        if all_free {
            return base;
        }
    }
    panic!("no {n} consecutive free ports");
}

/// A local cluster of 3 metadata nodes, `bookies` bookies and a broker
/// writing 3/2/2 ensembles; a client of it; the "checker" subscription made
/// on `topic` (so that it sees everything); and a producer on `topic`
/// (batching when asked).
pub async fn bookie_cluster(
    dir: &Path,
    bookies: u16,
    topic: &str,
    batching: bool,
) -> (
    LocalCluster,
    magnetar_client::Client,
    magnetar_client::Producer,
) {
    use magnetar_client::{Client, ConsumerOptions, ProducerOptions};
    let cluster = LocalCluster::new(dir.join("lc"), bookies.max(3));
    let bookies = bookies.to_string();
    cluster.run(&[
        "up",
        "--metadata",
        "3",
        "--bookies",
        &bookies,
        "--brokers",
        "1",
        "--ensemble",
        "3,2,2",
    ]);
    let url = format!("pulsar://127.0.0.1:{}", cluster.ports[2]);
    let client = Client::connect(&url).await.expect("client connects");
    let checker = ConsumerOptions {
        earliest: true,
        ..Default::default()
    };
    client
        .subscribe(topic, "checker", checker)
        .await
        .expect("checker subscribes")
        .close()
        .await
        .expect("checker closes");
    let options = ProducerOptions {
        batching,
        batch_delay_ms: 2,
        ..Default::default()
    };
    let producer = client
        .create_producer(topic, options)
        .await
        .expect("producer opens");
    (cluster, client, producer)
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MAGNETAR_LOG")
                .unwrap_or_else(|_| "warn,openraft=error".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Ports and data dir of one standalone, reusable across restarts.
#[derive(Debug, Clone)]
pub struct StandaloneSpec {
    pub data_dir: PathBuf,
    pub broker_port: u16,
    pub http_port: u16,
    pub metadata_port: u16,
    pub bookie_port: u16,
}

impl StandaloneSpec {
    pub fn new(data_dir: &Path) -> StandaloneSpec {
        StandaloneSpec {
            data_dir: data_dir.to_path_buf(),
            broker_port: free_tcp_port(),
            http_port: free_tcp_port(),
            metadata_port: free_udp_port(),
            bookie_port: free_udp_port(),
        }
    }

    pub fn config(&self) -> StandaloneConfig {
        let mut c = StandaloneConfig::new(self.data_dir.clone());
        c.broker_port = self.broker_port;
        c.http_port = self.http_port;
        c.metadata_port = self.metadata_port;
        c.bookie_port = self.bookie_port;
        c
    }

    pub fn service_url(&self) -> String {
        format!("pulsar://127.0.0.1:{}", self.broker_port)
    }

    pub async fn start(&self) -> Standalone {
        Standalone::start(self.config())
            .await
            .expect("standalone starts")
    }

    pub async fn start_with(&self, f: impl FnOnce(&mut StandaloneConfig)) -> Standalone {
        let mut c = self.config();
        f(&mut c);
        Standalone::start(c).await.expect("standalone starts")
    }
}

/// The `magnetar` binary next to the test executable (built by `cargo test --workspace`).
pub fn magnetar_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MAGNETAR_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test exe path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join("magnetar")
}

/// `magnetar admin <args>` against the metadata nodes at `endpoints`, with
/// the certificate in `tls_dir`; its output (a failure fails the test).
pub fn admin(tls_dir: &Path, endpoints: &[SocketAddr], args: &[&str]) -> String {
    let list: Vec<String> = endpoints.iter().map(|a| a.to_string()).collect();
    let mut cmd = Command::new(magnetar_bin());
    cmd.args(["admin", "--metadata", &list.join(","), "--tls-dir"])
        .arg(tls_dir)
        .args(args);
    stdout_of(cmd, &format!("magnetar admin {args:?}"))
}

/// `magnetar admin --url <url> <args>` (the REST commands); its output (a
/// failure fails the test).
pub fn admin_rest(url: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(magnetar_bin());
    cmd.args(["admin", "--url", url]).args(args);
    stdout_of(cmd, &format!("magnetar admin {args:?}"))
}

/// Runs `cmd` to its end; its standard output (a failure fails the test,
/// showing both outputs).
fn stdout_of(mut cmd: Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `magnetar standalone` as a child process.
pub struct Process {
    pub child: Child,
    pub spec: StandaloneSpec,
}

impl Process {
    pub fn start(spec: &StandaloneSpec) -> Process {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.data_dir.with_extension("log"))
            .expect("log file");
        let child = Command::new(magnetar_bin())
            .args(["standalone", "--data-dir"])
            .arg(&spec.data_dir)
            .args(["--broker-port", &spec.broker_port.to_string()])
            .args(["--http-port", &spec.http_port.to_string()])
            .args(["--metadata-port", &spec.metadata_port.to_string()])
            .args(["--bookie-port", &spec.bookie_port.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn magnetar");
        Process {
            child,
            spec: spec.clone(),
        }
    }

    /// Waits until the broker accepts connections.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if magnetar_client::Client::connect(&self.spec.service_url())
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("magnetar did not become ready in {timeout:?}");
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `deploy/local-cluster.sh` driven from a test, on its own directory and
/// ports; `down` when dropped.
pub struct LocalCluster {
    pub dir: PathBuf,
    /// Base ports of metadata nodes, bookies and brokers.
    pub ports: [u16; 3],
    /// Base port of the brokers' HTTP listeners (0: the script's default).
    pub http_port: u16,
    /// Base ports of the metadata nodes' and bookies' HTTP listeners.
    pub node_http_ports: [u16; 2],
}

impl LocalCluster {
    /// A cluster in `dir` with free ports for `n` members of each role.
    pub fn new(dir: PathBuf, n: u16) -> LocalCluster {
        LocalCluster {
            dir,
            ports: [free_port_range(n), free_port_range(n), free_port_range(n)],
            http_port: free_port_range(n),
            // One more: a test may `add` a member.
            node_http_ports: [free_port_range(n + 1), free_port_range(n + 1)],
        }
    }

    pub fn run(&self, args: &[&str]) -> String {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut cmd = Command::new(root.join("deploy/local-cluster.sh"));
        cmd.args(args)
            .arg("--dir")
            .arg(&self.dir)
            .env("MAGNETAR_BIN", magnetar_bin())
            .env("MAGNETAR_LC_METADATA_PORT", self.ports[0].to_string())
            .env("MAGNETAR_LC_BOOKIE_PORT", self.ports[1].to_string())
            .env("MAGNETAR_LC_BROKER_PORT", self.ports[2].to_string())
            .env(
                "MAGNETAR_LC_METADATA_HTTP_PORT",
                self.node_http_ports[0].to_string(),
            )
            .env(
                "MAGNETAR_LC_BOOKIE_HTTP_PORT",
                self.node_http_ports[1].to_string(),
            );
        if self.http_port != 0 {
            cmd.env("MAGNETAR_LC_HTTP_PORT", self.http_port.to_string());
        }
        stdout_of(cmd, &format!("local-cluster.sh {args:?}"))
    }

    /// `magnetar admin <args>` against this cluster's metadata nodes (the
    /// first `metadata_nodes` ports), with the admin certificate `up` made.
    pub fn admin(&self, metadata_nodes: u16, args: &[&str]) -> String {
        let endpoints: Vec<SocketAddr> = (0..metadata_nodes)
            .map(|i| ([127, 0, 0, 1], self.ports[0] + i).into())
            .collect();
        admin(&self.dir.join("admin/tls"), &endpoints, args)
    }

    /// The state column of `status` for `member`.
    pub fn state(&self, member: &str) -> String {
        let status = self.run(&["status"]);
        let line = status
            .lines()
            .find(|l| l.starts_with(&format!("{member} ")))
            .unwrap_or_else(|| panic!("{member} missing from status:\n{status}"));
        line.split_whitespace()
            .nth(2)
            .expect("status line has a state column")
            .to_string()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| self.run(&["down"]));
        if std::thread::panicking() {
            self.print_log_tails();
        }
    }
}

impl LocalCluster {
    /// The last lines of every member's log, so a failed test says what the
    /// processes saw (their data dirs go with the test's temporary dir).
    fn print_log_tails(&self) {
        const TAIL: usize = 60;
        let Ok(dirs) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut members: Vec<PathBuf> = dirs.flatten().map(|d| d.path()).collect();
        members.sort();
        for m in members {
            let Ok(log) = std::fs::read_to_string(m.join("log")) else {
                continue;
            };
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(TAIL);
            eprintln!("==== {} (last {} lines)", m.display(), lines.len() - from);
            for l in &lines[from..] {
                eprintln!("{l}");
            }
        }
    }
}

/// One `magnetar <role> --config FILE` child process (metadata, bookie or
/// broker), logging to `log`; killed with SIGKILL when dropped.
pub struct Member {
    pub child: Child,
    pub role: String,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Member {
    pub fn spawn(role: &str, config: &Path, log: &Path) -> Member {
        Member {
            child: Self::spawn_child(role, config, log),
            role: role.into(),
            config: config.into(),
            log: log.into(),
        }
    }

    fn spawn_child(role: &str, config: &Path, log: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        Command::new(magnetar_bin())
            .args([role, "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn magnetar")
    }

    /// Starts the same member again after it was killed.
    pub fn restart(&mut self) {
        self.kill9();
        self.child = Self::spawn_child(&self.role, &self.config, &self.log);
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A send's outcome, boxed so sends of many producers share one list.
pub type SendFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<magnetar_client::MessageId, magnetar_client::Error>>
            + Send,
    >,
>;

/// Judges a queue run: every acknowledged message delivered, nothing
/// delivered that was never sent, per-key order kept; duplicates counted.
/// Sends whose outcome is unknown may or may not show up.
#[derive(Debug, Default)]
pub struct QueueChecker {
    acked: BTreeMap<String, (String, u64)>,
    unknown: BTreeMap<String, (String, u64)>,
    delivered: HashMap<String, u32>,
    last_per_key: HashMap<String, u64>,
    pub order_violations: Vec<String>,
}

#[derive(Debug)]
pub struct Verdict {
    pub acked: usize,
    pub lost: Vec<String>,
    pub unexpected: Vec<String>,
    pub duplicates: usize,
    /// The values delivered more than once.
    pub duplicated: Vec<String>,
    pub order_violations: Vec<String>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.unexpected.is_empty() && self.order_violations.is_empty()
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "acked {}, lost {}, unexpected {}, duplicates {}",
            self.acked,
            self.lost.len(),
            self.unexpected.len(),
            self.duplicates
        )
    }
}

impl QueueChecker {
    /// Waits (until `within` from now) for each send's outcome: confirmed
    /// ones must be delivered later, the others may or may not be.
    /// `sends` holds (value, key, sequence, the send's future).
    pub async fn settle<T, E>(
        &mut self,
        sends: Vec<(
            String,
            String,
            u64,
            impl std::future::Future<Output = Result<T, E>>,
        )>,
        within: Duration,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        for (value, key, seq, f) in sends {
            match tokio::time::timeout_at(deadline, f).await {
                Ok(Ok(_)) => self.sent_acked(&value, &key, seq),
                _ => self.sent_unknown(&value, &key, seq),
            }
        }
    }

    /// Receives (and acknowledges) until nothing arrives for `idle`.
    pub async fn drain(&mut self, consumer: &mut magnetar_client::Consumer, idle: Duration) {
        while let Some(m) = consumer
            .receive_timeout(idle)
            .await
            .expect("receive from the checker's consumer")
        {
            self.delivered(&String::from_utf8_lossy(&m.payload));
            consumer.ack(&m).expect("ack");
        }
    }

    pub fn sent_acked(&mut self, value: &str, key: &str, seq: u64) {
        self.acked.insert(value.into(), (key.into(), seq));
    }

    pub fn sent_unknown(&mut self, value: &str, key: &str, seq: u64) {
        self.unknown.insert(value.into(), (key.into(), seq));
    }

    pub fn delivered(&mut self, value: &str) {
        let n = self.delivered.entry(value.into()).or_default();
        *n += 1;
        if *n > 1 {
            return;
        }
        if let Some((key, seq)) = self.acked.get(value).or(self.unknown.get(value)) {
            let last = self.last_per_key.entry(key.clone()).or_insert(0);
            if *seq < *last {
                self.order_violations
                    .push(format!("{value} (key {key}, seq {seq}) after seq {last}"));
            }
            *last = (*last).max(*seq);
        }
    }

    pub fn verdict(&self) -> Verdict {
        Verdict {
            acked: self.acked.len(),
            lost: self
                .acked
                .keys()
                .filter(|v| !self.delivered.contains_key(*v))
                .cloned()
                .collect(),
            unexpected: self
                .delivered
                .keys()
                .filter(|v| !self.acked.contains_key(*v) && !self.unknown.contains_key(*v))
                .cloned()
                .collect(),
            duplicates: self
                .delivered
                .values()
                .map(|n| (*n as usize).saturating_sub(1))
                .sum(),
            duplicated: self
                .delivered
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(v, _)| v.clone())
                .collect(),
            order_violations: self.order_violations.clone(),
        }
    }
}

/// Producers on many topics judged by a queue checker: a checker
/// subscription on each topic (made first, so it sees everything) and a
/// batching producer on each; messages keyed by topic (order is per topic).
pub struct Workload {
    pub topics: Vec<String>,
    pub producers: Vec<magnetar_client::Producer>,
    pub checker: QueueChecker,
    inflight: Vec<(String, String, u64, SendFuture)>,
    next: u64,
}

impl Workload {
    pub async fn new(client: &magnetar_client::Client, topics: &[String]) -> Workload {
        use magnetar_client::{ConsumerOptions, ProducerOptions};
        let topics = topics.to_vec();
        let mut producers = Vec::new();
        for t in &topics {
            let opts = ConsumerOptions {
                earliest: true,
                ..Default::default()
            };
            client
                .subscribe(t, "checker", opts)
                .await
                .expect("checker subscription")
                .close()
                .await
                .expect("close the checker");
            let p = ProducerOptions {
                batching: true,
                batch_delay_ms: 2,
                ..Default::default()
            };
            producers.push(client.create_producer(t, p).await.expect("producer"));
        }
        Workload {
            topics,
            producers,
            checker: QueueChecker::default(),
            inflight: Vec::new(),
            next: 0,
        }
    }

    /// One message to every topic (keyed by topic: order is per topic).
    pub fn send_round(&mut self) {
        let i = self.next;
        self.next += 1;
        for (t, p) in self.producers.iter().enumerate() {
            let (value, key) = (format!("t{t}-m{i}"), format!("t{t}"));
            let f = p.send_async(magnetar_client::OutgoingMessage {
                payload: value.clone().into_bytes().into(),
                key: Some(key.clone()),
                ..Default::default()
            });
            self.inflight.push((value, key, i, Box::pin(f)));
        }
    }

    /// Sends `rounds` rounds, about 100 a second.
    pub async fn run(&mut self, rounds: u64) {
        for _ in 0..rounds {
            self.send_round();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends rounds for `d`, about 50 a second.
    pub async fn run_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.send_round();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the outcomes, drains every topic, returns the verdict.
    /// Fails the test on any loss, stranger or reordering, or when fewer
    /// than 95 % of the sends were acknowledged.
    pub async fn judge(mut self, client: &magnetar_client::Client, phase: &str) -> Verdict {
        use magnetar_client::ConsumerOptions;
        for p in &self.producers {
            p.flush();
        }
        let sent = self.inflight.len();
        self.checker
            .settle(std::mem::take(&mut self.inflight), Duration::from_secs(90))
            .await;
        for t in &self.topics {
            let opts = ConsumerOptions {
                earliest: true,
                ..Default::default()
            };
            let mut c = client
                .subscribe(t, "checker", opts)
                .await
                .expect("checker subscription");
            self.checker.drain(&mut c, Duration::from_secs(3)).await;
            c.close().await.expect("close the checker");
        }
        let v = self.checker.verdict();
        println!("{phase}: sent {sent}, {v}");
        assert!(v.ok(), "{phase}: {v:?}");
        assert!(
            v.acked * 100 >= sent * 95,
            "{phase}: most sends were acknowledged: {v}"
        );
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checker_finds_loss_strangers_and_reordering() {
        let mut c = QueueChecker::default();
        c.sent_acked("a1", "a", 1);
        c.sent_acked("a2", "a", 2);
        c.sent_unknown("a3", "a", 3);
        c.delivered("a2");
        c.delivered("a1");
        c.delivered("zz");
        c.delivered("a2");
        let v = c.verdict();
        assert!(!v.ok());
        assert_eq!(v.lost, Vec::<String>::new());
        assert_eq!(v.unexpected, vec!["zz".to_string()]);
        assert_eq!(v.duplicates, 1);
        assert_eq!(v.order_violations.len(), 1);
        let mut c = QueueChecker::default();
        c.sent_acked("x", "k", 1);
        assert_eq!(c.verdict().lost, vec!["x".to_string()]);
    }
}

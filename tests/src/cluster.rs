//! An in-process cluster: metadata nodes, bookies and brokers in the test's
//! own process, on loopback ports, talking the same protocols as separate
//! processes do. Brokers can be stopped gracefully, crashed (as a process
//! death looks to the others: ports closed, lease neither renewed nor
//! revoked) and started again on their ports, and added.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use magnetar_bookie::{Bookie, BookieConfig, LedgerClient};
use magnetar_broker::{Broker, BrokerConfig, ManagedLedgerConfig};
use magnetar_metadata::{MetadataClient, MetadataConfig, MetadataNode};
use magnetar_proto::rpc::{client_endpoint, RpcClient};
use magnetar_proto::tls::TlsMaterial;

use crate::{free_tcp_port, free_udp_port};

/// A broker's ports (Pulsar, HTTP) and the broker while it runs.
pub type BrokerSlot = ((u16, u16), Option<Arc<Broker>>);

pub struct InProcessCluster {
    _dir: tempfile::TempDir,
    tls: TlsMaterial,
    pub metadata_nodes: Vec<Arc<MetadataNode>>,
    pub bookies: Vec<Arc<Bookie>>,
    pub brokers: Vec<BrokerSlot>,
    pub metadata: MetadataClient,
    ensemble: (usize, usize, usize),
    /// Brokers started from now on also listen for TLS clients with this
    /// certificate (see `enable_client_tls`).
    client_tls: Option<magnetar_proto::tls::ServerCert>,
}

fn loopback(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

impl InProcessCluster {
    /// `metadata` nodes, `bookies` bookies and `brokers` brokers writing
    /// ledgers of `ensemble` (E, Qw, Qa).
    pub async fn start(
        metadata: u64,
        bookies: usize,
        brokers: usize,
        ensemble: (usize, usize, usize),
    ) -> InProcessCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let tls = TlsMaterial::load_or_generate(&dir.path().join("tls")).expect("tls material");
        let addrs: Vec<(u64, SocketAddr)> = (1..=metadata)
            .map(|id| (id, loopback(free_udp_port())))
            .collect();
        let members: Vec<(u64, String)> =
            addrs.iter().map(|(id, a)| (*id, a.to_string())).collect();
        let starts = addrs.iter().map(|(id, addr)| {
            let mut c = MetadataConfig::new(*id, *addr, dir.path().join(format!("metadata-{id}")));
            c.advertise = Some(addr.to_string());
            c.initial_members = members.clone();
            MetadataNode::start(c, &tls)
        });
        let metadata_nodes: Vec<Arc<MetadataNode>> = futures::future::join_all(starts)
            .await
            .into_iter()
            .map(|n| n.expect("metadata node starts"))
            .collect();
        for n in &metadata_nodes {
            if n.wait_for_leader(Duration::from_secs(30)).await {
                break;
            }
        }
        let rpc = RpcClient::new(client_endpoint(&tls).expect("client endpoint"));
        let md = MetadataClient::new(rpc, addrs.iter().map(|(_, a)| *a).collect());
        Broker::create_namespace(&md, "public/default", 16)
            .await
            .expect("namespace");
        let mut bs = Vec::new();
        for i in 0..bookies {
            let c = BookieConfig::new(
                loopback(free_udp_port()),
                dir.path().join(format!("bookie-{i}")),
            );
            bs.push(Bookie::start(c, &tls, &md).await.expect("bookie starts"));
        }
        let mut cluster = InProcessCluster {
            _dir: dir,
            tls,
            metadata_nodes,
            bookies: bs,
            brokers: Vec::new(),
            metadata: md,
            ensemble,
            client_tls: None,
        };
        for _ in 0..brokers {
            cluster.add_broker().await;
        }
        cluster
    }

    fn broker_config(&self, ports: (u16, u16)) -> BrokerConfig {
        let mut c = BrokerConfig::new(loopback(ports.0));
        c.http_listen = Some(loopback(ports.1));
        c.managed_ledger = ManagedLedgerConfig {
            ensemble_size: self.ensemble.0,
            write_quorum: self.ensemble.1,
            ack_quorum: self.ensemble.2,
            ..Default::default()
        };
        c.load_manager.interval_ms = 1000;
        if let Some(t) = &self.client_tls {
            c.tls_listen = Some(loopback(0));
            c.tls_cert_file = Some(t.cert.clone());
            c.tls_key_file = Some(t.key.clone());
        }
        c
    }

    /// Brokers started after this also serve `pulsar+ssl://` on a port of
    /// their own, with a certificate for 127.0.0.1 and localhost; returns
    /// the CA certificate clients trust.
    pub fn enable_client_tls(&mut self) -> std::path::PathBuf {
        let names = ["127.0.0.1".to_string(), "localhost".to_string()];
        let cert = TlsMaterial::issue_server(&self._dir.path().join("client-tls"), &names)
            .expect("client TLS certificate");
        let ca = cert.ca_cert.clone();
        self.client_tls = Some(cert);
        ca
    }

    /// Every broker's TLS address, as a multi-host `pulsar+ssl://` URL.
    pub fn service_url_tls(&self) -> String {
        let hosts: Vec<String> = self
            .brokers
            .iter()
            .filter_map(|(_, b)| b.as_ref()?.tls_addr)
            .map(|a| a.to_string())
            .collect();
        format!("pulsar+ssl://{}", hosts.join(","))
    }

    async fn run_broker(&self, ports: (u16, u16)) -> Arc<Broker> {
        let rpc = RpcClient::new(client_endpoint(&self.tls).expect("client endpoint"));
        let ledgers = LedgerClient::new(self.metadata.clone(), rpc);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            // A port just closed by a crashed broker may take a moment.
            match Broker::start(
                self.broker_config(ports),
                self.metadata.clone(),
                ledgers.clone(),
            )
            .await
            {
                Ok(b) => return b,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "broker not started yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("broker does not start: {e}"),
            }
        }
    }

    /// Starts one more broker; its index.
    pub async fn add_broker(&mut self) -> usize {
        let ports = (free_tcp_port(), free_tcp_port());
        let b = self.run_broker(ports).await;
        self.brokers.push((ports, Some(b)));
        self.brokers.len() - 1
    }

    /// Every broker's Pulsar address, as a multi-host service URL.
    pub fn service_url(&self) -> String {
        let hosts: Vec<String> = self
            .brokers
            .iter()
            .map(|((p, _), _)| format!("127.0.0.1:{p}"))
            .collect();
        format!("pulsar://{}", hosts.join(","))
    }

    /// The index of the broker at `url` (`pulsar://127.0.0.1:PORT`).
    pub fn index_of(&self, url: &str) -> usize {
        let port: u16 = url
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .expect("a port in the URL");
        self.brokers
            .iter()
            .position(|((p, _), _)| *p == port)
            .expect("a broker of this cluster")
    }

    pub fn broker(&self, i: usize) -> Arc<Broker> {
        self.brokers[i].1.clone().expect("broker running")
    }

    /// SIGTERM: unloads every bundle to the others, then stops.
    pub async fn stop_broker(&mut self, i: usize) {
        if let Some(b) = self.brokers[i].1.take() {
            b.shutdown().await;
        }
    }

    /// kill -9, as the rest of the cluster sees it.
    pub fn crash_broker(&mut self, i: usize) {
        if let Some(b) = self.brokers[i].1.take() {
            b.crash();
        }
    }

    /// Starts broker `i` again on its ports.
    pub async fn restart_broker(&mut self, i: usize) {
        let b = self.run_broker(self.brokers[i].0).await;
        self.brokers[i].1 = Some(b);
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.brokers.len() {
            self.stop_broker(i).await;
        }
        for b in &self.bookies {
            b.shutdown().await;
        }
        for n in &self.metadata_nodes {
            n.shutdown().await;
        }
    }
}

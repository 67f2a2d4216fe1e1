//! `Broker`: builds, owns, starts and stops the broker's parts. Nothing
//! below this module holds it; the parts get narrow handles.
//!
//! Start: bind the Pulsar listener first (a broker whose address refuses
//! connections is taken for dead, see `ownership`), then take a lease and
//! register, then serve. Stop (SIGTERM): unload every bundle to the other
//! brokers, revoke the lease, then close the listener.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use magnetar_bookie::LedgerClient;
use magnetar_metadata::MetadataClient;
use tokio::net::TcpListener;

use crate::admin::http::{self, AdminContext};
use crate::load::report::Reporter;
use crate::load::{commands, manager};
use crate::managed_ledger::Stores;
use crate::ownership::namespaces::{self, Namespaces};
use crate::ownership::registration::{BrokerInfo, Registration};
use crate::ownership::{assign, Ownership};
use crate::protocol::{connection, ProtocolContext};
use crate::topic::TopicRegistry;
use crate::{BrokerConfig, BrokerError};

/// Bundles unloaded at once when the broker stops.
const STOP_UNLOAD_CONCURRENCY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("binding the HTTP listener {0}: {1}")]
    BindHttp(SocketAddr, std::io::Error),
    #[error("registering the broker: {0}")]
    Register(#[from] magnetar_metadata::MetadataError),
    #[error("creating the public tenant: {0}")]
    Tenant(BrokerError),
    #[error("TLS listener: {0}")]
    Tls(String),
    #[error("reading the token secret key {0}: {1}")]
    AuthKey(std::path::PathBuf, std::io::Error),
}

pub struct Broker {
    pub service_url: String,
    /// The `pulsar+ssl://` URL, when the broker has a TLS listener.
    pub service_url_tls: Option<String>,
    /// Where the TLS listener is bound.
    pub tls_addr: Option<SocketAddr>,
    pub http_url: String,
    pub broker_id: String,
    pub local_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub topics: Arc<TopicRegistry>,
    pub ownership: Arc<Ownership>,
    stopping: Arc<AtomicBool>,
    crash: tokio::sync::watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The accept loops of the Pulsar listeners (plain, TLS).
    accept: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// `host:port` of the advertised URL: the broker's id.
/// The role of the broker's own client (dead letters) when tokens are on.
pub const BROKER_ROLE: &str = "magnetar-broker";

fn broker_id_of(url: &str) -> String {
    url.split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(url)
        .trim_end_matches('/')
        .to_string()
}

impl Broker {
    pub async fn start(
        cfg: BrokerConfig,
        metadata: MetadataClient,
        ledgers: LedgerClient,
    ) -> Result<Arc<Broker>, StartError> {
        crate::metrics::install();
        crate::metrics::register_broker();
        let auth = match &cfg.auth_token_secret_key {
            Some(path) => Some(Arc::new(
                magnetar_proto::token::SecretKey::load(path)
                    .map_err(|e| StartError::AuthKey(path.clone(), e))?,
            )),
            None => None,
        };
        let own_token = auth.as_ref().map(|k| k.sign(BROKER_ROLE, None));
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| StartError::Bind(cfg.listen, e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| StartError::Bind(cfg.listen, e))?;
        let service_url = cfg
            .advertised_url
            .clone()
            .unwrap_or_else(|| format!("pulsar://{local_addr}"));
        let tls_listener = match (cfg.tls_listen, &cfg.tls_cert_file, &cfg.tls_key_file) {
            (None, _, _) => None,
            (Some(addr), Some(cert), Some(key)) => {
                let sc = magnetar_proto::tls::server_config(cert, key)
                    .map_err(|e| StartError::Tls(e.to_string()))?;
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|e| StartError::Bind(addr, e))?;
                let bound = l.local_addr().map_err(|e| StartError::Bind(addr, e))?;
                Some((l, bound, tokio_rustls::TlsAcceptor::from(Arc::new(sc))))
            }
            (Some(_), _, _) => {
                return Err(StartError::Tls(
                    "tls_listen needs tls_cert_file and tls_key_file".into(),
                ))
            }
        };
        let tls_addr = tls_listener.as_ref().map(|(_, a, _)| *a);
        let service_url_tls = tls_addr.map(|a| {
            cfg.advertised_tls_url
                .clone()
                .unwrap_or_else(|| format!("pulsar+ssl://{a}"))
        });
        let http_listener = TcpListener::bind(cfg.http_addr())
            .await
            .map_err(|e| StartError::BindHttp(cfg.http_addr(), e))?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|e| StartError::BindHttp(cfg.http_addr(), e))?;
        let http_url = cfg
            .advertised_http_url
            .clone()
            .unwrap_or_else(|| format!("http://{http_addr}"));
        let broker_id = broker_id_of(&service_url);
        let info = BrokerInfo {
            broker_id: broker_id.clone(),
            pulsar_url: service_url.clone(),
            pulsar_url_tls: service_url_tls.clone(),
            http_url: Some(http_url.clone()),
            draining: false,
            load: Default::default(),
        };
        let registration = Arc::new(Registration::new(metadata.clone(), info, cfg.lease_ttl_ms));
        registration.register().await?;
        // Pulsar's `public` tenant (home of `public/default`) always exists.
        crate::admin::tenants::ensure(&metadata, "public", &cfg.cluster_name)
            .await
            .map_err(StartError::Tenant)?;
        let namespaces = Namespaces::new(metadata.clone(), cfg.default_bundles);
        let ownership = Arc::new(Ownership::new(
            metadata.clone(),
            registration.clone(),
            namespaces,
            cfg.fast_failover,
        ));
        let ledgers: Arc<dyn crate::managed_ledger::store::LedgerStore> = Arc::new(ledgers);
        let stores = Stores::new(ledgers.clone(), Arc::new(metadata.clone()));
        // Dead letters go through a client of the cluster, via this broker.
        // With authentication on, it carries a token the broker signs itself.
        let sink = crate::topic::dead_letter::Sink(crate::topic::dead_letter::ClientSink::new(
            service_url.clone(),
            auth.as_ref().map(|k| k.sign(BROKER_ROLE, None)),
        ));
        let topics = Arc::new(TopicRegistry::new(
            ownership.clone(),
            stores,
            cfg.managed_ledger.clone(),
            Some(Arc::new(sink)),
        ));
        let (crash, crashed) = tokio::sync::watch::channel(false);
        let ctx = Arc::new(
            ProtocolContext::new(topics.clone(), cfg.connection.clone(), crashed).with_auth(auth),
        );
        let mut accept = vec![tokio::spawn(connection::accept(
            listener,
            ctx.clone(),
            None,
        ))];
        if let Some((l, _, acceptor)) = tls_listener {
            accept.push(tokio::spawn(connection::accept(l, ctx, Some(acceptor))));
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let admin = Arc::new(AdminContext {
            topics: topics.clone(),
            md: metadata.clone(),
            ledgers,
            ml_cfg: cfg.managed_ledger.clone(),
            cluster: cfg.cluster_name.clone(),
            default_bundles: cfg.default_bundles,
            expose_topic_level_metrics: cfg.expose_topic_level_metrics_in_prometheus,
            sub_rates: Default::default(),
            service_url: service_url.clone(),
            token: own_token,
        });
        let tasks = vec![
            tokio::spawn(guard_lease(topics.clone(), stopping.clone())),
            tokio::spawn(crate::topic::policies::follow(topics.clone())),
            tokio::spawn(crate::topic::policies::enforce(
                topics.clone(),
                Duration::from_millis(cfg.policy_check_interval_ms.max(10)),
            )),
            tokio::spawn(report_load(
                topics.clone(),
                Duration::from_millis(cfg.load_report_interval_ms.max(100)),
            )),
            tokio::spawn(commands::run_executor(topics.clone(), metadata.clone())),
            tokio::spawn(manager::run(
                topics.clone(),
                metadata.clone(),
                cfg.load_manager.clone(),
            )),
            tokio::spawn(http::serve(http_listener, admin)),
        ];
        tracing::info!(addr = %local_addr, url = %service_url, tls_url = ?service_url_tls, http = %http_url, "broker listening");
        Ok(Arc::new(Broker {
            service_url,
            service_url_tls,
            tls_addr,
            http_url,
            broker_id,
            local_addr,
            http_addr,
            topics,
            ownership,
            stopping,
            crash,
            tasks: Mutex::new(tasks),
            accept: Mutex::new(accept),
        }))
    }

    /// Graceful stop: stops taking bundles, unloads every bundle to the
    /// other brokers (clients are told where to go), revokes the lease,
    /// then stops listening. A rolling restart loses nothing.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let reg = &self.ownership.registration;
        reg.set_draining(true);
        if let Err(e) = reg.publish().await {
            tracing::warn!(error = %e, "could not mark this broker as stopping");
        }
        if let Err(e) = self.ownership.adopt_all().await {
            tracing::warn!(error = %e, "could not list the bundles handed to this broker");
        }
        let bundles: Vec<_> = self.ownership.owned().into_iter().map(|(b, _)| b).collect();
        // Targets chosen one bundle after the other, each counted as it is
        // placed, so the bundles spread over the other brokers.
        let mut cluster = self.ownership.cluster().await.ok();
        let me = self.broker_id.clone();
        let mut moves = Vec::new();
        for bundle in bundles {
            let next = cluster.as_mut().and_then(|(brokers, owned)| {
                let n = assign::choose(&bundle.to_string(), brokers, owned, Some(&me)).cloned()?;
                *owned.entry(n.info.broker_id.clone()).or_default() += 1;
                Some(n)
            });
            moves.push((bundle, next));
        }
        let started = std::time::Instant::now();
        futures::stream::iter(moves)
            .for_each_concurrent(STOP_UNLOAD_CONCURRENCY, |(bundle, next)| {
                let topics = self.topics.clone();
                async move {
                    if let Err(e) = topics.unload_bundle(&bundle, next).await {
                        tracing::warn!(%bundle, error = %e, "unloading at stop failed");
                    }
                }
            })
            .await;
        // Topics whose bundle was not ours any more (none, normally).
        let left = self.topics.drop_all().await;
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            left = left.topics,
            "all bundles unloaded"
        );
        self.abort_tasks();
        reg.revoke().await;
        self.stop_accepting();
    }

    /// What a process death does, inside a process (for in-process cluster
    /// tests): the listeners close, every connection drops, the lease is
    /// neither renewed nor revoked, no bundle is released and no ledger
    /// closed. Other brokers take over as they would after a kill -9.
    pub fn crash(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.crash.send(true);
        self.abort_tasks();
        self.stop_accepting();
        self.ownership.registration.abandon();
        self.ownership.forget_all();
    }

    /// Ends the background tasks (lease guard, load reports, watches…).
    fn abort_tasks(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }

    /// Closes the Pulsar listeners.
    fn stop_accepting(&self) {
        for t in self
            .accept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }

    /// Creates a namespace with `bundles` bundles (nothing if it exists).
    pub async fn create_namespace(
        metadata: &MetadataClient,
        namespace: &str,
        bundles: usize,
    ) -> Result<(), BrokerError> {
        namespaces::create(metadata, namespace, bundles)
            .await
            .map(|_| ())
    }
}

/// Stops serving once the lease can no longer be trusted, then registers
/// again under a new lease.
async fn guard_lease(topics: Arc<TopicRegistry>, stopping: Arc<AtomicBool>) {
    let reg = topics.ownership.registration.clone();
    loop {
        reg.until_invalid().await;
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        tracing::warn!(
            "the broker's lease can no longer be trusted; stopping service of every bundle"
        );
        topics.drop_all().await;
        loop {
            if stopping.load(Ordering::SeqCst) {
                return;
            }
            match reg.register().await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "registering again failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// Publishes the load report with the registration every `every`.
async fn report_load(topics: Arc<TopicRegistry>, every: Duration) {
    let mut reporter = Reporter::default();
    let reg = topics.ownership.registration.clone();
    loop {
        tokio::time::sleep(every).await;
        reg.set_load(reporter.report(&topics));
        if let Err(e) = reg.publish().await {
            tracing::debug!(error = %e, "publishing the load report failed");
        }
    }
}

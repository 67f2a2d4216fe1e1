//! The single `magnetar` binary: argument parsing and wiring only.

mod admin;
mod config;
mod node_http;
mod perf;
mod perf_ledger;
mod perf_metadata;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use magnetar_broker::standalone::{Standalone, StandaloneConfig};
use magnetar_client::{
    Client, Compression, ConsumerOptions, HashingScheme, OutgoingMessage, SubscriptionType,
};
use tokio::io::AsyncWriteExt;

#[derive(Parser)]
#[command(
    name = "magnetar",
    version,
    about = "Pulsar-compatible streaming with separate compute and storage"
)]
struct Cli {
    /// Log lines as text (`human`) or one JSON object per line (`json`).
    #[arg(
        long,
        global = true,
        env = "MAGNETAR_LOG_FORMAT",
        value_enum,
        default_value = "human"
    )]
    log_format: LogFormat,
    /// Record metrics (`false`: nothing is recorded; for measuring what
    /// they cost).
    #[arg(long, global = true, env = "MAGNETAR_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    metrics: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Position {
    Earliest,
    Latest,
}

#[derive(Clone, Copy, ValueEnum)]
enum SubType {
    Exclusive,
    Shared,
    Failover,
    KeyShared,
}

#[derive(Clone, Copy, ValueEnum)]
enum Codec {
    None,
    Lz4,
    Zlib,
    Zstd,
    Snappy,
}

#[derive(Clone, Copy, ValueEnum)]
enum Hashing {
    JavaStringHash,
    Murmur3,
}

#[derive(Subcommand)]
enum Cmd {
    /// Metadata node, bookie and broker in one process.
    Standalone {
        #[arg(long, env = "MAGNETAR_DATA_DIR", default_value = "./data/standalone")]
        data_dir: PathBuf,
        #[arg(long, env = "MAGNETAR_BIND_HOST", default_value = "127.0.0.1")]
        bind_host: String,
        #[arg(long, env = "MAGNETAR_BROKER_PORT", default_value_t = 6650)]
        broker_port: u16,
        /// Admin REST API and HTTP lookups.
        #[arg(long, env = "MAGNETAR_HTTP_PORT", default_value_t = 8080)]
        http_port: u16,
        #[arg(long, env = "MAGNETAR_METADATA_PORT", default_value_t = 2379)]
        metadata_port: u16,
        #[arg(long, env = "MAGNETAR_BOOKIE_PORT", default_value_t = 3181)]
        bookie_port: u16,
        /// Roll a topic's ledger after this many entries.
        #[arg(
            long,
            env = "MAGNETAR_MAX_ENTRIES_PER_LEDGER",
            default_value_t = 50_000
        )]
        max_entries_per_ledger: u64,
        /// Clients must connect with a token signed by this HS256 key
        /// (`magnetar tokens create-secret-key`); default: no authentication.
        #[arg(long, env = "MAGNETAR_AUTH_TOKEN_SECRET_KEY")]
        auth_token_secret_key: Option<PathBuf>,
        /// Also serve the Pulsar protocol over TLS on this port
        /// (`pulsar+ssl://`; Pulsar uses 6651).
        #[arg(long, env = "MAGNETAR_BROKER_TLS_PORT")]
        broker_tls_port: Option<u16>,
        /// Certificate chain (PEM) of the TLS listener; without it and
        /// `--tls-key-file` one is made for localhost in
        /// `<data-dir>/client-tls/`, whose `ca.pem` clients trust.
        #[arg(long, env = "MAGNETAR_TLS_CERT_FILE", requires = "tls_key_file")]
        tls_cert_file: Option<PathBuf>,
        /// Private key (PEM) of `--tls-cert-file`.
        #[arg(long, env = "MAGNETAR_TLS_KEY_FILE", requires = "tls_cert_file")]
        tls_key_file: Option<PathBuf>,
        /// Topic and subscription series on /metrics (Pulsar's
        /// exposeTopicLevelMetricsInPrometheus); false: namespace sums only.
        #[arg(long, env = "MAGNETAR_EXPOSE_TOPIC_LEVEL_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
        expose_topic_level_metrics_in_prometheus: bool,
    },
    /// Tokens for Pulsar's `token` authentication.
    Tokens {
        #[command(subcommand)]
        cmd: TokensCmd,
    },
    /// One metadata node (Raft member) as its own process.
    Metadata {
        #[arg(long, env = "MAGNETAR_CONFIG")]
        config: PathBuf,
    },
    /// One bookie (storage node) as its own process.
    Bookie {
        #[arg(long, env = "MAGNETAR_CONFIG")]
        config: PathBuf,
    },
    /// One broker (Pulsar protocol, stateless) as its own process.
    Broker {
        #[arg(long, env = "MAGNETAR_CONFIG")]
        config: PathBuf,
    },
    /// Operate a cluster: metadata membership, bookies.
    Admin(admin::AdminArgs),
    /// Exits 0 if `URL` answers 2xx (e.g. `http://127.0.0.1:8080/ready`):
    /// the health check of container images that have no curl.
    Health {
        url: String,
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
    },
    /// Certificates: for the links between tiers, and for the brokers' TLS
    /// listener (`pulsar+ssl://`).
    Tls {
        #[command(subcommand)]
        cmd: TlsCmd,
    },
    /// Publish messages.
    Produce {
        topic: String,
        #[arg(short = 'm', long = "message", required = true)]
        messages: Vec<String>,
        #[arg(short = 'n', long = "num-produce", default_value_t = 1)]
        num: u64,
        #[arg(short = 'k', long)]
        key: Option<String>,
        /// Keys to send each message with, one message per key (with -m).
        #[arg(long = "keys", value_delimiter = ',')]
        keys: Vec<String>,
        /// A property `name=value` on every message (repeatable).
        #[arg(short = 'p', long = "property")]
        properties: Vec<String>,
        #[arg(long, value_enum, default_value = "none")]
        compression: Codec,
        /// How keys pick partitions of a partitioned topic.
        #[arg(long, value_enum, default_value = "java-string-hash")]
        hashing: Hashing,
        #[arg(long)]
        batching: bool,
        /// Split messages into chunks of at most this many bytes (a message
        /// above the broker's maximum needs it).
        #[arg(long)]
        chunk_max_size: Option<usize>,
        #[arg(
            long,
            env = "MAGNETAR_SERVICE_URL",
            default_value = "pulsar://127.0.0.1:6650"
        )]
        service_url: String,
        #[command(flatten)]
        access: ClientArgs,
    },
    /// Consume messages, printing each payload on its own line.
    Consume {
        topic: String,
        #[arg(short = 's', long = "subscription-name")]
        subscription: String,
        #[arg(short = 'n', long = "num-messages", default_value_t = 1)]
        num: u64,
        #[arg(long, value_enum, default_value = "latest")]
        position: Position,
        #[arg(long = "type", value_enum, default_value = "exclusive")]
        sub_type: SubType,
        /// Give up after this many seconds without a message (0: wait forever).
        #[arg(long, default_value_t = 0)]
        timeout_secs: u64,
        /// Print each message as a JSON object (topic, id, key, properties,
        /// payload) rather than its payload alone.
        #[arg(long)]
        json: bool,
        #[arg(
            long,
            env = "MAGNETAR_SERVICE_URL",
            default_value = "pulsar://127.0.0.1:6650"
        )]
        service_url: String,
        #[command(flatten)]
        access: ClientArgs,
    },
    /// Benchmarks.
    Perf {
        #[command(subcommand)]
        cmd: perf::PerfCmd,
    },
}

#[derive(Subcommand)]
enum TokensCmd {
    /// Writes a new random HS256 secret key (32 bytes) to --output.
    CreateSecretKey {
        #[arg(long)]
        output: PathBuf,
    },
    /// Prints a token for --subject (the client's role) signed with the key.
    Create {
        #[arg(long)]
        secret_key: PathBuf,
        #[arg(long)]
        subject: String,
        /// Valid this many seconds (default: no expiry).
        #[arg(long)]
        expiry_secs: Option<u64>,
    },
}

#[derive(Subcommand)]
enum TlsCmd {
    /// Creates a cluster CA in --ca-dir (unless there is one) and issues a
    /// node certificate signed by it into --out (ca.pem, node.pem, node-key.pem).
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        /// Repeat for several members (e.g. a container cluster's init step).
        #[arg(long, required = true)]
        out: Vec<PathBuf>,
    },
    /// A server certificate for the brokers' TLS listener, valid for each
    /// `--name` (host name or IP address), signed by the CA in `--dir`
    /// (made if missing): writes `server.pem` and `server-key.pem` there;
    /// clients trust `ca.pem`.
    CreateServerCert {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long = "name", required = true)]
        names: Vec<String>,
    },
}

/// A broker listening on every interface (`0.0.0.0`, as in a container)
/// with no advertised URLs advertises the address it reaches the metadata
/// service from — its own address on the cluster's network — so that each
/// replica of a scaled-out broker service names itself.
fn advertise_own_address(
    cfg: &mut magnetar_broker::BrokerConfig,
    metadata: &[std::net::SocketAddr],
) -> anyhow::Result<()> {
    let Some(peer) = metadata.first() else {
        return Ok(());
    };
    let own = || -> anyhow::Result<std::net::IpAddr> {
        let s = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
        s.connect(peer)?; // no packet is sent
        Ok(s.local_addr()?.ip())
    };
    if cfg.advertised_url.is_none() && cfg.listen.ip().is_unspecified() {
        let ip = own()?;
        cfg.advertised_url = Some(format!(
            "pulsar://{}",
            std::net::SocketAddr::new(ip, cfg.listen.port())
        ));
        if cfg.advertised_http_url.is_none() && cfg.http_addr().ip().is_unspecified() {
            let http = std::net::SocketAddr::new(ip, cfg.http_addr().port());
            cfg.advertised_http_url = Some(format!("http://{http}"));
        }
        if let Some(tls) = cfg.tls_listen.filter(|a| a.ip().is_unspecified()) {
            if cfg.advertised_tls_url.is_none() {
                let tls = std::net::SocketAddr::new(ip, tls.port());
                cfg.advertised_tls_url = Some(format!("pulsar+ssl://{tls}"));
            }
        }
        tracing::info!(url = ?cfg.advertised_url, "advertising this host's address");
    }
    Ok(())
}

/// Waits for Ctrl-C or SIGTERM.
async fn until_stopped() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    Ok(())
}

fn metadata_client(
    tls: &magnetar_proto::tls::TlsMaterial,
    endpoints: Vec<std::net::SocketAddr>,
) -> anyhow::Result<magnetar_metadata::MetadataClient> {
    let rpc = magnetar_proto::rpc::RpcClient::new(magnetar_proto::rpc::client_endpoint(tls)?);
    Ok(magnetar_metadata::MetadataClient::new(rpc, endpoints))
}

/// Logs to stderr through a filter that `PUT …/log-level` can replace.
fn init_logs(format: LogFormat) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, reload, EnvFilter};
    let filter = EnvFilter::try_from_env("MAGNETAR_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    let (filter, handle) = reload::Layer::new(filter);
    let output = match format {
        LogFormat::Human => fmt::layer()
            .with_writer(std::io::stderr)
            // Colour codes only on a terminal: members of a cluster log to files.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .init();
    magnetar_broker::logs::set_reloader(move |f| {
        let filter = EnvFilter::try_new(f).map_err(|e| format!("bad filter {f:?}: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
}

/// mimalloc: brokers and bookies allocate a buffer, a task and a few small
/// objects per entry; glibc malloc's arena locks showed in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    if !cli.metrics {
        magnetar_broker::metrics::disable();
    }
    match cli.cmd {
        Cmd::Standalone {
            data_dir,
            bind_host,
            broker_port,
            http_port,
            metadata_port,
            bookie_port,
            max_entries_per_ledger,
            auth_token_secret_key,
            broker_tls_port,
            tls_cert_file,
            tls_key_file,
            expose_topic_level_metrics_in_prometheus,
        } => {
            let mut cfg = StandaloneConfig::new(data_dir.clone());
            cfg.auth_token_secret_key = auth_token_secret_key;
            cfg.broker_tls_port = broker_tls_port;
            cfg.tls_cert_file = tls_cert_file;
            cfg.tls_key_file = tls_key_file;
            cfg.expose_topic_level_metrics_in_prometheus = expose_topic_level_metrics_in_prometheus;
            cfg.bind_host = bind_host;
            cfg.broker_port = broker_port;
            cfg.http_port = http_port;
            cfg.metadata_port = metadata_port;
            cfg.bookie_port = bookie_port;
            cfg.managed_ledger.max_entries_per_ledger = max_entries_per_ledger;
            let s = Standalone::start(cfg)
                .await
                .context("starting standalone")?;
            tracing::info!(service_url = %s.service_url(), service_url_tls = ?s.broker.service_url_tls, data_dir = %data_dir.display(), "magnetar standalone ready");
            until_stopped().await?;
            s.shutdown().await;
        }
        Cmd::Metadata { config } => {
            let mut f = config::load::<magnetar_metadata::MetadataConfig>(&config, false)?;
            if f.role.node_id == 0 {
                f.role.node_id = config::node_id_from_hostname()?;
            }
            magnetar_broker::metrics::install();
            let http_addr = f.role.http_addr();
            let node = magnetar_metadata::MetadataNode::start(f.role, &f.tls)
                .await
                .context("starting the metadata node")?;
            let n = node.clone();
            let ready = move || {
                n.is_ready()
                    .then_some(())
                    .ok_or_else(|| "no leader known: a majority is out of reach".to_string())
            };
            let _http = node_http::serve(http_addr, Arc::new(ready)).await?;
            tracing::info!(node_id = node.node_id, addr = %node.local_addr(), "magnetar metadata ready");
            until_stopped().await?;
            node.shutdown().await;
        }
        Cmd::Bookie { config } => {
            let f = config::load::<magnetar_bookie::BookieConfig>(&config, true)?;
            let metadata = metadata_client(&f.tls, f.metadata)?;
            magnetar_broker::metrics::install();
            let http_addr = f.role.http_addr();
            let bookie = magnetar_bookie::Bookie::start(f.role, &f.tls, &metadata)
                .await
                .context("starting the bookie")?;
            let b = bookie.clone();
            let _http = node_http::serve(http_addr, Arc::new(move || b.is_ready())).await?;
            tracing::info!(addr = %bookie.addr(), "magnetar bookie ready");
            until_stopped().await?;
            bookie.shutdown().await;
        }
        Cmd::Broker { config } => {
            let mut f = config::load::<magnetar_broker::BrokerConfig>(&config, true)?;
            advertise_own_address(&mut f.role, &f.metadata)?;
            let metadata = metadata_client(&f.tls, f.metadata)?;
            magnetar_broker::Broker::create_namespace(
                &metadata,
                "public/default",
                f.role.default_bundles,
            )
            .await
            .context("creating namespace public/default")?;
            let rpc =
                magnetar_proto::rpc::RpcClient::new(magnetar_proto::rpc::client_endpoint(&f.tls)?);
            let ledgers = magnetar_bookie::LedgerClient::new(metadata.clone(), rpc);
            let broker = magnetar_broker::Broker::start(f.role, metadata, ledgers)
                .await
                .context("starting the broker")?;
            tracing::info!(service_url = %broker.service_url, "magnetar broker ready");
            until_stopped().await?;
            broker.shutdown().await;
        }
        Cmd::Admin(args) => admin::run(args).await?,
        Cmd::Tls {
            cmd: TlsCmd::Issue { ca_dir, out },
        } => {
            magnetar_proto::tls::TlsMaterial::ensure_ca(&ca_dir)?;
            for out in out {
                magnetar_proto::tls::TlsMaterial::issue(&ca_dir, &out)?;
                println!("{}", out.display());
            }
        }
        Cmd::Health { url, timeout_secs } => {
            // For container health checks: images have no curl.
            let res = reqwest::Client::new()
                .get(&url)
                .timeout(Duration::from_secs(timeout_secs))
                .send()
                .await;
            match res {
                Ok(r) if r.status().is_success() => println!("ok"),
                Ok(r) => {
                    let status = r.status();
                    anyhow::bail!("{url}: {status}: {}", r.text().await.unwrap_or_default())
                }
                Err(e) => anyhow::bail!("{url}: {e}"),
            }
        }
        Cmd::Produce {
            topic,
            messages,
            num,
            key,
            keys,
            properties,
            compression,
            hashing,
            batching,
            chunk_max_size,
            service_url,
            access,
        } => {
            let client = connect(&service_url, access)
                .await
                .with_context(|| format!("connecting to {service_url}"))?;
            let mut builder = client
                .producer(&topic)
                .compression(match compression {
                    Codec::None => Compression::None,
                    Codec::Lz4 => Compression::Lz4,
                    Codec::Zlib => Compression::Zlib,
                    Codec::Zstd => Compression::Zstd,
                    Codec::Snappy => Compression::Snappy,
                })
                .hashing_scheme(match hashing {
                    Hashing::JavaStringHash => HashingScheme::JavaStringHash,
                    Hashing::Murmur3 => HashingScheme::Murmur3_32Hash,
                });
            if batching {
                builder = builder.batched();
            }
            if let Some(n) = chunk_max_size {
                builder = builder.chunk_max_size(n);
            }
            let producer = builder.create().await?;
            let mut props = std::collections::BTreeMap::new();
            for p in &properties {
                let (k, v) = p
                    .split_once('=')
                    .with_context(|| format!("property {p:?} is not name=value"))?;
                props.insert(k.to_string(), v.to_string());
            }
            let keys: Vec<Option<String>> = if keys.is_empty() {
                vec![key.clone()]
            } else {
                keys.into_iter().map(Some).collect()
            };
            let mut receipts = Vec::new();
            for _ in 0..num {
                for k in &keys {
                    for m in &messages {
                        let msg = OutgoingMessage {
                            payload: m.clone().into_bytes().into(),
                            key: k.clone(),
                            properties: props.clone(),
                            ..Default::default()
                        };
                        receipts.push(producer.send_async(msg));
                    }
                }
            }
            producer.flush();
            let total = receipts.len();
            for r in receipts {
                r.await?;
            }
            producer.close().await?;
            tracing::info!(messages = total, topic, "produced");
        }
        Cmd::Consume {
            topic,
            subscription,
            num,
            position,
            sub_type,
            timeout_secs,
            json,
            service_url,
            access,
        } => {
            let client = connect(&service_url, access)
                .await
                .with_context(|| format!("connecting to {service_url}"))?;
            let options = ConsumerOptions {
                sub_type: match sub_type {
                    SubType::Exclusive => SubscriptionType::Exclusive,
                    SubType::Shared => SubscriptionType::Shared,
                    SubType::Failover => SubscriptionType::Failover,
                    SubType::KeyShared => SubscriptionType::KeyShared,
                },
                earliest: matches!(position, Position::Earliest),
                ..Default::default()
            };
            let mut consumer = client.subscribe(&topic, &subscription, options).await?;
            let mut out = tokio::io::stdout();
            for _ in 0..num {
                let msg = if timeout_secs == 0 {
                    consumer.receive().await?
                } else {
                    match consumer
                        .receive_timeout(Duration::from_secs(timeout_secs))
                        .await?
                    {
                        Some(m) => m,
                        None => bail!("no message within {timeout_secs} s"),
                    }
                };
                let mut line = if json {
                    serde_json::json!({
                        "topic": &*msg.topic,
                        "id": msg.id.to_string(),
                        "partition": msg.id.partition,
                        "key": msg.key,
                        "properties": msg.properties,
                        "payload": String::from_utf8_lossy(&msg.payload),
                        "redelivery_count": msg.redelivery_count,
                    })
                    .to_string()
                } else {
                    String::from_utf8_lossy(&msg.payload).into_owned()
                };
                line.push('\n');
                out.write_all(line.as_bytes()).await?;
                consumer.ack(&msg)?;
            }
            out.flush().await?;
            consumer.close().await?;
        }
        Cmd::Perf { cmd } => perf::run(cmd).await?,
        Cmd::Tls {
            cmd: TlsCmd::CreateServerCert { dir, names },
        } => {
            let c = magnetar_proto::tls::TlsMaterial::issue_server(&dir, &names)
                .context("making the certificate")?;
            println!(
                "certificate {}\nkey {}\nclients trust {}",
                c.cert.display(),
                c.key.display(),
                c.ca_cert.display()
            );
        }
        Cmd::Tokens { cmd } => match cmd {
            TokensCmd::CreateSecretKey { output } => {
                let key = magnetar_proto::token::SecretKey::generate()?;
                std::fs::write(&output, key)
                    .with_context(|| format!("writing {}", output.display()))?;
                eprintln!("secret key written to {}", output.display());
            }
            TokensCmd::Create {
                secret_key,
                subject,
                expiry_secs,
            } => {
                let key = magnetar_proto::token::SecretKey::load(&secret_key)
                    .with_context(|| format!("reading {}", secret_key.display()))?;
                let exp = expiry_secs.map(|s| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                        + s
                });
                println!("{}", key.sign(&subject, exp));
            }
        },
    }
    Ok(())
}

/// How the CLI's clients authenticate and check TLS brokers.
#[derive(clap::Args)]
struct ClientArgs {
    /// A token to authenticate with (Pulsar's `token` method).
    #[arg(long, env = "MAGNETAR_AUTH_TOKEN")]
    auth_token: Option<String>,
    /// With a `pulsar+ssl://` URL: the CA certificates (PEM) to trust
    /// (default: the system's).
    #[arg(long, env = "MAGNETAR_TLS_TRUST_CERTS_FILE")]
    tls_trust_certs_file: Option<PathBuf>,
    /// With a `pulsar+ssl://` URL: accept any certificate (tests only).
    #[arg(long)]
    tls_allow_insecure: bool,
}

/// A client of `url`, with a token and TLS settings if given.
async fn connect(url: &str, access: ClientArgs) -> Result<Client, magnetar_client::Error> {
    let mut b = Client::builder(url).tls_allow_insecure_connection(access.tls_allow_insecure);
    if let Some(t) = access.auth_token {
        b = b.auth_token(t);
    }
    if let Some(f) = access.tls_trust_certs_file {
        b = b.tls_trust_certs_file_path(f);
    }
    b.build().await
}

//! Certificates for the QUIC links between tiers: a cluster CA and a node
//! certificate per process, all with mutual TLS. When no certificates are
//! configured, a CA and a node certificate are generated into a directory on
//! first start and reused afterwards.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::rpc::{RpcError, SERVER_NAME};

pub const ALPN: &[u8] = b"magnetar/1";

/// A node's certificate chain and key, and the CA it trusts.
#[derive(Debug)]
pub struct TlsMaterial {
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        TlsMaterial {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn tls_err(e: impl std::fmt::Display) -> RpcError {
    RpcError::Tls(e.to_string())
}

fn ca_params() -> Result<rcgen::CertificateParams, RpcError> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Magnetar cluster CA");
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

fn read(path: &Path) -> Result<Vec<u8>, RpcError> {
    std::fs::read(path).map_err(|e| tls_err(format!("{}: {e}", path.display())))
}

fn write(path: &Path, data: &str) -> Result<(), RpcError> {
    std::fs::write(path, data).map_err(|e| tls_err(format!("{}: {e}", path.display())))
}

/// A server certificate made by [`TlsMaterial::issue_server`].
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A TLS server configuration for clients (no client certificates asked
/// for) from a PEM chain and key.
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, RpcError> {
    let chain = rustls_pemfile::certs(&mut &read(cert)?[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(tls_err)?;
    if chain.is_empty() {
        return Err(tls_err(format!("{}: no certificate", cert.display())));
    }
    let key = rustls_pemfile::private_key(&mut &read(key)?[..])
        .map_err(tls_err)?
        .ok_or_else(|| tls_err(format!("{}: no private key", key.display())))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(tls_err)?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(tls_err)
}

/// Paths of PEM files, as given in configuration.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsMaterial {
    /// Loads PEM files.
    pub fn load(paths: &TlsPaths) -> Result<TlsMaterial, RpcError> {
        let ca = rustls_pemfile::certs(&mut &read(&paths.ca_cert)?[..])
            .next()
            .ok_or_else(|| tls_err(format!("{}: no certificate", paths.ca_cert.display())))?
            .map_err(tls_err)?;
        let chain = rustls_pemfile::certs(&mut &read(&paths.cert)?[..])
            .collect::<Result<Vec<_>, _>>()
            .map_err(tls_err)?;
        if chain.is_empty() {
            return Err(tls_err(format!("{}: no certificate", paths.cert.display())));
        }
        let key = rustls_pemfile::private_key(&mut &read(&paths.key)?[..])
            .map_err(tls_err)?
            .ok_or_else(|| tls_err(format!("{}: no private key", paths.key.display())))?;
        Ok(TlsMaterial { ca, chain, key })
    }

    /// Uses `dir/{ca,node}.pem`, generating what is missing: a CA when there
    /// is none, and a node certificate signed by `dir/ca-key.pem`.
    pub fn load_or_generate(dir: &Path) -> Result<TlsMaterial, RpcError> {
        Self::ensure_ca(dir)?;
        Self::issue(dir, dir)
    }

    /// Creates a cluster CA (`ca.pem`, `ca-key.pem`) in `dir` unless one is there.
    pub fn ensure_ca(dir: &Path) -> Result<(), RpcError> {
        std::fs::create_dir_all(dir).map_err(tls_err)?;
        let ca_cert = dir.join("ca.pem");
        if !ca_cert.exists() {
            let key = rcgen::KeyPair::generate().map_err(tls_err)?;
            let cert = ca_params()?.self_signed(&key).map_err(tls_err)?;
            write(&dir.join("ca-key.pem"), &key.serialize_pem())?;
            write(&ca_cert, &cert.pem())?;
        }
        Ok(())
    }

    /// Gives `out` a node certificate signed by the CA in `ca_dir` (kept if
    /// already there) and a copy of the CA certificate — but not the CA key:
    /// `out/{ca,node,node-key}.pem`.
    pub fn issue(ca_dir: &Path, out: &Path) -> Result<TlsMaterial, RpcError> {
        std::fs::create_dir_all(out).map_err(tls_err)?;
        let paths = Self::paths_in(out);
        if ca_dir != out {
            std::fs::copy(ca_dir.join("ca.pem"), &paths.ca_cert)
                .map_err(|e| tls_err(format!("{}: {e}", ca_dir.join("ca.pem").display())))?;
        }
        if !paths.cert.exists() || !paths.key.exists() {
            let ca_pem = String::from_utf8_lossy(&read(&ca_dir.join("ca-key.pem"))?).into_owned();
            let ca_key = rcgen::KeyPair::from_pem(&ca_pem).map_err(tls_err)?;
            let issuer = rcgen::Issuer::new(ca_params()?, ca_key);
            let key = rcgen::KeyPair::generate().map_err(tls_err)?;
            let mut p = rcgen::CertificateParams::new(vec![
                SERVER_NAME.to_string(),
                "localhost".to_string(),
            ])
            .map_err(tls_err)?;
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "magnetar node");
            let cert = p.signed_by(&key, &issuer).map_err(tls_err)?;
            write(&paths.key, &key.serialize_pem())?;
            write(&paths.cert, &cert.pem())?;
        }
        TlsMaterial::load(&paths)
    }

    /// A certificate for a server that clients reach over TLS (the
    /// brokers' Pulsar-over-TLS listener), valid for `names` (DNS names or
    /// IP addresses) and signed by the CA in `dir` (made if missing):
    /// `dir/{server,server-key}.pem`, kept if already there. Clients trust
    /// `dir/ca.pem`.
    pub fn issue_server(dir: &Path, names: &[String]) -> Result<ServerCert, RpcError> {
        Self::ensure_ca(dir)?;
        let out = ServerCert {
            ca_cert: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
        };
        if out.cert.exists() && out.key.exists() {
            return Ok(out);
        }
        let ca_pem = String::from_utf8_lossy(&read(&dir.join("ca-key.pem"))?).into_owned();
        let ca_key = rcgen::KeyPair::from_pem(&ca_pem).map_err(tls_err)?;
        let issuer = rcgen::Issuer::new(ca_params()?, ca_key);
        let key = rcgen::KeyPair::generate().map_err(tls_err)?;
        // rcgen makes an IP address SAN of a name that parses as one.
        let mut p = rcgen::CertificateParams::new(names.to_vec()).map_err(tls_err)?;
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "magnetar broker");
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &issuer).map_err(tls_err)?;
        write(&out.key, &key.serialize_pem())?;
        write(&out.cert, &cert.pem())?;
        Ok(out)
    }

    /// The file names `issue` and `load_or_generate` use in a directory.
    pub fn paths_in(dir: &Path) -> TlsPaths {
        TlsPaths {
            ca_cert: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node-key.pem"),
        }
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, RpcError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(tls_err)?;
        Ok(Arc::new(roots))
    }

    pub fn quic_server_config(&self) -> Result<quinn::crypto::rustls::QuicServerConfig, RpcError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            Self::provider(),
        )
        .build()
        .map_err(tls_err)?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls_err)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        quinn::crypto::rustls::QuicServerConfig::try_from(cfg).map_err(tls_err)
    }

    pub fn quic_client_config(&self) -> Result<quinn::crypto::rustls::QuicClientConfig, RpcError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls_err)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        quinn::crypto::rustls::QuicClientConfig::try_from(cfg).map_err(tls_err)
    }
}

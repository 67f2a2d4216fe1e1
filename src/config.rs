//! Configuration files of the `metadata`, `bookie` and `broker` roles.
//!
//! Each is TOML: the role's own settings (the library crate's config type,
//! which refuses unknown keys), plus
//! - `metadata = ["host:port", ...]` — the metadata service (bookie, broker);
//! - a `[tls]` section — `dir = "..."` holding `ca.pem`, `node.pem` and
//!   `node-key.pem` (as `magnetar tls issue` writes them), or the three
//!   paths `ca_cert`, `cert` and `key`. Members of a cluster must share a CA.
//!
//! Relative paths are taken from the working directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use magnetar_proto::tls::{TlsMaterial, TlsPaths};
use serde::de::DeserializeOwned;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    dir: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl TlsSection {
    fn load(self) -> anyhow::Result<TlsMaterial> {
        let paths = match self {
            TlsSection {
                dir: Some(dir),
                ca_cert: None,
                cert: None,
                key: None,
            } => TlsMaterial::paths_in(&dir),
            TlsSection {
                dir: None,
                ca_cert: Some(ca_cert),
                cert: Some(cert),
                key: Some(key),
            } => TlsPaths { ca_cert, cert, key },
            _ => bail!("[tls] needs either `dir` or all of `ca_cert`, `cert` and `key`"),
        };
        TlsMaterial::load(&paths).context("loading the [tls] certificates")
    }
}

/// A role's parsed config file.
pub struct RoleFile<T> {
    pub role: T,
    pub tls: TlsMaterial,
    /// The metadata service's endpoints (empty for a metadata node).
    pub metadata: Vec<SocketAddr>,
}

/// Replaces each `${NAME}` with the environment variable NAME (one config
/// file for every replica of a container: `advertise =
/// "${HOSTNAME}.magnetar-metadata:2379"`); an unset variable is an error.
fn expand_env(text: &str) -> anyhow::Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find('}').with_context(|| {
            format!(
                "`${{` without `}}` near {:?}",
                &rest[i..rest.len().min(i + 20)]
            )
        })?;
        let name = &after[..end];
        let value = std::env::var(name).with_context(|| {
            format!("environment variable {name} (used as ${{{name}}}) is not set")
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The metadata node id of a StatefulSet pod: host name `<name>-<n>` is
/// node n + 1.
pub fn node_id_from_hostname() -> anyhow::Result<u64> {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let n: u64 = host
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .with_context(|| format!("node_id is 0 and the host name {host:?} does not end in -<n>"))?;
    Ok(n + 1)
}

/// How long a start waits for a metadata endpoint's name to resolve (a
/// service whose DNS record is not there yet).
const RESOLVE_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// `ip:port`, or `name:port` looked up (retried while the name is not
/// known yet).
fn resolve_endpoint(addr: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    if !addr.contains(':') {
        bail!("{addr:?} is not host:port");
    }
    let deadline = std::time::Instant::now() + RESOLVE_FOR;
    loop {
        if let Some(a) = magnetar_proto::resolve::socket_addr(addr) {
            return Ok(a);
        }
        if std::time::Instant::now() >= deadline {
            bail!("{addr} does not resolve");
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Reads `path`: the role's settings, its certificates and, when
/// `wants_metadata`, the metadata endpoints.
pub fn load<T: DeserializeOwned>(path: &Path, wants_metadata: bool) -> anyhow::Result<RoleFile<T>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let text = expand_env(&text).with_context(|| format!("{}", path.display()))?;
    let mut table: toml::Table = text
        .parse()
        .with_context(|| format!("parsing {}", path.display()))?;
    let tls: TlsSection = match table.remove("tls") {
        Some(v) => v
            .try_into()
            .with_context(|| format!("{}: [tls]", path.display()))?,
        None => bail!(
            "{}: a [tls] section is required (cluster members share a CA; \
             `magnetar tls issue --ca-dir CA --out DIR` creates the files)",
            path.display()
        ),
    };
    let metadata = match (table.remove("metadata"), wants_metadata) {
        (Some(v), true) => {
            let names: Vec<String> = v
                .try_into()
                .with_context(|| format!("{}: metadata = [\"host:port\", ...]", path.display()))?;
            if names.is_empty() {
                bail!("{}: `metadata` lists no endpoint", path.display());
            }
            names
                .iter()
                .map(|n| resolve_endpoint(n))
                .collect::<anyhow::Result<Vec<SocketAddr>>>()
                .with_context(|| format!("{}: metadata", path.display()))?
        }
        (None, true) => bail!(
            "{}: `metadata = [\"host:port\", ...]` is required",
            path.display()
        ),
        (Some(_), false) => bail!("{}: unknown key `metadata`", path.display()),
        (None, false) => Vec::new(),
    };
    let role: T = toml::Value::Table(table)
        .try_into()
        .with_context(|| format!("{}", path.display()))?;
    Ok(RoleFile {
        role,
        tls: tls.load()?,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use magnetar_metadata::MetadataConfig;

    #[test]
    fn metadata_config_parses_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        TlsMaterial::ensure_ca(&dir.path().join("ca")).unwrap();
        TlsMaterial::issue(&dir.path().join("ca"), &dir.path().join("n1")).unwrap();
        let tls_dir = dir.path().join("n1");
        let good = format!(
            r#"
node_id = 2
listen = "127.0.0.1:2380"
data_dir = "/tmp/x"
initial_members = [[1, "127.0.0.1:2379"], [2, "127.0.0.1:2380"]]
election_timeout_min_ms = 500
[limits]
max_value_bytes = 1000
[tls]
dir = "{}"
"#,
            tls_dir.display()
        );
        let path = dir.path().join("m.toml");
        std::fs::write(&path, &good).unwrap();
        let f: RoleFile<MetadataConfig> = load(&path, false).unwrap();
        assert_eq!(f.role.node_id, 2);
        assert_eq!(f.role.initial_members.len(), 2);
        assert_eq!(f.role.election_timeout_min_ms, 500);
        let defaults = MetadataConfig::new(0, f.role.listen, "/".into());
        assert_eq!(
            f.role.heartbeat_interval_ms, defaults.heartbeat_interval_ms,
            "defaults fill the rest"
        );
        assert_eq!(f.role.limits.max_value_bytes, 1000);
        assert_eq!(f.role.limits.max_txn_ops, 128);

        std::fs::write(&path, good.replace("node_id", "node_idd")).unwrap();
        let err = format!("{:#}", load::<MetadataConfig>(&path, false).err().unwrap());
        assert!(err.contains("node_idd"), "{err}");

        std::fs::write(&path, good.replace("[tls]", "[tlsx]")).unwrap();
        let err = format!("{:#}", load::<MetadataConfig>(&path, false).err().unwrap());
        assert!(err.contains("[tls] section is required"), "{err}");
    }
}

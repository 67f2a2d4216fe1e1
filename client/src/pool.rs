//! Connections by broker, and topic lookups. A service URL may name several
//! hosts (`pulsar://h1:6650,h2:6651`): lookups go to one of them, the next
//! when one fails. A lookup follows redirects (asking authoritatively, as a
//! broker expects) to the broker that serves the topic; one connection per
//! broker is shared by every producer and consumer that needs it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use magnetar_proto::frame::base;
use magnetar_proto::pulsar::{
    base_command::Type, command_get_topics_of_namespace::Mode as TopicsMode,
    command_lookup_topic_response::LookupType,
    command_partitioned_topic_metadata_response::LookupType as PartitionLookup,
    CommandGetTopicsOfNamespace, CommandLookupTopic, CommandPartitionedTopicMetadata,
};

use crate::{Connection, Error};

/// Redirects a lookup follows before giving up.
const MAX_LOOKUP_REDIRECTS: usize = 8;

pub struct Pool {
    auth: crate::auth::Auth,
    /// Set when the service URL is `pulsar+ssl://`: every connection is
    /// TLS, and lookups and closes answer with the brokers' TLS URLs.
    tls: Option<tokio_rustls::TlsConnector>,
    /// `pulsar[+ssl]://host:port` of each host of the service URL.
    hosts: Vec<String>,
    next_host: AtomicUsize,
    conns: Mutex<HashMap<String, Arc<Connection>>>,
}

/// Whether a service URL is `pulsar+ssl://`.
pub fn is_tls_url(url: &str) -> bool {
    url.starts_with("pulsar+ssl://")
}

/// The hosts of a service URL: `pulsar://h1:p1,h2:p2` or
/// `pulsar+ssl://h1:p1,h2:p2` (each may repeat the scheme).
pub fn parse_service_url(url: &str) -> Result<Vec<String>, Error> {
    let scheme = if is_tls_url(url) {
        "pulsar+ssl://"
    } else {
        "pulsar://"
    };
    let rest = url
        .strip_prefix(scheme)
        .ok_or_else(|| Error::Connection(format!("unsupported service URL {url}")))?;
    let hosts: Vec<String> = rest
        .split(',')
        .map(|h| h.trim().trim_start_matches(scheme).trim_end_matches('/'))
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}{h}"))
        .collect();
    if hosts.is_empty() {
        return Err(Error::Connection(format!("no host in service URL {url}")));
    }
    Ok(hosts)
}

fn normalize(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

impl Pool {
    pub fn new(
        service_url: &str,
        auth: crate::auth::Auth,
        tls: &crate::tls::TlsOptions,
    ) -> Result<Pool, Error> {
        Ok(Pool {
            auth,
            tls: if is_tls_url(service_url) {
                Some(tls.connector()?)
            } else {
                None
            },
            hosts: parse_service_url(service_url)?,
            next_host: AtomicUsize::new(0),
            conns: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Connection>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection to the broker at `url`, opened if there is none.
    pub async fn get(&self, url: &str) -> Result<Arc<Connection>, Error> {
        let url = normalize(url);
        if let Some(c) = self.lock().get(&url) {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let c = Connection::connect(&url, self.auth.as_deref(), self.tls.as_ref()).await?;
        let mut g = self.lock();
        // Another task may have connected meanwhile: keep one.
        match g.get(&url) {
            Some(existing) if !existing.is_closed() => Ok(existing.clone()),
            _ => {
                g.insert(url, c.clone());
                Ok(c)
            }
        }
    }

    /// A connection to any host of the service URL, the next one when one
    /// fails.
    pub async fn any(&self) -> Result<Arc<Connection>, Error> {
        let n = self.hosts.len();
        let start = self.next_host.load(Ordering::Relaxed);
        let mut last = Error::Closed;
        for k in 0..n {
            let host = &self.hosts[(start + k) % n];
            match self.get(host).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::debug!(host, error = %e, "service host unreachable; trying the next");
                    self.next_host.store((start + k + 1) % n, Ordering::Relaxed);
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// The URL of the broker serving `topic`.
    pub async fn lookup(&self, topic: &str) -> Result<String, Error> {
        let mut conn = self.any().await?;
        let mut authoritative = false;
        for _ in 0..MAX_LOOKUP_REDIRECTS {
            let mut cmd = base(Type::Lookup);
            cmd.lookup_topic = Some(CommandLookupTopic {
                topic: topic.to_string(),
                request_id: 0,
                authoritative: Some(authoritative),
                ..Default::default()
            });
            let resp = conn.request(cmd).await?;
            let r = resp
                .lookup_topic_response
                .ok_or_else(|| Error::Protocol("no LOOKUP_RESPONSE".into()))?;
            let url = self
                .pick(
                    r.broker_service_url.clone(),
                    r.broker_service_url_tls.clone(),
                )
                .unwrap_or_default();
            if url.is_empty() && self.tls.is_some() && r.broker_service_url.is_some() {
                return Err(Error::Connection(format!(
                    "the broker serving {topic} has no TLS listener"
                )));
            }
            match r.response.and_then(|t| LookupType::try_from(t).ok()) {
                Some(LookupType::Connect) if !url.is_empty() => return Ok(normalize(&url)),
                Some(LookupType::Redirect) if !url.is_empty() => {
                    conn = self.get(&url).await?;
                    authoritative = true;
                }
                _ => {
                    return Err(Error::Server {
                        code: r.error.unwrap_or(0),
                        message: r.message.unwrap_or_else(|| "lookup failed".into()),
                    })
                }
            }
        }
        Err(Error::Protocol(format!(
            "lookup of {topic} redirected more than {MAX_LOOKUP_REDIRECTS} times"
        )))
    }

    /// Of a broker's plain and TLS URLs, the one this client connects to.
    pub fn pick(&self, url: Option<String>, url_tls: Option<String>) -> Option<String> {
        if self.tls.is_some() {
            url_tls.filter(|u| !u.is_empty())
        } else {
            url
        }
    }

    /// The persistent topics of `namespace` (`tenant/ns`), partitions of
    /// partitioned topics listed one by one.
    pub async fn topics_of_namespace(&self, namespace: &str) -> Result<Vec<String>, Error> {
        let conn = self.any().await?;
        let mut cmd = base(Type::GetTopicsOfNamespace);
        cmd.get_topics_of_namespace = Some(CommandGetTopicsOfNamespace {
            request_id: 0,
            namespace: namespace.to_string(),
            mode: Some(TopicsMode::Persistent as i32),
            ..Default::default()
        });
        let resp = conn.request(cmd).await?;
        let r = resp
            .get_topics_of_namespace_response
            .ok_or_else(|| Error::Protocol("no GET_TOPICS_OF_NAMESPACE_RESPONSE".into()))?;
        Ok(r.topics)
    }

    /// How many partitions `topic` has (0: it is not partitioned).
    pub async fn partitions(&self, topic: &str) -> Result<u32, Error> {
        let conn = self.any().await?;
        let mut cmd = base(Type::PartitionedMetadata);
        cmd.partition_metadata = Some(CommandPartitionedTopicMetadata {
            topic: topic.to_string(),
            request_id: 0,
        });
        let resp = conn.request(cmd).await?;
        let r = resp
            .partition_metadata_response
            .ok_or_else(|| Error::Protocol("no PARTITIONED_METADATA_RESPONSE".into()))?;
        if r.response == Some(PartitionLookup::Failed as i32) {
            return Err(Error::Server {
                code: r.error.unwrap_or(0),
                message: r
                    .message
                    .unwrap_or_else(|| "partitioned metadata failed".into()),
            });
        }
        Ok(r.partitions.unwrap_or(0))
    }

    /// The connection to the broker serving `topic` (or to `hint`, a broker
    /// named by a close, if it answers).
    pub async fn for_topic(
        &self,
        topic: &str,
        hint: Option<&str>,
    ) -> Result<Arc<Connection>, Error> {
        if let Some(h) = hint {
            match self.get(h).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::debug!(broker = h, error = %e, "assigned broker unreachable; looking up")
                }
            }
        }
        let url = self.lookup(topic).await?;
        self.get(&url).await
    }

    pub fn close(&self) {
        for (_, c) in self.lock().drain() {
            c.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_urls_with_several_hosts() {
        assert_eq!(
            parse_service_url("pulsar://a:1,b:2/").unwrap(),
            vec!["pulsar://a:1", "pulsar://b:2"]
        );
        assert_eq!(
            parse_service_url("pulsar://a:1,pulsar://b:2").unwrap(),
            vec!["pulsar://a:1", "pulsar://b:2"]
        );
        assert!(parse_service_url("http://a:1").is_err());
        assert!(parse_service_url("pulsar://").is_err());
    }
}

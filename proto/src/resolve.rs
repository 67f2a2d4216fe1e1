//! Addresses of cluster members as `host:port`: an IP address as it is, a
//! DNS name (Kubernetes pods and services, compose services) looked up and
//! kept for a few seconds — so a member that comes back with a new address
//! is found again, and lookups do not run for every request.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a looked-up name is believed.
const TTL: Duration = Duration::from_secs(2);

static CACHE: Mutex<Option<HashMap<String, (SocketAddr, Instant)>>> = Mutex::new(None);

/// The socket address of `addr` (`ip:port` or `name:port`); none if it
/// does not parse or the name does not resolve. A name is looked up with
/// the system's resolver (blocking, at most once per name every two
/// seconds).
pub fn socket_addr(addr: &str) -> Option<SocketAddr> {
    if let Ok(a) = addr.parse() {
        return Some(a);
    }
    let now = Instant::now();
    {
        let g = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((a, at)) = g.as_ref().and_then(|m| m.get(addr)) {
            if now.duration_since(*at) < TTL {
                return Some(*a);
            }
        }
    }
    let found = addr.to_socket_addrs().ok()?.next()?;
    CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(addr.to_string(), (found, now));
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_addresses_and_names_resolve() {
        assert_eq!(
            socket_addr("127.0.0.1:2379"),
            Some(([127, 0, 0, 1], 2379).into())
        );
        let local = socket_addr("localhost:2379").expect("localhost resolves");
        assert!(local.ip().is_loopback());
        assert_eq!(local.port(), 2379);
        assert_eq!(socket_addr("no port"), None);
        assert_eq!(socket_addr("name.invalid:1"), None);
    }
}

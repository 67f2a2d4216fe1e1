//! Topic names: `persistent://tenant/namespace/topic`; a bare `topic` means
//! `persistent://public/default/topic`.

use std::fmt;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid topic name {name:?}: {reason}")]
pub struct TopicNameError {
    pub name: String,
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName {
    pub persistent: bool,
    pub tenant: String,
    pub namespace: String,
    pub local: String,
}

pub const MAX_TOPIC_NAME_BYTES: usize = 1024;

/// What a partition's name adds to its partitioned topic's: `-partition-<i>`.
pub const PARTITION_SUFFIX: &str = "-partition-";

impl TopicName {
    pub fn parse(name: &str) -> Result<TopicName, TopicNameError> {
        let err = |reason| TopicNameError {
            name: name.to_string(),
            reason,
        };
        if name.is_empty() {
            return Err(err("empty"));
        }
        if name.len() > MAX_TOPIC_NAME_BYTES {
            return Err(err("too long"));
        }
        let (persistent, rest) = if let Some(r) = name.strip_prefix("persistent://") {
            (true, r)
        } else if let Some(r) = name.strip_prefix("non-persistent://") {
            (false, r)
        } else if name.contains("://") {
            return Err(err("unknown domain"));
        } else if name.contains('/') {
            return Err(err("a short name cannot contain '/'"));
        } else {
            (true, name)
        };
        let parts: Vec<&str> = if name.contains("://") {
            rest.splitn(3, '/').collect()
        } else {
            vec!["public", "default", rest]
        };
        if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(err("expected tenant/namespace/topic"));
        }
        if !parts[..2].iter().all(|p| is_valid_segment(p)) {
            return Err(err("tenant and namespace allow [A-Za-z0-9-_.=:]"));
        }
        if parts[2].chars().any(|c| c.is_control()) {
            return Err(err("control characters are not allowed"));
        }
        Ok(TopicName {
            persistent,
            tenant: parts[0].to_string(),
            namespace: parts[1].to_string(),
            local: parts[2].to_string(),
        })
    }

    pub fn namespace(&self) -> String {
        format!("{}/{}", self.tenant, self.namespace)
    }

    /// `local` ends with `-partition-<i>`: the partitioned topic it belongs
    /// to and `i`.
    pub fn partition_of(&self) -> Option<(TopicName, u32)> {
        let (base, i) = self.local.rsplit_once(PARTITION_SUFFIX)?;
        if base.is_empty() || i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let i = i.parse().ok()?;
        let mut t = self.clone();
        t.local = base.to_string();
        Some((t, i))
    }

    /// The name of partition `i` of this (partitioned) topic.
    pub fn partition(&self, i: u32) -> TopicName {
        let mut t = self.clone();
        t.local = format!("{}{PARTITION_SUFFIX}{i}", self.local);
        t
    }

    /// `persistent` or `non-persistent`, as in URLs and REST paths.
    pub fn domain(&self) -> &'static str {
        if self.persistent {
            "persistent"
        } else {
            "non-persistent"
        }
    }

    /// The same name with characters that are awkward in metadata keys encoded.
    pub fn as_key(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.tenant,
            self.namespace,
            self.domain(),
            self.local.replace('%', "%25").replace('/', "%2F")
        )
    }
}

/// Whether `s` may name a tenant or a namespace: `[A-Za-z0-9-_.=:]+`.
pub fn is_valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.=:".contains(c))
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}/{}/{}",
            self.domain(),
            self.tenant,
            self.namespace,
            self.local
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions() {
        let t = TopicName::parse("persistent://t/n/orders").unwrap();
        let p = t.partition(3);
        assert_eq!(p.to_string(), "persistent://t/n/orders-partition-3");
        assert_eq!(p.partition_of(), Some((t.clone(), 3)));
        assert_eq!(t.partition_of(), None);
        for bad in [
            "x-partition-",
            "-partition-1",
            "x-partition-1a",
            "x-partition--1",
        ] {
            let n = TopicName::parse(bad).unwrap();
            assert_eq!(n.partition_of(), None, "{bad}");
        }
    }

    #[test]
    fn short_and_full_names() {
        let t = TopicName::parse("orders").unwrap();
        assert_eq!(t.to_string(), "persistent://public/default/orders");
        let t = TopicName::parse("persistent://acme/prod/a/b").unwrap();
        assert_eq!(t.local, "a/b");
        assert_eq!(t.as_key(), "acme/prod/persistent/a%2Fb");
        assert!(TopicName::parse("").is_err());
        assert!(TopicName::parse("kafka://x/y/z").is_err());
        assert!(TopicName::parse("persistent://x/y").is_err());
        assert!(TopicName::parse("a/b").is_err());
    }
}

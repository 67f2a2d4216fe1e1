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
        for p in &parts[..2] {
            if !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.=:".contains(c))
            {
                return Err(err("tenant and namespace allow [A-Za-z0-9-_.=:]"));
            }
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

    /// The same name with characters that are awkward in metadata keys encoded.
    pub fn as_key(&self) -> String {
        let domain = if self.persistent {
            "persistent"
        } else {
            "non-persistent"
        };
        format!(
            "{}/{}/{}/{}",
            self.tenant,
            self.namespace,
            domain,
            self.local.replace('%', "%25").replace('/', "%2F")
        )
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let domain = if self.persistent {
            "persistent"
        } else {
            "non-persistent"
        };
        write!(
            f,
            "{domain}://{}/{}/{}",
            self.tenant, self.namespace, self.local
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! Bundles: a namespace's topics split by the hash of their names into
//! ranges, the unit of ownership and of load balancing. Pure: hashing,
//! finding a topic's bundle, splitting.
//!
//! Ranges are written as Pulsar writes them, `0x00000000_0x40000000`: a
//! range holds hashes in `[lower, upper)`, and the last one also holds
//! `0xffffffff`.

use std::fmt;

use magnetar_proto::TopicName;
use serde::{Deserialize, Serialize};

pub const FULL_UPPER: u32 = u32::MAX;

/// A topic's place in the hash space (CRC32C of its full name).
pub fn topic_hash(topic: &TopicName) -> u32 {
    let domain = if topic.persistent {
        "persistent"
    } else {
        "non-persistent"
    };
    let full = format!(
        "{domain}://{}/{}/{}",
        topic.tenant, topic.namespace, topic.local
    );
    crc32c::crc32c(full.as_bytes())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BundleRange {
    pub lower: u32,
    pub upper: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("bad bundle range {0:?}: expected 0x<lower>_0x<upper> in hex")]
    BadRange(String),
    #[error("bundle {0} is not a bundle of this namespace")]
    NotABundle(String),
    #[error("bundle {0} is too small to split")]
    TooSmall(String),
    #[error("bad bundle boundaries: {0}")]
    BadBoundaries(String),
}

impl BundleRange {
    pub fn contains(&self, hash: u32) -> bool {
        hash >= self.lower
            && (hash < self.upper || (self.upper == FULL_UPPER && hash == FULL_UPPER))
    }

    pub fn parse(s: &str) -> Result<BundleRange, BundleError> {
        let bad = || BundleError::BadRange(s.to_string());
        let (l, u) = s.split_once('_').ok_or_else(bad)?;
        let hex = |x: &str| {
            x.strip_prefix("0x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .ok_or_else(bad)
        };
        let (lower, upper) = (hex(l)?, hex(u)?);
        if lower >= upper {
            return Err(bad());
        }
        Ok(BundleRange { lower, upper })
    }

    /// The two halves.
    pub fn split(&self) -> Result<(BundleRange, BundleRange), BundleError> {
        let mid = self.lower + (self.upper - self.lower) / 2;
        if mid == self.lower {
            return Err(BundleError::TooSmall(self.to_string()));
        }
        Ok((
            BundleRange {
                lower: self.lower,
                upper: mid,
            },
            BundleRange {
                lower: mid,
                upper: self.upper,
            },
        ))
    }
}

impl fmt::Display for BundleRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:08x}_0x{:08x}", self.lower, self.upper)
    }
}

/// A namespace's bundles as boundaries: first 0, last 0xffffffff, rising.
/// Stored in the namespace's record in Pulsar's `BundlesData` shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundles {
    pub boundaries: Vec<String>,
    #[serde(rename = "numBundles")]
    pub num_bundles: usize,
}

impl Bundles {
    /// `n` ranges of equal width.
    pub fn even(n: usize) -> Bundles {
        let n = n.clamp(1, 1 << 16) as u64;
        let mut b: Vec<u32> = (0..n).map(|i| ((i << 32) / n) as u32).collect();
        b.push(FULL_UPPER);
        Bundles::from_bounds(&b)
    }

    fn from_bounds(b: &[u32]) -> Bundles {
        Bundles {
            boundaries: b.iter().map(|x| format!("0x{x:08x}")).collect(),
            num_bundles: b.len().saturating_sub(1),
        }
    }

    pub fn bounds(&self) -> Result<Vec<u32>, BundleError> {
        let bad = |why: &str| BundleError::BadBoundaries(why.to_string());
        let b: Vec<u32> = self
            .boundaries
            .iter()
            .map(|x| {
                x.strip_prefix("0x")
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .ok_or_else(|| bad(x))
            })
            .collect::<Result<_, _>>()?;
        if b.len() < 2 || b[0] != 0 || b[b.len() - 1] != FULL_UPPER {
            return Err(bad("must run from 0x00000000 to 0xffffffff"));
        }
        if b.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad("must rise"));
        }
        Ok(b)
    }

    pub fn ranges(&self) -> Result<Vec<BundleRange>, BundleError> {
        Ok(self
            .bounds()?
            .windows(2)
            .map(|w| BundleRange {
                lower: w[0],
                upper: w[1],
            })
            .collect())
    }

    /// The range holding `hash`.
    pub fn find(&self, hash: u32) -> Result<BundleRange, BundleError> {
        let b = self.bounds()?;
        // The last boundary <= hash starts the range (0xffffffff belongs to the last).
        let i = match b.binary_search(&hash) {
            Ok(i) => i.min(b.len() - 2),
            Err(i) => i - 1,
        };
        Ok(BundleRange {
            lower: b[i],
            upper: b[i + 1],
        })
    }

    /// These bundles with `range` split in two halves.
    pub fn split(&self, range: BundleRange) -> Result<Bundles, BundleError> {
        let mut b = self.bounds()?;
        if !self.ranges()?.contains(&range) {
            return Err(BundleError::NotABundle(range.to_string()));
        }
        let (low, _) = range.split()?;
        let at = b.partition_point(|x| *x <= range.lower);
        b.insert(at, low.upper);
        Ok(Bundles::from_bounds(&b))
    }
}

/// A bundle of a namespace: `tenant/namespace/0x..._0x...`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BundleKey {
    pub namespace: String,
    pub range: BundleRange,
}

impl fmt::Display for BundleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_bundles_cover_the_hash_space_and_find_each_hash() {
        let b = Bundles::even(4);
        assert_eq!(
            b.boundaries,
            vec![
                "0x00000000",
                "0x40000000",
                "0x80000000",
                "0xc0000000",
                "0xffffffff"
            ]
        );
        let r = b.ranges().unwrap();
        assert_eq!(r.len(), 4);
        for h in [
            0u32,
            1,
            0x3fff_ffff,
            0x4000_0000,
            0x9000_0000,
            0xffff_fffe,
            u32::MAX,
        ] {
            let found = b.find(h).unwrap();
            assert!(found.contains(h), "{h:#x} in {found}");
            assert_eq!(
                r.iter().filter(|x| x.contains(h)).count(),
                1,
                "{h:#x} in one range"
            );
        }
        assert_eq!(
            b.find(u32::MAX).unwrap().to_string(),
            "0xc0000000_0xffffffff"
        );
        assert_eq!(Bundles::even(1).ranges().unwrap().len(), 1);
    }

    #[test]
    fn ranges_parse_print_and_split() {
        let r = BundleRange::parse("0x40000000_0x80000000").unwrap();
        assert_eq!(r.to_string(), "0x40000000_0x80000000");
        assert!(BundleRange::parse("0x80000000_0x40000000").is_err());
        assert!(BundleRange::parse("40000000_0x80000000").is_err());
        assert!(BundleRange::parse("junk").is_err());
        let b = Bundles::even(2);
        let s = b.split(b.ranges().unwrap()[1]).unwrap();
        assert_eq!(
            s.boundaries,
            vec!["0x00000000", "0x80000000", "0xbfffffff", "0xffffffff"]
        );
        assert_eq!(s.num_bundles, 3);
        assert!(s.split(r).is_err(), "not one of its bundles");
        let tiny = BundleRange { lower: 5, upper: 6 };
        assert!(tiny.split().is_err());
    }

    #[test]
    fn topics_spread_over_bundles() {
        let b = Bundles::even(16);
        let mut counts = std::collections::HashMap::new();
        for i in 0..1600 {
            let t = TopicName::parse(&format!("topic-{i}")).unwrap();
            *counts.entry(b.find(topic_hash(&t)).unwrap()).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 16);
        assert!(counts.values().all(|n| *n > 50), "{counts:?}");
    }

    #[test]
    fn bad_boundaries_are_refused() {
        let bad = Bundles {
            boundaries: vec!["0x00000010".into(), "0xffffffff".into()],
            num_bundles: 1,
        };
        assert!(bad.ranges().is_err());
        let bad = Bundles {
            boundaries: vec!["0x00000000".into(), "zz".into()],
            num_bundles: 1,
        };
        assert!(bad.find(3).is_err());
    }
}

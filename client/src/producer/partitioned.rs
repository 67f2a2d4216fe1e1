//! Which partition of a partitioned topic a message goes to, the way the
//! Java client decides it, so that producers of every language agree on a
//! key's partition: a keyed message goes to `hash(key) mod partitions`
//! (Java's `String.hashCode`, or Murmur3 x86 32-bit with seed 0, either
//! masked to 31 bits); a message without a key goes round robin — one
//! partition after the other, or, when batching, one partition per batch
//! delay so that batches fill (Java's `RoundRobinPartitionMessageRouter`).

use magnetar_proto::hash::murmur3_32;

/// How a key becomes a partition (Java's `HashingScheme`).
///
/// ```
/// use magnetar_client::HashingScheme;
///
/// // Java: "hello".hashCode() == 99162322; partition = hash % partitions.
/// assert_eq!(HashingScheme::JavaStringHash.hash("hello") % 4, 99162322 % 4);
/// assert_eq!(HashingScheme::Murmur3_32Hash.hash("hello"), 0x248b_fa47);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HashingScheme {
    /// Java's `String.hashCode()` (the Java client's default).
    #[default]
    JavaStringHash,
    /// Murmur3 x86 32-bit, seed 0, of the key's UTF-8 bytes.
    Murmur3_32Hash,
}

impl HashingScheme {
    /// The key's hash, non-negative (the sign bit masked off, as Java does).
    pub fn hash(self, key: &str) -> u32 {
        let h = match self {
            HashingScheme::JavaStringHash => java_string_hash(key),
            HashingScheme::Murmur3_32Hash => murmur3_32(key.as_bytes(), 0),
        };
        h & 0x7fff_ffff
    }
}

/// Java's `String.hashCode()`: over UTF-16 code units, `h = 31 h + c`.
pub fn java_string_hash(s: &str) -> u32 {
    s.encode_utf16()
        .fold(0u32, |h, c| h.wrapping_mul(31).wrapping_add(c as u32))
}

/// Picks partitions for a producer. No I/O: the time comes in.
#[derive(Debug, Clone)]
pub struct Router {
    scheme: HashingScheme,
    partitions: u32,
    /// Where round robin starts (random per producer, as in Java).
    start: u32,
    next: u32,
    /// With batching, keyless messages stay on one partition this long.
    switch_ms: Option<u64>,
}

impl Router {
    pub fn new(
        scheme: HashingScheme,
        partitions: u32,
        start: u32,
        switch_ms: Option<u64>,
    ) -> Router {
        Router {
            scheme,
            partitions: partitions.max(1),
            start,
            next: start,
            switch_ms: switch_ms.filter(|ms| *ms > 0),
        }
    }

    /// The partition for a message with `key` (or none) sent at `now_ms`.
    pub fn route(&mut self, key: Option<&str>, now_ms: u64) -> u32 {
        if let Some(k) = key {
            return self.scheme.hash(k) % self.partitions;
        }
        match self.switch_ms {
            Some(ms) => ((self.start as u64 + now_ms / ms) % self.partitions as u64) as u32,
            None => {
                let p = self.next % self.partitions;
                self.next = self.next.wrapping_add(1);
                p
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_string_hash_matches_java() {
        // Values of "…".hashCode() in Java.
        assert_eq!(java_string_hash(""), 0);
        assert_eq!(java_string_hash("a"), 97);
        assert_eq!(java_string_hash("hello") as i32, 99162322);
        assert_eq!(java_string_hash("key-1") as i32, 101943363);
        // Overflows go negative in Java: "polygenelubricants" is i32::MIN.
        assert_eq!(java_string_hash("polygenelubricants") as i32, i32::MIN);
        assert_eq!(
            HashingScheme::JavaStringHash.hash("polygenelubricants"),
            0,
            "masked to 31 bits"
        );
        // Outside the BMP: two UTF-16 code units, as Java counts them.
        assert_eq!(java_string_hash("😀") as i32, 1772899);
    }

    #[test]
    fn keys_pick_their_partition_and_keyless_messages_go_round() {
        let mut r = Router::new(HashingScheme::JavaStringHash, 5, 3, None);
        for _ in 0..3 {
            assert_eq!(r.route(Some("hello"), 0), 99162322 % 5);
        }
        let seq: Vec<u32> = (0..6).map(|_| r.route(None, 0)).collect();
        assert_eq!(seq, vec![3, 4, 0, 1, 2, 3]);
        let mut m = Router::new(HashingScheme::Murmur3_32Hash, 7, 0, None);
        assert_eq!(m.route(Some("hello"), 0), (0x248b_fa47 & 0x7fff_ffff) % 7);
    }

    #[test]
    fn batching_switches_partition_once_per_delay() {
        let mut r = Router::new(HashingScheme::JavaStringHash, 4, 1, Some(10));
        assert_eq!(r.route(None, 1000), (1 + 100) % 4);
        assert_eq!(r.route(None, 1009), (1 + 100) % 4);
        assert_eq!(r.route(None, 1010), (1 + 101) % 4);
    }
}

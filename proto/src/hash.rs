//! The hashes Pulsar clients and brokers agree on: Murmur3 (x86, 32 bit,
//! seed 0) as Pulsar's `Murmur3_32Hash` computes it — Key_Shared hash
//! slots, and the Java client's `Murmur3_32Hash` partition routing.

/// MurmurHash3 x86_32 of `data` with `seed`.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mix = |k: u32| k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for b in &mut blocks {
        h ^= mix(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, byte) in tail.iter().enumerate() {
            k |= (*byte as u32) << (8 * i);
        }
        h ^= mix(k);
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Pulsar's `Murmur3_32Hash.makeHash`: the hash without its sign bit.
pub fn pulsar_murmur3(key: &[u8]) -> u32 {
    murmur3_32(key, 0) & 0x7fff_ffff
}

/// How many hash slots Key_Shared divides keys into (Pulsar's
/// `DEFAULT_RANGE_SIZE`); sticky ranges are given in `0..KEY_HASH_SLOTS`.
pub const KEY_HASH_SLOTS: u32 = 1 << 16;

/// The Key_Shared slot of a sticky key (ordering key, else partition key,
/// else [`NONE_KEY`]).
pub fn key_hash_slot(key: &[u8]) -> u16 {
    (pulsar_murmur3(key) % KEY_HASH_SLOTS) as u16
}

/// The sticky key of a message that has neither an ordering key nor a
/// partition key (Pulsar's `NONE_KEY`).
pub const NONE_KEY: &[u8] = b"NONE_KEY";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_matches_the_reference_vectors() {
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_32(b"hello", 0), 0x248b_fa47);
        assert_eq!(
            murmur3_32(b"The quick brown fox jumps over the lazy dog", 0),
            0x2e4f_f723
        );
        // Every tail length.
        assert_eq!(murmur3_32(b"a", 0), 0x3c25_69b2);
        assert_eq!(murmur3_32(b"ab", 0), 0x9bbf_d75f);
        assert_eq!(murmur3_32(b"abc", 0), 0xb3dd_93fa);
        assert_eq!(murmur3_32(b"abcd", 0), 0x43ed_676a);
    }

    #[test]
    fn slots_are_the_low_bits_without_the_sign() {
        assert!(pulsar_murmur3(b"The quick brown fox jumps over the lazy dog") < 1 << 31);
        assert_eq!(key_hash_slot(b"hello"), 0xfa47);
    }
}

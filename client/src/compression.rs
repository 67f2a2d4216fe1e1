//! Pulsar's payload codecs. A producer compresses an entry's payload (a
//! single message, or a whole batch) and names the codec and the
//! uncompressed size in its metadata; a consumer reverses it. The formats
//! are the ones every Pulsar client uses: LZ4 is the raw LZ4 *block* format
//! (no frame), ZLIB is zlib-wrapped deflate, ZSTD a zstd frame, SNAPPY raw
//! snappy (no framing).

use std::io::{Read, Write};

use bytes::Bytes;
use magnetar_proto::pulsar::CompressionType;

use crate::Error;

/// The largest payload a consumer inflates: a corrupt or hostile
/// `uncompressed_size` must not make it allocate without bound.
pub const MAX_UNCOMPRESSED_BYTES: usize = 64 * 1024 * 1024;

/// How a producer compresses what it sends.
///
/// ```
/// use magnetar_client::Compression;
///
/// let text = "the same words again and again ".repeat(100);
/// let z = Compression::Zstd.compress(text.as_bytes())?;
/// assert!(z.len() < text.len() / 10);
/// assert_eq!(Compression::Zstd.decompress(z, text.len())?, text.as_bytes());
/// # Ok::<(), magnetar_client::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Not compressed.
    #[default]
    None,
    /// LZ4 (block format).
    Lz4,
    /// zlib-wrapped deflate.
    Zlib,
    /// Zstandard.
    Zstd,
    /// Snappy (raw).
    Snappy,
}

impl Compression {
    /// The codec as the protocol names it.
    pub fn wire(self) -> CompressionType {
        match self {
            Compression::None => CompressionType::None,
            Compression::Lz4 => CompressionType::Lz4,
            Compression::Zlib => CompressionType::Zlib,
            Compression::Zstd => CompressionType::Zstd,
            Compression::Snappy => CompressionType::Snappy,
        }
    }

    /// The codec a message's metadata names (`None` for an unknown one).
    pub fn from_wire(code: i32) -> Option<Compression> {
        Some(match CompressionType::try_from(code).ok()? {
            CompressionType::None => Compression::None,
            CompressionType::Lz4 => Compression::Lz4,
            CompressionType::Zlib => Compression::Zlib,
            CompressionType::Zstd => Compression::Zstd,
            CompressionType::Snappy => Compression::Snappy,
        })
    }

    /// `data` compressed with this codec.
    pub fn compress(self, data: &[u8]) -> Result<Bytes, Error> {
        let failed = |e: &dyn std::fmt::Display| Error::Protocol(format!("{self:?} compress: {e}"));
        Ok(match self {
            Compression::None => Bytes::copy_from_slice(data),
            Compression::Lz4 => lz4_flex::block::compress(data).into(),
            Compression::Zlib => {
                let mut enc = flate2::write::ZlibEncoder::new(
                    Vec::with_capacity(data.len() / 2),
                    flate2::Compression::default(),
                );
                enc.write_all(data).map_err(|e| failed(&e))?;
                enc.finish().map_err(|e| failed(&e))?.into()
            }
            // Level 3: zstd's own default, as Pulsar's clients use.
            Compression::Zstd => zstd::bulk::compress(data, 3)
                .map_err(|e| failed(&e))?
                .into(),
            Compression::Snappy => snap::raw::Encoder::new()
                .compress_vec(data)
                .map_err(|e| failed(&e))?
                .into(),
        })
    }

    /// `data` inflated back to exactly `uncompressed_size` bytes; a payload
    /// that does not decode to that size is an error, never a panic.
    pub fn decompress(self, data: Bytes, uncompressed_size: usize) -> Result<Bytes, Error> {
        if uncompressed_size > MAX_UNCOMPRESSED_BYTES {
            return Err(Error::Protocol(format!(
                "{self:?} payload claims {uncompressed_size} bytes uncompressed (limit {MAX_UNCOMPRESSED_BYTES})"
            )));
        }
        let failed =
            |e: &dyn std::fmt::Display| Error::Protocol(format!("{self:?} decompress: {e}"));
        let out: Vec<u8> = match self {
            Compression::None => return Ok(data),
            Compression::Lz4 => {
                lz4_flex::block::decompress(&data, uncompressed_size).map_err(|e| failed(&e))?
            }
            Compression::Zlib => {
                let mut out = Vec::with_capacity(uncompressed_size);
                flate2::read::ZlibDecoder::new(&data[..])
                    .take(uncompressed_size as u64 + 1)
                    .read_to_end(&mut out)
                    .map_err(|e| failed(&e))?;
                out
            }
            Compression::Zstd => {
                zstd::bulk::decompress(&data, uncompressed_size).map_err(|e| failed(&e))?
            }
            Compression::Snappy => {
                let n = snap::raw::decompress_len(&data).map_err(|e| failed(&e))?;
                if n != uncompressed_size {
                    return Err(failed(&format!(
                        "{n} bytes where the metadata says {uncompressed_size}"
                    )));
                }
                snap::raw::Decoder::new()
                    .decompress_vec(&data)
                    .map_err(|e| failed(&e))?
            }
        };
        if out.len() != uncompressed_size {
            return Err(failed(&format!(
                "{} bytes where the metadata says {uncompressed_size}",
                out.len()
            )));
        }
        Ok(out.into())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ALL: [Compression; 5] = [
        Compression::None,
        Compression::Lz4,
        Compression::Zlib,
        Compression::Zstd,
        Compression::Snappy,
    ];

    #[test]
    fn every_codec_round_trips_and_names_itself_on_the_wire() {
        let data: Vec<u8> = (0..20_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for c in ALL {
            let z = c.compress(&data).unwrap();
            if c != Compression::None {
                assert!(z.len() < data.len() / 2, "{c:?} compresses");
            }
            assert_eq!(c.decompress(z, data.len()).unwrap(), data, "{c:?}");
            assert_eq!(Compression::from_wire(c.wire() as i32), Some(c));
        }
        assert_eq!(Compression::from_wire(99), None);
    }

    #[test]
    fn formats_are_the_raw_ones_pulsar_clients_use() {
        let data = b"hello hello hello hello hello";
        // zlib header (deflate, 32K window), zstd frame magic.
        assert_eq!(Compression::Zlib.compress(data).unwrap()[0], 0x78);
        assert_eq!(
            Compression::Zstd.compress(data).unwrap()[..4],
            [0x28, 0xb5, 0x2f, 0xfd]
        );
        // Raw snappy starts with the varint length; raw LZ4 has no frame magic.
        assert_eq!(
            Compression::Snappy.compress(data).unwrap()[0],
            data.len() as u8
        );
        assert_ne!(
            Compression::Lz4.compress(data).unwrap()[..4],
            [0x04, 0x22, 0x4d, 0x18]
        );
    }

    #[test]
    fn bad_payloads_and_sizes_are_errors() {
        let data = vec![7u8; 4096];
        for c in ALL.into_iter().skip(1) {
            let z = c.compress(&data).unwrap();
            assert!(c.decompress(z.clone(), 4095).is_err(), "{c:?} short size");
            assert!(c.decompress(z.clone(), 4097).is_err(), "{c:?} long size");
            assert!(
                c.decompress(Bytes::from_static(b"\xff\xfe garbage"), 4096)
                    .is_err(),
                "{c:?} garbage"
            );
            assert!(c.decompress(z, MAX_UNCOMPRESSED_BYTES + 1).is_err());
        }
    }
}

//! Payloads decoded without a copy: a `Bytes` field marked
//! `#[serde(with = "crate::shared_bytes")]` comes out of an RPC body as a
//! slice of the received buffer (reference-counted), not as a fresh
//! allocation and copy per entry. The wire format is the same as plain
//! `Bytes` (a length and the raw bytes).
//!
//! [`decode`] makes the body known to the field's deserializer for the
//! duration of the decode (a thread-local: serde offers no other way to pass
//! it down); anywhere else, and for bytes that do not lie in the body, the
//! field is copied as usual.
//!
//! A slice keeps the whole buffer it came in alive (with quinn, possibly a
//! receive buffer of several packets): only for payloads that are let go
//! soon, like the adds a bookie journals.

use std::cell::RefCell;

use bytes::Bytes;
use serde::de::{DeserializeOwned, Deserializer, Error, Visitor};
use serde::Serializer;

thread_local! {
    static BODY: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Decodes `body` with `decode`, letting shared-bytes fields borrow from it.
pub fn decode<T: DeserializeOwned, E>(
    body: &Bytes,
    decode: impl FnOnce(&[u8]) -> Result<T, E>,
) -> Result<T, E> {
    let previous = BODY.with(|b| b.replace(Some(body.clone())));
    let result = decode(body);
    BODY.with(|b| *b.borrow_mut() = previous);
    result
}

pub fn serialize<S: Serializer>(bytes: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(bytes)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
    d.deserialize_bytes(SharedBytes)
}

struct SharedBytes;

impl<'de> Visitor<'de> for SharedBytes {
    type Value = Bytes;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("bytes")
    }

    fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Bytes, E> {
        Ok(BODY.with(|b| match &*b.borrow() {
            Some(body) if lies_in(body, v) => body.slice_ref(v),
            _ => Bytes::copy_from_slice(v),
        }))
    }

    fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes::from(v))
    }

    /// Formats that write bytes as a sequence (JSON) still decode.
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        Ok(Bytes::from(v))
    }
}

/// `part` is a sub-slice of `body` (by address).
fn lies_in(body: &Bytes, part: &[u8]) -> bool {
    let start = body.as_ptr() as usize;
    let at = part.as_ptr() as usize;
    at >= start && at + part.len() <= start + body.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bincode::Options;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Msg {
        id: u64,
        #[serde(with = "crate::shared_bytes")]
        payload: Bytes,
        plain: Bytes,
    }

    #[test]
    fn payloads_are_slices_of_the_body_and_the_format_is_plain_bytes() {
        let msg = Msg {
            id: 7,
            payload: Bytes::from_static(b"a payload of some length"),
            plain: Bytes::from_static(b"copied"),
        };
        let codec = bincode::DefaultOptions::new();
        let body = Bytes::from(codec.serialize(&msg).unwrap());
        let got: Msg = decode(&body, |b| codec.deserialize(b)).unwrap();
        assert_eq!(got, msg);
        assert!(lies_in(&body, &got.payload), "shared with the body");
        assert!(!lies_in(&body, &got.plain), "plain Bytes are copied");
        // Same bytes on the wire as a plain `Bytes` field.
        #[derive(serde::Serialize)]
        struct Plain {
            id: u64,
            payload: Bytes,
            plain: Bytes,
        }
        let plain = Plain {
            id: 7,
            payload: msg.payload.clone(),
            plain: msg.plain.clone(),
        };
        assert_eq!(codec.serialize(&plain).unwrap(), body.to_vec());
        // Outside `decode`, a copy; the slot is left empty afterwards.
        let copied: Msg = codec.deserialize(&body).unwrap();
        assert!(!lies_in(&body, &copied.payload));
        assert!(BODY.with(|b| b.borrow().is_none()));
    }
}

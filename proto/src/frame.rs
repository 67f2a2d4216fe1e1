//! Pulsar binary framing: `[total_size][command_size][BaseCommand]` with an
//! optional payload section `[0x0e01][crc32c][metadata_size][metadata][payload]`.
//!
//! Every size read from the wire is bounded before it is used, and the CRC32C of
//! a payload section is checked before the payload is handed on.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::pulsar::{base_command::Type, BaseCommand, MessageMetadata, SingleMessageMetadata};

/// Pulsar's default maximum message size, announced in CONNECTED.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 5 * 1024 * 1024;
/// Room for the command and headers on top of the largest message.
pub const FRAME_OVERHEAD_BYTES: usize = 10 * 1024;
pub const MAGIC_CRC32C: u16 = 0x0e01;
pub const MAGIC_BROKER_ENTRY_METADATA: u16 = 0x0e02;
/// Most messages a batch may claim to hold; bounds the decoder's work.
pub const MAX_BATCH_MESSAGES: usize = 100_000;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("command does not decode: {0}")]
    BadCommand(String),
    #[error("message metadata does not decode: {0}")]
    BadMetadata(String),
    #[error("checksum mismatch: frame says {expected:#010x}, content has {actual:#010x}")]
    Checksum { expected: u32, actual: u32 },
}

/// A message payload as carried on the wire and stored in a ledger entry: the
/// bytes from the 0x0e01 magic to the end (checksum, metadata, payload).
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    /// `[0x0e01][crc32c][metadata_size][metadata][payload]`, stored verbatim.
    pub headers_and_payload: Bytes,
    pub metadata: MessageMetadata,
    /// Offset of the message payload inside `headers_and_payload`.
    pub payload_offset: usize,
}

impl Payload {
    /// The application payload (a whole batch when batched).
    pub fn payload(&self) -> Bytes {
        self.headers_and_payload.slice(self.payload_offset..)
    }

    /// Builds the stored form from metadata and payload, computing the CRC32C.
    pub fn build(metadata: MessageMetadata, payload: &[u8]) -> Payload {
        let meta_len = metadata.encoded_len();
        let mut buf = BytesMut::with_capacity(2 + 4 + 4 + meta_len + payload.len());
        buf.put_u16(MAGIC_CRC32C);
        buf.put_u32(0);
        buf.put_u32(meta_len as u32);
        // Encoding into a BytesMut with reserved capacity cannot fail.
        metadata.encode(&mut buf).expect("capacity reserved");
        buf.put_slice(payload);
        let crc = crc32c::crc32c(&buf[6..]);
        buf[2..6].copy_from_slice(&crc.to_be_bytes());
        let payload_offset = 10 + meta_len;
        Payload {
            headers_and_payload: buf.freeze(),
            metadata,
            payload_offset,
        }
    }

    /// Parses a stored/wire payload section, checking magic and CRC32C.
    pub fn parse(headers_and_payload: Bytes) -> Result<Payload, FrameError> {
        let b = &headers_and_payload;
        if b.len() < 10 {
            return Err(FrameError::Malformed(
                "payload section shorter than its headers",
            ));
        }
        if u16::from_be_bytes([b[0], b[1]]) != MAGIC_CRC32C {
            return Err(FrameError::Malformed(
                "payload section lacks the 0x0e01 magic",
            ));
        }
        let expected = u32::from_be_bytes([b[2], b[3], b[4], b[5]]);
        let actual = crc32c::crc32c(&b[6..]);
        if expected != actual {
            return Err(FrameError::Checksum { expected, actual });
        }
        let meta_len = u32::from_be_bytes([b[6], b[7], b[8], b[9]]) as usize;
        if meta_len > b.len() - 10 {
            return Err(FrameError::Malformed("metadata size exceeds the frame"));
        }
        let metadata = MessageMetadata::decode(&b[10..10 + meta_len])
            .map_err(|e| FrameError::BadMetadata(e.to_string()))?;
        Ok(Payload {
            payload_offset: 10 + meta_len,
            headers_and_payload,
            metadata,
        })
    }

    /// Decodes only the metadata of a payload in stored form, bounding sizes
    /// but not recomputing the CRC32C: for entries whose integrity another
    /// check already covers (the ledger entry digest), where a second pass
    /// over the payload would be wasted work on the dispatch path.
    pub fn peek_metadata(headers_and_payload: &[u8]) -> Result<MessageMetadata, FrameError> {
        let b = headers_and_payload;
        if b.len() < 10 || u16::from_be_bytes([b[0], b[1]]) != MAGIC_CRC32C {
            return Err(FrameError::Malformed("not a stored payload section"));
        }
        let meta_len = u32::from_be_bytes([b[6], b[7], b[8], b[9]]) as usize;
        if meta_len > b.len() - 10 {
            return Err(FrameError::Malformed("metadata size exceeds the frame"));
        }
        MessageMetadata::decode(&b[10..10 + meta_len])
            .map_err(|e| FrameError::BadMetadata(e.to_string()))
    }

    /// Parses a payload section without a checksum (protocol < 6):
    /// `[metadata_size][metadata][payload]`, and returns it in stored form.
    fn parse_unchecked(section: &[u8]) -> Result<Payload, FrameError> {
        if section.len() < 4 {
            return Err(FrameError::Malformed(
                "payload section shorter than its headers",
            ));
        }
        let meta_len =
            u32::from_be_bytes([section[0], section[1], section[2], section[3]]) as usize;
        if meta_len > section.len() - 4 {
            return Err(FrameError::Malformed("metadata size exceeds the frame"));
        }
        let metadata = MessageMetadata::decode(&section[4..4 + meta_len])
            .map_err(|e| FrameError::BadMetadata(e.to_string()))?;
        Ok(Payload::build(metadata, &section[4 + meta_len..]))
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub command: BaseCommand,
    pub payload: Option<Payload>,
    /// Set when the frame was delimited correctly but its payload section is
    /// bad (e.g. a checksum mismatch): the command is still known, so the
    /// peer can be told which message was refused.
    pub payload_error: Option<FrameError>,
}

/// Decodes one frame from the front of `buf`, consuming it. Returns
/// `Ok(None)` when more bytes are needed. `max_frame_bytes` bounds
/// `total_size` before any allocation.
pub fn decode(buf: &mut BytesMut, max_frame_bytes: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let total = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if total > max_frame_bytes {
        return Err(FrameError::TooLarge {
            size: total,
            limit: max_frame_bytes,
        });
    }
    if total < 4 {
        return Err(FrameError::Malformed(
            "total size smaller than the command size field",
        ));
    }
    if buf.len() < 4 + total {
        buf.reserve(4 + total - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let mut frame = buf.split_to(total).freeze();
    let cmd_len = frame.get_u32() as usize;
    if cmd_len > frame.len() {
        return Err(FrameError::Malformed("command size exceeds the frame"));
    }
    let command = BaseCommand::decode(&frame[..cmd_len])
        .map_err(|e| FrameError::BadCommand(e.to_string()))?;
    frame.advance(cmd_len);
    if frame.is_empty() {
        return Ok(Some(Frame {
            command,
            payload: None,
            payload_error: None,
        }));
    }
    let payload = parse_payload_section(frame);
    Ok(Some(match payload {
        Ok(p) => Frame {
            command,
            payload: Some(p),
            payload_error: None,
        },
        Err(e) => Frame {
            command,
            payload: None,
            payload_error: Some(e),
        },
    }))
}

/// Parses what follows the command: an optional broker-entry-metadata block,
/// then the payload section with or without a checksum.
fn parse_payload_section(mut section: Bytes) -> Result<Payload, FrameError> {
    let magic = |b: &Bytes| (b.len() >= 2).then(|| u16::from_be_bytes([b[0], b[1]]));
    if magic(&section) == Some(MAGIC_BROKER_ENTRY_METADATA) {
        if section.len() < 6 {
            return Err(FrameError::Malformed("truncated broker entry metadata"));
        }
        let n = u32::from_be_bytes([section[2], section[3], section[4], section[5]]) as usize;
        if n > section.len() - 6 {
            return Err(FrameError::Malformed(
                "broker entry metadata exceeds the frame",
            ));
        }
        section.advance(6 + n);
    }
    if magic(&section) == Some(MAGIC_CRC32C) {
        Payload::parse(section)
    } else {
        Payload::parse_unchecked(&section)
    }
}

/// Appends a command-only frame.
pub fn encode_command(cmd: &BaseCommand, out: &mut BytesMut) {
    let cmd_len = cmd.encoded_len();
    out.reserve(8 + cmd_len);
    out.put_u32((4 + cmd_len) as u32);
    out.put_u32(cmd_len as u32);
    cmd.encode(out).expect("capacity reserved");
}

/// Appends a command frame carrying a payload section in stored form.
pub fn encode_payload_command(cmd: &BaseCommand, headers_and_payload: &[u8], out: &mut BytesMut) {
    let cmd_len = cmd.encoded_len();
    out.reserve(8 + cmd_len + headers_and_payload.len());
    out.put_u32((4 + cmd_len + headers_and_payload.len()) as u32);
    out.put_u32(cmd_len as u32);
    cmd.encode(out).expect("capacity reserved");
    out.put_slice(headers_and_payload);
}

/// A frame queued for a connection's writer: its head (sizes, command and,
/// for a payload frame, nothing more) and the payload section as stored —
/// a slice of the entry read, not a copy. `body` is empty for a
/// command-only frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutFrame {
    pub head: Bytes,
    pub body: Bytes,
}

impl OutFrame {
    /// A command frame carrying `headers_and_payload` (stored form) without
    /// copying it.
    pub fn with_payload(cmd: &BaseCommand, headers_and_payload: Bytes) -> OutFrame {
        let cmd_len = cmd.encoded_len();
        let mut head = BytesMut::with_capacity(8 + cmd_len);
        head.put_u32((4 + cmd_len + headers_and_payload.len()) as u32);
        head.put_u32(cmd_len as u32);
        cmd.encode(&mut head).expect("capacity reserved");
        OutFrame {
            head: head.freeze(),
            body: headers_and_payload,
        }
    }

    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Bytes> for OutFrame {
    fn from(head: Bytes) -> OutFrame {
        OutFrame {
            head,
            body: Bytes::new(),
        }
    }
}

/// Most bytes of queued frames gathered into one write.
pub const MAX_COALESCED_WRITE_BYTES: usize = 1 << 20;

/// Most frames gathered into one write (two slices each).
const MAX_GATHERED_FRAMES: usize = 256;

/// Writes frames from `rx` to `wr` until the queue closes or a write fails.
/// Frames that queued up meanwhile go out in one vectored write (heads and
/// payloads as they are, no copy) so a busy connection makes few syscalls;
/// a writer without vectored writes gets them copied into one buffer. The
/// buffers are kept from one write to the next.
pub async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(mut rx: impl FrameQueue, mut wr: W) {
    use tokio::io::AsyncWriteExt;
    let vectored = wr.is_write_vectored();
    let mut parts: std::collections::VecDeque<Bytes> = std::collections::VecDeque::new();
    let mut batch = BytesMut::new();
    while let Some(first) = rx.recv().await {
        let (mut size, mut frames) = (0, 0);
        let mut next = Some(first);
        while let Some(f) = next.take() {
            size += f.len();
            frames += 1;
            if vectored {
                parts.push_back(f.head);
                if !f.body.is_empty() {
                    parts.push_back(f.body);
                }
            } else {
                batch.extend_from_slice(&f.head);
                batch.extend_from_slice(&f.body);
            }
            if size < MAX_COALESCED_WRITE_BYTES && frames < MAX_GATHERED_FRAMES {
                next = rx.try_recv();
            }
        }
        let ok = if vectored {
            write_parts(&mut wr, &mut parts).await.is_ok()
        } else {
            let ok = wr.write_all(&batch).await.is_ok();
            batch.clear();
            ok
        };
        if !ok {
            return;
        }
    }
}

/// Writes every part, in order, with vectored writes (a short write goes
/// on from where it stopped); `parts` is empty on success.
async fn write_parts<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    parts: &mut std::collections::VecDeque<Bytes>,
) -> std::io::Result<()> {
    use bytes::Buf;
    use std::io::IoSlice;
    use tokio::io::AsyncWriteExt;
    while !parts.is_empty() {
        let mut slices = [IoSlice::new(&[]); 2 * MAX_GATHERED_FRAMES];
        let mut k = 0;
        for (slot, p) in slices.iter_mut().zip(parts.iter()) {
            *slot = IoSlice::new(p);
            k += 1;
        }
        let mut n = wr.write_vectored(&slices[..k]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let Some(front) = parts.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                parts.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
    Ok(())
}

/// Where `write_loop` takes its frames from: a bounded or unbounded queue.
pub trait FrameQueue {
    fn recv(&mut self) -> impl std::future::Future<Output = Option<OutFrame>> + Send;
    fn try_recv(&mut self) -> Option<OutFrame>;
}

impl FrameQueue for tokio::sync::mpsc::Receiver<OutFrame> {
    fn recv(&mut self) -> impl std::future::Future<Output = Option<OutFrame>> + Send {
        tokio::sync::mpsc::Receiver::recv(self)
    }
    fn try_recv(&mut self) -> Option<OutFrame> {
        tokio::sync::mpsc::Receiver::try_recv(self).ok()
    }
}

impl FrameQueue for tokio::sync::mpsc::UnboundedReceiver<OutFrame> {
    fn recv(&mut self) -> impl std::future::Future<Output = Option<OutFrame>> + Send {
        tokio::sync::mpsc::UnboundedReceiver::recv(self)
    }
    fn try_recv(&mut self) -> Option<OutFrame> {
        tokio::sync::mpsc::UnboundedReceiver::try_recv(self).ok()
    }
}

/// A `BaseCommand` of the given type with every optional body unset.
pub fn base(t: Type) -> BaseCommand {
    BaseCommand {
        r#type: t as i32,
        ..Default::default()
    }
}

/// One message of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchItem {
    pub metadata: SingleMessageMetadata,
    pub payload: Bytes,
}

/// Encodes a batch payload: repeated `[u32 size][SingleMessageMetadata][payload]`.
pub fn encode_batch(items: &[BatchItem]) -> Bytes {
    let mut out = BytesMut::new();
    for item in items {
        let len = item.metadata.encoded_len();
        out.reserve(4 + len + item.payload.len());
        out.put_u32(len as u32);
        item.metadata.encode(&mut out).expect("capacity reserved");
        out.put_slice(&item.payload);
    }
    out.freeze()
}

/// Splits a batch payload into its `count` messages.
pub fn decode_batch(mut payload: Bytes, count: usize) -> Result<Vec<BatchItem>, FrameError> {
    if count > MAX_BATCH_MESSAGES {
        return Err(FrameError::Malformed("batch claims too many messages"));
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        if payload.len() < 4 {
            return Err(FrameError::Malformed("truncated batch"));
        }
        let len = payload.get_u32() as usize;
        if len > payload.len() {
            return Err(FrameError::Malformed("batch metadata exceeds the payload"));
        }
        let metadata = SingleMessageMetadata::decode(payload.split_to(len))
            .map_err(|e| FrameError::BadMetadata(e.to_string()))?;
        let size = usize::try_from(metadata.payload_size)
            .map_err(|_| FrameError::Malformed("negative batch payload size"))?;
        if size > payload.len() {
            return Err(FrameError::Malformed("batch payload exceeds the payload"));
        }
        items.push(BatchItem {
            payload: payload.split_to(size),
            metadata,
        });
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pulsar::{CommandPing, CommandSend};

    /// A writer that takes at most `step` bytes per call, vectored or not.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
        vectored: bool,
    }

    impl tokio::io::AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.step - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
                if n == self.step {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            self.vectored
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn queued_frames_go_out_whole_and_in_order_through_short_writes() {
        let (cmd, payload) = send_frame();
        let stored = payload.headers_and_payload.clone();
        let mut want = Vec::new();
        let mut frames = Vec::new();
        for i in 0..40u8 {
            let f = if i % 3 == 0 {
                OutFrame::from(Bytes::from(vec![i; 5]))
            } else {
                OutFrame::with_payload(&cmd, stored.clone())
            };
            want.extend_from_slice(&f.head);
            want.extend_from_slice(&f.body);
            frames.push(f);
        }
        // The payload frame is the same bytes as the copying encoder's.
        let mut copied = BytesMut::new();
        encode_payload_command(&cmd, &stored, &mut copied);
        let f = OutFrame::with_payload(&cmd, stored.clone());
        assert_eq!([&f.head[..], &f.body[..]].concat(), copied.to_vec());
        for vectored in [true, false] {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            for f in &frames {
                tx.send(f.clone()).unwrap();
            }
            drop(tx);
            let mut w = Trickle {
                out: Vec::new(),
                step: 7,
                vectored,
            };
            write_loop(rx, &mut w).await;
            assert_eq!(w.out, want, "vectored: {vectored}");
        }
    }

    fn send_frame() -> (BaseCommand, Payload) {
        let mut cmd = base(Type::Send);
        cmd.send = Some(CommandSend {
            producer_id: 1,
            sequence_id: 7,
            num_messages: Some(1),
            ..Default::default()
        });
        let md = MessageMetadata {
            producer_name: "p".into(),
            sequence_id: 7,
            publish_time: 42,
            ..Default::default()
        };
        (cmd, Payload::build(md, b"hello"))
    }

    #[test]
    fn round_trip_command_and_payload() {
        let mut out = BytesMut::new();
        let mut ping = base(Type::Ping);
        ping.ping = Some(CommandPing {});
        encode_command(&ping, &mut out);
        let (cmd, p) = send_frame();
        encode_payload_command(&cmd, &p.headers_and_payload, &mut out);
        let f1 = decode(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(f1.command, ping);
        assert!(f1.payload.is_none());
        let f2 = decode(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(f2.command, cmd);
        let got = f2.payload.unwrap();
        assert_eq!(got.payload(), Bytes::from_static(b"hello"));
        assert_eq!(
            Payload::peek_metadata(&got.headers_and_payload).unwrap(),
            got.metadata
        );
        assert!(Payload::peek_metadata(&got.headers_and_payload[..12]).is_err());
        assert_eq!(got.metadata.sequence_id, 7);
        assert!(out.is_empty());
    }

    #[test]
    fn truncated_frame_waits_for_more() {
        let (cmd, p) = send_frame();
        let mut full = BytesMut::new();
        encode_payload_command(&cmd, &p.headers_and_payload, &mut full);
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(decode(&mut part, 1 << 20).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn bad_crc_is_rejected() {
        let (cmd, p) = send_frame();
        let mut buf = BytesMut::new();
        encode_payload_command(&cmd, &p.headers_and_payload, &mut buf);
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        let f = decode(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(
            f.command, cmd,
            "the command of a corrupt frame is still known"
        );
        assert!(f.payload.is_none());
        assert!(matches!(f.payload_error, Some(FrameError::Checksum { .. })));
        assert!(
            buf.is_empty(),
            "the stream stays in sync after a corrupt payload"
        );
    }

    #[test]
    fn oversize_is_rejected_before_reading_the_body() {
        let mut buf = BytesMut::new();
        buf.put_u32(100 << 20);
        assert_eq!(
            decode(&mut buf, 5 << 20),
            Err(FrameError::TooLarge {
                size: 100 << 20,
                limit: 5 << 20
            })
        );
    }

    #[test]
    fn lying_inner_sizes_are_rejected() {
        let mut buf = BytesMut::new();
        buf.put_u32(8);
        buf.put_u32(1000);
        buf.put_u32(0);
        assert!(matches!(
            decode(&mut buf, 1 << 20),
            Err(FrameError::Malformed(_))
        ));
        let mut buf = BytesMut::new();
        buf.put_u32(6);
        buf.put_u32(2);
        buf.put_slice(&[0xff, 0xff]);
        assert!(matches!(
            decode(&mut buf, 1 << 20),
            Err(FrameError::BadCommand(_))
        ));
    }

    #[test]
    fn batch_round_trip_and_truncation() {
        let items: Vec<BatchItem> = (0..3)
            .map(|i| BatchItem {
                metadata: SingleMessageMetadata {
                    payload_size: 2,
                    partition_key: Some(format!("k{i}")),
                    ..Default::default()
                },
                payload: Bytes::from(vec![i as u8; 2]),
            })
            .collect();
        let enc = encode_batch(&items);
        assert_eq!(decode_batch(enc.clone(), 3).unwrap(), items);
        assert!(decode_batch(enc.slice(..enc.len() - 1), 3).is_err());
        assert!(decode_batch(enc, 4).is_err());
    }
}

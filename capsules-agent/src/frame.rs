//! Frame codec: `u32` big-endian length, then `kind: u8`, `channel: u32` big-endian, payload.
//!
//! The length counts everything after itself (kind + channel + payload), so the smallest valid
//! frame has length 5. Lengths above [`MAX_FRAME`] are refused before anything is allocated.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest accepted value of the length prefix (kind + channel + payload).
pub const MAX_FRAME: usize = 1024 * 1024;
/// Bytes of header after the length prefix: kind (1) + channel (4).
pub const HEADER: usize = 5;
/// Largest payload a frame can carry.
pub const MAX_PAYLOAD: usize = MAX_FRAME - HEADER;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A JSON control message (`proto::Request` host→agent, `proto::Reply` agent→host).
    Control = 0,
    /// Raw bytes of the channel's main stream (stdin, stdout, PTY, file chunks, TCP bytes).
    Data = 1,
    /// Raw stderr bytes (agent→host).
    Stderr = 2,
    /// End of the sender's data stream on this channel (stdin EOF, TCP half-close, end of upload).
    Eof = 3,
    /// Flow-control credit: payload is a `u32` big-endian count of bytes the peer may send more.
    Credit = 4,
    /// The sender abandons the channel: it sends nothing more and ignores what arrives on it.
    Cancel = 5,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Control,
            1 => Self::Data,
            2 => Self::Stderr,
            3 => Self::Eof,
            4 => Self::Credit,
            5 => Self::Cancel,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// Channel (request) id; 0 is the session itself.
    pub channel: u32,
    /// Payload bytes.
    pub payload: Bytes,
}

impl Frame {
    /// A frame from its parts.
    pub fn new(kind: FrameKind, channel: u32, payload: impl Into<Bytes>) -> Self {
        Self {
            kind,
            channel,
            payload: payload.into(),
        }
    }
}

/// Why a byte sequence is not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame length {0} exceeds the maximum of {MAX_FRAME} bytes")]
    TooLarge(u64),
    /// The length prefix is smaller than the header.
    #[error("frame length {0} is shorter than the {HEADER}-byte header")]
    TooShort(u32),
    /// Unknown kind byte.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A payload that does not fit its kind (e.g. a credit frame that is not 4 bytes).
    #[error("malformed {0:?} frame payload of {1} bytes")]
    BadPayload(FrameKind, usize),
    /// A payload too large to encode.
    #[error("payload of {0} bytes exceeds the maximum of {MAX_PAYLOAD}")]
    PayloadTooLarge(usize),
}

/// Append the encoding of `frame` to `out`.
pub fn encode(frame: &Frame, out: &mut BytesMut) -> Result<(), FrameError> {
    if frame.payload.len() > MAX_PAYLOAD {
        return Err(FrameError::PayloadTooLarge(frame.payload.len()));
    }
    out.reserve(4 + HEADER + frame.payload.len());
    out.put_u32((HEADER + frame.payload.len()) as u32);
    out.put_u8(frame.kind as u8);
    out.put_u32(frame.channel);
    out.put_slice(&frame.payload);
    Ok(())
}

/// Validate a length prefix and header without needing the payload.
fn check_header(len: u32, kind: u8) -> Result<FrameKind, FrameError> {
    if len as usize > MAX_FRAME {
        return Err(FrameError::TooLarge(len as u64));
    }
    if (len as usize) < HEADER {
        return Err(FrameError::TooShort(len));
    }
    let kind = FrameKind::from_u8(kind).ok_or(FrameError::UnknownKind(kind))?;
    let payload = len as usize - HEADER;
    let ok = match kind {
        FrameKind::Credit => payload == 4,
        FrameKind::Eof | FrameKind::Cancel => payload == 0,
        FrameKind::Control | FrameKind::Data | FrameKind::Stderr => true,
    };
    if ok {
        Ok(kind)
    } else {
        Err(FrameError::BadPayload(kind, payload))
    }
}

/// Decode one frame from the front of `buf`. `Ok(None)` means more bytes are needed; on success
/// the frame's bytes are removed from `buf`. Errors are detected as early as possible (the length
/// and kind are checked before the payload has arrived), so a hostile peer cannot make the caller
/// buffer more than [`MAX_FRAME`] + 4 bytes.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len as usize > MAX_FRAME {
        return Err(FrameError::TooLarge(len as u64));
    }
    if buf.len() < 5 {
        if (len as usize) < HEADER {
            return Err(FrameError::TooShort(len));
        }
        return Ok(None);
    }
    let kind = check_header(len, buf[4])?;
    let total = 4 + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    buf.advance(5);
    let channel = buf.get_u32();
    let payload = buf.split_to(len as usize - HEADER).freeze();
    Ok(Some(Frame { kind, channel, payload }))
}

/// Reads frames from an async byte stream with a bounded buffer.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

/// Error of [`FrameReader::read`].
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream does not carry valid frames.
    #[error("malformed frame")]
    Frame(#[from] FrameError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({0} bytes buffered)")]
    Truncated(usize),
    /// The underlying stream failed.
    #[error("stream read failed")]
    Io(#[from] std::io::Error),
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wrap a reader.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// The next frame; `Ok(None)` at a clean end of stream (between frames).
    pub async fn read(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(frame) = decode(&mut self.buf)? {
                return Ok(Some(frame));
            }
            // Never read past the end of the current frame by more than one read; the
            // buffer holds at most one partial frame (bounded by MAX_FRAME) plus a read.
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated(self.buf.len()))
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind_strategy() -> impl Strategy<Value = FrameKind> {
        prop_oneof![
            Just(FrameKind::Control),
            Just(FrameKind::Data),
            Just(FrameKind::Stderr),
            Just(FrameKind::Eof),
            Just(FrameKind::Credit),
            Just(FrameKind::Cancel),
        ]
    }

    fn frame_strategy() -> impl Strategy<Value = Frame> {
        (
            kind_strategy(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..2000),
        )
            .prop_map(|(kind, channel, mut payload)| {
                match kind {
                    FrameKind::Credit => payload.resize(4, 0),
                    FrameKind::Eof | FrameKind::Cancel => payload.clear(),
                    _ => {}
                }
                Frame::new(kind, channel, payload)
            })
    }

    proptest! {
        #[test]
        fn roundtrip_any_split(frames in proptest::collection::vec(frame_strategy(), 0..8), split in any::<usize>()) {
            let mut wire = BytesMut::new();
            for f in &frames { encode(f, &mut wire).unwrap(); }
            let wire = wire.freeze();
            let cut = if wire.is_empty() { 0 } else { split % wire.len() };
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut out = Vec::new();
            while let Some(f) = decode(&mut buf).unwrap() { out.push(f); }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = decode(&mut buf).unwrap() { out.push(f); }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(out, frames);
        }

        #[test]
        fn random_bytes_never_panic_and_stay_bounded(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut buf = BytesMut::from(&data[..]);
            loop {
                match decode(&mut buf) {
                    Ok(Some(f)) => prop_assert!(f.payload.len() <= MAX_PAYLOAD),
                    Ok(None) => { prop_assert!(buf.len() <= MAX_FRAME + 4); break }
                    Err(_) => break,
                }
            }
        }

        #[test]
        fn oversized_length_rejected_early(len in (MAX_FRAME as u32 + 1)..=u32::MAX, rest in proptest::collection::vec(any::<u8>(), 0..16)) {
            let mut buf = BytesMut::new();
            buf.put_u32(len);
            buf.extend_from_slice(&rest);
            prop_assert_eq!(decode(&mut buf), Err(FrameError::TooLarge(len as u64)));
        }
    }

    #[test]
    fn short_and_unknown_rejected() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 2][..]);
        assert_eq!(decode(&mut b), Err(FrameError::TooShort(2)));
        let mut b = BytesMut::from(&[0u8, 0, 0, 5, 9, 0, 0, 0, 1][..]);
        assert_eq!(decode(&mut b), Err(FrameError::UnknownKind(9)));
        let mut b = BytesMut::from(&[0u8, 0, 0, 6, 4, 0, 0, 0, 1, 0][..]);
        assert_eq!(decode(&mut b), Err(FrameError::BadPayload(FrameKind::Credit, 1)));
    }

    #[tokio::test]
    async fn reader_reports_truncation() {
        let mut wire = BytesMut::new();
        encode(&Frame::new(FrameKind::Data, 7, &b"hello"[..]), &mut wire).unwrap();
        let cut = wire.len() - 2;
        let mut r = FrameReader::new(&wire[..cut]);
        assert!(matches!(r.read().await, Err(ReadError::Truncated(_))));
        let mut r = FrameReader::new(&wire[..]);
        assert_eq!(r.read().await.unwrap().unwrap().payload, &b"hello"[..]);
        assert!(r.read().await.unwrap().is_none());
    }
}

//! Feed arbitrary bytes, split at an arbitrary point, to the frame decoder (and control payloads
//! to the request parser): it must never panic, never buffer more than one frame, and decode
//! the same frames however the input is split.
#![no_main]

use bytes::BytesMut;
use capsules_agent::frame::{self, FrameKind, MAX_FRAME};
use capsules_agent::proto::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let split = data[0] as usize % data.len();
    let data = &data[1..];
    let whole = decode_all(&[data]);
    let parts = decode_all(&[&data[..split.min(data.len())], &data[split.min(data.len())..]]);
    assert_eq!(whole, parts);
});

fn decode_all(parts: &[&[u8]]) -> (Vec<frame::Frame>, bool) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for p in parts {
        buf.extend_from_slice(p);
        loop {
            match frame::decode(&mut buf) {
                Ok(Some(f)) => {
                    assert!(f.payload.len() + frame::HEADER <= MAX_FRAME);
                    if f.kind == FrameKind::Control {
                        let _ = serde_json::from_slice::<Request>(&f.payload);
                    }
                    let mut re = BytesMut::new();
                    frame::encode(&f, &mut re).expect("decoded frames re-encode");
                    out.push(f);
                }
                Ok(None) => {
                    assert!(buf.len() < MAX_FRAME + 4);
                    break;
                }
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

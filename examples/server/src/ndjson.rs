//! Exec output as NDJSON: `{"stdout": b64}`, `{"stderr": b64}`, then `{"exit": ...}` or
//! `{"error": ...}` last.

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use capsules_client::wire::{ErrorBody, ExecLine};
use capsules_core::backend::{ExecEvent, ExecStream};
use futures::StreamExt;

pub(crate) fn line(ev: &capsules_core::Result<ExecEvent>) -> Bytes {
    let b64 = |b: &Bytes| base64::engine::general_purpose::STANDARD.encode(b);
    let l = match ev {
        Ok(ExecEvent::Stdout(b)) => ExecLine::Stdout(b64(b)),
        Ok(ExecEvent::Stderr(b)) => ExecLine::Stderr(b64(b)),
        Ok(ExecEvent::Exit(st)) => ExecLine::Exit(st.clone()),
        Err(e) => ExecLine::Error(ErrorBody::from_error(e).error),
    };
    let mut v = serde_json::to_vec(&l).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Streams `s` as NDJSON; ends after the exit or error line.
pub(crate) fn response(s: ExecStream) -> Response {
    let lines = futures::stream::unfold((s.events, false), |(mut events, done)| async move {
        if done {
            return None;
        }
        let ev = events.next().await?;
        let last = matches!(ev, Ok(ExecEvent::Exit(_)) | Err(_));
        Some((Ok::<_, std::convert::Infallible>(line(&ev)), (events, last)))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

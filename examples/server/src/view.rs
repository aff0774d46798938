//! Capsule JSON as the API answers it: the record, and where its `url` is set, `url.href` — the
//! absolute address of the public URL (`http(s)://<host label>.<preview domain>:<port>/`), which
//! the CLI and the web console show.

use axum::Json;
use axum::response::{IntoResponse, Response};
use capsules_client::wire::{CapsulePage, CapsuleUsage};
use capsules_core::records::CapsuleRecord;
use capsules_core::types::PublicUrl;
use serde_json::Value;

use crate::config::ServerConfig;

/// A public URL's JSON with its `href`.
pub(crate) fn url(cfg: &ServerConfig, u: &PublicUrl) -> Value {
    let mut v = serde_json::to_value(u).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert("href".into(), Value::String(cfg.href(&u.host_label)));
    }
    v
}

/// A capsule's JSON with `url.href` where the URL is set.
pub(crate) fn capsule(cfg: &ServerConfig, rec: &CapsuleRecord) -> Value {
    let mut v = serde_json::to_value(rec).unwrap_or(Value::Null);
    if let (Some(u), Some(o)) = (&rec.url, v.as_object_mut()) {
        o.insert("url".into(), url(cfg, u));
    }
    v
}

pub(crate) fn capsule_response(cfg: &ServerConfig, rec: &CapsuleRecord) -> Response {
    Json(capsule(cfg, rec)).into_response()
}

pub(crate) fn page(cfg: &ServerConfig, p: &CapsulePage) -> Value {
    let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "capsules".into(),
            Value::Array(p.capsules.iter().map(|c| capsule(cfg, c)).collect()),
        );
    }
    v
}

pub(crate) fn usage(cfg: &ServerConfig, u: &CapsuleUsage) -> Value {
    let mut v = serde_json::to_value(u).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert("capsule".into(), capsule(cfg, &u.capsule));
    }
    v
}

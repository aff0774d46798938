//! Extractors whose rejections are [`ApiError`]s (so every 4xx has the JSON error body).

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest JSON request body.
pub const JSON_LIMIT: usize = 1 << 20;
/// Largest stdin of an exec (buffered: see the report on `ExecBuilder::stdin`).
pub const STDIN_LIMIT: usize = 64 << 20;

/// `Authorization: Bearer cap_...`.
#[derive(Debug)]
pub struct Bearer(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Bearer {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Bearer::from_headers(&parts.headers)
    }
}

impl Bearer {
    /// The bearer token of `Authorization`; a missing or malformed header is a 401.
    pub fn from_headers(headers: &axum::http::HeaderMap) -> Result<Self, ApiError> {
        let Some(v) = headers.get(header::AUTHORIZATION) else {
            return Err(capsules_core::Error::unauthenticated(
                "this call needs a token: send Authorization: Bearer cap_...",
            )
            .into());
        };
        let v = v
            .to_str()
            .map_err(|_| capsules_core::Error::unauthenticated("the Authorization header is not text"))?;
        // Auth schemes are case-insensitive (RFC 9110 §11.1).
        let token = v
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        match token {
            Some(t) if !t.is_empty() => Ok(Bearer(t.to_owned())),
            _ => Err(capsules_core::Error::unauthenticated("the Authorization header must be Bearer cap_...").into()),
        }
    }
}

/// A JSON body (at most [`JSON_LIMIT`] bytes; unknown fields refused where the type says so).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        check_json_type(req.headers())?;
        let bytes = read_body(req.into_body(), JSON_LIMIT).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// A JSON body's `Content-Type` must be `application/json` (or `application/*+json`) when it is
/// sent; a body without one is read as JSON. Anything else is 415.
pub fn check_json_type(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let Some(v) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let text = v.to_str().unwrap_or("");
    let essence = text.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let json = essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"));
    if json {
        return Ok(());
    }
    Err(ApiError::invalid(format!(
        "this call takes a JSON body: send Content-Type: application/json (got {:?})",
        if text.is_empty() {
            "a header that is not text"
        } else {
            text
        }
    ))
    .with_status(axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE))
}

/// Parses a JSON request value with a message that names what was wrong.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::invalid("this call needs a JSON body"));
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid(format!("the JSON body is not valid: {e}")))
}

/// Reads a whole body, refusing one over `limit` with 413.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit");
        if too_large {
            ApiError::too_large(limit)
        } else {
            ApiError::from(capsules_core::Error::invalid_input("could not read the request body").with_source(e))
        }
    })
}

/// A path parameter; a bad one is a 400 with the JSON body.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| ApiError::invalid(e.body_text()))
    }
}

/// A query string; a bad one is a 400 with the JSON body.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::invalid(e.body_text()))
    }
}

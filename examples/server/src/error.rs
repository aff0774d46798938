//! Errors on the wire: one function maps a kind to a status; every rejection (axum's included)
//! becomes `{"error": {"kind", "message"}}`, plus `"field"` (the request field it concerns) where
//! the server knows it, so a form can show the message beside that field.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use capsules_client::wire::ErrorBody;
use capsules_core::{Error, ErrorKind};

/// Seconds a client should wait before retrying an `Unavailable` answer.
pub const RETRY_AFTER_SECS: u32 = 2;

/// DESIGN.md §6: the one mapping from an error kind to an HTTP status.
pub fn status_for(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::AlreadyExists | ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::InsufficientCredits => StatusCode::PAYMENT_REQUIRED,
        ErrorKind::Unsupported => StatusCode::UNPROCESSABLE_ENTITY,
        // A limit is not a rate: waiting does not lift it, so not 429.
        ErrorKind::LimitExceeded => StatusCode::FORBIDDEN,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error answer. Usually a core [`Error`]; `status` overrides the kind's status where HTTP
/// has a more precise one (413 for a body over the limit, 405 for a wrong method).
#[derive(Debug)]
pub struct ApiError {
    pub error: Error,
    pub status: Option<StatusCode>,
    /// The request field the error concerns (`name`, `size`, `credit_limit`, ...), if known.
    pub field: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::invalid_input(message).into()
    }

    /// A request body over `limit` bytes (413).
    pub fn too_large(limit: usize) -> Self {
        ApiError {
            error: Error::invalid_input(format!("the request body is over the limit of {limit} bytes")),
            status: Some(StatusCode::PAYLOAD_TOO_LARGE),
            field: None,
        }
    }

    pub fn with_field(mut self, field: Option<&'static str>) -> Self {
        self.field = field;
        self
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| status_for(self.error.kind()))
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError {
            error,
            status: None,
            field: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(kind = %self.error.kind(), error = %self.error, source = ?std::error::Error::source(&self.error), "request failed");
        } else {
            tracing::debug!(kind = %self.error.kind(), error = %self.error, "request refused");
        }
        let mut body = serde_json::to_value(ErrorBody::from_error(&self.error)).unwrap_or_default();
        if let Some(field) = self.field {
            body["error"]["field"] = field.into();
        }
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if self.error.kind() == ErrorKind::Unavailable {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        resp
    }
}

//! What `serve` answers: a status, a JSON body, and the headers that go
//! with them.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::Error;

/// An answer: status, whether it is a replay, JSON body.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) replayed: bool,
    pub(super) body: String,
    /// `WWW-Authenticate` on 401.
    pub(super) challenge: bool,
}

impl Answer {
    pub(super) fn json(status: StatusCode, body: String) -> Answer {
        Answer {
            status,
            replayed: false,
            body,
            challenge: false,
        }
    }

    pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Answer {
        let message = message.into();
        Answer::json(
            status,
            json!({"status": "error", "error": message}).to_string(),
        )
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.replayed {
            headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        if self.challenge {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The same key with another body.
pub(super) fn mismatch() -> Answer {
    Answer::error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "this Idempotency-Key was used with a different body; use a new key for a new request",
    )
}

/// The answer to a request that could not be committed.
pub(super) fn failed(e: &Error) -> Answer {
    match e {
        Error::RequestLost { .. } => Answer::error(StatusCode::CONFLICT, e.to_string()),
        e if e.is_retryable() => Answer::error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        e => Answer::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

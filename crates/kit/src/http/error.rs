//! The one error shape of the suite: a status and a JSON body `{"error": ...}`.
//!
//! Client mistakes get a 4xx that says what was wrong. Server faults are
//! logged in full and answered generically, so internals never leak. The
//! extractors of [`super::extract`] answer their rejections in this shape too.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};
use blog_domain::text::TextError;
use serde::Serialize;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    Rejected { status: StatusCode, message: String },
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<TextError> for ApiError {
    fn from(error: TextError) -> Self {
        ApiError::BadRequest(error.to_string())
    }
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest(message.into())
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::NotFound(message.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Rejected { status, .. } => *status,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            // A full or failing disk: nothing was written, and a retry later can succeed.
            ApiError::Store(e) if e.is_storage_failure() => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

/// A JSON error response with `status`. A 413 leaves the rest of the request
/// body unread, so it also says `Connection: close`: a client (or the
/// gateway's connection pool) must not send its next request into a
/// connection that is about to be reset.
pub fn error_response(status: StatusCode, message: &str) -> Response {
    let mut response = (status, axum::Json(ErrorBody { error: message })).into_response();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        response.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    }
    response
}

/// A JSON 503 that says when to come back (`Retry-After`, in seconds): the
/// service is fine but cannot take this request now.
pub fn retry_later(message: &str, after_secs: u64) -> Response {
    let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, message);
    response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(after_secs));
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
            let message = match &self {
                ApiError::Unavailable(_) => "service unavailable, try again",
                ApiError::Store(e) if e.is_storage_failure() => "storage is full or failing: nothing was written, try again later",
                _ => "internal error",
            };
            return error_response(status, message);
        }
        error_response(status, &self.to_string())
    }
}

/// The fallback for paths no route matches.
pub async fn not_found(uri: axum::http::Uri) -> Response {
    error_response(StatusCode::NOT_FOUND, &format!("no route for {}", uri.path()))
}

/// The answer for a known path with the wrong method.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    error_response(StatusCode::METHOD_NOT_ALLOWED, &format!("{method} is not allowed on {}", uri.path()))
}

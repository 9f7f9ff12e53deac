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
            // Every 503 says when to come back, as the others the services send do.
            if status == StatusCode::SERVICE_UNAVAILABLE {
                return retry_later(message, super::layers::RETRY_AFTER_SECS);
            }
            return error_response(status, message);
        }
        error_response(status, &self.to_string())
    }
}

/// Most bytes of a request's path an error message repeats.
pub const SHOWN_PATH: usize = 200;

/// A request's path as an error message repeats it: cut at [`SHOWN_PATH`]
/// bytes (on a character boundary), so an answer never grows with the URL.
pub fn shown_path(path: &str) -> std::borrow::Cow<'_, str> {
    if path.len() <= SHOWN_PATH {
        return path.into();
    }
    let end = (0..=SHOWN_PATH).rev().find(|i| path.is_char_boundary(*i)).unwrap_or(0);
    format!("{}…", &path[..end]).into()
}

/// The fallback for paths no route matches.
pub async fn not_found(uri: axum::http::Uri) -> Response {
    error_response(StatusCode::NOT_FOUND, &format!("no route for {}", shown_path(uri.path())))
}

/// The answer for a known path with the wrong method.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    error_response(StatusCode::METHOD_NOT_ALLOWED, &format!("{method} is not allowed on {}", shown_path(uri.path())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_503_says_when_to_come_back_and_a_500_does_not() {
        let full = ApiError::Store(crate::StoreError::Full("disk".into())).into_response();
        assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(full.headers()[axum::http::header::RETRY_AFTER], "1");
        let unavailable = ApiError::Unavailable("bus".into()).into_response();
        assert_eq!(
            (unavailable.status(), &unavailable.headers()[axum::http::header::RETRY_AFTER]),
            (StatusCode::SERVICE_UNAVAILABLE, &axum::http::HeaderValue::from(1))
        );
        let internal = ApiError::Store(crate::StoreError::WriterGone).into_response();
        assert_eq!(internal.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(internal.headers().get(axum::http::header::RETRY_AFTER).is_none());
    }

    #[test]
    fn a_path_is_repeated_whole_up_to_its_cap_and_cut_on_a_character_boundary_beyond() {
        assert_eq!(shown_path("/posts/x/comments"), "/posts/x/comments");
        let long = format!("/{}", "é".repeat(400));
        let shown = shown_path(&long);
        assert!(shown.ends_with('…') && shown.len() <= SHOWN_PATH + '…'.len_utf8(), "{shown}");
        assert!(long.starts_with(shown.trim_end_matches('…')));
    }
}

//! The one error shape of the suite: a status and a JSON body `{"error": ...}`.
//!
//! Client mistakes get a 4xx that says what was wrong. Server faults are
//! logged in full and answered generically, so internals never leak. [`Json`]
//! wraps axum's extractor so a malformed body, a wrong content type or an
//! oversized body gets this shape too instead of axum's plain text.

use axum::{
    extract::{FromRequest, Request, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
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

/// `axum::Json` with rejections answered as [`ApiError`] and a body limit of
/// `LIMIT` bytes ([`crate::server::MAX_BODY`] unless a route says otherwise).
///
/// The limit is applied to a body read whole (up to the server-wide read limit,
/// [`crate::server::READ_LIMIT`]) rather than by stopping mid-body: a server
/// that answers before reading what the client sent closes a connection with
/// unread data, the kernel resets it, and the client (or the gateway in
/// front) may lose even the 413.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T, const LIMIT: usize = { crate::server::MAX_BODY }>(pub T);

impl<S, T, const LIMIT: usize> FromRequest<S> for Json<T, LIMIT>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|mime| mime.trim().to_ascii_lowercase())
            .is_some_and(|mime| mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json")));
        let bytes = axum::body::Bytes::from_request(req, state).await.map_err(|rejection| ApiError::Rejected {
            status: rejection.status(),
            message: if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "request body is too large".to_owned()
            } else {
                rejection.body_text()
            },
        })?;
        if !json_type {
            return Err(ApiError::Rejected {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                message: "expected a request with `Content-Type: application/json`".to_owned(),
            });
        }
        if bytes.len() > LIMIT {
            return Err(ApiError::Rejected { status: StatusCode::PAYLOAD_TOO_LARGE, message: "request body is too large".to_owned() });
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

impl<T: Serialize, const LIMIT: usize> IntoResponse for Json<T, LIMIT> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let message = match &rejection {
        JsonRejection::MissingJsonContentType(_) => "expected a request with `Content-Type: application/json`".to_owned(),
        JsonRejection::JsonSyntaxError(_) => format!("malformed JSON: {}", rejection.body_text()),
        JsonRejection::JsonDataError(_) => format!("invalid request body: {}", rejection.body_text()),
        JsonRejection::BytesRejection(_) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => "request body is too large".to_owned(),
        _ => rejection.body_text(),
    };
    let status = match rejection.status() {
        // axum answers 422 for well-formed JSON of the wrong shape; a plain 400
        // is what clients of the original expect for any bad body.
        StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
        status => status,
    };
    ApiError::Rejected { status, message }
}

/// The fallback for paths no route matches.
pub async fn not_found(uri: axum::http::Uri) -> Response {
    error_response(StatusCode::NOT_FOUND, &format!("no route for {}", uri.path()))
}

/// The answer for a known path with the wrong method.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    error_response(StatusCode::METHOD_NOT_ALLOWED, &format!("{method} is not allowed on {}", uri.path()))
}

/// `axum::extract::Path` with rejections answered as [`ApiError`]: a segment
/// that is not valid UTF-8 once decoded (`/posts/%FF/comments`) is a JSON 400,
/// not axum's plain text.
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) if rejection.status().is_server_error() => {
                Err(ApiError::Rejected { status: rejection.status(), message: rejection.body_text() })
            }
            Err(rejection) => Err(ApiError::bad_request(format!("invalid path: {}", rejection.body_text()))),
        }
    }
}

/// `axum::extract::Query` with rejections answered as [`ApiError`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => Err(ApiError::bad_request(format!("invalid query string: {}", rejection.body_text()))),
        }
    }
}

/// A required text field: trimmed, not empty, at most `max_chars` characters.
pub fn required_text(field: &str, value: &str, max_chars: usize) -> Result<String, ApiError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(ApiError::bad_request(format!("`{field}` must not be empty")));
    }
    if value.chars().count() > max_chars {
        return Err(ApiError::bad_request(format!("`{field}` must be at most {max_chars} characters")));
    }
    Ok(value.to_owned())
}

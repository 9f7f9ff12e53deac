//! Extractors whose rejections are JSON errors ([`ApiError`]) instead of
//! axum's plain text: a body ([`Json`], with a per-route limit), a path, a
//! query string, and the request id to carry into published events.

use axum::{
    extract::{FromRequest, FromRequestParts, Request, rejection::JsonRejection},
    http::{HeaderName, StatusCode, request::Parts},
    response::{IntoResponse, Response},
};
use serde::Serialize;

use super::error::ApiError;

/// Body limit of the public routes: titles and comments are short.
pub const MAX_BODY: usize = 64 * 1024;

pub(crate) static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The `x-request-id` of the current request (set by the standard layers if
/// the caller sent none), to carry into published events.
#[derive(Debug, Clone, Default)]
pub struct RequestId(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let id =
            parts.headers.get(&REQUEST_ID).and_then(|v| v.to_str().ok()).map(|s| s.chars().take(super::layers::MAX_REQUEST_ID).collect());
        Ok(RequestId(id))
    }
}

/// `axum::Json` with rejections answered as [`ApiError`] and a body limit of
/// `LIMIT` bytes ([`MAX_BODY`] unless a route says otherwise).
///
/// The limit is applied to a body read whole (up to the server-wide read limit,
/// [`super::layers::READ_LIMIT`]) rather than by stopping mid-body: a server
/// that answers before reading what the client sent closes a connection with
/// unread data, the kernel resets it, and the client (or the gateway in
/// front) may lose even the 413.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T, const LIMIT: usize = { MAX_BODY }>(pub T);

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

/// A body that must be a JSON object: a struct's derived `Deserialize` also
/// takes an array of its fields in order (`["a title"]` for `{"title": …}`),
/// which no client of the original sends and the API does not promise. Use
/// as `Json<Object<T>>`; anything but an object is a 400 "expected a JSON
/// object".
#[derive(Debug, Clone, Copy, Default)]
pub struct Object<T>(pub T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer.deserialize_map(Fields(std::marker::PhantomData)).map(Object)
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

/// `axum::extract::Path` with rejections answered as [`ApiError`]: a segment
/// that is not valid UTF-8 once decoded (`/posts/%FF/comments`) is a JSON 400,
/// not axum's plain text.
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
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

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => Err(ApiError::bad_request(format!("invalid query string: {}", rejection.body_text()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::{Router, body::Body, routing::post};
    use tower::ServiceExt;

    use super::*;

    #[derive(serde::Deserialize)]
    struct Titled {
        title: String,
    }

    /// `POST /` of `body` to a handler taking `Json<Object<Titled>>`: the status and the error or title.
    async fn send(body: &str) -> (StatusCode, serde_json::Value) {
        let app = Router::new().route("/", post(|Json(Object(body)): Json<Object<Titled>>| async move { body.title }));
        let request = Request::post("/").header("content-type", "application/json").body(Body::from(body.to_owned())).unwrap();
        let answer = app.oneshot(request).await.unwrap();
        let status = answer.status();
        let bytes = axum::body::to_bytes(answer.into_body(), 1 << 16).await.unwrap();
        let body =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, body)
    }

    #[tokio::test]
    async fn an_object_body_must_be_an_object_not_the_fields_in_an_array() {
        assert_eq!(send(r#"{"title":"a title"}"#).await, (StatusCode::OK, serde_json::json!("a title")));
        for body in [r#"["a title"]"#, r#"[["title","a title"]]"#, r#""a title""#, "5", "null", "true"] {
            let (status, answer) = send(body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
            assert!(answer["error"].as_str().is_some_and(|e| e.contains("expected a JSON object")), "{body}: {answer}");
        }
    }
}

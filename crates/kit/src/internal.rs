//! The suite's internal calls: who may write events.
//!
//! Every internal write (a relay publishing to the bus, the bus pushing to a
//! subscriber, an operator re-driving events) carries
//! `Authorization: Bearer <INTERNAL_SECRET>`. A `POST /events` without it is
//! answered 401, with a wrong one 403, both before the body is looked at, so a
//! refused request changes nothing. The comparison takes the same time
//! whatever the guess, so the secret cannot be found byte by byte. Reads of
//! the bus stay open: NetworkPolicies decide who reaches them in a cluster.
//!
//! A consumer that refuses an *event* (not the request) says so with the
//! [`REFUSAL_HEADER`], which only this suite's inboxes and bus emit: a 4xx
//! without it (a wrong URL, a proxy's error page, a wrong secret) is a fault
//! of the path, retried and alerted on, never a reason to drop an event.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    middleware::Next,
    response::Response,
};

use blog_domain::{EventKind, config::ConfigError};

use crate::http::{error_response, layers::READ_LIMIT};

/// The variable holding the shared secret.
pub const SECRET_ENV: &str = "INTERNAL_SECRET";
/// Shortest secret accepted: anything shorter is guessable.
pub const MIN_SECRET_LEN: usize = 16;
/// Set on a 4xx that refuses the events themselves (malformed data): the
/// sender may set them aside. Any other 4xx is retried.
pub static REFUSAL_HEADER: HeaderName = HeaderName::from_static("x-blog-event-refused");

/// Sent by the bus with every push: the last sequence number the subscriber
/// acknowledged, which the batch continues from. The batch is the whole of
/// the log after it that the subscriber consumes (see [`CONSUMES_HEADER`]),
/// so a consumer may move its replay watermark over numbers the batch does
/// not have.
pub static COVERS_AFTER_HEADER: HeaderName = HeaderName::from_static("x-blog-covers-after");

/// Sent by a consumer with every answer to a push: the event types it acts
/// on, comma-separated. The bus then pushes it only those (the others it
/// would acknowledge and ignore) and moves [`COVERS_AFTER_HEADER`] over the
/// rest. A subscriber that does not send it gets every event.
pub static CONSUMES_HEADER: HeaderName = HeaderName::from_static("x-blog-consumes");

/// The [`CONSUMES_HEADER`] value naming `kinds`; `None` if a name cannot be
/// a header value (then the header is left out and every event is pushed).
pub fn consumes_value(kinds: &[EventKind]) -> Option<HeaderValue> {
    HeaderValue::from_str(&kinds.iter().map(EventKind::as_str).collect::<Vec<_>>().join(",")).ok()
}

/// The event types an answer's [`CONSUMES_HEADER`] names; `None` without the
/// header (or with one that is not text): the subscriber takes every event.
pub fn consumed(headers: &HeaderMap) -> Option<Vec<EventKind>> {
    let list = headers.get(&CONSUMES_HEADER)?.to_str().ok()?;
    Some(list.split(',').map(str::trim).filter(|name| !name.is_empty()).map(EventKind::named).collect())
}

/// The shared secret of internal calls. Cheap to clone; never printed.
#[derive(Clone)]
pub struct InternalSecret(Arc<str>);

impl std::fmt::Debug for InternalSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InternalSecret(..)")
    }
}

impl InternalSecret {
    /// `INTERNAL_SECRET`, required and at least [`MIN_SECRET_LEN`] characters.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::parse(&std::env::var(SECRET_ENV).unwrap_or_default())
    }

    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let value = value.trim();
        if value.len() < MIN_SECRET_LEN {
            return Err(ConfigError {
                name: SECRET_ENV.to_owned(),
                value: if value.is_empty() { String::new() } else { "<hidden>".to_owned() },
                reason: format!("the shared secret of internal calls must be set, at least {MIN_SECRET_LEN} characters"),
            });
        }
        if HeaderValue::from_str(value).is_err() {
            return Err(ConfigError {
                name: SECRET_ENV.to_owned(),
                value: "<hidden>".to_owned(),
                reason: "must be printable ASCII".to_owned(),
            });
        }
        Ok(Self(value.into()))
    }

    /// The `Authorization` value internal callers send.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether `headers` carry this secret: 401 without credentials, 403 with wrong ones.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
        // The scheme is case-insensitive (RFC 9110, section 11.1): `bearer` is `Bearer`.
        let token = headers.get(header::AUTHORIZATION).and_then(|value| {
            let (scheme, token) = value.as_bytes().split_at(value.as_bytes().iter().position(|b| *b == b' ')?);
            scheme.eq_ignore_ascii_case(b"Bearer").then(|| token.trim_ascii_start())
        });
        let Some(token) = token else {
            return Err((StatusCode::UNAUTHORIZED, "internal route: `Authorization: Bearer <INTERNAL_SECRET>` required"));
        };
        if ct_eq(token, self.0.as_bytes()) { Ok(()) } else { Err((StatusCode::FORBIDDEN, "internal route: wrong secret")) }
    }
}

/// Compares in time that depends only on the lengths, not on where the bytes differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    std::hint::black_box(diff) == 0
}

/// Middleware refusing requests without the secret (`route_layer` it on
/// internal write routes). The refused body is read and dropped, so the
/// connection stays usable for the caller's next request.
pub async fn require_secret(State(secret): State<InternalSecret>, request: Request, next: Next) -> Response {
    match secret.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err((status, message)) => {
            tracing::warn!(%status, path = %request.uri().path(), "internal write refused");
            let _ = axum::body::to_bytes(request.into_body(), READ_LIMIT).await;
            let mut response = error_response(status, message);
            if status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}

/// Marks `response` as a refusal of the events it answers (see [`REFUSAL_HEADER`]).
pub fn mark_refusal(mut response: Response) -> Response {
    response.headers_mut().insert(REFUSAL_HEADER.clone(), HeaderValue::from_static("1"));
    response
}

/// Whether a 4xx answer refused the events themselves.
pub fn is_refusal(status: StatusCode, headers: &HeaderMap) -> bool {
    status.is_client_error() && headers.contains_key(&REFUSAL_HEADER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole_and_exact() {
        assert!(ct_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!ct_eq(b"0123456789abcdeF", b"0123456789abcdef"));
        assert!(!ct_eq(b"0123456789abcde", b"0123456789abcdef"));
        assert!(!ct_eq(b"0123456789abcdef\0", b"0123456789abcdef"));
        assert!(!ct_eq(b"", b"0123456789abcdef"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn what_a_consumer_consumes_round_trips_through_its_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(consumed(&headers), None, "no header: every event");
        let kinds = [EventKind::PostCreated, EventKind::CommentModerated];
        headers.insert(CONSUMES_HEADER.clone(), consumes_value(&kinds).unwrap());
        assert_eq!(headers[&CONSUMES_HEADER], "PostCreated,CommentModerated");
        assert_eq!(consumed(&headers).unwrap(), kinds);
        headers.insert(CONSUMES_HEADER.clone(), HeaderValue::from_static(" PostCreated , PostLiked,"));
        assert_eq!(consumed(&headers).unwrap(), [EventKind::PostCreated, EventKind::Unknown("PostLiked".into())]);
        headers.insert(CONSUMES_HEADER.clone(), consumes_value(&[]).unwrap());
        assert_eq!(consumed(&headers).unwrap(), [], "an empty list: nothing");
    }

    #[test]
    fn a_secret_is_required_long_enough_and_checked() {
        assert!(InternalSecret::parse("").is_err());
        let short = InternalSecret::parse("short").unwrap_err();
        assert_eq!(short.name, SECRET_ENV);
        assert!(!short.to_string().contains("short"), "the error must not echo the secret");
        let secret = InternalSecret::parse("0123456789abcdef").unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(secret.check(&headers).unwrap_err().0, StatusCode::UNAUTHORIZED);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer 0123456789abcdeX"));
        assert_eq!(secret.check(&headers).unwrap_err().0, StatusCode::FORBIDDEN);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&secret.bearer()).unwrap());
        assert!(secret.check(&headers).is_ok());
        for spelling in ["bearer 0123456789abcdef", "BEARER  0123456789abcdef"] {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static(spelling));
            assert!(secret.check(&headers).is_ok(), "{spelling}: the scheme is case-insensitive");
        }
        for other in ["Basic 0123456789abcdef", "Bearer0123456789abcdef", "0123456789abcdef", "Bearer"] {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static(other));
            assert_eq!(secret.check(&headers).unwrap_err().0, StatusCode::UNAUTHORIZED, "{other}");
        }
        assert!(!format!("{secret:?}").contains("0123"));
    }
}

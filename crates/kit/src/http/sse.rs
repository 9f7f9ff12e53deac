//! Server-sent event streams: a per-process cap on open streams, keep-alives,
//! a `resync` for subscribers that fell behind, and an end at shutdown.

use std::time::Duration;

use axum::{
    http::{HeaderName, header},
    response::{IntoResponse, Response},
};

use super::error;
use crate::shutdown::Shutdown;

/// Most live streams (server-sent events) one service serves at once: each
/// holds a connection, a task and a broadcast receiver for as long as the
/// client stays. Beyond it, a new stream gets a JSON 503 with `Retry-After`.
pub const MAX_STREAMS: usize = 512;
/// What a refused stream's `Retry-After` says, in seconds.
pub const STREAM_RETRY_AFTER_SECS: u64 = 5;

static OPEN_STREAMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// All [`MAX_STREAMS`] places are taken: answered as a JSON 503 with
/// `Retry-After`.
#[derive(Debug, Clone, Copy)]
pub struct StreamsFull;

impl IntoResponse for StreamsFull {
    fn into_response(self) -> Response {
        error::retry_later("too many live streams are open, try again later", STREAM_RETRY_AFTER_SECS)
    }
}

/// One of the process's [`MAX_STREAMS`] places for a live stream, given back
/// when dropped (the stream ended or its client went away). A process is one
/// service, so the count is per service.
#[derive(Debug)]
pub struct StreamSlot(());

impl StreamSlot {
    /// A place, unless all are taken.
    pub fn acquire() -> Result<Self, StreamsFull> {
        use std::sync::atomic::Ordering::SeqCst;
        OPEN_STREAMS
            .fetch_update(SeqCst, SeqCst, |open| (open < MAX_STREAMS).then_some(open + 1))
            .map(|_| StreamSlot(()))
            .map_err(|_| StreamsFull)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        OPEN_STREAMS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A server-sent event stream of what `updates` broadcasts, rendered by
/// `render`, with keep-alive comments, ending at shutdown (an endless stream
/// would otherwise hold graceful shutdown open). A subscriber too slow to keep
/// up gets one `resync` event, telling it to reload rather than miss changes.
/// Holds a [`StreamSlot`] while it runs; when none is left, the answer is
/// [`StreamsFull`]'s 503.
pub fn live_stream<T, F>(
    updates: tokio::sync::broadcast::Receiver<T>,
    shutdown: Shutdown,
    render: F,
) -> Result<axum::response::Sse<impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>>, StreamsFull>
where
    T: Clone + Send + 'static,
    F: Fn(T) -> axum::response::sse::Event + Send + 'static,
{
    use axum::response::sse::{Event, KeepAlive};
    use tokio::sync::broadcast::error::RecvError;

    let slot = StreamSlot::acquire()?;
    let stream = futures_util::stream::unfold((updates, shutdown, render, slot), |(mut updates, shutdown, render, slot)| async move {
        let next = tokio::select! {
            next = updates.recv() => next,
            () = shutdown.wait() => return None,
        };
        let event = match next {
            Ok(update) => render(update),
            Err(RecvError::Lagged(_)) => Event::default().event("resync").data("{}"),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), (updates, shutdown, render, slot)))
    });
    Ok(axum::response::Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("keep-alive")))
}

/// Headers that keep proxies (ingress-nginx honours `X-Accel-Buffering`)
/// from buffering a live stream.
pub fn streaming_headers() -> [(HeaderName, &'static str); 2] {
    [(header::CACHE_CONTROL, "no-cache"), (HeaderName::from_static("x-accel-buffering"), "no")]
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    #[tokio::test]
    async fn live_streams_beyond_the_cap_get_a_json_503_with_retry_after() {
        let (updates, _) = tokio::sync::broadcast::channel::<u32>(4);
        let shutdown = Shutdown::new(std::future::pending());
        let open =
            |_: usize| live_stream(updates.subscribe(), shutdown.clone(), |n| axum::response::sse::Event::default().data(n.to_string()));
        let mut streams: Vec<_> = (0..MAX_STREAMS).map(|n| open(n).unwrap_or_else(|_| panic!("stream {n} refused"))).collect();
        let Err(refused) = open(MAX_STREAMS) else { panic!("one stream too many is refused") };
        let refused = refused.into_response();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.headers()[header::RETRY_AFTER], STREAM_RETRY_AFTER_SECS.to_string());
        let body = axum::body::to_bytes(refused.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(body["error"].as_str().is_some_and(|e| e.contains("too many")), "{body}");
        // A stream that ends gives its place back.
        streams.pop();
        assert!(open(0).is_ok(), "a freed place is reused");
        println!("{MAX_STREAMS} streams open, stream {} refused with 503", MAX_STREAMS + 1);
    }
}

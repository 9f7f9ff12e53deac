//! Serving a router on a listener until shutdown, with a header-read
//! timeout (slowloris) and graceful draining.

use std::{io, time::Duration};

use axum::Router;
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

/// Longest a client may take to send a request's head (the request line and
/// headers): a slowloris client trickling bytes is cut off after this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown`, then lets in-flight requests
/// finish (each is bounded by [`super::layers::REQUEST_TIMEOUT`]). Nagle's algorithm is
/// off: every hop of an event is a small write, and Nagle would hold each one
/// back until the previous was acknowledged (up to a delayed-ACK 40 ms).
///
/// hyper's own connection builder rather than `axum::serve`, which exposes no
/// header-read timeout: each connection must send its request head within
/// [`HEADER_READ_TIMEOUT`] or is closed.
pub async fn serve(listener: TcpListener, app: Router, shutdown: Shutdown) -> io::Result<()> {
    use hyper_util::{
        rt::{TokioIo, TokioTimer},
        server::graceful::GracefulShutdown,
        service::TowerToHyperService,
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "listening");
    }
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.wait() => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            // Out of file descriptors and the like: wait rather than spin.
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a connection");
                if shutdown.sleep(Duration::from_secs(1)).await {
                    break;
                }
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let connection = http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::routing::get;

    use super::*;
    use crate::{http::layers::standard, metrics::Registry};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_trickling_its_headers_is_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::new(async move {
            let _ = stopped.await;
        });
        let app = standard(Router::new().route("/", get(|| async { "hello" })), None, Registry::default());
        let server = tokio::spawn(serve(listener, app, shutdown));

        let (mut reader, mut writer) = tokio::net::TcpStream::connect(addr).await.unwrap().into_split();
        // One byte a second of a head that never ends, as slowloris sends.
        let trickle = tokio::spawn(async move {
            let head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a'));
            let mut sent = 0usize;
            for byte in head {
                if writer.write_all(&[*byte]).await.is_err() {
                    break;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            sent
        });
        // The server must close the connection; the deadline only bounds a
        // broken build, it is three times the timeout.
        let mut buffer = Vec::new();
        let closed = tokio::time::timeout(HEADER_READ_TIMEOUT * 3, reader.read_to_end(&mut buffer)).await;
        assert!(closed.is_ok(), "a connection trickling its headers stayed open");
        trickle.abort();
        println!("trickling connection closed by the server; it answered {:?}", String::from_utf8_lossy(&buffer));

        // Everyone else is served as usual.
        let mut other = tokio::net::TcpStream::connect(addr).await.unwrap();
        other.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        other.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer}");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}

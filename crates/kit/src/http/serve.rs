//! Serving a router on a listener until shutdown, with a header-read
//! timeout (slowloris), a cap on connections held at once, and graceful
//! draining.

use std::{io, time::Duration};

use axum::Router;
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

/// Longest a client may take to send a request's head (the request line and
/// headers): a slowloris client trickling bytes is cut off after this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// File descriptors a server keeps for everything but the connections it
/// serves: its database files and logs, its outgoing connections (the
/// gateway's to the services, a service's to the bus) and, in the local
/// suite, the supervisor's pipes to the processes it runs.
const RESERVED_DESCRIPTORS: u64 = 256;

/// Most connections a server holds at once: half of what the open-file
/// limit (`RLIMIT_NOFILE`) leaves after [`RESERVED_DESCRIPTORS`], as each
/// connection the gateway serves also holds one to a service; at least 64.
/// Past it, a new connection waits in the listen backlog until one ends
/// (every connection ends within [`HEADER_READ_TIMEOUT`] of going quiet)
/// instead of taking the process's last descriptors: a flood of idle
/// connections would otherwise leave it unable to open a file, reach a peer
/// or, in the local suite, restart a service.
pub fn connection_cap() -> usize {
    use rustix::process::{Resource, getrlimit};
    let limit = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    usize::try_from(limit.saturating_sub(RESERVED_DESCRIPTORS) / 2).unwrap_or(usize::MAX).max(64)
}

/// Serves `app` on `listener` until `shutdown`, then lets in-flight requests
/// finish (each is bounded by [`super::layers::REQUEST_TIMEOUT`]). Nagle's algorithm is
/// off: every hop of an event is a small write, and Nagle would hold each one
/// back until the previous was acknowledged (up to a delayed-ACK 40 ms).
///
/// hyper's own connection builder rather than `axum::serve`, which exposes no
/// header-read timeout: each connection must send its request head within
/// [`HEADER_READ_TIMEOUT`] or is closed.
pub async fn serve(listener: TcpListener, app: Router, shutdown: Shutdown) -> io::Result<()> {
    serve_at_most(listener, app, shutdown, connection_cap()).await
}

/// [`serve`], holding at most `cap` connections at once.
async fn serve_at_most(listener: TcpListener, app: Router, shutdown: Shutdown, cap: usize) -> io::Result<()> {
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
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(cap));
    let mut warned: Option<tokio::time::Instant> = None;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(cap, "at the connection cap: new connections wait until one ends");
                    warned = Some(tokio::time::Instant::now());
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.map_err(io::Error::other)?,
                    () = shutdown.wait() => break,
                }
            }
        };
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
            let _slot = slot;
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

    type Server = tokio::task::JoinHandle<io::Result<()>>;

    /// A server of "hello" at `/` holding at most `cap` connections: its
    /// address, its stop and its task.
    async fn hello_server(cap: usize) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>, Server) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::new(async move {
            let _ = stopped.await;
        });
        let app = standard(Router::new().route("/", get(|| async { "hello" })), None, Registry::default());
        (addr, stop, tokio::spawn(serve_at_most(listener, app, shutdown, cap)))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_connection_cap_a_new_connection_waits_until_one_ends() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, stop, server) = hello_server(2).await;
        // Answers one request on `tcp`, keeping the connection open.
        async fn ask(tcp: &mut tokio::net::TcpStream) -> String {
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
            let mut answer = vec![0; 1024];
            let read = tcp.read(&mut answer).await.unwrap();
            String::from_utf8_lossy(&answer[..read]).into_owned()
        }
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(ask(&mut first).await.starts_with("HTTP/1.1 200"));
        assert!(ask(&mut second).await.starts_with("HTTP/1.1 200"));
        // The kernel accepts a third connection into the backlog; the server
        // does not take it while both slots are held.
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let waiting = tokio::spawn(async move { ask(&mut third).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "a third connection was served while two were held");
        drop(first);
        // Bounded only against a broken build.
        let answer = tokio::time::timeout(HEADER_READ_TIMEOUT, waiting).await.expect("served once a slot was free").unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(connection_cap() >= 64);
        drop(second);
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_trickling_its_headers_is_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, stop, server) = hello_server(connection_cap()).await;

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

//! The suite's outgoing HTTP client: rustls with the ring provider (no
//! OpenSSL), short connect timeouts, no Nagle, and a fallback for machines
//! without a CA bundle.

use std::time::Duration;

/// A client builder with the suite's TLS (rustls with the ring provider, no
/// OpenSSL) and connection settings.
pub fn client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).pool_idle_timeout(Duration::from_secs(60)).tcp_nodelay(true)
}

/// Builds a client from [`client_builder`] adjusted by `configure`. On a
/// machine without a CA bundle the platform verifier cannot start; rather
/// than fail, the client then trusts no certificate at all: the suite's own
/// traffic is plain HTTP and keeps working, an HTTPS peer is refused.
pub fn build_client(configure: impl Fn(reqwest::ClientBuilder) -> reqwest::ClientBuilder) -> reqwest::Client {
    match configure(client_builder()).build() {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(error = %e, "no CA certificates found; HTTPS peers will be refused");
            configure(client_builder())
                .tls_certs_only(std::iter::empty())
                .build()
                .expect("a client without TLS roots needs nothing from the system")
        }
    }
}

/// The HTTP client every service uses to call peers, with a timeout so a hung
/// peer cannot hold a task forever.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    build_client(|builder| builder.timeout(timeout))
}

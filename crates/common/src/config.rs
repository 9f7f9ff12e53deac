//! Configuration from the environment, the Kubernetes way: every setting is a
//! variable with a local default, and a bad value names the variable.

use std::{env, fmt::Display, path::PathBuf, str::FromStr};

use crate::{internal::InternalSecret, topology::Service};

#[derive(Debug, thiserror::Error)]
#[error("environment variable {name}={value:?} is invalid: {reason}")]
pub struct ConfigError {
    pub name: String,
    pub value: String,
    pub reason: String,
}

/// A variable parsed as `T`, or `default` when unset or empty.
pub fn var<T>(name: &str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: Display,
{
    match env::var(name) {
        Ok(value) if !value.trim().is_empty() => {
            value.trim().parse().map_err(|e: T::Err| ConfigError { name: name.to_owned(), value, reason: e.to_string() })
        }
        _ => Ok(default),
    }
}

/// A comma-separated list, trimmed, empty items dropped.
pub fn list(name: &str, default: &str) -> Vec<String> {
    let raw = env::var(name).unwrap_or_else(|_| default.to_owned());
    raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// A peer's base URL: `<SERVICE>_URL`, defaulting to its local address.
pub fn peer_url(peer: Service) -> String {
    let url = env::var(peer.url_env()).unwrap_or_default();
    let url = if url.trim().is_empty() { peer.local_url() } else { url };
    url.trim().trim_end_matches('/').to_owned()
}

/// What every service reads: where to listen and where to keep its data.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    pub port: u16,
    pub data_dir: PathBuf,
    pub bus_url: String,
    /// `INTERNAL_SECRET`: every service here has a `POST /events` to guard
    /// and publishes or consumes through the bus.
    pub internal_secret: InternalSecret,
    /// `DB_MAX_BYTES`: cap of the service's database (unset or 0: none).
    pub db_max_bytes: Option<u64>,
}

impl CommonConfig {
    pub fn from_env(service: Service) -> Result<Self, ConfigError> {
        Ok(Self {
            port: var("PORT", service.default_port())?,
            data_dir: var("DATA_DIR", PathBuf::from(".data").join(service.name()))?,
            bus_url: peer_url(Service::EventBus),
            internal_secret: InternalSecret::from_env()?,
            db_max_bytes: db_max_bytes()?,
        })
    }
}

/// `DB_MAX_BYTES`: a cap on a database's size, below its volume's, so that it
/// fails loudly (503, not ready) and recoverably before the filesystem fills.
pub fn db_max_bytes() -> Result<Option<u64>, ConfigError> {
    Ok(Some(var::<u64>("DB_MAX_BYTES", 0)?).filter(|max| *max > 0))
}

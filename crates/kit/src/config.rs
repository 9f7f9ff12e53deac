//! What every service with a database reads from its environment, on the
//! domain's typed helpers.

use std::{net::IpAddr, path::PathBuf};

use blog_domain::{
    Service,
    config::{self, ConfigError},
};
use url::Url;

use crate::{internal::InternalSecret, store::DatabaseUrl};

/// Where to listen, where to keep data, where the bus is, and the secret of
/// internal calls.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    pub port: u16,
    pub data_dir: PathBuf,
    pub bus_url: Url,
    /// `INTERNAL_SECRET`: every service here has a `POST /events` to guard
    /// and publishes or consumes through the bus.
    pub internal_secret: InternalSecret,
    /// `DB_MAX_BYTES`: cap of the service's SQLite database (unset or 0: none;
    /// refused with `DATABASE_URL`).
    pub db_max_bytes: Option<u64>,
    /// `DATABASE_URL`: the service's PostgreSQL database, shared by its
    /// replicas; unset, the service keeps SQLite in `DATA_DIR`.
    pub database_url: Option<DatabaseUrl>,
}

impl CommonConfig {
    pub fn from_env(service: Service) -> Result<Self, ConfigError> {
        let database_url = database_url()?;
        Ok(Self {
            port: config::var("PORT", service.default_port())?,
            data_dir: config::var("DATA_DIR", PathBuf::from(".data").join(service.name()))?,
            bus_url: config::peer_url(Service::EventBus)?,
            internal_secret: InternalSecret::from_env()?,
            db_max_bytes: config::sqlite_cap(config::db_max_bytes()?, database_url.as_ref().map(|_| "DATABASE_URL"))?,
            database_url,
        })
    }
}

/// `DATABASE_URL`, when set. A bad value is refused naming the variable,
/// never quoting it: it holds a password.
pub fn database_url() -> Result<Option<DatabaseUrl>, ConfigError> {
    match std::env::var("DATABASE_URL") {
        Ok(raw) if !raw.trim().is_empty() => raw.trim().parse().map(Some).map_err(|reason| ConfigError {
            name: "DATABASE_URL".to_owned(),
            value: "<not shown>".to_owned(),
            reason,
        }),
        _ => Ok(None),
    }
}

/// The address every service listens on: `BIND_ADDR`, loopback unless a
/// container or manifest says `0.0.0.0`, so a laptop running the suite does
/// not offer it to the whole network.
pub fn bind_addr() -> Result<IpAddr, ConfigError> {
    config::var("BIND_ADDR", IpAddr::from([127, 0, 0, 1]))
}

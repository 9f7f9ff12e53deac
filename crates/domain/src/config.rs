//! Configuration from the environment, the Kubernetes way: every setting is a
//! variable with a local default, and a bad value names the variable.

use std::{env, fmt::Display, str::FromStr};

use url::Url;

use crate::topology::Service;

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
/// It must be an absolute `http` or `https` URL with a host, so a typo fails
/// the start, not the first call.
pub fn peer_url(peer: Service) -> Result<Url, ConfigError> {
    let raw = env::var(peer.url_env()).unwrap_or_default();
    let raw = if raw.trim().is_empty() { peer.local_url() } else { raw.trim().to_owned() };
    parse_base_url(peer.url_env(), &raw)
}

/// `raw` as a base URL for `name` (see [`peer_url`]).
pub fn parse_base_url(name: &str, raw: &str) -> Result<Url, ConfigError> {
    let invalid = |reason: String| ConfigError { name: name.to_owned(), value: raw.to_owned(), reason };
    let url = Url::parse(raw).map_err(|e| invalid(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("expected http://host[:port] or https://host[:port]".to_owned()));
    }
    Ok(url)
}

/// `base` joined with `path` (which starts with `/`), without a doubled slash.
pub fn endpoint(base: &Url, path: &str) -> String {
    format!("{}{path}", base.as_str().trim_end_matches('/'))
}

/// `DB_MAX_BYTES`: a cap on a database's size, below its volume's, so that it
/// fails loudly (503, not ready) and recoverably before the filesystem fills.
pub fn db_max_bytes() -> Result<Option<u64>, ConfigError> {
    Ok(Some(var::<u64>("DB_MAX_BYTES", 0)?).filter(|max| *max > 0))
}

/// `cap` (`DB_MAX_BYTES`) when the data is in SQLite. It caps a SQLite
/// database only: with `elsewhere` set (the variable that keeps the data in
/// PostgreSQL or JetStream) it would cap nothing, so it is refused rather
/// than promising a limit nobody keeps.
pub fn sqlite_cap(cap: Option<u64>, elsewhere: Option<&str>) -> Result<Option<u64>, ConfigError> {
    match (cap, elsewhere) {
        (Some(cap), Some(variable)) => Err(ConfigError {
            name: "DB_MAX_BYTES".into(),
            value: cap.to_string(),
            reason: format!(
                "caps a SQLite database only, and {variable} keeps this service's data elsewhere: \
                 unset DB_MAX_BYTES and size that store's own storage"
            ),
        }),
        _ => Ok(cap),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls_must_be_absolute_http_with_a_host() {
        let url = parse_base_url("X_URL", "http://query-srv:4002/").unwrap();
        assert_eq!(endpoint(&url, "/events"), "http://query-srv:4002/events");
        for bad in ["query-srv:4002", "ftp://x", "http://", "not a url"] {
            let error = parse_base_url("X_URL", bad).unwrap_err();
            assert_eq!((error.name.as_str(), error.value.as_str()), ("X_URL", bad));
        }
    }

    #[test]
    fn a_database_cap_is_refused_where_the_data_is_not_in_sqlite() {
        assert_eq!(sqlite_cap(Some(4096), None).unwrap(), Some(4096));
        assert_eq!(sqlite_cap(None, Some("DATABASE_URL")).unwrap(), None);
        let error = sqlite_cap(Some(4096), Some("EVENT_STORE")).unwrap_err();
        assert_eq!((error.name.as_str(), error.value.as_str()), ("DB_MAX_BYTES", "4096"));
        assert!(error.reason.contains("EVENT_STORE"), "{}", error.reason);
    }
}

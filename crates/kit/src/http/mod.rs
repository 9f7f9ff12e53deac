//! Everything HTTP a service shares, bottom-up: the error shape
//! ([`error`]), extractors that answer in it ([`extract`]), the standard
//! routes and layers ([`layers`]), serving with graceful shutdown
//! ([`serve`]), live streams ([`sse`]) and the outgoing client ([`client`]).

pub mod client;
pub mod error;
pub mod extract;
pub mod layers;
pub mod serve;
pub mod sse;

pub use error::{ApiError, error_response, retry_later};
pub use extract::{Json, Object, Path, Query, RequestId};

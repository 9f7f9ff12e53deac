//! The one table of the suite's services: binary name, default port,
//! Kubernetes Service name and the environment variable that locates it.
//!
//! The launcher, the gateway, the route table, the bus's default subscriber
//! list and the Kubernetes manifests all read from here, so a service is
//! renamed or moved in exactly one place.

use std::fmt;

/// A service of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    Posts,
    Comments,
    Query,
    Moderation,
    EventBus,
    Client,
}

impl Service {
    /// Every service, in start-up order: the bus first so publishers find it.
    pub const ALL: [Service; 6] =
        [Service::EventBus, Service::Posts, Service::Comments, Service::Moderation, Service::Query, Service::Client];

    /// The services the bus pushes events to by default.
    pub const SUBSCRIBERS: [Service; 3] = [Service::Comments, Service::Moderation, Service::Query];

    /// Binary, crate and log name.
    pub const fn name(self) -> &'static str {
        match self {
            Service::Posts => "posts",
            Service::Comments => "comments",
            Service::Query => "query",
            Service::Moderation => "moderation",
            Service::EventBus => "event-bus",
            Service::Client => "client",
        }
    }

    /// The port the service listens on unless `PORT` says otherwise; also its
    /// Kubernetes Service port, as in the original app.
    pub const fn default_port(self) -> u16 {
        match self {
            Service::Posts => 4000,
            Service::Comments => 4001,
            Service::Query => 4002,
            Service::Moderation => 4003,
            Service::EventBus => 4005,
            Service::Client => 3000,
        }
    }

    /// The ClusterIP Service name, as in the original app's manifests.
    pub const fn k8s_service(self) -> &'static str {
        match self {
            Service::Posts => "posts-clusterip-srv",
            Service::Comments => "comments-srv",
            Service::Query => "query-srv",
            Service::Moderation => "moderation-srv",
            Service::EventBus => "event-bus-srv",
            Service::Client => "client-srv",
        }
    }

    /// The environment variable a peer reads to find this service's base URL.
    pub const fn url_env(self) -> &'static str {
        match self {
            Service::Posts => "POSTS_URL",
            Service::Comments => "COMMENTS_URL",
            Service::Query => "QUERY_URL",
            Service::Moderation => "MODERATION_URL",
            Service::EventBus => "EVENT_BUS_URL",
            Service::Client => "CLIENT_URL",
        }
    }

    /// Whether the service keeps a database (and so needs `DATA_DIR`).
    pub const fn keeps_data(self) -> bool {
        !matches!(self, Service::Client)
    }

    /// The base URL on this machine with default ports.
    pub fn local_url(self) -> String {
        format!("http://127.0.0.1:{}", self.default_port())
    }

    /// The base URL inside a cluster (or a container network named like one).
    pub fn cluster_url(self) -> String {
        format!("http://{}:{}", self.k8s_service(), self.default_port())
    }

    pub fn from_name(name: &str) -> Option<Service> {
        Service::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ports_are_unique() {
        let mut names: Vec<_> = Service::ALL.iter().map(|s| s.name()).collect();
        let mut ports: Vec<_> = Service::ALL.iter().map(|s| s.default_port()).collect();
        names.sort_unstable();
        names.dedup();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(names.len(), 6);
        assert_eq!(ports.len(), 6);
        assert_eq!(Service::from_name("event-bus"), Some(Service::EventBus));
        assert_eq!(Service::from_name("nope"), None);
    }
}

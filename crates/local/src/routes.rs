//! The public route table: which service answers which path from outside.
//!
//! This is the only copy. The local gateway routes with it and the Kubernetes
//! Ingress file is generated from it (a test checks the committed file still
//! matches). Matching follows ingress-nginx with `use-regex: "true"`: each
//! path becomes a case-insensitive regex anchored at the start only
//! (`~* "^<path>"`), and locations are tried longest path first, ties broken
//! by the lexicographically greater path. That is why `/posts/123` and
//! `/postsXYZ` reach query, and why `/events` (internal to the cluster) is not
//! routed to any event endpoint: it falls through to the client.

use regex::Regex;

use blog_domain::Service;

/// One Ingress path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The path as written in the Ingress (a regex fragment).
    pub path: &'static str,
    pub service: Service,
    /// A long-lived stream (server-sent events): proxies must not buffer it
    /// and must keep it open well past its keep-alive interval.
    pub streaming: bool,
}

/// The original app's four routes, plus the two server-sent event streams
/// the browser opens: the read side's live updates (`/posts/stream`, which
/// the `/posts` prefix would reach anyway) and the client's own window on
/// the bus (`/api/flow`, which the catch-all would reach). Each is named here
/// so that every proxy generated from this table keeps it open: unbuffered
/// and without a request timeout.
pub const ROUTES: &[Route] = &[
    Route { path: "/posts/create", service: Service::Posts, streaming: false },
    Route { path: "/posts/stream", service: Service::Query, streaming: true },
    Route { path: "/api/flow", service: Service::Client, streaming: true },
    Route { path: "/posts/?(.*)/comments", service: Service::Comments, streaming: false },
    Route { path: "/posts", service: Service::Query, streaming: false },
    Route { path: "/?(.*)", service: Service::Client, streaming: false },
];

/// The host the Ingress answers for.
pub const HOST: &str = "posts.com";

/// Compiled routes in ingress-nginx's evaluation order.
#[derive(Debug, Clone)]
pub struct RouteTable {
    compiled: Vec<(Regex, Route)>,
}

impl RouteTable {
    pub fn new(routes: &[Route]) -> Result<Self, regex::Error> {
        let mut ordered = routes.to_vec();
        ordered.sort_by(|a, b| b.path.len().cmp(&a.path.len()).then_with(|| b.path.cmp(a.path)));
        let compiled = ordered
            .into_iter()
            .map(|route| Ok((Regex::new(&format!("(?i)^{}", route.path))?, route)))
            .collect::<Result<_, regex::Error>>()?;
        Ok(Self { compiled })
    }

    /// The table of [`ROUTES`].
    pub fn standard() -> Self {
        Self::new(ROUTES).expect("the built-in route table is valid regex")
    }

    /// The route that answers `path`, if any.
    pub fn route(&self, path: &str) -> Option<&Route> {
        self.compiled.iter().find(|(re, _)| re.is_match(path)).map(|(_, route)| route)
    }

    /// Routes in evaluation order.
    pub fn ordered(&self) -> impl Iterator<Item = &Route> {
        self.compiled.iter().map(|(_, route)| route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(path: &str) -> Service {
        RouteTable::standard().route(path).expect("every path is routed").service
    }

    #[test]
    fn routes_follow_ingress_nginx_semantics() {
        assert_eq!(target("/posts/create"), Service::Posts);
        assert_eq!(target("/POSTS/Create"), Service::Posts);
        assert_eq!(target("/posts/abc/comments"), Service::Comments);
        assert_eq!(target("/posts/create/comments"), Service::Comments);
        assert_eq!(target("/posts/stream"), Service::Query);
        assert_eq!(target("/posts"), Service::Query);
        assert_eq!(target("/posts/123"), Service::Query);
        assert_eq!(target("/postsXYZ"), Service::Query);
        assert_eq!(target("/"), Service::Client);
        assert_eq!(target("/app.js"), Service::Client);
        assert_eq!(target("/events"), Service::Client);
        assert_eq!(target("/api/flow"), Service::Client);
        assert_eq!(target("/api/status"), Service::Client);
    }

    #[test]
    fn evaluation_order_is_longest_first() {
        let order: Vec<_> = RouteTable::standard().ordered().map(|r| r.path).collect();
        assert_eq!(order, ["/posts/?(.*)/comments", "/posts/stream", "/posts/create", "/api/flow", "/posts", "/?(.*)"]);
    }

    #[test]
    fn ties_prefer_the_lexicographically_greater_path() {
        let table = RouteTable::new(&[
            Route { path: "/a.", service: Service::Posts, streaming: false },
            Route { path: "/ab", service: Service::Query, streaming: false },
        ])
        .unwrap();
        assert_eq!(table.route("/ab").unwrap().service, Service::Query);
    }
}

//! The Kubernetes side of the suite, as data: the Ingress file generated from
//! the route table, and the committed manifests read back.
//!
//! The Ingress is the one deployment file that must agree with code (the
//! local gateway routes with [`ROUTES`]), so it is generated here rather than
//! written by hand, and so is its Gateway API counterpart (a kustomize
//! component with a `Gateway` and an `HTTPRoute`, see [`gateway_api_files`]);
//! `cargo xtask ingress` writes them and a test fails when a committed file
//! differs. The other manifests are written by hand, for
//! people to read, and [`Manifests`] reads them back so that tests can check
//! them against the topology and `cargo xtask e2e-containers` can run every
//! container exactly as its workload says (environment, user, read-only root,
//! volumes, limits) instead of keeping a second copy of those settings.
//! [`nginx_conf`] turns the Ingress file into an nginx configuration that
//! follows ingress-nginx's rules, for the containerised end-to-end run.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use blog_domain::Service;

use crate::routes::{HOST, ROUTES, RouteTable};
use serde::Deserialize;
use serde_json::Value;

/// Where the manifests live, relative to the workspace root.
pub const MANIFEST_DIR: &str = "infrastructure/k8s";

/// The kustomize file of a manifest directory.
pub const KUSTOMIZATION: &str = "kustomization.yaml";

/// The generated Ingress file, relative to the workspace root.
pub const INGRESS_FILE: &str = "infrastructure/k8s/ingress.yaml";

/// Seconds an idle stream may stay open through the ingress.
const STREAM_TIMEOUT_SECS: u32 = 3600;

/// Something in the manifests is missing or not what the suite expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError(pub String);

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ManifestError {}

fn error<T>(message: impl Into<String>) -> Result<T, ManifestError> {
    Err(ManifestError(message.into()))
}

/// The Ingress file for [`ROUTES`] on [`HOST`], as committed in [`INGRESS_FILE`].
pub fn ingress_yaml() -> Result<String, ManifestError> {
    let table = RouteTable::new(ROUTES).map_err(|e| ManifestError(format!("route table: {e}")))?;
    let (streams, plain): (Vec<_>, Vec<_>) = table.ordered().partition(|route| route.streaming);
    let mut out = String::from(GENERATED);
    out.push_str(
        "#\n\
         # ingress-nginx with use-regex turns every path of the host into a\n\
         # case-insensitive regex anchored at the start only, tried longest first\n\
         # (across both objects below). Paths are listed in that order. /events\n\
         # (service-to-service only) matches no service's route: it reaches the client.\n",
    );
    let base = [("nginx.ingress.kubernetes.io/use-regex", "true".to_owned())];
    push_ingress(&mut out, "blog-ingress", &base, &plain);
    out.push_str(
        "---\n\
         # Server-sent event streams: unbuffered, and idle for up to an hour between\n\
         # keep-alives without the ingress cutting them.\n",
    );
    let timeout = STREAM_TIMEOUT_SECS.to_string();
    let stream_annotations = [
        ("nginx.ingress.kubernetes.io/use-regex", "true".to_owned()),
        ("nginx.ingress.kubernetes.io/proxy-buffering", "off".to_owned()),
        ("nginx.ingress.kubernetes.io/proxy-read-timeout", timeout.clone()),
        ("nginx.ingress.kubernetes.io/proxy-send-timeout", timeout),
    ];
    push_ingress(&mut out, "blog-stream-ingress", &stream_annotations, &streams);
    Ok(out)
}

fn push_ingress(out: &mut String, name: &str, annotations: &[(&str, String)], routes: &[&crate::routes::Route]) {
    out.push_str(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: {name}\n  labels:\n    app.kubernetes.io/name: blog\n    app.kubernetes.io/part-of: blog\n    app.kubernetes.io/component: ingress\n  annotations:\n"
    ));
    for (key, value) in annotations {
        out.push_str(&format!("    {key}: {}\n", quote(value)));
    }
    out.push_str(&format!("spec:\n  ingressClassName: nginx\n  rules:\n    - host: {HOST}\n      http:\n        paths:\n"));
    for route in routes {
        let service = route.service;
        out.push_str(&format!(
            "          - path: {}\n            pathType: ImplementationSpecific\n            backend:\n              service:\n                name: {}\n                port:\n                  number: {}\n",
            quote(route.path),
            service.k8s_service(),
            service.default_port()
        ));
    }
}

/// Where ingress-nginx runs its controller (minikube's addon and the
/// upstream manifests alike), which the network policies must admit.
pub const INGRESS_NAMESPACE: &str = "ingress-nginx";

/// The Gateway API component, relative to the workspace root: a `Gateway`
/// and an `HTTPRoute` in place of the Ingress. A kustomize component, since
/// an overlay may not live inside the base's directory.
pub const GATEWAY_API_DIR: &str = "infrastructure/k8s/gateway-api";

/// The overlay that renders the base with the Gateway API component.
pub const GATEWAY_API_OVERLAY: &str = "infrastructure/overlays/gateway-api";

/// The `GatewayClass` the Gateway asks for: Envoy Gateway's, as its
/// quickstart installs it.
pub const GATEWAY_CLASS: &str = "eg";

/// Where Envoy Gateway runs its proxies (by default in its own namespace),
/// which the network policies must admit.
pub const GATEWAY_NAMESPACE: &str = "envoy-gateway-system";

/// How a Gateway API `HTTPRoute` matches one route of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// Whole path segments, case-sensitive: `/posts` matches `/posts` and
    /// `/posts/1`, not `/postsXYZ` nor `/POSTS`.
    Prefix(String),
    /// A regex (RE2 for Envoy Gateway) over the whole path; support and
    /// precedence are implementation-specific.
    Regex(String),
}

/// The Gateway API match for an Ingress path (a regex anchored at the start
/// only): a literal path becomes a `PathPrefix`, `<literal>/?(.*)` the prefix
/// of its literal (`/` when empty), anything else a `RegularExpression` with
/// `.*` appended, since Envoy matches regexes against the whole path.
pub fn gateway_match(path: &str) -> PathMatch {
    let literal = |p: &str| !p.chars().any(|c| "\\.+*?()|[]{}^$".contains(c));
    if literal(path) {
        return PathMatch::Prefix(path.to_owned());
    }
    match path.strip_suffix("/?(.*)") {
        Some(rest) if literal(rest) => PathMatch::Prefix(if rest.is_empty() { "/".to_owned() } else { rest.to_owned() }),
        _ => PathMatch::Regex(format!("{path}.*")),
    }
}

/// The generated files of [`GATEWAY_API_DIR`] and [`GATEWAY_API_OVERLAY`],
/// by path relative to the workspace root.
pub fn gateway_api_files() -> Result<Vec<(String, String)>, ManifestError> {
    let table = RouteTable::new(ROUTES).map_err(|e| ManifestError(format!("route table: {e}")))?;
    let overlay = format!(
        "{GENERATED}#\n\
         # The base with the Gateway API in place of the Ingress: `kubectl apply -k\n\
         # {GATEWAY_API_OVERLAY}` once the Gateway API CRDs (v1.6.1, standard\n\
         # channel) and Envoy Gateway (GatewayClass `{GATEWAY_CLASS}`) are installed.\n\
         apiVersion: kustomize.config.k8s.io/v1beta1\n\
         kind: Kustomization\n\
         resources:\n\
         \x20 - ../../k8s\n\
         components:\n\
         \x20 - ../../k8s/gateway-api\n"
    );
    Ok(vec![
        (format!("{GATEWAY_API_DIR}/{KUSTOMIZATION}"), gateway_api_component(&table)),
        (format!("{GATEWAY_API_DIR}/gateway.yaml"), gateway_yaml(&table)),
        (format!("{GATEWAY_API_OVERLAY}/{KUSTOMIZATION}"), overlay),
    ])
}

const GENERATED: &str = "# Generated by `cargo xtask ingress` from crates/local/src/routes.rs (ROUTES,\n\
                         # HOST) and crates/domain/src/topology.rs. Do not edit: tests/tests/deployment.rs\n\
                         # fails when this file and the route table disagree.\n";

fn labels(indent: &str, component: &str) -> String {
    format!(
        "{indent}labels:\n{indent}  app.kubernetes.io/name: blog\n{indent}  app.kubernetes.io/part-of: blog\n{indent}  app.kubernetes.io/component: {component}\n"
    )
}

fn gateway_api_component(table: &RouteTable) -> String {
    let mut out = format!(
        "{GENERATED}#\n\
         # A component for the base (see {GATEWAY_API_OVERLAY}): the Gateway\n\
         # API in place of the Ingress, and the network policies opened to the\n\
         # gateway's proxies.\n\
         apiVersion: kustomize.config.k8s.io/v1alpha1\n\
         kind: Component\n\
         resources:\n\
         \x20 - gateway.yaml\n\
         patches:\n\
         \x20 # No Ingress: the Gateway is the front door.\n\
         \x20 - target:\n\
         \x20     kind: Ingress\n\
         \x20   patch: |-\n\
         \x20     $patch: delete\n\
         \x20     apiVersion: networking.k8s.io/v1\n\
         \x20     kind: Ingress\n\
         \x20     metadata:\n\
         \x20       name: any\n\
         \x20 # Envoy Gateway's proxies (in {GATEWAY_NAMESPACE}) may reach each routed\n\
         \x20 # service on its port.\n"
    );
    let mut services: Vec<Service> = table.ordered().map(|route| route.service).collect();
    services.sort_by_key(|service| service.name());
    services.dedup();
    for service in services {
        out.push_str(&format!(
            "  - target:\n\
             \x20     kind: NetworkPolicy\n\
             \x20     name: {}\n\
             \x20   patch: |-\n\
             \x20     - op: add\n\
             \x20       path: /spec/ingress/-\n\
             \x20       value:\n\
             \x20         from:\n\
             \x20           - namespaceSelector:\n\
             \x20               matchLabels:\n\
             \x20                 kubernetes.io/metadata.name: {GATEWAY_NAMESPACE}\n\
             \x20         ports:\n\
             \x20           - protocol: TCP\n\
             \x20             port: {}\n",
            network_policy_name(service),
            service.default_port()
        ));
    }
    out
}

/// The NetworkPolicy that admits traffic to `service`'s pods.
pub fn network_policy_name(service: Service) -> String {
    format!("{}-ingress", service.name())
}

fn gateway_yaml(table: &RouteTable) -> String {
    let mut out = format!(
        "{GENERATED}#\n\
         # Gateway API semantics differ from ingress-nginx's regexes:\n\
         # - PathPrefix matches whole path segments and is case-sensitive: /posts\n\
         #   matches /posts and /posts/1, but /postsXYZ and /POSTS fall through to\n\
         #   the catch-all (the client), where the Ingress sends them to query.\n\
         # - /posts/{{id}}/comments needs a RegularExpression match, whose support,\n\
         #   syntax and precedence are implementation-specific (Envoy Gateway: RE2\n\
         #   over the whole path, tried before any PathPrefix).\n\
         # - The live streams' rules (server-sent events) lift the request timeout\n\
         #   (\"0s\": none); Envoy cuts every request at 15 s otherwise.\n\
         # - Internal paths (/events, /status, /flow, /metrics, /healthz, /readyz)\n\
         #   have no rule of their own; through the catch-all they reach the client,\n\
         #   which answers its own internal routes only to unproxied requests.\n\
         apiVersion: gateway.networking.k8s.io/v1\n\
         kind: Gateway\n\
         metadata:\n\
         \x20 name: blog-gateway\n\
         {}\
         spec:\n\
         \x20 gatewayClassName: {GATEWAY_CLASS}\n\
         \x20 listeners:\n\
         \x20   - name: http\n\
         \x20     protocol: HTTP\n\
         \x20     port: 80\n\
         \x20     hostname: {HOST}\n\
         \x20     allowedRoutes:\n\
         \x20       namespaces:\n\
         \x20         from: Same\n\
         ---\n\
         apiVersion: gateway.networking.k8s.io/v1\n\
         kind: HTTPRoute\n\
         metadata:\n\
         \x20 name: blog\n\
         {}\
         spec:\n\
         \x20 parentRefs:\n\
         \x20   - name: blog-gateway\n\
         \x20     sectionName: http\n\
         \x20 hostnames:\n\
         \x20   - {HOST}\n\
         \x20 rules:\n",
        labels("  ", "gateway"),
        labels("  ", "gateway"),
    );
    for route in table.ordered() {
        let (kind, value) = match gateway_match(route.path) {
            PathMatch::Prefix(value) => ("PathPrefix", value),
            PathMatch::Regex(value) => ("RegularExpression", value),
        };
        out.push_str(&format!(
            "    - matches:\n\
             \x20       - path:\n\
             \x20           type: {kind}\n\
             \x20           value: {}\n\
             \x20     backendRefs:\n\
             \x20       - name: {}\n\
             \x20         port: {}\n",
            quote(&value),
            route.service.k8s_service(),
            route.service.default_port()
        ));
        if route.streaming {
            out.push_str("      timeouts:\n        request: \"0s\"\n");
        }
    }
    out
}

/// A YAML double-quoted scalar.
fn quote(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Every document of every `*.yaml` file in a manifest directory.
#[derive(Debug, Clone, Default)]
pub struct Manifests {
    docs: Vec<(PathBuf, Value)>,
}

impl Manifests {
    /// Renders a kustomize directory the way `kubectl kustomize` does, for
    /// the little the suite's kustomizations use: `resources` (files, in
    /// order, and directories holding a kustomization, rendered first), then
    /// `patches` that delete an object (`$patch: delete`) or change one with
    /// JSON patch operations `replace` and `add` (with a `target` kind and
    /// name). Anything else is refused, never approximated; `cargo xtask
    /// validate` checks that this and kubectl render the same documents.
    pub fn load(dir: &Path) -> Result<Self, ManifestError> {
        let file = dir.join(KUSTOMIZATION);
        let kustomization = read_kustomization(&file, &["resources", "patches"])?;
        let mut docs = Vec::new();
        for name in resource_names(&kustomization, &file)? {
            let path = dir.join(name);
            if path.is_dir() {
                docs.extend(Self::load(&path)?.docs);
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| ManifestError(format!("{}: {e}", path.display())))?;
            for doc in parse_documents(&text).map_err(|e| ManifestError(format!("{}: {e}", path.display())))? {
                docs.push((path.clone(), doc));
            }
        }
        let mut manifests = Self { docs };
        for patch in kustomization["patches"].as_array().map(Vec::as_slice).unwrap_or_default() {
            manifests.apply(patch).map_err(|e| ManifestError(format!("{}: {e}", file.display())))?;
        }
        Ok(manifests)
    }

    /// Applies one entry of a kustomization's `patches`.
    fn apply(&mut self, patch: &Value) -> Result<(), ManifestError> {
        let text = patch["patch"].as_str().ok_or_else(|| ManifestError(format!("only inline patches are supported: {patch}")))?;
        let [body] = parse_documents(text)?.try_into().map_err(|_| ManifestError(format!("a patch is one document: {text}")))?;
        let found = |docs: &[(PathBuf, Value)], kind: &Value, name: &Value| {
            docs.iter().position(|(_, doc)| doc["kind"] == *kind && doc["metadata"]["name"] == *name)
        };
        if body["$patch"] == "delete" {
            let index = found(&self.docs, &body["kind"], &body["metadata"]["name"])
                .ok_or_else(|| ManifestError(format!("nothing to delete for {text}")))?;
            self.docs.remove(index);
            return Ok(());
        }
        let (target, Some(operations)) = (&patch["target"], body.as_array()) else {
            return error(format!("only `$patch: delete` and JSON patches are supported: {text}"));
        };
        let index = found(&self.docs, &target["kind"], &target["name"]).ok_or_else(|| ManifestError(format!("no target {target}")))?;
        for operation in operations {
            json_patch(&mut self.docs[index].1, operation)?;
        }
        Ok(())
    }

    /// Every document with its file.
    pub fn documents(&self) -> impl Iterator<Item = (&Path, &Value)> {
        self.docs.iter().map(|(path, doc)| (path.as_path(), doc))
    }

    /// Every document of one `kind`.
    pub fn of_kind<'a, 'k>(&'a self, kind: &'k str) -> impl Iterator<Item = &'a Value> + use<'a, 'k> {
        self.docs.iter().map(|(_, doc)| doc).filter(move |doc| doc["kind"] == kind)
    }

    /// The document of `kind` called `name`.
    pub fn named(&self, kind: &str, name: &str) -> Option<&Value> {
        self.of_kind(kind).find(|doc| doc["metadata"]["name"] == name)
    }

    /// The StatefulSet or Deployment that runs `service` (named after it).
    pub fn workload(&self, service: Service) -> Result<Workload<'_>, ManifestError> {
        self.workload_named(service.name())
    }

    /// The StatefulSet or Deployment called `name`, with its container of that name.
    pub fn workload_named(&self, name: &str) -> Result<Workload<'_>, ManifestError> {
        let found: Vec<_> = ["StatefulSet", "Deployment"].into_iter().filter_map(|kind| self.named(kind, name)).collect();
        let [doc] = found.as_slice() else {
            return error(format!("expected one StatefulSet or Deployment named {name}, found {}", found.len()));
        };
        let pod = &doc["spec"]["template"]["spec"];
        let containers = pod["containers"].as_array().map(Vec::as_slice).unwrap_or_default();
        let container = containers
            .iter()
            .find(|c| c["name"] == name)
            .ok_or_else(|| ManifestError(format!("workload {name} has no container named {name}")))?;
        Ok(Workload { manifests: self, doc, pod, container })
    }
}

impl Manifests {
    /// The documents of a rendered text (`kubectl kustomize` output, say).
    pub fn from_text(text: &str) -> Result<Self, ManifestError> {
        Ok(Self { docs: parse_documents(text)?.into_iter().map(|doc| (PathBuf::new(), doc)).collect() })
    }

    /// The labels of `service`'s pods (its workload's pod template).
    pub fn pod_labels(&self, service: Service) -> Result<Labels, ManifestError> {
        self.target_labels(Target::Service(service))
    }

    /// The labels of `target`'s pods.
    pub fn target_labels(&self, target: Target) -> Result<Labels, ManifestError> {
        Ok(labels_of(&self.workload_named(target.name())?.doc["spec"]["template"]["metadata"]["labels"]))
    }

    /// The servers of the scale mode these manifests run (PostgreSQL, NATS),
    /// beside the suite's own services.
    pub fn servers(&self) -> Vec<Target> {
        [Target::Postgres, Target::Nats].into_iter().filter(|server| self.workload_named(server.name()).is_ok()).collect()
    }

    /// Whether the NetworkPolicies admit a TCP connection from `from` to a pod
    /// of this namespace labelled `to`, on `port`, as a plugin that enforces
    /// them decides: a pod no Ingress policy selects accepts everything; a
    /// selected pod accepts what at least one rule of one selecting policy
    /// admits (rules add up, none takes away). A rule admits a connection when
    /// one of its ports is `port` (or it lists none) and one of its peers
    /// matches the source (or it lists none). Named ports and `ipBlock` peers
    /// are not used here and admit nothing.
    pub fn network_policies_admit(&self, from: &PolicyPeer, to: &Labels, port: u16) -> bool {
        let mut selected = self.of_kind("NetworkPolicy").filter(|policy| {
            let spec = &policy["spec"];
            let types = spec["policyTypes"].as_array();
            let ingress = types.is_none_or(|types| types.iter().any(|t| t == "Ingress"));
            ingress && selector_matches(&spec["podSelector"], to)
        });
        let Some(first) = selected.next() else { return true };
        std::iter::once(first).chain(selected).any(|policy| {
            policy["spec"]["ingress"].as_array().map(Vec::as_slice).unwrap_or_default().iter().any(|rule| {
                let ports = rule["ports"].as_array().map(Vec::as_slice).unwrap_or_default();
                let port_ok = ports.is_empty()
                    || ports.iter().any(|p| p["protocol"].as_str().unwrap_or("TCP") == "TCP" && p["port"].as_u64() == Some(port.into()));
                let peers = rule["from"].as_array().map(Vec::as_slice).unwrap_or_default();
                port_ok && (peers.is_empty() || peers.iter().any(|peer| from.matches(peer)))
            })
        })
    }
}

/// The scale mode's PostgreSQL server (infrastructure/overlays/scale): its
/// StatefulSet, container and pods' `app` label.
pub const POSTGRES: &str = "postgres";

/// PostgreSQL's port, the server's and its Services'.
pub const POSTGRES_PORT: u16 = 5432;

/// The ClusterIP Service every `DATABASE_URL` of the scale mode names.
pub const POSTGRES_SERVICE: &str = "postgres-srv";

/// The scale mode's NATS servers (JetStream, the bus's log): their
/// StatefulSet of [`crate::nats::NODES`] pods, container and pods' `app` label.
pub const NATS: &str = "nats";

/// NATS's ports in the cluster (the server's defaults): clients (the bus),
/// routes between the servers, monitoring (the probes' `/healthz`).
pub const NATS_CLIENT_PORT: u16 = 4222;
pub const NATS_CLUSTER_PORT: u16 = 6222;
pub const NATS_MONITOR_PORT: u16 = 8222;

/// The NATS StatefulSet's governing (headless) Service: each server is
/// `nats-<i>.nats-headless` to the others' routes and to the bus.
pub const NATS_HEADLESS_SERVICE: &str = "nats-headless";

/// The ClusterIP Service on NATS's client port, for tools.
pub const NATS_SERVICE: &str = "nats-srv";

/// The Secret holding the NATS servers' password (key `NATS_PASSWORD`),
/// which the bus (user [`crate::nats::BUS_USER`]) and the routes give.
pub const NATS_SECRET: &str = "blog-nats";

/// The stable DNS name of NATS server `i` (from 0, as StatefulSets count).
pub fn nats_pod_host(i: usize) -> String {
    format!("{NATS}-{i}.{NATS_HEADLESS_SERVICE}")
}

/// The bus's `EVENT_STORE` in the scale overlay: every NATS server by its
/// stable name, so that the bus makes its stream with one replica per server.
pub fn nats_event_store() -> String {
    let servers: Vec<String> = (0..crate::nats::NODES).map(|i| format!("{}:{NATS_CLIENT_PORT}", nats_pod_host(i))).collect();
    format!("nats://{}", servers.join(","))
}

/// The overlay of the scale mode, relative to the workspace root.
pub const SCALE_OVERLAY: &str = "infrastructure/overlays/scale";

/// A pod a connection may go to: a service of the suite, or one of the
/// scale mode's servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Service(Service),
    Postgres,
    Nats,
}

impl Target {
    /// Its workload's name (and pods' `app` label).
    pub fn name(self) -> &'static str {
        match self {
            Target::Service(service) => service.name(),
            Target::Postgres => POSTGRES,
            Target::Nats => NATS,
        }
    }

    /// Every port it listens on.
    pub fn ports(self) -> Vec<u16> {
        match self {
            Target::Service(service) => vec![service.default_port()],
            Target::Postgres => vec![POSTGRES_PORT],
            Target::Nats => vec![NATS_CLIENT_PORT, NATS_CLUSTER_PORT, NATS_MONITOR_PORT],
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a connection to one of the suite's pods comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A pod of the suite (the scale mode's servers included: PostgreSQL calls
    /// nothing, a NATS server its peers' routes).
    Pod(Target),
    /// The front door (ingress controller or gateway proxies): any pod of
    /// this namespace.
    FrontDoor(&'static str),
}

impl Caller {
    /// A pod of one of the suite's services.
    pub fn service(service: Service) -> Self {
        Caller::Pod(Target::Service(service))
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Pod(target) => write!(f, "{target}"),
            Caller::FrontDoor(namespace) => write!(f, "namespace {namespace}"),
        }
    }
}

/// A connection one caller needs: to a target, on one of its ports.
pub type Connection = (Caller, Target, u16);

/// Every connection the suite makes inside the cluster, from the service
/// and route tables: every service but the bus reaches the bus (publishing,
/// catching up; the client reads its `/status` and `/flow`); the bus pushes
/// to each subscriber; the client's status page probes every other service
/// (client/src/lib.rs asks each one in the table); the front door reaches
/// every service a route names; each on the target's port. With the scale
/// mode's `servers`: each service that keeps its data in PostgreSQL
/// ([`database_services`]) reaches it; the bus reaches NATS's client port,
/// and the NATS servers each other's cluster port (routes). Nothing reaches
/// NATS's monitoring port (the kubelet's probes come from the node).
///
/// [`database_services`]: crate::postgres::database_services
pub fn needed_connections(front_doors: &[&'static str], servers: &[Target]) -> Vec<Connection> {
    let mut needed = Vec::new();
    let mut need = |caller: Caller, target: Target, port: u16| {
        if !needed.contains(&(caller, target, port)) {
            needed.push((caller, target, port));
        }
    };
    let service = |s: Service| (Target::Service(s), s.default_port());
    for from in Service::ALL.into_iter().filter(|s| *s != Service::EventBus) {
        let (target, port) = service(Service::EventBus);
        need(Caller::service(from), target, port);
    }
    for subscriber in Service::SUBSCRIBERS {
        let (target, port) = service(subscriber);
        need(Caller::service(Service::EventBus), target, port);
    }
    for probed in Service::ALL.into_iter().filter(|s| *s != Service::Client) {
        let (target, port) = service(probed);
        need(Caller::service(Service::Client), target, port);
    }
    for namespace in front_doors {
        for route in ROUTES {
            let (target, port) = service(route.service);
            need(Caller::FrontDoor(namespace), target, port);
        }
    }
    if servers.contains(&Target::Postgres) {
        for from in crate::postgres::database_services() {
            need(Caller::service(from), Target::Postgres, POSTGRES_PORT);
        }
    }
    if servers.contains(&Target::Nats) {
        need(Caller::service(Service::EventBus), Target::Nats, NATS_CLIENT_PORT);
        need(Caller::Pod(Target::Nats), Target::Nats, NATS_CLUSTER_PORT);
    }
    needed
}

/// Where the NetworkPolicies of `manifests` differ from
/// [`needed_connections`], as an enforcing plugin would apply them: each
/// needed connection they refuse, and each connection to any port of the
/// suite's pods (the scale mode's servers' too, when the manifests run
/// them) from any of those pods (itself included) or a front door that
/// nothing needs but they admit. Empty when they admit exactly what the
/// suite uses.
pub fn network_policy_mismatches(manifests: &Manifests, front_doors: &[&'static str]) -> Result<Vec<String>, ManifestError> {
    let servers = manifests.servers();
    let needed = needed_connections(front_doors, &servers);
    let targets: Vec<Target> = Service::ALL.into_iter().map(Target::Service).chain(servers).collect();
    let mut callers: Vec<(Caller, PolicyPeer)> = Vec::new();
    for target in &targets {
        callers.push((Caller::Pod(*target), PolicyPeer::pod(manifests.target_labels(*target)?)));
    }
    for namespace in front_doors {
        callers.push((Caller::FrontDoor(namespace), PolicyPeer::namespace(namespace)));
    }
    let mut mismatches = Vec::new();
    for target in targets {
        let labels = manifests.target_labels(target)?;
        for port in target.ports() {
            for (caller, peer) in &callers {
                let admitted = manifests.network_policies_admit(peer, &labels, port);
                match (needed.contains(&(*caller, target, port)), admitted) {
                    (true, false) => mismatches.push(format!("{caller} -> {target}:{port} is needed but refused")),
                    (false, true) => mismatches.push(format!("{caller} -> {target}:{port} is admitted but nothing needs it")),
                    _ => {}
                }
            }
        }
    }
    Ok(mismatches)
}

/// A set of Kubernetes labels.
pub type Labels = std::collections::BTreeMap<String, String>;

fn labels_of(value: &Value) -> Labels {
    value.as_object().into_iter().flatten().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect()
}

/// The source of a connection, as a NetworkPolicy peer sees it: a pod's
/// labels, and its namespace's labels when it is in another namespace than
/// the policies (`None`: the same one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyPeer {
    pub pod: Labels,
    pub namespace: Option<Labels>,
}

impl PolicyPeer {
    /// A pod of the suite's own namespace.
    pub fn pod(labels: Labels) -> Self {
        Self { pod: labels, namespace: None }
    }

    /// Any pod of the namespace called `name` (as its automatic
    /// `kubernetes.io/metadata.name` label says).
    pub fn namespace(name: &str) -> Self {
        Self { pod: Labels::new(), namespace: Some(Labels::from([("kubernetes.io/metadata.name".to_owned(), name.to_owned())])) }
    }

    fn matches(&self, peer: &Value) -> bool {
        let pods = peer.get("podSelector");
        let namespaces = peer.get("namespaceSelector");
        let pod_ok = pods.is_none_or(|selector| selector_matches(selector, &self.pod));
        let namespace_ok = match (namespaces, &self.namespace) {
            // Without a namespaceSelector, only the policy's own namespace.
            (None, namespace) => namespace.is_none() && pods.is_some(),
            // An empty namespaceSelector matches every namespace; the own
            // namespace is matched through its own labels, unknown here.
            (Some(selector), None) => selector.as_object().is_some_and(|s| s.values().all(|v| v.as_object().is_some_and(|o| o.is_empty()))),
            (Some(selector), Some(labels)) => selector_matches(selector, labels),
        };
        pod_ok && namespace_ok
    }
}

/// Whether a label selector (`matchLabels`, `matchExpressions`) selects `labels`.
fn selector_matches(selector: &Value, labels: &Labels) -> bool {
    let by_label = selector["matchLabels"].as_object().into_iter().flatten().all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str());
    let by_expression = selector["matchExpressions"].as_array().into_iter().flatten().all(|expression| {
        let value = expression["key"].as_str().and_then(|key| labels.get(key));
        let values: Vec<&str> = expression["values"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        match expression["operator"].as_str() {
            Some("In") => value.is_some_and(|v| values.contains(&v.as_str())),
            Some("NotIn") => value.is_none_or(|v| !values.contains(&v.as_str())),
            Some("Exists") => value.is_some(),
            Some("DoesNotExist") => value.is_none(),
            _ => false,
        }
    });
    by_label && by_expression
}

/// The files listed in `resources` of `dir/kustomization.yaml`, as paths.
/// Refuses a kustomization that transforms what it lists (patches, labels,
/// generators...), since its documents would then differ from the files.
pub fn kustomize_resources(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let file = dir.join(KUSTOMIZATION);
    let kustomization = read_kustomization(&file, &["resources"])?;
    let mut files = Vec::new();
    for name in resource_names(&kustomization, &file)? {
        let path = dir.join(name);
        if !path.is_file() {
            return error(format!("{}: resource {name} is not a file", file.display()));
        }
        files.push(path);
    }
    Ok(files)
}

/// A kustomization file, refused if it uses a field other than `supported`.
fn read_kustomization(file: &Path, supported: &[&str]) -> Result<Value, ManifestError> {
    let text = std::fs::read_to_string(file).map_err(|e| ManifestError(format!("{}: {e}", file.display())))?;
    let [kustomization] =
        parse_documents(&text)?.try_into().map_err(|_| ManifestError(format!("{}: expected one document", file.display())))?;
    let fields = kustomization.as_object().map(|o| o.keys().map(String::as_str).collect::<Vec<_>>()).unwrap_or_default();
    if let Some(field) = fields.iter().find(|f| !matches!(**f, "apiVersion" | "kind") && !supported.contains(f)) {
        return error(format!("{}: `{field}` is not supported here (only {})", file.display(), supported.join(", ")));
    }
    Ok(kustomization)
}

/// The entries of a kustomization's `resources`.
fn resource_names<'a>(kustomization: &'a Value, file: &Path) -> Result<Vec<&'a str>, ManifestError> {
    let resources = kustomization["resources"].as_array().map(Vec::as_slice).unwrap_or_default();
    resources.iter().map(|r| r.as_str().ok_or_else(|| ManifestError(format!("{}: resource {r} is not a path", file.display())))).collect()
}

/// One JSON patch (RFC 6902) operation, `replace` or `add`, on `doc`.
fn json_patch(doc: &mut Value, operation: &Value) -> Result<(), ManifestError> {
    let (Some(op), Some(path)) = (operation["op"].as_str(), operation["path"].as_str()) else {
        return error(format!("a JSON patch operation needs op and path: {operation}"));
    };
    let value = operation.get("value").cloned().ok_or_else(|| ManifestError(format!("{op} {path} needs a value")))?;
    let missing = || ManifestError(format!("{op} {path}: no such place"));
    match op {
        "replace" => *doc.pointer_mut(path).ok_or_else(missing)? = value,
        "add" => {
            let (parent, last) = path.rsplit_once('/').ok_or_else(missing)?;
            let last = last.replace("~1", "/").replace("~0", "~");
            match doc.pointer_mut(parent).ok_or_else(missing)? {
                Value::Array(items) if last == "-" => items.push(value),
                Value::Array(items) => {
                    let index = last.parse::<usize>().ok().filter(|i| *i <= items.len()).ok_or_else(missing)?;
                    items.insert(index, value);
                }
                Value::Object(fields) => {
                    fields.insert(last, value);
                }
                _ => return Err(missing()),
            }
        }
        _ => return error(format!("JSON patch operation {op} is not supported")),
    }
    Ok(())
}

/// Parses a multi-document YAML text into JSON values, skipping empty documents.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, ManifestError> {
    let mut docs = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Value::deserialize(document).map_err(|e| ManifestError(format!("invalid YAML: {e}")))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// One service's workload and its main container.
#[derive(Debug, Clone, Copy)]
pub struct Workload<'a> {
    manifests: &'a Manifests,
    /// The StatefulSet or Deployment document.
    pub doc: &'a Value,
    /// `spec.template.spec`.
    pub pod: &'a Value,
    pub container: &'a Value,
}

/// An environment variable taken from a key of a Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEnv {
    pub variable: String,
    pub secret: String,
    pub key: String,
}

/// A path the container writes to, and what backs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// A PersistentVolumeClaim (from the StatefulSet's claim templates).
    Persistent { name: String, path: String },
    /// An `emptyDir`: scratch space that dies with the pod.
    Scratch { name: String, path: String },
}

impl Workload<'_> {
    pub fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or_default()
    }

    pub fn image(&self) -> Result<&str, ManifestError> {
        self.container["image"].as_str().ok_or_else(|| ManifestError("container has no image".into()))
    }

    /// The container's environment as the kubelet would set it: `envFrom`
    /// ConfigMaps first, then `env` entries (which win), in order.
    pub fn env(&self) -> Result<Vec<(String, String)>, ManifestError> {
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |name: &str, value: String| {
            env.retain(|(k, _)| k != name);
            env.push((name.to_owned(), value));
        };
        for source in self.container["envFrom"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let Some(map) = source["configMapRef"]["name"].as_str() else {
                return error(format!("unsupported envFrom source {source}"));
            };
            let config = self.manifests.named("ConfigMap", map).ok_or_else(|| ManifestError(format!("ConfigMap {map} not found")))?;
            let data = config["data"].as_object().ok_or_else(|| ManifestError(format!("ConfigMap {map} has no data")))?;
            for (key, value) in data {
                set(key, scalar(value)?);
            }
        }
        for entry in self.container["env"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let name = entry["name"].as_str().ok_or_else(|| ManifestError(format!("env entry without a name: {entry}")))?;
            if entry["valueFrom"].get("secretKeyRef").is_some() {
                // Not in the manifests by design: see `secret_env`.
                continue;
            }
            if entry.get("valueFrom").is_some() {
                return error(format!("env {name}: only secretKeyRef is supported in valueFrom"));
            }
            set(name, scalar(&entry["value"])?);
        }
        Ok(env)
    }

    /// The container's variables that come from a Secret, which the manifests
    /// reference but never contain (whoever deploys provides it).
    pub fn secret_env(&self) -> Vec<SecretEnv> {
        let entries = self.container["env"].as_array().map(Vec::as_slice).unwrap_or_default();
        entries
            .iter()
            .filter_map(|entry| {
                let reference = &entry["valueFrom"]["secretKeyRef"];
                Some(SecretEnv {
                    variable: entry["name"].as_str()?.to_owned(),
                    secret: reference["name"].as_str()?.to_owned(),
                    key: reference["key"].as_str()?.to_owned(),
                })
            })
            .collect()
    }

    /// The numeric user and group the pod runs as.
    pub fn run_as(&self) -> Option<(u64, u64)> {
        let context = &self.pod["securityContext"];
        Some((context["runAsUser"].as_u64()?, context["runAsGroup"].as_u64()?))
    }

    pub fn read_only_root(&self) -> bool {
        self.container["securityContext"]["readOnlyRootFilesystem"] == true
    }

    /// The container port named `http`.
    pub fn port(&self) -> Option<u64> {
        let ports = self.container["ports"].as_array()?;
        ports.iter().find(|p| p["name"] == "http").and_then(|p| p["containerPort"].as_u64())
    }

    /// Every volume mount, resolved to what backs it.
    pub fn mounts(&self) -> Result<Vec<Mount>, ManifestError> {
        let claims = self.doc["spec"]["volumeClaimTemplates"].as_array().map(Vec::as_slice).unwrap_or_default();
        let volumes = self.pod["volumes"].as_array().map(Vec::as_slice).unwrap_or_default();
        let mut mounts = Vec::new();
        for mount in self.container["volumeMounts"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let (Some(name), Some(path)) = (mount["name"].as_str(), mount["mountPath"].as_str()) else {
                return error(format!("volume mount without name or path: {mount}"));
            };
            let (name, path) = (name.to_owned(), path.to_owned());
            if claims.iter().any(|c| c["metadata"]["name"] == name.as_str()) {
                mounts.push(Mount::Persistent { name, path });
            } else if volumes.iter().any(|v| v["name"] == name.as_str() && v.get("emptyDir").is_some()) {
                mounts.push(Mount::Scratch { name, path });
            } else {
                return error(format!("volume {name} is neither a claim template nor an emptyDir"));
            }
        }
        Ok(mounts)
    }

    /// `resources.limits.memory` in bytes.
    pub fn memory_limit(&self) -> Option<u64> {
        parse_quantity(self.container["resources"]["limits"]["memory"].as_str()?)
    }

    /// `resources.limits.cpu` in millicores.
    pub fn cpu_limit_millis(&self) -> Option<u64> {
        let cpu = &self.container["resources"]["limits"]["cpu"];
        match cpu.as_str() {
            Some(text) => match text.strip_suffix('m') {
                Some(millis) => millis.parse().ok(),
                None => text.parse::<f64>().ok().map(|cores| (cores * 1000.0) as u64),
            },
            None => cpu.as_f64().map(|cores| (cores * 1000.0) as u64),
        }
    }
}

/// A ConfigMap or env value: Kubernetes wants strings, YAML may say otherwise.
fn scalar(value: &Value) -> Result<String, ManifestError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => error(format!("expected a scalar, found {other}")),
    }
}

/// A Kubernetes memory quantity (`128Mi`, `1G`, `1000`) in bytes.
pub fn parse_quantity(text: &str) -> Option<u64> {
    const SUFFIXES: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, factor) in SUFFIXES {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<u64>().ok()?.checked_mul(factor);
        }
    }
    text.parse().ok()
}

/// One path of an Ingress, with what ingress-nginx would make of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressPath {
    pub host: String,
    pub path: String,
    pub service: String,
    pub port: u64,
    /// nginx directives that the Ingress's annotations add to this location.
    pub directives: Vec<String>,
}

/// Every path of every `ingressClassName: nginx` Ingress, in ingress-nginx's
/// evaluation order per host (longest path first, ties: greater path first).
/// Refuses what it cannot translate faithfully: a path that is not a regex
/// (`use-regex` off), another path type, or an unknown annotation.
pub fn ingress_paths(manifests: &Manifests) -> Result<Vec<IngressPath>, ManifestError> {
    let mut paths = Vec::new();
    for ingress in manifests.of_kind("Ingress") {
        let name = ingress["metadata"]["name"].as_str().unwrap_or("?");
        if ingress["spec"]["ingressClassName"] != "nginx" {
            continue;
        }
        let mut directives = Vec::new();
        let annotations = ingress["metadata"]["annotations"].as_object().cloned().unwrap_or_default();
        if annotations.get("nginx.ingress.kubernetes.io/use-regex").and_then(Value::as_str) != Some("true") {
            return error(format!("Ingress {name}: only use-regex \"true\" is supported"));
        }
        for (key, value) in &annotations {
            let value = scalar(value)?;
            match key.strip_prefix("nginx.ingress.kubernetes.io/") {
                Some("use-regex") => {}
                Some("proxy-buffering") => directives.push(format!("proxy_buffering {value};")),
                Some("proxy-read-timeout") => directives.push(format!("proxy_read_timeout {value}s;")),
                Some("proxy-send-timeout") => directives.push(format!("proxy_send_timeout {value}s;")),
                _ => return error(format!("Ingress {name}: annotation {key} is not translated")),
            }
        }
        for rule in ingress["spec"]["rules"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let host = rule["host"].as_str().ok_or_else(|| ManifestError(format!("Ingress {name}: rule without host")))?;
            for entry in rule["http"]["paths"].as_array().map(Vec::as_slice).unwrap_or_default() {
                if entry["pathType"] != "ImplementationSpecific" {
                    return error(format!("Ingress {name}: pathType must be ImplementationSpecific: {entry}"));
                }
                let backend = &entry["backend"]["service"];
                let (Some(path), Some(service), Some(port)) =
                    (entry["path"].as_str(), backend["name"].as_str(), backend["port"]["number"].as_u64())
                else {
                    return error(format!("Ingress {name}: path needs path, service name and port number: {entry}"));
                };
                paths.push(IngressPath {
                    host: host.to_owned(),
                    path: path.to_owned(),
                    service: service.to_owned(),
                    port,
                    directives: directives.clone(),
                });
            }
        }
    }
    paths.sort_by(|a, b| a.host.cmp(&b.host).then(b.path.len().cmp(&a.path.len())).then_with(|| b.path.cmp(&a.path)));
    Ok(paths)
}

/// An nginx configuration that serves the Ingress paths the way
/// ingress-nginx does: one server per host, a `location ~* "^<path>"` per
/// path in ingress-nginx's order, upstreams resolved by name at request time
/// through `resolver` (so a restarted container is found at its new
/// address), `X-Request-ID` passed on or generated, the defaults for body
/// size and timeouts, and 404 for any other host.
pub fn nginx_conf(paths: &[IngressPath], resolver: &str) -> String {
    let mut conf = format!(
        "# Generated from {INGRESS_FILE} by cargo xtask e2e-containers.\n\
         worker_processes 1;\n\
         error_log stderr warn;\n\
         pid /tmp/nginx.pid;\n\
         events {{ worker_connections 512; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 resolver {resolver} valid=1s ipv6=off;\n\
         \x20 client_max_body_size 1m;\n\
         \x20 proxy_connect_timeout 5s;\n\
         \x20 proxy_read_timeout 60s;\n\
         \x20 proxy_send_timeout 60s;\n\
         \x20 proxy_http_version 1.1;\n\
         \x20 map $http_x_request_id $req_id {{ default $http_x_request_id; \"\" $request_id; }}\n\
         \x20 server {{\n\
         \x20   listen 80 default_server;\n\
         \x20   location / {{ return 404; }}\n\
         \x20 }}\n"
    );
    let mut hosts: Vec<&str> = paths.iter().map(|p| p.host.as_str()).collect();
    hosts.dedup();
    for host in hosts {
        conf.push_str(&format!("  server {{\n    listen 80;\n    server_name {host};\n"));
        for path in paths.iter().filter(|p| p.host == host) {
            conf.push_str(&format!(
                "    location ~* \"^{}\" {{\n\
                 \x20     set $upstream http://{}:{};\n\
                 \x20     proxy_set_header Host $host;\n\
                 \x20     proxy_set_header Connection \"\";\n\
                 \x20     proxy_set_header X-Request-ID $req_id;\n\
                 \x20     proxy_set_header X-Forwarded-For $remote_addr;\n",
                path.path, path.service, path.port
            ));
            for directive in &path.directives {
                conf.push_str(&format!("      {directive}\n"));
            }
            conf.push_str("      proxy_pass $upstream;\n    }\n");
        }
        conf.push_str("  }\n");
    }
    conf.push_str("}\n");
    conf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse() {
        assert_eq!(parse_quantity("128Mi"), Some(128 << 20));
        assert_eq!(parse_quantity("1G"), Some(1_000_000_000));
        assert_eq!(parse_quantity("512"), Some(512));
        assert_eq!(parse_quantity("lots"), None);
    }

    #[test]
    fn network_policies_are_evaluated_as_an_enforcing_plugin_would() {
        let policies = Manifests::from_text(
            "kind: NetworkPolicy\n\
             spec:\n  podSelector: {matchExpressions: [{key: app, operator: In, values: [a, b]}]}\n  policyTypes: [Ingress]\n\
             ---\n\
             kind: NetworkPolicy\n\
             spec:\n  podSelector: {matchLabels: {app: a}}\n  ingress:\n\
             \x20   - from: [{podSelector: {matchLabels: {app: c}}}, {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: edge}}}]\n\
             \x20     ports: [{protocol: TCP, port: 80}]\n\
             \x20   - ports: [{port: 9090}]\n",
        )
        .unwrap();
        let pod = |app: &str| Labels::from([("app".to_owned(), app.to_owned())]);
        let c = PolicyPeer::pod(pod("c"));
        // a: c and the edge namespace on 80, anyone on 9090.
        assert!(policies.network_policies_admit(&c, &pod("a"), 80));
        assert!(policies.network_policies_admit(&PolicyPeer::namespace("edge"), &pod("a"), 80));
        assert!(!policies.network_policies_admit(&PolicyPeer::namespace("other"), &pod("a"), 80));
        assert!(!policies.network_policies_admit(&PolicyPeer::pod(pod("d")), &pod("a"), 80));
        assert!(!policies.network_policies_admit(&c, &pod("a"), 81));
        assert!(policies.network_policies_admit(&PolicyPeer::namespace("other"), &pod("a"), 9090));
        // b: selected by the deny-all only; d: selected by nothing.
        assert!(!policies.network_policies_admit(&c, &pod("b"), 80));
        assert!(policies.network_policies_admit(&c, &pod("d"), 80));
    }

    #[test]
    fn each_port_of_a_pod_admits_only_the_peers_of_its_own_rules() {
        // NATS's shape: the bus on the client port, the servers (the policy's
        // own pods) on the cluster port, nobody on the monitoring port.
        let policies = Manifests::from_text(
            "kind: NetworkPolicy\n\
             spec:\n  podSelector: {matchLabels: {app: nats}}\n  policyTypes: [Ingress]\n  ingress:\n\
             \x20   - from: [{podSelector: {matchLabels: {app: event-bus}}}]\n\
             \x20     ports: [{protocol: TCP, port: 4222}]\n\
             \x20   - from: [{podSelector: {matchLabels: {app: nats}}}]\n\
             \x20     ports: [{protocol: TCP, port: 6222}]\n",
        )
        .unwrap();
        let pod = |app: &str| Labels::from([("app".to_owned(), app.to_owned())]);
        let (bus, nats) = (PolicyPeer::pod(pod("event-bus")), PolicyPeer::pod(pod("nats")));
        assert!(policies.network_policies_admit(&bus, &pod("nats"), NATS_CLIENT_PORT));
        assert!(!policies.network_policies_admit(&bus, &pod("nats"), NATS_CLUSTER_PORT), "the bus is no route");
        assert!(policies.network_policies_admit(&nats, &pod("nats"), NATS_CLUSTER_PORT));
        assert!(!policies.network_policies_admit(&nats, &pod("nats"), NATS_CLIENT_PORT), "a server is no client");
        for peer in [&bus, &nats, &PolicyPeer::pod(pod("query")), &PolicyPeer::namespace(INGRESS_NAMESPACE)] {
            assert!(!policies.network_policies_admit(peer, &pod("nats"), NATS_MONITOR_PORT), "{peer:?} -> monitoring");
        }
        for other in Service::ALL.into_iter().filter(|s| *s != Service::EventBus).map(|s| s.name()).chain([POSTGRES]) {
            let peer = PolicyPeer::pod(pod(other));
            assert!(Target::Nats.ports().into_iter().all(|port| !policies.network_policies_admit(&peer, &pod("nats"), port)), "{other}");
        }
    }

    #[test]
    fn with_nats_only_the_bus_and_the_servers_themselves_need_it() {
        let nats: Vec<Connection> = needed_connections(&[INGRESS_NAMESPACE], &[Target::Postgres, Target::Nats])
            .into_iter()
            .filter(|(caller, target, _)| *target == Target::Nats || *caller == Caller::Pod(Target::Nats))
            .collect();
        assert_eq!(
            nats,
            [
                (Caller::service(Service::EventBus), Target::Nats, NATS_CLIENT_PORT),
                (Caller::Pod(Target::Nats), Target::Nats, NATS_CLUSTER_PORT)
            ]
        );
        let without = needed_connections(&[INGRESS_NAMESPACE], &[Target::Postgres]);
        assert!(without.iter().all(|(caller, target, _)| *target != Target::Nats && *caller != Caller::Pod(Target::Nats)));
        assert_eq!(needed_connections(&[INGRESS_NAMESPACE], &[Target::Postgres, Target::Nats]).len(), without.len() + 2);
    }

    #[test]
    fn the_bus_names_every_nats_server_by_its_stable_name() {
        assert_eq!(nats_event_store(), "nats://nats-0.nats-headless:4222,nats-1.nats-headless:4222,nats-2.nats-headless:4222");
        assert_eq!(nats_event_store().matches(".nats-headless:").count(), crate::nats::NODES);
    }

    #[test]
    fn ingress_paths_become_gateway_api_matches() {
        assert_eq!(gateway_match("/posts"), PathMatch::Prefix("/posts".into()));
        assert_eq!(gateway_match("/?(.*)"), PathMatch::Prefix("/".into()));
        assert_eq!(gateway_match("/api/?(.*)"), PathMatch::Prefix("/api".into()));
        assert_eq!(gateway_match("/posts/?(.*)/comments"), PathMatch::Regex("/posts/?(.*)/comments.*".into()));
        assert_eq!(gateway_match("/a.b"), PathMatch::Regex("/a.b.*".into()));
    }

    #[test]
    fn generated_ingress_parses_back_to_the_route_table() {
        let yaml = ingress_yaml().unwrap();
        let manifests = Manifests { docs: parse_documents(&yaml).unwrap().into_iter().map(|d| (PathBuf::new(), d)).collect() };
        let paths = ingress_paths(&manifests).unwrap();
        let order: Vec<_> = paths.iter().map(|p| p.path.as_str()).collect();
        let expected: Vec<_> = RouteTable::standard().ordered().map(|r| r.path).collect();
        assert_eq!(order, expected);
        let stream = paths.iter().find(|p| p.path == "/posts/stream").unwrap();
        assert!(stream.directives.contains(&"proxy_buffering off;".to_owned()));
        let conf = nginx_conf(&paths, "127.0.0.11");
        assert!(conf.contains("location ~* \"^/posts/?(.*)/comments\""));
    }
}

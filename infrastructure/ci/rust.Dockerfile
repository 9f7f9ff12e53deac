# CI stand-in for rust:1.95.0-slim-bookworm (no registry can be reached here).
#
# Built by `cargo xtask images` on top of the debootstrapped debian image,
# with the machine's own Rust toolchain (the same release as the official
# image's tag) laid out as the official image lays it out: RUSTUP_HOME
# /usr/local/rustup, CARGO_HOME /usr/local/cargo, cargo and rustc on PATH.
# The machine's CA bundle replaces Debian's so that cargo inside a build can
# reach crates.io through this network's TLS-intercepting proxy.
FROM debian:bookworm-slim
# Versions come from the Debian release the stand-in imitates, not pins.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ARG TOOLCHAIN=1.95.0-x86_64-unknown-linux-gnu
COPY toolchain /usr/local/rustup/toolchains/${TOOLCHAIN}
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /usr/local/cargo/bin \
 && ln -s /usr/local/rustup/toolchains/${TOOLCHAIN}/bin/cargo /usr/local/cargo/bin/cargo \
 && ln -s /usr/local/rustup/toolchains/${TOOLCHAIN}/bin/rustc /usr/local/cargo/bin/rustc \
 && cargo --version && rustc --version

# CI stand-in for gcr.io/distroless/cc-debian13:nonroot (no registry can be
# reached here): the same contents that matter to our binaries, namely
# Debian 13's glibc, libgcc and CA bundle, /etc/passwd with nonroot (65532), a
# world-writable /tmp, no shell and no package manager, default user 65532.
# SUITE is the Debian release the distroless tag names (`cargo xtask images`
# passes it: trixie for cc-debian13); the binaries are built on bookworm, so
# they run on its newer glibc.
ARG SUITE=trixie
FROM debian:${SUITE}-slim AS rootfs
# Distroless ships Debian's CA bundle, and the services' HTTP client loads it
# at start (rustls with the platform verifier).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY make-runtime-rootfs.sh /make-runtime-rootfs.sh
RUN sh /make-runtime-rootfs.sh /out

FROM scratch
COPY --from=rootfs /out /
ENV PATH=/usr/local/bin:/usr/bin:/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /home/nonroot

# The ingress stand-in for the containerised end-to-end run: Debian's nginx,
# configured by `cargo xtask e2e-containers` from infrastructure/k8s/ingress.yaml
# the way ingress-nginx would configure itself. curl probes the services from
# inside the network, as the kubelet would. CI only; not deployed.
FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light curl \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /dev/stdout /var/log/nginx/access.log \
 && ln -sf /dev/stderr /var/log/nginx/error.log
STOPSIGNAL SIGQUIT
ENTRYPOINT ["nginx", "-g", "daemon off;"]

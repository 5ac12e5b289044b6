# syntax=docker/dockerfile:1
# kproxy's container image: docker build -t kproxy:dev .
# (see manifests/README.md). BuildKit is needed for the cache mounts; it is
# the default builder of Docker 23 and later.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---- builder: the kproxy binary, release profile, stripped ----
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crates ./crates
# Debug info is for local profiling only; the image ships a stripped binary.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin kproxy \
    && install -m 0755 target/release/kproxy /kproxy

# ---- runtime: the binary plus the kernel tools it drives ----
FROM ${RUNTIME_IMAGE}
# iptables: Debian's package ships both variants (iptables-legacy-* and
#   iptables-nft-*, ip6tables too); kproxy's --iptables-backend=auto calls
#   the suffixed binaries directly and picks the one the node uses.
# conntrack, ipset, ipvsadm: for debugging from inside the pod (kproxy
#   itself talks netlink). ca-certificates: TLS to the API server.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates conntrack iptables ipset ipvsadm \
    && rm -rf /var/lib/apt/lists/* \
    # The plain `iptables` commands (for people debugging in the pod) follow
    # Debian's alternatives; default to nft, as the Debian package does.
    && update-alternatives --set iptables /usr/sbin/iptables-nft \
    && update-alternatives --set ip6tables /usr/sbin/ip6tables-nft \
    && for b in iptables ip6tables; do for v in legacy nft; do \
         for t in "" -save -restore; do command -v "$b-$v$t" >/dev/null || exit 1; done; \
       done; done
COPY --from=builder /kproxy /usr/local/bin/kproxy
# kubeadm's DaemonSet runs /usr/local/bin/kube-proxy: with this link, swapping
# only the image of an existing kube-proxy DaemonSet is enough.
RUN ln -s kproxy /usr/local/bin/kube-proxy
ENTRYPOINT ["/usr/local/bin/kproxy"]

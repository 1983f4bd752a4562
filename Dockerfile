# syntax=docker/dockerfile:1
#
# Sentry container image.
#
#   docker build \
#     --build-arg VERSION=0.1.0 \
#     --build-arg GIT_COMMIT="$(git rev-parse HEAD)" \
#     --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
#     -t sentry:0.1.0 .
#
# (`make docker` passes all three for you.)
#
# Deploy commands usually need kubectl and/or tkn. Add them at build time:
#
#   docker build --build-arg EXTRA_TOOLS=kubectl,tkn -t sentry:0.1.0-tools .
#
# Versions are pinned by KUBECTL_VERSION and TKN_VERSION; every download is
# checked against the checksum its publisher ships next to it.

ARG RUST_VERSION=1.95

############################################################################
# Build stage
############################################################################
FROM rust:${RUST_VERSION}-bookworm AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# git2 (feature "https") links the system OpenSSL through pkg-config.
RUN apt-get update \
    && apt-get install -y --no-install-recommends pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# 1. Dependency layer: build every dependency against dummy sources, so that
#    a change to src/ does not rebuild the whole dependency tree. This layer
#    is only invalidated when Cargo.toml, Cargo.lock or build.rs change.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src \
       target/release/sentry \
       target/release/deps/sentry-* \
       target/release/deps/libsentry-* \
       target/release/.fingerprint/sentry-* \
       target/release/build/sentry-*

# 2. The real sources. The build metadata arguments are declared only here so
#    that changing them never invalidates the dependency layer above.
COPY src ./src
COPY Makefile ./

ARG VERSION=""
ARG GIT_COMMIT=""
ARG BUILD_DATE=""

# build.rs reads SENTRY_VERSION, SENTRY_GIT_COMMIT and SENTRY_BUILD_DATE and
# falls back to the crate version, `git rev-parse` (there is no .git in the
# build context, so "unknown") and the current time when one is unset.
RUN if [ -n "${VERSION}" ]; then export SENTRY_VERSION="${VERSION}"; fi \
    && if [ -n "${GIT_COMMIT}" ]; then export SENTRY_GIT_COMMIT="${GIT_COMMIT}"; fi \
    && if [ -n "${BUILD_DATE}" ]; then export SENTRY_BUILD_DATE="${BUILD_DATE}"; fi \
    && cargo build --release --locked \
    && make install DESTDIR=/out PREFIX=/usr/local INSTALL_BUILD=

############################################################################
# Runtime stage
############################################################################
FROM debian:bookworm-slim AS runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Deploy commands are shell scripts from the QA repository: they need a shell
# and the usual tools. libssl3 is the TLS library git2 links against; tini is
# PID 1 so that signals are forwarded and orphaned grandchildren are reaped.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       bash \
       ca-certificates \
       curl \
       git \
       libssl3 \
       tini \
    && rm -rf /var/lib/apt/lists/*

# Optional tools for QA pipelines: a comma-separated list of "kubectl" and
# "tkn" (empty = none). TARGETARCH is set by BuildKit (amd64 or arm64).
ARG EXTRA_TOOLS=""
ARG KUBECTL_VERSION=v1.30.6
ARG TKN_VERSION=0.39.1
ARG TARGETARCH=amd64
RUN set -eu; \
    tools=",$(echo "${EXTRA_TOOLS}" | tr -d ' '),"; \
    for t in $(echo "${tools}" | tr ',' ' '); do \
      case "${t}" in \
        kubectl|tkn) ;; \
        *) echo "EXTRA_TOOLS: unknown tool '${t}' (known: kubectl, tkn)" >&2; exit 1 ;; \
      esac; \
    done; \
    case "${tools}" in \
      *,kubectl,*) \
        curl -fsSLo /tmp/kubectl "https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${TARGETARCH}/kubectl"; \
        echo "$(curl -fsSL "https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${TARGETARCH}/kubectl.sha256")  /tmp/kubectl" | sha256sum -c -; \
        install -m 0755 /tmp/kubectl /usr/local/bin/kubectl; \
        rm -f /tmp/kubectl; \
        kubectl version --client ;; \
    esac; \
    case "${tools}" in \
      *,tkn,*) \
        case "${TARGETARCH}" in \
          amd64) tkn_arch=x86_64 ;; \
          arm64) tkn_arch=aarch64 ;; \
          *) echo "tkn: unsupported architecture ${TARGETARCH}" >&2; exit 1 ;; \
        esac; \
        tkn_tar="tkn_${TKN_VERSION}_Linux_${tkn_arch}.tar.gz"; \
        tkn_url="https://github.com/tektoncd/cli/releases/download/v${TKN_VERSION}"; \
        curl -fsSLo "/tmp/${tkn_tar}" "${tkn_url}/${tkn_tar}"; \
        tkn_sum="$(curl -fsSL "${tkn_url}/checksums.txt" | awk -v f="${tkn_tar}" '$2 == f { print $1 }')"; \
        echo "${tkn_sum}  /tmp/${tkn_tar}" | sha256sum -c -; \
        tar -xzf "/tmp/${tkn_tar}" -C /usr/local/bin tkn; \
        rm -f "/tmp/${tkn_tar}"; \
        tkn version ;; \
    esac

# Non-root user. uid/gid 65532 is the conventional "nonroot" id; the
# Kubernetes manifests and the Helm chart run the pod as this id.
RUN groupadd --system --gid 65532 sentry \
    && useradd --system --no-log-init --uid 65532 --gid 65532 \
       --home-dir /home/sentry --create-home --shell /usr/sbin/nologin sentry \
    && install -d -o 65532 -g 65532 -m 0750 /var/lib/sentry /var/cache/sentry \
    && install -d -m 0755 /etc/sentry

# The binary, its man page and bash/zsh/fish completions (`make install` in the builder).
COPY --from=builder /out/usr/local/ /usr/local/
# Smoke test: the binary starts and finds its shared libraries (libssl3).
RUN ["sentry", "--version"]

ARG VERSION=""
ARG GIT_COMMIT=""
ARG BUILD_DATE=""
LABEL org.opencontainers.image.title="sentry" \
      org.opencontainers.image.description="Watches Git repositories and runs QA deploy commands for groups of repositories when a watched branch moves" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"

ENV SENTRY_CONFIG=/etc/sentry/sentry.yaml \
    HOME=/home/sentry

USER 65532:65532
WORKDIR /var/lib/sentry

# HTTP server of `sentry watch`: /healthz, /readyz, /metrics, /webhooks/*.
EXPOSE 8080

ENTRYPOINT ["tini", "--", "sentry"]
CMD ["watch"]

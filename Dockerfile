# syntax=docker/dockerfile:1@sha256:ecfaec9ed6d810b56388c508f4121597bfbba70d41a6dfeee4d8cad5f295fc32
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
#   docker build --build-arg EXTRA_TOOLS=kubectl \
#     --build-arg KUBECTL_SHA256=<sha256 of the kubectl binary> -t sentry:0.1.0-tools .
#
# Versions are pinned by KUBECTL_VERSION and TKN_VERSION. The checksum of each
# download must be given as a build argument (KUBECTL_SHA256, TKN_SHA256), taken
# from a source you trust other than the download server (release notes, your
# artifact store): a checksum fetched from the same server as the file proves
# nothing when that server is compromised. Without it the build fails.
#
# Base images are pinned by digest (the digests docker.io served for
# rust:1.95-bookworm and debian:bookworm-slim on 2026-09-27). To move them:
#   docker buildx imagetools inspect docker.io/library/debian:bookworm-slim
# and update the ARGs below (or pass --build-arg RUST_IMAGE=/RUNTIME_IMAGE=).

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251

############################################################################
# Build stage
############################################################################
FROM ${RUST_IMAGE} AS builder

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
FROM ${RUNTIME_IMAGE} AS runtime

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
ARG KUBECTL_SHA256=""
ARG TKN_VERSION=0.39.1
ARG TKN_SHA256=""
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
        if [ -z "${KUBECTL_SHA256}" ]; then echo "kubectl: pass --build-arg KUBECTL_SHA256=<sha256 from a source you trust>" >&2; exit 1; fi; \
        curl -fsSLo /tmp/kubectl "https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${TARGETARCH}/kubectl"; \
        echo "${KUBECTL_SHA256}  /tmp/kubectl" | sha256sum -c -; \
        install -m 0755 /tmp/kubectl /usr/local/bin/kubectl; \
        rm -f /tmp/kubectl; \
        kubectl version --client ;; \
    esac; \
    case "${tools}" in \
      *,tkn,*) \
        if [ -z "${TKN_SHA256}" ]; then echo "tkn: pass --build-arg TKN_SHA256=<sha256 from a source you trust>" >&2; exit 1; fi; \
        case "${TARGETARCH}" in \
          amd64) tkn_arch=x86_64 ;; \
          arm64) tkn_arch=aarch64 ;; \
          *) echo "tkn: unsupported architecture ${TARGETARCH}" >&2; exit 1 ;; \
        esac; \
        tkn_tar="tkn_${TKN_VERSION}_Linux_${tkn_arch}.tar.gz"; \
        curl -fsSLo "/tmp/${tkn_tar}" "https://github.com/tektoncd/cli/releases/download/v${TKN_VERSION}/${tkn_tar}"; \
        echo "${TKN_SHA256}  /tmp/${tkn_tar}" | sha256sum -c -; \
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
ARG RUNTIME_IMAGE
LABEL org.opencontainers.image.title="sentry" \
      org.opencontainers.image.description="Watches Git repositories and runs QA deploy commands for groups of repositories when a watched branch moves" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${RUNTIME_IMAGE}"

ENV SENTRY_CONFIG=/etc/sentry/sentry.yaml \
    HOME=/home/sentry

USER 65532:65532
WORKDIR /var/lib/sentry

# HTTP server of `sentry watch`: /healthz, /readyz, /metrics, /webhooks/*.
EXPOSE 8080

ENTRYPOINT ["tini", "--", "sentry"]
CMD ["watch"]

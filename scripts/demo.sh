#!/usr/bin/env bash
# The offline demo: no accounts, no network. It creates two watched repositories and a QA
# repository under a temporary directory, starts `sentry watch` on them, pushes a commit,
# and lets you watch Sentry detect the move and deploy, on its log and on its dashboard
# (the URL is printed). Then it stops Sentry cleanly — or, with DEMO_SERVE=1
# (`make demo-serve`), keeps it and the dashboard up until Ctrl-C. DEMO_PORT picks the
# port (default: any free one; 8088 with DEMO_SERVE=1).
set -euo pipefail

SENTRY=${SENTRY_BIN:-target/debug/sentry}
[ -x "$SENTRY" ] || { echo "demo: $SENTRY not found; run 'cargo build' first" >&2; exit 2; }
SENTRY=$(cd "$(dirname "$SENTRY")" && pwd)/$(basename "$SENTRY")

if [ -n "${DEMO_SERVE:-}" ]; then port=${DEMO_PORT:-8088}; else port=${DEMO_PORT:-0}; fi
demo=$(mktemp -d "${TMPDIR:-/tmp}/sentry-demo.XXXXXX")
sentry_pid=
cleanup() {
  if [ -n "$sentry_pid" ] && kill -0 "$sentry_pid" 2>/dev/null; then kill -TERM "$sentry_pid"; wait "$sentry_pid" || true; fi
  rm -rf "$demo"
}
trap cleanup EXIT

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
g() { git -c user.name=Demo -c user.email=demo@example.invalid -c init.defaultBranch=main -c commit.gpgsign=false "$@"; }

say "Creating repositories under $demo"
for repo in blueprint-a blueprint-b; do
  mkdir -p "$demo/$repo"
  (cd "$demo/$repo" && g init -q && echo "# $repo" > README.md && g add . && g commit -qm "initial")
done
mkdir -p "$demo/qa"
cat > "$demo/qa/deploy.sh" <<'SCRIPT'
#!/bin/sh
# A QA pipeline stand-in: the change arrives in SENTRY_* variables.
echo "deploying $SENTRY_REPO_NAME at $SENTRY_BRANCH@$(echo "$SENTRY_COMMIT_SHA" | cut -c1-8) (was ${SENTRY_PREVIOUS_SHA:-nothing}) for group $SENTRY_GROUP"
echo "run $SENTRY_RUN_ID, triggered by $SENTRY_TRIGGER; changes listed in $(basename "$SENTRY_CHANGES_FILE")"
sleep 1
echo "tests passed"
SCRIPT
chmod +x "$demo/qa/deploy.sh"
(cd "$demo/qa" && g init -q && g add . && g commit -qm "QA pipeline")

cat > "$demo/sentry.yaml" <<YAML
polling_interval: 1s
state_file: $demo/state/state.json
work_dir: $demo/work
audit_log: $demo/state/audit.jsonl
shutdown_grace: 5s
server:
  listen: "127.0.0.1:$port"
groups:
  demo:
    execution_strategy: parallel
    max_parallel: 2
    continue_on_error: true
    global_timeout: 5m
repositories:
YAML
for repo in blueprint-a blueprint-b; do
  cat >> "$demo/sentry.yaml" <<YAML
  - name: $repo
    group: demo
    monitor:
      repo_url: file://$demo/$repo
      branches: [main]
      repo_type: git
    deploy:
      qa_repo_url: file://$demo/qa
      qa_repo_branch: main
      commands: ["./deploy.sh"]
YAML
done

say "Validating the configuration"
"$SENTRY" -c "$demo/sentry.yaml" validate

say "Starting: sentry watch (polling every second)"
"$SENTRY" -c "$demo/sentry.yaml" watch 2> >(tee "$demo/watch.log" >&2) &
sentry_pid=$!

wait_for() { # wait_for SECONDS COMMAND...: until the command succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "demo: timed out waiting for: $*" >&2; exit 1; }
    sleep 0.2
  done
}
wait_for 30 grep -q "http server listening on" "$demo/watch.log"
url="http://$(sed -n 's/.*http server listening on \([0-9.:]*\).*/\1/p' "$demo/watch.log" | head -1)"
say "Dashboard: $url/  (status API: $url/api/v1/status, events: $url/api/v1/events)"
wait_for 30 test -s "$demo/state/state.json"

say "Pushing a commit to blueprint-a"
(cd "$demo/blueprint-a" && echo "change" >> README.md && g commit -qam "a change")
new_sha=$(cd "$demo/blueprint-a" && git rev-parse HEAD)
wait_for 60 grep -q "$new_sha" "$demo/state/state.json"

say "What Sentry recorded (sentry status)"
"$SENTRY" -c "$demo/sentry.yaml" status

say "The live view from the running watch (sentry status --server $url)"
"$SENTRY" status --server "$url"

if [ -n "${DEMO_SERVE:-}" ]; then
  say "Dashboard: $url/ — commit to $demo/blueprint-a or blueprint-b to see a deploy appear; Ctrl-C stops"
  trap 'echo' INT
  wait "$sentry_pid" || true
  sentry_pid=
  exit 0
fi

say "Stopping Sentry (SIGTERM)"
kill -TERM "$sentry_pid"
wait "$sentry_pid"
sentry_pid=
say "Done: Sentry saw the move, deployed blueprint-a with the QA pipeline, and stopped cleanly."

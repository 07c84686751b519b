#!/usr/bin/env bash
# A CI pipeline around the portal: train -> upload -> wait for the scan -> deploy to dev -> smoke test ->
# request promotion to stage -> wait for an approver. It reads only the CLI's JSON (jq, else python3) and its exit
# codes:
#   0 done · 1 refused or failed · 2 usage · 3 waiting on a person (held for trust, a blocking gate, approvals)
#   4 timed out while the work goes on
# Needs PORTAL_URL and PORTAL_TOKEN (a data scientist's token). Optional: MODEL (ci-demo), TEAM (demo),
# WAIT_SECONDS (600), APPROVAL_WAIT_SECONDS (3600), WORK_DIR (a fresh temporary folder), PYTHON (python3 with
# scikit-learn and joblib, for the training step).
# The pipeline ends with the portal's exit code: 0 once stage serves the new version, 3 while the approvers have
# not decided (re-run `portal --json status --promotion ID` later), 1 if the scan, a deployment or the smoke test
# failed or an approver rejected.
set -euo pipefail

MODEL="${MODEL:-ci-demo}"
TEAM="${TEAM:-demo}"
WAIT_SECONDS="${WAIT_SECONDS:-600}"
APPROVAL_WAIT_SECONDS="${APPROVAL_WAIT_SECONDS:-3600}"
WORK_DIR="${WORK_DIR:-$(mktemp -d)}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$WORK_DIR"

log() { echo "ci: $*" >&2; }

# field JSON PATH: one value from the CLI's JSON answer (jq when installed, else Python).
field() {
  if command -v jq >/dev/null 2>&1; then
    jq -r "$2" <<<"$1"
  else
    "$PYTHON" -c 'import json, sys
value = json.loads(sys.argv[1])
for part in sys.argv[2].lstrip(".").split("."):
    value = value[int(part)] if isinstance(value, list) else value[part]
print(value)' "$1" "$2"
  fi
}

# run CMD...: the CLI with --json; its JSON lands in $OUT and its exit code in $RC (set -e does not stop here).
run() {
  set +e
  OUT="$(portal --json "$@")"
  RC=$?
  set -e
}

# 1. Train (here: scikit-learn's bundled breast-cancer data) and keep a few rows for the smoke test.
log "training"
"$PYTHON" - "$WORK_DIR" <<'PY'
import sys
from pathlib import Path

import joblib
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression

out = Path(sys.argv[1])
X, y = load_breast_cancer(return_X_y=True, as_frame=True)
model = LogisticRegression(max_iter=5000).fit(X, y)
joblib.dump(model, out / "model.joblib")
X.sample(200, random_state=0).to_csv(out / "reference.csv", index=False)
X.head(5).to_csv(out / "smoke.csv", index=False)
(out / "metrics.json").write_text('{"accuracy": %.6f}' % model.score(X, y))
PY

# 2. Register the model the first time (status answers 1 with a 404 when it does not exist yet).
run status "$MODEL"
if [ "$RC" -ne 0 ]; then
  if [ "$(field "$OUT" .error.status)" != "404" ]; then log "$(field "$OUT" .error.message)"; exit "$RC"; fi
  run register "$MODEL" --team "$TEAM" --description "trained by CI"
  [ "$RC" -eq 0 ] || { log "register refused: $(field "$OUT" .error.message)"; exit "$RC"; }
fi

# 3. Upload and wait for the sandboxed scan: 3 means an approver must decide on trust first.
run upload "$MODEL" "$WORK_DIR/model.joblib" --reference "$WORK_DIR/reference.csv" \
  --metrics "$(cat "$WORK_DIR/metrics.json")" --git-commit "${GIT_COMMIT:-0000000}" --wait --wait-seconds "$WAIT_SECONDS"
case "$RC" in
  0) ;;
  3) log "v$(field "$OUT" .version.number) is held for an approver's trust decision"; exit 3 ;;
  *) log "upload: $(field "$OUT" .error.message)"; exit "$RC" ;;
esac
VERSION="$(field "$OUT" .version.number)"
log "$MODEL v$VERSION is ready (sha256 $(field "$OUT" .version.sha256))"

# 4. Deploy to dev and wait until it is live.
run deploy "$MODEL" "$VERSION" --env dev --wait --wait-seconds "$WAIT_SECONDS"
[ "$RC" -eq 0 ] || { log "deploy: $(field "$OUT" .error.message)"; exit "$RC"; }
log "dev serves v$VERSION"

# 5. Smoke test: five rows scored by dev, by the version just deployed.
run predict "$MODEL" dev "$WORK_DIR/smoke.csv"
[ "$RC" -eq 0 ] || { log "smoke test: $(field "$OUT" .error.message)"; exit "$RC"; }
[ "$(field "$OUT" .model_version)" = "$VERSION" ] || { log "dev answered with another version"; exit 1; }
log "smoke test passed: $(field "$OUT" .predictions)"

# 6. Ask for stage, and wait for the approvers: 3 = still waiting on a person, or a gate blocks.
run promote "$MODEL" "$VERSION" --to stage --reason "CI: smoke test passed on dev" \
  --wait --wait-seconds "$APPROVAL_WAIT_SECONDS"
PROMOTION="$(field "$OUT" .promotion.id 2>/dev/null || echo "?")"
case "$RC" in
  0) log "stage serves v$VERSION (promotion $PROMOTION)" ;;
  3) log "promotion $PROMOTION is waiting for an approver ($(field "$OUT" .outcome)); follow it with: portal --json status --promotion $PROMOTION" ;;
  4) log "promotion $PROMOTION approved, still deploying" ;;
  *) log "promotion: $(field "$OUT" .error.message)" ;;
esac
echo "$OUT"
exit "$RC"

#!/usr/bin/env bash
# The second command: run the tests (installs first if needed).
#   ./test.sh          every tier CI runs: unit, then integration and e2e (real MLflow, Prefect, LM, index)
#   ./test.sh unit     the fast unit tier only
#   ./test.sh fuzz     the fuzz tier only (Hypothesis property tests of the loaders, the feedback store and prompt
#                      rendering; schemathesis against a live cadre serve); `all` runs it too
#                      (CADRE_FUZZ_SCALE=20 multiplies the property tests' example counts for a deeper run)
# Extra arguments go to pytest, e.g. ./test.sh unit -k config
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/cadre ] || ./setup.sh --no-demo
tier="${1:-all}"
[ $# -gt 0 ] && shift
case "$tier" in
  unit) exec .venv/bin/python -m pytest tests/unit "$@" ;;
  fuzz) exec .venv/bin/python -m pytest -m fuzz tests/fuzz "$@" ;;
  all)  exec .venv/bin/python -m pytest -m "not slow" --durations=40 tests "$@" ;;
  *)    echo "usage: ./test.sh [unit|fuzz|all] [pytest args]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Set up (once) a local virtual environment in .venv, then run `demo` or `test`.
# Usage: scripts/run.sh demo [diffalign demo options] | scripts/run.sh test [pytest options] | scripts/run.sh lint
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV ..."
  "$PYTHON" -m venv "$VENV"
fi
# Re-install only when the dependency list changed.
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
stamp="$VENV/.diffalign-installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing dependencies into $VENV (torch first, as the CPU build torch==2.13.0) ..."
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi

export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
cmd=${1:-}
shift || true
case "$cmd" in
  demo) exec "$VENV/bin/diffalign" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  lint) exec "$VENV/bin/ruff" check src tests benchmarks scripts "$@" ;;
  *) echo "usage: scripts/run.sh demo|test|lint [options]" >&2; exit 2 ;;
esac

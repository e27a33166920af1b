#!/usr/bin/env bash
# Rewrites constraints.txt from a fresh, unconstrained install of `.[test]` (a superset of `.[eval]`), then runs the
# tests against it. Review the diff (a new transformers, say) and commit it only if the tests pass.
#
# Usage: bash .ci/refresh-constraints.sh   (from any directory; builds its venv in a temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(mktemp -d)/venv
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e '.[test]'
head -n 4 constraints.txt > constraints.txt.new
# the CPU build's local label (+cpu) is left out so the pin also matches where pip serves another build
"$VENV/bin/pip" freeze --exclude-editable | sed 's/+cpu$//' >> constraints.txt.new
mv constraints.txt.new constraints.txt
git --no-pager diff --stat constraints.txt || true
"$VENV/bin/python" -m pytest -q

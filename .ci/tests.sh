#!/usr/bin/env bash
# Runs both test suites to the end and fails when either failed: the project venv's (python -m pytest, with the
# active venv's python) and the one that imports SGLang 0.5.17 in its own venv (.ci/sglang-tests.sh). A failure in
# the first must not hide the second.
#
# Usage: bash .ci/tests.sh   (from any directory, inside the project venv)
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q
project=$?
bash .ci/sglang-tests.sh
sglang=$?
echo "tests: project suite exit $project, SGLang suite exit $sglang"
[ "$project" -eq 0 ] && [ "$sglang" -eq 0 ]

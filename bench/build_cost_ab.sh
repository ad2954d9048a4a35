#!/usr/bin/env bash
# Before/after of bench/build_cost.py in one run: the result objects of the demo
# studies built by a git revision (default: the branch point from main) and by the
# working tree, alternately, then compared attribute by attribute.
#   nice bash bench/build_cost_ab.sh [REV] [--repeat N]
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:-$(git merge-base HEAD main)}
shift || true
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/old"
git archive "$rev" | tar -x -C "$tmp/old"
cp bench/build_cost.py "$tmp/old/bench/"
echo "== before ($rev)"
.venv/bin/python "$tmp/old/bench/build_cost.py" --dump "$tmp/dump" "$@"
echo "== after (working tree)"
.venv/bin/python bench/build_cost.py --compare "$tmp/dump" "$@"

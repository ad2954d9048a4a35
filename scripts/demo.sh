#!/usr/bin/env bash
# The demo on a fresh machine: install what is missing, start a real Orthanc with an
# auto-routing rule and the node, push a real radiograph study into Orthanc with
# DCMTK storescu, wait for the results, and show where they are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/fracture-node demo "$@"

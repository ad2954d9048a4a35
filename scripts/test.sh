#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs what is missing
# (scripts/bootstrap.sh), then pytest against the real Orthanc, DCMTK and data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Install everything fracture-node needs on a fresh Debian 12 machine, idempotently:
# Debian packages (Orthanc, DCMTK, dicom3tools, poppler for PDF rendering, OpenJPEG,
# openssl for the TLS tests, iproute2's ss for the load benchmark, chromium for the
# status console's browser test) and a
# virtual environment in .venv with the project and its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=0
# By absolute path: an activated .venv puts pynetdicom's own storescu/storescp/echoscu
# on the PATH, which must not pass for DCMTK's.
for tool in /usr/sbin/Orthanc /usr/bin/storescu /usr/bin/storescp /usr/bin/echoscu \
            /usr/bin/dciodvfy /usr/bin/pdftoppm /usr/bin/openssl /usr/bin/chromium; do
  [ -x "$tool" ] || need_apt=1
done
# libopenjp2: JPEG 2000 decoding at a reduced resolution level (pipeline/decode.py)
ldconfig -p 2>/dev/null | grep -q 'libopenjp2.so.7' || need_apt=1
if [ "$need_apt" = 1 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    orthanc dcmtk dicom3tools poppler-utils libopenjp2-7 openssl iproute2 chromium >/dev/null
  # Debian starts an Orthanc service on install; the project runs its own Orthanc.
  $SUDO service orthanc stop >/dev/null 2>&1 || true
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi

#!/usr/bin/env bash
# Install everything fracture-node needs on a fresh Debian 12 machine, idempotently:
# Debian packages (Orthanc, DCMTK, dicom3tools, PixelMed + a JRE for the second SR
# validator, poppler for PDF rendering, OpenJPEG, openssl for the TLS tests, iproute2's
# ss for the load benchmark, PostgreSQL for the shared job queue of several nodes,
# chromium for the browser tests) and a
# virtual environment in .venv with the project and its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=0
# By absolute path: an activated .venv puts pynetdicom's own storescu/storescp/echoscu
# on the PATH, which must not pass for DCMTK's.
for tool in /usr/sbin/Orthanc /usr/bin/storescu /usr/bin/storescp /usr/bin/echoscu \
            /usr/bin/dciodvfy /usr/bin/pdftoppm /usr/bin/openssl /usr/bin/chromium /usr/bin/java \
            /usr/bin/npm; do
  [ -x "$tool" ] || need_apt=1
done
# PixelMed's DicomSRValidator: the second validator of every SR and KOS (tests)
[ -f /usr/share/java/pixelmed.jar ] || need_apt=1
# libopenjp2: JPEG 2000 decoding at a reduced resolution level (pipeline/decode.py)
ldconfig -p 2>/dev/null | grep -q 'libopenjp2.so.7' || need_apt=1
# PostgreSQL: the tests start their own server (initdb + pg_ctl) as the postgres user
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need_apt=1
# Orthanc's DICOMweb plugin: what OHIF reads (orthanc-test/ohif.py, tests/test_ohif.py)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt=1
if [ "$need_apt" = 1 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  packages="orthanc dcmtk dicom3tools poppler-utils libopenjp2-7 openssl iproute2 chromium
    libpixelmed-java default-jre-headless postgresql orthanc-dicomweb"
  # npm only where there is none: a NodeSource nodejs ships its own npm and conflicts
  # with Debian's package of it.
  command -v npm >/dev/null || packages="$packages npm"
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    $packages >/dev/null
  # Debian starts an Orthanc service on install; the project runs its own Orthanc.
  $SUDO service orthanc stop >/dev/null 2>&1 || true
  # Likewise PostgreSQL: the tests run their own server in a temporary directory.
  $SUDO service postgresql stop >/dev/null 2>&1 || true
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

# OHIF v3's built viewer (npm @ohif/app, its dist/), pinned and checked, cached outside git
OHIF_VERSION=3.13.2
OHIF_INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
ohif_dir="${HOME}/.cache/fracture-node/ohif/${OHIF_VERSION}"
if [ ! -f "${ohif_dir}/package/dist/index.html" ]; then
  mkdir -p "$ohif_dir"
  tarball="${ohif_dir}/ohif-app-${OHIF_VERSION}.tgz"
  if [ ! -f "$tarball" ]; then
    (cd "$ohif_dir" && npm pack --silent "@ohif/app@${OHIF_VERSION}" >/dev/null)
  fi
  actual="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
  if [ "$actual" != "$OHIF_INTEGRITY" ]; then
    echo "OHIF tarball integrity mismatch: $actual" >&2
    rm -f "$tarball"
    exit 1
  fi
  tar -xzf "$tarball" -C "$ohif_dir" package/dist
fi

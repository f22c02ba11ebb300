#!/usr/bin/env bash
# Install what the tests need (Debian dcmtk, a virtualenv with the project and its
# dev extras) and run the test suite. Safe to run again: each step is skipped when
# already done. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use, installed in one apt-get run when any is missing:
# - dcmtk: storescu/echoscu/findscu/movescu/getscu/storescp are the DICOM peers of the e2e tests;
# - chromium: the browser tests drive /usr/bin/chromium (no browser is ever downloaded);
# - libpango, harfbuzz-subset, DejaVu fonts: WeasyPrint renders the consult report PDF (Vietnamese
#   glyphs), poppler-utils (pdftotext, pdftoppm) reads it back;
# - orthanc + orthanc-dicomweb: the PACS the delivery tests send to, and the DICOMweb client of
#   our /dicomweb (tests/orthanc_helpers.py starts it as a plain process);
# - dicom3tools: dciodvfy checks the DICOM objects we make (AI SR, GSPS, consult SR).
# A policy-rc.d that exits 101 keeps apt-get from starting any service (Orthanc's, PostgreSQL's) at install.
# - postgresql: the second pytest pass runs on a throwaway cluster (scripts/pg-test-cluster.sh);
#   XRAY_TRIAGE_PG_TESTS=0 skips that pass and this package.
DEBIAN_PACKAGES="dcmtk chromium fonts-dejavu-core libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0
  poppler-utils orthanc orthanc-dicomweb dicom3tools"
if [ "${XRAY_TRIAGE_PG_TESTS:-1}" != "0" ]; then DEBIAN_PACKAGES="$DEBIAN_PACKAGES postgresql"; fi
# shellcheck disable=SC2086
if ! dpkg -s $DEBIAN_PACKAGES >/dev/null 2>&1; then
  echo "== installing Debian packages: $(echo $DEBIAN_PACKAGES) (no service is started) =="
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  POLICY_MADE=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    POLICY_MADE=1
  fi
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $DEBIAN_PACKAGES >/dev/null
  if [ -n "$POLICY_MADE" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
fi

# The OHIF viewer test serves the prebuilt viewer from npm's @ohif/app (its dist/ folder),
# fetched here once into test-artifacts/ohif (git-ignored); the server never downloads it.
OHIF_VERSION=3.13.2
if [ ! -f "test-artifacts/ohif/$OHIF_VERSION/package/dist/index.html" ]; then
  if ! command -v npm >/dev/null; then
    echo "== installing nodejs and npm (Debian packages) =="
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
  fi
  echo "== fetching @ohif/app@$OHIF_VERSION (npm pack) into test-artifacts/ohif =="
  mkdir -p "test-artifacts/ohif/$OHIF_VERSION"
  (cd "test-artifacts/ohif/$OHIF_VERSION" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null \
    && tar xzf "ohif-app-$OHIF_VERSION.tgz" && rm "ohif-app-$OHIF_VERSION.tgz")
fi
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv =="
  python3 -m venv .venv
fi
echo "== installing xray-triage[dev] into .venv =="
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"

echo "== ruff =="
.venv/bin/ruff check .

# Dependencies point one way: the contracts are [tool.importlinter] in pyproject.toml.
echo "== import contracts (lint-imports) =="
.venv/bin/lint-imports

echo "== pytest (SQLite) =="
.venv/bin/python -m pytest "$@"

# The same suite on PostgreSQL: a throwaway cluster in a temporary directory, run as a non-root
# user; each test gets its own database (tests/db_helpers.py). XRAY_TRIAGE_PG_TESTS=0 skips it.
if [ "${XRAY_TRIAGE_PG_TESTS:-1}" != "0" ]; then
  echo "== pytest (PostgreSQL) =="
  eval "$(scripts/pg-test-cluster.sh start)"
  trap 'scripts/pg-test-cluster.sh stop "$PG_TEST_DIR"' EXIT
  .venv/bin/python -m pytest "$@"
  scripts/pg-test-cluster.sh stop "$PG_TEST_DIR"; trap - EXIT
  unset XRAY_TRIAGE_TEST_DATABASE_URL
fi

# The model-export parity test needs torch + torchxrayvision, which the server never
# needs: it runs in its own virtualenv. XRAY_TRIAGE_EXPORT_TESTS=0 skips this stage.
if [ "${XRAY_TRIAGE_EXPORT_TESTS:-1}" != "0" ]; then
  echo "== export tests (torch, torchxrayvision in .venv-export) =="
  [ -x .venv-export/bin/python ] || python3 -m venv .venv-export
  .venv-export/bin/python -m pip install -q --disable-pip-version-check -e ".[export,dev]"
  .venv-export/bin/python -m pytest "$@" tests/unit/test_export_torchxrayvision.py
fi

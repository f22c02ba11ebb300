#!/usr/bin/env bash
# Install what the tests need (Debian dcmtk, a virtualenv with the project and its
# dev extras) and run the test suite. Safe to run again: each step is skipped when
# already done. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: dcmtk (storescu/echoscu send DICOM in the end-to-end tests) and
# chromium (the browser tests drive /usr/bin/chromium; no browser is ever downloaded),
# libpango (WeasyPrint renders the consult report PDF with it), poppler-utils (pdftotext and
# pdftoppm read the report back in the tests) and DejaVu fonts (Vietnamese glyphs).
if ! command -v storescu >/dev/null || ! command -v dcmodify >/dev/null || [ ! -x /usr/bin/chromium ] \
  || ! dpkg -s libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 poppler-utils >/dev/null 2>&1; then
  echo "== installing dcmtk, chromium, pango and poppler-utils (Debian packages) =="
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dcmtk chromium fonts-dejavu-core \
    libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 poppler-utils >/dev/null
fi
# PostgreSQL 15 (the second pytest pass runs on a throwaway cluster, scripts/pg-test-cluster.sh).
# policy-rc.d exiting 101 keeps Debian from starting the system cluster as a service.
if [ "${XRAY_TRIAGE_PG_TESTS:-1}" != "0" ] && [ ! -x /usr/lib/postgresql/15/bin/initdb ]; then
  echo "== installing postgresql (Debian package) =="
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null; $SUDO chmod +x /usr/sbin/policy-rc.d
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
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

#!/usr/bin/env bash
# Install what the tests need (Debian dcmtk, a virtualenv with the project and its
# dev extras) and run the test suite. Safe to run again: each step is skipped when
# already done. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Delivery to PACS is tested against Debian's orthanc, started by the tests as a plain process
# (tests/orthanc_helpers.py); the policy-rc.d keeps its service from starting at install.
if ! command -v Orthanc >/dev/null && [ ! -x /usr/sbin/Orthanc ]; then
  echo "== installing orthanc (Debian package; its service is not started) =="
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  ORTHANC_POLICY_MADE=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    ORTHANC_POLICY_MADE=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq orthanc >/dev/null
  if [ -n "$ORTHANC_POLICY_MADE" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
fi

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

# Orthanc and its DICOMweb plugin: the DICOMweb test (tests/e2e/test_dicomweb_e2e.py) runs Orthanc
# as a plain process with our /dicomweb/ as its DICOMweb server. A policy-rc.d that exits 101
# keeps apt-get from starting Orthanc as a service during the install.
if [ ! -x /usr/sbin/Orthanc ] || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
  echo "== installing orthanc and orthanc-dicomweb (Debian packages, no service started) =="
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  POLICY_RC_CREATED=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    POLICY_RC_CREATED=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null
  if [ -n "$POLICY_RC_CREATED" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
fi

# dicom3tools: dciodvfy checks the DICOM objects we make (AI SR, GSPS, consult SR) in the tests
# (dcmtk's dsrdump reads the SRs back). No service may start during the install (policy-rc.d).
if ! command -v dciodvfy >/dev/null; then
  echo "== installing dicom3tools (Debian package) =="
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  POLICY_MADE=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null; $SUDO chmod +x /usr/sbin/policy-rc.d
    POLICY_MADE=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dicom3tools >/dev/null
  [ -n "$POLICY_MADE" ] && $SUDO rm -f /usr/sbin/policy-rc.d
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

echo "== pytest =="
.venv/bin/python -m pytest "$@"

# The model-export parity test needs torch + torchxrayvision, which the server never
# needs: it runs in its own virtualenv. XRAY_TRIAGE_EXPORT_TESTS=0 skips this stage.
if [ "${XRAY_TRIAGE_EXPORT_TESTS:-1}" != "0" ]; then
  echo "== export tests (torch, torchxrayvision in .venv-export) =="
  [ -x .venv-export/bin/python ] || python3 -m venv .venv-export
  .venv-export/bin/python -m pip install -q --disable-pip-version-check -e ".[export,dev]"
  .venv-export/bin/python -m pytest "$@" tests/unit/test_export_torchxrayvision.py
fi

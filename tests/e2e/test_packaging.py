"""A regular (non-editable) install runs the server and finds the shipped model, from anywhere.

The project is built into a wheel from a copy of the checkout and installed into a fresh
virtualenv in a temporary directory outside the checkout; from there (working directory
outside the checkout too) ``xray-triage models verify`` and ``models list`` must find the
shipped model inside that virtualenv, and ``xray-triage serve`` must answer ``/healthz``,
the login page and a C-ECHO, then stop cleanly on SIGTERM.

Keeping it fast on CI (2 cores, a local package mirror), without downloading any
dependency again:

* the wheel is built by this interpreter without build isolation
  (``pip wheel --no-deps --no-build-isolation``; setuptools and wheel are in the ``dev``
  extra) and installed with ``pip install --no-deps``;
* the dependencies (pydicom, onnxruntime, FastAPI, ...) are made importable by a ``.pth``
  file in the new virtualenv's site-packages whose only lines are the site-packages
  directories of the virtualenv running the tests. ``site`` appends such a plain path
  line to ``sys.path`` but does not process the ``.pth`` files *inside* that directory,
  so the project's editable-install hook (``__editable__.xray_triage-*.pth`` and its
  finder) never runs there and the checkout stays invisible; the test checks that
  (``xray_triage.__file__`` and ``model_tools.__file__`` are in the new virtualenv, no
  ``sys.path`` entry and no import hook points into the checkout).

The checkout is copied first (without virtualenvs, build output and caches) because an
in-tree setuptools build reuses ``build/``, where files deleted from the checkout linger.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from e2e_helpers import PROJECT_ROOT, Server, http, server_env

pytestmark = pytest.mark.slow

PIP_TIMEOUT_S = 600
CLI_TIMEOUT_S = 120
COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "test-artifacts",
    "xray-triage-data",
)

_PROBE = """
import json, sys
import model_tools, xray_triage
from xray_triage.settings import DEFAULT_MODEL_DIR
print(json.dumps({
    "xray_triage": xray_triage.__file__,
    "model_tools": model_tools.__file__,
    "model_dir": str(DEFAULT_MODEL_DIR),
    "sys_path": sys.path,
    # import hooks are classes or instances: name each by its own module
    "meta_path": [f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__qualname__)}" for f in sys.meta_path],
}))
"""


def _run(
    args: list[str | Path], *, cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, args))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


def _inside(path: str | Path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fresh virtualenv (outside the checkout) with the project installed from a wheel."""
    root = tmp_path_factory.mktemp("packaging")
    assert not _inside(root, PROJECT_ROOT), f"{root} must be outside the checkout {PROJECT_ROOT}"
    env = server_env({"PYTHONPATH": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})  # empty = unset
    src, wheels, venv = root / "src", root / "wheels", root / "venv"
    shutil.copytree(PROJECT_ROOT, src, ignore=COPY_IGNORE)
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, src],
        cwd=root,
        env=env,
        timeout=PIP_TIMEOUT_S,
    )
    (wheel,) = wheels.glob("xray_triage-*.whl")
    _run([sys.executable, "-m", "venv", venv], cwd=root, env=env, timeout=PIP_TIMEOUT_S)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "--no-deps", wheel], cwd=root, env=env, timeout=PIP_TIMEOUT_S)
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=root,
            env=env,
            timeout=60,
        ).stdout.strip()
    )
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "zz-test-dependencies.pth").write_text("".join(f"{path}\n" for path in ours), encoding="utf-8")
    shutil.rmtree(src)  # nothing of the project is left on disk but the installed copy
    return {"root": root, "venv": venv, "python": python, "cli": venv / "bin" / "xray-triage", "env": env}


def test_the_installed_copy_is_imported_not_the_checkout(installed: dict) -> None:
    probe = json.loads(
        _run(
            [installed["python"], "-c", _PROBE],
            cwd=installed["root"],
            env=installed["env"],
            timeout=CLI_TIMEOUT_S,
        ).stdout
    )
    venv = installed["venv"]
    assert _inside(probe["xray_triage"], venv), probe["xray_triage"]
    assert _inside(probe["model_tools"], venv), probe["model_tools"]
    assert _inside(probe["model_dir"], venv), probe["model_dir"]
    assert (Path(probe["model_dir"]) / "model.onnx").is_file()
    in_checkout = [
        p for p in probe["sys_path"] if p and _inside(p, PROJECT_ROOT) and not _inside(p, Path(sys.prefix))
    ]
    assert not in_checkout, f"sys.path reaches into the checkout: {in_checkout}"
    assert not [m for m in probe["meta_path"] if "__editable__" in m], probe["meta_path"]


def test_models_verify_and_list_find_the_packaged_model(installed: dict) -> None:
    run = [installed["cli"], "models"]
    verify = _run([*run, "verify"], cwd=installed["root"], env=installed["env"], timeout=CLI_TIMEOUT_S)
    assert verify.stdout.startswith("ok: xray-triage-demo@0.1.0 sha256 "), verify.stdout
    listing = _run([*run, "list"], cwd=installed["root"], env=installed["env"], timeout=CLI_TIMEOUT_S)
    card_path = listing.stdout.split()[1]
    assert _inside(card_path, installed["venv"]) and card_path.endswith("model.toml"), listing.stdout
    assert "int8" in listing.stdout and "fp16" in listing.stdout, listing.stdout  # the variants ship too


def test_export_command_is_registered_and_says_what_to_install(installed: dict) -> None:
    """Through the entry point; torch is absent from the test environment, so it stops with the hint."""
    helped = _run(
        [installed["cli"], "models", "export-torchxrayvision", "--help"],
        cwd=installed["root"],
        env=installed["env"],
        timeout=CLI_TIMEOUT_S,
    )
    assert "--weights" in helped.stdout
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch is installed here: the missing-extra message cannot be seen")
    proc = subprocess.run(
        [
            installed["cli"],
            "models",
            "export-torchxrayvision",
            "--weights",
            "x",
            "--out",
            installed["root"] / "out",
        ],
        cwd=installed["root"],
        env=installed["env"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pip install -e '.[export]'" in proc.stderr


def test_serve_answers_from_the_installed_package(installed: dict, dcmtk: None) -> None:
    server = Server(
        root=installed["root"] / "serve",
        model_dir=None,  # the default: the packaged model
        command=[str(installed["cli"])],
        env_extra={"PYTHONPATH": "", "XRAY_TRIAGE_ACCEPT_UNKNOWN_STATIONS": "true"},
    )
    server.root.mkdir()
    server.start()  # until /healthz answers 200 and a C-ECHO succeeds
    try:
        health = http.get(server.url("/healthz"))
        assert health.status_code == 200, health.text
        login = http.get(server.url("/login"))  # templates and locales are package data too
        assert login.status_code == 200 and "<form" in login.text, login.text[:500]
        assert http.get(server.url("/static/app.css")).status_code == 200
    finally:
        server.stop_cleanly()

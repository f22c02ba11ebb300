"""Model tooling apart from the server: one card writer, commands through entry points.

* ``model_tools.card_toml`` is the only card writer: fed the tables of the shipped cards it
  writes them back byte for byte, with ``models/train.py``'s header and comments and
  ``models/quantize.py``'s variant card layout;
* the runtime packages never import ``model_tools``;
* ``xray-triage`` finds extra subcommands through the ``xray_triage.commands`` entry-point
  group (a real distribution on ``PYTHONPATH``, run as a real process), and a plugin that
  fails to load is reported without breaking the other commands.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from e2e_helpers import PROJECT_ROOT
from model_tools import quantize, train
from model_tools.card_toml import CardWriteError, card_text, toml_dumps, write_card
from xray_triage.inference.card import load_card
from xray_triage.settings import DEFAULT_MODEL_DIR

PROJECT_ROOT = PROJECT_ROOT
RUNTIME_PACKAGES = ("xray_triage", "dicom_gateway", "consult_web")


def test_the_card_writer_reproduces_the_shipped_card_from_its_tables() -> None:
    """What models/train.py writes: the shipped model.toml, header and comments included."""
    shipped = (DEFAULT_MODEL_DIR / "model.toml").read_text(encoding="utf-8")
    text = card_text(
        tomllib.loads(shipped),
        header=train.CARD_HEADER,
        comments=train.CARD_COMMENTS,
        digits=train.CARD_DIGITS,
    )
    assert text == shipped


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_variant_cards_are_written_as_shipped(variant: str) -> None:
    """What models/quantize.py writes for a variant: the fp32 card's text + its own [variant]."""
    path = DEFAULT_MODEL_DIR / f"model.{variant}.toml"
    if not path.is_file():
        pytest.skip(f"no {variant} variant shipped")
    shipped = path.read_text(encoding="utf-8")
    base = load_card(DEFAULT_MODEL_DIR / "model.toml")
    variant_table = tomllib.loads(shipped)["variant"]
    text = quantize.variant_card_text(
        base, variant, DEFAULT_MODEL_DIR / f"model.{variant}.onnx", variant_table
    )
    assert text == shipped


def test_a_card_that_would_not_parse_back_is_refused_and_not_written(tmp_path: Path) -> None:
    # DEL (U+007F) must be escaped in a TOML string; JSON string escaping leaves it as it is
    tables = {"model": {"name": "demo\x7f", "version": "1"}}
    with pytest.raises(CardWriteError):
        write_card(tmp_path / "model.toml", tables)
    assert list(tmp_path.iterdir()) == []  # neither the card nor its temporary file


def test_written_cards_round_trip_with_rounded_floats(tmp_path: Path) -> None:
    tables = {
        "model": {"name": "m", "p": 0.123456789, "n": float("nan"), "sub": {"label with space": [1.0, 2.5]}}
    }
    path = write_card(tmp_path / "model.toml", tables, header="line one\n\nline three", digits=3)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# line one\n#\n# line three\n\n[model]\n")
    parsed = tomllib.loads(text)
    assert parsed["model"]["p"] == 0.123 and parsed["model"]["sub"] == {"label with space": [1.0, 2.5]}
    assert [p.name for p in tmp_path.iterdir()] == ["model.toml"]
    assert toml_dumps({"only": {"sub": {"a": 1}}}) == "[only.sub]\na = 1\n"  # no empty [only] block


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_runtime_never_imports_the_tooling() -> None:
    offenders = {
        str(path.relative_to(PROJECT_ROOT)): sorted(
            m for m in _imported_modules(path) if m.split(".")[0] == "model_tools"
        )
        for package in RUNTIME_PACKAGES
        for path in sorted((PROJECT_ROOT / package).rglob("*.py"))
    }
    assert not {k: v for k, v in offenders.items() if v}
    assert len(offenders) > 50  # the scan did see the runtime's modules


_PLUGIN = """
def register(groups):
    parser = groups.top.add_parser("hello-plugin", parents=[groups.common], help="test plugin")
    parser.add_argument("--who", default="world")
    parser.set_defaults(func=lambda args: print(f"hello {args.who} data_dir={args.data_dir}") or 0)
    groups.models.add_parser("plugin-action").set_defaults(func=lambda args: print("models plugin-action") or 0)
"""


def _plugin_dir(root: Path, entry_points: str) -> Path:
    """A real (if minimal) installed distribution: a module plus a .dist-info with entry_points.txt."""
    (root / "hello_plugin.py").write_text(_PLUGIN, encoding="utf-8")
    info = root / "hello_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: hello-plugin\nVersion: 1.0\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(f"[xray_triage.commands]\n{entry_points}\n", encoding="utf-8")
    return root


def _cli(plugin_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XRAY_TRIAGE_")}
    env["PYTHONPATH"] = str(plugin_root)
    return subprocess.run(
        [sys.executable, "-m", "xray_triage_server.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=plugin_root,
        timeout=120,
    )


def test_extra_commands_come_from_the_entry_point_group(tmp_path: Path) -> None:
    root = _plugin_dir(tmp_path, "hello = hello_plugin:register")
    proc = _cli(root, "hello-plugin", "--who", "station", "--data-dir", "d")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hello station data_dir=d"
    assert _cli(root, "models", "plugin-action").stdout.strip() == "models plugin-action"
    helped = _cli(root, "models", "--help")
    assert "export-torchxrayvision" in helped.stdout  # the tooling's own entry point still registers


def test_a_broken_plugin_is_reported_and_the_rest_still_works(tmp_path: Path, tiny_model: Path) -> None:
    root = _plugin_dir(tmp_path, "broken = no_such_module_here:register")
    proc = _cli(root, "models", "verify", "--model", str(tiny_model))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: ")
    assert (
        "warning: extra commands 'broken' (no_such_module_here:register) not available: ModuleNotFoundError"
        in proc.stderr
    )

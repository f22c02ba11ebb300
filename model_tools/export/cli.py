"""``xray-triage models export-*`` subcommands.

Nothing here imports torch: the parser is built on every ``xray-triage`` call,
including in the torch-free server environment. torch and torchxrayvision are
imported when an export command runs; without them it prints how to install the
``export`` extra and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

INSTALL_HINT = "pip install -e '.[export]'"


def register(models_subparsers: argparse._SubParsersAction) -> None:
    """Add the export subcommands to ``xray-triage models`` (see :mod:`model_tools.commands`)."""
    p = models_subparsers.add_parser(
        "export-torchxrayvision",
        help="export torchxrayvision's DenseNet-121 to ONNX with a model card (needs the export extra)",
        description=(
            "Export torchxrayvision's DenseNet-121 (18 outputs) to DIR/model.onnx (probabilities + "
            "class-activation heatmaps, dynamic batch) and write DIR/model.toml. Checks ONNX Runtime "
            "against PyTorch and loads the card as the server would. See models/EXPORT.md."
        ),
    )
    p.add_argument(
        "--weights",
        required=True,
        metavar="NAME_OR_FILE",
        help="a torchxrayvision weights name (e.g. densenet121-res224-all; downloaded by torchxrayvision, "
        "needs internet) or a local file: a state_dict saved with torch.save, or a whole pickled model "
        "(with --allow-pickle)",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory for model.onnx and model.toml")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--name", help="card [model].name (default torchxrayvision-<preset>)")
    p.add_argument("--version", help="card [model].version (default w<first 12 hex of the weights file's sha256>)")
    p.add_argument(
        "--preset",
        metavar="NAME",
        help="for a FILE: which published weights it holds (labels and operating points), e.g. "
        "densenet121-res224-nih; inferred from the published file name, or 'none' for uncalibrated weights",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow a FILE that is a whole pickled model (loading it runs code from the file)",
    )
    p.add_argument("--force", action="store_true", help="overwrite DIR/model.onnx and DIR/model.toml")
    p.set_defaults(func=cmd_export_torchxrayvision)


def _error(message: str) -> int:
    print(f"xray-triage: error: {message}", file=sys.stderr)
    return 2


def cmd_export_torchxrayvision(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
        import torchxrayvision  # noqa: F401
    except ImportError as exc:
        return _error(f"the export needs torch and torchxrayvision ({exc}); install them with: {INSTALL_HINT}")
    from model_tools.card_toml import CardWriteError
    from model_tools.export.common import ExportError
    from model_tools.export.torchxrayvision_export import export_torchxrayvision
    from xray_triage.inference.card import ModelCardError

    try:
        result = export_torchxrayvision(
            args.weights,
            args.out,
            opset=args.opset,
            name=args.name,
            version=args.version,
            preset=args.preset,
            allow_pickle=args.allow_pickle,
            force=args.force,
        )
    except (ExportError, CardWriteError, ModelCardError) as exc:
        return _error(str(exc))
    print(f"ok: {result.onnx_path} and {result.card_path}; serve it with: xray-triage serve --model {result.directory}")
    return 0

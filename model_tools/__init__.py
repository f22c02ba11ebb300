"""Model tooling for xray-triage: training, INT8/FP16 variants, export to ONNX, model cards.

Apart from the server: the runtime package ``xray_triage`` never imports this
package (it only reads cards and runs ONNX). The ``xray-triage models export-*``
subcommands reach the CLI through the ``xray_triage.commands`` entry point
(:mod:`model_tools.commands`). torch, torchxrayvision and onnxconverter-common
(the ``export`` extra) are never needed to build the CLI parser: ``train.py`` and
``quantize.py`` import them inside the functions that use them, and the export
modules that import torch at the top (``export/common.py``,
``export/torchxrayvision_export.py``) are imported only when an export command runs,
after a check that says what to install.
"""

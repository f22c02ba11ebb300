"""Model tooling for xray-triage: training, INT8/FP16 variants, export to ONNX, model cards.

Apart from the server: the runtime package ``xray_triage`` never imports this
package (it only reads cards and runs ONNX). The ``xray-triage models export-*``
subcommands reach the CLI through the ``xray_triage.commands`` entry point
(:mod:`model_tools.commands`). torch, torchxrayvision and onnxconverter-common
(the ``export`` extra) are imported only inside the functions that need them, so
importing a module here, or building the CLI parser, works without them.
"""

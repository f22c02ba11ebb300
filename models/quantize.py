#!/usr/bin/env python3
"""``python models/quantize.py ...``: INT8/FP16 variants of a model (code: ``model_tools/quantize.py``).

Kept so the documented command works; ``python -m model_tools.quantize`` is the same.
Needs the project installed (``pip install -e '.[dev]'``), not a ``sys.path`` edit.
"""

from model_tools.quantize import main

if __name__ == "__main__":
    raise SystemExit(main())

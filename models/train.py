#!/usr/bin/env python3
"""``python models/train.py ...``: train the shipped demo model (code: ``model_tools/train.py``).

Kept so the documented command works; ``python -m model_tools.train`` is the same.
Needs the project installed (``pip install -e '.[export]'``), not a ``sys.path`` edit.
"""

from model_tools.train import main

if __name__ == "__main__":
    raise SystemExit(main())

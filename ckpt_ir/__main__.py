"""``python -m ckpt_ir``: the same as the ``ckpt-ir`` console script."""

import sys

from ckpt_ir.cli import main

sys.exit(main())

"""``python -m maintgate``: the same as the ``maintgate`` command."""

import sys

from .cli import main

sys.exit(main())

"""``python -m megacov`` is the same as the ``megacov`` console script."""
import sys

from megacov.cli import main

sys.exit(main())

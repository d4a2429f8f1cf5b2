"""``python -m kdiff_align`` is the ``kdiff-align`` command."""
import sys

from .apps.cli import main

sys.exit(main())

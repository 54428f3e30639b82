"""``python -m foldforge ...`` = the ``foldforge`` command (for environments without the console script)."""
import sys

from foldforge.cli import main

sys.exit(main())

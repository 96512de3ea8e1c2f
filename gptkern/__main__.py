"""``python -m gptkern``: the ``gptkern`` command."""
import sys

from gptkern.cli import main

sys.exit(main())

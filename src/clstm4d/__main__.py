"""``python -m clstm4d``: the same as the ``clstm4d`` command."""

import sys

from clstm4d.cli import main

if __name__ == "__main__":
    sys.exit(main())

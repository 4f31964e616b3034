"""``python -m lowbit``: the ``lowbit`` command line (see ``lowbit --help``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m nearvoice`: the same command line as the `nearvoice` script."""

import sys

from nearvoice.edge.cli import main

if __name__ == "__main__":
    sys.exit(main())

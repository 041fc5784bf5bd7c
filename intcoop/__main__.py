"""`python -m intcoop` runs the command line (intcoop.cli)."""
import sys

from .cli import main

sys.exit(main())

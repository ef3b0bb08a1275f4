"""`python -m seqr VERB ...`: the same as the `seqr` command."""
import sys

from seqr.cli import main

sys.exit(main())

"""``python -m ijepa_fast.eval``: the ``ijepa-eval`` command line."""

import sys

from ijepa_fast.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m lowmembp_convert``: the ``lowmembp-convert`` command line (see ``lowmembp_convert.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m internvlx_hf ...` is the `internvlx` command."""

import sys

from .cli import main

sys.exit(main())

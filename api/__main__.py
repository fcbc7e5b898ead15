"""`python -m diffrt`: the diffrt command."""

import sys

from diffrt.runtime.cli import main

sys.exit(main())

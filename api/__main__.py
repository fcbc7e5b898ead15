"""`python -m diffrt`: the diffrt command."""

import sys

from diffrt.runtime.interrupt import exit_quietly_on_ctrl_c

exit_quietly_on_ctrl_c()  # while the command still loads; main() hands Ctrl-C back to Python

from diffrt.runtime.cli import main  # noqa: E402

sys.exit(main())

"""What every `python -m charlm.X` entry point shares: one line per error, and a non-zero exit."""
import sys
from collections.abc import Callable

from charlm.errors import CharlmError

# ValueError: config validation; OSError: a file or folder the user named (missing, read-only, disk full).
USER_ERRORS = (CharlmError, ValueError, OSError)


def run(main: Callable[[], object]) -> None:
    """Call main(); a user error ends the process with `error: <message>` on stderr and exit status 1."""
    try:
        main()
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")

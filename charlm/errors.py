"""The one error type the command-line tools report as a line instead of a traceback.

Every charlm error that means "the input or the situation does not allow this" derives from CharlmError;
`charlm.cli.run` prints it as `error: <message>` and exits non-zero. Bugs stay tracebacks.
"""


class CharlmError(Exception):
    """Bad input (a flag, a file, a folder) or a situation the user must resolve; the message says which."""

"""The one user-error type: bad input or settings that the user can fix.

The command line prints a `UsageError` as one line (`lora-one <cmd>: error: ...`) and exits 2; any
other exception is a bug and keeps its traceback. It subclasses `ValueError`, so library callers that
catch `ValueError` keep working.
"""


class UsageError(ValueError):
    """Bad input that the user fixes; the message names the problem and the fix."""

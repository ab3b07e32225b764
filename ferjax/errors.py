"""The one exception type for mistakes a user can fix.

The CLI turns a `UserError` into one line on stderr and exit code 2; everything else is an
internal failure (exit 1, traceback kept for bug reports).
"""


class UserError(Exception):
  """Bad flag, bad config value, missing or malformed data: the message says what and where."""


class Interrupted(Exception):
  """A run stopped on request (Ctrl-C, SIGTERM) after saving: one line, and `exit_code`."""

  def __init__(self, message: str, exit_code: int = 130):
    super().__init__(message)
    self.exit_code = exit_code

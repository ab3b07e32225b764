"""The one exception type for mistakes a user can fix.

The CLI turns a `UserError` into one line on stderr and exit code 2; everything else is an
internal failure (exit 1, traceback kept for bug reports).
"""


class UserError(Exception):
  """Bad flag, bad config value, missing or malformed data: the message says what and where."""

"""Ctrl-C and SIGTERM during training: finish the step, save it, exit with one line.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be: inside a
JAX host callback it was swallowed (about one time in twelve training ran on to the end), and
inside an orbax save it printed a thread traceback. While a trainer runs, `StopRequests` replaces
both handlers by one that only records the signal; the loop checks it after every step, saves
that step as a resume point and raises `errors.Interrupted`, which the CLI prints as one line
(exit 130 for SIGINT, 143 for SIGTERM). A second signal while the first is being handled
interrupts at once, as Python's default would.

Single-process runs only: in a multi-process run every process must agree on the step at which
to stop and save (a save is collective), so there the default handlers stay and a signal ends
the process; a resume then restarts from the last checkpoint, which is exact.
"""

import signal
import threading

import jax

from ferjax.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
  """Context manager; truthy once SIGINT or SIGTERM arrived (`.signum` says which)."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __bool__(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):
    if self.signum is not None:  # Asked twice: stop now.
      raise KeyboardInterrupt
    self.signum = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def stop(self, step: int, workdir=None) -> Interrupted:
    """The exception that ends the run once `step` is saved in `workdir` (None: a stage without
    resume points, which writes nothing when stopped)."""
    name = signal.Signals(self.signum).name
    if workdir is None:
      return Interrupted(f"{name}: stopped after step {step}; nothing was written (run the same "
                         "command again)", exit_code=128 + self.signum)
    return Interrupted(f"{name}: stopped after step {step}, saved in {workdir}/checkpoints "
                       "(run the same command again to resume)", exit_code=128 + self.signum)

"""Ctrl-C and SIGTERM: a signal at any moment stops the process with one line; a trainer saves.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be: inside a
JAX host callback it was swallowed (the run trained on to the end), inside an import it became
an ImportError traceback, and SIGTERM's default handler ended the process without a word. So the
CLI calls `install()` first thing, before the heavy imports, and one handler serves the whole
process, every verb and every stage of the demo. It records the signal, then:

* inside a training loop (`StopRequests`), nothing more: the loop reads the record after every
  step, saves that step as a resume point and raises `errors.Interrupted`;
* anywhere else (data loading, evaluation, between two stages), it raises `Stopped` (a
  KeyboardInterrupt) at once; inside an import, once the import is done (C code that imports a
  module can print an exception raised there as a traceback), by sending the signal again.

The record stays: a `Stopped` that a library swallowed still stops the run at the next check
(the next loop step, entering or leaving a loop, `check()` between the demo's stages) and at the
latest when the verb returns; one that Python could not raise (inside a garbage-collector
callback) is sent again a moment later. The CLI prints each as one line, `ferjax: interrupted:
...`, with exit code 130 for SIGINT and 143 for SIGTERM. A second signal while a loop saves the
first one's step interrupts at once, as Python's default would.

Single-process runs only defer: in a multi-process run every process must agree on the step at
which to stop and save (a save is collective), so there the handler raises at once and a resume
restarts from the last checkpoint, which is exact.
"""

import os
import signal
import sys
import threading

from ferjax.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received = None  # The first signal's number since `install()`.
_deferring = 0  # How many training loops (nested) read the record themselves.


class Stopped(KeyboardInterrupt):
  """A signal outside a training loop; `signum` says which."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def _handle(signum, frame):
  global _received
  again = _received is not None
  if not again:
    _received = signum
  if _deferring and not again:
    return  # The loop saves this step, then stops.
  if _importing(frame):
    # Raised inside an import, the exception can reach C code that prints it as a traceback
    # (numpy's C API does, for the extensions that import numpy): raised once the import is done.
    _send_again(_received)
    return
  raise Stopped(_received)


def _send_again(signum: int) -> None:
  """Sends `signum` to this process a moment later, from a timer thread, so that the handler
  runs again wherever the main thread then is."""
  threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()


def _importing(frame) -> bool:
  """Whether `frame` runs inside a module being imported (importlib's frames below it)."""
  while frame is not None:
    if frame.f_code.co_filename.startswith("<frozen importlib"):
      return True
    frame = frame.f_back
  return False


def _unraisable(unraisable):
  """Where Python cannot raise (a garbage-collector callback, a __del__), it prints the exception
  as "Exception ignored in" and a traceback, and goes on: a `Stopped` there is dropped, and its
  signal sent again a moment later (from a timer thread, so not inside this hook), to be raised
  where the main thread then is. Anything else goes to Python's hook."""
  if isinstance(unraisable.exc_value, Stopped):
    _send_again(unraisable.exc_value.signum)
  else:
    _python_unraisablehook(unraisable)


_python_unraisablehook = sys.unraisablehook
_hook_installed = False  # Whether `_unraisable` is in the chain of unraisable-exception hooks.


def install():
  """Makes `_handle` the SIGINT and SIGTERM handler and forgets earlier signals; returns what
  `uninstall` needs to put the previous handlers back (None off the main thread, where Python
  cannot set handlers)."""
  global _received, _python_unraisablehook, _hook_installed
  if threading.current_thread() is not threading.main_thread():
    return None
  _received = None
  previous = {s: signal.signal(s, _handle) for s in SIGNALS}
  # Once per process, and never taken out: other hooks installed later (checkpoint.py's) wrap
  # this one, so wrapping them in turn, or putting back the hook this one replaced, would make
  # a cycle (each calling the other until the recursion limit).
  if not _hook_installed:
    _python_unraisablehook = sys.unraisablehook
    sys.unraisablehook = _unraisable
    _hook_installed = True
  return previous


def uninstall(previous) -> None:
  """Puts back the handlers `install()` replaced, and forgets the signal received (the
  unraisable-exception hook stays: without the handlers it only passes exceptions on)."""
  global _received
  _received = None
  for s, handler in (previous or {}).items():
    signal.signal(s, handler)


def installed() -> bool:
  return all(signal.getsignal(s) is _handle for s in SIGNALS)


def received() -> int | None:
  """The number of the signal received since `install()`, or None."""
  return _received


def check() -> None:
  """Raises `Stopped` when a signal was received (e.g. one whose exception a library swallowed)."""
  if _received is not None:
    raise Stopped(_received)


def stopped_message(signum: int) -> str:
  """The line (after `ferjax: interrupted: `) for a signal outside a training loop."""
  return (f"{signal.Signals(signum).name}: stopped; finished steps and stages are kept (run the "
          "same command again to go on)")


class StopRequests:
  """Context manager around a training loop; truthy once SIGINT or SIGTERM arrived (`.signum`
  says which). Installs the handler for the loop when the CLI did not (the Python API, tests).
  A signal received before the loop starts stops it at once; one received after the loop read
  it for the last time stops the run when the loop ends."""

  def __init__(self):
    self._previous = None
    self._deferring = False

  @property
  def signum(self) -> int | None:
    return _received

  def __bool__(self) -> bool:
    return _received is not None

  def __enter__(self):
    global _deferring
    import jax  # Here: `install()` runs before the CLI imports jax.
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      if not installed():
        self._previous = install()
      _deferring += 1
      self._deferring = True
    try:
      check()
    except Stopped:
      self._leave()
      raise
    return self

  def __exit__(self, kind, value, traceback):
    signum = _received
    self._leave()
    if kind is None and signum is not None:
      raise Stopped(signum)

  def _leave(self):
    global _deferring
    if self._deferring:
      _deferring -= 1
      self._deferring = False
    if self._previous is not None:  # Installed for this loop only: the next one starts afresh.
      uninstall(self._previous)
      self._previous = None

  def stop(self, step: int, workdir=None) -> Interrupted:
    """The exception that ends the run once `step` is saved in `workdir` (None: a stage without
    resume points, which writes nothing when stopped)."""
    name = signal.Signals(self.signum).name
    if workdir is None:
      return Interrupted(f"{name}: stopped after step {step}; nothing was written (run the same "
                         "command again)", exit_code=128 + self.signum)
    return Interrupted(f"{name}: stopped after step {step}, saved in {workdir}/checkpoints "
                       "(run the same command again to resume)", exit_code=128 + self.signum)

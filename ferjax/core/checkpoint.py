"""The one module that talks to orbax.

A workdir's `checkpoints/` holds `last/` (the newest k steps, for resuming) and `best/` (the step
with the best validation metric, for evaluation). Orbax writes each step into a temporary
folder (`<step>.orbax-checkpoint-tmp`) and renames it when complete; step listings skip such
folders and the next save of that step replaces one, so a kill during a save leaves the
previous step intact. A step that is a best candidate goes to `best/` before `last/`: a kill
between the two leaves `last/` at an earlier step, and the resumed run replays (bit-identically)
and evaluates (and offers as best) that step again; an equal value is not a new best, so a
replayed step is never saved twice. Everything is stored as arrays plus JSON: restoring never
executes code from a checkpoint.

Damaged steps (a truncated or deleted array file, garbled or missing metadata, a step without
its `meta`): restoring "latest"/"last" skips each one with one warning line on stderr and uses
the newest intact step, so a resumed run replays from there; when no step of `last/` is intact,
or when a damaged step was asked for by name ("best" or a number), it is one `UserError` line.
Damaged folders are left on disk (never delete what a person may still repair), but they no
longer count: `latest_step()` skips them, and saving that step number again replaces them.
Garbled orbax bookkeeping that restoring does not need (`<step>/_CHECKPOINT_METADATA`, the
commit time) is not damage. Orbax's own logging and the leftovers of its failed parallel reads
are kept off stderr, and so are those of a save that fails on a full disk (its writer threads'
tracebacks, asyncio's abandoned writes): a user sees the one line.
"""

import contextlib
import logging
import pathlib
import re
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from ferjax import writing
from ferjax.errors import UserError

# A write that fails on one of these is a full disk (or quota, or read-only file system), which the
# trainer reports in one line (core.workdir.disk_errors).
DISK_ERRNOS = writing.DISK_ERRNOS


def _manager(directory: pathlib.Path, max_to_keep: int, create: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep), create=create,
      enable_async_checkpointing=False)
  # Registering both items lets a freshly opened manager read metadata before any save.
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  state, meta = ocp.StandardCheckpointHandler(), ocp.JsonCheckpointHandler()
  registry.add("state", ocp.args.StandardSave, state)
  registry.add("state", ocp.args.StandardRestore, state)
  registry.add("meta", ocp.args.JsonSave, meta)
  registry.add("meta", ocp.args.JsonRestore, meta)
  with _quiet():  # Opening lists the steps and logs each unreadable _CHECKPOINT_METADATA.
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


class _Damaged(Exception):
  """A checkpoint step that cannot be read; the message is one short line (the reason). Never
  leaves this module: `Checkpoints` turns it into a warning or a `UserError`."""


_UNREAD = object()


class Checkpoints:
  """Last-k and best-by-metric checkpoints of a train state pytree, plus JSON metadata.

  Usable as a context manager: leaving the `with` block closes both managers.
  """

  def __init__(self, directory, *, max_to_keep: int = 3, best_metric: str | None = None,
               best_mode: str = "max", read_only: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    self.best_metric = best_metric
    self.best_mode = best_mode
    self.read_only = read_only  # Opened to read (evaluate, export...): creates no folder.
    self._last = _manager(self.directory / "last", max_to_keep, not read_only)
    self._best = _manager(self.directory / "best", 1, not read_only) if best_metric else None
    # The best value is read from the best step's meta at the first save that needs it, so that
    # opening the checkpoints (e.g. to evaluate another step) never fails on a damaged best.
    self._best_value = _UNREAD
    self._damaged = {}  # Step folder -> reason, for the steps found unreadable.

  # --- saving ---------------------------------------------------------------------------------
  def save(self, step: int, state, *, metrics: dict | None = None, extra: dict | None = None,
           last: bool = True):
    """Saves `state` at `step` as best when metrics[best_metric] improves on the best, then as
    `last` (a resume point) unless `last=False`: a validation step that is not a resume point
    costs a save only when it is a new best."""
    if self.read_only:
      raise RuntimeError(f"{self.directory}: opened read-only, cannot save")
    meta = {"step": int(step), "metrics": _jsonable(metrics or {}), **(extra or {})}
    # Best first: `last/` reaching this step means it was fully offered as a best candidate (a
    # resumed run starts after the latest `last/` step and never evaluates that step again).
    if self._best is not None and metrics and self.best_metric in metrics:
      value = float(metrics[self.best_metric])
      if self._is_better(value):
        self._save_step(self._best, step, state, meta)
        self._best_value = value
    if last:
      self._save_step(self._last, step, state, meta)

  def _is_better(self, value: float) -> bool:
    if not np.isfinite(value):
      return False
    best = self._current_best_value()
    if best is None:
      return True
    return value > best if self.best_mode == "max" else value < best

  def _current_best_value(self):
    """The metric of the best step; None without one, or when its meta is damaged (one warning
    line: the next validated step becomes the best and replaces it)."""
    if self._best_value is _UNREAD:
      self._best_value = None
      step = self._best.latest_step()
      if step is not None:
        try:
          meta = self._read_step_meta(self._best, step)
        except _Damaged as e:
          _warn(f"checkpoint {self._note_damaged(self._best, step, e)} is damaged ({e}); the "
                "next validated step replaces it as the best")
        else:
          self._best_value = meta.get("metrics", {}).get(self.best_metric)
    return self._best_value

  def _save_step(self, manager, step, state, meta):
    folder = self._folder(manager, step)
    if folder in self._damaged and step in manager.all_steps():
      manager.delete(step)  # A damaged step saved again is replaced.
    self._save(manager, step, state, meta)
    self._damaged.pop(folder, None)

  @staticmethod
  def _save(manager, step, state, meta):
    if step in manager.all_steps():  # Re-saving a step (e.g. the final one) is a no-op.
      return
    # force: a step below a damaged newer one (a run resumed past it) is saved too.
    _drop_failed_save_leftovers()
    with _held_logs() as held:
      try:
        manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        manager.wait_until_finished()
      except Exception as e:
        if writing.os_errno(e) not in DISK_ERRNOS:
          held.let_through()  # Not a full disk: orbax's own account stays.
        raise
      held.let_through()

  # --- restoring ------------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    """The newest step of `last/` not found damaged (where a resumed run starts, at most)."""
    return max(self._intact_steps(self._last), default=None)

  def steps(self) -> list[int]:
    """Every step kept in `last/`, damaged ones included."""
    return list(self._last.all_steps())

  def best_step(self) -> int | None:
    if self._best is None:
      return None
    return max(self._intact_steps(self._best), default=None)

  def restore(self, target, which="latest"):
    """Restores into the structure, shapes and shardings of `target`; returns (state, meta).

    `which` is "latest", "last" (the same: the newest intact step, see the module docstring),
    "best", or a step number.
    """
    return self._read(which, lambda manager, step: self._restore_step(manager, step, target))

  def read_meta(self, which="latest") -> dict:
    return self._read(which, self._read_step_meta)

  def _read(self, which, read):
    """read(manager, step) on the step `which` names; for "latest", on the newest intact one."""
    manager, step = self._resolve(which)
    if which not in ("latest", "last"):
      try:
        return read(manager, step)
      except _Damaged as e:
        raise UserError(f"checkpoint {self._note_damaged(manager, step, e)} is damaged ({e}): "
                        "choose another checkpoint (best, last or a step number), or restore its "
                        "files") from None
    skipped = []
    for step in sorted(self._intact_steps(manager), reverse=True):
      try:
        result = read(manager, step)
      except _Damaged as e:
        skipped.append((self._note_damaged(manager, step, e), e))
        continue
      for folder, reason in skipped:
        _warn(f"checkpoint {folder} is damaged ({reason}); skipped it, using step {step}")
      return result
    newest = self._folder(manager, manager.latest_step())
    raise UserError(f"{manager.directory}: no intact checkpoint is left (newest, {newest.name}: "
                    f"{self._damaged[newest]}): restore its files, or train again in a new workdir")

  def _restore_step(self, manager, step, target):
    where = self._folder(manager, step)
    stored = _attempt("state metadata", lambda: manager.item_metadata(step)["state"])
    if stored is None or next(_flatten_with_names(stored), None) is None:
      raise _Damaged("state metadata (state/_METADATA) is missing")
    _check_shapes(target, stored, where)  # A readable checkpoint of another config: UserError.
    meta = self._read_step_meta(manager, step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = _attempt("arrays", lambda: manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract))))
    return restored.state, meta

  @staticmethod
  def _read_step_meta(manager, step) -> dict:
    restored = _attempt("meta", lambda: manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())))
    return dict(restored.meta)

  def _resolve(self, which):
    if which in ("latest", "last"):
      step = self._last.latest_step()
      manager = self._last
    elif which == "best":
      if self._best is None:
        raise UserError(f"{self.directory}: this run keeps no best checkpoint")
      manager, step = self._best, self._best.latest_step()
    else:
      try:
        step = int(which)
      except (TypeError, ValueError):
        raise UserError(f"checkpoint {which!r}: expected best, last or a step number") from None
      manager = self._last
      if step not in manager.all_steps():
        if self._best is not None and step in self._best.all_steps():
          manager = self._best
        else:
          kept = sorted(set(self._last.all_steps()) | set(self.best_steps()))
          raise UserError(f"{self.directory}: no checkpoint at step {step} (kept: {kept})")
    if step is None:
      raise UserError(f"{self.directory}: no checkpoint found (train first)")
    return manager, step

  def best_steps(self) -> list[int]:
    return [] if self._best is None else list(self._best.all_steps())

  # --- damaged steps --------------------------------------------------------------------------
  @staticmethod
  def _folder(manager, step) -> pathlib.Path:
    return pathlib.Path(manager.directory) / str(step)

  def _intact_steps(self, manager) -> list[int]:
    return [s for s in manager.all_steps() if self._folder(manager, s) not in self._damaged]

  def _note_damaged(self, manager, step, reason) -> pathlib.Path:
    folder = self._folder(manager, step)
    self._damaged[folder] = str(reason)
    return folder

  def close(self):
    self._last.close()
    if self._best is not None:
      self._best.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _attempt(what: str, read):
  """read() with orbax quiet; any failure becomes _Damaged('<what> unreadable: <reason>')."""
  _drop_failed_read_leftovers()
  try:
    with _quiet():
      return read()
  except Exception as e:  # Orbax, tensorstore and json raise many types for unreadable files.
    raise _Damaged(f"{what} unreadable: {_reason(e)}") from None


def _reason(error: Exception, limit: int = 120) -> str:
  """The first line of an error (of its cause, for orbax's wrappers), without file paths or
  tensorstore's spec dump, at most `limit` characters."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  text = (text.strip().splitlines() or [type(error).__name__])[0]
  text = text.split(" [tensorstore_spec=")[0]
  text = re.sub(r' in OCDBT database at local file "[^"]*"|/[0-9.]+(?=")', "", text)
  text = re.sub(r'local file "[^"]*?([^"/]*)"', r'"\1"', text)
  return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _quiet():
  """Orbax logs (absl) what it then raises, or what does not matter here: keep it off stderr."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL + 1)
  try:
    yield
  finally:
    logger.setLevel(level)


class _HeldLogs(logging.Handler):
  """Keeps the log records it receives; `_held_logs` drops them unless `let_through()` was
  called."""

  def __init__(self):
    super().__init__()
    self.records, self.released = [], False

  def emit(self, record):
    self.records.append(record)

  def let_through(self):
    self.released = True


@contextlib.contextmanager
def _held_logs():
  """Holds back what orbax logs (absl) while the block runs: a save that fails on a full disk
  logs each of its writer threads' tracebacks, and the caller's one line says it all. After the
  block the records are dropped, or logged after all when the block called `let_through()`."""
  logger = logging.getLogger("absl")
  held = _HeldLogs()
  handlers, propagate = logger.handlers, logger.propagate
  logger.handlers, logger.propagate = [held], False
  try:
    yield held
  finally:
    logger.handlers, logger.propagate = handlers, propagate
    if held.released:
      for record in held.records:
        logger.handle(record)


def _drop_failed_save_leftovers():
  """Installs, once, a filter on asyncio's logger that drops the leftovers of a failed save.

  When a save fails (e.g. on a full disk), orbax abandons its other writes; their futures,
  garbage-collected at any later moment, each log "exception was never retrieved" with a
  traceback naming the save's temporary folder. The save's own error says it all.
  """
  logger = logging.getLogger("asyncio")
  if any(getattr(f, "ferjax_checkpoint_saves", False) for f in logger.filters):
    return

  def keep(record) -> bool:
    text = record.getMessage()
    return not ("never retrieved" in text and ".orbax-checkpoint-tmp" in text)
  keep.ferjax_checkpoint_saves = True
  logger.addFilter(keep)


def _drop_failed_read_leftovers():
  """Installs, once, an unraisable-exception hook that drops the leftovers of a failed read.

  When one array read fails, orbax closes its event loop while tensorstore finishes the other
  reads; Python then prints each ("Exception ignored ...: Event loop is closed", orbax's
  abandoned read coroutines) as a traceback on stderr, at any later moment. Anything else goes
  to the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "ferjax_checkpoint_reads", False):
    return

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    leftover = (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed") or (
                    code is not None and "orbax" in code.co_filename)
    if not leftover:
      previous(unraisable)
  hook.ferjax_checkpoint_reads = True
  sys.unraisablehook = hook


def _warn(message: str):
  if jax.process_index() == 0:
    print(f"ferjax: warning: {message}", file=sys.stderr)


def _check_shapes(target, stored, where):
  """Fails with the name of the first parameter whose stored shape differs from the target's."""
  target_leaves = dict(_flatten_with_names(target))
  stored_leaves = dict(_flatten_with_names(stored))
  # Name a model parameter rather than its optimizer moment when both mismatch.
  names = sorted(target_leaves, key=lambda n: ("opt" in n.split("/")[0], n))
  for name in names:
    leaf = target_leaves[name]
    if name not in stored_leaves:
      raise UserError(f"checkpoint {where} has no parameter {name!r}: was it written by another "
                      "config?")
    want = tuple(np.shape(leaf))
    have = tuple(getattr(stored_leaves[name], "shape", ()) or ())
    if want != have:
      raise UserError(f"checkpoint {where}: parameter {name!r} has shape {have}, the config "
                      f"expects {want} (restore with the config the run was trained with)")


def _flatten_with_names(tree):
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  for path, leaf in leaves:
    if leaf is None:
      continue
    yield "/".join(_key_name(k) for k in path), leaf


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _jsonable(metrics: dict) -> dict:
  return {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in metrics.items()}

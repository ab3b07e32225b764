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
"""

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from ferjax.errors import UserError


def _manager(directory: pathlib.Path, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep), create=True,
      enable_async_checkpointing=False)
  # Registering both items lets a freshly opened manager read metadata before any save.
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  state, meta = ocp.StandardCheckpointHandler(), ocp.JsonCheckpointHandler()
  registry.add("state", ocp.args.StandardSave, state)
  registry.add("state", ocp.args.StandardRestore, state)
  registry.add("meta", ocp.args.JsonSave, meta)
  registry.add("meta", ocp.args.JsonRestore, meta)
  return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


class Checkpoints:
  """Last-k and best-by-metric checkpoints of a train state pytree, plus JSON metadata.

  Usable as a context manager: leaving the `with` block closes both managers.
  """

  def __init__(self, directory, *, max_to_keep: int = 3, best_metric: str | None = None,
               best_mode: str = "max"):
    self.directory = pathlib.Path(directory).absolute()
    self.best_metric = best_metric
    self.best_mode = best_mode
    self._last = _manager(self.directory / "last", max_to_keep)
    self._best = _manager(self.directory / "best", 1) if best_metric else None
    self._best_value = None
    if self._best is not None and self._best.latest_step() is not None:
      meta = self._read_meta(self._best, self._best.latest_step())
      self._best_value = meta.get("metrics", {}).get(best_metric)

  # --- saving ---------------------------------------------------------------------------------
  def save(self, step: int, state, *, metrics: dict | None = None, extra: dict | None = None,
           last: bool = True):
    """Saves `state` at `step` as best when metrics[best_metric] improves on the best, then as
    `last` (a resume point) unless `last=False`: a validation step that is not a resume point
    costs a save only when it is a new best."""
    meta = {"step": int(step), "metrics": _jsonable(metrics or {}), **(extra or {})}
    # Best first: `last/` reaching this step means it was fully offered as a best candidate (a
    # resumed run starts after the latest `last/` step and never evaluates that step again).
    if self._best is not None and metrics and self.best_metric in metrics:
      value = float(metrics[self.best_metric])
      if self._is_better(value):
        self._save(self._best, step, state, meta)
        self._best_value = value
    if last:
      self._save(self._last, step, state, meta)

  def _is_better(self, value: float) -> bool:
    if not np.isfinite(value):
      return False
    if self._best_value is None:
      return True
    return value > self._best_value if self.best_mode == "max" else value < self._best_value

  @staticmethod
  def _save(manager, step, state, meta):
    if step in manager.all_steps():  # Re-saving a step (e.g. the final one) is a no-op.
      return
    manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()

  # --- restoring ------------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    return self._last.latest_step()

  def steps(self) -> list[int]:
    return list(self._last.all_steps())

  def best_step(self) -> int | None:
    return None if self._best is None else self._best.latest_step()

  def restore(self, target, which="latest"):
    """Restores into the structure, shapes and shardings of `target`; returns (state, meta).

    `which` is "latest", "last" (the same), "best", or a step number.
    """
    manager, step = self._resolve(which)
    stored = manager.item_metadata(step)["state"]
    _check_shapes(target, stored, pathlib.Path(manager.directory) / str(step))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta)

  def read_meta(self, which="latest") -> dict:
    manager, step = self._resolve(which)
    return self._read_meta(manager, step)

  @staticmethod
  def _read_meta(manager, step) -> dict:
    restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
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

  def close(self):
    self._last.close()
    if self._best is not None:
      self._best.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


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

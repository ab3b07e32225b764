"""A run's workdir guards itself: one kind of run, one config, one trainer at a time.

A workdir records its kind (`run.json`) and config (`config.json`) the first time a trainer
writes into it. A later command into it may only resume that same run, or extend it to more
steps (`train.num_steps` raised: recorded in run.json and config.json, and said in one line; a
cosine learning-rate schedule then stretches from the resume point on). A different kind, fewer
steps, or a config that differs in anything but where the data lives and how many devices run
it, is refused with one line naming the differing fields, before anything is written. While a trainer
runs, it holds `train.lock` (an OS file lock, released when the process ends however it ends;
the file names the holder's pid and host for the refusal message). A workdir whose metrics say
the run progressed but that holds no checkpoint to resume from is refused too, rather than
silently restarted from step 0. A run that fails with a user error before it logged or saved
anything (bad data, say) leaves no record behind, so the fix may change the config.
"""

import contextlib
import errno
import json
import os
import pathlib
import tempfile

from ferjax import configs, writing
from ferjax.core import monitor, parallel
from ferjax.errors import UserError

# Fields a resumed run may change: where the data is read from, and how many devices run it
# (a preempted job resumed on another slice). Everything else defines the run.
MAY_CHANGE_ON_RESUME = ("data.data_dir", "data.manual_dir", "train.num_devices")
KIND_NAMES = {"classifier": "a classifier run (ferjax train)",
              "vaegan": "a VAE-GAN run (ferjax train-vaegan)",
              "pretrain": "a pre-training run (ferjax pretrain)",
              "semisup": "a semi-supervised classifier run (ferjax train-semisup)"}


def _read_json(path: pathlib.Path, what: str) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path}: cannot read the {what} ({type(e).__name__}: {e}); this workdir is "
                    "damaged: choose another --workdir") from None


def check_same_run(workdir: pathlib.Path, config, kind: str, defaults=None) -> int | None:
  """The train.num_steps `workdir` was recorded with when it holds this run (None: a new
  workdir). Raises a one-line UserError when it holds another kind of run or a config that
  differs (more steps are allowed: an extension). `defaults` (the kind's default config):
  a field the saved config lacks counts as its default, so a field added to ferjax after the
  run was made, left at its default (which keeps the old behaviour), does not block resuming."""
  check_kind(workdir, kind, "choose another --workdir")
  config_file = workdir / "config.json"
  if not config_file.exists():
    return None
  stored = configs.flatten(_read_json(config_file, "saved config"))
  if defaults is not None:
    stored = {**configs.flatten(configs.to_dict(defaults)), **stored}
  new = configs.flatten(configs.to_dict(config))
  differing = sorted(k for k in set(stored) | set(new)
                     if stored.get(k) != new.get(k) and k not in MAY_CHANGE_ON_RESUME)
  old_steps, new_steps = stored.get("train.num_steps"), new.get("train.num_steps")
  if differing == ["train.num_steps"] and isinstance(old_steps, int) and new_steps > old_steps:
    return old_steps  # An extension.
  if differing:
    shown = ", ".join(f"{k} ({stored.get(k)!r} -> {new.get(k)!r})" for k in differing[:4])
    more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
    raise UserError(f"{workdir} holds a run with another config: {shown}{more}; a workdir only "
                    "resumes its own run (or extends it to more train.num_steps): choose another "
                    "--workdir (nothing was written)")
  return old_steps


def check_kind(workdir, kind: str, advice: str) -> None:
  """Refuses, in one line ending in `advice`, a workdir recorded as another kind of run."""
  run_file = pathlib.Path(workdir) / "run.json"
  if run_file.exists():
    stored = _read_json(run_file, "run record").get("kind")
    if stored != kind:
      raise UserError(f"{workdir} holds {KIND_NAMES.get(stored, repr(stored))}, not "
                      f"{KIND_NAMES[kind]}: {advice}")


def run_kind(workdir) -> str | None:
  """The kind of run `workdir` records in run.json (None: no record)."""
  run_file = pathlib.Path(workdir) / "run.json"
  return _read_json(run_file, "run record").get("kind") if run_file.exists() else None


def check_writable(folder, what: str) -> pathlib.Path:
  """Refuses, before any work is done, an output `folder` that is a file or cannot be written
  (read-only, no permission): one line naming `what` (the flag). A folder that does not exist
  yet is judged by its nearest existing parent, where it would be created."""
  if not str(folder).strip():  # pathlib would read "" as the current folder.
    raise UserError(f"{what}: expected a folder, got an empty name")
  folder = pathlib.Path(folder)
  if folder.exists() and not folder.is_dir():
    raise UserError(f"{what} {folder}: expected a folder, found a file")
  probe = folder.absolute()
  while not probe.exists():
    probe = probe.parent
  if not probe.is_dir():
    raise UserError(f"{what} {folder}: {probe} is a file, so the folder cannot be created")
  try:
    fd, name = tempfile.mkstemp(prefix=".ferjax-write-check-", dir=probe)
    os.close(fd)
    os.unlink(name)
  except OSError as e:
    raise UserError(f"{what} {folder}: cannot write in {probe} ({e.strerror or e})") from None
  return folder


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@contextlib.contextmanager
def disk_errors(workdir):
  """Turns a full disk (or a quota, or a file system gone read-only) while a run writes into one
  line: checkpoints are written atomically, so the run resumes exactly once space is freed."""
  try:
    yield
  except Exception as e:  # Orbax and tensorstore wrap the OSError in their own types.
    code = writing.os_errno(e)
    if code not in DISK_ERRNOS:
      raise
    reason = os.strerror(code)
    raise UserError(f"{workdir}: cannot write ({reason}); the last checkpoint is intact: free "
                    "space and run the same command again to resume") from None


def open_for_training(workdir, config, kind: str, defaults=None) -> tuple[pathlib.Path, bool]:
  """(workdir as a Path, whether this process writes files) after checking that `workdir` is
  new or holds this same run (see the module docstring; `defaults`: `check_same_run`). Process 0
  records the kind and config of a new run; the other processes of a multi-process run only
  read."""
  workdir = check_writable(workdir, "--workdir")  # "" would be the current folder to pathlib.
  run_file = workdir / "run.json"
  stage = _read_json(run_file, "run record").get("stage") if run_file.exists() else None
  if stage is not None:  # E.g. a head re-trained on a frozen backbone: not a resumable run.
    raise UserError(f"{workdir} was written by `ferjax {stage}`, not by a trainer: it cannot be "
                    f"resumed or extended; choose another --workdir (nothing was written)")
  recorded_steps = check_same_run(workdir, config, kind, defaults)
  check_resumable(workdir)
  is_main = parallel.is_main_process()
  extended = recorded_steps is not None and config.train.num_steps != recorded_steps
  if extended:
    print(f"{workdir}: extending the run from train.num_steps={recorded_steps} to "
          f"{config.train.num_steps} (recorded in run.json)")
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    run_file = workdir / "run.json"
    record = _read_json(run_file, "run record") if run_file.exists() else {"kind": kind}
    if extended:
      record.setdefault("extensions", []).append(
          {"from_num_steps": recorded_steps, "to_num_steps": config.train.num_steps})
    if extended or not run_file.exists():
      writing.write_atomic(run_file, json.dumps(record, indent=2) + "\n")
    if extended or recorded_steps is None:
      configs.save_config(config, workdir / "config.json")
  return workdir, is_main


@contextlib.contextmanager
def training_lock(workdir: pathlib.Path, is_main: bool = True):
  """Holds `workdir/train.lock` while a trainer runs (ferjax.writing.exclusive_lock); a second
  trainer into the same workdir is refused with one line naming the holder, and a lock left by a
  killed process never blocks. A user error before the run logged anything takes back what this
  command recorded (see the module docstring)."""
  if not is_main:  # One run, several processes: process 0 holds the lock for all.
    yield
    return
  refusal = lambda holder, _: (f"{workdir} is being trained by {holder}: one trainer per workdir "
                               "(wait for it to finish, or choose another --workdir)")
  with writing.exclusive_lock(workdir / "train.lock", refusal=refusal):
    try:
      yield
    except UserError:  # E.g. bad data found while loading: the record alone is no run.
      _forget_if_unstarted(workdir)
      _forget_unused_extension(workdir)
      raise


RECORD_FILES = ("run.json", "config.json", "train.lock")


def _forget_if_unstarted(workdir: pathlib.Path) -> None:
  """Removes the record of a run that failed before it logged or saved anything (its
  run.json, config.json and lock, then the folders left empty), so that fixing the mistake may
  change the config. A run with metrics or a checkpoint is left exactly as it is."""
  if (workdir / "metrics.jsonl").exists() or any(
      p.is_file() for p in (workdir / "checkpoints").rglob("*")):
    return
  for name in RECORD_FILES:
    (workdir / name).unlink(missing_ok=True)
  for folder in sorted((p for p in workdir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
    if not any(folder.iterdir()):
      folder.rmdir()
  if not any(workdir.iterdir()):
    workdir.rmdir()


def _forget_unused_extension(workdir: pathlib.Path) -> None:
  """Takes back the newest extension to more train.num_steps (run.json and config.json) when the
  run failed with a user error before it logged a step beyond the old end: a refused command
  leaves the record as it found it."""
  run_file, config_file = workdir / "run.json", workdir / "config.json"
  if not (run_file.exists() and config_file.exists()):
    return
  record = _read_json(run_file, "run record")
  extensions = record.get("extensions") or []
  if not extensions:
    return
  old_steps = extensions[-1]["from_num_steps"]
  if any(int(r["step"]) > old_steps for r in monitor.read_metrics(workdir)):
    return  # The extension trained: it stays recorded.
  config = _read_json(config_file, "saved config")
  config["train"]["num_steps"] = old_steps
  writing.write_atomic(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")
  extensions.pop()
  if not extensions:
    del record["extensions"]
  writing.write_atomic(run_file, json.dumps(record, indent=2) + "\n")


def check_resumable(workdir: pathlib.Path) -> None:
  """Call before opening the checkpoints. Refuses a workdir whose metrics record training steps
  but whose checkpoints/last folder is gone (deleted by hand): restarting from step 0 there
  would append a second history to the first. (A run killed before its first checkpoint has an
  empty checkpoints/last folder: it restarts from step 0, its partial metrics dropped.)"""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists() or (pathlib.Path(workdir) / "checkpoints" / "last").is_dir():
    return
  steps = [int(r["step"]) for r in monitor.read_metrics(workdir)]
  if steps:
    raise UserError(f"{path} records steps up to {max(steps)} but {workdir}/checkpoints/last is "
                    "missing, so there is nothing to resume from: restore the checkpoints, or "
                    "choose another --workdir")

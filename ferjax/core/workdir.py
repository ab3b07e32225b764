"""A run's workdir guards itself: one kind of run, one config, one trainer at a time.

A workdir records its kind (`run.json`) and config (`config.json`) the first time a trainer
writes into it. A later command into it may only resume that same run, or extend it to more
steps (`train.num_steps` raised: recorded in run.json and config.json, and said in one line; a
cosine learning-rate schedule then stretches from the resume point on). A different kind, fewer
steps, or a config that differs in anything but where the data lives and how many devices run
it, is refused with one line naming the differing fields, before anything is written.

A run is what it reads, not how its paths were spelled. A field naming another run (a VAE-GAN,
a teacher, imported weights: LINK_FIELDS) matches when it points at the same run: the same real
path, the path recorded relative to the workdir at the first start (so a tree of runs moved or
copied together keeps working), or the same run identity (its run.json and config.json, the
number of steps aside). A folder among the unlabeled sources, and the data a run reads from
data.data_dir and data.manual_dir, match by the fingerprint of their files' names and sizes (as
`ferjax data prepare` records its source), recorded in run.json at the first start: data moved
elsewhere resumes, other data at the new place is refused naming the field and both places.

While a trainer runs, it holds `train.lock` (an OS file lock, released when the process ends
however it ends; the file names the holder's pid and host for the refusal message). A workdir
whose metrics say the run progressed but that holds no checkpoint to resume from is refused too,
rather than silently restarted from step 0. A run that fails before it logged or saved anything
(bad data, say, or a crash) leaves no record behind, so the fix may change the config.
"""

import contextlib
import hashlib
import json
import os
import pathlib
import tempfile

from ferjax import configs, writing
from ferjax.core import monitor, parallel
from ferjax.errors import Interrupted, UserError

# Fields a resumed run may change: where the data is read from, and how many devices run it
# (a preempted job resumed on another slice). Everything else defines the run.
MAY_CHANGE_ON_RESUME = ("data.data_dir", "data.manual_dir", "train.num_devices")
# Fields naming another run (or imported weights) that a run reads: compared by what they point
# at (`_same_target`), not by how the path was spelled.
LINK_FIELDS = ("model.init_from", "augment.vaegan_workdir", "augment.filter_workdir",
               "loss.classifier_workdir", "synth.vaegan_workdir")
# Fields listing unlabeled sources (ferjax.data.unlabeled), some of them folder:PATH.
SOURCE_FIELDS = ("data.sources", "semisup.extra_sources")
DATA_FIELDS = ("data.data_dir", "data.manual_dir")
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
  run_file = workdir / "run.json"
  record = _read_json(run_file, "run record") if run_file.exists() else {}
  differing = sorted(k for k in set(stored) | set(new)
                     if stored.get(k) != new.get(k) and k not in MAY_CHANGE_ON_RESUME
                     and not _same_value(workdir, k, stored.get(k), new.get(k), record))
  old_steps, new_steps = stored.get("train.num_steps"), new.get("train.num_steps")
  extension = (differing == ["train.num_steps"] and isinstance(old_steps, int)
               and new_steps > old_steps)
  if differing and not extension:
    shown = ", ".join(f"{k} ({stored.get(k)!r} -> {new.get(k)!r})" for k in differing[:4])
    more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
    raise UserError(f"{workdir} holds a run with another config: {shown}{more}; a workdir only "
                    "resumes its own run (or extends it to more train.num_steps): choose another "
                    "--workdir (nothing was written)")
  _check_same_data(workdir, stored, new, record)
  return old_steps


# =================================================================================================
# What a run reads: other runs and data, wherever they lie
# =================================================================================================
def _real(path) -> str:
  return os.path.realpath(os.path.expanduser(str(path)))


def _same_value(workdir, field: str, old, new, record: dict) -> bool:
  """Whether two spellings of a path-valued field name the same thing (module docstring)."""
  if not (isinstance(old, str) and isinstance(new, str) and old and new):
    return False
  if field in LINK_FIELDS:
    return _same_target(workdir, field, old, new, record)
  if field in SOURCE_FIELDS:
    return _same_sources(field, old, new, record)
  return False


def run_identity(path) -> str | None:
  """What names a run (or an import-weights folder) wherever it lies: a digest of its kind
  (run.json) and config.json (train.num_steps aside: an extension is the same run), or of its
  import.json; None when `path` holds none of them."""
  folder = pathlib.Path(path).expanduser()
  parts = {}
  for name in ("run.json", "config.json", "import.json"):
    try:
      parts[name] = json.loads((folder / name).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
      continue
  if not parts:
    return None
  if isinstance(parts.get("run.json"), dict):
    parts["run.json"] = {k: v for k, v in parts["run.json"].items() if k == "kind"}
  config = parts.get("config.json")
  if isinstance(config, dict) and isinstance(config.get("train"), dict):
    config["train"].pop("num_steps", None)
  return "sha256:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _links(workdir, flat: dict) -> dict:
  """{field: {"path": its target relative to the workdir, "identity": run_identity}} of the link
  fields set in a flattened config: what a later spelling is compared with."""
  links = {}
  for field in LINK_FIELDS:
    value = flat.get(field)
    if isinstance(value, str) and value:
      links[field] = {"path": os.path.relpath(_real(value), _real(workdir)),
                      "identity": run_identity(value)}
  return links


def _same_target(workdir, field: str, old: str, new: str, record: dict) -> bool:
  """Whether `new` points at the run `old` pointed at when the run started: the same real path
  (`old` spelled absolutely, or no record), the target recorded relative to the workdir (a tree
  of runs moved together), or the same run identity (the target moved on its own)."""
  link = (record.get("links") or {}).get(field)
  real_new = _real(new)
  if (not link or os.path.isabs(os.path.expanduser(old))) and real_new == _real(old):
    return True
  if link and real_new == _real(pathlib.Path(workdir) / link["path"]):
    return True
  identity = link.get("identity") if link else run_identity(old)
  return identity is not None and run_identity(new) == identity


def folder_fingerprint(path, skip=()) -> dict | None:
  """{"files", "fingerprint"} of the files under `path` (names and sizes, as `ferjax data
  prepare` fingerprints its source; `skip`: folders left out); None when it is no folder."""
  from ferjax.data.builders import preparing
  folder = pathlib.Path(path).expanduser()
  if not folder.is_dir():
    return None
  digest = hashlib.sha256()
  seen = {key for key in map(preparing._dir_key, skip) if key}
  files = preparing._hash_tree(folder, b"", digest, seen)
  return {"files": files, "fingerprint": "sha256:" + digest.hexdigest()}


def _parsed_sources(field: str, spec):
  from ferjax.data import unlabeled
  if not (isinstance(spec, str) and spec.strip()):
    return []
  try:
    return unlabeled.parse_sources(spec, field)
  except UserError:
    return None


def _same_sources(field: str, old: str, new: str, record: dict) -> bool:
  """Whether two source lists are the same sources in the same order with the same weights, each
  folder holding the files recorded at the first start (or, without a record, the same folder)."""
  old_sources, new_sources = _parsed_sources(field, old), _parsed_sources(field, new)
  if not old_sources or not new_sources or [(s.name, s.weight) for s in old_sources] != [
      (s.name, s.weight) for s in new_sources]:
    return False
  for i, (a, b) in enumerate(zip(old_sources, new_sources)):
    if a.name != "folder" or a.path == b.path:
      continue
    recorded = (record.get("data") or {}).get(f"{field}:{i}")
    current = folder_fingerprint(b.path)
    if recorded and current:
      if current["fingerprint"] != recorded["fingerprint"]:
        return False
    elif _real(a.path) != _real(b.path):
      return False
  return True


def _prepared_names(flat: dict) -> list[str]:
  """The prepared datasets a config reads from data.data_dir (data.manual_dir prepares them)."""
  from ferjax.data import splits
  name = flat.get("data.name")
  if name == "joint":
    try:
      return [member for member, _ in splits.parse_members(flat.get("data.datasets", ""))]
    except UserError:
      return []
  names = [name] if name not in (None, "synthetic", "folder") else []
  for field in SOURCE_FIELDS:
    names += [s.name for s in _parsed_sources(field, flat.get(field)) or []
              if s.name not in ("synthetic", "folder")]
  return names


def data_identity(flat: dict) -> dict:
  """{what: {"files", "fingerprint"}} of the data a flattened config reads, where it can be told
  without reading the images: a folder dataset's folder (data.manual_dir); each prepared
  dataset's recorded source (else data.manual_dir, which would prepare it); each folder among the
  unlabeled sources ("<field>:<index>")."""
  from ferjax.data import builders
  from ferjax.data.builders import locate, preparing
  data_dir, manual_dir = flat.get("data.data_dir"), flat.get("data.manual_dir")
  out = {}
  if flat.get("data.name") == "folder" and manual_dir:
    out["folder"] = folder_fingerprint(manual_dir)
  for name in _prepared_names(flat):
    try:
      source = builders.prepared_source(name, data_dir, flat.get("data.image_size"))
      if source is None and manual_dir and pathlib.Path(manual_dir).expanduser().is_dir():
        resolved = locate.resolve_data_dir(data_dir)
        source = preparing._source_record(name, manual_dir, resolved)
    except UserError:  # Damaged or empty: loading the data says so in its own words.
      source = None
    out[name] = source and {"files": source["files"], "fingerprint": source["fingerprint"]}
  for field in SOURCE_FIELDS:
    for i, s in enumerate(_parsed_sources(field, flat.get(field)) or []):
      if s.name == "folder":
        out[f"{field}:{i}"] = folder_fingerprint(s.path)
  return {k: v for k, v in out.items() if v}


def _check_same_data(workdir, stored: dict, new: dict, record: dict) -> None:
  """Refuses a resume whose data.data_dir or data.manual_dir names another place holding other
  data than the run started from (the fingerprints recorded in run.json; without a record, what
  the old place holds now). Data moved elsewhere with the same files resumes."""
  moved = [f for f in DATA_FIELDS if stored.get(f) != new.get(f)]
  if not moved:
    return
  before = record.get("data") or data_identity(stored)
  after = data_identity(new)
  for what in sorted(set(before) & set(after)):
    old, now = before[what], after[what]
    if what.split(":")[0] in SOURCE_FIELDS or old["fingerprint"] == now["fingerprint"]:
      continue
    shown = ", ".join(f"{f} ({stored.get(f)!r} -> {new.get(f)!r})" for f in moved)
    dataset = "the folder dataset" if what == "folder" else f"dataset {what!r}"
    raise UserError(f"{workdir} holds a run trained on other data: {shown}: {dataset} there "
                    f"holds {now['files']} files, not the {old['files']} files (names and sizes) "
                    "the run started from; a workdir only resumes its own run: choose another "
                    "--workdir, or point the field back (nothing was written)")


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


DISK_ERRNOS = writing.DISK_ERRNOS


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
      flat = configs.flatten(configs.to_dict(config))
      links = _links(workdir, flat)
      if links:
        record["links"] = links
      data = record.get("data") or data_identity(flat)
      if data:
        record["data"] = data
      writing.write_atomic(run_file, json.dumps(record, indent=2) + "\n")
    if extended or recorded_steps is None:
      configs.save_config(config, workdir / "config.json")
  return workdir, is_main


@contextlib.contextmanager
def training_lock(workdir: pathlib.Path, is_main: bool = True):
  """Holds `workdir/train.lock` while a trainer runs (ferjax.writing.exclusive_lock); a second
  trainer into the same workdir is refused with one line naming the holder, and a lock left by a
  killed process never blocks. A failure (a user error, or a crash) before the run logged
  anything takes back what this command recorded (see the module docstring)."""
  if not is_main:  # One run, several processes: process 0 holds the lock for all.
    yield
    return
  refusal = lambda holder, _: (f"{workdir} is being trained by {holder}: one trainer per workdir "
                               "(wait for it to finish, or choose another --workdir)")
  with writing.exclusive_lock(workdir / "train.lock", refusal=refusal):
    try:
      yield
    except Interrupted:  # Stopped after saving its step: the run goes on from there.
      raise
    except Exception:  # E.g. bad data found while loading: the record alone is no run.
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

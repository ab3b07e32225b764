"""One emotion label space for every dataset, and `data.classes`: keep, drop or merge classes.

Every builder names its classes its own way (FER-2013 `angry`, RAF-DB `anger`, FERPlus
`happiness`, CK+ `sadness` ...). `canonical(name)` maps each onto one of CANONICAL, so that a
model trained on one dataset can be scored on another (classes matched by canonical name) and
several datasets can be trained on together. A class name ferjax does not know (a `folder`
dataset's own classes) stays itself, lower-cased: it matches only the same name.

`data.classes` (a config field; "" keeps every class under the dataset's own names) is a
comma-separated list, applied by `select_classes` when a split is loaded:

    "-disgust"                      every class but disgust (its images are dropped)
    "-contempt,-neutral"            several drops
    "anger,happy,sad,surprise"      only these, in this order (the others' images are dropped)
    "happy,negative=anger+disgust+fear+sad,neutral"
                                    `negative` is the union of four classes (a merge)

Names on the right are matched by canonical name, so "-disgust" works on every dataset and
"anger" finds FER-2013's `angry`. With `data.classes` set, kept classes carry canonical names.
A class named or used twice (by canonical name: "happy,happiness"), or a spec that leaves fewer
than two classes, is refused: a model of one class learns nothing and scores perfectly.
"""

import numpy as np

from ferjax.errors import UserError

CANONICAL = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")

# Every spelling the builders (and common downloads) use -> canonical name.
ALIASES = {
    "neutral": "neutral", "neutrality": "neutral",
    "happy": "happy", "happiness": "happy", "joy": "happy",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise",
    "fear": "fear", "fearful": "fear", "afraid": "fear",
    "disgust": "disgust", "disgusted": "disgust",
    "anger": "anger", "angry": "anger",
    "contempt": "contempt", "contemptuous": "contempt",
}


def canonical(name: str) -> str:
  """The canonical emotion name of a dataset's class name (unknown names: lower-cased)."""
  key = str(name).strip().lower()
  return ALIASES.get(key, key)


def canonical_names(class_names) -> tuple[str, ...]:
  return tuple(canonical(n) for n in class_names)


def parse_classes(spec: str, field: str = "data.classes") -> list[tuple[str, tuple[str, ...]]]:
  """[(new class name, (canonical source names, ...)), ...] of a keep/merge spec, or
  [("-", (dropped, ...))] for a drop spec. A UserError naming `field` when malformed: a class
  named or used twice (by canonical name), or a keep/merge list of fewer than two classes."""
  entries = [e.strip() for e in str(spec).split(",") if e.strip()]
  example = "e.g. '-disgust' or 'anger,happy,sad' or 'happy,negative=anger+fear+sad'"
  if not entries:
    raise UserError(f"{field}: expected a comma-separated list of classes ({example}), got "
                    f"{spec!r}")
  drops = [e for e in entries if e.startswith("-")]
  if drops and len(drops) != len(entries):
    raise UserError(f"{field}: mixes dropped ('-name') and kept classes in {spec!r}: give either "
                    f"the classes to drop or the classes to keep ({example})")
  if drops:
    dropped = tuple(canonical(e[1:]) for e in drops)
    for k, name in enumerate(dropped):
      if not name:
        raise UserError(f"{field}: entry {drops[k]!r} has an empty name ({example})")
      if name in dropped[:k]:
        raise UserError(f"{field}: class {name!r} is named twice in {spec!r}")
    return [("-", dropped)]
  parsed, used = [], []
  for entry in entries:
    new, merge, sources = entry.partition("=")
    if merge:  # new=a+b+c
      name, sources = new.strip().lower(), tuple(canonical(s) for s in sources.split("+")
                                                 if s.strip())
    else:
      name, sources = canonical(new), (canonical(new),)
    if not name or not sources:
      raise UserError(f"{field}: entry {entry!r} has an empty name ({example})")
    if canonical(name) in (canonical(n) for n, _ in parsed):
      raise UserError(f"{field}: class {name!r} is named twice in {spec!r}")
    for source in sources:
      if source in used:
        raise UserError(f"{field}: class {source!r} is used twice in {spec!r}")
      used.append(source)
    parsed.append((name, sources))
  if len(parsed) < 2:
    raise UserError(f"{field}: {spec!r} leaves one class ({parsed[0][0]!r}): expected at least "
                    f"two classes to tell apart ({example})")
  return parsed


def check_distinct(class_names, where: str) -> tuple[str, ...]:
  """`class_names` as a tuple when no two are the same class by canonical name (`happy`,
  `Happy` and `happiness` are one class); else a one-line UserError starting with `where`
  (e.g. "<file>: class") that names both."""
  seen = {}
  for name in class_names:
    key = canonical(name)
    if key in seen:
      first = seen[key]
      what = ("is listed twice" if first == name
              else f"and {first!r} are the same class ({key!r})")
      raise UserError(f"{where} {name!r} {what}: expected each class once")
    seen[key] = name
  return tuple(class_names)


def class_mapping(class_names, spec: str, field: str = "data.classes", where: str = ""):
  """(new class names, old label -> new label or -1 (dropped)) for a dataset's class names and a
  `data.classes` spec; a UserError naming the first class the dataset does not have."""
  old = canonical_names(class_names)
  parsed = parse_classes(spec, field)
  known = ", ".join(old)
  where = f" {where}" if where else ""

  def index(name: str) -> int:
    if name not in old:
      raise UserError(f"{field}: class {name!r} is not a class of the dataset{where} (its "
                      f"classes: {known})")
    return old.index(name)

  if parsed[0][0] == "-":
    dropped = {index(name) for name in parsed[0][1]}
    kept = [k for k in range(len(old)) if k not in dropped]
    if not kept:
      raise UserError(f"{field}: {spec!r} drops every class of the dataset{where}")
    if len(kept) < 2:
      raise UserError(f"{field}: {spec!r} leaves one class of the dataset{where} "
                      f"({old[kept[0]]!r}): expected at least two classes to tell apart")
    mapping = np.full(len(old), -1, np.int32)
    mapping[kept] = np.arange(len(kept))
    return tuple(old[k] for k in kept), mapping
  mapping = np.full(len(old), -1, np.int32)
  names = []
  for new_label, (name, sources) in enumerate(parsed):  # Distinct: parse_classes checks.
    names.append(name)
    for source in sources:
      mapping[index(source)] = new_label
  return tuple(names), mapping


def describe(class_names, new_names, mapping, counts=None) -> str:
  """One line saying what a mapping keeps, merges and drops (with image counts if given)."""
  old = list(class_names)
  parts = []
  for new_label, name in enumerate(new_names):
    sources = [old[k] for k in np.flatnonzero(mapping == new_label)]
    parts.append(name if sources == [name] else f"{name}={'+'.join(sources)}")
  dropped = [k for k in np.flatnonzero(mapping < 0)]
  text = "classes " + ", ".join(parts)
  if dropped:
    n = f" ({int(sum(counts[k] for k in dropped))} images)" if counts is not None else ""
    text += "; dropped " + ", ".join(old[k] for k in dropped) + n
  return text


def select_classes(ds, spec: str, field: str = "data.classes"):
  """(the Dataset with `spec` applied: dropped classes' examples removed, labels renumbered,
  class names canonical; the one-line description of the mapping)."""
  new_names, mapping = class_mapping(ds.class_names, spec, field,
                                     where=f"{ds.name!r}" if ds.name else "")
  new_labels = mapping[ds.labels]
  keep = np.flatnonzero(new_labels >= 0)
  line = describe(ds.class_names, new_names, mapping, ds.class_counts())
  subset = ds.take(keep) if len(keep) < len(ds) else ds
  return subset.replace(labels=new_labels[keep].astype(np.int32), class_names=new_names), line


def shared_classes(model_names, target_names):
  """Matching a model's classes with a target dataset's by canonical name:
  (target label -> model label or -1, the model labels the target has, in model order)."""
  model = canonical_names(model_names)
  target = canonical_names(target_names)
  to_model = np.asarray([model.index(t) if t in model else -1 for t in target], np.int32)
  shared = sorted(int(k) for k in set(to_model.tolist()) if k >= 0)
  return to_model, shared

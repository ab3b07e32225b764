"""Linear probes on frozen features: how well does a multinomial logistic regression on a
network's penultimate features classify another dataset's expressions?

    ferjax probe --train runs/ckplus_features.npz --folds fold --out runs/ckplus_probe.json
    ferjax probe --train fer_train.npz --test fer_test.npz --out runs/fer_probe.json
    ferjax probe --train raf_train.npz --folds 5 --seed 0 [--l2 1e-3]

The input files are written by `ferjax features` (see `read_features` for their format). Two
evaluation modes:

  - `--train A --test B`: fit on A (L2 chosen by cross-validation on A), report on B; the two
    files must have the same class names in the same order;
  - `--train A --folds fold|K`: k-fold cross-validation over A. `fold` uses the file's own fold
    ids (CK+'s 10 subject-disjoint folds); `K` makes K folds stratified by label and grouped by
    subject when the file has subject ids (no subject on both sides), seeded by `--seed`.
    With given folds a class may have a single example: when its fold is held out the probe never
    saw the class and never predicts it (mean class accuracy averages over the classes present in
    each held-out fold). With `K` folds, K may not exceed the smallest class count nor the number
    of subjects.

The training file must hold at least two classes. Both files must come from the same run (the
workdir and step `ferjax features` records); `--allow-other-run` accepts features of another
run, for a deliberate transfer. `--out` may not be an input, nor hold a file the probe did not
write.

The probe (`fit_logistic`): mean cross-entropy + l2/2 * |W|^2 on features standardised with the
training part's mean and std, minimised full-batch by L-BFGS (optax, zoom line search) in one
jitted loop that runs to convergence: it stops at a gradient norm below GRAD_TOL or when an
iteration no longer lowers the objective (float32 precision reached). `steps` (DEFAULT_STEPS) is
only a safety cap: fits that reach it are counted in the result ("capped_fits") and `ferjax
probe` prints a warning. The standardisation is folded into the returned (W, b), which act on
raw features.

L2 is chosen on the training part only (`select_l2`): inner folds (INNER_FOLDS, stratified, by
subject or by given fold when known) over a log-spaced grid, best by mean class accuracy (ties:
the larger L2); `--l2` fixes it instead. Reported per fold and as mean ± std over folds (np.std,
ddof=0): accuracy, mean class accuracy, macro-F1; plus the pooled confusion matrix of all
held-out predictions. `--out FILE.json` also writes FILE_confusion.png beside it.

See docs/methods.md (DeepFEVER-style transfer).
"""

import functools
import json
import pathlib
import sys
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from ferjax import plots, writing
from ferjax.errors import UserError
from ferjax.core import workdir as workdir_lib
from ferjax.evaluate import FEATURES_FORMAT_VERSION, confusion_matrix, metrics_from_confusion

DEFAULT_GRID = tuple(float(v) for v in np.logspace(-6, 1, 10))
DEFAULT_STEPS = 20000  # A safety cap, not a budget: fits stop on convergence (GRAD_TOL).
INNER_FOLDS = 3
GRAD_TOL = 1e-8
SCORE = "mean_class_accuracy"  # What the inner cross-validation maximises.

# key: (dtype kind, ndim); "row" keys have one entry per example.
_FIELDS = {
    "features": ("f", 2), "logits": ("f", 2), "labels": ("i", 1), "class_names": ("U", 1),
    "model_class_names": ("U", 1), "path": ("U", 1), "index": ("i", 1), "subject": ("i", 1),
    "fold": ("i", 1), "dataset": ("U", 0), "split": ("U", 0), "workdir": ("U", 0),
    "step": ("i", 0), "format_version": ("i", 0)}
_ROW_KEYS = ("features", "logits", "labels", "path", "index", "subject", "fold")
_KIND_TEXT = {"f": "a float", "i": "an integer", "U": "a string"}


# --- The features file ---------------------------------------------------------------------------
def read_features(path) -> dict:
  """The arrays of a `ferjax features` file, checked; one-line UserErrors name file and key.

  Format (npz, no pickles): features float [N, D], logits float [N, K_model], labels int [N]
  (indices into class_names), class_names str [K], model_class_names str [K_model], path str [N]
  (source file, or '<dataset>/<split>/<index>'),
  index int [N], subject int [N] and fold int [N] (-1: unknown), and 0-d dataset, split, workdir
  (str), step and format_version (int, = 1). Returns them as numpy arrays (features float32,
  integer rows int64), class names as tuples and 0-d values as Python scalars, plus "filename"
  (the .npz read).
  """
  path = pathlib.Path(path)
  raw = _load_npz(path)
  for key, (kind, ndim) in _FIELDS.items():
    _check_field(path, key, raw[key], kind, ndim)
  _check_consistency(path, raw)
  data = {key: (raw[key].item() if raw[key].ndim == 0 else raw[key]) for key in _FIELDS}
  data.update(filename=str(path), features=raw["features"].astype(np.float32),
              class_names=tuple(str(c) for c in raw["class_names"]),
              model_class_names=tuple(str(c) for c in raw["model_class_names"]))
  for key in ("labels", "index", "subject", "fold"):
    data[key] = raw[key].astype(np.int64)
  return data


def _load_npz(path) -> dict:
  """{key: array} of every _FIELDS key of the npz at `path`."""
  if not path.is_file():
    raise UserError(f"{path}: no such file (expected a .npz written by `ferjax features`)")
  try:
    npz = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise UserError(f"{path}: not a .npz file written by `ferjax features` ({e})") from None
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise UserError(f"{path}: not a .npz file written by `ferjax features` (a single array)")
  with npz:
    missing = [key for key in _FIELDS if key not in npz.files]
    if missing:
      raise UserError(f"{path}: missing key(s) {', '.join(missing)} (not a `ferjax features` "
                      f"file, or an older format)")
    raw = {}
    for key in _FIELDS:
      try:
        raw[key] = npz[key]
      except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{path}: key {key!r}: unreadable ({e})") from None
  return raw


def _check_field(path, key, value, kind, ndim) -> None:
  """One key's dtype kind and number of dimensions."""
  kinds = "iu" if kind == "i" else kind
  if value.dtype.kind not in kinds or value.ndim != ndim:
    shape = {0: "a 0-d value", 1: "a 1-d array", 2: "a 2-d array"}[ndim]
    raise UserError(f"{path}: key {key!r}: expected {_KIND_TEXT[kind]} {shape}, got "
                    f"{value.dtype} of shape {value.shape}")


def _check_consistency(path, raw) -> None:
  """Row counts, class names, label range, finite features, format version."""
  version = int(raw["format_version"])
  if version != FEATURES_FORMAT_VERSION:
    raise UserError(f"{path}: key 'format_version': expected {FEATURES_FORMAT_VERSION}, got "
                    f"{version}")
  n, dim = raw["features"].shape
  if n == 0 or dim == 0:
    raise UserError(f"{path}: key 'features': no examples or no feature dimensions (shape "
                    f"{raw['features'].shape})")
  for key in _ROW_KEYS:
    if raw[key].shape[0] != n:
      raise UserError(f"{path}: key {key!r}: {raw[key].shape[0]} rows, but 'features' has {n}")
  names = [str(c) for c in raw["class_names"]]
  if len(names) < 2 or len(set(names)) != len(names):
    raise UserError(f"{path}: key 'class_names': expected at least 2 distinct names, got {names}")
  if raw["logits"].shape[1] != len(raw["model_class_names"]):
    raise UserError(f"{path}: key 'logits': {raw['logits'].shape[1]} columns, but "
                    f"'model_class_names' has {len(raw['model_class_names'])} names")
  labels = raw["labels"]
  if labels.min() < 0 or labels.max() >= len(names):
    raise UserError(f"{path}: key 'labels': expected indices in [0, {len(names)}), got values "
                    f"in [{labels.min()}, {labels.max()}]")
  bad = int(np.sum(~np.isfinite(raw["features"]).all(axis=1)))
  if bad:
    raise UserError(f"{path}: key 'features': {bad} row(s) with NaN or infinite values")


# --- The logistic regression ----------------------------------------------------------------------
def _lbfgs_fit(z, y, weights, mean, scale, l2, init, steps):
  """(W, b) minimising sum(weights * CE) + l2/2 |W|^2 of ((z - mean) / scale) @ W + b, and the
  number of L-BFGS iterations used (`steps` when it stopped at the cap before converging)."""

  def loss_fn(params):
    w, b = params
    logits = z @ (w / scale[:, None]) + (b - (mean / scale) @ w)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]
    return jnp.sum(weights * ce) + 0.5 * l2 * jnp.sum(w * w)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  def cond(carry):
    _, state, previous = carry
    count = otu.tree_get(state, "count")
    grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
    lowered = otu.tree_get(state, "value") < previous  # Else float32 precision is reached.
    return (count == 0) | ((count < steps) & (grad_norm >= GRAD_TOL) & lowered)

  def body(carry):
    params, state, _ = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn)
    return optax.apply_updates(params, updates), state, value

  start = (init, opt.init(init), jnp.asarray(jnp.inf, jnp.float32))
  params, state, previous = jax.lax.while_loop(cond, body, start)
  converged = ((otu.tree_norm(otu.tree_get(state, "grad")) < GRAD_TOL)
               | (otu.tree_get(state, "value") >= previous))
  count = otu.tree_get(state, "count")
  return params, jnp.where(converged, jnp.minimum(count, steps - 1), count)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_paths(z, y, weights, means, scales, l2s, *, num_classes: int, steps: int):
  """For each mask (weights [F, N], means / scales [F, D]) and each L2 of `l2s` (descending, each
  fit warm-started from the previous one): W [F, L, D, K], b [F, L, K], iterations [F, L]."""
  init = (jnp.zeros((z.shape[1], num_classes), jnp.float32), jnp.zeros(num_classes, jnp.float32))

  def per_mask(args):
    w, mean, scale = args

    def per_l2(params, l2):
      params, count = _lbfgs_fit(z, y, w, mean, scale, l2, params, steps)
      return params, (params, count)

    return jax.lax.scan(per_l2, init, l2s)[1]

  (w, b), counts = jax.lax.map(per_mask, (weights, means, scales))
  return w, b, counts


def _fit_masked(x, y, num_classes, masks, l2s, *, steps, pad_to=None):
  """Fits on the rows of each boolean mask [F, N] for each L2: raw-space W [F, L, D, K] and
  b [F, L, K] (float64) and iterations [F, L]. Rows are zero-padded (weight 0) to `pad_to` so
  differently sized calls share one compilation."""
  x = np.asarray(x, np.float32)
  masks = np.asarray(masks, bool)
  center, spread = _moments(x)  # Only a numerically friendly reparametrisation; see below.
  z = (x - center) / spread
  weights = masks / masks.sum(1, keepdims=True)
  means = np.stack([z[m].mean(0) for m in masks])
  scales = np.stack([z[m].std(0) for m in masks])
  scales = np.where(scales > 1e-6, scales, 1.0)
  pad = max(0, (pad_to or 0) - len(x))
  z_dev, y_dev = np.pad(z, ((0, pad), (0, 0))), np.pad(np.asarray(y, np.int32), (0, pad))
  weights = np.pad(weights, ((0, 0), (0, pad)))
  w, b, counts = _fit_paths(z_dev, y_dev, weights.astype(np.float32), means.astype(np.float32),
                            scales.astype(np.float32), np.asarray(l2s, np.float32),
                            num_classes=num_classes, steps=steps)
  w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
  # Each fit standardises with its own mask's moments: ((x - center)/spread - mean) / scale.
  total_scale = spread[None, :] * scales  # [F, D]
  offset = center[None, :] + spread[None, :] * means
  w_raw = w / total_scale[:, None, :, None]
  b_raw = b - np.einsum("fd,fldk->flk", offset / total_scale, w)
  return w_raw, b_raw, np.asarray(counts)


def _moments(x):
  """Mean and std (1 where constant) of the columns of x, in float64."""
  x = np.asarray(x, np.float64)
  std = x.std(0)
  return x.mean(0), np.where(std > 0, std, 1.0)


def fit_logistic(x, y, num_classes: int, l2: float, *, steps: int = DEFAULT_STEPS,
                 pad_to: int | None = None, return_iterations: bool = False):
  """(W [D, K], b [K]) of a multinomial logistic regression on (x [N, D], y [N]); with
  `return_iterations`, also the L-BFGS iterations used (`steps`: stopped at the cap).

  Minimises mean cross-entropy + l2/2 |W|^2 over features standardised with x's mean and std;
  the standardisation is folded into the returned float64 (W, b), so `predict(W, b, x)`, i.e.
  argmax(x @ W + b), takes raw features. Deterministic; see the module docstring for the solver.
  """
  w, b, counts = _fit_masked(x, y, num_classes, np.ones((1, len(x)), bool), [l2], steps=steps,
                             pad_to=pad_to)
  if return_iterations:
    return w[0, 0], b[0, 0], int(counts[0, 0])
  return w[0, 0], b[0, 0]


def predict(w, b, x) -> np.ndarray:
  """Predicted class indices [N] of raw features x [N, D]."""
  return np.argmax(np.asarray(x, np.float64) @ w + b, axis=1)


# --- Folds ----------------------------------------------------------------------------------------
def group_ids(subject) -> np.ndarray | None:
  """Grouping ids from subject ids (-1: unknown, each such row its own group); None when no row
  has a subject."""
  subject = np.asarray(subject, np.int64)
  unknown = subject < 0
  if unknown.all():
    return None
  groups = subject.copy()
  groups[unknown] = subject.max() + 1 + np.arange(unknown.sum())
  return groups


def stratified_folds(labels, k: int, rng, groups=None) -> np.ndarray:
  """Fold id in [0, k) of each row: label proportions balanced across folds; with `groups`, all
  rows of a group in one fold. Deterministic given the rng's state."""
  labels = np.asarray(labels, np.int64)
  if groups is None:
    folds = np.empty(len(labels), np.int64)
    offset = 0
    for c in np.unique(labels):
      rows = rng.permutation(np.flatnonzero(labels == c))
      folds[rows] = (offset + np.arange(len(rows))) % k
      offset += len(rows)
    return folds
  return _grouped_folds(labels, k, rng, np.asarray(groups))


def _grouped_folds(labels, k, rng, groups) -> np.ndarray:
  """Greedy stratified group k-fold: groups, largest first (ties in random order), each go to the
  fold that keeps the per-class fractions most even (then the smallest fold); no fold is left
  empty."""
  uniq, group_of_row = np.unique(groups, return_inverse=True)
  num_classes = labels.max() + 1
  counts = np.zeros((len(uniq), num_classes))
  np.add.at(counts, (group_of_row, labels), 1)
  order = rng.permutation(len(uniq))
  order = order[np.argsort(-counts[order].sum(1), kind="stable")]
  class_total = np.maximum(counts.sum(0), 1)
  fold_counts = np.zeros((k, num_classes))
  group_fold = np.empty(len(uniq), np.int64)
  for position, g in enumerate(order):
    candidates = np.arange(k)
    empty = candidates[fold_counts.sum(1) == 0]
    if len(order) - position <= len(empty):
      candidates = empty
    costs = [np.std((fold_counts + np.eye(k)[f][:, None] * counts[g]) / class_total, 0).mean()
             for f in candidates]
    sizes = fold_counts[candidates].sum(1)
    best = candidates[np.lexsort((candidates, sizes, np.round(costs, 12)))[0]]
    fold_counts[best] += counts[g]
    group_fold[g] = best
  return group_fold[group_of_row]


# --- Choosing L2 ----------------------------------------------------------------------------------
def select_l2(x, y, num_classes: int, *, groups=None, grid=DEFAULT_GRID, folds: int = INNER_FOLDS,
              seed=0, steps: int = DEFAULT_STEPS, pad_to: int | None = None) -> dict:
  """The L2 of `grid` with the best mean (over inner folds of x) held-out mean class accuracy.

  Only (x, y) is seen: pass the training part alone. Inner folds are stratified and grouped by
  `groups` when given; their number is min(folds, number of groups). Returns {"l2", "grid"
  (ascending), "scores" (per grid value), "folds", "w", "b" (the fit on all of x at the chosen
  L2, from the same compiled path as the inner fits: no second fit needed), "fits" and
  "capped_fits" (how many of them stopped at the `steps` cap)}.
  """
  grid = sorted(float(v) for v in grid)
  units = len(np.unique(groups)) if groups is not None else len(y)
  k = min(folds, units)
  if k < 2:
    raise UserError(f"too few {'subjects' if groups is not None else 'examples'} ({units}) in "
                    f"the training part to choose L2 by cross-validation; give --l2")
  inner = stratified_folds(y, k, np.random.default_rng(seed), groups)
  masks = np.stack([inner != f for f in range(k)] + [np.ones(len(y), bool)])  # Last: all rows.
  descending = grid[::-1]
  w, b, counts = _fit_masked(x, y, num_classes, masks, descending, steps=steps, pad_to=pad_to)
  scores = np.zeros((k, len(grid)))
  for f in range(k):
    held = ~masks[f]
    for j in range(len(grid)):
      confusion = confusion_matrix(y[held], predict(w[f, j], b[f, j], x[held]), num_classes)
      scores[f, j] = metrics_from_confusion(confusion)[SCORE]
  mean = scores.mean(0)
  best = int(np.argmax(mean))  # The first best of the descending grid: the larger L2 on ties.
  return {"l2": descending[best], "grid": grid, "scores": mean[::-1].tolist(), "folds": k,
          "w": w[k, best], "b": b[k, best], "fits": int(counts.size),
          "capped_fits": int(np.sum(counts >= steps))}


# --- Evaluation -----------------------------------------------------------------------------------
def evaluate_split(train, test, train_rows, test_rows, *, l2=None, grid=DEFAULT_GRID, seed=0,
                   steps: int = DEFAULT_STEPS, pad_to: int | None = None) -> dict:
  """Fits on train[train_rows] (L2 fixed or chosen there) and scores test[test_rows]."""
  num_classes = len(train["class_names"])
  x, y = train["features"][train_rows], train["labels"][train_rows]
  if l2 is not None:
    w, b, count = fit_logistic(x, y, num_classes, float(l2), steps=steps, pad_to=pad_to,
                               return_iterations=True)
    chosen = {"l2": float(l2), "grid": None, "scores": None, "folds": 0, "fits": 1,
              "capped_fits": int(count >= steps)}
  else:
    chosen = select_l2(x, y, num_classes, groups=_inner_groups(train, train_rows), grid=grid,
                       seed=seed, steps=steps, pad_to=pad_to)
    w, b = chosen["w"], chosen["b"]  # select_l2's full-data fit at the chosen L2.
  y_test = test["labels"][test_rows]
  confusion = confusion_matrix(y_test, predict(w, b, test["features"][test_rows]), num_classes)
  metrics = metrics_from_confusion(confusion, class_names=train["class_names"])
  return {"num_train": int(len(train_rows)), "num_test": int(len(test_rows)),
          "l2": chosen["l2"], "cv_scores": chosen["scores"], "inner_folds": chosen["folds"],
          **{key: metrics[key] for key in ("accuracy", "mean_class_accuracy", "macro_f1")},
          "confusion": metrics["confusion"], "fits": chosen["fits"],
          "capped_fits": chosen["capped_fits"]}


def _inner_groups(data, rows):
  """Groups for the inner folds: subjects when known, else the file's own folds when known."""
  groups = group_ids(data["subject"][rows])
  if groups is None and (data["fold"][rows] >= 0).all():
    groups = data["fold"][rows]
  return groups


def outer_folds(data, folds: str, seed: int) -> np.ndarray:
  """Fold id of each row of `data` for `--folds fold|K` (see the module docstring)."""
  path, labels = data["filename"], data["labels"]
  if folds == "fold":
    missing = int(np.sum(data["fold"] < 0))
    if missing:
      raise UserError(f"{path}: --folds fold needs fold ids, but {missing} of {len(labels)} "
                      f"rows have none (-1); use --folds K")
    if len(np.unique(data["fold"])) < 2:
      raise UserError(f"{path}: --folds fold needs at least 2 distinct fold ids")
    return data["fold"]
  k = _parse_k(folds)
  present = np.flatnonzero(np.bincount(labels, minlength=len(data["class_names"])))
  counts = np.bincount(labels)[present]
  if k > counts.min():
    name = data["class_names"][present[np.argmin(counts)]]
    raise UserError(f"--folds {k}: more folds than the {counts.min()} example(s) of class "
                    f"{name!r} in {path}")
  groups = group_ids(data["subject"])
  if groups is not None and k > len(np.unique(groups)):
    raise UserError(f"--folds {k}: more folds than the {len(np.unique(groups))} subjects in "
                    f"{path}")
  return stratified_folds(labels, k, np.random.default_rng(seed), groups)


def _parse_k(folds) -> int:
  try:
    k = int(folds)
  except (TypeError, ValueError):
    raise UserError(f"--folds: expected 'fold' or a number of folds >= 2, got {folds!r}") from None
  if k < 2:
    raise UserError(f"--folds: expected 'fold' or a number of folds >= 2, got {folds!r}")
  return k


def cross_validate(data, folds: str, *, l2=None, grid=DEFAULT_GRID, seed: int = 0,
                   steps: int = DEFAULT_STEPS) -> list[dict]:
  """One `evaluate_split` result (plus "fold") per held-out fold of `data`."""
  fold_of = outer_folds(data, folds, seed)
  ids = np.unique(fold_of)
  pad_to = max(int(np.sum(fold_of != f)) for f in ids)  # One compilation for every fold.
  results = []
  for i, f in enumerate(ids):
    train_rows, test_rows = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
    result = evaluate_split(data, data, train_rows, test_rows, l2=l2, grid=grid,
                            seed=[seed, i + 1], steps=steps, pad_to=pad_to)
    results.append({"fold": int(f), **result})
  return results


def summarize(per_fold: list[dict], class_names) -> dict:
  """Mean and std (ddof=0) over folds, and the metrics of the pooled confusion matrix."""
  summary = {}
  for key in ("accuracy", "mean_class_accuracy", "macro_f1"):
    values = np.array([r[key] for r in per_fold])
    summary[key] = {"mean": float(values.mean()), "std": float(values.std())}
  pooled = np.sum([np.asarray(r["confusion"]) for r in per_fold], axis=0)
  return {"summary": summary, "pooled": metrics_from_confusion(pooled, class_names=class_names)}


def run_probe(train_path, test_path=None, folds=None, *, l2=None, seed: int = 0,
              grid=DEFAULT_GRID, steps: int = DEFAULT_STEPS,
              allow_other_run: bool = False) -> dict:
  """The probe's JSON-ready result for `ferjax probe` (see the module docstring)."""
  _check_mode(test_path, folds, l2)
  train = read_features(train_path)
  present = np.unique(train["labels"])
  if len(present) < 2:
    raise UserError(f"{train_path}: key 'labels': all {len(train['labels'])} examples are of one "
                    f"class ({train['class_names'][present[0]]!r}); a probe needs at least 2 "
                    "classes")
  if test_path is None:
    per_fold = cross_validate(train, str(folds), l2=l2, grid=grid, seed=seed, steps=steps)
  else:
    test = read_features(test_path)
    _check_compatible(train, test)
    if not allow_other_run:
      _check_same_run(train, test)
    per_fold = [{"fold": None, **evaluate_split(
        train, test, np.arange(len(train["labels"])), np.arange(len(test["labels"])), l2=l2,
        grid=grid, seed=seed, steps=steps)}]
  settings = {"train": str(train_path), "test": None if test_path is None else str(test_path),
              "folds": None if folds is None else str(folds), "seed": int(seed),
              "l2": None if l2 is None else float(l2), "l2_grid": None if l2 is not None else
              sorted(float(v) for v in grid), "inner_folds": INNER_FOLDS, "steps": int(steps),
              "selected_by": SCORE, "dataset": train["dataset"], "split": train["split"],
              "workdir": train["workdir"], "step": int(train["step"])}
  capped = sum(r["capped_fits"] for r in per_fold)
  return {**settings, "class_names": list(train["class_names"]), "per_fold": per_fold,
          "fits": sum(r["fits"] for r in per_fold), "capped_fits": capped,
          **summarize(per_fold, train["class_names"])}


def _check_mode(test_path, folds, l2) -> None:
  if test_path is not None and folds is not None:
    raise UserError("--folds: not with --test (--test scores one fit on the test file)")
  if test_path is None and folds is None:
    raise UserError("--train alone needs --folds fold|K (or give --test FILE)")
  if folds is not None and str(folds) != "fold":
    _parse_k(folds)
  if l2 is not None and not (np.isfinite(l2) and l2 >= 0):
    raise UserError(f"--l2: expected a finite number >= 0, got {l2}")


def _check_compatible(train, test) -> None:
  if train["class_names"] != test["class_names"]:
    raise UserError(f"{test['filename']}: class names {list(test['class_names'])} differ from "
                    f"{train['filename']}'s {list(train['class_names'])}")
  if train["features"].shape[1] != test["features"].shape[1]:
    raise UserError(f"{test['filename']}: {test['features'].shape[1]}-d features, but "
                    f"{train['filename']} has {train['features'].shape[1]}-d ones")


def run_of(data) -> tuple[str, int] | None:
  """(resolved workdir, step) of the run that wrote a features file; None when unknown (a file
  that records a relative workdir: written before the path was stored resolved)."""
  workdir = str(data["workdir"])
  return (workdir, int(data["step"])) if pathlib.PurePath(workdir).is_absolute() else None


def _check_same_run(train, test) -> None:
  a, b = run_of(train), run_of(test)
  if a is not None and a == b:
    return
  describe = lambda run: "an unknown run" if run is None else f"{run[0]} at step {run[1]}"
  raise UserError(f"--test {test['filename']}: features of {describe(b)}, --train "
                  f"{train['filename']}'s of {describe(a)}: a probe compares features of one "
                  "run (pass --allow-other-run for a deliberate transfer)")


# --- Output ---------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
  """Per-fold lines and a `mean ± std` line."""
  head = (f"{'fold':>10} {'train':>6} {'test':>6} {'l2':>8}  {'accuracy':>15}  "
          f"{'mean class acc':>15}  {'macro-F1':>15}")
  lines = [head]
  for r in result["per_fold"]:
    name = "test" if r["fold"] is None else str(r["fold"])
    lines.append(f"{name:>10} {r['num_train']:>6} {r['num_test']:>6} {r['l2']:>8.1e}  "
                 f"{r['accuracy']:>15.4f}  {r['mean_class_accuracy']:>15.4f}  "
                 f"{r['macro_f1']:>15.4f}")
  s = result["summary"]
  cells = "  ".join(f"{s[k]['mean']:.4f} ± {s[k]['std']:.4f}".rjust(15)
                    for k in ("accuracy", "mean_class_accuracy", "macro_f1"))
  lines.append(f"{'mean ± std':>10} {'':>6} {'':>6} {'':>8}  {cells}")
  return "\n".join(lines)


def confusion_path(out) -> pathlib.Path:
  """FILE_confusion.png beside FILE.json."""
  out = pathlib.Path(out)
  return out.with_name(f"{out.stem}_confusion.png")


def write_outputs(result: dict, out) -> None:
  """The confusion PNG, then the JSON, each replaced atomically."""
  out = pathlib.Path(out)
  png = confusion_path(out)
  title = f"probe {result['dataset']} ({result['folds'] or 'train/test'}): pooled"
  with writing.atomic_path(png) as partial:
    plots.save_confusion(result["pooled"]["confusion"], result["class_names"], partial,
                         title=title)
  writing.write_atomic(out, json.dumps(result, indent=2) + "\n")


def _check_out(out, inputs) -> None:
  """--out and the confusion PNG beside it: neither an input, nor a file the probe did not
  write (an earlier probe result, and its PNG, may be replaced)."""
  out = pathlib.Path(out)
  png = confusion_path(out)
  for path, what in ((out, "--out"), (png, f"--out {out}: its confusion plot")):
    writing.refuse_clobbering(path, inputs=inputs, what=what)
  if out.is_dir():
    raise UserError(f"--out {out}: is a folder (expected a .json file path)")
  if not out.parent.is_dir():
    raise UserError(f"--out {out}: folder {out.parent} does not exist")
  earlier = _is_probe_result(out)
  if (out.exists() or out.is_symlink()) and not earlier:
    raise UserError(f"--out {out}: already exists and is not a `ferjax probe` result: choose "
                    "another name (nothing was written)")
  if (png.exists() or png.is_symlink()) and not earlier:
    raise UserError(f"--out {out}: {png} already exists and was not written by `ferjax probe` "
                    "with this --out: choose another name (nothing was written)")
  workdir_lib.check_writable(out.parent, "--out")


def _is_probe_result(path) -> bool:
  """Whether `path` is a regular file holding a `ferjax probe` result."""
  path = pathlib.Path(path)
  if path.is_symlink() or not path.is_file():
    return False
  try:
    result = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, ValueError):
    return False
  return isinstance(result, dict) and {"per_fold", "summary", "selected_by"} <= set(result)


def cli_main(args) -> int:
  """`ferjax probe`: see the module docstring."""
  out = getattr(args, "out", None)
  test = getattr(args, "test", None)
  if out is not None:
    _check_out(out, [args.train, test])
  result = run_probe(args.train, test, getattr(args, "folds", None),
                     l2=getattr(args, "l2", None), seed=int(getattr(args, "seed", 0) or 0),
                     allow_other_run=bool(getattr(args, "allow_other_run", False)))
  if out is not None:
    write_outputs(result, out)
  print(format_table(result))
  if result["capped_fits"]:
    print(f"ferjax: warning: {result['capped_fits']} of {result['fits']} fits stopped at the "
          f"{result['steps']}-iteration cap before converging (their scores may be off)",
          file=sys.stderr)
  if out is not None:
    print(f"-> {out} ({confusion_path(out).name})")
  return 0

"""Linear probes on frozen features (`ferjax probe`): the fit, the folds, L2 selection that sees
only the training part, the outputs, and one-line errors for bad input."""

import argparse
import json

import numpy as np
import pytest

from ferjax import probe
from ferjax.errors import UserError

NAMES = ("anger", "happy", "sad")


def make_features(path, *, per_class=(20, 20, 20), dim=8, spread=0.3, seed=0, subjects=None,
                  folds=None, names=NAMES, **overrides):
  """Writes a `ferjax features` file of Gaussian blobs (one per class, unit-spaced centres) and
  returns its path; `overrides` replace (or, set to None, drop) keys."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(len(per_class)), per_class).astype(np.int32)
  centres = np.eye(len(names), dim) * 3
  features = (centres[labels] + rng.normal(0, spread, (len(labels), dim))).astype(np.float32)
  n = len(labels)
  arrays = {
      "features": features, "logits": rng.normal(size=(n, 7)).astype(np.float32),
      "labels": labels, "class_names": np.asarray(names, dtype=str),
      "model_class_names": np.asarray([f"m{k}" for k in range(7)], dtype=str),
      "path": np.asarray([f"synthetic/all/{i}" for i in range(n)], dtype=str),
      "index": np.arange(n, dtype=np.int64),
      "subject": np.full(n, -1, np.int32) if subjects is None else np.asarray(subjects, np.int32),
      "fold": np.full(n, -1, np.int32) if folds is None else np.asarray(folds, np.int32),
      "dataset": np.asarray("synthetic"), "split": np.asarray("all"),
      "workdir": np.asarray("/runs/x"), "step": np.asarray(10), "format_version": np.asarray(1)}
  arrays.update(overrides)
  with open(path, "wb") as f:
    np.savez(f, **{k: v for k, v in arrays.items() if v is not None})
  return path


def blobs(n_per_class=40, dim=8, num_classes=3, spread=0.3, seed=0):
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(num_classes), n_per_class)
  x = np.eye(num_classes, dim)[y] * 3 + rng.normal(0, spread, (len(y), dim))
  return x.astype(np.float32), y


def namespace(train, test=None, folds=None, l2=None, seed=0, out=None, allow_other_run=False):
  return argparse.Namespace(train=str(train), test=None if test is None else str(test),
                            folds=folds, l2=l2, seed=seed, out=None if out is None else str(out),
                            allow_other_run=allow_other_run)


# --- The fit ----------------------------------------------------------------------------------
def test_fit_separates_blobs():
  x, y = blobs()
  x_test, y_test = blobs(seed=1)
  w, b = probe.fit_logistic(x, y, 3, 1e-4)
  assert (probe.predict(w, b, x) == y).mean() == 1.0
  assert (probe.predict(w, b, x_test) == y_test).mean() >= 0.99


def test_random_labels_give_chance_on_new_data():
  rng = np.random.default_rng(0)
  x, x_test = rng.normal(size=(600, 8)).astype(np.float32), rng.normal(size=(600, 8))
  y, y_test = rng.integers(0, 3, 600), rng.integers(0, 3, 600)
  w, b = probe.fit_logistic(x, y, 3, 1e-2)
  assert abs((probe.predict(w, b, x_test) == y_test).mean() - 1 / 3) < 0.08


def test_predictions_are_argmax_of_raw_features_and_standardisation_invariant():
  x, y = blobs(spread=1.5)  # Overlapping: predictions are not trivially the labels.
  w, b = probe.fit_logistic(x, y, 3, 1e-2)
  assert w.shape == (8, 3) and b.shape == (3,)
  np.testing.assert_array_equal(probe.predict(w, b, x), np.argmax(x @ w + b, axis=1))
  # The fit standardises, so an affine change of the features changes nothing.
  shifted = x * np.linspace(0.1, 50, 8, dtype=np.float32) + 7
  w2, b2 = probe.fit_logistic(shifted, y, 3, 1e-2)
  np.testing.assert_array_equal(probe.predict(w2, b2, shifted), probe.predict(w, b, x))


def test_fit_is_deterministic_and_padding_changes_nothing():
  x, y = blobs(spread=1.5)
  w, b = probe.fit_logistic(x, y, 3, 1e-3)
  w2, b2 = probe.fit_logistic(x, y, 3, 1e-3)
  np.testing.assert_array_equal(w, w2)
  np.testing.assert_array_equal(b, b2)
  w3, b3 = probe.fit_logistic(x, y, 3, 1e-3, pad_to=len(y) + 17)
  np.testing.assert_allclose(x @ w3 + b3, x @ w + b, atol=1e-3)


def test_select_l2_reports_grid_and_prefers_regularisation_on_noise():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(90, 8)).astype(np.float32), rng.integers(0, 3, 90)
  chosen = probe.select_l2(x, y, 3, grid=(1e-6, 1e-3, 10.0))
  assert chosen["grid"] == [1e-6, 1e-3, 10.0] and len(chosen["scores"]) == 3
  assert chosen["l2"] in chosen["grid"] and chosen["folds"] == probe.INNER_FOLDS
  w, b = probe.fit_logistic(x, y, 3, chosen["l2"])  # The returned fit is the full-data one.
  assert np.mean(probe.predict(chosen["w"], chosen["b"], x) == probe.predict(w, b, x)) > 0.95


# --- Folds --------------------------------------------------------------------------------------
def test_stratified_folds_balance_classes():
  y = np.repeat(np.arange(3), [30, 12, 9])
  folds = probe.stratified_folds(y, 3, np.random.default_rng(0))
  for c, total in enumerate([30, 12, 9]):
    assert sorted(np.bincount(folds[y == c], minlength=3)) == [total // 3] * 3


def test_subject_grouping_keeps_subjects_disjoint(tmp_path):
  rng = np.random.default_rng(0)
  subjects = rng.integers(0, 15, 60)
  data = probe.read_features(make_features(tmp_path / "a.npz", subjects=subjects))
  folds = probe.outer_folds(data, "4", seed=0)
  assert len(np.unique(folds)) == 4
  for s in np.unique(subjects):
    assert len(np.unique(folds[subjects == s])) == 1, f"subject {s} on both sides"
  # Unknown subjects (-1) are each their own group.
  assert probe.group_ids([-1, 3, -1, 3]).tolist()[1] == probe.group_ids([-1, 3, -1, 3])[3]
  assert len(set(probe.group_ids([-1, 3, -1, 3]).tolist())) == 3


def test_given_folds_are_respected_and_selection_sees_only_training_rows(tmp_path, monkeypatch):
  folds = np.tile(np.arange(4), 15)
  data = probe.read_features(make_features(tmp_path / "a.npz", folds=folds, spread=1.0))
  row_of = {x.tobytes(): i for i, x in enumerate(data["features"])}
  seen = {"select": [], "fit": []}
  for name in ("select_l2", "fit_logistic"):
    original = getattr(probe, name)

    def spy(x, *args, _original=original, _name=name, **kwargs):
      seen["select" if _name == "select_l2" else "fit"].append({row_of[r.tobytes()] for r in x})
      return _original(x, *args, **kwargs)

    monkeypatch.setattr(probe, name, spy)
  results = probe.cross_validate(data, "fold", grid=(1e-4, 1e-1), steps=30)
  assert [r["fold"] for r in results] == [0, 1, 2, 3]
  # The final fit comes from select_l2's path (all training rows): no second fit.
  assert len(seen["select"]) == 4 and seen["fit"] == []
  for f, r in enumerate(results):
    train_rows = set(np.flatnonzero(folds != f).tolist())
    assert seen["select"][f] == train_rows
    assert r["num_test"] == 15 and r["num_train"] == 45 and r["l2"] in (1e-4, 1e-1)


def test_fixed_l2_skips_selection(tmp_path, monkeypatch):
  path = make_features(tmp_path / "a.npz")
  monkeypatch.setattr(probe, "select_l2", lambda *a, **k: pytest.fail("select_l2 called"))
  result = probe.run_probe(path, folds="3", l2=1e-3, steps=30)
  assert [r["l2"] for r in result["per_fold"]] == [1e-3] * 3 and result["l2_grid"] is None


def test_single_example_class_is_fine_with_given_folds(tmp_path):
  folds = np.tile(np.arange(3), 11)[:31]
  path = make_features(tmp_path / "a.npz", per_class=(15, 15, 1), folds=folds)
  result = probe.run_probe(path, folds="fold", grid=(1e-3,), steps=30)
  assert len(result["per_fold"]) == 3
  assert result["pooled"]["num_examples"] == 31


def test_same_seed_same_result(tmp_path):
  path = make_features(tmp_path / "a.npz", spread=1.2, subjects=np.arange(60) // 3)
  first = probe.run_probe(path, folds="3", seed=5, grid=(1e-4, 1e-1), steps=30)
  again = probe.run_probe(path, folds="3", seed=5, grid=(1e-4, 1e-1), steps=30)
  assert first == again
  other = probe.outer_folds(probe.read_features(path), "3", seed=6)
  assert not np.array_equal(other, probe.outer_folds(probe.read_features(path), "3", seed=5))


# --- The command --------------------------------------------------------------------------------
def test_cli_folds_writes_json_png_and_table(tmp_path, capsys):
  path = make_features(tmp_path / "a.npz", folds=np.tile(np.arange(3), 20))
  out = tmp_path / "probe.json"
  assert probe.cli_main(namespace(path, folds="fold", out=out)) == 0
  result = json.loads(out.read_text())
  assert result["folds"] == "fold" and len(result["per_fold"]) == 3
  assert result["l2_grid"] == sorted(probe.DEFAULT_GRID)
  assert all(r["l2"] in result["l2_grid"] and len(r["cv_scores"]) == 10
             for r in result["per_fold"])
  assert result["summary"]["accuracy"]["mean"] >= 0.99
  assert set(result["summary"]) == {"accuracy", "mean_class_accuracy", "macro_f1"}
  assert np.sum(result["pooled"]["confusion"]) == 60
  assert (tmp_path / "probe_confusion.png").stat().st_size > 0
  table = capsys.readouterr().out
  assert "mean ± std" in table and len(table.strip().splitlines()) == 1 + 3 + 1 + 1
  assert not list(tmp_path.glob(".*partial*"))


def test_cli_train_test(tmp_path, capsys):
  train = make_features(tmp_path / "a.npz")
  test = make_features(tmp_path / "b.npz", seed=1)
  assert probe.cli_main(namespace(train, test=test)) == 0
  assert "mean ± std" in capsys.readouterr().out
  result = probe.run_probe(train, test, l2=1e-3, steps=30)
  assert result["per_fold"][0]["num_test"] == 60 and result["summary"]["accuracy"]["mean"] >= 0.99


# --- Bad input: one line each ---------------------------------------------------------------------
def _bad(tmp_path, case):
  """(Namespace, words the error must contain) of one bad-input case."""
  good = make_features(tmp_path / "good.npz")
  bad = tmp_path / "bad.npz"
  if case == "missing file":
    return namespace(tmp_path / "nope.npz", folds="3"), ["nope.npz", "no such file"]
  if case == "not an npz":
    bad.write_text("hello")
    return namespace(bad, folds="3"), ["bad.npz", "not a .npz"]
  if case == "a single array":
    np.save(tmp_path / "bad.npy", np.zeros(3))
    return namespace(tmp_path / "bad.npy", folds="3"), ["bad.npy", "not a .npz"]
  if case == "missing key":
    make_features(bad, subject=None)
    return namespace(bad, folds="3"), ["bad.npz", "missing", "subject"]
  if case == "wrong dtype":
    make_features(bad, labels=np.zeros(60, np.float32))
    return namespace(bad, folds="3"), ["bad.npz", "'labels'", "integer"]
  if case == "wrong shape":
    make_features(bad, features=np.zeros(60, np.float32))
    return namespace(bad, folds="3"), ["bad.npz", "'features'", "2-d"]
  if case == "row mismatch":
    make_features(bad, fold=np.zeros(59, np.int32))
    return namespace(bad, folds="3"), ["bad.npz", "'fold'", "59 rows"]
  if case == "non-finite":
    features = np.ones((60, 8), np.float32)
    features[3, 2] = np.nan
    make_features(bad, features=features)
    return namespace(bad, folds="3"), ["bad.npz", "'features'", "nan"]
  if case == "no examples":
    make_features(bad, per_class=(0, 0, 0))
    return namespace(bad, folds="3"), ["bad.npz", "no examples"]
  if case == "label out of range":
    make_features(bad, labels=np.full(60, 3, np.int32))
    return namespace(bad, folds="3"), ["bad.npz", "'labels'", "[0, 3)"]
  if case == "format version":
    make_features(bad, format_version=np.asarray(2))
    return namespace(bad, folds="3"), ["bad.npz", "format_version"]
  if case == "class names differ":
    make_features(bad, names=("anger", "sad", "happy"))
    return namespace(good, test=bad), ["bad.npz", "class names", "differ"]
  if case == "feature size differs":
    make_features(bad, dim=5)
    return namespace(good, test=bad), ["bad.npz", "5-d"]
  if case == "fold without ids":
    return namespace(good, folds="fold"), ["good.npz", "--folds fold", "-1"]
  if case == "too many folds for a class":
    make_features(bad, per_class=(20, 20, 4))
    return namespace(bad, folds="5"), ["--folds 5", "'sad'", "4 example"]
  if case == "too many folds for subjects":
    make_features(bad, subjects=np.arange(60) % 4)
    return namespace(bad, folds="5"), ["--folds 5", "4 subjects"]
  if case == "bad folds value":
    return namespace(good, folds="ten"), ["--folds", "'ten'"]
  if case == "one fold":
    return namespace(good, folds="1"), ["--folds", "'1'"]
  if case == "folds and test":
    return namespace(good, test=good, folds="3"), ["--folds", "--test"]
  if case == "neither folds nor test":
    return namespace(good), ["--folds", "--test"]
  if case == "negative l2":
    return namespace(good, folds="3", l2=-1.0), ["--l2", "-1"]
  if case == "out folder missing":
    return namespace(good, folds="3", out=tmp_path / "no" / "p.json"), ["--out", "does not exist"]
  if case == "too few subjects to choose l2":
    make_features(bad, subjects=np.zeros(60))
    return namespace(bad, test=good), ["too few subjects", "--l2"]
  raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "missing file", "not an npz", "a single array", "missing key", "wrong dtype", "wrong shape",
    "row mismatch", "non-finite", "no examples", "label out of range", "format version",
    "class names differ", "feature size differs", "fold without ids",
    "too many folds for a class", "too many folds for subjects", "bad folds value", "one fold",
    "folds and test", "neither folds nor test", "negative l2", "out folder missing",
    "too few subjects to choose l2"])
def test_bad_input_is_one_line(tmp_path, case):
  args, words = _bad(tmp_path, case)
  before = sorted(p.name for p in tmp_path.iterdir())
  with pytest.raises(UserError) as raised:
    probe.cli_main(args)
  message = str(raised.value)
  assert "\n" not in message
  for word in words:
    assert word.lower() in message.lower(), f"{word!r} not in: {message}"
  assert sorted(p.name for p in tmp_path.iterdir()) == before  # Nothing written.


def test_features_written_by_evaluate_are_read_by_probe(tmp_path):
  import types
  from ferjax import evaluate
  from ferjax.data.dataset import Dataset
  n, dim = 6, 4
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
  dataset = Dataset(images=np.zeros((n, 2, 2, 1), np.uint8), labels=labels,
                    class_names=("anger", "happy", "sad"), name="stub", split="test",
                    extras={"subject": np.arange(n) // 2})
  run = types.SimpleNamespace(class_names=("anger", "happy", "sad"), workdir=tmp_path / "run",
                              step=7)
  features = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
  logits = np.random.default_rng(1).normal(size=(n, 3)).astype(np.float32)
  path = tmp_path / "f.npz"
  evaluate.write_features(path, dataset, features, logits, run, "test")
  data = probe.read_features(path)
  np.testing.assert_array_equal(data["features"], features)
  np.testing.assert_array_equal(data["logits"], logits)
  np.testing.assert_array_equal(data["labels"], labels)
  np.testing.assert_array_equal(data["subject"], np.arange(n) // 2)
  np.testing.assert_array_equal(data["fold"], -np.ones(n))
  assert data["class_names"] == ("anger", "happy", "sad") and data["step"] == 7
  assert data["dataset"] == "stub" and data["split"] == "test"
  assert data["format_version"] == evaluate.FEATURES_FORMAT_VERSION


# --- Convergence ----------------------------------------------------------------------------------
def _objective(x, y, num_classes, l2, w_raw, b_raw):
  """The probe's objective (mean cross-entropy + l2/2 |W|^2 on standardised features) of a fit
  returned in raw-feature form, in float64."""
  x = np.asarray(x, np.float64)
  mean, std = x.mean(0), x.std(0)
  w = w_raw * std[:, None]  # The same logits on standardised features: z @ w + b.
  logits = (x - mean) / std @ w + (b_raw + mean @ w_raw)
  logits -= logits.max(1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  return -log_p[np.arange(len(y)), y].mean() + 0.5 * l2 * np.sum(w * w)


def _reference_optimum(x, y, num_classes, l2) -> float:
  """The minimum of the same objective found independently: scipy's float64 L-BFGS-B run to a
  tight tolerance (or, without scipy, long float64 gradient descent)."""
  x = np.asarray(x, np.float64)
  z = (x - x.mean(0)) / x.std(0)
  n, d = z.shape
  onehot = np.eye(num_classes)[y]

  def value_and_grad(theta):
    w, b = theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
    logits = z @ w + b
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    value = -np.log(p[np.arange(n), y]).mean() + 0.5 * l2 * np.sum(w * w)
    g = (p - onehot) / n
    return value, np.concatenate([(z.T @ g + l2 * w).ravel(), g.sum(0)])

  theta = np.zeros(d * num_classes + num_classes)
  try:
    from scipy import optimize
  except ImportError:
    for _ in range(200_000):
      theta -= 0.5 * value_and_grad(theta)[1]
    return value_and_grad(theta)[0]
  found = optimize.minimize(value_and_grad, theta, jac=True, method="L-BFGS-B",
                            options={"maxiter": 100_000, "gtol": 1e-12, "ftol": 1e-16})
  return float(found.fun)


@pytest.mark.slow
@pytest.mark.parametrize("l2", [1e-6, 6e-6, 1e-3])
def test_fit_reaches_the_optimum_at_small_l2(l2):
  rng = np.random.default_rng(1)
  y = np.repeat(np.arange(4), 20)
  x = (np.eye(4, 32)[y] * 2 + rng.normal(0, 1.0, (len(y), 32))).astype(np.float32)
  w, b, iterations = probe.fit_logistic(x, y, 4, l2, return_iterations=True)
  assert iterations < probe.DEFAULT_STEPS  # Converged, not stopped by the cap.
  gap = _objective(x, y, 4, l2, w, b) - _reference_optimum(x, y, 4, l2)
  assert -1e-7 < gap < 1e-7, gap


@pytest.mark.slow
def test_cap_is_reported(tmp_path, capsys):
  path = make_features(tmp_path / "a.npz", spread=1.0)
  result = probe.run_probe(path, folds="3", l2=1e-6, steps=3)
  assert result["capped_fits"] == result["fits"] == 3
  assert all(r["capped_fits"] == 1 for r in result["per_fold"])
  chosen = probe.run_probe(path, folds="3", grid=(1e-6, 1e-3), steps=3)
  assert chosen["fits"] == 3 * (3 + 1) * 2 and chosen["capped_fits"] > 0


def test_cli_warns_when_the_cap_is_hit(tmp_path, capsys, monkeypatch):
  path = make_features(tmp_path / "a.npz", spread=1.0)
  monkeypatch.setattr(probe, "DEFAULT_STEPS", 3)
  monkeypatch.setattr(probe.run_probe, "__kwdefaults__",
                      {**probe.run_probe.__kwdefaults__, "steps": 3})
  assert probe.cli_main(namespace(path, folds="3", l2=1e-6)) == 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("ferjax: warning: 3 of 3 fits stopped at the "
                                             "3-iteration cap"), err

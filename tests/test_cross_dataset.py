"""One emotion label space across datasets: canonical names, `data.classes`, CK+ folds and
subject-disjoint validation, cross-dataset evaluation, `ferjax features` and joint training.

Fixtures are made here: a CK+-style folder set (40 px RGB, the CK+ class names, contempt
included), a prepared CK+ (tests/test_builders.py's `make_ckplus`), and two tiny runs trained
once per module (CK+ fold 3; a joint synthetic + folder run). Cross-dataset evaluation reuses
the session's shared synthetic run (conftest's `tiny_runs`), copied before anything writes.
"""

import hashlib
import json

import numpy as np
import pytest

from badinput import copy_run, expect_one_line
from ferjax import cli, evaluate, runs
from ferjax.data import Dataset, builders, folder, labels, splits, synthetic
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind
from ferjax.train import classifier as trainer
from test_builders import make_ckplus

CK_NAMES = ("anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise")
FER_NAMES = synthetic.CLASS_NAMES  # angry, disgust, fear, happy, neutral, sad, surprise
PER_CLASS_ALL = 3  # images per class in the folder set's `all` split (contempt: 3 dropped)


def tiny_config(**data):
  """A 2-step ResNet-10 (width 1/8) on 32 px gray images, validated once at the end."""
  config = classifier_kind.default_config()
  config.model.update(name="resnet10", width=0.125)
  config.data.update(image_size=32, channels=1, **data)
  config.optim.warmup_steps = 1
  config.train.update(num_steps=2, batch_size=16, num_devices=1, log_every=1, eval_every=2,
                      checkpoint_every=2)
  config.eval.batch_size = 64
  return config


def write_folder(root, split, counts, names, size=40, channels=3, seed=0):
  """`counts[k]` random images of class `names[k]` in <root>/<split>/<class>/ (class-sorted)."""
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  labels_ = np.repeat(np.arange(len(names)), counts).astype(np.int32)
  images = rng.integers(0, 256, (len(labels_), size, size, channels), dtype=np.uint8)
  folder.write(root, split, images, labels_, names)
  return labels_


def ferjax(argv) -> int:
  return cli.main([str(a) for a in argv])


def sha(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ck_folder(tmp_path_factory):
  """A CK+-style folder dataset at 40 px RGB: `all` (3 per class) and `train` (8 per class)."""
  root = tmp_path_factory.mktemp("folders") / "ckfolder"
  write_folder(root, "all", [PER_CLASS_ALL] * 7, CK_NAMES, seed=1)
  write_folder(root, "train", [8] * 7, CK_NAMES, seed=2)
  return root


@pytest.fixture(scope="module")
def ckplus_dir(tmp_path_factory):
  """A prepared CK+ of 21 subjects (2 frames each, subject s in class s % 7): fold k holds
  subjects k+1, k+11 and k+21."""
  root = tmp_path_factory.mktemp("ckplus")
  make_ckplus(root / "raw", subjects=21)
  builders.prepare("ckplus", root / "raw", data_dir=root / "data", progress=False)
  return root / "data"


@pytest.fixture(scope="module")
def cross_run(tiny_runs, tmp_path_factory):
  """A private copy of the shared 4-step synthetic run (FER-2013 names, 32 px gray)."""
  return copy_run(tiny_runs.classifier, tmp_path_factory.mktemp("cross") / "run")


@pytest.fixture(scope="module")
def ck_run(ckplus_dir, tmp_path_factory):
  """A tiny run on CK+ fold 3, validated on a subject-grouped hold-out of fold3_train."""
  workdir = tmp_path_factory.mktemp("ckrun") / "run"
  config = tiny_config(name="ckplus", data_dir=str(ckplus_dir), fold=3, val_split=None)
  trainer.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def joint_run(ck_folder, tmp_path_factory):
  """A tiny joint run: synthetic (own validation split) + the folder set at weight 0.5 (no
  validation split: a hold-out of its train split)."""
  workdir = tmp_path_factory.mktemp("joint") / "run"
  config = tiny_config(name="joint", datasets="synthetic,folder:0.5", manual_dir=str(ck_folder),
                       num_examples=64)
  trainer.train_and_evaluate(config, workdir)
  return workdir


# =================================================================================================
# 1. The canonical label space and `data.classes` specs
# =================================================================================================
EXPECTED = {
    "fer2013": ("anger", "disgust", "fear", "happy", "neutral", "sad", "surprise"),
    "ferplus": ("neutral", "happy", "surprise", "sad", "anger", "disgust", "fear", "contempt"),
    "rafdb": ("surprise", "fear", "disgust", "happy", "sad", "anger", "neutral"),
    "affectnet": ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger"),
    "affectnet8": ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger",
                   "contempt"),
    "ckplus": ("anger", "contempt", "disgust", "fear", "happy", "sad", "surprise"),
}


def test_canonical_space_is_the_eight_emotions():
  assert labels.CANONICAL == ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger",
                              "contempt")
  assert set(EXPECTED) == set(builders.NAMES)  # A new builder must be added here.


@pytest.mark.parametrize("name", [*EXPECTED, "synthetic"])
def test_every_builder_maps_into_the_canonical_space(name):
  own = synthetic.CLASS_NAMES if name == "synthetic" else builders.info(name)["class_names"]
  mapped = labels.canonical_names(own)
  assert mapped == EXPECTED["fer2013" if name == "synthetic" else name]
  assert set(mapped) <= set(labels.CANONICAL) and len(set(mapped)) == len(mapped)


def test_unknown_names_stay_themselves_lower_cased():
  assert labels.canonical("Happiness") == "happy" and labels.canonical(" ANGRY ") == "anger"
  assert labels.canonical("Cat") == "cat"


HAND = np.array([0, 1, 2, 3, 4, 5, 6, 1, 4, 0], np.int32)  # labels in FER_NAMES


@pytest.mark.parametrize("spec, names, mapping", [
    ("-disgust", ("anger", "fear", "happy", "neutral", "sad", "surprise"),
     [0, -1, 1, 2, 3, 4, 5]),
    ("-Disgusted, -neutral", ("anger", "fear", "happy", "sad", "surprise"),
     [0, -1, 1, 2, -1, 3, 4]),
    ("happy,anger,sadness", ("happy", "anger", "sad"), [1, -1, -1, 0, -1, 2, -1]),
    ("happy,negative=anger+disgust+fear+sad,neutral", ("happy", "negative", "neutral"),
     [1, 1, 1, 0, 2, 1, -1]),
])
def test_class_specs_against_hand_computed_labels(spec, names, mapping):
  new_names, got = labels.class_mapping(FER_NAMES, spec)
  assert new_names == names
  np.testing.assert_array_equal(got, mapping)
  ds = Dataset(np.zeros((len(HAND), 4, 4, 1), np.uint8), HAND, FER_NAMES, "d", "train",
               {"index": np.arange(len(HAND)) * 10})
  sub, line = labels.select_classes(ds, spec)
  expected = np.asarray(mapping)[HAND]
  np.testing.assert_array_equal(sub.labels, expected[expected >= 0])
  np.testing.assert_array_equal(sub.extras["index"], 10 * np.flatnonzero(expected >= 0))
  assert sub.class_names == names and sub.labels.dtype == np.int32
  dropped = int((expected < 0).sum())
  assert (f"({dropped} images)" in line) == bool(dropped), line


@pytest.mark.parametrize("spec, needle", [
    ("-contempt", "'contempt' is not a class"),
    ("happy,bogus", "'bogus' is not a class"),
    ("-disgust,happy", "mixes"),
    ("happy,happy", "named twice"),
    ("negative=anger+sad,anger", "used twice"),
    ("-" + ",-".join(FER_NAMES), "drops every class"),
    (" , ", "expected a comma-separated list"),
    ("=anger", "empty name"),
])
def test_bad_class_specs_name_the_field(spec, needle):
  with pytest.raises(UserError, match="data.classes") as info:
    labels.class_mapping(FER_NAMES, spec)
  assert needle in str(info.value)


# =================================================================================================
# 2. `data.classes` on a run's splits
# =================================================================================================
def test_data_classes_drops_and_renumbers_the_train_split(capsys):
  full = splits.load_split(tiny_config(num_examples=140).data, "train", train=True)
  ds = splits.load_split(tiny_config(num_examples=140, classes="-disgust").data, "train",
                         train=True)
  assert ds.class_names == ("anger", "fear", "happy", "neutral", "sad", "surprise")
  keep = full.labels != FER_NAMES.index("disgust")
  assert len(ds) == keep.sum() < len(full)
  np.testing.assert_array_equal(ds.images, full.images[keep])
  np.testing.assert_array_equal(ds.labels, np.array([0, -1, 1, 2, 3, 4, 5])[full.labels[keep]])
  np.testing.assert_array_equal(ds.class_counts(), np.delete(full.class_counts(), 1))
  assert f"dropped disgust ({(~keep).sum()} images)" in capsys.readouterr().out


def test_data_classes_merge_sums_counts():
  config = tiny_config(num_examples=140, val_split=None)
  full = splits.load_split(config.data, "train", train=True)
  config.data.classes = "happy,negative=anger+disgust+fear+sad,neutral"
  train, held = splits.load_splits(config.data, config.seed)
  c = full.class_counts()
  assert train.class_names == held.class_names == ("happy", "negative", "neutral")
  assert (train.class_counts() + held.class_counts()).tolist() == [
      c[3], c[0] + c[1] + c[2] + c[5], c[4]]  # surprise's images are dropped


# =================================================================================================
# 3. Subject-disjoint validation and CK+ folds
# =================================================================================================
def test_grouped_holdout_keeps_groups_whole_and_is_seeded():
  rng = np.random.default_rng(0)
  groups = np.repeat(np.arange(20), 5)
  y = rng.integers(0, 4, 100)
  train, held = splits.grouped_holdout(y, groups, 0.2, seed=1)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), np.arange(100))
  assert not set(groups[train]) & set(groups[held])
  assert 5 <= len(held) <= 50 and len(train) >= 50
  again = splits.grouped_holdout(y, groups, 0.2, seed=1)
  np.testing.assert_array_equal(again[1], held)
  others = [tuple(splits.grouped_holdout(y, groups, 0.2, seed=s)[1]) for s in range(2, 6)]
  assert any(o != tuple(held) for o in others)
  # stratified_holdout hands groups to it; two groups: one on each side.
  np.testing.assert_array_equal(splits.stratified_holdout(y, 0.2, 1, groups=groups)[1], held)
  two = splits.grouped_holdout([0, 1, 0, 1], [7, 7, 8, 8], 0.9, seed=0)
  assert sorted(len(side) for side in two) == [2, 2]


def ck_data(ckplus_dir, **data):
  return tiny_config(name="ckplus", data_dir=str(ckplus_dir), val_split=None, **data).data


def test_ckplus_fold_trains_on_its_fold_with_a_subject_grouped_holdout(ckplus_dir):
  train, held = splits.load_splits(ck_data(ckplus_dir, fold=3), seed=0)
  fold_train = builders.load_prepared("ckplus", "fold3_train", ckplus_dir)
  fold_test = builders.load_prepared("ckplus", "fold3_test", ckplus_dir)
  assert len(train) + len(held) == len(fold_train) == 42 - len(fold_test)
  subjects = (set(train.extras["subject"].tolist()), set(held.extras["subject"].tolist()))
  assert subjects[0] and subjects[1] and not subjects[0] & subjects[1]
  assert subjects[0] | subjects[1] == set(fold_train.extras["subject"].tolist())
  assert set(fold_test.extras["subject"].tolist()) == {4, 14}
  assert not {4, 14} & (subjects[0] | subjects[1]) and 3 not in train.extras["fold"]
  test = splits.load_split(ck_data(ckplus_dir, fold=3), "test", train=False)
  np.testing.assert_array_equal(test.extras["subject"], fold_test.extras["subject"])


@pytest.mark.parametrize("fold, val_split, needle", [
    (0, "fold1_test", "shares 2 subject(s)"),  # fold 1's subjects 2, 12 are in fold0_train
    (0, "train", "is the split the run trains on"),
    (None, "fold0_train", "shares"),  # ckplus `train` is fold0_train
])
def test_a_validation_split_sharing_subjects_or_images_is_refused(ckplus_dir, fold, val_split,
                                                                   needle):
  data = ck_data(ckplus_dir, fold=fold)
  data.val_split = val_split
  with pytest.raises(UserError, match="data.val_split") as info:
    splits.load_splits(data, seed=0)
  assert needle in str(info.value)


@pytest.mark.slow
def test_evaluate_test_of_a_fold_run_scores_that_folds_test(ck_run, ckplus_dir, capsys):
  fold_test = builders.load_prepared("ckplus", "fold3_test", ckplus_dir)
  assert runs.open_classifier(ck_run).meta["val_split"] == "fold3_train-holdout"
  assert ferjax(["evaluate", "--workdir", ck_run, "--split", "test"]) == 0
  result = json.loads((ck_run / "eval_test.json").read_text())
  assert result["num_examples"] == len(fold_test) == 4
  assert result["dataset"] == "ckplus" and not result["cross_dataset"]


@pytest.mark.slow
def test_a_fold_run_features_carry_subject_and_fold(ck_run, ckplus_dir, tmp_path):
  out = tmp_path / "ck.npz"
  assert ferjax(["features", "--workdir", ck_run, "--split", "test", "--out", out]) == 0
  with np.load(out) as f:
    subject, fold = f["subject"], f["fold"]
    assert len(subject) == 4 and str(f["dataset"]) == "ckplus"
  if (subject == -1).all():
    pytest.skip("CK+ subject/fold extras do not reach the prepared split yet (load_prepared)")
  assert set(subject.tolist()) == {4, 14} and (fold == 3).all()


# =================================================================================================
# 4. Cross-dataset evaluation
# =================================================================================================
class FakeRun:
  class_names = FER_NAMES


def test_match_classes_by_canonical_name():
  ds = Dataset(np.zeros((7, 4, 4, 1), np.uint8), np.arange(7, dtype=np.int32), CK_NAMES, "ck",
               "all", {"index": np.arange(7)})
  matched, columns, note = evaluate.match_classes(FakeRun, ds, restrict_to_shared=True)
  # anger contempt disgust fear happy sadness surprise -> angry - disgust fear happy sad surprise
  np.testing.assert_array_equal(matched.labels, [0, 1, 2, 3, 5, 6])
  np.testing.assert_array_equal(matched.extras["index"], [0, 2, 3, 4, 5, 6])
  assert matched.class_names == FER_NAMES and columns == [0, 1, 2, 3, 5, 6]
  assert note == "ck all: dropped 1 images of contempt (classes the model does not know)"
  assert evaluate.match_classes(FakeRun, ds, restrict_to_shared=False)[1] == list(range(7))
  with pytest.raises(UserError, match="no class the model knows"):
    evaluate.match_classes(FakeRun, ds.replace(class_names=tuple("abcdefg")),
                           restrict_to_shared=True)


def test_output_tags_differ_by_setting():
  tags = [evaluate.output_tag("test"), evaluate.output_tag("all", dataset="ck"),
          evaluate.output_tag("all", dataset="ck", restrict_to_shared=False),
          evaluate.output_tag("all", dataset="ck", tta="flip"),
          evaluate.output_tag("all", dataset="ck", logit_adjust=1.0),
          evaluate.output_tag("all", dataset="ck", checkpoint="last")]
  assert tags == ["test", "ck-all", "ck-all_all-classes", "ck-all_tta-flip", "ck-all_tau-1",
                  "ck-all_ckpt-last"]


def test_a_folder_dataset_in_another_folder_is_another_dataset(tmp_path):
  config = tiny_config(name="folder", manual_dir=str(tmp_path / "faces"))
  assert evaluate.is_own_dataset(config, "folder")
  assert evaluate.is_own_dataset(config, "folder", manual_dir=tmp_path / "faces")
  assert not evaluate.is_own_dataset(config, "folder", manual_dir=tmp_path / "other")
  assert not evaluate.is_own_dataset(config, "synthetic")
  config.data.classes = "-disgust"  # scored in its label space: matched by canonical name
  assert not evaluate.is_own_dataset(config, "folder")


def test_images_of_another_size_and_channels_are_converted(cross_run, ck_folder):
  config = classifier_kind.read_config(cross_run)
  ds = evaluate.load_other_dataset(config, "folder", "all", manual_dir=str(ck_folder))
  assert ds.images.shape == (7 * PER_CLASS_ALL, 32, 32, 1) and ds.class_names == CK_NAMES


def expected_confusion(logits, columns):
  """The confusion matrix of the folder set's `all` split (class-sorted, contempt dropped) when
  the argmax is taken over `columns` of the model's (FER_NAMES) classes."""
  true = np.repeat([FER_NAMES.index(n) for n in ("angry", "disgust", "fear", "happy", "sad",
                                                  "surprise")], PER_CLASS_ALL)
  position = {c: i for i, c in enumerate(columns)}
  preds = np.argmax(logits[:, columns], axis=-1)
  return evaluate.confusion_matrix([position[t] for t in true], preds, len(columns)).tolist()


def test_cross_dataset_evaluation(cross_run, ck_folder, capsys):
  base = ["evaluate", "--workdir", cross_run, "--dataset", "folder", "--manual-dir", ck_folder,
          "--split", "all"]
  capsys.readouterr()
  assert ferjax(base) == 0
  out = capsys.readouterr().out
  assert (f"ckfolder all: dropped {PER_CLASS_ALL} images of contempt (classes the model does "
          "not know)") in out.splitlines()
  shared = json.loads((cross_run / "eval_ckfolder-all.json").read_text())
  assert list(shared["per_class"]) == ["angry", "disgust", "fear", "happy", "sad", "surprise"]
  assert np.shape(shared["confusion"]) == (6, 6)  # never predicts neutral
  assert shared["num_examples"] == 6 * PER_CLASS_ALL and shared["cross_dataset"]
  assert shared["restrict_to_shared"] and "contempt" in shared["dropped"]
  assert (cross_run / "confusion_ckfolder-all.png").is_file()
  first = sha(cross_run / "eval_ckfolder-all.json")

  assert ferjax([*base, "--all-classes"]) == 0
  every = json.loads((cross_run / "eval_ckfolder-all_all-classes.json").read_text())
  assert list(every["per_class"]) == list(FER_NAMES) and np.shape(every["confusion"]) == (7, 7)
  assert every["per_class"]["neutral"]["support"] == 0 and not every["restrict_to_shared"]

  assert ferjax([*base, "--tta", "flip"]) == 0
  assert json.loads((cross_run / "eval_ckfolder-all_tta-flip.json").read_text())["tta"] == "flip"
  assert ferjax([*base, "--logit-adjust", "1"]) == 0
  tau = json.loads((cross_run / "eval_ckfolder-all_tau-1.json").read_text())
  assert tau["logit_adjust"] == 1.0 and tau["tta"] == "none"
  assert sha(cross_run / "eval_ckfolder-all.json") == first  # nothing overwritten

  # The argmax really is over the shared classes only (and over all with --all-classes).
  raw = evaluate.evaluate_run(cross_run, "all", dataset="folder", manual_dir=ck_folder,
                              features=True, write=False)
  assert raw["logits"].shape == (6 * PER_CLASS_ALL, 7)
  assert raw["confusion"] == shared["confusion"] == expected_confusion(raw["logits"],
                                                                       [0, 1, 2, 3, 5, 6])
  assert every["confusion"] == expected_confusion(raw["logits"], list(range(7)))


# =================================================================================================
# 5. `ferjax features`
# =================================================================================================
FEATURE_KEYS = {"features", "logits", "labels", "class_names", "model_class_names", "path",
                "index", "subject", "fold", "dataset", "split", "workdir", "step",
                "format_version"}


def test_features_of_another_dataset_keep_its_own_labels(cross_run, ck_folder, ckplus_dir,
                                                         tmp_path):
  out = tmp_path / "ck.npz"
  assert ferjax(["features", "--workdir", cross_run, "--dataset", "folder", "--manual-dir",
                   ck_folder, "--split", "all", "--out", out]) == 0
  n = 7 * PER_CLASS_ALL
  with np.load(out) as f:
    assert set(f.files) == FEATURE_KEYS
    assert f["features"].dtype == np.float32 and f["features"].shape[0] == n
    assert f["features"].ndim == 2 and f["features"].shape[1] > 0
    assert f["logits"].shape == (n, 7) and f["labels"].dtype == np.int32
    np.testing.assert_array_equal(f["labels"], np.repeat(np.arange(7), PER_CLASS_ALL))
    assert tuple(f["class_names"]) == EXPECTED["ckplus"]  # contempt kept
    assert tuple(f["model_class_names"]) == FER_NAMES
    assert f["path"][PER_CLASS_ALL] == "contempt/contempt_00000.png"
    assert all((ck_folder / "all" / p).is_file() for p in f["path"])
    np.testing.assert_array_equal(f["index"], np.arange(n))
    assert (f["subject"] == -1).all() and (f["fold"] == -1).all()
    assert str(f["split"]) == "all" and int(f["format_version"]) == 1
    assert str(f["dataset"]) == "ckfolder" and int(f["step"]) >= 1

  out = tmp_path / "ckplus.npz"
  assert ferjax(["features", "--workdir", cross_run, "--dataset", "ckplus", "--data-dir",
                   ckplus_dir, "--split", "all", "--out", out]) == 0
  with np.load(out) as f:
    assert len(f["labels"]) == 42 and tuple(f["class_names"]) == EXPECTED["ckplus"]
    assert f["path"][0].startswith("ckplus/all/")
    if (f["subject"] == -1).all():
      pytest.skip("CK+ subject/fold extras do not reach the prepared split yet (load_prepared)")
    assert set(f["subject"].tolist()) == set(range(1, 22))
    np.testing.assert_array_equal(f["fold"], (f["subject"] - 1) % 10)


# =================================================================================================
# 6. Joint training on several datasets
# =================================================================================================
def test_weighted_rows():
  rows = splits.weighted_rows(10, 2.5, seed=0)
  assert len(rows) == 25 and sorted(np.bincount(rows, minlength=10)) == [2] * 5 + [3] * 5
  half = splits.weighted_rows(10, 0.5, seed=0)
  assert len(half) == 5 == len(set(half.tolist())) and list(half) == sorted(half)
  np.testing.assert_array_equal(half, splits.weighted_rows(10, 0.5, seed=0))
  np.testing.assert_array_equal(splits.weighted_rows(4, 1.0, seed=3), np.arange(4))


def test_parse_members():
  assert splits.parse_members("synthetic, folder:0.5") == [("synthetic", 1.0), ("folder", 0.5)]
  for spec, needle in [("synthetic", "two or more"), ("synthetic,synthetic", "named twice"),
                       ("synthetic,folder:0", "weight"), ("synthetic,folder:x", "weight"),
                       ("synthetic,mnist", "unknown dataset 'mnist'")]:
    with pytest.raises(UserError, match="data.datasets") as info:
      splits.parse_members(spec)
    assert needle in str(info.value)


def test_joint_set_is_the_weighted_union_in_canonical_order(ck_folder):
  data = tiny_config(name="joint", datasets="synthetic,folder:0.5", manual_dir=str(ck_folder),
                     num_examples=64, val_split=None).data
  joint, vals = splits.load_joint(data, seed=0)
  assert joint.class_names == labels.CANONICAL
  n_synth = 64 - len(vals[0])  # each member's hold-out comes out of its own train split
  n_folder = int(round(0.5 * (56 - len(vals[1]))))
  counts = dict(zip(*np.unique(joint.extras["dataset"], return_counts=True)))
  assert counts == {"synthetic": n_synth, "folder": n_folder}
  assert len(joint) == n_synth + n_folder
  assert [v.name for v in vals] == ["synthetic", "folder"]
  assert all(v.class_names == labels.CANONICAL for v in vals)
  assert labels.CANONICAL.index("neutral") not in vals[1].labels  # the folder set has none
  assert joint.images.shape[1:] == (32, 32, 1)
  data.classes = "-contempt"
  joint, vals = splits.load_joint(data, seed=0)
  assert "contempt" not in joint.class_names and len(joint.class_names) == 7
  assert all(v.class_names == joint.class_names for v in vals)


@pytest.mark.slow
def test_joint_run_validates_on_each_member(joint_run, ck_folder):
  rows = [json.loads(line) for line in (joint_run / "metrics.jsonl").read_text().splitlines()]
  val = [r for r in rows if "val_mean_class_accuracy" in r][-1]
  members = [val["val_synthetic_mean_class_accuracy"], val["val_folder_mean_class_accuracy"]]
  assert val["val_mean_class_accuracy"] == pytest.approx(np.mean(members))
  run = runs.open_classifier(joint_run)
  assert run.class_names == labels.CANONICAL
  assert run.meta["val_split"] == "synthetic:validation+folder:train-holdout"
  config = classifier_kind.read_config(joint_run)
  joint, _ = splits.load_joint(config.data, config.seed)
  assert run.train_counts.tolist() == joint.class_counts().tolist()  # the joint counts


@pytest.mark.slow
def test_evaluating_a_joint_run_needs_a_dataset(joint_run, ck_folder, capsys):
  expect_one_line(["evaluate", "--workdir", joint_run, "--split", "test"], "--dataset", capsys)
  assert ferjax(["evaluate", "--workdir", joint_run, "--dataset", "folder", "--manual-dir",
                   ck_folder, "--split", "all"]) == 0
  result = json.loads((joint_run / "eval_ckfolder-all.json").read_text())
  assert result["num_examples"] == 7 * PER_CLASS_ALL and result["dropped"] is None
  assert list(result["per_class"]) == [c for c in labels.CANONICAL if c != "neutral"]


# =================================================================================================
# 7. One-line errors
# =================================================================================================
def cats_and_dogs(t):
  root = t / "pets"
  write_folder(root, "all", [2, 2], ("cat", "dog"), size=32, channels=1)
  return root


def existing(path):
  path.write_bytes(b"not features")
  return path


def train_argv(r, t, *overrides):
  return ["train", "--config", r.classifier_config, "--workdir", t / "w", *overrides]


CASES = {
    "evaluate-unknown-dataset": (lambda t, r: ["evaluate", "--workdir", r.classifier,
                                               "--dataset", "mnist"], "unknown dataset 'mnist'"),
    "evaluate-no-shared-class": (lambda t, r: ["evaluate", "--workdir", r.classifier,
                                               "--dataset", "folder", "--manual-dir",
                                               cats_and_dogs(t), "--split", "all"],
                                 "no class the model knows"),
    "features-unknown-dataset": (lambda t, r: ["features", "--workdir", r.classifier,
                                               "--dataset", "mnist", "--out", t / "f.npz"],
                                 "unknown dataset 'mnist'"),
    "features-out-exists": (lambda t, r: ["features", "--workdir", r.classifier, "--out",
                                          existing(t / "f.npz")], ["--out", "already exists"]),
    "features-out-suffix": (lambda t, r: ["features", "--workdir", r.classifier, "--out",
                                          t / "f.npy"], ["--out", ".npz"]),
    "features-out-no-parent": (lambda t, r: ["features", "--workdir", r.classifier, "--out",
                                             t / "missing" / "f.npz"], ["--out", "does not exist"]),
    "classes-mixed": (lambda t, r: train_argv(r, t, "--config.data.classes=-disgust,happy"),
                      ["data.classes", "mixes"]),
    "classes-unknown": (lambda t, r: train_argv(r, t, "--config.data.classes=-contempt"),
                        ["data.classes", "contempt"]),
    "fold-not-ckplus": (lambda t, r: train_argv(r, t, "--config.data.fold=3"), "data.fold"),
    "joint-without-datasets": (lambda t, r: train_argv(r, t, "--config.data.name=joint"),
                               "data.datasets"),
    "datasets-without-joint": (lambda t, r: train_argv(r, t, "--config.data.datasets=a,b"),
                               "data.datasets"),
    "datasets-bad-weight": (lambda t, r: train_argv(r, t, "--config.data.name=joint",
                                                    "--config.data.datasets=synthetic,folder:-1"),
                            ["data.datasets", "weight"]),
    "datasets-unknown": (lambda t, r: train_argv(r, t, "--config.data.name=joint",
                                                 "--config.data.datasets=synthetic,mnist"),
                         ["data.datasets", "mnist"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case, tiny_runs, tmp_path, capsys):
  setup, needle = CASES[case]
  argv = setup(tmp_path, tiny_runs)
  expect_one_line(argv, needle, capsys, protect=[tiny_runs.classifier, tmp_path / "f.npz"])


def test_a_ckplus_val_split_sharing_subjects_is_one_line(tiny_runs, ckplus_dir, tmp_path, capsys):
  expect_one_line(train_argv(tiny_runs, tmp_path, "--config.data.name=ckplus",
                             f"--config.data.data_dir={ckplus_dir}", "--config.data.fold=0",
                             "--config.data.val_split=fold1_test",
                             "--config.data.num_examples=None"),
                  ["data.val_split", "subject"], capsys, protect=[ckplus_dir])

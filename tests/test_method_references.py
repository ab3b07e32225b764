"""Methods checked against numpy transcriptions of their published reference code, on the same
inputs: weight balancing's MaxNorm, FlexMatch's thresholds and record, random erasing's box and
EAC's noisy-label views, DAN's partition loss."""

import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ferjax import configs, losses
from ferjax.data import pipeline
from ferjax.kinds import classifier as classifier_kind
from ferjax.kinds import retrain_head as head_kind
from ferjax.train import classifier as classifier_lib
from ferjax.train import retrain_head as head_lib
from ferjax.train import semisup

K = 7


# --- Weight balancing: MaxNorm --------------------------------------------------------------------
class NumpyMaxNormViaPGD:
  """GitHub ShadeAlsha/LTR-weight-balancing, utils/regularizers.py, `MaxNorm_via_PGD` (L2,
  tau 1), on the classifier weight [K, D] (PyTorch's fc.weight: a row per class; the bias is
  given an infinite threshold, so it is never changed)."""

  def __init__(self, thresh):
    self.thresh = thresh
    self.layer_thresh = None

  def set_per_layer_thresh(self, weight):
    norms = np.linalg.norm(weight.reshape(weight.shape[0], -1), ord=2, axis=1)[:, None]
    self.layer_thresh = norms.min() + self.thresh * (norms.max() - norms.min())

  def pgd(self, weight):
    if self.layer_thresh is None:
      self.set_per_layer_thresh(weight)
    weight = weight.copy()
    norms = np.linalg.norm(weight.reshape(weight.shape[0], -1), ord=2, axis=1)[:, None]
    idx = (norms > self.layer_thresh).squeeze()
    weight[idx] = (self.layer_thresh / norms[idx]) * weight[idx]
    return weight


def _source_head(d=16, seed=0):
  rng = np.random.default_rng(seed)
  kernel = rng.normal(size=(d, K)) * np.linspace(0.5, 2.0, K)  # Norms that differ by class.
  return {"kernel": kernel.astype(np.float32), "bias": rng.normal(size=K).astype(np.float32)}


@pytest.mark.parametrize("thresh", [0.0, 0.1, 0.5, 1.0])
def test_max_norm_radius_and_projection_match_the_reference(thresh):
  head = _source_head()
  config = head_kind.default_config()
  config.head.max_norm_thresh = thresh
  reference = NumpyMaxNormViaPGD(thresh)
  reference.set_per_layer_thresh(head["kernel"].T.astype(np.float64))
  made = head_kind.max_norm(config, head, train_examples=1000)
  assert made.radius == pytest.approx(reference.layer_thresh, rel=1e-12)
  projected = head_kind.project_max_norm(jax.tree.map(jnp.asarray, head), made.radius)
  want = reference.pgd(head["kernel"].T.astype(np.float64)).T
  np.testing.assert_allclose(projected["kernel"], want, rtol=1e-6)
  np.testing.assert_array_equal(projected["bias"], head["bias"])
  clipped = np.sum(np.linalg.norm(head["kernel"], axis=0) > made.radius)
  if thresh == 1.0:
    assert clipped == 0  # The reference's default threshold clips no class at the start.
  if thresh == 0.0:
    assert clipped == K - 1  # Every class but the smallest, down to the smallest norm.


def test_max_norm_projects_once_per_epoch_by_default():
  config = head_kind.default_config()
  config.head.update(max_norm_thresh=0.1, batch_size=64)
  assert head_kind.max_norm(config, _source_head(), train_examples=1000).every == 16  # ceil
  config.head.max_norm_every = 5
  assert head_kind.max_norm(config, _source_head(), train_examples=1000).every == 5
  config.head.update(max_norm_thresh=None, max_norm_radius=1.5, max_norm_every=None)
  assert head_kind.max_norm(config, _source_head(), train_examples=64) == (1.5, 1)
  config.head.max_norm_radius = None
  assert head_kind.max_norm(config, _source_head(), train_examples=64) is None


@pytest.mark.slow
def test_max_norm_train_steps_match_the_reference_loop():
  """The head stage with head.max_norm_thresh: plain steps, and the reference's PGD (threshold
  set from the starting head) after every `every`-th step and the last one."""
  steps, every, d = 11, 4, 16
  config = head_kind.default_config()
  config.head.update(batch_size=32, steps=steps, lr=0.5, max_norm_thresh=0.1)
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(K), [60, 30, 20, 10, 8, 6, 4]).astype(np.int32)
  features = (rng.normal(size=(len(labels), d)) + 3 * np.eye(K, d)[labels]).astype(np.float32)
  data = {"features": jnp.asarray(features), "labels": jnp.asarray(labels),
          "class_index": pipeline.class_index(jnp.asarray(labels), K)}
  source = _source_head(d)
  tx, _ = head_kind.make_optimizer(config)
  max_norm = head_kind.max_norm(config, source, len(labels))._replace(every=every)
  constrained = jax.jit(head_lib.make_train_step(config, np.bincount(labels), jit=False, tx=tx,
                                                 max_norm=max_norm))
  plain = jax.jit(head_lib.make_train_step(config, np.bincount(labels), jit=False, tx=tx))
  reference = NumpyMaxNormViaPGD(0.1)
  reference.set_per_layer_thresh(source["kernel"].T.astype(np.float64))
  state = ref_state = head_kind.init_state(config, source, tx)
  for step in range(steps):
    state, _ = constrained(state, data)
    ref_state, _ = plain(ref_state, data)
    if (step + 1) % every == 0 or step + 1 == steps:
      kernel = reference.pgd(np.asarray(ref_state.params["kernel"], np.float64).T).T
      ref_state = ref_state.replace(params={**ref_state.params,
                                            "kernel": jnp.asarray(kernel, jnp.float32)})
    np.testing.assert_allclose(state.params["kernel"], ref_state.params["kernel"], rtol=2e-5,
                               atol=1e-6, err_msg=f"step {step}")
  norms = np.linalg.norm(np.asarray(state.params["kernel"]), axis=0)
  assert norms.max() <= max_norm.radius * (1 + 1e-6)


# --- FlexMatch ------------------------------------------------------------------------------------
class NumpyFlexMatchHook:
  """GitHub microsoft/Semi-supervised-learning, semilearn/algorithms/flexmatch/utils.py,
  `FlexMatchThresholdingHook` (thresh_warmup=True, convex mapping): `masking` masks with the
  class-wise accuracies from before the batch, then writes the confident (>= p_cutoff)
  predictions into `selected_label` (numpy's repeated-index assignment keeps the last, as
  PyTorch's index_put does on the CPU), then `update` recomputes them."""

  def __init__(self, pool_size, num_classes, p_cutoff):
    self.selected_label = np.full(pool_size, -1)
    self.classwise_acc = np.zeros(num_classes)
    self.num_classes, self.p_cutoff = num_classes, p_cutoff

  def update(self):
    values, counts = np.unique(self.selected_label, return_counts=True)
    counter = dict(zip(values.tolist(), counts.tolist()))
    if max(counter.values()) < len(self.selected_label):
      for i in range(self.num_classes):
        self.classwise_acc[i] = counter.get(i, 0) / max(counter.values())

  def masking(self, probs, idx_ulb):
    max_probs, max_idx = probs.max(-1), probs.argmax(-1)
    acc = self.classwise_acc[max_idx]
    mask = max_probs >= self.p_cutoff * (acc / (2.0 - acc))
    select = max_probs >= self.p_cutoff
    if select.any():
      self.selected_label[idx_ulb[select]] = max_idx[select]
    self.update()
    return mask.astype(np.float32)


def test_flexmatch_masks_and_records_as_the_reference():
  """Several batches with repeated images (some drawn twice, once confident and once not) and
  confidences exactly at the threshold: the same masks, record and thresholds at every step."""
  pool, k, tau = 40, 4, 0.7
  rng = np.random.default_rng(0)
  reference = NumpyFlexMatchHook(pool, k, tau)
  record = jnp.full(pool, -1, jnp.int32)
  for step in range(12):
    index = rng.integers(0, pool, 16)
    index[:4] = index[4:8]  # Repeats: draws 0-3 and 4-7 are the same images.
    logits = rng.normal(size=(16, k)) * 3
    logits[0] = [np.log(0.7), np.log(0.1), np.log(0.1), np.log(0.1)]  # Exactly at tau.
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want_mask = reference.masking(probs, index)
    _, mask, _, _, record = semisup.flex_pseudo_labels(
        jnp.log(jnp.asarray(probs, jnp.float32)), record, jnp.asarray(index), tau)
    if step == 0:
      assert np.all(np.asarray(mask) == 1)  # Every threshold is 0 on the first step.
    np.testing.assert_array_equal(mask, want_mask, err_msg=f"step {step}")
    np.testing.assert_array_equal(record, reference.selected_label, err_msg=f"step {step}")


def test_an_unconfident_later_draw_keeps_the_confident_label():
  record = jnp.full(4, -1, jnp.int32)
  index = jnp.asarray([1, 1, 2, 2, 3])
  confidence = jnp.asarray([0.9, 0.2, 0.95, 0.96, 0.7])
  labels = jnp.asarray([3, 0, 1, 2, 1], jnp.int32)
  got = semisup.update_record(record, index, confidence, labels, 0.7)
  np.testing.assert_array_equal(got, [-1, 3, 2, 1])  # >= the threshold writes (image 3).


# --- Random erasing ------------------------------------------------------------------------------
def numpy_random_erasing_area(rng, height, width, scale, ratio=(0.3, 3.3)):
  """Erased share of the image area of torchvision's `RandomErasing.get_params`
  (github.com/pytorch/vision, torchvision/transforms/transforms.py): up to 10 draws of an area
  in `scale` and a log-uniform aspect in `ratio`, the first box that fits; none: nothing."""
  area = height * width
  for _ in range(10):
    erase_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    h, w = int(round(math.sqrt(erase_area * aspect))), int(round(math.sqrt(erase_area / aspect)))
    if h < height and w < width:
      return h * w / area
  return 0.0


@pytest.mark.parametrize("scale", [(0.02, 0.25), (0.02, 0.33)])
def test_erased_area_matches_torchvision(scale):
  """Mean erased share at erasing_prob 1 on 32 x 32 images: EAC, RUL and DAN's (0.02, 0.25),
  about 0.136, and torchvision's default (0.02, 0.33), about 0.175."""
  config = classifier_kind.default_config().augment
  config.update(crop="none", flip=False, erasing_prob=1.0, erasing_scale=scale)
  images = jnp.ones((4000, 32, 32, 1))
  erased = jax.jit(lambda k, x: pipeline.augment_batch(k, x, config))(jax.random.key(0), images)
  got = float(jnp.mean(erased == 0))
  rng = np.random.default_rng(0)
  want = np.mean([numpy_random_erasing_area(rng, 32, 32, scale) for _ in range(40000)])
  assert got == pytest.approx(want, abs=0.006)
  assert want == pytest.approx(0.136 if scale[1] == 0.25 else 0.175, abs=0.01)


def test_eac_noisy_label_views_erase_the_mirror_with_its_own_box():
  """GitHub zyh-uaiaaaa/Erasing-Attention-Consistency, src/dataset.py `RafDataset.__getitem__`:
  with clean labels the second view is the transformed (erased) image flipped; with noisy
  labels it is the image flipped, then transformed (erased) on its own."""
  config = classifier_kind.default_config().augment
  config.update(erasing_prob=1.0, erasing_scale=(0.1, 0.2))
  images = jax.random.uniform(jax.random.key(0), (64, 24, 24, 1), minval=0.1, maxval=1.0)
  erased, mirror = classifier_lib.eac_views(jax.random.key(1), images, config)
  hole, mirror_hole = np.asarray(erased == 0), np.asarray(mirror == 0)
  # Each view is its own input where not erased, and each erases 0.1-0.2 of the area or so.
  np.testing.assert_array_equal(np.where(hole, 0, images), erased)
  np.testing.assert_array_equal(np.where(mirror_hole, 0, images[:, :, ::-1]), mirror)
  for h in (hole, mirror_hole):
    share = h.mean(axis=(1, 2, 3))
    assert np.all((share > 0.05) & (share < 0.3))
  # The boxes differ: the mirror's hole, mirrored back, is not the image's hole.
  assert np.mean(np.all(hole == mirror_hole[:, :, ::-1], axis=(1, 2, 3))) < 0.1


def test_protocol_recipes_erase_as_their_papers(experiment):
  protocol = experiment("protocol")
  clean = protocol.methods(1000, pathlib.Path("vaegan"))
  noisy = protocol.methods(1000, pathlib.Path("vaegan"), noise=0.3)
  for name in ("eac", "rul", "rul_cw_cbam", "dan"):
    assert "config.augment.erasing_scale=(0.02,0.25)" in clean[name], name
  assert not any("erasing_scale" in o for o in clean["none"])
  assert "config.loss.eac_flip_erasing=independent" in noisy["eac"]
  assert not any("eac_flip_erasing" in o for o in clean["eac"])
  for overrides in (*clean.values(), noisy["eac"]):
    config = classifier_kind.default_config()
    configs.apply_overrides(config, overrides)
    classifier_kind.validate_config(config)


# --- DAN's partition loss -------------------------------------------------------------------------
EPS = sys.float_info.epsilon


def numpy_partition_loss(x):
  """GitHub yaoing/DAN, rafdb.py `PartitionLoss.forward`: log(1 + H / (var + eps)), var the mean
  of the unbiased variance across heads (x.var(dim=1).mean()), eps = sys.float_info.epsilon; and
  its gradient with respect to x [B, H, D], written out."""
  b, h, d = x.shape
  var = x.var(axis=1, ddof=1).mean()
  loss = np.log(1 + h / (var + EPS))
  dloss_dvar = -h / ((var + EPS) * (var + EPS + h))
  dvar_dx = 2 * (x - x.mean(axis=1, keepdims=True)) / ((h - 1) * b * d)
  return loss, dloss_dvar * dvar_dx


@pytest.mark.parametrize("identical", [True, False])
def test_partition_loss_matches_the_reference(identical):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 1, 8)).repeat(4, axis=1) if identical else rng.normal(size=(3, 4, 8))
  x = x.astype(np.float32)
  loss, grad = jax.value_and_grad(losses.partition_loss)(jnp.asarray(x))
  want_loss, want_grad = numpy_partition_loss(x.astype(np.float64))
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
  if identical:
    assert float(loss) == pytest.approx(math.log1p(4 / EPS), rel=1e-6)

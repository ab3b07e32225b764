"""Classification losses for long-tailed data, as per-example functions of (logits, labels).

Every loss here is a cross-entropy on (possibly) adjusted logits, so label smoothing applies to
all of them the same way (the target distribution is smoothed):

  ce                CE(z)
  focal             -sum_k t_k (1 - p_k)^gamma log p_k                       (Lin et al. 2017)
  ldam              CE(s * (z - m_y e_y)), m_j = C / n_j^(1/4)              (Cao et al. 2019)
  balanced_softmax  CE(z + log pi)                                          (Ren et al. 2020)
  logit_adjusted    CE(z + tau log pi)                                      (Menon et al. 2021)
  coupling          a(t) focal(z) + (1 - a(t)) LDAM(z),  a(t) = 1 - (t / T)^2

with pi the training class prior. The last two are trained on adjusted logits and predict with
the raw ones; `posthoc_adjust` is the evaluation-time variant for a model trained with plain CE.
Class weights (inverse frequency, or effective number of samples, Cui et al. 2019) multiply each
example's loss by the weight of its class, optionally from step `drw_start_step` on only
(deferred re-weighting, Cao et al. 2019). LDAM + effective-number weights + DRW is LDAM-DRW;
as published (github.com/kaidic/LDAM-DRW: `LDAMLoss(max_m=0.5, s=30)` on `NormedLinear`) z are
the cosines of the model's cosine head (model.head=cosine, ferjax.models.resnet) and s = 30
(loss.ldam_scale); on a plain linear head with s = 1 (the defaults) it is a variant.

How a batch of weighted losses is averaged (`weighted_average`, `loss.weight_average`):

  mean        mean_i e_i w_i L_i = sum_i e_i w_i L_i / B                     (Cui et al. 2019)
  normalized  sum_i e_i w_i L_i / sum_i w_i       (F.cross_entropy(weight=w) of the LDAM-DRW
              reference code, Cao et al. 2019, github.com/kaidic/LDAM-DRW)

with w_i the class weight of example i and e_i its example weight (synthetic samples). The
weights sum to K over the classes, so over a long-tailed batch (mostly head classes, whose weights
are small) sum_i w_i is well under B: `mean` takes smaller steps than the reference from the DRW
step on. `normalized` divides by the class weights only, so the example weights keep their
meaning (a synthetic sample of weight 0.5 counts half a real one) and, without class weights,
both are the same.

The coupling-regulation loss of the FER long-tail sources ("focal + LDAM
terms, staged progressive schedule from representation to classifier") has no published code;
ferjax reads it as the two terms coupled by BBN's cumulative-learning weight (Zhou et al. 2020,
a = 1 - (t/T)^2 over the T = train.num_steps steps): early steps learn the representation under
the focal term, late ones the re-balanced boundary under LDAM's margins (with loss.ldam_scale,
loss.ldam_max_margin and loss.focal_gamma as for those losses alone).

Terms that are not per-example classification losses (added to the batch loss by the trainer):

  eac_consistency   EAC (Zhang et al. 2022): mean over b, k, h, w of (M(x) - flip_w(M(flip_w x)))^2
                    with M the class activation maps [B, K, h, w] (`class_activation_maps`)
  affinity_loss     DAN's feature clustering: sum_i ||f_i - c_{y_i}||^2 / sum_d var_k(c_kd) / B
  partition_loss    DAN's: log(1 + H / mean_d var_h(heads_hd)), var unbiased (torch's .var)

Classes with no training examples are counted as 1 for priors and margins, so logs stay finite.

See docs/methods.md (Class-balanced loss, Focal loss, LDAM-DRW, Logit adjustment, Balanced softmax,
Coupling-regulation loss, EAC, DAN, IoU-weighted face mixup).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

LOSS_NAMES = ("ce", "focal", "ldam", "balanced_softmax", "logit_adjusted", "coupling")
CLASS_WEIGHTS = ("none", "inverse", "effective")
WEIGHT_AVERAGES = ("mean", "normalized")


# --- Class statistics --------------------------------------------------------------------------
def log_prior(class_counts) -> np.ndarray:
  """log of the training class frequencies (counts clamped to >= 1)."""
  counts = np.maximum(np.asarray(class_counts, np.float64), 1.0)
  return np.log(counts / counts.sum()).astype(np.float32)


def class_weights(class_counts, kind: str = "none", beta: float = 0.9999) -> np.ndarray:
  """Per-class loss weights, normalised to sum to the number of classes (as Cui et al.).

  inverse:   w_j ∝ 1 / n_j
  effective: w_j ∝ (1 - beta) / (1 - beta^n_j), the inverse effective number of samples.
  """
  counts = np.maximum(np.asarray(class_counts, np.float64), 1.0)
  if kind == "none":
    weights = np.ones_like(counts)
  elif kind == "inverse":
    weights = 1.0 / counts
  elif kind == "effective":
    weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
  else:
    raise ValueError(f"unknown class weights {kind!r}")
  return (weights * len(counts) / weights.sum()).astype(np.float32)


def ldam_margins(class_counts, max_margin: float = 0.5) -> np.ndarray:
  """LDAM margins m_j ∝ n_j^(-1/4), scaled so the rarest class gets `max_margin`."""
  counts = np.maximum(np.asarray(class_counts, np.float64), 1.0)
  margins = counts ** -0.25
  return (margins * max_margin / margins.max()).astype(np.float32)


def drw_weights(step, weights, start_step):
  """Deferred re-weighting: all ones before `start_step`, `weights` from then on."""
  weights = jnp.asarray(weights)
  if start_step is None:
    return weights
  return jnp.where(step >= start_step, weights, jnp.ones_like(weights))


def weighted_average(weighted_losses, class_weights_, mode: str = "mean"):
  """The batch loss from per-example losses already times their weights, e_i w_i L_i [B].

  mean: sum / B (Cui et al. 2019); normalized: sum / sum_i w_i with `class_weights_` [B] the class
  weight of each example (PyTorch's `F.cross_entropy(weight=...)`, the LDAM-DRW reference).
  """
  if mode == "mean":
    return jnp.mean(weighted_losses)
  if mode == "normalized":
    return jnp.sum(weighted_losses) / jnp.sum(class_weights_)
  raise ValueError(f"unknown weight average {mode!r}")


# --- Losses (per example) -----------------------------------------------------------------------
def smoothed_targets(labels, num_classes: int, label_smoothing: float = 0.0):
  one_hot = jax.nn.one_hot(labels, num_classes)
  return one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-example CE [B] of logits [B, K] against int labels [B]."""
  targets = smoothed_targets(labels, logits.shape[-1], label_smoothing)
  return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)


def focal_loss(logits, labels, gamma: float = 2.0, label_smoothing: float = 0.0):
  """Per-example focal loss; gamma = 0 is cross-entropy."""
  targets = smoothed_targets(labels, logits.shape[-1], label_smoothing)
  log_p = jax.nn.log_softmax(logits)
  # (1 - p)^gamma, floored so that its gradient stays finite when p -> 1 and gamma < 1.
  modulator = jnp.maximum(-jnp.expm1(log_p), 1e-12) ** gamma
  return -jnp.sum(targets * modulator * log_p, axis=-1)


def ldam_loss(logits, labels, margins, scale: float = 1.0, label_smoothing: float = 0.0):
  """Per-example LDAM: CE(scale * (logits - margin of the true class on the true logit))."""
  one_hot = jax.nn.one_hot(labels, logits.shape[-1])
  adjusted = scale * (logits - one_hot * jnp.asarray(margins)[labels][:, None])
  return cross_entropy(adjusted, labels, label_smoothing)


def balanced_softmax_loss(logits, labels, log_prior_, label_smoothing: float = 0.0):
  """Per-example balanced softmax: CE(logits + log prior)."""
  return cross_entropy(logits + log_prior_, labels, label_smoothing)


def logit_adjusted_loss(logits, labels, log_prior_, tau: float = 1.0, label_smoothing: float = 0.0):
  """Per-example logit-adjusted loss: CE(logits + tau * log prior)."""
  return cross_entropy(logits + tau * log_prior_, labels, label_smoothing)


def coupling_weight(step, num_steps: int):
  """The focal term's weight a(t) = 1 - (t / T)^2 of the coupling-regulation loss (BBN's
  cumulative-learning schedule): 1 at step 0, 0 at step T."""
  return 1.0 - (jnp.asarray(step, jnp.float32) / num_steps) ** 2


def coupling_loss(logits, labels, step, num_steps: int, margins, gamma: float = 2.0,
                  scale: float = 1.0, label_smoothing: float = 0.0):
  """Per-example coupling-regulation loss: a(t) focal + (1 - a(t)) LDAM (module docstring)."""
  a = coupling_weight(step, num_steps)
  return (a * focal_loss(logits, labels, gamma, label_smoothing)
          + (1.0 - a) * ldam_loss(logits, labels, margins, scale, label_smoothing))


def posthoc_adjust(logits, log_prior_, tau: float):
  """Post-hoc logit adjustment at evaluation: logits - tau * log prior (Menon et al. 2021)."""
  return logits - tau * log_prior_


# --- SSFER's face mixup ---------------------------------------------------------------------------
def face_mixup_loss(mixed_own, mixed_partner, real, lam, iou, partner):
  """Per-example terms [B] of SSFER's IoU-weighted face mixup (arXiv 2410.17622); their mean is

      [sum_i CE(mixed_i) + sum_i (1 - IoU_i) (CE(real_i) + CE(real_partner(i)))] / B,

  CE(mixed_i) = lam_i L(mixed_i, y_i) + (1 - lam_i) L(mixed_i, y_partner(i)). mixed_own and
  mixed_partner [B]: per-example losses of the mixed images against their own and their
  partner's labels; real [B]: of the unmixed images against their labels; partner [B] int; iou
  [B] of the two faces' boxes: the less they overlap, the more each real image is trained on.
  """
  return lam * mixed_own + (1.0 - lam) * mixed_partner + (1.0 - iou) * (real + real[partner])


# --- Terms on more than the logits (EAC, DAN) ----------------------------------------------------
def class_activation_maps(feature_map, kernel):
  """CAMs [B, K, h, w] of a last map [B, h, w, D] under a linear head's kernel [D, K]: each
  class's weighted sum of the map's channels (EAC's `hm`; the caller detaches the kernel, as
  theirs uses `fc.weight.data`)."""
  return jnp.einsum("bhwd,dk->bkhw", feature_map.astype(jnp.float32),
                    kernel.astype(jnp.float32))


def eac_consistency(cams, cams_of_flipped):
  """EAC's attention consistency: MSE between the CAMs of the images and the mirrored CAMs of
  their mirror images (mirrored along w, their exact flip grid with align_corners=True)."""
  return jnp.mean((cams - cams_of_flipped[..., ::-1]) ** 2)


def affinity_loss(features, labels, centers):
  """DAN's feature-clustering loss of pooled features [B, D] around class centres [K, D]:
  sum_i ||f_i - c_{y_i}||^2 / sum_d var_k(c_kd) / B (var over the classes, unbiased)."""
  distances = jnp.sum((features - centers[labels]) ** 2, axis=-1)
  return jnp.sum(distances) / jnp.sum(jnp.var(centers, axis=0, ddof=1)) / features.shape[0]


PARTITION_EPS = sys.float_info.epsilon  # DAN's guard (yaoing/DAN, `PartitionLoss`: var + eps).


def partition_loss(heads):
  """DAN's partition loss of heads [B, H, D]: log(1 + H / (v + eps)), v the mean over b, d of
  the unbiased variance across the H heads and eps the reference's guard (Python's float
  epsilon), which keeps the loss and its gradient finite when the heads are identical; 0 with
  one head."""
  num_heads = heads.shape[1]
  if num_heads < 2:
    return jnp.zeros((), jnp.float32)
  variance = jnp.mean(jnp.var(heads, axis=1, ddof=1))
  return jnp.log1p(num_heads / (variance + PARTITION_EPS))


# --- From the config ---------------------------------------------------------------------------
def make_class_weight(loss_config, class_counts):
  """`config.loss` + training class counts -> `weight_fn(labels, step) -> [B]`: the class weight
  of each example at `step` (all ones before `drw_start_step`), as `make_loss` applies it."""
  weights = jnp.asarray(class_weights(class_counts, loss_config.class_weights, loss_config.beta))

  def weight_fn(labels, step):
    return drw_weights(step, weights, loss_config.drw_start_step)[labels]

  return weight_fn


def make_loss(loss_config, class_counts, num_steps: int | None = None):
  """`config.loss` + training class counts -> `loss_fn(logits, labels, step) -> [B]`;
  `num_steps` (train.num_steps) sets the coupling loss's schedule.

  The returned per-example losses already carry the class weights (switched on at
  `drw_start_step` when that is set, `make_class_weight`); the train step adds example weights and
  mixup, and averages with `weighted_average`.
  """
  name = loss_config.name
  smoothing = loss_config.label_smoothing
  prior = jnp.asarray(log_prior(class_counts))
  class_weight = make_class_weight(loss_config, class_counts)
  margins = jnp.asarray(ldam_margins(class_counts, loss_config.ldam_max_margin))

  def loss_fn(logits, labels, step):
    logits = logits.astype(jnp.float32)
    if name == "ce":
      losses = cross_entropy(logits, labels, smoothing)
    elif name == "focal":
      losses = focal_loss(logits, labels, loss_config.focal_gamma, smoothing)
    elif name == "ldam":
      losses = ldam_loss(logits, labels, margins, loss_config.ldam_scale, smoothing)
    elif name == "balanced_softmax":
      losses = balanced_softmax_loss(logits, labels, prior, smoothing)
    elif name == "logit_adjusted":
      losses = logit_adjusted_loss(logits, labels, prior, loss_config.tau, smoothing)
    elif name == "coupling":
      if num_steps is None:
        raise ValueError("the coupling loss needs num_steps")
      losses = coupling_loss(logits, labels, step, num_steps, margins, loss_config.focal_gamma,
                             loss_config.ldam_scale, smoothing)
    else:
      raise ValueError(f"unknown loss {name!r}")
    return losses * class_weight(labels, step)

  return loss_fn

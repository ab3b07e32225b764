"""ResNet-10/18/34/50 classifiers for face images, with an optional CBAM block attention.

Three stems:
  standard  7x7/2 conv + 3x3/2 max-pool (torchvision layout), for inputs of ~96 px and up;
  small     3x3/1 conv, no max-pool, for 32-64 px inputs such as FER-2013's 48 px;
  strided   3x3/2 conv, no max-pool: the small stem at half the map, for 48 px on a CPU (the
            first stage, the costliest on XLA:CPU, runs at 24x24, so width 0.5 costs about what
            the small stem at width 0.25 does: classifier_fer2013_cpu.py).
The four stages then halve the map three times, so the last stage sees the input divided by 8
(small), 16 (strided) or 32 (standard): 48 px small -> 48-24-12-6; 48 px strided -> 24-12-6-3;
112 px standard -> 28-14-7-4.
XLA on CPU is ~100x slower on a 3x3 conv over a 2x2 map than over a 3x3 one, so
`smallest_feature_map` lets configs refuse to go below 3x3 (32 px small ends at 4x4: fine;
64 px standard would end at 2x2: use the small stem there).

`input_norm='per_image'` standardises each input image (zero mean, unit variance) first.
`width` scales every stage's channel count (0.25 -> 16-32-64-128 for ResNet-18), for CPU-sized
variants. `dtype=bfloat16` computes in bf16 with float32 parameters; logits and features come
back as float32. Calling the model returns `(logits [B, K], features [B, D])`, `features` being
the globally pooled penultimate activations (for linear probes and feature export).
Inputs are float images in [-1, 1], [B, H, W, C] with C = 1 or 3.

Pooling (`pooling`) of the last stage's map [B, h, w, D] into the features [B, D]:
  avg  the mean over all h*w positions (global average pooling, as torchvision).
  app  attentive patch pooling (APP of APViT, Xue et al. 2022, "Vision Transformer with
       Attentive Pooling for Robust Facial Expression Recognition"; their code,
       github.com/youqingxiaozhua/APViT: `attn_method='SUM_ABS_1'` scores each position by
       sum_c |x_c|, `top_pool` keeps the top max(int(N * keep_rate), 1) positions): the
       max(int(h*w * app_keep), 1) positions with the largest L1 norm over the channels, then the
       mean over those. No learned parameters; ties go to the earlier position (row-major). APViT
       keeps 160 of 196 tokens (0.82) and feeds them to a ViT; here the mean of the kept
       positions replaces the global average.

Head (`head`) on the features f [B, D] (rul and dan: on the last map, with their own features):
  linear  Dense with a bias: logits = f W + b.
  rul     RULHead: relative uncertainty learning's embedding and uncertainty branches; in
          training the trainer passes `mix_with` and each logit row is the mixed embedding's.
  dan     DANHead: DAN's attention heads, fused; the trainer adds its affinity and partition
          losses (ferjax.losses) from what it sows.
  cosine  the normalised linear layer of LDAM-DRW (Cao et al. 2019; their code,
          github.com/kaidic/LDAM-DRW, models/resnet_cifar.py `NormedLinear`):
          logits = cosine_scale * normalize(f) @ normalize(W, columns), no bias, so each logit
          is `cosine_scale` times a cosine in [-1, 1] (`cosine_logits`). The param is still
          `head/kernel` [D, K] (head-only tools find it) and its columns start at unit norm, as
          NormedLinear's `uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)`. Computed in float32.
          The scale rule (ferjax.kinds.classifier.validate_config): LDAM scales inside its loss
          (loss.ldam_scale, s = 30 in the reference), so with loss.name=ldam `cosine_scale` is 1
          and the model returns bare cosines, as NormedLinear; any other loss needs
          `cosine_scale` > 1 (with s = 1 the softmax of 7 cosines cannot pass p = 0.55).

See docs/methods.md (Class weights and CBAM, APViT attentive patch pooling, RUL, DAN, LDAM-DRW).
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# name -> (blocks per stage, block type). ResNet-10 is the long-tail literature's small backbone
# (ImageNet-LT, OLTR / decoupling papers); it is also the quickest to compile in tests.
ARCHITECTURES = {
    "resnet10": ((1, 1, 1, 1), "basic"),
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
}
MODEL_NAMES = tuple(ARCHITECTURES)
STEMS = ("small", "standard", "strided")
INPUT_NORMS = ("none", "per_image")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
HEADS = ("linear", "cosine", "rul", "dan")
# Top-level parameter groups on the classifier side of the features (class-specific): a new
# class list re-initialises them (model.init_from, ferjax import-weights).
HEAD_MODULES = ("head", "rul", "dan")
POOLINGS = ("avg", "app")

# He initialisation with fan-out, as torchvision's ResNet.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class CBAM(nn.Module):
  """Convolutional block attention (Woo et al. 2018): channel attention, then spatial attention.

  As the authors' code (github.com/Jongchan/attention-module, MODELS/cbam.py): the spatial gate
  pools the channels into [max, mean] (ChannelPool's order), then `BasicConv(2, 1, 7, padding=3,
  relu=False)`, a bias-free 7x7 conv and a BatchNorm (eps 1e-5, torch momentum 0.01, i.e. flax
  momentum 0.99), then a sigmoid. `norm` is the network's BatchNorm partial, so the gate follows
  the block's train / eval mode. (Checkpoints from before this layout, conv with a bias and no
  BatchNorm, do not restore into it.)
  """
  norm: Callable
  reduction: int = 16
  spatial_kernel: int = 7
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    hidden = nn.Dense(max(channels // self.reduction, 4), dtype=self.dtype, name="channel_fc1")
    out = nn.Dense(channels, dtype=self.dtype, name="channel_fc2")
    mlp = lambda v: out(nn.relu(hidden(v)))  # One MLP shared by the avg- and max-pooled paths.
    channel_gate = nn.sigmoid(mlp(jnp.mean(x, axis=(1, 2))) + mlp(jnp.max(x, axis=(1, 2))))
    x = x * channel_gate[:, None, None, :]
    pooled = jnp.concatenate([jnp.max(x, -1, keepdims=True), jnp.mean(x, -1, keepdims=True)], -1)
    k = self.spatial_kernel
    gate = nn.Conv(1, (k, k), padding=k // 2, use_bias=False, dtype=self.dtype,
                   name="spatial_conv")(pooled)
    gate = self.norm(momentum=0.99, epsilon=1e-5, name="spatial_norm")(gate)
    return x * nn.sigmoid(gate)


def _unit_columns(key, shape, dtype=jnp.float32):
  """Uniform(-1, 1) columns rescaled to unit L2 norm (NormedLinear's initialisation)."""
  w = jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
  return (w / jnp.linalg.norm(w, axis=0, keepdims=True)).astype(dtype)


def l2_normalize(x, axis: int):
  """x / max(||x||_2, 1e-12) along `axis` (torch.nn.functional.normalize's floor)."""
  norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
  return x / jnp.maximum(norm, 1e-12)


def cosine_logits(features, kernel):
  """normalize(features [B, D], rows) @ normalize(kernel [D, K], columns): cosines [B, K]."""
  features, kernel = features.astype(jnp.float32), kernel.astype(jnp.float32)
  return l2_normalize(features, 1) @ l2_normalize(kernel, 0)


class CosineHead(nn.Module):
  """LDAM-DRW's NormedLinear times `scale`: no bias; see the module docstring."""
  num_classes: int
  scale: float = 1.0

  @nn.compact
  def __call__(self, features):
    kernel = self.param("kernel", _unit_columns, (features.shape[-1], self.num_classes),
                        jnp.float32)
    return self.scale * cosine_logits(features, kernel)


def app_keep_count(positions: int, keep: float) -> int:
  """How many of `positions` attentive patch pooling keeps: max(int(positions * keep), 1), as
  APViT's `top_pool` with `keep_rate`."""
  return max(int(positions * keep), 1)


def attentive_patch_pool(x, keep: float):
  """APP (APViT, Xue et al. 2022): the mean of the positions of x [B, h, w, D] with the largest
  sum_c |x_c| (their 'SUM_ABS_1' attention map), `app_keep_count(h*w, keep)` of them -> [B, D]."""
  b, h, w, d = x.shape
  flat = x.reshape(b, h * w, d)
  scores = jnp.sum(jnp.abs(flat.astype(jnp.float32)), axis=-1)  # [B, N]
  _, keep_idx = jax.lax.top_k(scores, app_keep_count(h * w, keep))  # [B, k], ties: lower index
  kept = jnp.take_along_axis(flat, keep_idx[..., None], axis=1)  # [B, k, D]
  return jnp.mean(kept, axis=1)


def sow(module: nn.Module, name: str, value) -> None:
  """Stores `value` in the 'aux' collection for training objectives (read when the caller
  applies with mutable=["aux"]); never at init, so variables hold only params and batch_stats."""
  if not module.is_initializing():
    module.sow("aux", name, value)


class RULHead(nn.Module):
  """Relative uncertainty learning's head (Zhang et al., NeurIPS 2021; their code,
  github.com/zyh-uaiaaaa/Relative-Uncertainty-Learning, src/rul.py and utils.py), on the last
  map x [B, h, w, D]. Two branches, each BatchNorm (no scale or bias, eps 2e-5) -> dropout ->
  flatten -> Dense(dim) -> BatchNorm (eps 2e-5): `mu`, the embedding, and `log_var`, whose
  exp averaged over its dim units is the sample's scalar s_i (the paper's uncertainty value).
  In training, with a partner j = mix_with[i] per example, the head classifies the mixed
  embedding  w_i mu_i + (1 - w_i) mu_j,  w_i = s_i / (s_i + s_j)  (their `mixup_data`), and the
  trainer scores it against both labels, 1/2 each (their add-up loss); otherwise it classifies
  mu. Features = mu [B, dim]; the classifier is a Dense named `head` as in the other heads."""
  num_classes: int
  dim: int
  dropout: float
  norm: Callable
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, mix_with=None):
    def embedding(name):
      y = self.norm(use_scale=False, use_bias=False, epsilon=2e-5, name=f"{name}_map_norm")(x)
      y = nn.Dropout(self.dropout, deterministic=not train)(y)
      y = nn.Dense(self.dim, dtype=self.dtype, name=f"{name}_fc")(y.reshape(y.shape[0], -1))
      return self.norm(epsilon=2e-5, name=f"{name}_norm")(y).astype(jnp.float32)

    mu, log_var = embedding("mu"), embedding("log_var")  # log_var: always, so init makes it.
    features = mu
    if mix_with is not None:
      s = jnp.mean(jnp.exp(log_var), axis=-1)
      w = (s / (s + s[mix_with]))[:, None]
      features = w * mu + (1.0 - w) * mu[mix_with]
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(features)
    return logits, mu


class DANAttention(nn.Module):
  """One cross-attention head of DAN (Wen et al. 2021; github.com/yaoing/DAN, networks/dan.py):
  spatial attention (1x1 conv to D/2 + BN, then relu of the sum of 3x3, 1x3 and 3x1 convs back
  to D, each + BN, summed over channels into one map that multiplies x), global average
  pooling, then channel attention (Dense D/16 + BN + relu, Dense D + sigmoid, times the pooled
  vector) -> [B, D]. Convs with biases, He fan-out init, Dense N(0, 0.001), as theirs."""
  norm: Callable
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    conv = functools.partial(nn.Conv, dtype=self.dtype, kernel_init=conv_init)
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=nn.initializers.normal(0.001))
    y = self.norm(name="reduce_norm")(conv(max(d // 2, 1), (1, 1), name="reduce")(x))
    y = nn.relu(
        self.norm(name="conv3x3_norm")(conv(d, (3, 3), padding=1, name="conv3x3")(y))
        + self.norm(name="conv1x3_norm")(conv(d, (1, 3), padding=((0, 0), (1, 1)),
                                              name="conv1x3")(y))
        + self.norm(name="conv3x1_norm")(conv(d, (3, 1), padding=((1, 1), (0, 0)),
                                              name="conv3x1")(y)))
    pooled = jnp.mean(x * jnp.sum(y, axis=-1, keepdims=True), axis=(1, 2))
    gate = nn.relu(self.norm(name="channel_norm")(dense(max(d // 16, 4), name="channel_fc1")(pooled)))
    return pooled * nn.sigmoid(dense(d, name="channel_fc2")(gate))


class DANHead(nn.Module):
  """DAN's heads and fusion on the last map x [B, h, w, D]: `num_heads` DANAttention heads
  [B, H, D], log-softmax across the heads (when H > 1), summed -> features [B, D], then
  Dense(K) and BatchNorm -> logits (their `fc` + `bn`). For the trainer's affinity and
  partition losses (ferjax.losses) it sows, when applied with mutable=["aux"], the globally
  pooled map `dan_pooled` [B, D], the fused heads `dan_heads` [B, H, D] (after the
  log-softmax, as their forward returns them) and the class centres `dan_centers` [K, D], a
  parameter (N(0, 1) init, as torch.randn) that only the affinity loss uses."""
  num_classes: int
  num_heads: int
  norm: Callable
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    heads = jnp.stack([DANAttention(self.norm, self.dtype, name=f"attention{i + 1}")(x)
                       for i in range(self.num_heads)], axis=1).astype(jnp.float32)
    if self.num_heads > 1:
      heads = jax.nn.log_softmax(heads, axis=1)
    features = jnp.sum(heads, axis=1)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(features)
    logits = self.norm(name="fc_norm")(logits)
    centers = self.param("centers", nn.initializers.normal(1.0),
                         (self.num_classes, x.shape[-1]), jnp.float32)
    sow(self, "dan_pooled", jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
    sow(self, "dan_heads", heads)
    sow(self, "dan_centers", centers)
    return logits, features


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-10/18/34)."""
  filters: int
  strides: int
  conv: Callable
  norm: Callable
  cbam: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), self.strides, padding=1)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3), padding=1)(y)
    # Zero-init the last BatchNorm scale: each block starts as the identity (Goyal et al. 2017).
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if self.cbam:
      y = CBAM(self.norm, dtype=self.dtype)(y)
    return nn.relu(_shortcut(x, y, self.strides, self.conv, self.norm) + y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50)."""
  filters: int
  strides: int
  conv: Callable
  norm: Callable
  cbam: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides, padding=1)(y)))
    y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.filters * 4, (1, 1))(y))
    if self.cbam:
      y = CBAM(self.norm, dtype=self.dtype)(y)
    return nn.relu(_shortcut(x, y, self.strides, self.conv, self.norm) + y)


def _shortcut(x, y, strides, conv, norm):
  """Identity, or a strided 1x1 projection when the shape changes."""
  if x.shape == y.shape:
    return x
  return norm(name="norm_proj")(conv(y.shape[-1], (1, 1), strides, name="conv_proj")(x))


class ResNet(nn.Module):
  """ResNet returning (logits, pooled features); see the module docstring."""
  stage_sizes: Sequence[int]
  block: str  # "basic" | "bottleneck"
  num_classes: int
  width: float = 1.0
  stem: str = "small"
  cbam: bool = False
  input_norm: str = "none"
  dtype: Any = jnp.float32
  head: str = "linear"        # linear | cosine (module docstring)
  cosine_scale: float = 1.0   # cosine head: logits = cosine_scale * cos
  pooling: str = "avg"        # avg | app (module docstring)
  app_keep: float = 0.8       # app: share of the last map's positions kept
  rul_dim: int = 64           # rul: embedding width
  rul_dropout: float = 0.4    # rul: dropout before the embeddings (train only)
  dan_heads: int = 4          # dan: cross-attention heads

  @nn.compact
  def __call__(self, x, train: bool = True, mix_with=None):
    """(logits, features). `mix_with` (int [B], rul head in training only): each example's
    partner for RUL's uncertainty-weighted feature mixing; the logits are then the mixed ones."""
    if self.input_norm == "per_image":
      x = standardize_per_image(x)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_init)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    block = BasicBlock if self.block == "basic" else BottleneckBlock
    widths = stage_widths(self.width)

    x = x.astype(self.dtype)
    if self.stem == "standard":
      x = conv(widths[0], (7, 7), 2, padding=3, name="stem_conv")(x)
      x = nn.relu(norm(name="stem_norm")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:  # small: 3x3/1; strided: 3x3/2 (half the map from the start: 48 px -> 24-12-6-3).
      stride = 2 if self.stem == "strided" else 1
      x = conv(widths[0], (3, 3), stride, padding=1, name="stem_conv")(x)
      x = nn.relu(norm(name="stem_norm")(x))

    for stage, num_blocks in enumerate(self.stage_sizes):
      for i in range(num_blocks):
        strides = 2 if stage > 0 and i == 0 else 1
        x = block(widths[stage], strides, conv, norm, self.cbam, self.dtype,
                  name=f"stage{stage + 1}_block{i + 1}")(x)

    # The last map, for training objectives that look at it (EAC's class activation maps):
    # stored only when the caller applies with mutable=["aux"].
    sow(self, "feature_map", x)
    if self.head == "rul":
      logits, features = RULHead(self.num_classes, self.rul_dim, self.rul_dropout, norm,
                                 self.dtype, name="rul")(x, train, mix_with)
      return logits.astype(jnp.float32), features.astype(jnp.float32)
    if self.head == "dan":
      logits, features = DANHead(self.num_classes, self.dan_heads, norm, self.dtype,
                                 name="dan")(x)
      return logits.astype(jnp.float32), features.astype(jnp.float32)
    if self.pooling == "app":
      features = attentive_patch_pool(x, self.app_keep)
    else:
      features = jnp.mean(x, axis=(1, 2))
    if self.head == "cosine":
      logits = CosineHead(self.num_classes, self.cosine_scale, name="head")(features)
    else:
      logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(features)
    return logits.astype(jnp.float32), features.astype(jnp.float32)


def standardize_per_image(x):
  """Zero mean, unit variance per image (std floored at 1/sqrt(pixels), as TF's version).

  Removes each image's global brightness and contrast, which BatchNorm (batch statistics)
  cannot; part of the model, so training and evaluation always agree.
  """
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  std = jnp.std(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) / jnp.maximum(std, 1.0 / np.sqrt(np.prod(x.shape[1:])))


def stage_widths(width: float) -> tuple[int, ...]:
  """Channels of the four stages: 64-128-256-512 times `width` (at least 4 each)."""
  return tuple(max(4, int(round(64 * width * 2 ** i))) for i in range(4))


def create_model(name: str, *, num_classes: int, stem: str = "small", width: float = 1.0,
                 cbam: bool = False, input_norm: str = "none", dtype: str = "float32",
                 head: str = "linear", cosine_scale: float = 1.0, pooling: str = "avg",
                 app_keep: float = 0.8, rul_dim: int = 64, rul_dropout: float = 0.4,
                 dan_heads: int = 4) -> ResNet:
  """Builds a ResNet by name (resnet10 / resnet18 / resnet34 / resnet50)."""
  stage_sizes, block = ARCHITECTURES[name]
  return ResNet(stage_sizes=stage_sizes, block=block, num_classes=num_classes, width=width,
                stem=stem, cbam=cbam, input_norm=input_norm, dtype=DTYPES[dtype], head=head,
                cosine_scale=float(cosine_scale), pooling=pooling, app_keep=float(app_keep),
                rul_dim=int(rul_dim), rul_dropout=float(rul_dropout), dan_heads=int(dan_heads))


def model_from_config(model_config, num_classes: int) -> ResNet:
  """`config.model` (name, stem, width, cbam, input_norm, dtype, head, cosine_scale, pooling,
  app_keep, rul_dim, rul_dropout, dan_heads) -> ResNet."""
  m = model_config
  return create_model(m.name, num_classes=num_classes, stem=m.stem, width=m.width, cbam=m.cbam,
                      input_norm=m.input_norm, dtype=m.dtype, head=m.head,
                      cosine_scale=m.cosine_scale, pooling=m.pooling, app_keep=m.app_keep,
                      rul_dim=m.rul_dim, rul_dropout=m.rul_dropout, dan_heads=m.dan_heads)


def smallest_feature_map(image_size: int, stem: str) -> int:
  """Side of the last stage's feature map (where the smallest convs run)."""
  size = image_size
  if stem == "standard":
    size = (size + 2 * 3 - 7) // 2 + 1  # 7x7/2 conv, padding 3.
    size = (size + 2 * 1 - 3) // 2 + 1  # 3x3/2 max-pool, padding 1.
  elif stem == "strided":
    size = (size + 2 * 1 - 3) // 2 + 1  # 3x3/2 conv, padding 1.
  for _ in range(3):  # Stages 2-4 each halve the map with a 3x3/2 conv, padding 1.
    size = (size + 2 * 1 - 3) // 2 + 1
  return size

"""VAE-GAN models: encoder E, generator G, discriminator D (Flax Linen, used as pure functions).

E maps an image in [-1, 1] to the mean and log-variance of a Gaussian over a `latent_dim`-d
latent; G maps a latent to an image in [-1, 1] (tanh); D maps an image to one logit and also
returns an intermediate feature map, the space in which reconstructions are compared (Larsen et
al. 2016). Two layouts:

- `dcgan` (default): E = conv 4x4/2 per stage (BatchNorm after all but the first, LeakyReLU 0.2)
  then a dense layer to (mu, logvar); G = dense to the smallest map, then transposed convs 4x4/2
  (BatchNorm, ReLU; computed phase by phase, see `UpConv`), tanh; D = E's conv stack (its
  second-to-last stage is the feature layer), then a dense layer to one logit. At 64 px with
  widths 64-128-256-512 this is DCGAN-64.
- `resnet`: pre-activation residual blocks (average-pool down, nearest up), BatchNorm in E and G,
  spectral normalisation (no BatchNorm) in D.

The number of stride-2 stages follows from the resolution: halve while the size stays even and
the map stays >= 3x3 (XLA on CPU is ~100x slower on convs over smaller maps). 64 px -> 4 stages
(4x4), 48 px -> 4 (3x3), 32 px -> 3 (4x4), 128 px -> 5 (4x4). `widths` gives one width per stage.

Class conditioning (`num_classes` > 0; ours, for class-preserving synthesis): E and G see the
label through a learned embedding (concatenated to E's flattened features before its dense layer,
and to G's input latent), as a conditional VAE does, so the latent is free to code what the label
does not (identity, pose, lighting) and G is told the class; D is a projection discriminator
(Miyato & Koyama 2018): logit = psi(phi(x)) + <embed(y), sum_hw phi(x)>, phi its last map.
Every call then takes `labels` [B] (int).

Parameters are float32; `dtype` is the compute dtype (bfloat16 on accelerators). Outputs the
losses see (mu, logvar, images, logits, features) are float32. BatchNorm statistics and
spectral-norm power-iteration vectors live in the `batch_stats` collection.

See docs/methods.md (Semantic augmentation with a VAE-GAN, Class-conditional VAE-GAN).
"""

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ferjax.data import pipeline

ARCHS = ("dcgan", "resnet")
MIN_MAP = 3  # Smallest feature map a conv may run on (see the module docstring).
MAX_MAP = 8  # Largest smallest-map we accept: a bigger one makes the dense layers huge.
BATCHNORM_MOMENTUM = 0.9  # Our choice: running statistics that follow a GAN's fast-moving G.


def num_stages(image_size: int) -> int:
  """Stride-2 stages for `image_size`: halve while even and the map stays >= MIN_MAP."""
  stages, size = 0, int(image_size)
  while size % 2 == 0 and size // 2 >= MIN_MAP:
    size //= 2
    stages += 1
  return stages


def smallest_map(image_size: int) -> int:
  return int(image_size) // 2 ** num_stages(image_size)


def default_widths(image_size: int) -> tuple[int, ...]:
  """DCGAN widths: 64, 128, 256, 512, 512, ... one per stage."""
  return tuple(min(64 * 2 ** i, 512) for i in range(num_stages(image_size)))


def _check_labels(num_classes: int, labels):
  if num_classes and labels is None:
    raise ValueError("a class-conditional VAE-GAN needs labels")


def _embed(num_classes: int, features: int, labels, name: str, dtype):
  """The learned class embedding [B, features] of int labels [B]."""
  return nn.Embed(num_classes, features, dtype=dtype, name=name)(labels.astype(jnp.int32))


def _project(num_classes: int, x, labels, dtype):
  """The projection discriminator's class term <embed(y), sum_hw x> [B] (x [B, H, W, C])."""
  pooled = jnp.sum(x.astype(jnp.float32), axis=(1, 2))
  embedding = _embed(num_classes, x.shape[-1], labels, "class_projection", dtype)
  return jnp.sum(embedding.astype(jnp.float32) * pooled, axis=-1)


def _batch_norm(train: bool, dtype):
  return nn.BatchNorm(use_running_average=not train, momentum=BATCHNORM_MOMENTUM, dtype=dtype)


class UpConv(nn.Module):
  """4x4 stride-2 transposed conv ('SAME': the map doubles), computed as four 2x2 convs.

  Same parameters (kernel [4, 4, in, out]) and outputs as nn.ConvTranspose(features, (4, 4),
  strides=(2, 2), padding="SAME"), and the same FLOPs: output pixel (2m + py, 2n + px) only
  sees kernel taps of parity (py, px) over a 2x2 input window, so each output phase is a plain
  conv. XLA on CPU runs a transposed conv's backward pass ~12x slower than this.
  """
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (4, 4, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    rows = []
    for py in (0, 1):
      cols = []
      for px in (0, 1):
        phase_kernel = kernel[_PHASE_TAPS[py], :][:, _PHASE_TAPS[px]]
        cols.append(jax.lax.conv_general_dilated(
            x, phase_kernel, (1, 1), (_PHASE_PADDING[py], _PHASE_PADDING[px]),
            dimension_numbers=("NHWC", "HWIO", "NHWC")))
      rows.append(jnp.stack(cols, axis=3))  # [B, H, W, px, C]
    y = jnp.stack(rows, axis=2)  # [B, H, py, W, px, C]
    b, h, _, w, _, c = y.shape
    y = y.reshape(b, 2 * h, 2 * w, c)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


# Output phase 0 sees input rows (m - 1, m) through kernel taps (0, 2); phase 1 sees rows
# (m, m + 1) through taps (1, 3). Hence the 2x2 kernels and their one-sided padding.
_PHASE_TAPS = {0: jnp.array([0, 2]), 1: jnp.array([1, 3])}
_PHASE_PADDING = {0: (1, 0), 1: (0, 1)}


# ================================================================================================
# DCGAN layout
# ================================================================================================
class DCGANEncoder(nn.Module):
  widths: Sequence[int]
  latent_dim: int
  dtype: Any = jnp.float32
  num_classes: int = 0

  @nn.compact
  def __call__(self, images, train: bool, labels=None):
    _check_labels(self.num_classes, labels)
    x = images.astype(self.dtype)
    for i, width in enumerate(self.widths):
      # No bias where BatchNorm follows (it would cancel it).
      x = nn.Conv(width, (4, 4), strides=2, padding="SAME", use_bias=i == 0, dtype=self.dtype)(x)
      if i > 0:
        x = _batch_norm(train, self.dtype)(x)
      x = nn.leaky_relu(x, 0.2)
    x = _to_latent(self, x, labels)
    mu, logvar = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return mu, logvar


def _to_latent(encoder, x, labels):
  """E's last layer: flattened map (+ the class embedding) -> 2 * latent_dim."""
  x = x.reshape(x.shape[0], -1)
  if encoder.num_classes:
    x = jnp.concatenate([x, _embed(encoder.num_classes, encoder.latent_dim, labels,
                                   "class_embedding", encoder.dtype)], axis=-1)
  return nn.Dense(2 * encoder.latent_dim, dtype=encoder.dtype)(x)


def _generator_input(generator, z, labels):
  """G's input: the latent (+ the class embedding, as wide as the latent)."""
  z = z.astype(generator.dtype)
  if generator.num_classes:
    z = jnp.concatenate([z, _embed(generator.num_classes, z.shape[-1], labels,
                                   "class_embedding", generator.dtype)], axis=-1)
  return z


class DCGANGenerator(nn.Module):
  widths: Sequence[int]  # The encoder's widths; G runs them in reverse.
  base: int  # Side of the smallest map.
  channels: int
  dtype: Any = jnp.float32
  num_classes: int = 0

  @nn.compact
  def __call__(self, z, train: bool, labels=None):
    _check_labels(self.num_classes, labels)
    widths = tuple(self.widths)
    x = nn.Dense(self.base * self.base * widths[-1], use_bias=False, dtype=self.dtype)(
        _generator_input(self, z, labels))
    x = x.reshape(z.shape[0], self.base, self.base, widths[-1])
    x = nn.relu(_batch_norm(train, self.dtype)(x))
    for width in reversed(widths[:-1]):
      x = UpConv(width, use_bias=False, dtype=self.dtype)(x)
      x = nn.relu(_batch_norm(train, self.dtype)(x))
    x = UpConv(self.channels, dtype=self.dtype)(x)
    return jnp.tanh(x.astype(jnp.float32))


class DCGANDiscriminator(nn.Module):
  widths: Sequence[int]
  dtype: Any = jnp.float32
  num_classes: int = 0

  @nn.compact
  def __call__(self, images, train: bool, labels=None):
    _check_labels(self.num_classes, labels)
    x = images.astype(self.dtype)
    features = None
    for i, width in enumerate(self.widths):
      x = nn.Conv(width, (4, 4), strides=2, padding="SAME", use_bias=i == 0, dtype=self.dtype)(x)
      if i > 0:
        x = _batch_norm(train, self.dtype)(x)
      x = nn.leaky_relu(x, 0.2)
      if i == len(self.widths) - 2:
        features = x
    logit = nn.Dense(1, dtype=self.dtype)(x.reshape(x.shape[0], -1))[:, 0].astype(jnp.float32)
    if self.num_classes:
      logit = logit + _project(self.num_classes, x, labels, self.dtype)
    return logit, features.astype(jnp.float32)


# ================================================================================================
# ResNet layout
# ================================================================================================
def _avg_pool(x):
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _upsample(x):
  n, h, w, c = x.shape
  return jax.image.resize(x, (n, 2 * h, 2 * w, c), "nearest")


class DownBlock(nn.Module):
  """Pre-activation residual block that halves the map; BatchNorm or spectral norm on convs."""
  width: int
  norm: str  # "batch" (encoder) or "spectral" (discriminator).
  first: bool = False  # The first block sees raw pixels: no activation in front of it.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    def conv(features, kernel, y, use_bias=True):
      layer = nn.Conv(features, kernel, padding="SAME", use_bias=use_bias, dtype=self.dtype)
      if self.norm == "spectral":
        return nn.SpectralNorm(layer)(y, update_stats=train)
      return layer(y)

    def activate(y):
      if self.norm == "batch":
        y = _batch_norm(train, self.dtype)(y)
      return nn.leaky_relu(y, 0.2)

    h = x if self.first else activate(x)
    h = conv(self.width, (3, 3), h, use_bias=self.norm != "batch")  # BatchNorm follows.
    h = conv(self.width, (3, 3), activate(h))
    shortcut = conv(self.width, (1, 1), _avg_pool(x))
    return _avg_pool(h) + shortcut


class UpBlock(nn.Module):
  """Pre-activation residual block that doubles the map (nearest upsampling), BatchNorm + ReLU."""
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.relu(_batch_norm(train, self.dtype)(x))
    h = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype)(_upsample(h))
    h = nn.relu(_batch_norm(train, self.dtype)(h))
    h = nn.Conv(self.width, (3, 3), padding="SAME", dtype=self.dtype)(h)
    shortcut = nn.Conv(self.width, (1, 1), dtype=self.dtype)(_upsample(x))
    return h + shortcut


class ResNetEncoder(nn.Module):
  widths: Sequence[int]
  latent_dim: int
  dtype: Any = jnp.float32
  num_classes: int = 0

  @nn.compact
  def __call__(self, images, train: bool, labels=None):
    _check_labels(self.num_classes, labels)
    x = images.astype(self.dtype)
    for i, width in enumerate(self.widths):
      x = DownBlock(width, "batch", first=i == 0, dtype=self.dtype)(x, train)
    x = nn.leaky_relu(_batch_norm(train, self.dtype)(x), 0.2)
    x = _to_latent(self, x, labels)
    mu, logvar = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return mu, logvar


class ResNetGenerator(nn.Module):
  widths: Sequence[int]
  base: int
  channels: int
  dtype: Any = jnp.float32
  num_classes: int = 0

  @nn.compact
  def __call__(self, z, train: bool, labels=None):
    _check_labels(self.num_classes, labels)
    widths = tuple(self.widths)
    x = nn.Dense(self.base * self.base * widths[-1], dtype=self.dtype)(
        _generator_input(self, z, labels))
    x = x.reshape(z.shape[0], self.base, self.base, widths[-1])
    for width in tuple(reversed(widths[:-1])) + (widths[0],):
      x = UpBlock(width, dtype=self.dtype)(x, train)
    x = nn.relu(_batch_norm(train, self.dtype)(x))
    x = nn.Conv(self.channels, (3, 3), padding="SAME", dtype=self.dtype)(x)
    return jnp.tanh(x.astype(jnp.float32))


class ResNetDiscriminator(nn.Module):
  widths: Sequence[int]
  dtype: Any = jnp.float32
  num_classes: int = 0

  @nn.compact
  def __call__(self, images, train: bool, labels=None):
    _check_labels(self.num_classes, labels)
    x = images.astype(self.dtype)
    features = None
    for i, width in enumerate(self.widths):
      x = DownBlock(width, "spectral", first=i == 0, dtype=self.dtype)(x, train)
      if i == len(self.widths) - 2:
        features = x
    x = nn.leaky_relu(x, 0.2)
    logit = nn.SpectralNorm(nn.Dense(1, dtype=self.dtype))(x.reshape(x.shape[0], -1),
                                                           update_stats=train)
    logit = logit[:, 0].astype(jnp.float32)
    if self.num_classes:
      logit = logit + _project(self.num_classes, x, labels, self.dtype)
    return logit, features.astype(jnp.float32)


# ================================================================================================
# The three networks together, and the functional helpers the sampler uses
# ================================================================================================
class VAEGAN(NamedTuple):
  """The three Linen modules (hashable: usable as a static argument or a closure in jit)."""
  encoder: nn.Module
  generator: nn.Module
  discriminator: nn.Module
  image_size: int
  channels: int
  latent_dim: int
  num_classes: int = 0  # > 0: class-conditional (every call takes labels)

  def init(self, key):
    """Variables {'encoder'|'generator'|'discriminator': {'params', 'batch_stats'}} from a key."""
    e_key, g_key, d_key = jax.random.split(key, 3)
    images = jnp.zeros((1, self.image_size, self.image_size, self.channels), jnp.float32)
    z = jnp.zeros((1, self.latent_dim), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if self.num_classes else None
    variables = {
        "encoder": self.encoder.init(e_key, images, train=False, labels=labels),
        "generator": self.generator.init(g_key, z, train=False, labels=labels),
        "discriminator": self.discriminator.init(d_key, images, train=False, labels=labels),
    }
    # Every network gets a batch_stats entry (possibly empty) so the train state has one shape.
    return {name: {"params": v["params"], "batch_stats": v.get("batch_stats", {})}
            for name, v in variables.items()}

  def encode(self, params_E, state_E, images, labels=None):
    """Eval-mode encoder: images (uint8 0..255, or float in [-1, 1]) [B,H,W,C] -> (mu, logvar).
    `labels` [B]: the images' classes (read only by a class-conditional model)."""
    if images.dtype == jnp.uint8:
      images = pipeline.to_float(images)
    return self.encoder.apply({"params": params_E, "batch_stats": state_E}, images, train=False,
                              labels=self.labels(labels))

  def decode(self, params_G, state_G, z, labels=None):
    """Eval-mode generator: latents [B, latent_dim] -> float32 images in [-1, 1]. `labels` [B]:
    the classes to draw (read only by a class-conditional model)."""
    return self.generator.apply({"params": params_G, "batch_stats": state_G}, z, train=False,
                                labels=self.labels(labels))

  def discriminate(self, params_D, state_D, images, labels=None):
    """Eval-mode discriminator: images in [-1, 1] -> (logits [B], features)."""
    return self.discriminator.apply({"params": params_D, "batch_stats": state_D}, images,
                                    train=False, labels=self.labels(labels))

  def labels(self, labels):
    """The labels a call passes on: None for an unconditional model (it has no embedding)."""
    return labels if self.num_classes else None


def build(*, arch: str = "dcgan", image_size: int = 64, channels: int = 1, latent_dim: int = 128,
          widths=None, dtype="float32", num_classes: int = 0) -> VAEGAN:
  """The VAE-GAN for `image_size` px, `channels` channels; widths default to DCGAN's;
  `num_classes` > 0 makes E, G and D class-conditional (see the module docstring)."""
  if arch not in ARCHS:
    raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
  stages = num_stages(image_size)
  widths = tuple(int(w) for w in (widths or default_widths(image_size)))
  if len(widths) != stages:
    raise ValueError(f"widths: {image_size} px has {stages} stages, got {len(widths)} widths")
  dtype = jnp.dtype(dtype)
  base = smallest_map(image_size)
  k = int(num_classes or 0)
  if arch == "dcgan":
    encoder = DCGANEncoder(widths, latent_dim, dtype, k)
    generator = DCGANGenerator(widths, base, channels, dtype, k)
    discriminator = DCGANDiscriminator(widths, dtype, k)
  else:
    encoder = ResNetEncoder(widths, latent_dim, dtype, k)
    generator = ResNetGenerator(widths, base, channels, dtype, k)
    discriminator = ResNetDiscriminator(widths, dtype, k)
  return VAEGAN(encoder, generator, discriminator, int(image_size), int(channels), int(latent_dim),
                k)


# ================================================================================================
# Loss terms (weights and how they combine live in the trainer and its config)
# ================================================================================================
def kl_divergence(mu, logvar):
  """KL(N(mu, sigma^2) || N(0, I)) per example, summed over latent dimensions: [B]."""
  return 0.5 * jnp.sum(jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar, axis=-1)


def hinge_discriminator_loss(logits_real, logits_fake):
  return jnp.mean(nn.relu(1.0 - logits_real)) + jnp.mean(nn.relu(1.0 + logits_fake))


def hinge_generator_loss(logits_fake):
  return -jnp.mean(logits_fake)


def perturb(mu, logvar, eps, alpha):
  """z = mu + alpha * sigma * eps: alpha 0 reconstructs, 1 samples the posterior, >1 explores."""
  return mu + alpha * jnp.exp(0.5 * logvar) * eps

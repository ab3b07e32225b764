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

Parameters are float32; `dtype` is the compute dtype (bfloat16 on accelerators). Outputs the
losses see (mu, logvar, images, logits, features) are float32. BatchNorm statistics and
spectral-norm power-iteration vectors live in the `batch_stats` collection.
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

  @nn.compact
  def __call__(self, images, train: bool):
    x = images.astype(self.dtype)
    for i, width in enumerate(self.widths):
      # No bias where BatchNorm follows (it would cancel it).
      x = nn.Conv(width, (4, 4), strides=2, padding="SAME", use_bias=i == 0, dtype=self.dtype)(x)
      if i > 0:
        x = _batch_norm(train, self.dtype)(x)
      x = nn.leaky_relu(x, 0.2)
    x = nn.Dense(2 * self.latent_dim, dtype=self.dtype)(x.reshape(x.shape[0], -1))
    mu, logvar = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return mu, logvar


class DCGANGenerator(nn.Module):
  widths: Sequence[int]  # The encoder's widths; G runs them in reverse.
  base: int  # Side of the smallest map.
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, train: bool):
    widths = tuple(self.widths)
    x = nn.Dense(self.base * self.base * widths[-1], use_bias=False, dtype=self.dtype)(
        z.astype(self.dtype))
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

  @nn.compact
  def __call__(self, images, train: bool):
    x = images.astype(self.dtype)
    features = None
    for i, width in enumerate(self.widths):
      x = nn.Conv(width, (4, 4), strides=2, padding="SAME", use_bias=i == 0, dtype=self.dtype)(x)
      if i > 0:
        x = _batch_norm(train, self.dtype)(x)
      x = nn.leaky_relu(x, 0.2)
      if i == len(self.widths) - 2:
        features = x
    logit = nn.Dense(1, dtype=self.dtype)(x.reshape(x.shape[0], -1))
    return logit[:, 0].astype(jnp.float32), features.astype(jnp.float32)


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

  @nn.compact
  def __call__(self, images, train: bool):
    x = images.astype(self.dtype)
    for i, width in enumerate(self.widths):
      x = DownBlock(width, "batch", first=i == 0, dtype=self.dtype)(x, train)
    x = nn.leaky_relu(_batch_norm(train, self.dtype)(x), 0.2)
    x = nn.Dense(2 * self.latent_dim, dtype=self.dtype)(x.reshape(x.shape[0], -1))
    mu, logvar = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return mu, logvar


class ResNetGenerator(nn.Module):
  widths: Sequence[int]
  base: int
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, train: bool):
    widths = tuple(self.widths)
    x = nn.Dense(self.base * self.base * widths[-1], dtype=self.dtype)(z.astype(self.dtype))
    x = x.reshape(z.shape[0], self.base, self.base, widths[-1])
    for width in tuple(reversed(widths[:-1])) + (widths[0],):
      x = UpBlock(width, dtype=self.dtype)(x, train)
    x = nn.relu(_batch_norm(train, self.dtype)(x))
    x = nn.Conv(self.channels, (3, 3), padding="SAME", dtype=self.dtype)(x)
    return jnp.tanh(x.astype(jnp.float32))


class ResNetDiscriminator(nn.Module):
  widths: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool):
    x = images.astype(self.dtype)
    features = None
    for i, width in enumerate(self.widths):
      x = DownBlock(width, "spectral", first=i == 0, dtype=self.dtype)(x, train)
      if i == len(self.widths) - 2:
        features = x
    x = nn.leaky_relu(x, 0.2).reshape(x.shape[0], -1)
    logit = nn.SpectralNorm(nn.Dense(1, dtype=self.dtype))(x, update_stats=train)
    return logit[:, 0].astype(jnp.float32), features.astype(jnp.float32)


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

  def init(self, key):
    """Variables {'encoder'|'generator'|'discriminator': {'params', 'batch_stats'}} from a key."""
    e_key, g_key, d_key = jax.random.split(key, 3)
    images = jnp.zeros((1, self.image_size, self.image_size, self.channels), jnp.float32)
    z = jnp.zeros((1, self.latent_dim), jnp.float32)
    variables = {
        "encoder": self.encoder.init(e_key, images, train=False),
        "generator": self.generator.init(g_key, z, train=False),
        "discriminator": self.discriminator.init(d_key, images, train=False),
    }
    # Every network gets a batch_stats entry (possibly empty) so the train state has one shape.
    return {name: {"params": v["params"], "batch_stats": v.get("batch_stats", {})}
            for name, v in variables.items()}

  def encode(self, params_E, state_E, images):
    """Eval-mode encoder: images (uint8 0..255, or float in [-1, 1]) [B,H,W,C] -> (mu, logvar)."""
    if images.dtype == jnp.uint8:
      images = pipeline.to_float(images)
    return self.encoder.apply({"params": params_E, "batch_stats": state_E}, images, train=False)

  def decode(self, params_G, state_G, z):
    """Eval-mode generator: latents [B, latent_dim] -> float32 images in [-1, 1]."""
    return self.generator.apply({"params": params_G, "batch_stats": state_G}, z, train=False)

  def discriminate(self, params_D, state_D, images):
    """Eval-mode discriminator: images in [-1, 1] -> (logits [B], features)."""
    return self.discriminator.apply({"params": params_D, "batch_stats": state_D}, images,
                                    train=False)


def build(*, arch: str = "dcgan", image_size: int = 64, channels: int = 1, latent_dim: int = 128,
          widths=None, dtype="float32") -> VAEGAN:
  """The VAE-GAN for `image_size` px, `channels` channels; widths default to DCGAN's."""
  if arch not in ARCHS:
    raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
  stages = num_stages(image_size)
  widths = tuple(int(w) for w in (widths or default_widths(image_size)))
  if len(widths) != stages:
    raise ValueError(f"widths: {image_size} px has {stages} stages, got {len(widths)} widths")
  dtype = jnp.dtype(dtype)
  base = smallest_map(image_size)
  if arch == "dcgan":
    encoder = DCGANEncoder(widths, latent_dim, dtype)
    generator = DCGANGenerator(widths, base, channels, dtype)
    discriminator = DCGANDiscriminator(widths, dtype)
  else:
    encoder = ResNetEncoder(widths, latent_dim, dtype)
    generator = ResNetGenerator(widths, base, channels, dtype)
    discriminator = ResNetDiscriminator(widths, dtype)
  return VAEGAN(encoder, generator, discriminator, int(image_size), int(channels), int(latent_dim))


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

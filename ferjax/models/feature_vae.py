"""A small MLP VAE over feature vectors (a classifier's penultimate features), used as pure
functions of explicit variables (jit and vmap friendly, like ferjax.models.vaegan).

    vae = feature_vae.build(dim=512, latent_dim=32, hidden=256)
    variables = vae.init(key, train_features)          # {"params", "stats"}
    mu, logvar = vae.encode(variables, features)       # [B, latent_dim] each
    features = vae.decode(variables, z)                 # [B, dim], in feature units

Encoder: Dense(hidden) -> ReLU -> Dense(2 * latent_dim) split into (mu, logvar); decoder:
Dense(hidden) -> ReLU -> Dense(dim). The networks see features standardized by the train
features' per-dimension mean and standard deviation; those statistics, and the per-dimension
range of the train features, are stored beside the parameters (`variables["stats"]`, never
trained). `decode` returns features in the original units, clipped to the train range (a
ResNet's pooled features are means of ReLU outputs: a decoded negative value is no feature).

Loss (`loss`): mean squared error of the reconstruction in standardized units + beta * KL / dim,
with KL = KL(N(mu, sigma^2) || N(0, I)) summed over the latent. Per feature dimension this is
the negative ELBO of a Gaussian decoder of variance 1/2 (standardized units) when beta = 1.

See docs/methods.md (Feature-space semantic augmentation).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

LOGVAR_RANGE = (-10.0, 10.0)  # Keeps exp(logvar) finite early in training.
MIN_STD = 1e-6  # A constant feature (a dead channel) standardizes to 0, not to NaN.


class Encoder(nn.Module):
  hidden: int
  latent_dim: int

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    out = nn.Dense(2 * self.latent_dim, name="out")(h)
    mu, logvar = jnp.split(out, 2, axis=-1)
    return mu, jnp.clip(logvar, *LOGVAR_RANGE)


class Decoder(nn.Module):
  hidden: int
  dim: int

  @nn.compact
  def __call__(self, z):
    h = nn.relu(nn.Dense(self.hidden, name="hidden")(z))
    return nn.Dense(self.dim, name="out")(h)


def feature_stats(features) -> dict:
  """Per-dimension mean, std (floored at MIN_STD), min and max of features [N, D]."""
  features = jnp.asarray(features, jnp.float32)
  return {"mean": features.mean(0), "std": jnp.maximum(features.std(0), MIN_STD),
          "low": features.min(0), "high": features.max(0)}


class FeatureVAE(NamedTuple):
  """The two Linen modules and their sizes (hashable: usable as a static argument in jit)."""
  encoder: Encoder
  decoder: Decoder
  dim: int
  latent_dim: int

  def init(self, key, features) -> dict:
    """{"params": {"encoder", "decoder"}, "stats": feature_stats(features)}."""
    return {"params": jax.jit(self.init_params)(key), "stats": feature_stats(features)}

  def init_params(self, key) -> dict:
    e_key, d_key = jax.random.split(key)
    return {
        "encoder": self.encoder.init(e_key, jnp.zeros((1, self.dim), jnp.float32))["params"],
        "decoder": self.decoder.init(d_key, jnp.zeros((1, self.latent_dim), jnp.float32))["params"],
    }

  # --- in standardized units (what the networks see) --------------------------------------------
  def standardize(self, stats, features):
    return (features - stats["mean"]) / stats["std"]

  def encode_standardized(self, params, x):
    return self.encoder.apply({"params": params["encoder"]}, x)

  def decode_standardized(self, params, z):
    return self.decoder.apply({"params": params["decoder"]}, z)

  # --- in feature units ----------------------------------------------------------------------
  def encode(self, variables, features):
    """features [B, dim] -> (mu, logvar) [B, latent_dim]."""
    return self.encode_standardized(variables["params"],
                                    self.standardize(variables["stats"], features))

  def decode(self, variables, z, clip: bool = True):
    """latents [B, latent_dim] -> features [B, dim] (clipped to the train range)."""
    stats = variables["stats"]
    features = self.decode_standardized(variables["params"], z) * stats["std"] + stats["mean"]
    return jnp.clip(features, stats["low"], stats["high"]) if clip else features

  def loss(self, params, stats, key, features, beta: float):
    """(loss, {"reconstruction", "kl"}) of a batch [B, dim]; see the module docstring."""
    x = self.standardize(stats, features)
    mu, logvar = self.encode_standardized(params, x)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, mu.dtype)
    reconstruction = jnp.mean((self.decode_standardized(params, z) - x) ** 2)
    kl = jnp.mean(0.5 * jnp.sum(jnp.exp(logvar) + mu ** 2 - 1.0 - logvar, axis=-1))
    return reconstruction + beta * kl / self.dim, {"reconstruction": reconstruction, "kl": kl}


def build(dim: int, *, latent_dim: int = 32, hidden: int = 256) -> FeatureVAE:
  """The VAE for `dim`-d features."""
  return FeatureVAE(encoder=Encoder(hidden=hidden, latent_dim=latent_dim),
                    decoder=Decoder(hidden=hidden, dim=dim), dim=dim, latent_dim=latent_dim)

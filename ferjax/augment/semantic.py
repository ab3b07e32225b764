"""Semantic data augmentation: new minority-class faces from perturbed VAE-GAN latents.

The method (Li et al. 2024, arXiv 2411.17254): encode a real image of a minority class, inject
randomness into its latent encoding, decode. The paper does not publish the noise formula or
its scale; ours, each a config choice:

- `posterior`: z = mu + alpha * sigma * eps, eps ~ N(0, I). alpha = 0 is the reconstruction,
  alpha = 1 a posterior sample, alpha > 1 explores further from the seed.
- `interpolate`: z = mu_a + lam * (mu_b - mu_a), lam ~ U(0, 1), between the latent means of two
  real images of the same class (SMOTE in latent space).
- `class_gaussian`: z ~ N(m_c, diag(s_c^2)), a Gaussian fitted to class c's latent means
  (as BAGAN does); alpha scales its spread.

Everything here is a pure function of arrays and keys: vmapped over examples, jitted by the
caller, and run inside the classifier's train step.

See docs/methods.md (Latent perturbations, Batch composition and dosage).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ferjax.errors import UserError

MODES = ("posterior", "interpolate", "class_gaussian")
TARGETS = ("uniform", "sqrt", "largest", "explicit")


# --- latent perturbations (one example; vmapped below) --------------------------------------

def perturb_posterior(key, mu, logvar, alpha):
  eps = jax.random.normal(key, mu.shape, mu.dtype)
  return mu + alpha * jnp.exp(0.5 * logvar) * eps


def interpolate(key, mu_a, mu_b):
  lam = jax.random.uniform(key, (), mu_a.dtype)
  return mu_a + lam * (mu_b - mu_a)


def class_gaussian(key, mean, std, alpha):
  return mean + alpha * std * jax.random.normal(key, mean.shape, mean.dtype)


def perturb_latents(key, mode: str, alpha: float, mu, logvar, partner_mu, classes, class_stats):
  """Batched latents [B, d] for the chosen mode; `class_stats` = (means [K,d], stds [K,d])."""
  keys = jax.random.split(key, mu.shape[0])
  if mode == "posterior":
    return jax.vmap(perturb_posterior, in_axes=(0, 0, 0, None))(keys, mu, logvar, alpha)
  if mode == "interpolate":
    return jax.vmap(interpolate)(keys, mu, partner_mu)
  if mode == "class_gaussian":
    means, stds = class_stats
    return jax.vmap(class_gaussian, in_axes=(0, 0, 0, None))(keys, means[classes], stds[classes],
                                                             alpha)
  raise UserError(f"config field 'augment.mode': expected one of {', '.join(MODES)}, got {mode!r}")


def class_stats(mu, labels, num_classes: int):
  """Per-class mean and standard deviation [K, d] of latent means mu [N, d] (class_gaussian):
  a class with one example gets std 1, one with none mean 0 and std 1."""
  mu, labels = np.asarray(mu), np.asarray(labels)
  means = np.stack([mu[labels == k].mean(0) if np.any(labels == k) else np.zeros(mu.shape[1])
                    for k in range(num_classes)])
  stds = np.stack([mu[labels == k].std(0) if np.sum(labels == k) > 1 else np.ones(mu.shape[1])
                   for k in range(num_classes)])
  return jnp.asarray(means, jnp.float32), jnp.asarray(stds, jnp.float32)


# --- balancing policy (host side, computed once) ---------------------------------------------

@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """How each batch is composed, in expectation equal to the rebalanced epoch.

  real_probs [K]: class distribution of the real slots; synth_probs [K]: class distribution of
  the synthetic slots; num_synthetic: synthetic slots per batch (static, so shapes are too);
  target_counts / real_counts / synthetic_counts [K]: the rebalanced epoch, for reports.
  """
  real_probs: np.ndarray
  synth_probs: np.ndarray
  num_synthetic: int
  target_counts: np.ndarray
  real_counts: np.ndarray
  synthetic_counts: np.ndarray


def target_counts(counts, target: str, explicit=None) -> np.ndarray:
  """Per-class counts of the rebalanced training set.

  uniform: every class at the mean count (same size as the real set); sqrt: proportional to
  sqrt(n_c), same total; largest: every class raised to the largest class; explicit: given.
  """
  counts = np.asarray(counts, np.float64)
  k, total = len(counts), counts.sum()
  if target == "uniform":
    return np.full(k, total / k)
  if target == "sqrt":
    root = np.sqrt(counts)
    return root / root.sum() * total
  if target == "largest":
    return np.full(k, counts.max())
  if target == "explicit":
    if explicit is None or len(explicit) != k or min(explicit) < 0:
      raise UserError(f"config field 'augment.target_counts': expected {k} non-negative counts, "
                      f"got {explicit!r}")
    return np.asarray(explicit, np.float64)
  raise UserError(f"config field 'augment.target': expected one of {', '.join(TARGETS)}, "
                  f"got {target!r}")


def plan_batches(counts, *, batch_size: int, target: str = "largest", fill: float = 1.0,
                 explicit=None) -> BatchPlan:
  """Splits each batch into real and synthetic slots so the epoch matches the target.

  A class above its target keeps target-many real images (it is under-sampled); a class below
  keeps all its real images and `fill` of its gap comes from the sampler. fill = 0 is the
  target's plain re-sampling of real data without synthesis.
  """
  if not 0.0 <= fill <= 1.0:
    raise UserError(f"config field 'augment.fill': expected a share in [0, 1], got {fill!r}")
  counts = np.asarray(counts, np.float64)
  target = target_counts(counts, target, explicit)
  real = np.minimum(counts, target)
  synthetic = fill * np.maximum(target - counts, 0.0)
  synthetic[counts == 0] = 0.0  # A class with no real seed image cannot be synthesized.
  total = real.sum() + synthetic.sum()
  num_synthetic = int(round(batch_size * synthetic.sum() / total))
  num_synthetic = min(num_synthetic, batch_size - 1)
  synth_probs = synthetic / synthetic.sum() if synthetic.sum() > 0 else np.zeros_like(synthetic)
  return BatchPlan(real_probs=real / real.sum(), synth_probs=synth_probs,
                   num_synthetic=num_synthetic, target_counts=target, real_counts=real,
                   synthetic_counts=synthetic)

"""Masked-autoencoder (MAE) pre-training pieces: random masking, a light decoder, the loss.

He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners", transcribed from the
reference code (github.com/facebookresearch/mae, models_mae.py): each image's patches are
shuffled by uniform noise and the first (1 - mask_ratio) of them are kept (`random_masking`);
the encoder sees only those; the decoder embeds its tokens to its own width, appends a learned
mask token for every masked patch, puts every token back in its patch's place, adds fixed 2-D
sin-cos position embeddings and runs a few transformer blocks (`MAEDecoder`); the loss is the
mean squared error of the predicted pixels on the masked patches only (`mae_loss`), against
per-patch normalised pixels with `norm_pix_loss`.

The encoder is the classifier's own `vit.ViT` (its `encode(images, keep=...)` runs on the
visible patches only), so pre-trained encoder parameters load into a ViT classifier unchanged:

    tokens = encoder.apply({"params": p}, images, method=vit.ViT.encode, keep=keep)
    pred = decoder.apply({"params": q}, tokens, ids_restore)       # [B, N, p * p * C]

Patches are in `vit.patchify`'s layout (row-major patches, each flattened as row, column,
channel); images are float in [-1, 1], as everywhere in ferjax.

See docs/methods.md (MAE pre-training).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ferjax.models import vit


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """Visible patches per image: MAE's int(N * (1 - mask_ratio)), with a tolerance so that, e.g.,
  100 patches at 0.9 keep 10 (floating point gives 9.999...)."""
  return int(num_patches * (1.0 - mask_ratio) + 1e-6)


def random_masking(key, batch: int, num_patches: int, mask_ratio: float):
  """(keep int32 [B, n_keep], mask float32 [B, N] with 1 = masked, ids_restore int32 [B, N]).

  MAE's random_masking: per image, patches sorted by uniform noise (`ids_shuffle`); `keep` is the
  first n_keep of that order (not sorted: the decoder relies on it), `ids_restore` the inverse
  permutation, so that `take_along_axis(concat([kept, masked]), ids_restore)` puts every patch
  back in its place.
  """
  n_keep = num_kept(num_patches, mask_ratio)
  noise = jax.random.uniform(key, (batch, num_patches))
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  keep = ids_shuffle[:, :n_keep]
  mask = jnp.ones((batch, num_patches), jnp.float32).at[:, :n_keep].set(0.0)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return keep.astype(jnp.int32), mask, ids_restore.astype(jnp.int32)


def normalized_patches(patches, eps: float = 1e-6):
  """Each patch minus its mean, over sqrt(its variance + eps): MAE's norm_pix_loss targets. The
  variance is the unbiased one (torch's Tensor.var default, which the reference calls)."""
  mean = jnp.mean(patches, axis=-1, keepdims=True)
  var = jnp.var(patches, axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


def patch_errors(pred, target_patches, norm_pix_loss: bool):
  """Float32 [B, N]: each patch's mean squared pixel error (against normalised pixels with
  norm_pix_loss)."""
  target = target_patches.astype(jnp.float32)
  if norm_pix_loss:
    target = normalized_patches(target)
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)


def mae_loss(pred, target_patches, mask, norm_pix_loss: bool):
  """MAE's forward_loss: the mean over all masked patches of the batch of the per-patch MSE
  (pred, target [B, N, p * p * C]; mask [B, N], 1 = masked)."""
  errors = patch_errors(pred, target_patches, norm_pix_loss)
  return jnp.sum(errors * mask) / jnp.sum(mask)


def per_image_loss(pred, target_patches, mask, norm_pix_loss: bool):
  """Float32 [B]: each image's `mae_loss` (every image masks as many patches, so their mean is
  the batch's loss)."""
  errors = patch_errors(pred, target_patches, norm_pix_loss)
  return jnp.sum(errors * mask, axis=1) / jnp.sum(mask, axis=1)


def reconstruct(pred, images, mask, patch_size: int, norm_pix_loss: bool):
  """Images [B, H, W, C] to look at: the visible patches of `images`, the predicted ones where
  masked. With norm_pix_loss the prediction is mapped back with each true patch's mean and
  standard deviation (as MAE's visualisation does)."""
  _, h, w, c = images.shape
  target = vit.patchify(images.astype(jnp.float32), patch_size)
  pred = pred.astype(jnp.float32)
  if norm_pix_loss:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.var(target, axis=-1, keepdims=True, ddof=1) + 1e-6)
    pred = pred * std + mean
  patches = jnp.where(mask[..., None] > 0, pred, target)
  return vit.unpatchify(patches, patch_size, h, w, c)


def masked_images(images, mask, patch_size: int, fill: float = -1.0):
  """`images` with their masked patches set to `fill` (black in [-1, 1])."""
  _, h, w, c = images.shape
  patches = vit.patchify(images.astype(jnp.float32), patch_size)
  patches = jnp.where(mask[..., None] > 0, fill, patches)
  return vit.unpatchify(patches, patch_size, h, w, c)


class MAEDecoder(nn.Module):
  """MAE's decoder: encoder tokens (prefix tokens first, then the visible patches in `keep`
  order) -> predicted pixels of every patch, float32 [B, N, patch_dim].

  The prefix tokens (the encoder's class token) go through the blocks with a zero position
  embedding and are dropped from the output, as in the reference.
  """
  grid: tuple  # (patch rows, patch columns)
  patch_dim: int  # p * p * C
  width: int
  depth: int
  heads: int
  num_prefix_tokens: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, ids_restore):
    b = tokens.shape[0]
    grid_h, grid_w = self.grid
    n = grid_h * grid_w
    x = nn.Dense(self.width, dtype=self.dtype, kernel_init=vit.dense_init, name="embed")(
        tokens.astype(self.dtype))
    prefix, visible = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (self.width,))
    fill = jnp.broadcast_to(mask_token.astype(self.dtype), (b, n - visible.shape[1], self.width))
    patches = jnp.concatenate([visible, fill], axis=1)
    patches = jnp.take_along_axis(patches, ids_restore[:, :, None], axis=1)  # Unshuffle.
    patches = patches + jnp.asarray(vit.sincos_2d(grid_h, grid_w, self.width), self.dtype)[None]
    x = jnp.concatenate([prefix, patches], axis=1)
    for i in range(self.depth):
      x = vit.EncoderBlock(self.heads, 4 * self.width, self.dtype, name=f"block{i + 1}")(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    pred = nn.Dense(self.patch_dim, dtype=self.dtype, kernel_init=vit.dense_init, name="pred")(
        x[:, self.num_prefix_tokens:])
    return pred.astype(jnp.float32)


def predict(encoder: vit.ViT, decoder: MAEDecoder, params, images, keep, ids_restore):
  """Predicted patches [B, N, p * p * C] of `images` seeing only the `keep` patches;
  `params` is {"encoder": ..., "decoder": ...}."""
  tokens = encoder.apply({"params": params["encoder"]}, images, method=vit.ViT.encode, keep=keep)
  return decoder.apply({"params": params["decoder"]}, tokens, ids_restore)

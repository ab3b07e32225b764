"""Vision Transformers (ViT-Ti / S / B) for face images, with a class-token or average readout.

Dosovitskiy et al. 2021 ("An Image is Worth 16x16 Words"), in the pre-norm layout of the
reference code (github.com/google-research/vision_transformer, vit_jax/models_vit.py, and
big_vision's models/vit.py): a strided conv cuts the image into p x p patches and embeds each,
fixed 2-D sin-cos position embeddings are added, then `depth` blocks of
LayerNorm -> multi-head self-attention -> residual, LayerNorm -> MLP (GELU) -> residual, and a
final LayerNorm. The widths are the DeiT / ViT presets (Touvron et al. 2021, Table 1):

  vit_ti  192 wide, 12 blocks,  3 heads,  768 MLP   (~5.7M parameters at 224 px / 16)
  vit_s   384 wide, 12 blocks,  6 heads, 1536 MLP   (~22M)
  vit_b   768 wide, 12 blocks, 12 heads, 3072 MLP   (~86M)

Patch size (`default_patch_size`): 4 px up to 48 px inputs (48 -> 12x12 tokens, 32 -> 8x8),
8 px up to 96 px (64 -> 8x8, 96 -> 12x12), 16 px above (112 -> 7x7, 224 -> 14x14): the
original 16 px patches would leave FER-2013's 48 px faces 3x3 tokens.

Position embeddings are MAE's fixed 2-D sin-cos ones (He et al. 2022, github.com/facebookresearch/
mae, util/pos_embed.py, get_2d_sincos_pos_embed): half the channels encode the patch column,
half the row, each as [sin(pos * w_i), cos(pos * w_i)] with w_i = 1 / 10000^(i / (D/4)). They
hold no parameters and are computed for the grid of the images actually given, so a model
pre-trained at 48 px runs at 64 px with the same parameters: for fixed embeddings,
recomputing them on the new grid is the fine-tuning practice (learned ones would be resized
bilinearly instead, as MAE's interpolate_pos_embed does; this module has none).

Readout `cls`: a learned class token (no position embedding, as MAE's zero cls row) is
prepended and its final state is the feature vector; `gap`: no class token, the mean of the
patch tokens after the final LayerNorm (big_vision's classifier='gap'). The head is a Dense
named `head` initialised to zero (big_vision's head_zeroinit), so head-only tools find
params['head'] as in the ResNets.

As the ResNets: inputs are float images in [-1, 1], [B, H, W, C] with C = 1 or 3, H and W
multiples of the patch size; `dtype=bfloat16` computes in bf16 with float32 parameters
(LayerNorm statistics and the attention softmax in float32); calling the model returns
`(logits [B, K], features [B, D])` as float32. There is no BatchNorm, so `init` makes no
'batch_stats' collection; `apply(..., mutable=["batch_stats"])` with an empty
'batch_stats': {} in the variables returns {'batch_stats': {}}.

For MAE and token-level methods: `ViT.encode(images, keep=...)` runs the encoder on the
visible patches only (`keep` int32 [B, n] row-major patch indices, after the position
embeddings are added, as MAE's random_masking), and `ViT.patch_tokens` returns the final
patch tokens as a [B, H/p, W/p, D] map (class activation / attention maps, attentive
pooling); call them as `model.apply(variables, images, method=ViT.encode, keep=keep)`.
`patchify` / `unpatchify` are MAE's reconstruction-target layout.

See docs/methods.md (ViT backbone, MAE pre-training).
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ferjax.errors import UserError
from ferjax.models import resnet

# name -> (hidden width, depth, heads, MLP width); DeiT's Ti / S and ViT's B (Touvron et al.
# 2021, Table 1; Dosovitskiy et al. 2021, Table 1).
VARIANTS = {
    "vit_ti": (192, 12, 3, 768),
    "vit_s": (384, 12, 6, 1536),
    "vit_b": (768, 12, 12, 3072),
}
MODEL_NAMES = tuple(VARIANTS)
READOUTS = ("cls", "gap")

# MAE / big_vision initialisation: xavier-uniform Dense kernels (and the patch embedding seen as
# a Dense on flattened patches), zero biases, class token N(0, 0.02).
dense_init = nn.initializers.xavier_uniform()
# MAE's PatchEmbed init: xavier-uniform on the kernel viewed as a Dense on flattened p x p x C
# patches (fan in p*p*C, fan out D), not on the conv's receptive-field-scaled fans.
patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                              out_axis=-1)


def default_patch_size(image_size: int) -> int:
  """Patch side for square `image_size` inputs: 4 up to 48 px, 8 up to 96 px, 16 above; when
  that does not divide the size, the largest patch below it that does (100 px -> 10)."""
  preferred = 4 if image_size <= 48 else 8 if image_size <= 96 else 16
  for p in range(preferred, 1, -1):
    if image_size % p == 0:
      return p
  raise UserError(f"data.image_size={image_size} has no patch size in 2..{preferred} dividing it")


def sincos_1d(positions: np.ndarray, dim: int) -> np.ndarray:
  """[len(positions), dim]: sin then cos of positions * 1/10000^(i/(dim/2)) (MAE's
  get_1d_sincos_pos_embed_from_grid)."""
  if dim % 2:
    raise ValueError(f"sin-cos embedding width {dim} is odd")
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(np.asarray(positions, np.float64).reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
  """Fixed 2-D position embeddings, float32 [grid_h * grid_w, dim], patches in row-major order.

  MAE's get_2d_sincos_pos_embed (util/pos_embed.py), also for non-square grids: the first
  dim/2 channels embed the column (x) index, the last dim/2 the row (y) index, each with
  `sincos_1d`; `dim` must be a multiple of 4. The top-left patch is [0]*D/4 + [1]*D/4 twice.
  """
  if dim % 4:
    raise ValueError(f"2-D sin-cos embedding width {dim} is not a multiple of 4")
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  emb = np.concatenate([sincos_1d(cols, dim // 2), sincos_1d(rows, dim // 2)], axis=1)
  return emb.astype(np.float32)


def patchify(images, p: int):
  """[B, H, W, C] -> [B, (H/p) * (W/p), p * p * C]: row-major patches, each flattened as
  (row in patch, column in patch, channel), MAE's patchify for channels-last images."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // p, p, w // p, p, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches, p: int, h: int, w: int, c: int):
  """The inverse of `patchify`: [B, (h/p) * (w/p), p * p * c] -> [B, h, w, c]."""
  b = patches.shape[0]
  x = patches.reshape(b, h // p, w // p, p, p, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class MlpBlock(nn.Module):
  """Dense -> GELU (exact erf, as torch's nn.GELU in MAE / timm) -> Dense."""
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    out_dim = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=dense_init, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(out_dim, dtype=self.dtype, kernel_init=dense_init, name="fc2")(x)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)) (LayerNorm eps 1e-6)."""
  heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.heads, dtype=self.dtype, kernel_init=dense_init,
        deterministic=True, force_fp32_for_softmax=True, name="attention")(y, y)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
    return x + MlpBlock(self.mlp_dim, self.dtype, name="mlp")(y)


class ViT(nn.Module):
  """Vision Transformer returning (logits, pooled features); see the module docstring.

  No dropout: `train` changes nothing (the trainer passes no 'dropout' rng).
  """
  num_classes: int
  patch_size: int
  hidden: int
  depth: int
  heads: int
  mlp_dim: int
  readout: str = "cls"  # cls | gap
  input_norm: str = "none"
  dtype: Any = jnp.float32

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens in `encode`'s output: 1 (class token) or 0 (gap)."""
    return 1 if self.readout == "cls" else 0

  def setup(self):
    if self.readout not in READOUTS:
      raise UserError(f"ViT readout {self.readout!r} is not one of {', '.join(READOUTS)}")
    if self.hidden % self.heads or self.hidden % 4:
      raise UserError(f"ViT width {self.hidden} must be a multiple of 4 and of its "
                      f"{self.heads} heads")
    p = self.patch_size
    self.embedding = nn.Conv(self.hidden, (p, p), strides=(p, p), padding="VALID",
                             dtype=self.dtype, kernel_init=patch_init, name="embedding")
    if self.readout == "cls":
      # Shape [D] (not [1, 1, D]): a vector, like biases and LayerNorm scales, so ndim-based
      # weight-decay masks leave it alone, as MAE's no_weight_decay does.
      self.cls = self.param("cls", nn.initializers.normal(0.02), (self.hidden,))
    self.blocks = [EncoderBlock(self.heads, self.mlp_dim, self.dtype, name=f"block{i + 1}")
                   for i in range(self.depth)]
    self.encoder_norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm")
    self.head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                         name="head")

  def _grid(self, images) -> tuple[int, int]:
    _, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise UserError(f"ViT input {h}x{w} px is not a multiple of its {p} px patches")
    return h // p, w // p

  def encode(self, images, keep: Optional[Any] = None, train: bool = False):
    """Final tokens [B, prefix + n, D] (after the encoder's LayerNorm): the class token first
    when readout='cls', then the patch tokens, all N = (H/p)(W/p) in row-major order, or only
    those `keep` names (int32 [B, n] patch indices, each row's own), for MAE's encoder."""
    grid_h, grid_w = self._grid(images)
    if self.input_norm == "per_image":
      images = resnet.standardize_per_image(images)
    x = self.embedding(images.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, grid_h * grid_w, self.hidden)
    x = x + jnp.asarray(sincos_2d(grid_h, grid_w, self.hidden), self.dtype)[None]
    if keep is not None:
      x = jnp.take_along_axis(x, jnp.asarray(keep, jnp.int32)[:, :, None], axis=1)
    if self.readout == "cls":
      cls = jnp.broadcast_to(self.cls.astype(self.dtype), (b, 1, self.hidden))
      x = jnp.concatenate([cls, x], axis=1)
    for block in self.blocks:
      x = block(x)
    return self.encoder_norm(x)

  def patch_tokens(self, images, train: bool = False):
    """The final patch tokens as a map, [B, H/p, W/p, D] in the compute dtype."""
    grid_h, grid_w = self._grid(images)
    tokens = self.encode(images, train=train)[:, self.num_prefix_tokens:]
    return tokens.reshape(tokens.shape[0], grid_h, grid_w, self.hidden)

  def pool(self, tokens):
    """Features [B, D] from `encode`'s tokens: the class token, or the patch tokens' mean."""
    if self.readout == "cls":
      return tokens[:, 0]
    return jnp.mean(tokens.astype(jnp.float32), axis=1).astype(tokens.dtype)

  def __call__(self, images, train: bool = True):
    tokens = self.encode(images, train=train)
    # The patch tokens as a map, for objectives on class activation maps (EAC), stored only
    # when applied with mutable=["aux"] (as the ResNets' last map).
    grid_h, grid_w = self._grid(images)
    resnet.sow(self, "feature_map", tokens[:, self.num_prefix_tokens:].reshape(
        tokens.shape[0], grid_h, grid_w, self.hidden))
    features = self.pool(tokens)
    logits = self.head(features)
    return logits.astype(jnp.float32), features.astype(jnp.float32)


def variant_dims(name: str, width: float = 1.0, depth: Optional[int] = None) -> tuple:
  """(hidden, depth, heads, mlp_dim) of a preset, its width scaled by `width` (the heads kept,
  each head's width rounded to a multiple of 4, at least 4; MLP 4x hidden) and its depth
  replaced by `depth` when given: CPU-sized variants such as vit_ti at width 0.25 (48 wide)."""
  if name not in VARIANTS:
    raise UserError(f"model {name!r} is not one of {', '.join(MODEL_NAMES)}")
  hidden, base_depth, heads, mlp_dim = VARIANTS[name]
  if width != 1.0:
    head_dim = max(4, int(round(hidden * width / heads / 4)) * 4)
    hidden, mlp_dim = head_dim * heads, 4 * head_dim * heads
  return hidden, base_depth if depth is None else depth, heads, mlp_dim


def create_model(name: str, *, num_classes: int, image_size: int, patch_size: int = 0,
                 readout: str = "cls", width: float = 1.0, depth: Optional[int] = None,
                 input_norm: str = "none", dtype: str = "float32") -> ViT:
  """Builds a ViT by name (vit_ti / vit_s / vit_b); patch_size 0: `default_patch_size`."""
  hidden, depth, heads, mlp_dim = variant_dims(name, width, depth)
  patch_size = patch_size or default_patch_size(image_size)
  if image_size % patch_size:
    raise UserError(f"data.image_size={image_size} is not a multiple of the ViT's "
                    f"{patch_size} px patches (model.patch_size)")
  return ViT(num_classes=num_classes, patch_size=patch_size, hidden=hidden, depth=depth,
             heads=heads, mlp_dim=mlp_dim, readout=readout, input_norm=input_norm,
             dtype=resnet.DTYPES[dtype])


def model_from_config(model_config, num_classes: int, image_size: int) -> ViT:
  """`config.model` (name, width, input_norm, dtype, and the ViT fields patch_size, readout,
  depth) -> ViT; `image_size` is data.image_size (for the default patch size)."""
  return create_model(model_config.name, num_classes=num_classes, image_size=image_size,
                      patch_size=model_config.patch_size, readout=model_config.readout,
                      width=model_config.width, depth=model_config.depth,
                      input_norm=model_config.input_norm, dtype=model_config.dtype)

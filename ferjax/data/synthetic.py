"""A procedurally generated 7-class facial-expression dataset: ferjax's embedded default.

Faces are drawn from a seed, with no files involved. Each expression is a distribution over
facial-feature parameters (brows, eyes, mouth, nose wrinkles, cheek folds) whose prototypes
overlap where people confuse real expressions (fear/surprise, anger/disgust, sadness/neutral),
and every face also varies in identity, pose, lighting, pixel noise and occlusion. The train
split is long-tailed like RAF-DB; validation and test are balanced.

Pipeline: `class_counts` -> labels -> `sample_expression_params` + `sample_nuisance_params`
-> `render_faces`. Rendering is vectorised numpy over chunks of images, with no per-image
Python loop: a chunk is drawn on a canvas in face coordinates, where every feature is an
implicit shape (ellipse, thick curve, box) with soft edges one image pixel wide, then warped
(bilinear) into the images by each face's position, scale and rotation. Any `image_size` is
drawn directly, not resized.
"""

import numbers

import numpy as np

from ferjax.data.dataset import Dataset
from ferjax.errors import UserError

# FER-2013's Kaggle folder names, in their (alphabetical) order.
CLASS_NAMES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
SPLITS = ("train", "validation", "test")
DEFAULT_NUM_EXAMPLES = {"train": 7000, "validation": 1050, "test": 2100}

# RAF-DB's basic-expression train counts: the long tail the train split imitates.
RAFDB_TRAIN_COUNTS = {"happy": 4772, "neutral": 2524, "sad": 1982, "surprise": 1290,
                      "disgust": 717, "angry": 705, "fear": 281}
# Head to tail; `imbalance_ratio` ranks the classes in this order.
FREQUENCY_ORDER = ("happy", "neutral", "sad", "surprise", "disgust", "angry", "fear")

# Expression prototypes, in face units (face half-height 1, v pointing down):
#   lift: brow height above the eye centre; tilt: > 0 raises the brows' inner ends (sad,
#   fear), < 0 lowers them into a V (anger); arch: brow curvature; pinch: inner ends drawn
#   together; eye: eye height / width; curve: mouth-corner lift (> 0 smile, < 0 frown);
#   width: mouth half-width; jaw / raise: opening below / above the lip line (raise alone is
#   disgust's lifted upper lip); lips: lip half-thickness (thin when pressed in anger);
#   wrinkle: nose-bridge wrinkles; fold: nasolabial folds (cheeks pushed up by a smile).
# A sample moves from neutral towards its prototype by a random intensity, then gets
# per-person jitter (EXPRESSION_JITTER): weak expressions look nearly neutral and the
# confusable pairs share most features, as in real data.
EXPRESSION_FEATURES = ("lift", "tilt", "arch", "pinch", "eye", "curve", "width", "jaw",
                       "raise", "lips", "wrinkle", "fold")
PROTOTYPES = {
  #            lift   tilt  arch  pinch   eye   curve  width   jaw  raise  lips wrinkle fold
  "neutral":  (0.22,  0.00, 0.60, 0.00,  0.52,  0.00, 0.27,  0.00, 0.00, 0.055, 0.00, 0.05),
  "happy":    (0.23,  0.00, 0.70, 0.00,  0.38,  0.13, 0.35,  0.05, 0.02, 0.050, 0.00, 0.75),
  "sad":      (0.22,  0.30, 0.20, 0.02,  0.44, -0.07, 0.25,  0.00, 0.00, 0.055, 0.00, 0.10),
  "surprise": (0.34,  0.00, 1.60, 0.00,  0.85,  0.00, 0.17,  0.20, 0.10, 0.050, 0.00, 0.00),
  "fear":     (0.30,  0.35, 0.30, 0.05,  0.82, -0.05, 0.31,  0.09, 0.05, 0.045, 0.05, 0.10),
  "angry":    (0.11, -0.45, 0.20, 0.06,  0.42, -0.03, 0.22,  0.00, 0.00, 0.030, 0.30, 0.20),
  "disgust":  (0.13, -0.20, 0.40, 0.03,  0.36, -0.06, 0.25,  0.01, 0.07, 0.050, 0.75, 0.45),
}
# Per-sample standard deviation of each feature (person-to-person differences).
EXPRESSION_JITTER = (0.030, 0.10, 0.30, 0.015, 0.07, 0.025, 0.025, 0.025, 0.018, 0.008, 0.15,
                     0.15)
# Intensity range of an expression (0 = neutral face, 1 = prototype).
INTENSITY_RANGE = (0.35, 1.15)
OCCLUSION_RATE = 0.12
SCALE_RANGE = (0.62, 0.82)  # face half-height, as a fraction of the image half-width

# Images drawn at once, in pixels: small enough that a chunk's float32 work arrays stay in
# cache, large enough that numpy's per-call overhead vanishes.
_CHUNK_PIXELS = 64 * 48 * 48
# The face-unit window each face is drawn in before warping: the largest head and hair fit
# inside (plus a margin of two pixels). Below the chin it holds only neck and background, and
# the warp repeats its border rows and columns beyond it.
_CANVAS_U = 1.1  # half-width; the widest hair reaches 0.86 + 0.22
_CANVAS_V = (-1.22, 1.02)  # top (hair at most 1.16 above v = -0.05), bottom (chin at 1)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL's "L".
_SPLIT_KEYS = {"train": 0, "validation": 1, "test": 2}


def load(split, *, image_size=48, channels=1, num_examples=None, seed=0, imbalance_ratio=None,
         label_noise=0.0, **unknown) -> Dataset:
  """Generates split `split` ("train", "validation" or "test") of the synthetic dataset.

  Deterministic: the same arguments give byte-identical arrays, and each split is drawn from
  its own seed derived from `seed`. `num_examples` defaults to 7000 / 1050 / 2100. The train
  split follows RAF-DB's class proportions, or a geometric profile with max/min class ratio
  `imbalance_ratio` when given; validation and test are balanced. `label_noise` replaces that
  fraction of train labels by a different random class (the images keep their true
  expression, and the true labels are kept in extras["clean_label"]; validation and test labels
  stay clean).
  """
  if unknown:
    raise UserError(f"synthetic dataset: unknown option(s) {sorted(unknown)}: expected "
                    "num_examples, seed, imbalance_ratio, label_noise")
  _check_split(split)
  image_size = _check_int("image_size", image_size, 16, 256, "16..256 pixels")
  if not isinstance(channels, numbers.Integral) or isinstance(channels, bool) or channels not in (
      1, 3):
    raise UserError(f"channels: expected 1 or 3, got {channels!r}")
  channels = int(channels)
  seed = _check_int("seed", seed, 0, None, "an integer >= 0")
  label_noise = _check_float("label_noise", label_noise, 0.0, 1.0, "a fraction in [0, 1)",
                             include_high=False)
  counts = class_counts(split, num_examples, imbalance_ratio)

  # Separate streams for labels+faces, pixel noise and label noise: label_noise then changes
  # labels only, never the images.
  face_seq, pixel_seq, noise_seq = np.random.SeedSequence([seed, _SPLIT_KEYS[split]]).spawn(3)
  rng = np.random.default_rng(face_seq)
  labels = rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), counts)).astype(np.int32)
  params = sample_expression_params(labels, rng)
  params.update(sample_nuisance_params(len(labels), rng))
  images = render_faces(params, image_size, channels, np.random.default_rng(pixel_seq))

  extras = {}
  if split == "train" and label_noise > 0:
    extras["clean_label"] = labels.copy()  # The true labels, for the noisy-label protocol.
    noise_rng = np.random.default_rng(noise_seq)
    flip = noise_rng.choice(len(labels), size=round(label_noise * len(labels)), replace=False)
    shift = noise_rng.integers(1, len(CLASS_NAMES), size=len(flip))  # never the same class
    labels[flip] = (labels[flip] + shift) % len(CLASS_NAMES)
  return Dataset(images, labels, CLASS_NAMES, name="synthetic", split=split, extras=extras)


def class_counts(split, num_examples=None, imbalance_ratio=None) -> np.ndarray:
  """Examples per class (int64, CLASS_NAMES order) of a split, without generating it.

  Train: RAF-DB's proportions, or n_i ~ imbalance_ratio^(-rank_i / (K - 1)) with classes
  ranked as in FREQUENCY_ORDER; validation/test: balanced (imbalance_ratio is ignored). Counts
  are the exact scaled values rounded by largest remainder, so each is within 1 of it, and
  every class has at least one example.
  """
  _check_split(split)
  k = len(CLASS_NAMES)
  if num_examples is None:
    num_examples = DEFAULT_NUM_EXAMPLES[split]
  num_examples = _check_int("num_examples", num_examples, k, None,
                            f"an integer >= {k} (one per class)")
  if imbalance_ratio is not None:
    imbalance_ratio = _check_float("imbalance_ratio", imbalance_ratio, 1.0, np.inf,
                                   "a finite number >= 1 (largest / smallest class)",
                                   include_high=False)
  if split != "train":
    weights = np.ones(k)
  elif imbalance_ratio is None:
    weights = np.array([RAFDB_TRAIN_COUNTS[c] for c in CLASS_NAMES], np.float64)
  else:
    rank = np.array([FREQUENCY_ORDER.index(c) for c in CLASS_NAMES], np.float64)
    weights = imbalance_ratio ** (-rank / (k - 1))
  exact = weights / weights.sum() * num_examples
  counts = np.floor(exact).astype(np.int64)
  leftover = num_examples - int(counts.sum())
  counts[np.argsort(counts - exact, kind="stable")[:leftover]] += 1
  while counts.min() < 1:  # only for tiny num_examples with extreme ratios
    counts[np.argmax(counts)] -= 1
    counts[np.argmin(counts)] += 1
  return counts


def sample_expression_params(labels, rng) -> dict[str, np.ndarray]:
  """Per-image expression features (EXPRESSION_FEATURES) for class indices `labels`."""
  n = len(labels)
  protos = np.array([PROTOTYPES[c] for c in CLASS_NAMES], np.float32)
  neutral = protos[CLASS_NAMES.index("neutral")]
  intensity = rng.uniform(*INTENSITY_RANGE, size=(n, 1)).astype(np.float32)
  feats = neutral + intensity * (protos[labels] - neutral)
  feats += rng.standard_normal((n, len(EXPRESSION_FEATURES)), np.float32) * np.array(
      EXPRESSION_JITTER, np.float32)
  p = dict(zip(EXPRESSION_FEATURES, feats.T))
  # Keep shapes drawable: brows off the eyes, eyes never shut, no negative openings.
  limits = {"lift": (0.07, 0.55), "tilt": (-0.9, 0.9), "arch": (-0.6, 3.0), "pinch": (0, 0.1),
            "eye": (0.18, 1.1), "width": (0.12, 0.42), "jaw": (0, 0.35), "raise": (0, 0.2),
            "lips": (0.02, 0.08), "wrinkle": (0, 1), "fold": (0, 1)}
  for name, (low, high) in limits.items():
    p[name] = np.clip(p[name], low, high)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in p.items()}


def sample_nuisance_params(n, rng) -> dict[str, np.ndarray]:
  """Per-image identity, pose, colours, lighting, noise level and occlusion."""
  u = lambda lo, hi, size=n: rng.uniform(lo, hi, size).astype(np.float32)
  p = {}
  # Pose, in image coordinates ([-1, 1] across the image): scale is the face half-height.
  p["center_x"], p["center_y"] = u(-0.1, 0.1), u(-0.08, 0.1)
  p["scale"] = u(*SCALE_RANGE)
  p["angle"] = np.clip(rng.normal(0, 0.14, n), -0.3, 0.3).astype(np.float32)  # radians
  # Identity: face shape, feature layout and hair (face units).
  p["aspect"] = u(0.70, 0.86)  # half-width / half-height
  p["chin"] = u(0.0, 0.22)  # narrowing towards the chin (egg shape)
  p["eye_x"], p["eye_y"] = u(0.28, 0.36), u(-0.16, -0.06)
  p["eye_size"] = u(0.11, 0.145)  # half-width
  p["iris"] = u(0.50, 0.65)  # radius / eye half-width
  p["gaze"] = u(-0.02, 0.02)
  p["brow_thickness"] = u(0.025, 0.05)
  p["brow_length"] = u(0.11, 0.16)  # half-length
  p["nose_y"] = u(0.20, 0.30)
  p["mouth_y"] = u(0.47, 0.60)
  p["hairline"] = u(-0.85, -0.55)
  p["hair_volume"] = u(0.0, 0.22)
  p["hair_length"] = u(-0.45, 0.85)  # lowest v the hair reaches beside the face
  # Colours (RGB in [0, 1]); gray images are their luma.
  tone = u(0, 1)[:, None]
  p["skin"] = ((1 - tone) * [0.96, 0.80, 0.68] + tone * [0.42, 0.28, 0.20]) * u(0.9, 1.1)[:, None]
  hair = u(0.04, 0.65)[:, None]
  p["hair"] = hair * np.stack([u(0.9, 1.2), u(0.75, 1.0), u(0.55, 0.85)], 1)
  p["iris_color"] = u(0.05, 0.35)[:, None] * np.stack([u(0.6, 1), u(0.6, 1), u(0.5, 1)], 1)
  gray_bg = u(0.05, 0.95)[:, None]
  p["background"] = gray_bg + u(0.3, 0.8)[:, None] * (u(0, 1, (n, 3)) - 0.5)
  # Lighting: global gain and offset (contrast, brightness) and a directional ramp.
  p["gain"], p["offset"] = u(0.6, 1.15), u(-0.1, 0.12)
  light = rng.uniform(0, 2 * np.pi, n)
  strength = u(0.0, 0.45)
  p["light_x"] = (strength * np.cos(light)).astype(np.float32)
  p["light_y"] = (strength * np.sin(light)).astype(np.float32)
  p["noise"] = u(0.005, 0.05)  # pixel noise standard deviation
  # Occlusion: a rotated bar or patch (hand, hair strand, glasses frame, microphone...),
  # placed and sized in face units.
  p["occluded"] = rng.random(n) < OCCLUSION_RATE
  p["occluder_x"], p["occluder_y"] = u(-0.45, 0.45), u(-0.55, 0.6)
  bar = rng.random(n) < 0.5
  p["occluder_w"] = np.where(bar, u(0.6, 1.2), u(0.18, 0.4)).astype(np.float32)  # half sizes
  p["occluder_h"] = np.where(bar, u(0.06, 0.16), u(0.15, 0.35)).astype(np.float32)
  p["occluder_angle"] = u(-np.pi, np.pi)
  p["occluder_color"] = u(0, 1)[:, None] * u(0.7, 1.0, (n, 3))
  for key in ("skin", "hair", "iris_color", "background", "occluder_color"):
    p[key] = np.clip(p[key], 0, 1).astype(np.float32)
  return p


def render_faces(params, image_size, channels, noise_rng=None) -> np.ndarray:
  """Draws the faces described by `params` (from the two samplers) as uint8 [N,S,S,channels].

  channels=3 draws colour; channels=1 draws its luma. `noise_rng` supplies pixel noise (None:
  none). Each chunk of faces is drawn at once on a canvas in face coordinates, then warped
  into the image by its pose; no per-image Python loop.
  """
  n = len(params["scale"])
  out = np.empty((n, image_size, image_size, channels), np.uint8)
  chunk = max(1, _CHUNK_PIXELS // image_size**2)
  for start in range(0, n, chunk):
    p = {k: v[start:start + chunk] for k, v in params.items()}
    canvas = _Canvas(p, image_size, channels)
    _draw_faces(canvas, p)
    planes = _warp_to_image(canvas, p, image_size)
    _draw_occluders(planes, p, image_size, channels)
    _light_and_store(planes, p, image_size, noise_rng, out[start:start + chunk])
  return out


def _col(a):
  """Per-image values [n] -> [n, 1, 1], to broadcast against [n, rows, cols]."""
  return np.asarray(a, np.float32).reshape(-1, 1, 1)


def _image_grid(size):
  """Pixel-centre coordinates in [-1, 1]: x as [1, 1, size], y as [1, size, 1]."""
  grid = ((np.arange(size) + 0.5) * (2 / size) - 1).astype(np.float32)
  return grid.reshape(1, 1, -1), grid.reshape(1, -1, 1)


class _Canvas:
  """Colour planes [n, rows, cols] of a chunk of faces, on a grid in face units.

  Face units: origin at the face centre, u to the right, v down, face half-height 1. Here u
  depends only on the column and v only on the row, so shape maths is mostly per row or per
  column, and each feature is drawn only in the window of rows and columns it can reach.
  """

  def __init__(self, p, image_size, channels):
    n = len(p["scale"])
    self.channels = channels
    # One canvas pixel is one image pixel of the largest faces.
    self.step = 2 / (image_size * SCALE_RANGE[1])
    self.pixel = 2 / (image_size * p["scale"])  # an image pixel, in face units
    margin = 2 * 2 / (image_size * SCALE_RANGE[0])  # two pixels of the smallest faces
    half_width, top, bottom = _CANVAS_U + margin, _CANVAS_V[0] - margin, _CANVAS_V[1] + margin
    cols = int(np.ceil(2 * half_width / self.step)) + 1
    rows = int(np.ceil((bottom - top) / self.step)) + 1
    self.u = (-half_width + self.step * np.arange(cols)).astype(np.float32)
    self.v = (top + self.step * np.arange(rows)).astype(np.float32)
    self.sharp = _col(1 / self.pixel)
    self.planes = [np.empty((n, rows, cols), np.float32) for _ in range(channels)]

  def window(self, v_lo, v_hi, u_max):
    """Rows and columns covering v in [v_lo, v_hi] and |u| <= u_max (per face) plus a margin.

    Returns (rows, cols) slices and the window's u [1, 1, w] and v [1, h, 1].
    """
    margin = 2 * self.pixel.max()
    top = max(0, int((np.min(v_lo) - margin - self.v[0]) / self.step))
    bottom = int(np.ceil((np.max(v_hi) + margin - self.v[0]) / self.step)) + 1
    half = np.max(u_max) + margin
    left = max(0, int((-half - self.u[0]) / self.step))
    right = int(np.ceil((half - self.u[0]) / self.step)) + 1
    rows, cols = slice(top, min(bottom, len(self.v))), slice(left, min(right, len(self.u)))
    return rows, cols, self.u[cols].reshape(1, 1, -1), self.v[rows].reshape(1, -1, 1)

  def soft(self, sd, alpha=None):
    """Signed distance (< 0 inside) -> coverage with a one-image-pixel soft edge, in place."""
    sd *= -self.sharp
    sd += 0.5
    np.clip(sd, 0, 1, out=sd)
    if alpha is not None:
      sd *= alpha if np.isscalar(alpha) else _col(alpha)
    return sd

  @staticmethod
  def ellipse_sd(du, dv, rx, ry):
    """Approximate signed distance to an ellipse (exact along its minor axis)."""
    q = du * (1 / rx)
    q *= q
    q = q + (dv * (1 / ry)) ** 2  # may broadcast to a larger shape
    q -= 1
    q *= np.minimum(rx, ry) / 2
    return q

  def paint(self, alpha, colour, rows=slice(None), cols=slice(None)):
    """Blends RGB `colour` [n, 3] (or its luma) over the window with coverage `alpha`."""
    colour = _to_channels(np.asarray(colour, np.float32), self.channels)
    for c, plane in enumerate(self.planes):
      region = plane[:, rows, cols]
      blend = _col(colour[:, c]) - region
      blend *= alpha
      region += blend


def _to_channels(rgb, channels):
  return rgb if channels == 3 else rgb @ _LUMA[:, None]


def _draw_faces(cv, p):
  """Draws background, neck, hair, face and expression features on the canvas."""
  col = _col
  u, v = cv.u.reshape(1, 1, -1), cv.v.reshape(1, -1, 1)
  skin, hair_colour = p["skin"], p["hair"]
  dark = skin * 0.35  # creases and shadows: darkened skin
  background = _to_channels(p["background"], cv.channels)
  for c, plane in enumerate(cv.planes):
    plane[...] = col(background[:, c])

  # Neck: its bottom rows are repeated down to the image edge by the warp.
  rows, cols, wu, wv = cv.window(0.5, _CANVAS_V[1], 0.42 * p["aspect"])
  neck = np.maximum(np.abs(wu) - col(0.42 * p["aspect"]), 0.6 - wv)
  cv.paint(cv.soft(neck), skin * 0.8, rows, cols)

  # Hair: a head ellipse a little larger than the face, down to the hair length.
  volume = p["hair_volume"]
  hair = cv.ellipse_sd(u, v + 0.05, col(p["aspect"] + volume), col(1.05 + volume / 2))
  np.maximum(hair, v - col(p["hair_length"]), out=hair)
  cv.paint(cv.soft(hair), hair_colour)

  # Face: an ellipse narrowing towards the chin (egg shape), minus the fringe above the
  # hairline.
  half_width = col(p["aspect"]) * (1 - col(p["chin"]) * np.maximum(v, 0))
  face = cv.soft(cv.ellipse_sd(u, v, half_width, np.float32(1)))
  rows, cols, wu, wv = cv.window(-1.2, p["hairline"] + 0.6, 1.0)
  fringe = cv.soft(wv - (col(p["hairline"]) + 0.5 * wu * wu))
  face[:, rows, cols] *= 1 - fringe
  cv.paint(face, skin)

  # Eyes: a dark lid outline, the white sclera, the iris clipped to the eye opening.
  ex, ey, rx = p["eye_x"], p["eye_y"], p["eye_size"]
  ry = rx * p["eye"]
  rows, cols, wu, wv = cv.window(ey - ry - 0.04, ey + ry + 0.04, ex + rx + 0.04)
  du, dv = np.abs(wu) - col(ex), wv - col(ey)  # both eyes at once, mirrored in |u|
  eye = cv.ellipse_sd(du, dv, col(rx), col(ry))
  cv.paint(cv.soft(eye - 0.025), dark * 0.6, rows, cols)
  sclera = cv.soft(eye)
  cv.paint(sclera, np.full_like(skin, 0.92), rows, cols)
  radius = col(rx * p["iris"])
  iris = cv.soft(cv.ellipse_sd(du, dv - col(p["gaze"]), radius, radius))
  iris *= sclera
  cv.paint(iris, p["iris_color"], rows, cols)

  # Brows: thick curves v = centre + tilt * t + arch * t^2, t running outwards from the brow
  # centre (tilt > 0 raises the inner ends), tapering towards the outer end.
  bx, by, length = ex - p["pinch"], ey - p["lift"], p["brow_length"]
  reach = np.abs(p["tilt"]) * length + np.abs(p["arch"]) * length**2 + p["brow_thickness"]
  rows, cols, wu, wv = cv.window(by - reach, by + reach, bx + length)
  t = np.abs(wu) - col(bx)
  centre = (col(p["arch"]) * t + col(p["tilt"])) * t + col(by)
  brow = np.abs(wv - centre)
  brow -= col(p["brow_thickness"]) * (1 - 0.35 * t / col(length))
  np.maximum(brow, np.abs(t) - col(length), out=brow)
  cv.paint(cv.soft(brow), hair_colour * 0.6, rows, cols)

  # Nose: two nostrils; wrinkles over the bridge (disgust, some anger): chevron stripes.
  ny = p["nose_y"]
  rows, cols, wu, wv = cv.window(ny - 0.05, ny + 0.05, 0.12)
  nostrils = cv.ellipse_sd(np.abs(wu) - 0.075, wv - col(ny), 0.04, 0.022)
  cv.paint(cv.soft(nostrils, 0.7), dark, rows, cols)
  period = 0.085
  rows, cols, wu, wv = cv.window(ny - 0.32, ny - 0.12, 0.12)
  phase = (wv - 0.6 * np.abs(wu)) * (1 / period)
  stripes = np.abs(phase - np.round(phase)) * period - 0.018  # lines 0.036 thick
  box = np.maximum(np.abs(wu) - 0.12, np.abs(wv - col(ny - 0.22)) - 0.10)
  stripes = np.maximum(stripes, box)
  cv.paint(cv.soft(stripes, 0.8 * p["wrinkle"]), dark, rows, cols)

  # Nasolabial folds: lines from the nose wings to just outside the mouth corners.
  my, mw = p["mouth_y"], p["width"]
  top = ny + 0.02
  bottom = np.maximum(my + 0.04 - p["curve"], top + 0.08)
  slope = (mw + 0.06 - 0.15) / (bottom - top)
  rows, cols, wu, wv = cv.window(top, bottom, mw + 0.09)
  fold = np.abs(np.abs(wu) - (col(slope) * (wv - col(top)) + 0.15))
  fold -= 0.018
  np.maximum(fold, np.abs(wv - col((top + bottom) / 2)) - col((bottom - top) / 2), out=fold)
  cv.paint(cv.soft(fold, 0.7 * p["fold"]), dark, rows, cols)

  # Mouth: lips around an opening between an upper and a lower curve. The centre line bends
  # with `curve` (corners up = smile); the opening is elliptical along the mouth.
  curve, lips = p["curve"], p["lips"]
  rows, cols, wu, wv = cv.window(my - np.maximum(curve, 0) - p["raise"] - lips,
                                 my + np.maximum(-curve, 0) + p["jaw"] + lips, mw + 0.03)
  s2 = wu * wu / col(mw**2)
  centre = col(my) - col(curve) * s2
  bulge = np.sqrt(np.clip(1 - s2, 0, 1))
  gap = np.maximum((centre - col(p["raise"]) * bulge) - wv, wv - (centre + col(p["jaw"]) * bulge))
  corners = np.abs(wu) - col(mw)
  lip_band = np.maximum(gap - col(lips), corners - 0.03)
  cv.paint(cv.soft(lip_band), skin * [0.78, 0.45, 0.45], rows, cols)
  opening = np.maximum(gap - 0.018, corners)
  cv.paint(cv.soft(opening), np.full_like(skin, [0.18, 0.05, 0.05]), rows, cols)


def _warp_to_image(cv, p, size):
  """Samples each face's canvas at the image's pixel centres (bilinear) -> planes [n,S,S]."""
  n = len(p["scale"])
  x, y = _image_grid(size)
  # Image (x, y) -> face (u, v): undo shift, rotation and scale; then -> canvas index.
  cos, sin = np.cos(p["angle"]), np.sin(p["angle"])
  k = 1 / (p["scale"] * cv.step)
  dx, dy = -p["center_x"], -p["center_y"]
  fu = (_col(cos * k) * x + _col((dx * cos + dy * sin) * k - cv.u[0] / cv.step)) + _col(
      sin * k) * y
  fv = (_col(-sin * k) * x + _col((dy * cos - dx * sin) * k - cv.v[0] / cv.step)) + _col(
      cos * k) * y
  # Outside the canvas, repeat its border: background, and the neck at the bottom.
  rows, cols = cv.planes[0].shape[1:]
  np.clip(fu, 0, cols - 1.001, out=fu)
  np.clip(fv, 0, rows - 1.001, out=fv)
  left, top = np.floor(fu), np.floor(fv)
  fu -= left  # now the fractions between neighbouring canvas pixels
  fv -= top
  index = top.astype(np.int32)
  index *= cols
  index += left.astype(np.int32)
  index += _col(np.arange(n) * (rows * cols)).astype(np.int32)
  neighbours = (index, index + 1, index + cols, index + cols + 1)
  planes = []
  for plane in cv.planes:
    a, b, c, d = (plane.reshape(-1).take(i) for i in neighbours)
    b -= a
    b *= fu
    a += b  # top edge
    d -= c
    d *= fu
    c += d  # bottom edge
    c -= a
    c *= fv
    a += c
    planes.append(a)
  return planes


def _draw_occluders(planes, p, size, channels):
  """Blends a rotated bar or patch over the faces that have one, in image coordinates."""
  idx = np.flatnonzero(p["occluded"])
  if not len(idx):
    return
  x, y = _image_grid(size)
  scale = p["scale"][idx]
  cos, sin = np.cos(p["occluder_angle"][idx]), np.sin(p["occluder_angle"][idx])
  ox = p["center_x"][idx] + p["occluder_x"][idx] * scale
  oy = p["center_y"][idx] + p["occluder_y"][idx] * scale
  along = (_col(cos) * x + _col(-(ox * cos + oy * sin))) + _col(sin) * y
  across = (_col(-sin) * x + _col(ox * sin - oy * cos)) + _col(cos) * y
  sd = np.maximum(np.abs(along) - _col(p["occluder_w"][idx] * scale),
                  np.abs(across) - _col(p["occluder_h"][idx] * scale))
  alpha = np.clip(0.5 - sd * (size / 2), 0, 1)
  colour = _to_channels(p["occluder_color"][idx], channels)
  for c, plane in enumerate(planes):
    region = plane[idx]
    region += alpha * (_col(colour[:, c]) - region)
    plane[idx] = region


def _light_and_store(planes, p, size, noise_rng, out):
  """Applies lighting and pixel noise, then rounds into `out` (uint8 [n,S,S,C])."""
  n = len(p["scale"])
  x, y = _image_grid(size)
  # Gain with a directional ramp, offset and noise, in 0..255 units and shared by the
  # channels, so gray stays the luma of colour.
  gain = 255 * p["gain"]
  light = (_col(gain * p["light_x"]) * x + _col(gain)) + _col(gain * p["light_y"]) * y
  shift = _col(255 * p["offset"] + 0.5)  # + 0.5: the uint8 cast below truncates
  if noise_rng is not None:
    # Uniform noise of standard deviation p["noise"]: much cheaper to draw than Gaussian.
    step = 255 * p["noise"] * np.sqrt(12) / 256
    noise = np.frombuffer(noise_rng.bytes(n * size * size), np.uint8).reshape(n, size, size)
    shift = noise * _col(step) + (shift - _col(127.5 * step))
  for c, plane in enumerate(planes):
    plane *= light
    plane += shift
    np.clip(plane, 0, 255, out=plane)
    out[..., c] = plane


def _check_split(split):
  if split not in SPLITS:
    raise UserError(f"synthetic split {split!r}: expected one of {', '.join(SPLITS)}")


def _check_int(name, value, low, high, expected):
  """`value` as an int in [low, high] (high None: unbounded), else a UserError naming `name`."""
  ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
  ok = ok and low <= value and (high is None or value <= high)
  if not ok:
    raise UserError(f"{name}: expected {expected}, got {value!r}")
  return int(value)


def _check_float(name, value, low, high, expected, include_high=True):
  """`value` as a float in [low, high] (or [low, high)), else a UserError naming `name`."""
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  ok = ok and low <= value and (value <= high if include_high else value < high)
  if not ok:  # also rejects NaN, which fails every comparison
    raise UserError(f"{name}: expected {expected}, got {value!r}")
  return float(value)

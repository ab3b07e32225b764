"""A procedurally generated 7-class facial-expression dataset: ferjax's embedded default.

Faces are drawn from a seed, with no files involved. Each expression is a distribution over
facial-feature parameters (brows, eyes, mouth, nose wrinkles, cheek folds) whose prototypes
overlap where people confuse real expressions (fear/surprise, anger/disgust, sadness/neutral),
and every face also varies in identity, pose, lighting, pixel noise and occlusion. The train
split is long-tailed like RAF-DB; validation and test are balanced.

Pipeline: `class_counts` -> labels -> `sample_expression_params` + `sample_nuisance_params`
-> `render_faces`. Rendering is vectorised numpy over chunks of images: every feature is an
implicit shape (ellipse, thick curve, box) evaluated in each face's own rotated and scaled
coordinate frame, with one-pixel soft edges so any `image_size` is drawn directly.
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

# Chunk of images rendered at once, in pixels: small enough that the float32 work arrays of a
# chunk stay in cache (most of the speed), large enough that numpy's per-call cost vanishes.
_CHUNK_PIXELS = 96 * 48 * 48
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
  expression; validation and test labels stay clean).
  """
  if unknown:
    raise UserError(f"synthetic dataset: unknown option(s) {sorted(unknown)}: expected "
                    "num_examples, seed, imbalance_ratio, label_noise")
  _check_split(split)
  image_size = _check_int("image_size", image_size, 16, 256, "16..256 pixels")
  if isinstance(channels, bool) or channels not in (1, 3):
    raise UserError(f"channels: expected 1 or 3, got {channels!r}")
  seed = _check_int("seed", seed, 0, 2**63 - 1, "an integer >= 0")
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

  if split == "train" and label_noise > 0:
    noise_rng = np.random.default_rng(noise_seq)
    flip = noise_rng.choice(len(labels), size=round(label_noise * len(labels)), replace=False)
    shift = noise_rng.integers(1, len(CLASS_NAMES), size=len(flip))  # never the same class
    labels[flip] = (labels[flip] + shift) % len(CLASS_NAMES)
  return Dataset(images, labels, CLASS_NAMES, name="synthetic", split=split)


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
  num_examples = _check_int("num_examples", num_examples, k, 10**8,
                            f"an integer >= {k} (one per class)")
  if imbalance_ratio is not None:
    imbalance_ratio = _check_float("imbalance_ratio", imbalance_ratio, 1.0, 1e6,
                                   "a number >= 1 (max/min class size)")
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
  params = dict(zip(EXPRESSION_FEATURES, feats.T))
  # Keep shapes drawable: eyes never fully shut, openings and strengths non-negative.
  params["eye"] = np.clip(params["eye"], 0.18, 1.1)
  params["width"] = np.clip(params["width"], 0.12, 0.42)
  params["lips"] = np.clip(params["lips"], 0.02, 0.08)
  for name in ("jaw", "raise", "pinch"):
    params[name] = np.maximum(params[name], 0.0)
  for name in ("wrinkle", "fold"):
    params[name] = np.clip(params[name], 0.0, 1.0)
  return {k: np.ascontiguousarray(v) for k, v in params.items()}


def sample_nuisance_params(n, rng) -> dict[str, np.ndarray]:
  """Per-image identity, pose, colours, lighting, noise level and occlusion."""
  u = lambda lo, hi, size=n: rng.uniform(lo, hi, size).astype(np.float32)
  p = {}
  # Pose, in image coordinates ([-1, 1] across the image): scale is the face half-height.
  p["center_x"], p["center_y"] = u(-0.1, 0.1), u(-0.08, 0.1)
  p["scale"] = u(0.62, 0.82)
  p["angle"] = np.clip(rng.normal(0, 0.14, n), -0.3, 0.3).astype(np.float32)  # radians
  # Identity: face shape and feature layout (face units).
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
  # Colours (RGB in [0, 1]); gray images are their luma.
  tone = u(0, 1)[:, None]
  p["skin"] = ((1 - tone) * [0.96, 0.80, 0.68] + tone * [0.42, 0.28, 0.20]) * u(0.9, 1.1)[:, None]
  hair = u(0.04, 0.65)[:, None]
  p["hair"] = hair * np.stack([u(0.9, 1.2), u(0.75, 1.0), u(0.55, 0.85)], 1)
  p["iris_color"] = u(0.05, 0.35)[:, None] * np.stack([u(0.6, 1), u(0.6, 1), u(0.5, 1)], 1)
  gray_bg = u(0.05, 0.95)[:, None]
  p["background"] = gray_bg + u(0.3, 0.8)[:, None] * (u(0, 1, (n, 3)) - 0.5)
  p["background_tilt"] = u(-0.25, 0.25, (n, 2))  # linear ramp over the image
  # Lighting: global gain and offset (contrast, brightness) and a directional ramp.
  p["gain"], p["offset"] = u(0.6, 1.15), u(-0.1, 0.12)
  light = rng.uniform(0, 2 * np.pi, n)
  strength = u(0.0, 0.45)
  p["light_x"] = (strength * np.cos(light)).astype(np.float32)
  p["light_y"] = (strength * np.sin(light)).astype(np.float32)
  p["noise"] = u(0.005, 0.05)  # pixel noise standard deviation
  # Occlusion: a rotated bar or patch (hand, hair strand, glasses frame, microphone...).
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
  no pixel noise). Chunks of images are drawn at once, with no per-image Python loop.
  """
  n = len(params["scale"])
  out = np.empty((n, image_size, image_size, channels), np.uint8)
  chunk = max(1, _CHUNK_PIXELS // (image_size * image_size))
  for start in range(0, n, chunk):
    part = {k: v[start:start + chunk] for k, v in params.items()}
    _render_chunk(part, image_size, channels, noise_rng, out[start:start + chunk])
  return out


def _render_chunk(p, size, channels, noise_rng, out):
  n = len(p["scale"])
  col = lambda a: np.asarray(a, np.float32).reshape(n, 1, 1)  # per-image scalar -> [n,1,1]
  grid = ((np.arange(size, dtype=np.float32) + 0.5) * (2 / size) - 1).astype(np.float32)
  x, y = grid[None, None, :], grid[None, :, None]

  # Face frame: translate, rotate, scale so the face's half-height is 1 (v points down).
  cos, sin, inv = np.cos(p["angle"]), np.sin(p["angle"]), 1 / p["scale"]
  cx, cy = p["center_x"], p["center_y"]
  u = (col(cos * inv) * x + col(-(cx * cos + cy * sin) * inv)) + col(sin * inv) * y
  v = (col(-sin * inv) * x + col((cx * sin - cy * cos) * inv)) + col(cos * inv) * y
  au = np.abs(u)  # left/right symmetric features are drawn once, in |u|
  uu = u * u
  # Soft edge: alpha = clip(0.5 - signed_distance / pixel_size) gives one-pixel antialiasing.
  sharp = col(p["scale"] * size / 2)  # 1 / pixel size, in face units

  def soft(sd, alpha=None):
    sd *= -sharp
    sd += 0.5
    np.clip(sd, 0, 1, out=sd)
    if alpha is not None:
      sd *= alpha if np.isscalar(alpha) else col(alpha)
    return sd

  def ellipse_sd(du, dv, rx, ry):  # approximate signed distance, exact along the minor axis
    q = (du * col(1 / rx)) ** 2
    q += (dv * col(1 / ry)) ** 2
    q -= 1
    q *= col(np.minimum(rx, ry) / 2)
    return q

  rgb = lambda key: np.asarray(p[key], np.float32)
  colours = lambda c: c if channels == 3 else (c @ _LUMA)[:, None]
  img = [None] * channels

  def paint(alpha, colour):  # img = lerp(img, colour, alpha), per channel
    colour = colours(colour)
    for c in range(channels):
      img[c] += alpha * (col(colour[:, c]) - img[c])

  # Background: a flat colour with a linear ramp.
  bg = colours(rgb("background"))
  ramp = col(p["background_tilt"][:, 0]) * x + col(p["background_tilt"][:, 1]) * y
  for c in range(channels):
    img[c] = ramp + col(bg[:, c])

  skin = rgb("skin")
  # Neck, then hair (a head ellipse a little larger than the face), then the face itself.
  neck = np.maximum(au - col(0.42 * p["aspect"]), 0.55 - v)
  paint(soft(neck), skin * 0.8)
  head_sd = ellipse_sd(u, v + 0.05, p["aspect"] + p["hair_volume"], 1.05 + p["hair_volume"] / 2)
  paint(soft(head_sd), rgb("hair"))
  # Egg-shaped face: narrower towards the chin.
  narrow = 1 / (1 - col(p["chin"]) * np.maximum(v, 0))
  face_sd = ellipse_sd(u * narrow, v, p["aspect"], np.ones(n, np.float32))
  face = soft(face_sd)
  fringe = soft(v - (col(p["hairline"]) + 0.5 * uu))  # hair above the hairline
  face *= 1 - fringe
  paint(face, skin)

  dark = skin * 0.35  # creases and shadows: darkened skin
  # Eyes: a dark lid outline, white sclera, dark iris clipped to the eye opening.
  ex, ey, rx = p["eye_x"], p["eye_y"], p["eye_size"]
  ry = rx * p["eye"]
  du, dv = au - col(ex), v - col(ey)
  eye_sd = ellipse_sd(du, dv, rx, ry)
  paint(soft(eye_sd - 0.025), dark * 0.6)
  sclera = soft(eye_sd)
  paint(sclera, np.full((n, 3), 0.92, np.float32))
  ri = rx * p["iris"]
  iris = soft(ellipse_sd(du, dv - col(p["gaze"]), ri, ri))
  iris *= sclera
  paint(iris, rgb("iris_color"))

  # Brows: thick curves v = c + tilt * t + arch * t^2 along t (outward from the brow centre).
  t = au - col(ex - p["pinch"])
  curve = (col(p["arch"]) * t + col(-p["tilt"])) * t + col(ey - p["lift"])
  brow_sd = np.maximum(np.abs(v - curve) - col(p["brow_thickness"]),
                       np.abs(t) - col(p["brow_length"]))
  paint(soft(brow_sd), rgb("hair") * 0.6)

  # Nose: two nostrils; disgust (and some anger) adds chevron wrinkles over the bridge.
  ny = p["nose_y"]
  paint(soft(ellipse_sd(au - 0.075, v - col(ny), np.full(n, 0.04, np.float32),
                        np.full(n, 0.022, np.float32)), 0.7), dark)
  period = 0.085
  phase = (v - 0.6 * au) * (1 / period)
  stripes = np.abs(phase - np.round(phase)) * period - 0.018  # thin lines every `period`
  box = np.maximum(au - 0.12, np.abs(v - col(ny - 0.22)) - 0.10)
  paint(soft(np.maximum(stripes, box), 0.8 * p["wrinkle"]), dark)

  # Nasolabial folds: lines from the nose wings to just outside the mouth corners.
  my, mw = p["mouth_y"], p["width"]
  top_v = ny + 0.02
  bottom_v = np.maximum(my + 0.04 - p["curve"], top_v + 0.08)
  slope = (mw + 0.06 - 0.15) / (bottom_v - top_v)
  fold_u = col(slope) * (v - col(top_v)) + 0.15
  fold_sd = np.maximum(np.abs(au - fold_u) - 0.018,
                       np.abs(v - col((top_v + bottom_v) / 2)) - col((bottom_v - top_v) / 2))
  paint(soft(fold_sd, 0.7 * p["fold"]), dark)

  # Mouth: a lip band around an opening between an upper and a lower curve over s in [-1, 1]:
  # the centre line bends with `curve` (corners up = smile), the opening is elliptical in s.
  s2 = uu * col(1 / mw**2)
  centre = col(my) - col(p["curve"]) * s2
  bulge = np.sqrt(np.clip(1 - s2, 0, 1))
  gap = np.maximum((col(p["raise"]) * bulge - centre) + v, (-col(p["jaw"]) * bulge - v) + centre)
  corners = au - col(mw)
  lips = np.maximum(gap - col(p["lips"]), corners - 0.03)
  paint(soft(lips), skin * [0.78, 0.45, 0.45])
  inner = np.maximum(gap - 0.012, corners)
  paint(soft(inner), np.full((n, 3), [0.18, 0.05, 0.05], np.float32))

  # Occluder: a rotated bar or patch in image coordinates, on the images that have one.
  idx = np.flatnonzero(p["occluded"])
  if len(idx):
    m = len(idx)
    ca, sa = np.cos(p["occluder_angle"][idx]), np.sin(p["occluder_angle"][idx])
    ox, oy = p["occluder_x"][idx] * 1.0, p["occluder_y"][idx] * 1.0
    ox = cx[idx] + ox * p["scale"][idx]
    oy = cy[idx] + oy * p["scale"][idx]
    c_ = lambda a: np.asarray(a, np.float32).reshape(m, 1, 1)
    ru = c_(ca) * x + c_(-(ox * ca + oy * sa)) + c_(sa) * y
    rv = c_(-sa) * x + c_(ox * sa - oy * ca) + c_(ca) * y
    sd = np.maximum(np.abs(ru) - c_(p["occluder_w"][idx] * p["scale"][idx]),
                    np.abs(rv) - c_(p["occluder_h"][idx] * p["scale"][idx]))
    alpha = np.clip(0.5 - sd * (size / 2), 0, 1)
    occ = colours(rgb("occluder_color")[idx])
    for c in range(channels):
      img[c][idx] += alpha * (c_(occ[:, c]) - img[c][idx])

  # Lighting (gain x directional ramp, plus offset) and pixel noise, shared by all channels so
  # that gray stays the luma of colour.
  light = col(p["gain"]) * (1 + col(p["light_x"]) * x + col(p["light_y"]) * y)
  shift = col(p["offset"])
  if noise_rng is not None:
    shift = noise_rng.standard_normal((n, size, size), np.float32) * col(p["noise"]) + shift
  for c in range(channels):
    plane = img[c]
    plane *= light
    plane += shift
    plane *= 255
    plane += 0.5
    np.clip(plane, 0, 255, out=plane)
    out[..., c] = plane  # float -> uint8 truncation, i.e. rounding after the +0.5


def _check_split(split):
  if split not in SPLITS:
    raise UserError(f"synthetic split {split!r}: expected one of {', '.join(SPLITS)}")


def _check_int(name, value, low, high, expected):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
      low <= value <= high):
    raise UserError(f"{name}: expected {expected}, got {value!r}")
  return int(value)


def _check_float(name, value, low, high, expected, include_high=True):
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  ok = ok and low <= value and (value <= high if include_high else value < high)
  if not ok:  # also rejects NaN, which fails every comparison
    raise UserError(f"{name}: expected {expected}, got {value!r}")
  return float(value)

"""PNGs a person would rather look at: image grids, class histograms, confusion matrices, curves.

Matplotlib runs headless (Agg); every function writes one file and returns its path.
"""

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def to_uint8(images) -> np.ndarray:
  """uint8 passes through; floats are read as [-1, 1] (the models' range) and mapped to 0..255."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  images = (np.clip(images.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5
  return np.round(images).astype(np.uint8)


def save_image_grid(images, path, *, ncol: int, scale: int = 2, pad: int = 2) -> pathlib.Path:
  """Writes images [N,H,W,C] as a grid of `ncol` columns, each image upscaled `scale` times."""
  images = to_uint8(images)
  n, h, w, c = images.shape
  nrow = max(1, -(-n // ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncol)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  pil = Image.fromarray(grid[..., 0] if c == 1 else grid, "L" if c == 1 else "RGB")
  if scale != 1:
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  pil.save(path)
  return path


def save_class_grid(images, labels, class_names, path, *, per_class: int = 10,
                    scale: int = 2, seed: int = 0) -> pathlib.Path:
  """One row per class (up to `per_class` images each), class names on the left."""
  images, labels = to_uint8(images), np.asarray(labels)
  rng = np.random.default_rng(seed)
  h, w, c = images.shape[1:]
  rows = []
  for k in range(len(class_names)):
    idx = np.flatnonzero(labels == k)
    idx = rng.choice(idx, min(per_class, len(idx)), replace=False) if len(idx) else idx
    row = np.full((per_class, h, w, c), 255, np.uint8)
    row[:len(idx)] = images[np.sort(idx)]
    rows.append(np.concatenate(list(row), axis=1))
  fig_h = len(class_names) * h * scale / 100 + 0.3
  fig, axes = plt.subplots(len(class_names), 1, figsize=(per_class * w * scale / 100 + 1.2, fig_h),
                           squeeze=False)
  for ax, row, name in zip(axes[:, 0], rows, class_names):
    ax.imshow(row[..., 0] if c == 1 else row, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
  fig.subplots_adjust(left=0.12, right=0.99, top=0.99, bottom=0.01, hspace=0.05)
  return _save(fig, path)


def save_seed_grid(path, seeds, fake, labels, class_names, per_row: int = 5):
  """Each row: `per_row` real seeds of a class, then the faces synthesized from them (the seeds
  in the faces' size and channels)."""
  if seeds.shape[1:] != fake.shape[1:]:
    raise ValueError(f"seeds {seeds.shape[1:]} and faces {fake.shape[1:]} differ in shape")
  grid_images, grid_labels = [], []
  for k in np.unique(labels):
    first = np.flatnonzero(labels == k)[:per_row]
    grid_images += [seeds[first], fake[first]]
    grid_labels += [labels[first]] * 2
  # save_class_grid keeps the given order within a row: seeds first, then their faces.
  return save_class_grid(np.concatenate(grid_images), np.concatenate(grid_labels),
                               class_names, path, per_class=2 * per_row, scale=2)


def save_class_histogram(counts_by_split: dict, class_names, path, *, title="") -> pathlib.Path:
  """Grouped bars of per-class counts, one group per class, one bar per split (log scale off)."""
  fig, ax = plt.subplots(figsize=(1.1 * len(class_names) + 2, 3.6))
  k = len(counts_by_split)
  width = 0.8 / max(k, 1)
  x = np.arange(len(class_names))
  for i, (split, counts) in enumerate(counts_by_split.items()):
    bars = ax.bar(x + (i - (k - 1) / 2) * width, counts, width, label=split)
    ax.bar_label(bars, fontsize=7)
  ax.set_xticks(x, class_names, rotation=30, ha="right")
  ax.set_ylabel("images")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  return _save(fig, path)


def save_confusion(confusion, class_names, path, *, title="") -> pathlib.Path:
  """Row-normalised confusion matrix (rows = true class) with raw counts in each cell."""
  confusion = np.asarray(confusion, np.float64)
  rows = confusion.sum(1, keepdims=True)
  norm = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
  n = len(class_names)
  fig, ax = plt.subplots(figsize=(0.7 * n + 2.5, 0.7 * n + 2))
  ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
  for i in range(n):
    for j in range(n):
      ax.text(j, i, f"{norm[i, j]:.2f}\n{int(confusion[i, j])}", ha="center", va="center",
              fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
  ax.set_xticks(range(n), class_names, rotation=45, ha="right")
  ax.set_yticks(range(n), class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  fig.tight_layout()
  return _save(fig, path)


def save_curves(records: list[dict], keys, path, *, title="", ncols: int = 5) -> pathlib.Path:
  """Plots metrics.jsonl records: one panel per key (rows of `ncols`), x = step; missing values
  are skipped."""
  keys = [k for k in keys if any(k in r for r in records)]
  cols = max(min(len(keys), ncols), 1)
  rows = max(-(-len(keys) // cols), 1)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.3), squeeze=False)
  for ax in axes.flat[len(keys):]:
    ax.axis("off")
  for ax, key in zip(axes.flat, keys):
    pts = [(r["step"], r[key]) for r in records if key in r and isinstance(r[key], (int, float))]
    if pts:
      ax.plot(*zip(*pts))
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("step")
  fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, path)


def save_grouped_bars(values_by_series: dict, class_names, path, *, ylabel="", title="",
                      errors_by_series: dict | None = None) -> pathlib.Path:
  """Per-class bars, one series per method (e.g. per-class recall of each method)."""
  fig, ax = plt.subplots(figsize=(1.3 * len(class_names) + 2.5, 3.8))
  k = len(values_by_series)
  width = 0.8 / max(k, 1)
  x = np.arange(len(class_names))
  for i, (name, values) in enumerate(values_by_series.items()):
    err = None if errors_by_series is None else errors_by_series.get(name)
    ax.bar(x + (i - (k - 1) / 2) * width, values, width, yerr=err, label=name, capsize=2)
  ax.set_xticks(x, class_names, rotation=30, ha="right")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def _save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path

"""The measures of synthetic faces, as pure functions of a judge's logits and features: the
metrics behind `ferjax evaluate-synthetic` (the command: ferjax.evaluate_synthetic) and the
demo's report.

With a classifier trained on real images only (its validation-chosen checkpoint) as the judge,
per class and overall:
- class consistency: share of synthetic faces it assigns to their intended class (next to its
  recall on real test images of that class, the ceiling to read it against);
- Frechet distance between the Gaussians of its penultimate features on real train images and
  on synthetic faces of the class (next to the distance between two disjoint halves of the real
  images, the noise floor for that many images);
- diversity: mean pairwise feature distance within the class, synthetic against real;
- classification accuracy score (CAS): the same classifier recipe trained on synthetic faces
  only (checkpoint chosen on the real validation split), tested on the real test split, next to
  the real-data classifier's test figures.

See docs/methods.md (Synthetic-face quality measures).
"""

import numpy as np


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """||m_a - m_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets [N, D]."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mean_a, mean_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  # Tr((S_a S_b)^1/2) = sum of sqrt of eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric PSD).
  vals, vecs = np.linalg.eigh(cov_a)
  root_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
  cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
  trace_root = np.sqrt(np.clip(cross, 0, None)).sum()
  return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
               - 2.0 * trace_root)


def mean_pairwise_distance(features: np.ndarray, max_items: int = 500, seed: int = 0) -> float:
  """Mean Euclidean distance between distinct pairs (of at most `max_items` random items)."""
  rng = np.random.default_rng(seed)
  if len(features) > max_items:
    features = features[rng.choice(len(features), max_items, replace=False)]
  f = np.asarray(features, np.float64)
  sq = np.sum(f ** 2, 1)
  dist = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2 * f @ f.T, 0, None))
  n = len(f)
  return float(dist.sum() / (n * (n - 1))) if n > 1 else 0.0


def measure(judge_logits_fake, fake_features, fake_labels, real_features, real_labels,
            class_names, real_test_recall=None, seed: int = 0) -> dict:
  """Per-class and overall consistency, Frechet distance and diversity (see module docstring)."""
  rng = np.random.default_rng(seed)
  per_class, consistent = {}, np.argmax(judge_logits_fake, -1) == fake_labels
  for k, name in enumerate(class_names):
    fake_k, real_k = fake_features[fake_labels == k], real_features[real_labels == k]
    if len(fake_k) < 2 or len(real_k) < 4:
      continue
    # Same number of real and synthetic images, so the distances compare like with like.
    n = min(len(fake_k), len(real_k) // 2)
    halves = rng.permutation(len(real_k))
    real_a, real_b = real_k[halves[:n]], real_k[halves[n:2 * n]]
    per_class[name] = {
        "consistency": float(consistent[fake_labels == k].mean()),
        "real_test_recall": None if real_test_recall is None else real_test_recall.get(name),
        "frechet": frechet_distance(real_a, fake_k[:n]),
        "frechet_real_halves": frechet_distance(real_a, real_b),
        "diversity": mean_pairwise_distance(fake_k[:n], seed=seed),
        "diversity_real": mean_pairwise_distance(real_a, seed=seed),
        "num_images": int(n),
    }
  mean = lambda field: float(np.mean([v[field] for v in per_class.values()]))
  return {
      "consistency": float(consistent.mean()),
      "mean_frechet": mean("frechet"), "mean_frechet_real_halves": mean("frechet_real_halves"),
      "mean_diversity": mean("diversity"), "mean_diversity_real": mean("diversity_real"),
      "per_class": per_class,
  }


def markdown(result: dict) -> str:
  lines = [
      f"Synthetic faces: VAE-GAN `{result['vaegan_workdir']}` (step {result['vaegan_step']}), "
      f"{result['mode']} alpha {result['alpha']:g}; judge `{result['classifier_workdir']}` "
      "(trained on real images).", "",
      "| class | consistency | judge's real test recall | Frechet (synthetic) | Frechet (real "
      "halves) | diversity (synthetic) | diversity (real) |",
      "|---|---:|---:|---:|---:|---:|---:|"]
  for name, v in result["per_class"].items():
    recall = "n/a" if v["real_test_recall"] is None else f"{100 * v['real_test_recall']:.1f}"
    lines.append(f"| {name} | {100 * v['consistency']:.1f} | {recall} | {v['frechet']:.2f} | "
                 f"{v['frechet_real_halves']:.2f} | {v['diversity']:.3f} | "
                 f"{v['diversity_real']:.3f} |")
  lines.append(f"| all | {100 * result['consistency']:.1f} | "
               f"{100 * result['real_classifier_test']['mean_class_accuracy']:.1f} (MCA) | "
               f"{result['mean_frechet']:.2f} | {result['mean_frechet_real_halves']:.2f} | "
               f"{result['mean_diversity']:.3f} | {result['mean_diversity_real']:.3f} |")
  if "cas" in result:
    cas, real = result["cas"], result["real_classifier_test"]
    lines += ["", "Classification accuracy score (test split, %): trained on synthetic faces "
              f"only: accuracy {100 * cas['accuracy']:.2f}, mean class accuracy "
              f"{100 * cas['mean_class_accuracy']:.2f}, macro-F1 {100 * cas['macro_f1']:.2f}; "
              f"trained on real images: accuracy {100 * real['accuracy']:.2f}, mean class "
              f"accuracy {100 * real['mean_class_accuracy']:.2f}, macro-F1 "
              f"{100 * real['macro_f1']:.2f}."]
  return "\n".join(lines) + "\n"

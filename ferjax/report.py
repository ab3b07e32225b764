"""Result tables: evaluations of several methods (each over seeds) -> Markdown, mean ± spread.

Every number in a table is recomputed from the `eval_<split>.json` files it is given, so a
report can always be checked against the saved evaluations.
"""

import json
import pathlib

import numpy as np

from ferjax import plots

HEADLINE = (("accuracy", "acc"), ("mean_class_accuracy", "mean class acc"), ("macro_f1", "macro-F1"))
GROUPS = ("head", "medium", "tail")


def read_eval(path) -> dict:
  return json.loads(pathlib.Path(path).read_text())


def stat(values) -> tuple[float, float | None]:
  """Mean and sample standard deviation in percent; no spread (None) for a single run."""
  values = 100.0 * np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None


def summarize(evals_by_method: dict[str, list[dict]]) -> dict:
  """method -> {metric: (mean %, std %)} over its runs, with per-class recall and groups."""
  summary = {}
  for method, evals in evals_by_method.items():
    if not evals:
      continue
    row = {"runs": len(evals)}
    for key, _ in HEADLINE:
      row[key] = stat([e[key] for e in evals])
    for group in GROUPS:
      if all("groups" in e for e in evals):
        row[group] = stat([e["groups"][group]["mean_recall"] for e in evals])
    names = list(evals[0]["per_class"])
    row["recall"] = {n: stat([e["per_class"][n]["recall"] for e in evals]) for n in names}
    summary[method] = row
  return summary


def fmt(stat) -> str:
  mean, std = stat
  return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown_table(summary: dict) -> str:
  """Headline metrics and head/medium/tail mean recall, one row per method."""
  cols = [label for _, label in HEADLINE] + [g for g in GROUPS if any(g in r for r in summary.values())]
  keys = [key for key, _ in HEADLINE] + [g for g in GROUPS if any(g in r for r in summary.values())]
  lines = ["| method | runs | " + " | ".join(cols) + " |",
           "|---|---:|" + "---:|" * len(cols)]
  for method, row in summary.items():
    lines.append(f"| {method} | {row['runs']} | " +
                 " | ".join(fmt(row[k]) if k in row else "—" for k in keys) + " |")
  return "\n".join(lines)


def recall_table(summary: dict) -> str:
  """Per-class recall (%), one row per method."""
  names = list(next(iter(summary.values()))["recall"])
  lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
  for method, row in summary.items():
    lines.append(f"| {method} | " + " | ".join(fmt(row["recall"][n]) for n in names) + " |")
  return "\n".join(lines)


def recall_plot(summary: dict, path, *, title="per-class recall") -> pathlib.Path:
  names = list(next(iter(summary.values()))["recall"])
  values = {m: [r["recall"][n][0] for n in names] for m, r in summary.items()}
  errors = {m: [r["recall"][n][1] or 0.0 for n in names] for m, r in summary.items()}
  return plots.save_grouped_bars(values, names, path, ylabel="recall (%)", title=title,
                                 errors_by_series=errors)

"""FERPlus: the FER-2013 images relabelled by 10 annotators (Barsoum et al., ICMI 2016).

Manual dir: `fer2013.csv` (the images, see `fer2013`) and `fer2013new.csv` from
github.com/microsoft/FERPlus (header `Usage,Image name,neutral,happiness,surprise,sadness,anger,
disgust,fear,contempt,unknown,NF`, one row per fer2013.csv row, in the same order). Both may sit
at the top level or in a `fer2013/` subfolder.

Label = majority vote: the emotion with the most votes among all 10 vote columns. A row is
dropped when it has no votes; when `unknown` or `NF` (not a face) has the most votes, even if an
emotion ties with it; and when two or more emotions tie for the most votes (ties are dropped as
ambiguous, not broken by column order). Splits from Usage: Training /
PublicTest / PrivateTest = train / validation / test. Stored as raw uint8 48x48x1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ferjax.data.builders import common, fer2013
from ferjax.errors import UserError

CLASS_NAMES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
               "contempt")
VOTE_COLUMNS = CLASS_NAMES + ("unknown", "NF")

SPEC = common.DatasetSpec(
    name="ferplus",
    class_names=CLASS_NAMES,
    image_shape=(48, 48, 1),
    splits=("train", "validation", "test"),
    source=("fer2013.csv from the ICML 2013 FER challenge (Kaggle) plus fer2013new.csv from "
            "github.com/microsoft/FERPlus"),
    layout="fer2013.csv and fer2013new.csv (same rows, same order)",
    description="FERPlus: FER-2013 faces with majority-vote labels over 8 emotions.",
    notes="Rows with no majority emotion (ties, unknown, not-a-face) are dropped.",
)


def majority_label(votes: np.ndarray) -> int | None:
  """Label from 10 vote counts (8 emotions, unknown, NF), or None when the row is dropped."""
  top = votes.max()
  if top <= 0 or votes[8] == top or votes[9] == top:
    return None
  winners = np.flatnonzero(votes[:8] == top)
  return int(winners[0]) if winners.size == 1 else None


class FerPlus(common.FerBuilder, skip_registration=True):
  """FERPlus majority-vote labels on the FER-2013 pixels (see the module docstring)."""

  name = "ferplus"
  SPEC = SPEC
  STORAGE = "raw"
  LABEL_INDEX = 3
  MANUAL_DOWNLOAD_INSTRUCTIONS = SPEC.instructions

  @classmethod
  def scan(cls, manual_dir: Path) -> common.Plan:
    spec = cls.SPEC
    manual_dir = common.require_dir(manual_dir, spec)
    images_csv = fer2013.find_csv(manual_dir)
    votes_csv = fer2013.find_csv(manual_dir, "fer2013new.csv")
    if images_csv is None or votes_csv is None:
      missing = " and ".join(n for n, p in (("fer2013.csv", images_csv),
                                            ("fer2013new.csv", votes_csv)) if p is None)
      raise UserError(f"{spec.name}: {manual_dir} has no {missing}: expected {spec.layout}; "
                      f"get them from {spec.source}")
    image_rows = fer2013.scan_csv(images_csv, spec)
    rows = common.open_csv(votes_csv)
    try:
      _, header = next(rows)
    except StopIteration:
      raise UserError(f"{spec.name}: {votes_csv} is empty") from None
    columns = common.header_index(header, ("Usage",) + VOTE_COLUMNS, path=votes_csv, spec=spec)
    plan: common.Plan = {"train": [], "validation": [], "test": []}
    count = 0
    for (index, line, split, _), (vline, row) in zip(image_rows, rows):
      count += 1
      if len(row) < len(header):
        raise UserError(f"{spec.name}: {votes_csv} line {vline}: expected {len(header)} columns, "
                        f"got {len(row)}")
      usage = fer2013.CSV_USAGE.get(row[columns[0]].strip().lower())
      if usage != split:
        raise UserError(f"{spec.name}: {votes_csv} line {vline}: Usage {row[columns[0]]!r} "
                        f"differs from {images_csv.name} line {line}: the files are not aligned")
      votes = np.array([common.parse_int(row[c], what=f"{header[c].strip()} votes",
                                         path=votes_csv, line=vline, spec=spec, lo=0, hi=1000)
                        for c in columns[1:]])
      label = majority_label(votes)
      if label is not None:
        plan[split].append(("csv", images_csv, index, label))
    count += sum(1 for _ in rows)
    if count != len(image_rows):
      raise UserError(f"{spec.name}: {votes_csv} has {count} data rows but {images_csv} has "
                      f"{len(image_rows)}: expected one vote row per image row")
    plan = {s: items for s, items in plan.items() if items}
    if not plan:
      raise UserError(f"{spec.name}: no row of {votes_csv} has a majority emotion")
    return plan

  def _generate_examples(self, items):
    return fer2013.generate(items, self.SPEC)


BUILDER = FerPlus

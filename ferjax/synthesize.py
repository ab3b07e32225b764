"""`ferjax synthesize`: a balanced synthetic set exported to disk, for inspection and reuse.

    ferjax synthesize --vaegan runs/demo/vaegan --per-class 200 --out runs/synthetic_faces

writes `<out>/train/<class>/<class>_00000.png ...` (loadable with
`ferjax.data.load("folder", "train", manual_dir=<out>)`), `<out>/classes.txt`, `<out>/grid.png`
(real seeds beside their synthesized faces, one row per class) and `<out>/synthesis.json` (what
made it: VAE-GAN run and step, perturbation, seed). The seeds are the train split of the
VAE-GAN's dataset at its resolution, or, with `--config`, of a classifier config's dataset in
that config's format and with its `augment.mode` / `augment.alpha`.
"""

import json
import pathlib

import numpy as np

from ferjax import configs, plots, runs, writing
from ferjax.augment import synthesis
from ferjax.core import workdir as workdir_lib
from ferjax.data import folder, splits
from ferjax.errors import UserError
from ferjax.kinds import classifier as classifier_kind


def seed_dataset(vae, config=None):
  """(Dataset of real seeds, synthesize_per_class options) for the export."""
  if config is None:  # The VAE-GAN's own data and format, the classifier's default perturbation.
    ds = splits.load_split(vae.config.data, vae.config.data.split, train=True)
    return ds, synthesis.options(classifier_kind.default_config(), vae.model.image_size,
                                 vae.model.channels)
  return (splits.load_split(config.data, "train", train=True),
          synthesis.options(config))


def export(vaegan_workdir, out, per_class: int, *, config=None, seed: int = 0) -> dict:
  """Writes the folder dataset into `out` (which must not exist yet); returns its provenance."""
  out = pathlib.Path(out)
  if per_class < 1:
    raise UserError(f"--per-class: expected at least 1, got {per_class}")
  if out.exists() or out.is_symlink():
    raise UserError(f"{out} already exists: choose a new --out folder (nothing is overwritten)")
  writing.refuse_clobbering(out, input_dirs=[vaegan_workdir], what="--out")
  workdir_lib.check_writable(out, "--out")
  vae = runs.open_vaegan(vaegan_workdir, "latest")
  seed_data = (vae.config if config is None else config).data
  writing.refuse_clobbering(out, input_dirs=[seed_data.get("manual_dir")], what="--out")
  ds, how = seed_dataset(vae, config)
  fake, labels, seed_idx = synthesis.synthesize_per_class(
      vae, ds.images, ds.labels, ds.num_classes, per_class, seed=seed, **how)
  for name in ds.class_names:  # They become folder names under `out`: checked before writing.
    folder.check_class_name(name, f"dataset {ds.name!r}")
  # Written next to `out` and renamed into place: an interrupted export leaves no partial set.
  try:
    with writing.staged_folder(out, "--out") as staging:
      folder.write(staging, "train", fake, labels, ds.class_names)
      plots.save_seed_grid(staging / "grid.png", synthesis.seeds_like(ds.images[seed_idx], fake),
                           fake, labels, ds.class_names)
      provenance = {
          "vaegan_workdir": str(vaegan_workdir), "vaegan_step": vae.step, **how, "seed": seed,
          "per_class": per_class, "seed_dataset": ds.name, "class_names": list(ds.class_names),
          "counts": np.bincount(labels, minlength=ds.num_classes).tolist(),
      }
      (staging / "synthesis.json").write_text(json.dumps(provenance, indent=2) + "\n")
  except OSError as e:
    raise UserError(f"--out {out}: cannot write ({e.strerror or e})") from None
  return provenance


def cli_main(args) -> int:
  config = (configs.load_config(args.config, getattr(args, "overrides", None) or ())
            if args.config else None)
  if config is not None:  # A classifier config: its data and augment fields are used.
    classifier_kind.validate_config(config)
  info = export(args.vaegan, args.out, args.per_class, config=config, seed=args.seed)
  print(f"wrote {sum(info['counts'])} synthetic faces ({args.per_class} per class, "
        f"{info['image_size']} px, {info['mode']} alpha {info['alpha']:g}, VAE-GAN step "
        f"{info['vaegan_step']}) to {args.out}/train/<class>/; grid {args.out}/grid.png")
  return 0

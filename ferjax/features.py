"""`ferjax features`: a run's penultimate features of a split, of its own dataset or another one,
as one .npz file (the format of ferjax.evaluate.write_features), for `ferjax probe`.

    ferjax features --workdir runs/fer2013 --dataset ckplus --split all --out ckplus.npz
"""

import pathlib

from ferjax import evaluate, runs, writing
from ferjax.core import parallel
from ferjax.errors import UserError


def features_run(workdir, out, *, split: str = "test", dataset: str | None = None,
                 checkpoint="best", tta: str | None = None, data_dir=None,
                 manual_dir=None) -> dict:
  """`ferjax features`: writes `out` (`write_features`' format) for a split of the run's own
  dataset or of another one (every class it has, labels in its own class list: a linear probe
  learns them). Returns {"out", "num_examples", "dim"}."""
  out = pathlib.Path(out).expanduser()
  if out.suffix != ".npz":
    raise UserError(f"--out {out}: expected a file name ending in .npz")
  if out.exists():
    raise UserError(f"--out {out}: already exists: expected a new file (remove it or choose "
                    f"another name)")
  if not out.parent.is_dir():
    raise UserError(f"--out {out}: its folder {out.parent} does not exist")
  writing.refuse_clobbering(out, input_dirs=[workdir, manual_dir], what="--out")
  run = runs.open_classifier(pathlib.Path(workdir), str(checkpoint))
  config = run.config
  if dataset is None or evaluate.is_own_dataset(config, dataset, data_dir, manual_dir):
    writing.refuse_clobbering(out, input_dirs=[config.data.get("manual_dir")], what="--out")
  tta = evaluate.check_tta(tta or config.eval.tta)
  data, _ = evaluate.load_target(config, split, dataset, data_dir=data_dir, manual_dir=manual_dir)
  logits, feats = evaluate.predict_logits(
      run.model, run.variables, data.images, tta=tta, mesh=run.mesh,
      batch_size=evaluate.eval_batch_size(config, run.mesh), return_features=True)
  if parallel.is_main_process():
    evaluate.write_features(out, data, feats, logits, run, split, new=True)
  return {"out": str(out), "num_examples": len(data), "dim": int(feats.shape[-1])}


def features_main(args) -> int:
  """`ferjax features`: see `features_run`."""
  done = features_run(args.workdir, args.out, split=args.split, dataset=args.dataset,
                      checkpoint=args.checkpoint, tta=args.tta, data_dir=args.data_dir,
                      manual_dir=args.manual_dir)
  print(f"wrote {done['num_examples']} x {done['dim']} features to {done['out']}")
  return 0

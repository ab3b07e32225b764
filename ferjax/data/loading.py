"""`ferjax.data.load`: one entry point for every dataset ferjax knows, and the one check of a
split name given by a user (`check_split_name`)."""

from ferjax.data.dataset import Dataset
from ferjax.data.images import convert
from ferjax.data.reading import check_split_name
from ferjax.errors import UserError

DATASET_NAMES = ("synthetic", "fer2013", "ferplus", "rafdb", "affectnet", "affectnet8", "ckplus",
                 "folder")
# Too big for host memory at full size: `load` leaves their images on disk (LazyImages), the
# trainers read them in chunks straight onto the devices; `ferjax data stats` streams them.
STREAMED = ("affectnet", "affectnet8")
def load(name: str, split: str, *, data_dir=None, manual_dir=None, image_size=None,
         channels=None, lazy: bool | None = None, **options) -> Dataset:
  """Loads split `split` of dataset `name` into host memory.

  `synthetic` is generated from a seed (options: num_examples, seed, imbalance_ratio,
  label_noise). `folder` reads `<manual_dir>/<split>/<class>/*.png`. Real datasets are read
  from their prepared TFDS form in `data_dir`; when not prepared yet and `manual_dir` is given,
  they are prepared first. `image_size` (pixels, square) and `channels` (1 or 3) convert the
  images; None keeps the dataset's native form. `lazy`: leave a prepared dataset's images on
  disk as `LazyImages` (None: only for the datasets in STREAMED; synthetic and folder data are
  always in memory).
  """
  if name not in DATASET_NAMES:
    raise UserError(f"unknown dataset {name!r}: expected one of {', '.join(DATASET_NAMES)}")
  check_split_name(split)
  if channels not in (None, 1, 3):
    raise UserError(f"channels: expected 1 or 3, got {channels!r}")
  if image_size is not None and not 8 <= int(image_size) <= 1024:
    raise UserError(f"image_size: expected 8..1024 pixels, got {image_size!r}")
  if name == "synthetic":
    from ferjax.data import synthetic
    return synthetic.load(split, image_size=image_size or 48, channels=channels or 1, **options)
  if options:
    raise UserError(f"dataset {name!r} takes no options {sorted(options)}")
  if name == "folder":  # <manual_dir>/<split>/<class>/*.png, e.g. `ferjax synthesize` output.
    from ferjax.data import folder
    return convert(folder.load(manual_dir, split), image_size=image_size, channels=channels)
  from ferjax.data import builders
  ds = builders.load_prepared(name, split, data_dir=data_dir, manual_dir=manual_dir,
                              lazy=name in STREAMED if lazy is None else lazy)
  return convert(ds, image_size=image_size, channels=channels)

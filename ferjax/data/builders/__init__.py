"""TFDS builders for the real FER datasets, prepared and read without TensorFlow.

One module per dataset (`fer2013`, `ferplus`, `rafdb`, `affectnet`, `ckplus`), shared code in
`common`, and the public API in `locate` (data dir, where a prepared dataset is), `preparing`
(`prepare`), `prepared` (opening a prepared dataset) and `load` (`load_prepared`, `stream`):

    prepare(name, manual_dir, data_dir=None, *, image_size=None, force=False, num_workers=None,
            wait=3600, progress=True) -> {split: count}
    load_prepared(name, split, data_dir=None, manual_dir=None) -> Dataset
    stream(name, split, data_dir=None, batch_size=256, shuffle_seed=None, image_size=None,
           drop_remainder=False) -> iterator of (images uint8 [B,H,W,C], labels int32 [B])
    available_splits(name, data_dir=None, *, folds=False) -> tuple of split names (UserError:
        not prepared); folds=True adds CK+'s fold<k>_train / fold<k>_test
    fold_summary(name, data_dir=None) -> per-fold subjects and images (None without folds)
    prepared_source(name, data_dir=None, image_size=None) -> what a preparation was made from
    split_sizes(name, data_dir=None) -> {split: count}
    is_prepared(name, data_dir=None) -> bool
    prepared_dir(name, data_dir=None, image_size=None) -> Path of the preparation `prepare`
        would reuse, or None
    info(name) -> dict (class names, splits, stored image shape, source, expected layout, ...)
    default_data_dir() -> Path ($FERJAX_DATA_DIR, else ~/.ferjax/datasets)

Dataset names: fer2013, ferplus, rafdb, affectnet (7 classes), affectnet8 (8 classes, with
contempt; both read one prepared AffectNet), ckplus. Importing this package is cheap:
tensorflow_datasets is imported on first use.
"""

from ferjax.data.builders.load import load_prepared, stream
from ferjax.data.builders.locate import (DATA_DIR_ENV, NAMES, default_data_dir, info, is_prepared,
                                         prepare_command, prepared_dir)
from ferjax.data.builders.prepared import (available_splits, fold_summary, prepared_source,
                                           split_sizes)
from ferjax.data.builders.preparing import prepare

__all__ = [
    "DATA_DIR_ENV", "NAMES", "available_splits", "default_data_dir",
    "fold_summary", "info", "is_prepared", "load_prepared", "prepare", "prepare_command",
    "prepared_dir", "prepared_source", "split_sizes", "stream",
]

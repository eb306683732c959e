"""Where the data comes from: MNIST read from its IDX files (see :mod:`rso.data.mnist`)."""

from rso.data.mnist import INPUT_TRANSFORMS, MNIST, DataError, load_mnist, read_idx, resolve_data_dir

__all__ = ["INPUT_TRANSFORMS", "MNIST", "DataError", "load_mnist", "read_idx", "resolve_data_dir"]

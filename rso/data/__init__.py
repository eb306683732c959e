"""Where the data comes from: MNIST read from its IDX files (see :mod:`rso.data.mnist`)."""

from rso.data.mnist import MNIST, DataError, load_mnist, read_idx, resolve_data_dir

__all__ = ["MNIST", "DataError", "load_mnist", "read_idx", "resolve_data_dir"]

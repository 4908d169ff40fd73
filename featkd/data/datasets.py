"""Datasets as whole uint8 tensors: Fashion-MNIST (IDX), CIFAR-10/100 (python pickles), ImageFolder, synthetic.

Small vision datasets fit in memory (Fashion-MNIST train is 47 MB as uint8), so each is read once into
``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64; ``DeviceLoader`` moves them to the device and
does batching, augmentation and normalisation there. Label -1 marks an unlabeled example.
"""

from __future__ import annotations

import difflib
import gzip
import inspect
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

FASHION_MNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")


class DatasetInfo(NamedTuple):
    """What a model and a loader need to know about a dataset: class count, image shape, normalisation."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]  # per channel, on the 0..1 scale
    std: tuple[float, ...]


@dataclass(frozen=True)
class ImageDataset:
    """``images`` uint8 (N, C, H, W), ``labels`` int64 (N,) with -1 = unlabeled, and ``info``.

    Indexing gives ``(image, label)`` like ``torch.utils.data.TensorDataset``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be int64 of shape ({len(self.images)},), got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")
        if self.images.shape[1] != self.info.in_channels:
            raise ValueError(f"images have {self.images.shape[1]} channels but info says {self.info.in_channels}")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        unlabeled = int((self.labels < 0).sum())
        extra = f", {unlabeled} unlabeled" if unlabeled else ""
        return f"ImageDataset({self.info.name}: {len(self)} images {c}x{h}x{w}, {self.info.num_classes} classes{extra})"

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def subset(self, indices: torch.Tensor) -> "ImageDataset":
        """A new dataset with the examples at ``indices`` (same info)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return ImageDataset(self.images[indices], self.labels[indices], self.info)


# ---------------------------------------------------------------------------------------------- IDX
_FETCH_AGAIN = "fetch the dataset's files again (Fashion-MNIST: sudo apt-get install --reinstall dataset-fashion-mnist)"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip-compressed if the name ends in .gz) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path} cannot be read: it is truncated or damaged ({error}); {_FETCH_AGAIN}") from None
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in dtypes:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()}); {_FETCH_AGAIN}")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(dtypes[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the file holds {len(body)}: it "
                         f"is truncated or damaged; {_FETCH_AGAIN}")
    return np.frombuffer(body, dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_mnist(root, split: str) -> ImageDataset:
    folder = Path(root or os.environ.get("FEATKD_FASHION_MNIST") or FASHION_MNIST_DEFAULT)
    prefix = {"train": "train", "test": "t10k"}[split]
    image_file = _find_file(folder, f"{prefix}-images-idx3-ubyte")
    label_file = _find_file(folder, f"{prefix}-labels-idx1-ubyte")
    if image_file is None or label_file is None:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {folder} (need {prefix}-images-idx3-ubyte.gz and "
            f"{prefix}-labels-idx1-ubyte.gz). Install it with `sudo apt-get install dataset-fashion-mnist` "
            f"(or `make data`), or pass root=<folder with the IDX files> / set FEATKD_FASHION_MNIST.")
    images = torch.from_numpy(read_idx(image_file).copy()).unsqueeze(1)
    labels = torch.from_numpy(read_idx(label_file).astype(np.int64))
    if len(images) != len(labels):
        raise ValueError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels: one of "
                         f"them is damaged or of another split; {_FETCH_AGAIN}")
    # Published training-set statistics (the usual 0.2860 / 0.3530).
    info = DatasetInfo("fashion_mnist", 10, 1, images.shape[-1], (0.2860,), (0.3530,))
    return ImageDataset(images, labels, info)


# -------------------------------------------------------------------------------------------- CIFAR
_CIFAR = {
    # name: (folder, train files, test files, label key, classes, mean, std) — published train-set statistics
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10,
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100,
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_URL = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
              "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}


def _cifar(name: str, root, split: str) -> ImageDataset:
    folder_name, train_files, test_files, label_key, num_classes, mean, std = _CIFAR[name]
    base = Path(root or os.environ.get("FEATKD_DATA") or "data")
    folder = base if (base / train_files[0]).is_file() else base / folder_name
    files = [folder / f for f in (train_files if split == "train" else test_files)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name} not found: missing {', '.join(missing)}. featkd never downloads; fetch the python version "
            f"by hand from {_CIFAR_URL[name]}, extract it (tar xzf) to get the folder '{folder_name}', and pass "
            f"root=<that folder or its parent> or set FEATKD_DATA=<its parent>.")
    images, labels = [], []
    for f in files:
        try:
            with open(f, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")  # the official format is a pickle: only load files you trust
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except Exception as error:  # unpickling damaged bytes can raise almost any error
            raise ValueError(f"{f} is not a readable {name} batch ({type(error).__name__}): it is truncated or "
                             f"damaged; extract it again from {_CIFAR_URL[name]}") from None
        if len(images[-1]) != len(labels[-1]):
            raise ValueError(f"{f} holds {len(images[-1])} images but {len(labels[-1])} labels; extract it again from "
                             f"{_CIFAR_URL[name]}")
    info = DatasetInfo(name, num_classes, 3, 32, mean, std)
    return ImageDataset(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), info)


# -------------------------------------------------------------------------------------- ImageFolder
def _imagefolder(root, split: str, image_size: int = 32, in_channels: int = 3) -> ImageDataset:
    """``root/<split>/<class>/<image>`` (``val`` stands in for a missing ``test``); ``root/<class>/...`` is the
    train split when ``root/train`` does not exist. Images are resized (shorter side) and centre-cropped to
    ``image_size`` once; mean/std are measured on the decoded images."""
    from PIL import Image
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    if root is None:
        raise ValueError("imagefolder needs root=<folder with one subfolder per class, or train/ and test/ inside>")
    base = Path(root)
    candidates = [base / split] + ([base / "val"] if split == "test" else []) + ([base] if split == "train" else [])
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"no {split} split under {base}: expected {base / split}/<class>/<images>")
    if in_channels not in (1, 3):
        raise ValueError(f"imagefolder in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}")
    mode = "L" if in_channels == 1 else "RGB"

    def load(path: str) -> torch.Tensor:
        with Image.open(path) as img:
            tensor = pil_to_tensor(img.convert(mode))
        return center_crop(resize(tensor, image_size, antialias=True), [image_size, image_size])

    folder_ds = ImageFolder(str(folder), loader=load)
    if len(folder_ds) == 0:
        raise FileNotFoundError(f"no images found under {folder}")
    images = torch.stack([folder_ds[i][0] for i in range(len(folder_ds))])
    labels = torch.tensor(folder_ds.targets, dtype=torch.int64)
    mean, std = _channel_stats(images)
    info = DatasetInfo("imagefolder", len(folder_ds.classes), in_channels, image_size, mean, std)
    return ImageDataset(images, labels, info)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.double().div(255).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-3).tolist())


# ---------------------------------------------------------------------------------------- synthetic
def _synthetic(root, split: str, size: int | None = None, num_classes: int = 10, in_channels: int = 1,
               image_size: int = 28, noise: float = 1.0, seed: int = 0) -> ImageDataset:
    """Learnable random images: each class has a fixed smooth pattern (a 4×4 Gaussian field upsampled to
    ``image_size``) shared by both splits; every image is its class pattern plus pixel noise of relative
    strength ``noise``. The splits draw different noise and labels."""
    del root
    # a NaN or infinite strength would reach uint8 as black images (NaN casts to 0), so it stops here
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < math.inf:
        raise ValueError(f"dataset 'synthetic': option noise (data.options.noise in a config) must be a finite number "
                         f">= 0, the pixel noise's strength relative to the class patterns; got {noise!r}")
    size = size if size is not None else (2000 if split == "train" else 500)
    patterns_gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, in_channels, 4, 4, generator=patterns_gen)
    patterns = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                                               align_corners=False)
    gen = torch.Generator().manual_seed(seed * 2 + (1 if split == "train" else 2))
    labels = torch.randint(num_classes, (size,), generator=gen)
    pixels = 128 + 40 * patterns[labels] + 40 * noise * torch.randn(size, in_channels, image_size, image_size,
                                                                    generator=gen)
    images = pixels.round().clamp(0, 255).to(torch.uint8)
    mean, std = _channel_stats(images)
    return ImageDataset(images, labels, DatasetInfo("synthetic", num_classes, in_channels, image_size, mean, std))


_LOADERS: dict[str, Callable[..., ImageDataset]] = {
    "fashion_mnist": _fashion_mnist,
    "cifar10": lambda root, split: _cifar("cifar10", root, split),
    "cifar100": lambda root, split: _cifar("cifar100", root, split),
    "imagefolder": _imagefolder,
    "synthetic": _synthetic,
}


def list_datasets() -> list[str]:
    """The names ``load_dataset`` knows."""
    return sorted(_LOADERS)


def load_dataset(name: str = "fashion_mnist", root: str | os.PathLike | None = None, split: str = "train",
                 *, limit: int | None = None, stratified: bool = True, seed: int = 0, **options) -> ImageDataset:
    """Load a dataset split as uint8 tensors.

    ``name``: ``fashion_mnist`` (default; IDX files from ``root``, ``$FEATKD_FASHION_MNIST`` or
    /usr/share/datasets/fashion-mnist), ``cifar10`` / ``cifar100`` (the python-pickle folders; ``root`` is the
    folder or its parent, default ``$FEATKD_DATA`` or ./data), ``imagefolder`` (``root``; options
    ``image_size``, ``in_channels``), ``synthetic`` (options ``size``, ``num_classes``, ``in_channels``,
    ``image_size``, ``noise``, ``seed``). ``split``: "train" or "test".
    ``limit``: keep ``limit`` examples — a class-balanced subset chosen with ``seed`` (``stratified=True``),
    or the first ``limit`` (``stratified=False``).
    """
    key = name.strip().lower().replace("-", "_")
    key = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10", "cifar_100": "cifar100"}.get(key, key)
    if key not in _LOADERS:
        close = difflib.get_close_matches(key, list_datasets(), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}.{hint} Known: {', '.join(list_datasets())}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _check_options(key, options)
    ds = _LOADERS[key](root, split, **options)
    if limit is not None:
        ds = stratified_subset(ds, limit, seed) if stratified else ds.subset(torch.arange(min(limit, len(ds))))
    return ds


def _check_options(name: str, options: dict) -> None:
    accepted = [p for p in inspect.signature(_LOADERS[name]).parameters if p not in ("root", "split")]
    for option in options:
        if option not in accepted:
            close = difflib.get_close_matches(option, accepted, n=2)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(f"dataset {name!r} has no option {option!r}.{hint} Its options: "
                             f"{', '.join(accepted) or 'none'} (and limit, stratified, seed for every dataset)")


def stratified_subset(ds: ImageDataset, k: int, seed: int = 0) -> ImageDataset:
    """``k`` examples with the classes as balanced as the data allows, chosen by ``seed``; original order kept.

    Examples are shuffled, ranked within their class (unlabeled -1 counts as a class), and the ``k`` with
    the lowest rank are kept: every class gets ⌊k/classes⌋ or one more until a class runs out.
    """
    if k < 0:
        raise ValueError(f"limit must be >= 0, got {k}")
    if k >= len(ds):
        return ds
    return ds.subset(torch.sort(_balanced_order(ds, seed)[:k]).values)


def stratified_split(ds: ImageDataset, k: int, holdout: int, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """``stratified_subset(ds, k, seed)`` and, disjoint from it, the next ``holdout`` examples of the same
    class-balanced ranking: a validation part of the training split for choosing settings without the
    test set. The first part is the same subset whatever ``holdout`` is."""
    if k < 0 or holdout < 0:
        raise ValueError(f"subset sizes must be >= 0, got {k} and {holdout}")
    if k + holdout > len(ds):
        raise ValueError(f"a subset of {k} and a held-out part of {holdout} need {k + holdout} examples; "
                         f"the split has {len(ds)}")
    order = _balanced_order(ds, seed)
    return (ds.subset(torch.sort(order[:k]).values), ds.subset(torch.sort(order[k:k + holdout]).values))


def _balanced_order(ds: ImageDataset, seed: int) -> torch.Tensor:
    """Every index of ``ds``, ordered by rank within its class after a ``seed`` shuffle: any prefix is as
    class-balanced as the data allows."""
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    labels = ds.labels[perm]
    # rank of each shuffled example within its class: position in a stable sort by label minus the class start
    order = torch.sort(labels, stable=True).indices
    sorted_labels = labels[order]
    start = torch.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - start
    return perm[torch.sort(rank, stable=True).indices]

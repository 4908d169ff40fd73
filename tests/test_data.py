"""featkd.data readers (IDX, CIFAR pickles, ImageFolder, synthetic), subsets and transfer-set edits."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from featkd.data import (DatasetInfo, ImageDataset, add_unlabeled, load_dataset, mark_unlabeled, omit_classes,
                         read_idx, stratified_split, stratified_subset)
from conftest import requires_torchvision

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path, array: np.ndarray, compress=True):
    """The IDX format by its definition: 0, 0, type code, ndim; big-endian uint32 dims; big-endian data."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if compress else open)(path, "wb").write(header + body)


def test_idx_reader_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, 4), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", images)
    write_idx(tmp_path / "b", images, compress=False)
    floats = rng.standard_normal((2, 3)).astype(np.float32)
    write_idx(tmp_path / "c", floats, compress=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), images)
    assert np.array_equal(read_idx(tmp_path / "b"), images)
    assert np.array_equal(read_idx(tmp_path / "c"), floats) and read_idx(tmp_path / "c").dtype == np.float32


def test_idx_reader_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(ValueError, match="10 bytes"):
        read_idx(tmp_path / "short")


def fake_fashion_mnist(folder, n=12, split="train"):
    prefix = {"train": "train", "test": "t10k"}[split]
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return images, labels


def test_fashion_mnist_from_root_and_env(tmp_path, monkeypatch):
    images, labels = fake_fashion_mnist(tmp_path, split="test")
    ds = load_dataset("fashion_mnist", root=tmp_path, split="test")
    assert ds.images.shape == (12, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    assert ds.info == DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,))
    monkeypatch.setenv("FEATKD_FASHION_MNIST", str(tmp_path))
    assert torch.equal(load_dataset("Fashion-MNIST", split="test").labels, ds.labels)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        load_dataset("fashion_mnist", root=tmp_path / "nowhere")
    assert "make data" in str(e.value) and "root=" in str(e.value)


@pytest.mark.skipif(not (REAL_FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    train, test = load_dataset("fashion_mnist"), load_dataset("fashion_mnist", split="test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    for ds in (train, test):
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert torch.equal(torch.bincount(ds.labels), torch.full((10,), len(ds) // 10))
    x = train.images.double() / 255  # the published statistics are those of the training set
    assert x.mean().item() == pytest.approx(train.info.mean[0], abs=5e-4)
    assert x.std().item() == pytest.approx(train.info.std[0], abs=5e-4)


def write_cifar(folder: Path, files, label_key, n=6, num_classes=10, seed=0):
    """Files in the official python format: a pickled dict with bytes keys, data (N, 3072) uint8 rows holding
    the red, green and blue 32×32 planes one after another, row-major."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = []
    for name in files:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n).tolist()
        batch = {b"batch_label": name.encode(), b"data": data, label_key: labels,
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        if label_key == b"fine_labels":
            batch[b"coarse_labels"] = [lab // 5 for lab in labels]
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written.append((data, labels))
    return written


def test_cifar10_reader(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                          b"labels")
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the folder or its parent
        train = load_dataset("cifar10", root=root)
        assert train.images.shape == (30, 3, 32, 32) and train.info.num_classes == 10
    data, labels = batches[1]
    image = train.images[6 + 4]  # 5th image of data_batch_2
    row = data[4]
    for c, y, x in [(0, 0, 0), (1, 3, 7), (2, 31, 30), (0, 17, 2)]:
        assert image[c, y, x].item() == row[c * 1024 + y * 32 + x]
    assert train.labels[6:12].tolist() == labels
    test = load_dataset("cifar10", root=tmp_path, split="test")
    assert len(test) == 6 and test.labels.tolist() == batches[5][1]
    assert train.info.mean == (0.4914, 0.4822, 0.4465)


def test_cifar100_reader_uses_fine_labels(tmp_path):
    batches = write_cifar(tmp_path / "cifar-100-python", ["train", "test"], b"fine_labels", n=5, num_classes=100)
    train = load_dataset("cifar100", root=tmp_path)
    assert train.labels.tolist() == batches[0][1] and train.info.num_classes == 100
    assert torch.equal(train.images.reshape(5, -1), torch.from_numpy(batches[0][0]))


def test_missing_cifar_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz") as e:
        load_dataset("cifar10", root=tmp_path)
    assert "root=" in str(e.value) and "cifar-10-batches-py" in str(e.value)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", root=tmp_path, split="test")


@requires_torchvision
def test_imagefolder(tmp_path):
    from PIL import Image

    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split in ("train", "val"):
        for cls, colour in colours.items():
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 24), colour).save(tmp_path / split / cls / f"{i}.png")
    train = load_dataset("imagefolder", root=tmp_path, image_size=16)
    assert train.images.shape == (4, 3, 16, 16) and train.labels.tolist() == [0, 0, 1, 1]
    assert train.images[0, :, 8, 8].tolist() == [255, 0, 0] and train.images[3, :, 8, 8].tolist() == [0, 0, 255]
    assert train.info.num_classes == 2 and train.info.mean == pytest.approx((0.5, 0.0, 0.5))
    test = load_dataset("imagefolder", root=tmp_path, split="test", image_size=8, in_channels=1)  # val/ stands in
    assert test.images.shape == (4, 1, 8, 8)
    with pytest.raises(FileNotFoundError, match="no test split"):
        load_dataset("imagefolder", root=tmp_path / "train" / "cat", split="test")


def test_synthetic_is_deterministic_and_learnable():
    train = load_dataset("synthetic", size=600, num_classes=5, in_channels=3, image_size=28, seed=3)
    again = load_dataset("synthetic", size=600, num_classes=5, in_channels=3, image_size=28, seed=3)
    test = load_dataset("synthetic", split="test", size=300, num_classes=5, in_channels=3, image_size=28, seed=3)
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert train.images.shape == (600, 3, 28, 28) and train.info.num_classes == 5
    assert not torch.equal(train.images[:300], test.images)
    # nearest class mean, fitted on train, classifies held-out images: the classes are learnable
    x_train, x_test = train.images.flatten(1).float(), test.images.flatten(1).float()
    means = torch.stack([x_train[train.labels == c].mean(0) for c in range(5)])
    accuracy = (torch.cdist(x_test, means).argmin(1) == test.labels).float().mean()
    assert accuracy > 0.9
    x = train.images.double() / 255
    assert train.info.mean[0] == pytest.approx(x[:, 0].mean().item()) and train.info.std[0] == pytest.approx(
        x[:, 0].std().item())


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="cifar10"):
        load_dataset("cifar-1O")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_dataset("synthetic", split="validation")
    with pytest.raises(ValueError, match="Did you mean: num_classes"):
        load_dataset("synthetic", num_class=3)
    with pytest.raises(ValueError, match="has no option 'image_size'"):
        load_dataset("fashion_mnist", image_size=32)


def test_limit_is_stratified_deterministic_and_ordered():
    ds = load_dataset("synthetic", size=500, num_classes=4)
    sub = load_dataset("synthetic", size=500, num_classes=4, limit=42, seed=1)
    counts = torch.bincount(sub.labels, minlength=4)
    assert len(sub) == 42 and counts.max() - counts.min() <= 1
    assert torch.equal(sub.images, load_dataset("synthetic", size=500, num_classes=4, limit=42, seed=1).images)
    other = stratified_subset(ds, 42, seed=2)
    assert not torch.equal(sub.images, other.images)
    first = load_dataset("synthetic", size=500, num_classes=4, limit=42, stratified=False)
    assert torch.equal(first.images, ds.images[:42])
    # every chosen image is one of the dataset's, kept in dataset order with its own label
    flat = ds.images.flatten(1)
    idx = [int(torch.nonzero((flat == img).all(1))[0]) for img in sub.images.flatten(1)]
    assert idx == sorted(idx) and torch.equal(ds.labels[idx], sub.labels)


def test_stratified_subset_when_a_class_runs_out():
    labels = torch.tensor([0] * 20 + [1] * 2 + [2] * 20)
    ds = ImageDataset(torch.zeros(42, 1, 2, 2, dtype=torch.uint8), labels, DatasetInfo("t", 3, 1, 2, (0.,), (1.,)))
    counts = torch.bincount(stratified_subset(ds, 12).labels, minlength=3).tolist()
    assert counts == [5, 2, 5]


def test_stratified_split_holds_out_a_disjoint_balanced_part_and_keeps_the_subset():
    # each image carries its own index in its pixels, so the parts can be compared with the source
    labels = torch.arange(300) % 3
    images = torch.stack([torch.tensor([i // 256, i % 256], dtype=torch.uint8).view(1, 1, 2) for i in range(300)])
    ds = ImageDataset(images, labels, DatasetInfo("t", 3, 1, 2, (0.,), (1.,)))
    index = lambda part: [int(img[0, 0, 0]) * 256 + int(img[0, 0, 1]) for img in part.images]  # noqa: E731
    sub, held = stratified_split(ds, 30, 60, seed=4)
    assert index(sub) == index(stratified_subset(ds, 30, seed=4))
    assert not set(index(sub)) & set(index(held))
    assert torch.bincount(held.labels, minlength=3).tolist() == [20, 20, 20]
    assert all(int(ds.labels[i]) == int(y) for i, y in zip(index(held), held.labels))
    with pytest.raises(ValueError, match="need 301 examples; the split has 300"):
        stratified_split(ds, 1, 300)


def test_dataset_validates_its_tensors():
    info = DatasetInfo("t", 2, 1, 2, (0.,), (1.,))
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.int64), info)
    with pytest.raises(ValueError, match="int64"):
        ImageDataset(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), info)


def test_omit_classes():
    ds = load_dataset("synthetic", size=200)
    out = omit_classes(ds, [3, 7])
    keep = (ds.labels != 3) & (ds.labels != 7)
    assert torch.equal(out.labels, ds.labels[keep]) and torch.equal(out.images, ds.images[keep])
    assert out.info == ds.info and len(ds) == 200  # input untouched; the class count stays 10
    assert repr(out) == f"ImageDataset(synthetic: {len(out)} images 1x28x28, 10 classes)"
    with pytest.raises(ValueError, match="0..9"):
        omit_classes(ds, [10])


def test_mark_unlabeled():
    ds = load_dataset("synthetic", size=200)
    before = ds.labels.clone()
    out = mark_unlabeled(ds, 0.25, seed=4)
    hidden = out.labels == -1
    assert hidden.sum() == 50 and torch.equal(out.labels[~hidden], ds.labels[~hidden])
    assert torch.equal(ds.labels, before)
    assert torch.equal(mark_unlabeled(ds, 0.25, seed=4).labels, out.labels)
    assert not torch.equal(mark_unlabeled(ds, 0.25, seed=5).labels, out.labels)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mark_unlabeled(ds, 1.5)


def test_add_unlabeled():
    ds = load_dataset("synthetic", size=30)
    extra = load_dataset("synthetic", split="test", size=20, seed=9)
    out = add_unlabeled(ds, extra)
    assert len(out) == 50 and torch.equal(out.images[30:], extra.images)
    assert torch.equal(out.labels[:30], ds.labels) and (out.labels[30:] == -1).all()
    assert out.info == ds.info and repr(out).endswith("10 classes, 20 unlabeled)")
    with pytest.raises(ValueError, match=r"\(3, 28, 28\)"):
        add_unlabeled(ds, load_dataset("synthetic", size=5, in_channels=3))


@pytest.mark.parametrize("noise", [float("nan"), float("inf"), -1.0, "loud"])
def test_synthetic_noise_that_is_not_a_finite_strength_is_refused(noise):
    # issue #19: noise=.nan turned every image black (NaN casts to 0 in uint8) and trained without a word
    with pytest.raises(ValueError, match=r"dataset 'synthetic': option noise \(data.options.noise in a config\) "
                                         r"must be a finite number >= 0"):
        load_dataset("synthetic", size=10, noise=noise)
    assert load_dataset("synthetic", size=10, noise=0.0).images.float().std() > 0  # no noise: the class patterns

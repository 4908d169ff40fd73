"""DeviceLoader: determinism per (seed, epoch), DDP shards, augmentation against a per-image loop, normalisation."""

import numpy as np
import pytest
import torch

from featkd.data import DatasetInfo, DeviceLoader, ImageDataset, crop_flip, load_dataset, mark_unlabeled


def toy(n=50, c=3, h=8, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    info = DatasetInfo("toy", 5, c, h, (0.2, 0.5, 0.7)[:c], (0.3, 0.25, 0.1)[:c])
    return ImageDataset(images, torch.arange(n) % 5, info)


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_batches_are_a_pure_function_of_seed_and_epoch():
    ds = toy()
    a = DeviceLoader(ds, 8, augment=True, seed=3)
    b = DeviceLoader(ds, 8, augment=True, seed=3)
    first = epoch_batches(a, 2)
    epoch_batches(b, 0), epoch_batches(b, 1)  # a "resumed" loader that has run other epochs first
    assert same(first, epoch_batches(b, 2))
    assert same(first, epoch_batches(a, 2))  # iterating again replays the epoch
    assert not same(first, epoch_batches(a, 3))
    assert not same(first, epoch_batches(DeviceLoader(ds, 8, augment=True, seed=4), 2))


def test_len_drop_last_and_plain_order():
    ds = toy(n=50)
    assert len(DeviceLoader(ds, 8)) == 6 and len(DeviceLoader(ds, 8, drop_last=False)) == 7
    batches = list(DeviceLoader(ds, 8, shuffle=False, drop_last=False))
    assert [len(y) for _, y in batches] == [8] * 6 + [2]
    assert torch.equal(torch.cat([y for _, y in batches]), ds.labels)
    shuffled = torch.cat([y for _, y in DeviceLoader(ds, 50, seed=0)])
    assert not torch.equal(shuffled, ds.labels) and torch.equal(shuffled.sort().values, ds.labels.sort().values)
    with pytest.raises(ValueError, match="no batch"):
        DeviceLoader(ds, 64)


def test_normalisation_values():
    ds = toy(n=4, c=3)
    x, y = next(iter(DeviceLoader(ds, 4, shuffle=False)))
    assert x.dtype == torch.float32 and torch.equal(y, ds.labels)
    expected = np.empty((4, 3, 8, 10), np.float32)
    for c, (m, s) in enumerate(zip(ds.info.mean, ds.info.std)):
        expected[:, c] = (ds.images[:, c].numpy() / 255.0 - m) / s
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-5)


def reference_crop_flip(image: np.ndarray, dy: int, dx: int, flip: bool, pad: int, mode: str) -> np.ndarray:
    """One image at a time, the textbook way: pad with NumPy, cut the window, mirror."""
    c, h, w = image.shape
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="constant" if mode == "zeros" else mode)
    out = padded[:, dy:dy + h, dx:dx + w]
    return out[:, :, ::-1] if flip else out


@pytest.mark.parametrize("pad,pad_mode", [(4, "zeros"), (2, "zeros"), (0, "zeros"), (4, "reflect"), (7, "reflect")])
def test_augmentation_matches_per_image_reference(pad, pad_mode):
    ds = toy(n=40, h=8, w=10)
    loader = DeviceLoader(ds, 16, augment=True, seed=7, pad=pad, pad_mode=pad_mode)
    loader.set_epoch(5)
    plan = loader.epoch_plan()
    assert plan.offsets.min() >= 0 and plan.offsets.max() <= 2 * pad
    mean = np.array(ds.info.mean, np.float32)[:, None, None]
    std = np.array(ds.info.std, np.float32)[:, None, None]
    for b, (x, y) in enumerate(loader):
        for i in range(len(y)):
            k = b * 16 + i
            index, (dy, dx), flip = plan.indices[k].item(), plan.offsets[k].tolist(), plan.flips[k].item()
            ref = reference_crop_flip(ds.images[index].numpy(), dy, dx, flip, pad, pad_mode)
            np.testing.assert_allclose(x[i].numpy(), (ref / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
            assert y[i] == ds.labels[index]
    if pad:
        assert 0.3 < plan.flips.float().mean() < 0.7 and len(plan.offsets.unique(dim=0)) > 5


def test_reflection_padding_mirrors_about_the_edge_pixel():
    # Worked by hand: the row 10 20 30 40 padded by 2 is 30 20 | 10 20 30 40 | 30 20 (edge pixels not repeated).
    row = torch.tensor([[[[10, 20, 30, 40]]]], dtype=torch.uint8).expand(1, 1, 4, 4)
    left = crop_flip(row, torch.tensor([[2, 0]]), torch.tensor([False]), 2, "reflect")
    right = crop_flip(row, torch.tensor([[2, 4]]), torch.tensor([False]), 2, "reflect")
    assert left[0, 0, 0].tolist() == [30, 20, 10, 20] and right[0, 0, 0].tolist() == [30, 40, 30, 20]
    assert crop_flip(row, torch.tensor([[2, 0]]), torch.tensor([False]), 2)[0, 0, 0].tolist() == [0, 0, 10, 20]
    with pytest.raises(ValueError, match="pad_mode must be one of"):
        crop_flip(row, torch.tensor([[0, 0]]), torch.tensor([False]), 2, "mirror")
    with pytest.raises(ValueError, match="pad must be smaller than its"):
        DeviceLoader(toy(h=8, w=10), 8, augment=True, pad=8, pad_mode="reflect")
    assert DeviceLoader(toy(), 8).pad_mode == "zeros"  # featkd's own default is unchanged


def test_crop_flip_identity_and_pure_flip():
    images = torch.randint(0, 256, (3, 2, 5, 6), dtype=torch.uint8)
    centre = torch.full((3, 2), 4)
    assert torch.equal(crop_flip(images, centre, torch.zeros(3, dtype=torch.bool), 4), images)
    assert torch.equal(crop_flip(images, centre, torch.ones(3, dtype=torch.bool), 4), images.flip(-1))


def test_flip_can_be_disabled():
    loader = DeviceLoader(toy(), 8, augment=True, flip=False)
    assert not loader.epoch_plan().flips.any()


@pytest.mark.parametrize("n,world_size", [(48, 4), (50, 3), (7, 2)])
def test_ddp_shards_are_disjoint_and_cover(n, world_size):
    ds = toy(n=n)
    plans = [DeviceLoader(ds, 1, seed=1, rank=r, world_size=world_size).epoch_plan(3) for r in range(world_size)]
    sizes = {len(p.indices) for p in plans}
    assert sizes == {-(-n // world_size)}  # padded to equal length, as DistributedSampler does
    all_indices = torch.cat([p.indices for p in plans])
    assert set(all_indices.tolist()) == set(range(n))                     # covering
    assert len(all_indices) - len(set(all_indices.tolist())) == len(all_indices) - n  # only the padding repeats
    # the ranks interleave one shared plan: together they are the single-process epoch (plus padding), with
    # the same augmentation draws, whatever world_size is
    single = DeviceLoader(ds, 1, seed=1).epoch_plan(3)
    for r, p in enumerate(plans):
        for ours, theirs in zip(p, single):
            assert torch.equal(ours, torch.cat([theirs, theirs])[r::world_size][:len(p.indices)])
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(ds, 1, rank=world_size, world_size=world_size)


def test_ddp_batches_differ_between_ranks():
    ds = toy(n=48)
    r0 = epoch_batches(DeviceLoader(ds, 6, rank=0, world_size=2, augment=True), 1)
    r1 = epoch_batches(DeviceLoader(ds, 6, rank=1, world_size=2, augment=True), 1)
    assert len(r0) == len(r1) == 4 and not same(r0, r1)


def test_unlabeled_examples_keep_label_minus_one():
    ds = mark_unlabeled(load_dataset("synthetic", size=64), 0.5)
    labels = torch.cat([y for _, y in DeviceLoader(ds, 16, augment=True)])
    assert (labels == -1).sum() == 32


@pytest.mark.cuda
@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
def test_cuda_batches_equal_cpu_batches(pad_mode):
    ds = toy(n=64)
    cpu = epoch_batches(DeviceLoader(ds, 16, augment=True, seed=2, pad_mode=pad_mode), 1)
    gpu = epoch_batches(DeviceLoader(ds, 16, augment=True, seed=2, device="cuda", pad_mode=pad_mode), 1)
    assert all(x.is_cuda for x, _ in gpu)
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xc, xg.cpu())


def test_evaluation_batch_size_is_small_on_the_cpu_only():
    from featkd.data import evaluation_batch_size

    assert evaluation_batch_size("cpu") == evaluation_batch_size(torch.device("cpu")) == 128
    assert evaluation_batch_size("cuda:0") == 500

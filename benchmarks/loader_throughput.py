"""Input pipeline: featkd's DeviceLoader against a torchvision DataLoader doing the same augmentation.

Both produce the same kind of batch (random crop with 4-pixel zero padding, horizontal flip, float
conversion, normalisation) over the same images. The two are timed alternately, ``--repeats`` times
each, and the medians and their ratio are printed, so machine load affects both alike.

    python benchmarks/loader_throughput.py                   # Fashion-MNIST, 10 000 images, CPU
    python benchmarks/loader_throughput.py --workers 2       # give the DataLoader worker processes
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Dataset

from featkd.data import DeviceLoader, load_dataset


class TransformedImages(Dataset):
    """Per-image torchvision pipeline: the usual way of feeding CIFAR/MNIST-sized data."""

    def __init__(self, ds, transform):
        self.ds, self.transform = ds, transform

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.transform(self.ds.images[i]), self.ds.labels[i]


def time_epoch(loader, device) -> float:
    start = time.perf_counter()
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--limit", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    ds = load_dataset(args.dataset, limit=args.limit)
    device_loader = DeviceLoader(ds, args.batch_size, augment=True, device=device)
    transform = T.Compose([T.RandomCrop(ds.info.image_size, padding=4), T.RandomHorizontalFlip(),
                           T.ToDtype(torch.float32, scale=True), T.Normalize(ds.info.mean, ds.info.std)])
    torch_loader = DataLoader(TransformedImages(ds, transform), args.batch_size, shuffle=True, drop_last=True,
                              num_workers=args.workers, pin_memory=device.type == "cuda",
                              persistent_workers=args.workers > 0)

    time_epoch(device_loader, device), time_epoch(torch_loader, device)  # warm-up: caches, workers
    featkd_times, torch_times = [], []
    for epoch in range(args.repeats):
        device_loader.set_epoch(epoch)
        featkd_times.append(time_epoch(device_loader, device))
        torch_times.append(time_epoch(torch_loader, device))
    featkd_s, torch_s = statistics.median(featkd_times), statistics.median(torch_times)
    print(f"{len(ds)} {args.dataset} images, batch {args.batch_size}, crop+flip+normalise, device {device}, "
          f"{args.threads} thread(s), median of {args.repeats} epochs")
    print("| pipeline | s/epoch | images/s |\n|---|---|---|")
    print(f"| featkd DeviceLoader | {featkd_s:.3f} | {len(ds) / featkd_s:,.0f} |")
    print(f"| DataLoader + torchvision v2 ({args.workers} workers) | {torch_s:.3f} | {len(ds) / torch_s:,.0f} |")
    print(f"DeviceLoader is {torch_s / featkd_s:.1f}x faster")


if __name__ == "__main__":
    main()

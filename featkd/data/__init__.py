"""Datasets as uint8 tensors, on-device batched loading and augmentation, and transfer-set edits."""

from featkd.data.datasets import (DatasetInfo, ImageDataset, list_datasets, load_dataset, read_idx,
                                  stratified_subset)

__all__ = ["DatasetInfo", "ImageDataset", "list_datasets", "load_dataset", "read_idx", "stratified_subset"]

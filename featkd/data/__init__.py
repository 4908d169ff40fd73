"""Datasets as uint8 tensors, on-device batched loading and augmentation, and transfer-set edits."""

from featkd.data.datasets import (DatasetInfo, ImageDataset, list_datasets, load_dataset, read_idx,
                                  stratified_subset)
from featkd.data.loader import DeviceLoader, EpochPlan, crop_flip

__all__ = ["DatasetInfo", "DeviceLoader", "EpochPlan", "crop_flip", "ImageDataset", "list_datasets", "load_dataset", "read_idx", "stratified_subset"]

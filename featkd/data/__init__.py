"""Datasets as uint8 tensors, on-device batched loading and augmentation, and transfer-set edits."""

from featkd.data.datasets import (DatasetInfo, ImageDataset, list_datasets, load_dataset, read_idx,
                                  stratified_split, stratified_subset)
from featkd.data.loader import DeviceLoader, EpochPlan, crop_flip, evaluation_batch_size
from featkd.data.transfer import UNLABELED, add_unlabeled, mark_unlabeled, omit_classes

__all__ = ["DatasetInfo", "DeviceLoader", "EpochPlan", "ImageDataset", "UNLABELED", "add_unlabeled", "crop_flip",
           "evaluation_batch_size", "list_datasets", "load_dataset", "mark_unlabeled", "omit_classes", "read_idx",
           "stratified_split", "stratified_subset"]

"""The papers' teachers and students (WRN, CIFAR ResNets, NIN, Hinton's MLP) and ``create_model`` by name.

Every featkd convolutional model accepts ``in_channels`` and any input size ≥ 28 (adaptive pooling), and
carries timm-style ``feature_info`` plus the layer names AT/NST transfer (``default_distill_layers``) and
the last feature map before its ReLU (``pre_relu_layer``, the official NST code's transfer point).
"""

from featkd.models.ensemble import ProbabilityAverage
from featkd.models.hf import with_data_vocabulary
from featkd.models.features import FeatureInfo
from featkd.models.mlp import mlp
from featkd.models.nin import NIN
from featkd.models.registry import (check_input, create_model, default_distill_layers, example_input, feature_info,
                                    input_normalization, list_models, pre_relu_layer, takes_tokens)
from featkd.models.resnet_cifar import CifarResNet
from featkd.models.wrn import WideResNet

__all__ = ["FeatureInfo", "NIN", "CifarResNet", "ProbabilityAverage", "WideResNet", "check_input", "create_model", "default_distill_layers",
           "example_input", "feature_info", "input_normalization", "list_models", "mlp", "pre_relu_layer", "takes_tokens",
           "with_data_vocabulary"]

"""Hugging Face ``transformers`` models by name, built from a config, never downloaded: ``hf:<architecture>``.

``create_model("hf:bert", num_classes=2, hidden_size=128, num_hidden_layers=4)`` builds a
``BertForSequenceClassification`` from a ``BertConfig`` with those options (``num_labels`` from
``num_classes``); ``hf:vit`` a ``ViTForImageClassification`` (``num_channels`` from ``in_channels``);
``hf:gpt2`` a ``GPT2LMHeadModel`` (its outputs are the vocabulary: ``vocab_size``, not ``num_classes``).
``pretrained=PATH`` loads local weights with ``from_pretrained`` instead, for users who have them. A config
option the architecture does not have is refused with the close ones (a ``transformers`` config would
keep it silently). Needs the ``hf`` extra: ``pip install 'featkd[hf]'``.
"""

from __future__ import annotations

import difflib

from torch import nn

# name -> (config class, model class, the config key that takes num_classes, the one that takes in_channels)
ARCHITECTURES = {
    "bert": ("BertConfig", "BertForSequenceClassification", "num_labels", None),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None, None),
    "vit": ("ViTConfig", "ViTForImageClassification", "num_labels", "num_channels"),
}


def with_data_vocabulary(name: str, options: dict, info) -> dict:
    """``options`` of model ``name`` with the vocabulary size of the text dataset ``info`` describes, for a
    Hugging Face model whose options do not set one (its ids are that dataset's); as they are otherwise."""
    if name.startswith("hf:") and hasattr(info, "vocab_size") and "vocab_size" not in options:
        return {**options, "vocab_size": info.vocab_size}
    return dict(options)


def hf_model(architecture: str, num_classes: int, in_channels: int, pretrained: str | None = None,
             **options) -> nn.Module:
    """The ``hf:<architecture>`` model (see the module docstring)."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"'hf:{architecture}' needs the transformers package: pip install 'featkd[hf]'") from error
    if architecture not in ARCHITECTURES:
        close = difflib.get_close_matches(architecture, list(ARCHITECTURES), n=3)
        hint = f" Did you mean: {', '.join('hf:' + c for c in close)}?" if close else ""
        raise ValueError(f"unknown Hugging Face architecture 'hf:{architecture}'.{hint} featkd builds: "
                         f"{', '.join('hf:' + a for a in ARCHITECTURES)}")
    config_name, model_name, labels_key, channels_key = ARCHITECTURES[architecture]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    given = {labels_key: num_classes} if labels_key else {}
    if channels_key:
        given[channels_key] = in_channels
    if pretrained is not None:
        return model_cls.from_pretrained(pretrained, **{**given, **options})
    # attn_implementation is taken by every config but not listed in to_dict: "eager" computes the attention
    # probabilities that attention transfer captures (the fused kernels never form them)
    known = set(config_cls().to_dict()) | {"attn_implementation"}
    unknown = sorted(set(options) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"model 'hf:{architecture}' has no option {unknown[0]!r} ({config_name} does not take it)."
                         f"{hint}")
    return model_cls(config_cls(**{**given, **options}))

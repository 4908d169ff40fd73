"""``featkd layers <model>``: list every hookable layer of a model with its output shape and layout.

The names printed are what ``featkd.capture`` / ``FeatureExtractor`` / config files accept. The layout
(NCHW, NHWC channels-last, NLC tokens with their prefix tokens, NCL) is the one the model states, else
the only reading of the shape (``?`` when the shape reads several ways; featkd.layouts).
"""

from __future__ import annotations

import argparse
import sys

from featkd.commands._common import describe_input, format_shape, input_size, model_option, text_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a featkd model (wrn16_1, resnet20, ...), torchvision:<name>, timm:<name>, "
                                      "or package.module:factory")
    parser.add_argument("--input-size", type=input_size, default=(3, 224, 224), metavar="CxHxW",
                        help="size of one example input, without the batch dimension (default: 3x224x224)")
    parser.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default: 10)")
    parser.add_argument("--option", type=model_option, action="append", default=[], metavar="KEY=VALUE",
                        help="a constructor option of the model (repeatable), e.g. image_size=64 for a torchvision "
                             "ViT at another input size")
    parser.add_argument("--filter", metavar="GLOB", default=None,
                        help="only layers matching this pattern, e.g. 'layer*' or 'features.*' "
                             "(* stays within one dotted segment, ** crosses dots)")
    parser.add_argument("--depth", type=int, default=None,
                        help="only names with at most this many dotted segments (1: top-level children)")


def format_table(infos) -> str:
    """The table ``featkd layers`` prints, one row per :class:`featkd.LayerInfo`."""
    rows = [("name", "type", "output shape", "layout", "channels", "stride", "calls")]
    for info in infos:
        stride = info.stride
        if isinstance(stride, tuple):
            stride = "x".join(map(str, stride))
        if info.prefix_tokens:
            stride = f"{stride} (+{info.prefix_tokens} prefix token{'s' if info.prefix_tokens > 1 else ''})"
        rows.append((info.name, info.type, format_shape(info.shape), info.layout or "-",
                     "-" if info.channels is None else str(info.channels),
                     "-" if stride is None else str(stride), str(info.calls)))
    table = text_table(rows)
    if any(info.layout == "?" for info in infos):
        table += ("\n\n?: neither the model nor the shape says which dimension holds the channels; a term that "
                  "uses the layer names it (student_layout / teacher_layout)")
    return table


def run(args: argparse.Namespace) -> int:
    from featkd.layer_info import list_layers
    from featkd.layer_specs import glob_regex
    from featkd.models import create_model, example_input

    try:
        model = create_model(args.model, num_classes=args.num_classes, in_channels=args.input_size[0],
                             **dict(args.option))
    except (ValueError, ImportError, TypeError) as err:
        print(f"featkd layers: {err}", file=sys.stderr)
        return 2
    example = example_input(model, args.input_size)
    try:
        infos = list_layers(model, example)
    except (RuntimeError, AssertionError, IndexError) as err:  # typically a size the model cannot take
        size = "x".join(map(str, args.input_size))
        print(f"featkd layers: the forward of {args.model} failed on an input of size {describe_input(example)} "
              f"({str(err).splitlines()[0]}); try another --input-size, or the model's own size option: featkd "
              f"layers {args.model} --input-size {size} --option image_size={args.input_size[-1]}", file=sys.stderr)
        return 2
    if args.filter:
        pattern = glob_regex(args.filter)
        infos = [i for i in infos if pattern.match(i.name)]
    if args.depth is not None:
        infos = [i for i in infos if i.name.count(".") < args.depth]
    if not infos:
        print(f"featkd layers: no layer of {args.model} matches the filter", file=sys.stderr)
        return 1
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params / 1e6:.2f}M parameters, input {describe_input(example)}")
    print(format_table(infos))
    return 0

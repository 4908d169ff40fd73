"""``featkd pairs TEACHER STUDENT``: propose (teacher layer, student layer) pairs and write them as config terms.

    featkd pairs torchvision:vit_b_16 torchvision:resnet18 --out vit_resnet.yaml
    featkd distill --config vit_resnet.yaml teacher.checkpoint=runs/vit/last.pt ...

Layers are paired by resolution stage, and the last features before pooling with each other; a model
with one resolution (a ViT) spreads its blocks over the other's stages (featkd.layer_pairs). The table
shows each layer's shape and layout; the terms go to stdout, or to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from featkd import checkpoint as ckpt
from featkd.commands._common import (describe_input, format_shape, input_size, model_option, reports_user_errors,
                                     text_table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for role in ("teacher", "student"):
        parser.add_argument(role, help=f"the {role}: a featkd model, torchvision:<name>, timm:<name>, or "
                                       "package.module:factory")
    parser.add_argument("--input-size", type=input_size, default=(3, 224, 224), metavar="CxHxW",
                        help="size of one example input, without the batch dimension (default: 3x224x224)")
    parser.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default: 10)")
    parser.add_argument("--loss", default="at", help="the feature loss of the proposed term (default: at)")
    parser.add_argument("--weight", type=float, default=None,
                        help="its weight (default: the loss's published weight, e.g. AT's beta, from "
                             "featkd/configs/reference/published.yaml; required for other losses)")
    parser.add_argument("--out", metavar="FILE", help="write the terms (and the student's name) to this new YAML file")
    for role in ("teacher", "student"):
        parser.add_argument(f"--{role}-option", type=model_option, action="append", default=[], metavar="KEY=VALUE",
                            help=f"a constructor option of the {role} (repeatable), e.g. image_size=64 for a "
                                 "torchvision ViT at another input size")


def _layout(info) -> str:
    text = info.layout or "-"
    if info.prefix_tokens:
        text += f"+{info.prefix_tokens}"
    if info.layout in ("NLC", "NCL") and info.grid is not None:
        text += " " + "x".join(map(str, info.grid))
    return text


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    import yaml

    from featkd.layer_pairs import pair_terms, propose_pairs
    from featkd.losses import feature_loss_class
    from featkd.models import create_model, example_input, takes_tokens

    feature_loss_class(args.loss)  # an unknown loss name, with the close ones, before any model is built
    weight = args.weight
    if weight is None:
        from featkd import published

        if args.loss not in published.published_losses():
            raise ValueError(f"--loss {args.loss} has no published weight (published: "
                             f"{', '.join(published.published_losses())}); add --weight W, e.g. --weight 1")
        weight = published.term_weight(args.loss)
    if args.out and Path(args.out).exists():
        raise ValueError(f"--out {args.out} already exists; choose another file (featkd never overwrites one)")
    options = {"teacher": dict(args.teacher_option), "student": dict(args.student_option)}
    models = [create_model(getattr(args, role), num_classes=args.num_classes, in_channels=args.input_size[0],
                           **options[role]) for role in ("teacher", "student")]
    example = example_input(models[0], args.input_size)
    if takes_tokens(models[0]) != takes_tokens(models[1]):
        raise ValueError(f"{args.teacher} and {args.student} do not read the same input (one reads token ids): "
                         "featkd pairs compares two models on one example input")
    try:
        pairs = propose_pairs(*models, example)
    except (RuntimeError, AssertionError, IndexError) as error:  # typically a size a model cannot take
        role, name = next(((r, n) for r, n, m in zip(("teacher", "student"), (args.teacher, args.student), models)
                           if not _runs_on(m, example)), ("teacher", args.teacher))
        size = args.input_size[-1]
        raise ValueError(f"the {role} {name} failed on an input of size {describe_input(example)} "
                         f"({str(error).splitlines()[0]}); try another --input-size, or the {role}'s own size "
                         f"option (--{role}-option image_size={size})") from None
    rows = [("teacher layer", "shape", "layout", "student layer", "shape", "layout", "match")]
    rows += [(p.teacher.name, format_shape(p.teacher.shape), _layout(p.teacher), p.student.name,
              format_shape(p.student.shape), _layout(p.student), p.match) for p in pairs]
    print(f"{args.teacher} -> {args.student}, input {describe_input(example)}")
    print(text_table(rows))
    student = {"name": args.student, **({"options": options["student"]} if options["student"] else {})}
    config = {"student": student, "terms": pair_terms(pairs, args.loss, weight)}
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
    if args.out:
        ckpt.atomic_write_text(args.out, f"# featkd pairs {args.teacher} {args.student} --input-size "
                                  f"{'x'.join(map(str, args.input_size))}\n{text}")
        print(f"\nwrote {args.out}: featkd distill --config {args.out} teacher.checkpoint=TEACHER_LAST_PT")
    else:
        print("\n" + text.rstrip())
    return 0


def _runs_on(model, example) -> bool:
    """Whether ``model`` takes ``example`` (asked only after a dry run failed, to name the model that did)."""
    import torch

    from featkd.batches import call_model

    try:
        with torch.no_grad():
            call_model(model.eval(), example)
    except (RuntimeError, AssertionError, IndexError):
        return False
    return True

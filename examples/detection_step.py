"""Worked example (c): a detector distilled on its FPN features, trained with its own loss dict.

The teacher is torchvision's Faster R-CNN with a ResNet-50 FPN, the student the one with a MobileNetV3
FPN (both ``weights=None``: nothing is downloaded; load your own weights into them for real use). A
batch is a dict of images and their box targets; a :class:`featkd.BatchFormat` says the student is called
as ``student(images, targets)`` (training mode: it returns its losses) and the teacher as
``teacher(images)``. The student's task loss is its own loss dict, weighted (``task_loss={...}``), and
three terms match FPN levels by name (``backbone["0"]`` is the FPN's first output map): a FitNets hint at
equal resolution, attention transfer and NST onto a finer teacher level (the automatic adapter resizes).
Both detectors resize their images the same way (``min_size``/``max_size``), so their levels line up.

    python examples/detection_step.py
"""

from __future__ import annotations

import torch
from torchvision.models import detection

import featkd
from featkd.batches import BatchFormat

SIZE = 96
DETECTOR = BatchFormat(inputs=lambda batch: (batch["images"], batch["targets"]),
                       teacher_inputs=lambda batch: (batch["images"],))
# the Faster R-CNN losses, the box regression counted twice (an example of a weighted task loss)
LOSS_WEIGHTS = {"loss_classifier": 1.0, "loss_box_reg": 2.0, "loss_objectness": 1.0, "loss_rpn_box_reg": 1.0}


def detectors(num_classes: int = 3):
    options = dict(weights=None, weights_backbone=None, num_classes=num_classes, min_size=SIZE, max_size=SIZE)
    torch.manual_seed(0)
    return detection.fasterrcnn_resnet50_fpn(**options), detection.fasterrcnn_mobilenet_v3_large_fpn(**options)


def example_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, SIZE, SIZE, generator=generator) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 5.0, 70.0, 40.0], [0.0, 0.0, 30.0, 30.0]]), "labels": torch.tensor([2, 1])}]
    return {"images": images, "targets": targets}


def distiller(teacher, student) -> featkd.Distiller:
    terms = [featkd.Term(student='backbone["0"]', teacher='backbone["3"]', loss="hint", name="fpn_hint",
                         weight=1e-3),
             featkd.Term(student='backbone["0"]', teacher='backbone["2"]', loss="at", name="fpn_at", weight=1e3),
             featkd.Term(student='backbone["1"]', teacher='backbone["3"]', loss="nst", name="fpn_nst", weight=50)]
    return featkd.Distiller(teacher, student, terms, task_loss=LOSS_WEIGHTS, batch_format=DETECTOR)


def main(log=print) -> dict[str, float]:
    teacher, student = detectors()
    d = distiller(teacher, student)
    batch = example_batch()
    d.setup(batch)
    optimizer = torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9)
    d.train()
    _, losses = d(batch)  # a detector in training mode returns losses, not logits
    losses["total"].backward()
    optimizer.step()
    values = {name: float(value.detach()) for name, value in losses.items()}
    log(", ".join(f"{name} {value:.4g}" for name, value in values.items()))
    return values


if __name__ == "__main__":
    main()

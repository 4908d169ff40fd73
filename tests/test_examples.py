"""The worked examples run end to end (tiny settings, seconds): what the README shows works on a fresh machine."""

import importlib.util
from pathlib import Path

import pytest
import torch

import featkd

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bert_example_distils_on_padded_batches_and_reports_paired_intervals():
    lines = []
    accuracies = load("bert_distillation").main(["--seeds", "0", "1", "--train-size", "24", "--epochs", "1",
                                                 "--teacher-epochs", "1", "--teacher-size", "200"], log=lines.append)
    assert set(accuracies) == {"student", "distilled"} and all(len(v) == 2 for v in accuracies.values())
    assert all(0 <= a <= 100 for v in accuracies.values() for a in v)
    table = "\n".join(lines)
    assert "| distilled |" in table and "paired mean ± 95% CI" in table and "A seed draws the training snippets" in table


def test_the_causal_lm_example_distils_per_token_and_reports_accuracy_and_loss():
    lines = []
    accuracies = load("causal_lm_distillation").main(["--seeds", "0", "--train-size", "16", "--epochs", "1",
                                                      "--teacher-epochs", "1", "--teacher-size", "64"],
                                                     log=lines.append)
    assert set(accuracies) == {"student", "distilled"}
    table = "\n".join(lines)
    assert "next-token accuracy %" in table and "nats/token" in table


def test_one_detection_step_on_fpn_features_with_the_detector_s_own_weighted_losses():
    example = load("detection_step")
    teacher, student = example.detectors()
    distiller = example.distiller(teacher, student)
    batch = example.example_batch()
    distiller.setup(batch)
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    student_before = [p.detach().clone() for p in student.parameters()]
    distiller.train()
    with torch.random.fork_rng():  # the detector samples proposals at random: the same draws twice
        torch.manual_seed(5)
        logits, losses = distiller(batch)
    assert logits is None and set(losses) == {"task", "fpn_hint", "fpn_at", "fpn_nst", "total"}
    # the task loss is the detector's own loss dict, weighted, computed here by the detector alone
    with torch.random.fork_rng():
        torch.manual_seed(5)
        own = student(batch["images"], batch["targets"])
    torch.testing.assert_close(losses["task"], sum(example.LOSS_WEIGHTS[k] * v for k, v in own.items()))
    torch.optim.SGD(distiller.trainable_parameters(), lr=0.01).zero_grad()
    losses["total"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    torch.optim.SGD(distiller.trainable_parameters(), lr=0.01).step()
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters()))
    assert all(torch.equal(before[name], p) for name, p in teacher.named_parameters())
    values = example.main(log=lambda *a: None)
    assert all(torch.isfinite(torch.tensor(v)) for v in values.values())


def test_weights_that_do_not_name_the_detector_s_losses_are_one_line():
    example = load("detection_step")
    teacher, student = example.detectors()
    distiller = featkd.Distiller(teacher, student, example.distiller(teacher, student).terms[:1],
                                 task_loss={"loss_classifer": 1.0}, batch_format=example.DETECTOR)
    distiller.setup(example.example_batch())
    with pytest.raises(KeyError, match=r"task_loss weights \['loss_classifer'\] do not match the model's losses"):
        distiller.train()(example.example_batch())

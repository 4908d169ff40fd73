"""Worked example (a): a 4-layer BERT-like encoder distilled into a 2-layer one, on variable-length padded batches.

The task: which of four Python standard-library modules (argparse, logging, statistics, difflib) a
snippet of 32 to 96 characters of its documentation comes from — text that ships with Python, so
nothing is downloaded. Training snippets come from the first 75% of each module's documentation,
test snippets from the last 25%: no test character was seen in training.

The teacher (4 layers, width 64, 4 heads) trains on 4 000 snippets (``--teacher-size``). Each seed then draws a small
training set (``--train-size``) and trains two students (2 layers, width 32, 2 heads) from the same
initial weights in the same batch order: the student alone (cross-entropy), and the student distilled
with hidden-state NST (polynomial kernel, student block 1 against teacher block 3), MiniLM's attention
transfer (the last blocks' self-attention distributions, heads averaged) and KD (T = 4). Every
transfer term's weight makes its gradient on the student at initialisation equal to the
cross-entropy's (``featkd.calibration``, weight ``relative_to_ce: 1``), fixed before the first run and
not tuned. Padding counts nowhere: the token losses and the attention transfer read the batch's mask.

    python examples/bert_distillation.py --seeds 0 1 2 3 4 5 6 7 8 9

prints each seed's test accuracies and the paired comparison with its 95% interval.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import featkd
from featkd.batches import BatchFormat
from featkd.calibration import RelativeToCE, calibrate_weights
from featkd.data.text import SNIPPET_SOURCES, PaddedBatches, load_text_dataset
from featkd.engine import DistillMethod, SupervisedMethod, fit
from featkd.models import create_model
from featkd.stats import INTERVAL_NOTE, comparison_table

LENGTHS = (32, 96)  # stdlib_snippets' snippet lengths
TEXT = BatchFormat(inputs=("input_ids", "attention_mask"), targets="labels", mask="attention_mask",
                   options={"output_attentions": True})


def task(train_count: int, test_count: int, seed: int):
    """The vocabulary size, ``train_count`` training snippets drawn with ``seed`` and ``test_count`` test
    snippets (the text dataset ``stdlib_snippets`` of featkd.data.text, which featkd's YAML configs name too)."""
    train = load_text_dataset("stdlib_snippets", "train", size=train_count, seed=seed)
    test = load_text_dataset("stdlib_snippets", "test", test_size=test_count)
    return train.info.vocab_size, (train.sequences, train.labels.tolist()), (test.sequences, test.labels.tolist())


def encoder(vocab_size: int, layers: int, width: int, heads: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # attention dropout off: the attention transfer compares the probabilities the student computes
    return create_model("hf:bert", num_classes=len(SNIPPET_SOURCES), num_hidden_layers=layers, hidden_size=width,
                        num_attention_heads=heads, intermediate_size=2 * width, vocab_size=vocab_size,
                        max_position_embeddings=LENGTHS[1], attention_probs_dropout_prob=0.0,
                        attn_implementation="eager")


def train_teacher(vocab_size, size: int, epochs: int, log) -> tuple[torch.nn.Module, float]:
    _, (ids, labels), test = task(size, 800, seed=0)
    teacher = encoder(vocab_size, 4, 64, 4, seed=0)
    method = SupervisedMethod(teacher, torch.optim.AdamW(teacher.parameters(), lr=1e-3), name="teacher",
                              batch_format=TEXT)
    history = fit(method, PaddedBatches(ids, labels, batch_size=32, seed=0),
                  PaddedBatches(*test, batch_size=128, shuffle=False), None, epochs, eval_every=epochs,
                  batch_format=TEXT, log=log)
    return teacher.eval(), history[-1]["teacher/acc1"]


def train_student(teacher, vocab_size, seed: int, train_size: int, epochs: int, distill: bool, log) -> float:
    _, train, test = task(train_size, 800, seed=1 + seed)
    loader = PaddedBatches(*train, batch_size=16, seed=seed)
    test_loader = PaddedBatches(*test, batch_size=128, shuffle=False)
    student = encoder(vocab_size, 2, 32, 2, seed=1000 + seed)
    if not distill:
        method = SupervisedMethod(student, torch.optim.AdamW(student.parameters(), lr=1e-3), name="student",
                                  batch_format=TEXT)
    else:
        s, t = "bert.encoder.layer", "bert.encoder.layer"
        terms = [featkd.Term(student=f"{s}.1", teacher=f"{t}.3", loss="nst", name="nst",
                             options={"kernel": "poly"}, weight=RelativeToCE(1.0)),
                 featkd.Term(student=f"{s}.1.attention.self[1]", teacher=f"{t}.3.attention.self[1]",
                             loss="attention_kl", name="attention", options={"heads": "mean"},
                             weight=RelativeToCE(1.0))]
        distiller = featkd.Distiller(teacher, student, terms, kd={"loss": "kd", "T": 4.0, "weight": RelativeToCE(1.0)},
                                     batch_format=TEXT)
        first = next(iter(loader))
        distiller.setup(first)
        x, y, _ = TEXT.split(first)
        calibrate_weights(distiller, x, y)
        method = DistillMethod(distiller, torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-3))
    history = fit(method, loader, test_loader, None, epochs, eval_every=epochs, batch_format=TEXT, log=log)
    if distill:
        distiller.remove_hooks()  # the teacher serves the next seed's distiller
    return history[-1]["student/acc1"]


def main(argv=None, log=print) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-size", type=int, default=200, help="training snippets per seed")
    parser.add_argument("--epochs", type=int, default=30, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--teacher-size", type=int, default=4000, help="the teacher's training snippets")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    vocab_size, _, _ = task(1, 1, 0)
    quiet = lambda *a, **k: None  # noqa: E731
    teacher, teacher_acc = train_teacher(vocab_size, args.teacher_size, args.teacher_epochs, quiet)
    log(f"teacher: 4 layers, width 64, {args.teacher_size} snippets: {teacher_acc:.2f}% on the test snippets")
    accuracies: dict[str, list[float]] = {"student": [], "distilled": []}
    for seed in args.seeds:
        for name in accuracies:
            accuracies[name].append(train_student(teacher, vocab_size, seed, args.train_size, args.epochs,
                                                  name == "distilled", quiet))
        log(f"seed {seed}: student {accuracies['student'][-1]:.2f}, distilled {accuracies['distilled'][-1]:.2f}")
    log(comparison_table(accuracies, args.seeds, teacher=teacher_acc))
    log(f"{INTERVAL_NOTE} A seed draws the training snippets, the batch order and the student's initial "
        f"weights; the teacher is the same. {time.perf_counter() - started:.0f} s, torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}, {torch.get_num_threads()} threads.")
    return accuracies


if __name__ == "__main__":
    main()

"""Worked example (b): a small causal language model distilled into a smaller one, per token, on padded batches.

Character-level language modelling of the documentation of Python's standard library (it ships with
Python: nothing is downloaded). Training windows (24 to 64 characters) come from the first 80% of each
module's documentation, test windows from the last 20%.

The teacher is a GPT-2 (3 blocks, width 64) trained on 3 000 windows (``--teacher-size``). Each seed
draws a small training set (``--train-size``) and trains two students (1 block, width 32) from the
same initial weights in the same batch order: the student alone (next-token cross-entropy), and the
student distilled with per-token KD (T = 1, the teacher's next-token distribution at every valid
position) and a cosine loss between the student's block and the teacher's last block (DistilBERT's
hidden-state term; a learned per-token projection maps width 32 to 64). Each transfer weight makes its
gradient at initialisation equal to the cross-entropy's (``relative_to_ce: 1``), fixed, not tuned.
The score is next-token accuracy on the test windows (and the test loss per token, in nats).

    python examples/causal_lm_distillation.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import featkd
from featkd.batches import BatchFormat
from featkd.calibration import RelativeToCE, calibrate_weights
from featkd.data.text import CharVocabulary, PaddedBatches, stdlib_docs
from featkd.engine import DistillMethod, SupervisedMethod, fit
from featkd.models import create_model
from featkd.stats import INTERVAL_NOTE, comparison_table

SOURCES = ("argparse", "logging", "statistics", "difflib", "inspect", "shutil")
LENGTHS = (24, 64)
# targets: the next token at each position (per-token cross-entropy, next-token accuracy)
TOKENS = BatchFormat(inputs=("input_ids", "attention_mask"), targets="next_tokens", mask="attention_mask")


def windows(texts: list[str], count: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    found = []
    for i in range(count):
        text = texts[i % len(texts)]
        length = int(torch.randint(LENGTHS[0], LENGTHS[1] + 1, (1,), generator=generator))
        start = int(torch.randint(0, len(text) - length, (1,), generator=generator))
        found.append(text[start:start + length])
    return found


def corpus():
    docs = [stdlib_docs(m) for m in SOURCES]
    cut = [int(0.8 * len(d)) for d in docs]
    return CharVocabulary("".join(docs)), [d[:c] for d, c in zip(docs, cut)], [d[c:] for d, c in zip(docs, cut)]


def language_model(vocab_size: int, layers: int, width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("hf:gpt2", vocab_size=vocab_size, n_embd=width, n_layer=layers, n_head=2,
                        n_positions=LENGTHS[1], bos_token_id=0, eos_token_id=0)


def batches(vocab, texts, count, seed, batch_size, shuffle=True):
    return PaddedBatches([vocab.encode(t) for t in windows(texts, count, seed)], batch_size=batch_size,
                         shuffle=shuffle, seed=seed)


def main(argv=None, log=print) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-size", type=int, default=300, help="training windows per seed")
    parser.add_argument("--epochs", type=int, default=20, help="student epochs")
    parser.add_argument("--teacher-size", type=int, default=3000)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    vocab, train_texts, test_texts = corpus()
    test = batches(vocab, test_texts, 600, 10_000, 128, shuffle=False)
    quiet = lambda *a, **k: None  # noqa: E731

    teacher = language_model(len(vocab), 3, 64, seed=0)
    method = SupervisedMethod(teacher, torch.optim.AdamW(teacher.parameters(), lr=2e-3), name="teacher",
                              batch_format=TOKENS)
    row = fit(method, batches(vocab, train_texts, args.teacher_size, 0, 32), test, None, args.teacher_epochs,
              eval_every=args.teacher_epochs, batch_format=TOKENS, log=quiet)[-1]
    teacher.eval()
    log(f"teacher: 3 blocks, width 64, {args.teacher_size} windows: next-token accuracy {row['teacher/acc1']:.2f}%, "
        f"{row['teacher/loss']:.3f} nats/token")

    accuracies: dict[str, list[float]] = {"student": [], "distilled": []}
    losses: dict[str, list[float]] = {"student": [], "distilled": []}
    for seed in args.seeds:
        for name in accuracies:
            loader = batches(vocab, train_texts, args.train_size, 1 + seed, 16)
            student = language_model(len(vocab), 1, 32, seed=1000 + seed)
            if name == "student":
                method = SupervisedMethod(student, torch.optim.AdamW(student.parameters(), lr=2e-3),
                                          name="student", batch_format=TOKENS)
            else:
                distiller = featkd.Distiller(
                    teacher, student, [featkd.Term(student="transformer.h.0", teacher="transformer.h.2", loss="cosine",
                                                   name="cosine", weight=RelativeToCE(1.0))],
                    kd={"loss": "kd", "T": 1.0, "weight": RelativeToCE(1.0)}, batch_format=TOKENS)
                first = next(iter(loader))
                distiller.setup(first)
                calibrate_weights(distiller, *TOKENS.split(first)[:2])
                method = DistillMethod(distiller, torch.optim.AdamW(distiller.trainable_parameters(), lr=2e-3))
            row = fit(method, loader, test, None, args.epochs, eval_every=args.epochs, batch_format=TOKENS,
                      log=quiet)[-1]
            if name == "distilled":
                distiller.remove_hooks()  # the teacher serves the next seed's distiller
            accuracies[name].append(row["student/acc1"])
            losses[name].append(row["student/loss"])
        log(f"seed {seed}: next-token accuracy student {accuracies['student'][-1]:.2f}, distilled "
            f"{accuracies['distilled'][-1]:.2f}; nats/token {losses['student'][-1]:.3f}, {losses['distilled'][-1]:.3f}")
    log(comparison_table(accuracies, args.seeds, metric="next-token accuracy %"))
    log(comparison_table(losses, args.seeds, metric="test loss, nats/token (lower is better)"))
    log(f"{INTERVAL_NOTE} A seed draws the training windows, the batch order and the student's initial weights; "
        f"the teacher is the same. {time.perf_counter() - started:.0f} s, torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}, {torch.get_num_threads()} threads.")
    return accuracies


if __name__ == "__main__":
    main()

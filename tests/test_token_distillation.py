"""Distilling transformers through the batch seam: dict batches read by a BatchFormat, logits found in a
ModelOutput, per-token KD, the model's own loss, and token masks reaching every token loss — a padded
batch gives the loss of its samples given alone, unpadded (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

import featkd
from featkd.batches import BatchFormat
from featkd.data.text import IGNORE_INDEX, CharVocabulary, PaddedBatches
from featkd.engine import DistillMethod, evaluate, fit
from featkd.models import create_model

pytest.importorskip("transformers")

# dropout off: the padded and the unpadded forward must see the same network
QUIET = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "attn_implementation": "eager",
         "vocab_size": 40, "max_position_embeddings": 32, "intermediate_size": 48}
TEXT = BatchFormat(inputs=("input_ids", "attention_mask"), targets="labels", mask="attention_mask",
                   options={"output_attentions": True})


def bert(layers: int, hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("hf:bert", num_classes=3, num_hidden_layers=layers, hidden_size=hidden,
                        num_attention_heads=2, **QUIET).double()


def token_terms() -> list:
    """Every token loss between the student's last block and the teacher's, and MiniLM's attention transfer."""
    s, t = "bert.encoder.layer.1", "bert.encoder.layer.3"
    return [featkd.Term(student=s, teacher=t, loss="nst", name="nst_poly", options={"kernel": "poly"}),
            featkd.Term(student=s, teacher=t, loss="nst", name="nst_gaussian",
                        options={"kernel": "gaussian", "sigma2": 1.0}),
            # the median heuristic takes one bandwidth per batch: padding-free, but not per sample
            featkd.Term(student=s, teacher=t, loss="nst", name="nst_median", options={"kernel": "gaussian"}),
            featkd.Term(student=s, teacher=t, loss="at", name="at"),
            featkd.Term(student=s, teacher=t, loss="gram", name="gram"),
            featkd.Term(student=s, teacher=t, loss="hint", name="hint"),  # widths 24 -> 32: the hint's own learned projection
            featkd.Term(student=s, teacher=t, loss="cosine", name="cosine"),  # the automatic adapter projects the width
            featkd.Term(student=f"{s}.attention.self[1]", teacher=f"{t}.attention.self[1]", loss="attention_kl", name="attention")]


def padded(sequences: list[list[int]], length: int, labels) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.as_tensor(labels)}


@pytest.fixture(scope="module")
def bert_distiller():
    distiller = featkd.Distiller(bert(4, 32, 0), bert(2, 24, 1), token_terms(), kd={"loss": "kd", "T": 2.0},
                                 batch_format=TEXT)
    torch.manual_seed(2)
    sequences = [torch.randint(2, 40, (n,)).tolist() for n in (9, 5, 2)]
    distiller.setup(padded(sequences[:2], 9, [0, 1])).double()
    return distiller, sequences


@pytest.mark.parametrize("length", [9, 14])
def test_a_padded_batch_gives_every_token_loss_of_its_unpadded_samples(bert_distiller, length):
    distiller, sequences = bert_distiller
    labels = [0, 2, 1]
    _, batch_losses = distiller.unweighted_losses(*_split(padded(sequences, length, labels)))
    alone = [distiller.unweighted_losses(*_split(padded([seq], len(seq), [label])))[1]
             for seq, label in zip(sequences, labels)]
    assert set(batch_losses) == {"kd", "ce", "nst_poly", "nst_gaussian", "nst_median", "at", "gram", "hint",
                                 "cosine", "attention"}
    _, unpadded_median = distiller.unweighted_losses(*_split(padded(sequences, 9, labels)))
    torch.testing.assert_close(batch_losses.pop("nst_median"), unpadded_median["nst_median"], rtol=1e-9, atol=1e-12)
    for key, value in batch_losses.items():
        expected = sum(losses[key] for losses in alone) / len(alone)  # each loss is a mean over the samples
        assert value.dtype == torch.float64 and torch.isfinite(value)
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12, msg=key)


def test_the_gradient_of_a_padded_batch_is_that_of_its_unpadded_samples(bert_distiller):
    distiller, sequences = bert_distiller
    params = [p for p in distiller.trainable_parameters() if p.requires_grad]

    def gradient(batch):
        losses = distiller(*_split(batch))[1]
        per_sample = losses["total"] - losses["nst_median"]  # the median bandwidth is one per batch
        return torch.autograd.grad(per_sample, params, allow_unused=True)

    together = gradient(padded(sequences, 12, [0, 2, 1]))
    alone = [gradient(padded([seq], len(seq), [label])) for seq, label in zip(sequences, [0, 2, 1])]
    for i, g in enumerate(together):
        parts = [a[i] for a in alone if a[i] is not None]
        if g is None:
            assert not parts
            continue
        torch.testing.assert_close(g, sum(parts) / 3, rtol=1e-7, atol=1e-10)


def _split(batch):
    return TEXT.split(batch)[:2]


# --------------------------------------------------------------------------- a causal language model


def gpt2(layers: int, width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("hf:gpt2", vocab_size=30, n_embd=width, n_layer=layers, n_head=2, n_positions=24,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).double()


def test_per_token_kd_runs_over_valid_tokens_and_the_model_s_own_loss_is_the_task_loss():
    lm_format = BatchFormat(inputs=("input_ids", "attention_mask", "labels"),
                            teacher_inputs=("input_ids", "attention_mask"), targets="labels", mask="attention_mask")
    teacher, student = gpt2(3, 32, 0), gpt2(1, 16, 1)
    distiller = featkd.Distiller(teacher, student, [featkd.Term(student="transformer.h.0", teacher="transformer.h.2", loss="cosine")],
                                 kd={"loss": "kd", "T": 2.0}, task_loss="model", batch_format=lm_format)
    torch.manual_seed(3)
    lengths = [7, 3]
    batch = next(iter(PaddedBatches([torch.randint(1, 30, (n,)).tolist() for n in lengths], batch_size=2,
                                    shuffle=False)))
    assert batch["labels"][1, 3:].eq(IGNORE_INDEX).all()  # padding carries no label
    distiller.setup(batch).double()
    logits, losses = distiller(batch, batch["labels"])
    assert set(losses) == {"task", "kd", "cosine:transformer.h.0", "total"} and logits.shape == (2, 7, 30)
    # hidden states are tokens also where the sequence is as long as the model is wide
    square = {"input_ids": torch.ones(2, 16, dtype=torch.long), "attention_mask": torch.ones(2, 16, dtype=torch.long),
              "labels": torch.ones(2, 16, dtype=torch.long)}
    wide = featkd.Distiller(teacher, gpt2(1, 16, 1), [featkd.Term(student="transformer.h.0", teacher="transformer.h.2",
                                                                  loss="cosine")], batch_format=lm_format,
                            task_loss="model").setup(square)
    assert wide._layouts[0][0][0].kind == "NLC"
    wide.remove_hooks()
    # the KD term, by an explicit loop over the valid tokens (mean over all of them, as HF averages tokens)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = [4.0 * F.kl_div(F.log_softmax(logits[b, i] / 2, -1), F.log_softmax(t_logits[b, i] / 2, -1),
                            reduction="sum", log_target=True)
             for b, n in enumerate(lengths) for i in range(n)]
    torch.testing.assert_close(losses["kd"], sum(terms) / len(terms))
    # the task loss is the student's own next-token loss, labels shifted by the model, padding ignored
    own = student(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    torch.testing.assert_close(losses["task"], own)
    shifted = [F.cross_entropy(logits[b, :n - 1], batch["input_ids"][b, 1:n], reduction="sum")
               for b, n in enumerate(lengths)]
    # (transformers computes its causal-LM loss in float32, whatever the model's precision)
    torch.testing.assert_close(losses["task"].double(), sum(shifted) / sum(n - 1 for n in lengths), rtol=1e-6,
                               atol=1e-7)


# --------------------------------------------------------------------------- training on dict batches


def test_fit_and_evaluate_read_dict_batches_through_the_format(tmp_path):
    vocab = CharVocabulary("abcdefgh")
    torch.manual_seed(0)
    words = ["".join("abcdefgh"[i] for i in torch.randint(0, 8, (int(n),))) for n in torch.randint(2, 9, (24,))]
    labels = [int(w.count("a") > w.count("b")) + int(len(w) > 5) for w in words]
    loader = PaddedBatches([vocab.encode(w) for w in words], labels, batch_size=8, seed=1)
    test = PaddedBatches([vocab.encode(w) for w in words], labels, batch_size=8, shuffle=False)
    config = dict(QUIET, vocab_size=len(vocab))
    teacher = create_model("hf:bert", num_classes=3, num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                           **config)
    student = create_model("hf:bert", num_classes=3, num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                           **config)
    distiller = featkd.Distiller(teacher, student, [featkd.Term(student="bert.encoder.layer.0",
                                                                teacher="bert.encoder.layer.1", loss="nst")], kd="kd", batch_format=TEXT)
    distiller.setup(next(iter(test)))
    method = DistillMethod(distiller, torch.optim.SGD(distiller.trainable_parameters(), lr=0.1))
    history = fit(method, loader, test, tmp_path / "run", epochs=2, batch_format=TEXT, log=lambda *a: None)
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(math.isfinite(row["train/total"]) for row in history)
    # the accuracy fit logged is the one computed here from the model's own logits
    hits = sum(int((student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(1)
                    == b["labels"]).sum()) for b in test)
    assert history[-1]["student/acc1"] == pytest.approx(100 * hits / len(words))
    assert evaluate(student, test, batch_format=TEXT)["acc1"] == pytest.approx(100 * hits / len(words))


# --------------------------------------------------------------------------- the seam's errors


def test_a_dict_batch_needs_a_format_and_a_missing_key_names_the_close_ones():
    with pytest.raises(TypeError, match=r"a dict batch \(keys \['input_ids', 'labels'\]\) needs a BatchFormat"):
        featkd.batches.IMAGES.model_input({"input_ids": torch.zeros(1, 2), "labels": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"no key 'attention_masks' \(BatchFormat inputs\); Did you mean "
                                       r"'attention_mask'\?"):
        BatchFormat(inputs=("input_ids", "attention_masks")).model_input(
            {"input_ids": torch.zeros(1, 2), "attention_mask": torch.ones(1, 2)})
    with pytest.raises(ValueError, match="task_loss must be one of"):
        featkd.model_outputs.TaskLoss("mse")


def test_the_model_loss_without_labels_is_one_line_with_the_fix():
    student = gpt2(1, 16, 1)
    output = student(input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"task_loss='model' but the model returned no loss .*pass the labels"):
        featkd.model_outputs.TaskLoss("model")(output, output.logits, None, {}, None)

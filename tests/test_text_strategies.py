"""The strategies read batches through the BatchFormat seam too: Deep Mutual Learning and adversarial KD between
language models run per valid token, and padding counts nowhere (float64, checked against plain per-sequence
computations)."""

import pytest
import torch
import torch.nn.functional as F

from featkd.batches import BatchFormat
from featkd.models import create_model
from featkd.strategies.adversarial import AdversarialKD, LogitDiscriminator
from featkd.strategies.dml import DeepMutualLearning, PeerTermConfig

pytest.importorskip("transformers")

VOCAB = 30
LM = BatchFormat(inputs=("input_ids", "attention_mask"), targets="labels", mask="attention_mask")


def gpt2(layers: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("hf:gpt2", vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=2, n_positions=24,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).double()


def lm_batch(sequences: list[list[int]], length: int) -> dict[str, torch.Tensor]:
    """Right-padded to ``length``; each token's label is the next token, -100 (no label) after the last."""
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
        labels[row, :len(seq) - 1] = torch.tensor(seq[1:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sequences() -> list[list[int]]:
    torch.manual_seed(5)
    return [torch.randint(1, VOCAB, (n,)).tolist() for n in (9, 4, 6)]


def token_logits(model, seq: list[int]) -> torch.Tensor:
    """The model's (L, V) logits on one sequence given alone, without padding or mask."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([seq])).logits[0]


def frozen_dml(peers, terms=()) -> DeepMutualLearning:
    # lr 0: a step computes the losses and changes nothing, so two batches can be compared on the same peers
    optimizers = [torch.optim.SGD(p.parameters(), lr=0.0) for p in peers]
    return DeepMutualLearning(peers, optimizers, terms=terms, batch_format=LM,
                              example_input=lm_batch(sequences()[:2], 9) if terms else None)


def test_dml_between_language_models_runs_per_valid_token():
    peers = [gpt2(2, 0), gpt2(1, 1)]
    dml = frozen_dml(peers, [PeerTermConfig("cosine", ["transformer.h.0"], 1.0)])
    seqs = sequences()
    steps = [dml.train_step(batch, batch["labels"], 0) for batch in (lm_batch(seqs, 9), lm_batch(seqs, 14))]
    for key in steps[0]:
        assert steps[0][key] == pytest.approx(steps[1][key], rel=1e-10), key  # padding counts nowhere
    # the cross-entropy and the mimicry: means over every labelled token, from each sequence's own forward
    logits = [[token_logits(p, seq) for seq in seqs] for p in peers]
    ce = [torch.cat([F.cross_entropy(z[:-1], torch.tensor(seq[1:]), reduction="none")
                     for z, seq in zip(per_seq, seqs)]).mean() for per_seq in logits]
    tokens = [torch.cat(per_seq) for per_seq in logits]  # every valid token, labelled or not
    kl = [F.kl_div(F.log_softmax(tokens[k], 1), F.log_softmax(tokens[1 - k], 1), log_target=True,
                   reduction="none").sum(1).mean() for k in (0, 1)]
    for k in (0, 1):
        assert steps[0][f"peer{k}/ce"] == pytest.approx(ce[k].item(), rel=1e-10)
        # DML takes the mimicry in float32 (as under autocast), so to float32's precision
        assert steps[0][f"peer{k}/mimicry"] == pytest.approx(kl[k].item(), rel=1e-5)
    assert steps[0]["peer0/cosine"] > 0


def test_the_dml_ensemble_of_language_models_averages_their_token_probabilities():
    peers = [gpt2(2, 0), gpt2(1, 1)]
    dml = frozen_dml(peers)
    seq = sequences()[0]
    ensemble = dml.eval_models()["ensemble"]
    with torch.no_grad():
        got = ensemble(input_ids=torch.tensor([seq]))[0].exp()
    expected = sum(F.softmax(token_logits(p, seq), 1) for p in peers) / 2
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_adversarial_kd_between_language_models_plays_on_the_valid_tokens():
    def step(length):
        student, teacher = gpt2(1, 1), gpt2(2, 0)
        torch.manual_seed(7)
        discriminator = LogitDiscriminator(VOCAB, width=8, blocks=1)  # the game runs on float32 logits
        method = AdversarialKD(student, teacher, discriminator, torch.optim.SGD(student.parameters(), lr=0.0),
                               torch.optim.SGD(discriminator.parameters(), lr=0.0), ce_weight=1.0, batch_format=LM)
        batch = lm_batch(sequences(), length)
        return method.train_step(batch, batch["labels"], 0), student, teacher, discriminator

    short, student, teacher, discriminator = step(9)
    long, *_ = step(14)
    for key in short:
        assert short[key] == pytest.approx(long[key], rel=1e-6), key
    seqs = sequences()
    z_s = torch.cat([token_logits(student, seq) for seq in seqs])
    z_t = torch.cat([token_logits(teacher, seq) for seq in seqs])
    assert short["l1"] == pytest.approx((z_s - z_t).abs().sum(1).mean().item(), rel=1e-5)
    ce = torch.cat([F.cross_entropy(token_logits(student, seq)[:-1], torch.tensor(seq[1:]), reduction="none")
                    for seq in seqs]).mean()
    assert short["ce"] == pytest.approx(ce.item(), rel=1e-5)

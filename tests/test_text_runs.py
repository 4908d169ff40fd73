"""featkd train / distill / eval from YAML on a text dataset: Hugging Face models and dict batches read by the
loader's BatchFormat, padded per batch, the vocabulary taken from the data, resumed bit-exactly."""

import json

import pytest

from featkd.cli import main
from featkd.data.text import load_text_dataset, stdlib_docs

pytest.importorskip("transformers")

TINY = ["data.limit=48", "data.test_limit=32", "data.batch_size=16"]


def metrics(run_dir):
    return [{k: v for k, v in json.loads(line).items() if "time" not in k}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("text") / "teacher"
    assert main(["train", "--config", "text_teacher_bert", "--run-dir", str(run_dir), "epochs=1", *TINY]) == 0
    return run_dir / "last.pt"


def test_a_distilled_bert_from_yaml_trains_evaluates_and_resumes_bit_exactly(teacher, tmp_path, capsys):
    args = ["--config", "text_distill_bert", f"teacher.checkpoint={teacher}", *TINY]
    assert main(["distill", "--run-dir", str(tmp_path / "whole"), *args, "epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "teacher hf:bert" in out and "weight of nst:bert.encoder.layer.1 relative to the cross-entropy" in out
    assert main(["distill", "--run-dir", str(tmp_path / "parts"), *args, "epochs=1"]) == 0
    assert main(["distill", "--run-dir", str(tmp_path / "parts"), "--resume", "epochs=2"]) == 0
    whole, parts = metrics(tmp_path / "whole"), metrics(tmp_path / "parts")
    assert [row["epoch"] for row in whole] == [1, 2] and whole == parts
    assert {"train/ce", "train/kd", "train/nst:bert.encoder.layer.1"} <= set(whole[-1])
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(tmp_path / "whole")]) == 0
    assert f"student: acc1 {whole[-1]['student/acc1']:.4f}" in capsys.readouterr().out


def test_the_snippets_split_the_documentation_so_no_test_character_was_trained_on():
    train = load_text_dataset("stdlib_snippets", "train", size=200)
    test = load_text_dataset("stdlib_snippets", "test")
    assert len(train) == 200 and len(test) == 800 and train.info == test.info
    assert sorted(set(train.labels.tolist())) == [0, 1, 2, 3]
    assert all(32 <= len(s) <= 96 for s in train.sequences + test.sequences)
    # a test snippet lies in the last quarter of its module's documentation, a training one in the first three
    docs = [stdlib_docs(m) for m in ("argparse", "logging", "statistics", "difflib")]
    chars = {c: i + 2 for i, c in enumerate(sorted(set("".join(docs))))}
    decode = {v: k for k, v in chars.items()}
    for dataset, part in ((train, slice(0, 3)), (test, slice(3, 4))):
        for seq, label in list(zip(dataset.sequences, dataset.labels.tolist()))[:20]:
            text, doc = "".join(decode[i] for i in seq), docs[label]
            cut = int(0.75 * len(doc))  # (a phrase may recur in the documentation: first and last occurrences)
            if part.start == 0:
                assert 0 <= doc.find(text) and doc.find(text) + len(text) <= cut
            else:
                assert doc.rfind(text) >= cut


def test_text_settings_that_cannot_apply_are_one_line(teacher, tmp_path, capsys):
    status = main(["distill", "--config", "text_distill_bert", "--run-dir", str(tmp_path / "x"),
                   f"teacher.checkpoint={teacher}", *TINY, "data.omit_classes=[1]"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "data.omit_classes edits an image transfer set; the text dataset 'stdlib_snippets' takes none" in err
    with pytest.raises(ValueError, match=r"unknown text dataset 'stdlib_snipets'\. Did you mean: stdlib_snippets\?"):
        load_text_dataset("stdlib_snipets")


def test_a_sweep_of_text_students_equals_their_separate_runs(teacher, tmp_path, capsys):
    from featkd.config import resolve_config_path

    args = [f"teacher.checkpoint={teacher}", *TINY, "epochs=1"]
    config = str(resolve_config_path("text_distill_bert"))
    assert main(["sweep", "--config", config, "--run-dir", str(tmp_path / "sweep"), *args,
                 "--grid", "terms.0.options.kernel=poly,linear"]) == 0
    assert main(["distill", "--config", config, "--run-dir", str(tmp_path / "single"), *args,
                 "terms.0.options.kernel=linear"]) == 0
    capsys.readouterr()
    member = metrics(tmp_path / "sweep" / "members" / "kernel=linear")
    single = metrics(tmp_path / "single")
    for key in ("train/ce", "train/kd", "train/total", "student/acc1", "student/loss"):
        assert member[0][key] == pytest.approx(single[0][key], rel=1e-6, abs=1e-7), key


TINY_BERT = {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
             "max_position_embeddings": 96, "attn_implementation": "eager"}
TEXT_DATA = {"name": "stdlib_snippets", "batch_size": 16, "augment": False, "limit": 48, "test_limit": 32,
             "options": {"size": 200, "seed": 1}}


def test_the_strategies_train_on_text_from_yaml(teacher, tmp_path, capsys):
    import yaml

    common = {"seed": 1, "epochs": 1, "data": TEXT_DATA, "optim": {"name": "adamw", "lr": 1e-3},
              "schedule": {"name": "constant"}}
    configs = {
        "dml": {**common, "dml": {"peers": [{"name": "hf:bert", "options": TINY_BERT}] * 2,
                                  "terms": [{"loss": "nst", "layers": ["bert.encoder.layer.0"], "weight": 1.0}]}},
        "born-again": {**common, "model": {"name": "hf:bert", "options": TINY_BERT},
                       "kd": {"loss": "kd", "weight": 1.0, "options": {"T": 1.0}}, "ce_weight": 0.0,
                       "born_again": {"generations": 2}},
        "adversarial": {**common, "teacher": {"checkpoint": str(teacher)},
                        "student": {"name": "hf:bert", "options": TINY_BERT}},
    }
    for command, config in configs.items():
        path = tmp_path / f"{command}.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main([command, "--config", str(path), "--run-dir", str(tmp_path / command)]) == 0, command
    dml = metrics(tmp_path / "dml")[-1]
    assert {"train/peer0/ce", "train/peer0/mimicry", "train/peer0/nst", "ensemble/acc1"} <= set(dml)
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(tmp_path / "dml")]) == 0  # the ensemble rebuilt from the checkpoint
    assert f"ensemble: acc1 {dml['ensemble/acc1']:.4f}" in capsys.readouterr().out
    assert "bane/acc1" in metrics(tmp_path / "born-again" / "gen2")[-1]
    assert {"train/adv", "train/l1", "student/acc1"} <= set(metrics(tmp_path / "adversarial")[-1])

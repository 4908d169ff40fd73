"""hf:<architecture>: Hugging Face transformers models built from configs (never downloaded), whose hidden states
featkd captures by name like any other layer."""

import pytest
import torch

from featkd import FeatureExtractor
from featkd.models import create_model

transformers = pytest.importorskip("transformers")

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def test_a_bert_from_its_config_classifies_and_its_hidden_states_are_captured():
    model = create_model("hf:bert", num_classes=3, vocab_size=100, **TINY).eval()
    assert isinstance(model, transformers.BertForSequenceClassification) and model.config.num_labels == 3
    ids, mask = torch.randint(0, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    extractor = FeatureExtractor(model, ["bert.encoder.layer.0", "bert.encoder.layer.1"])
    out, features = extractor(input_ids=ids, attention_mask=mask)
    assert out.logits.shape == (2, 3)
    # the last layer's output is the encoder's last hidden state (the model's own output, computed independently)
    last = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    layer1 = features["bert.encoder.layer.1"]
    layer1 = layer1[0] if isinstance(layer1, tuple) else layer1
    torch.testing.assert_close(layer1, last)


def test_vit_and_gpt2_from_configs():
    vit = create_model("hf:vit", num_classes=10, in_channels=1, image_size=28, patch_size=7, **TINY)
    assert vit(torch.randn(2, 1, 28, 28)).logits.shape == (2, 10)
    gpt2 = create_model("hf:gpt2", vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    assert gpt2(torch.randint(0, 50, (2, 5))).logits.shape == (2, 5, 50)


def test_a_misspelled_option_or_architecture_is_one_clear_error():
    with pytest.raises(ValueError, match=r"model 'hf:bert' has no option 'hiden_size' \(BertConfig does not take "
                                         r"it\)\. Did you mean 'hidden_size'"):
        create_model("hf:bert", hiden_size=32)
    with pytest.raises(ValueError, match=r"unknown Hugging Face architecture 'hf:bret'\. Did you mean: hf:bert\?"):
        create_model("hf:bret")


def test_pretrained_weights_load_from_a_local_path(tmp_path):
    model = create_model("hf:bert", num_classes=2, vocab_size=100, **TINY)
    model.save_pretrained(tmp_path / "bert")
    again = create_model("hf:bert", num_classes=2, pretrained=str(tmp_path / "bert"))
    ids = torch.randint(0, 100, (1, 5))
    torch.testing.assert_close(again.eval()(ids).logits, model.eval()(ids).logits)

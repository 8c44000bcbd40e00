"""Done-when of issue 16 (data): a user's DataLoader of dict batches (input_ids, attention_mask, labels)
trains, prunes, calibrates int8, distills and measures a Hugging Face BertForSequenceClassification
with no glue code: the model is called with keyword inputs, its ModelOutput read for logits.

The task is learnable and synthetic: label 1 when the token id ``MARK`` appears in the (padded)
sequence. The tiny BERT (hidden 32, 2 layers, 2 heads, vocabulary 100) is built offline with random
weights; every accuracy is checked against the untrained model's, measured in the same test."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import slimfuse as sf
from slimfuse.compress.qmodules import QLinear

transformers = pytest.importorskip("transformers")

MARK, PAD, CLS, LENGTH = 3, 0, 1, 12


class MarkedTokens(Dataset):
    """Padded token sequences of random lengths; the label says whether token MARK occurs."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(6, LENGTH + 1, (n,), generator=g)
        self.ids = torch.randint(5, 100, (n, LENGTH), generator=g)
        self.y = (torch.rand(n, generator=g) < 0.5).long()
        where = (torch.rand(n, generator=g) * (self.lengths - 1)).long() + 1
        self.ids[self.y == 1, where[self.y == 1]] = MARK
        self.ids[:, 0] = CLS
        self.mask = (torch.arange(LENGTH)[None] < self.lengths[:, None]).long()
        self.ids[self.mask == 0] = PAD

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):  # what a tokenizer + Hugging Face dataset hands a collator
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.y[i]}


def bert(hidden=32, layers=2, seed=0):
    config = transformers.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=32,
                                     num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


def accuracy(model, data) -> float:
    return sf.evaluate(model, data)["accuracy"]


@pytest.mark.slow
def test_a_dataloader_of_dict_batches_drives_every_verb_on_a_bert_classifier():
    train = DataLoader(MarkedTokens(384, seed=0), batch_size=32, shuffle=True)
    test = DataLoader(MarkedTokens(256, seed=1), batch_size=64)
    base_model = bert()
    baseline = accuracy(base_model, test)  # untrained: about chance

    trained = sf.fit(base_model, train, epochs=4, lr=3e-3, progress=False)
    acc = accuracy(trained, test)
    assert acc >= 0.9 and acc >= baseline + 0.25, (baseline, acc)

    pruned = sf.prune(trained, sparsity=0.5, data=train, epochs=2, progress=False)
    layers = dict(pruned.named_modules())
    names = sf.lineage_of(pruned)[-1]["params"]["pruned_layers"]
    zeros = sum(int((layers[n].weight == 0).sum()) for n in names)
    assert zeros / sum(layers[n].weight.numel() for n in names) == pytest.approx(0.5, abs=1e-3)
    assert accuracy(pruned, test) >= acc - 0.05

    int8 = sf.quantize(trained, "int8-static", calib=train)  # the loader's first samples calibrate
    assert any(isinstance(m, QLinear) for m in int8.modules())
    assert sf.lineage_of(int8)[-1]["params"]["samples"] == 384
    assert accuracy(int8, test) >= acc - 0.05

    student = sf.distill(trained, bert(hidden=16, layers=1, seed=1), train, epochs=4, lr=3e-3, progress=False)
    assert accuracy(student, test) >= max(0.8, baseline + 0.2)

    report = sf.measure({"trained": trained, "pruned": pruned, "int8": int8, "student": student}, test, seconds=0.2)
    for name, model in (("trained", trained), ("int8", int8), ("student", student)):
        assert report.row(name)["accuracy"] == pytest.approx(accuracy(model, test))
    assert report.row("pruned")["nonzeros"] < report.row("trained")["nonzeros"]
    assert report.row("int8")["bytes"] < report.row("trained")["bytes"]
    assert report.row("student")["params"] < report.row("trained")["params"] / 2
    assert report.row("trained")["macs"]  # counted on the loader's own inputs
    for model in (pruned, int8, student):  # each result went through the gate on the user's real inputs
        validation = sf.lineage_of(model)[-1]["validation"]
        assert validation["ran"] and not validation["synthetic"] and validation["samples"] == 256

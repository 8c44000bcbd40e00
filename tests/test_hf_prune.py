"""Structured pruning of transformers: attention heads go as units (head count and head size stay
consistent), MLP widths shrink, the pruned model reloads bit-exactly, ``nn.MultiheadAttention`` models
reload, and what Torch-Pruning cannot trace is refused naming the layer."""

import re

import numpy as np
import pytest
import torch

import slimfuse as sf
from slimfuse import ConfigError

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()


def bert(seed=0, hidden=16, heads=4, inter=32, vocab=60, positions=16, labels=3, dropout=0.1):
    torch.manual_seed(seed)
    return T.BertForSequenceClassification(T.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
        intermediate_size=inter, max_position_embeddings=positions, num_labels=labels,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)).eval()


def token_splits(n=96, length=10, vocab=60, classes=3):
    x = torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(0))
    y = (x[:, 1] % classes).long()
    task = sf.Task("tokens", "classification", classes, (length,))
    k, v = n * 2 // 3, n * 5 // 6
    return sf.Splits(sf.Split(x[:k], y[:k]), sf.Split(x[k:v], y[k:v]), sf.Split(x[v:], y[v:]), task)


def _kept_heads(original, pruned, size):
    """Which original heads a pruned query projection kept (matched by their weight rows)."""
    w0, w1 = original.weight.detach(), pruned.weight.detach()
    heads = []
    for j in range(w1.shape[0] // size):
        block = w1[j * size:(j + 1) * size]
        heads.append(next(h for h in range(w0.shape[0] // size) if torch.equal(w0[h * size:(h + 1) * size], block)))
    return heads


def test_heads_are_removed_as_units_and_the_rest_computes_as_before():
    model, data = bert(), token_splits()
    layers = range(model.config.num_hidden_layers)
    mlp = [f"bert.encoder.layer.{i}.intermediate.dense" for i in layers]
    pruned = sf.prune(model, channels=0.5, data=data, epochs=0, exclude=["classifier", *mlp], validate=False)
    size = model.config.hidden_size // model.config.num_attention_heads
    reference = bert()  # the original with the removed heads silenced: their output columns zeroed
    for i in layers:
        att0, att1 = model.bert.encoder.layer[i].attention, pruned.bert.encoder.layer[i].attention
        assert att1.self.num_attention_heads == 2 and att1.self.attention_head_size == size
        assert att1.self.query.out_features == att1.self.key.out_features == att1.self.value.out_features == 2 * size
        assert att1.output.dense.in_features == 2 * size
        kept = _kept_heads(att0.self.query, att1.self.query, size)
        assert kept == _kept_heads(att0.self.key, att1.self.key, size) == _kept_heads(att0.self.value,
                                                                                      att1.self.value, size)
        dense = reference.bert.encoder.layer[i].attention.output.dense
        with torch.no_grad():
            for h in set(range(4)) - set(kept):
                dense.weight[:, h * size:(h + 1) * size] = 0
    assert pruned.bert.encoder.layer[0].intermediate.dense.out_features == 32  # excluded: untouched
    with torch.no_grad():
        got, want = pruned(data.test.x).logits, reference(data.test.x).logits
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_pruned_bert_records_its_structure_and_reloads_bit_exactly(tmp_path):
    model, data = bert(), token_splits()
    pruned = sf.prune(model, channels=0.25, data=data, epochs=0)  # validated: reload bit-exact inside too
    spec = sf.spec_of(pruned)
    assert spec["arch"] == "hf"
    attrs = spec["args"]["attrs"]
    assert attrs["bert.encoder.layer.0.attention.self"]["num_attention_heads"] == 3
    assert attrs["bert.encoder.layer.1.intermediate.dense"]["out_features"] == 24
    assert pruned.bert.embeddings.word_embeddings.embedding_dim == 16  # the residual stream stays whole
    assert pruned.bert.pooler.dense.out_features == 16
    sf.save(pruned, tmp_path / "p")
    again = sf.load(tmp_path / "p")
    assert [layer.attention.self.num_attention_heads for layer in again.bert.encoder.layer] == [3, 3]
    assert again.config.num_attention_heads == 4  # the config is the base; the structure is recorded beside it
    with torch.no_grad():
        assert torch.equal(again(data.test.x).logits, pruned(data.test.x).logits)
    assert sum(p.numel() for p in again.parameters()) < sum(p.numel() for p in model.parameters())


def test_pruned_bert_fine_tunes_through_prune():
    model, data = bert(), token_splits()
    untuned = sf.prune(model, channels=0.25, data=data, epochs=0, validate=False)
    # a random model on random tokens: the gate's collapse check is not the point here
    tuned = sf.prune(model, channels=0.25, data=data, epochs=1, lr=1e-3, validate=False)
    assert tuned.bert.encoder.layer[0].attention.self.num_attention_heads == 3
    q0 = untuned.bert.encoder.layer[0].attention.self.query.weight
    q1 = tuned.bert.encoder.layer[0].attention.self.query.weight
    assert q0.shape == q1.shape and not torch.equal(q0, q1)  # fine-tuning trained the pruned structure
    assert [s["op"] for s in sf.lineage_of(tuned)] == ["prune"]


def gpt2_classifier():
    torch.manual_seed(0)
    return T.GPT2ForSequenceClassification(T.GPT2Config(vocab_size=60, n_positions=16, n_embd=16, n_layer=2, n_head=4,
                                                        num_labels=3, pad_token_id=0, bos_token_id=0,
                                                        eos_token_id=0)).eval()


def test_gpt2_attention_is_refused_naming_the_layer():
    with pytest.raises(ConfigError, match=r"transformer\.h\.0\.attn \(GPT2Attention\).*exclude="):
        sf.prune(gpt2_classifier(), channels=0.25, data=token_splits(), epochs=0)


def test_what_torch_pruning_cannot_trace_is_named_not_a_traceback():
    model = gpt2_classifier()
    exclude = ["score", "transformer.h.0.attn", "transformer.h.1.attn"]
    with pytest.raises(ConfigError, match=r"cannot trace this model.*Conv1D") as err:
        sf.prune(model, channels=0.25, data=token_splits(), epochs=0, exclude=exclude)
    assert "transformer.h.0" in str(err.value) and "\n" not in str(err.value)


def test_multihead_attention_model_pruned_reloads(tmp_path):
    from factories import token_ids

    model = sf.zoo.user_model("factories:mha_classifier")
    x = token_ids(64, 12, 50)
    y = (x[:, 0] % 4).long()
    data = sf.Splits(sf.Split(x[:40], y[:40]), sf.Split(x[40:52], y[40:52]), sf.Split(x[52:], y[52:]),
                     sf.Task("t", "classification", 4, (12,)))
    pruned = sf.prune(model, channels=0.25, data=data, epochs=0, validate=False)
    assert pruned.attn.embed_dim == 24 and pruned.attn.head_dim == 6
    sf.save(pruned, tmp_path / "m")
    again = sf.load(tmp_path / "m", trust_factory=True)
    assert again.attn.embed_dim == 24 and again.attn.num_heads == 4
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))


# --------------------------------------------------------------------------- the done-when check


def _sentence_topics(n=1600):
    """The built-in sentence corpus as a topic task, tokenised by a word vocabulary derived from it."""
    from slimfuse.nlp.sentences import TOPICS, corpus

    text, topics = corpus(n, seed=0)
    words = [re.findall(r"[a-z]+", s.lower()) for s in text]
    vocab = {w: i + 2 for i, w in enumerate(sorted({w for ws in words for w in ws}))}  # 0 pad, 1 [CLS]
    length = 1 + max(len(ws) for ws in words)
    ids = np.zeros((len(text), length), dtype=np.int64)
    for row, ws in enumerate(words):
        ids[row, 0] = 1
        ids[row, 1:len(ws) + 1] = [vocab[w] for w in ws]
    task = sf.Task("sentences-topic", "classification", len(TOPICS), (length,), TOPICS)
    from slimfuse.data.core import split_arrays

    return split_arrays(ids, topics, task, seed=0), len(vocab) + 2


@pytest.mark.slow
def test_head_pruned_bert_keeps_its_accuracy_on_the_sentence_topics(tmp_path):
    data, vocab = _sentence_topics()
    model = bert(hidden=32, heads=4, inter=64, vocab=vocab, positions=data.task.input_shape[0],
                 labels=data.task.num_classes, dropout=0.0)
    model = sf.fit(model, data, epochs=4, lr=2e-3, batch_size=32)
    base = sf.evaluate(model, data.test)["accuracy"]
    assert base > 0.8, base  # well above chance (1/8)
    pruned = sf.prune(model, channels=0.25, data=data, epochs=0)  # 1 of 4 heads and 25% of MLP widths removed
    assert [layer.attention.self.num_attention_heads for layer in pruned.bert.encoder.layer] == [3, 3]
    assert pruned.bert.encoder.layer[0].intermediate.dense.out_features == 48
    right_after = sf.evaluate(pruned, data.test)["accuracy"]
    assert right_after >= base - 0.05, (base, right_after)
    tuned = sf.prune(model, channels=0.25, data=data, epochs=2, lr=1e-3)
    after_tuning = sf.evaluate(tuned, data.test)["accuracy"]
    assert after_tuning >= base - 0.01, (base, after_tuning)
    print(f"sentence topics, tiny BERT: {base:.4f} unpruned, {right_after:.4f} right after pruning, "
          f"{after_tuning:.4f} after fine-tuning")
    sf.save(tuned, tmp_path / "bert")
    again = sf.load(tmp_path / "bert")
    with torch.no_grad():
        assert torch.equal(again(data.test.x).logits, tuned(data.test.x).logits)

"""Structured pruning of transformers: attention heads go as units (head count and head size stay
consistent), MLP widths shrink, the pruned model reloads bit-exactly: BERT through Torch-Pruning,
GPT-2's Conv1D blocks directly; ``nn.MultiheadAttention`` models reload."""

import re

import numpy as np
import pytest
import torch

import slimfuse as sf

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


def test_embeddings_true_narrows_the_residual_stream_and_reloads_bit_exactly(tmp_path):
    model, data = bert(), token_splits()
    pruned = sf.prune(model, channels=0.25, data=data, epochs=0, embeddings=True, validate=False)
    emb, layer = pruned.bert.embeddings, pruned.bert.encoder.layer[0]
    assert emb.word_embeddings.embedding_dim == emb.position_embeddings.embedding_dim == 12
    assert emb.LayerNorm.normalized_shape == (12,) and layer.output.LayerNorm.normalized_shape == (12,)
    assert layer.attention.self.query.in_features == 12 and layer.output.dense.out_features == 12
    assert layer.attention.self.num_attention_heads == 3 and layer.attention.self.attention_head_size == 4
    assert pruned.bert.pooler.dense.out_features == pruned.classifier.in_features == 12
    assert pruned.config.hidden_size == 16  # the config is the base; the structure is recorded beside it
    assert sf.lineage_of(pruned)[-1]["params"]["embeddings"] is True
    sf.save(pruned, tmp_path / "p")
    again = sf.load(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(again(data.test.x).logits, pruned(data.test.x).logits)
    default = sf.prune(model, channels=0.25, data=data, epochs=0, validate=False)
    assert default.bert.embeddings.word_embeddings.embedding_dim == 16  # by default the stream stays whole


def test_embeddings_true_is_refused_where_it_does_not_apply(digits_mlp, digits):
    with pytest.raises(sf.ConfigError, match="'embeddings' apply to structured pruning"):
        sf.prune(bert(), sparsity=0.5, embeddings=True, data=token_splits(), epochs=0)
    with pytest.raises(sf.ConfigError, match="narrows a transformers model's embedding dimension"):
        sf.prune(digits_mlp, channels=0.25, embeddings=True, data=digits, epochs=0)
    with pytest.raises(sf.ConfigError, match="not supported for GPT-2-family"):
        sf.prune(gpt2_classifier(), channels=0.25, embeddings=True, data=token_splits(), epochs=0)


def gpt2_classifier():
    torch.manual_seed(0)
    return T.GPT2ForSequenceClassification(T.GPT2Config(vocab_size=60, n_positions=16, n_embd=16, n_layer=2, n_head=4,
                                                        num_labels=3, pad_token_id=0, bos_token_id=0,
                                                        eos_token_id=0)).eval()


def _kept_columns(original, pruned, width):
    """Which original blocks of ``width`` columns of a Conv1D weight (``(in, out)``) a pruned one kept."""
    w0, w1 = original.detach(), pruned.detach()
    return [next(h for h in range(w0.shape[1] // width) if torch.equal(w0[:, h * width:(h + 1) * width],
                                                                       w1[:, j * width:(j + 1) * width]))
            for j in range(w1.shape[1] // width)]


def test_gpt2_heads_and_mlp_widths_are_removed_as_units_and_the_rest_computes_as_before():
    model, data = gpt2_classifier(), token_splits()
    pruned = sf.prune(model, channels=0.5, data=data, epochs=0, validate=False)  # random weights: no gate
    reference = gpt2_classifier()  # the original with the removed heads and hidden units silenced
    d = model.transformer.h[0].attn.head_dim
    for b0, b1, ref in zip(model.transformer.h, pruned.transformer.h, reference.transformer.h):
        assert (b1.attn.num_heads, b1.attn.head_dim, b1.attn.split_size) == (2, d, 2 * d)
        assert tuple(b1.attn.c_attn.weight.shape) == (16, 3 * 2 * d) and b1.attn.c_attn.nf == 6 * d
        assert tuple(b1.attn.c_proj.weight.shape) == (2 * d, 16) and b1.attn.c_proj.nx == 2 * d
        split = b0.attn.split_size
        kept = [_kept_columns(b0.attn.c_attn.weight[:, k * split:(k + 1) * split],
                              b1.attn.c_attn.weight[:, k * 2 * d:(k + 1) * 2 * d], d) for k in range(3)]
        assert kept[0] == kept[1] == kept[2]  # query, key and value of the same heads
        units = _kept_columns(b0.mlp.c_fc.weight, b1.mlp.c_fc.weight, 1)
        assert len(units) == b1.mlp.c_fc.nf == b1.mlp.c_proj.nx == 32
        with torch.no_grad():
            for h in set(range(4)) - set(kept[0]):
                ref.attn.c_proj.weight[h * d:(h + 1) * d] = 0
            for u in set(range(64)) - set(units):
                ref.mlp.c_proj.weight[u] = 0
    assert pruned.transformer.wte.embedding_dim == 16 and pruned.score.in_features == 16  # the stream stays whole
    with torch.no_grad():
        got, want = pruned(data.test.x).logits, reference(data.test.x).logits
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_pruned_gpt2_records_its_structure_and_reloads_bit_exactly(tmp_path):
    model, data = gpt2_classifier(), token_splits()
    pruned = sf.prune(model, channels=0.25, data=data, epochs=0, validate=False)
    attrs = sf.spec_of(pruned)["args"]["attrs"]
    assert attrs["transformer.h.0.attn"] == {"num_heads": 3, "split_size": 12}
    assert attrs["transformer.h.1.mlp.c_fc"] == {"nf": 48}
    sf.save(pruned, tmp_path / "g")
    again = sf.load(tmp_path / "g")
    assert [b.attn.num_heads for b in again.transformer.h] == [3, 3] and again.config.n_head == 4
    with torch.no_grad():
        assert torch.equal(again(data.test.x).logits, pruned(data.test.x).logits)


@pytest.mark.parametrize("scope, importance", [("global", "l2"), ("layer", "taylor"), ("global", "taylor")])
def test_gpt2_pruning_in_steps_keeps_every_block_consistent(scope, importance):
    model, data = gpt2_classifier(), token_splits()
    pruned = sf.prune(model, channels=0.75, data=data, epochs=2, steps=3, scope=scope, importance=importance,
                      round_to=4, validate=False)
    for b in pruned.transformer.h:
        assert 1 <= b.attn.num_heads < 4 and b.attn.split_size == b.attn.num_heads * b.attn.head_dim
        assert b.attn.c_attn.nf == 3 * b.attn.split_size == b.attn.c_attn.weight.shape[1]
        assert b.mlp.c_fc.nf == b.mlp.c_proj.nx and b.mlp.c_fc.nf % 4 == 0 and 4 <= b.mlp.c_fc.nf < 64
    heads = sum(b.attn.num_heads for b in pruned.transformer.h)
    if scope == "layer":
        assert heads == 2  # 75% of each block's 4 heads, one left in each
    with torch.no_grad():
        assert pruned(data.test.x).logits.shape == (len(data.test), 3)


def test_excluded_gpt2_attention_keeps_its_heads_and_the_mlps_shrink():
    model = gpt2_classifier()
    exclude = ["score", "transformer.h.0.attn", "transformer.h.1.attn.c_attn"]
    pruned = sf.prune(model, channels=0.25, data=token_splits(), epochs=0, exclude=exclude, validate=False)
    assert [b.attn.num_heads for b in pruned.transformer.h] == [4, 4]
    assert [b.mlp.c_fc.nf for b in pruned.transformer.h] == [48, 48]


def test_a_gpt2_teacher_gets_a_narrower_gpt2_student(tmp_path):
    teacher, data = gpt2_classifier(), token_splits()
    student = sf.zoo.student(teacher, width=0.5, example_inputs=data.train.x[:2])
    assert type(student) is type(teacher)
    assert [b.attn.num_heads for b in student.transformer.h] == [2, 2]
    assert [b.mlp.c_fc.nf for b in student.transformer.h] == [32, 32]
    w0, w1 = teacher.transformer.h[0].mlp.c_proj.weight, student.transformer.h[0].mlp.c_proj.weight
    assert not torch.equal(w1, w0[:32])  # re-initialised, not copied
    out = sf.distill(teacher, student, data, epochs=1, transfer="train", validate=False)
    sf.save(out, tmp_path / "s")
    again = sf.load(tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(again(data.test.x).logits, out(data.test.x).logits)


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
    # the embedding dimension too (32 -> 24): 31,976 -> 20,720 parameters here
    narrow = sf.prune(model, channels=0.25, data=data, epochs=2, lr=1e-3, embeddings=True)
    assert narrow.bert.embeddings.word_embeddings.embedding_dim == 24
    narrow_acc = sf.evaluate(narrow, data.test)["accuracy"]
    assert narrow_acc >= base - 0.01, (base, narrow_acc)


@pytest.mark.slow
def test_head_pruned_gpt2_keeps_its_accuracy_on_the_sentence_topics(tmp_path):
    data, vocab = _sentence_topics()
    torch.manual_seed(0)
    model = T.GPT2ForSequenceClassification(T.GPT2Config(
        vocab_size=vocab, n_positions=data.task.input_shape[0], n_embd=32, n_layer=2, n_head=4,
        num_labels=data.task.num_classes, pad_token_id=0, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0))
    model = sf.fit(model, data, epochs=4, lr=2e-3, batch_size=32)
    base = sf.evaluate(model, data.test)["accuracy"]
    assert base > 0.8, base
    pruned = sf.prune(model, channels=0.25, data=data, epochs=0)
    assert [b.attn.num_heads for b in pruned.transformer.h] == [3, 3]
    assert sf.evaluate(pruned, data.test)["accuracy"] >= base - 0.05
    tuned = sf.prune(model, channels=0.25, data=data, epochs=2, lr=1e-3)
    assert sf.evaluate(tuned, data.test)["accuracy"] >= base - 0.01
    sf.save(tuned, tmp_path / "gpt2")
    with torch.no_grad():
        assert torch.equal(sf.load(tmp_path / "gpt2")(data.test.x).logits, tuned(data.test.x).logits)

"""Data in the forms users have (``data/feed.py``) and models of any calling convention
(``models/calling.py``): each adapter gives the verbs what the equivalent in-memory Split gives them,
and bad batches are one clear DataError."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import slimfuse as sf
from slimfuse.data import Split, Splits, Task
from slimfuse.data.feed import feed, split_batch
from slimfuse.errors import ConfigError, DataError
from slimfuse.train import evaluate, fit, predict


def blobs(n=300, seed=0, features=6):
    """Two Gaussian classes, learnable by a linear model."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, features, generator=g) + (2 * y[:, None] - 1) * 1.0
    return x, y


class Pairs(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class TwoInputs(nn.Module):
    """forward(a, b): a model with several positional inputs that returns (logits, hidden)."""

    def __init__(self):
        super().__init__()
        self.fa, self.fb, self.out = nn.Linear(3, 8), nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, a, b):
        h = torch.relu(self.fa(a) + self.fb(b))
        return self.out(h), h


class KeywordInputs(nn.Module):
    """forward(*, a, b) -> {"logits": ..., "hidden": ...}, as a Hugging Face model is called."""

    def __init__(self):
        super().__init__()
        self.net = TwoInputs()

    def forward(self, *, a, b):
        logits, h = self.net(a, b)
        return {"logits": logits, "hidden": h}


def mlp():
    torch.manual_seed(0)
    return sf.zoo.mlp(6, [16], 2)


def test_dataset_adapter_reads_what_the_split_holds():
    x, y = blobs()
    batches = feed(Pairs(x, y), batch_size=64)
    xs, ys = zip(*batches)
    assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)
    assert len(batches) == 5
    model = mlp()
    assert evaluate(model, Pairs(x, y)) == evaluate(model, Split(x, y))
    assert torch.equal(predict(model, Pairs(x, y)), predict(model, x))


def test_numpy_arrays_adapter():
    x, y = blobs()
    xn, yn = x.double().numpy(), y.numpy()
    batches = feed((xn, yn), batch_size=100)
    bx, by = next(iter(batches))
    assert bx.dtype == torch.float32 and by.dtype == torch.int64 and len(bx) == 100
    model = mlp()
    assert evaluate(model, (xn, yn)) == pytest.approx(evaluate(model, Split(x, y)))


def test_tuple_batches_with_several_inputs_train_and_predict():
    x, y = blobs(features=3)
    g = torch.Generator().manual_seed(1)
    b = torch.randn(len(y), 3, generator=g)  # a second, uninformative input
    batches = [(x[i:i + 32], b[i:i + 32], y[i:i + 32]) for i in range(0, len(y), 32)]
    torch.manual_seed(0)
    model = TwoInputs()
    logits = predict(model, batches)
    # the first element of the returned tuple (batches of 32 against one call: kernels may round differently)
    assert torch.allclose(logits, model(x, b)[0].detach(), atol=1e-6)
    before = evaluate(model, batches)["accuracy"]
    trained = fit(model, batches, epochs=15, lr=1e-2, progress=False)
    after = evaluate(trained, batches)["accuracy"]
    assert after >= 0.8 and after > before + 0.1


def test_dict_batches_call_the_model_with_keywords():
    x, y = blobs(features=3)
    b = torch.zeros(len(y), 3)
    loader = DataLoader([{"a": x[i], "b": b[i], "labels": y[i]} for i in range(len(y))], batch_size=50)
    torch.manual_seed(0)
    model = KeywordInputs()
    expected = model(a=x, b=b)["logits"].detach()
    assert torch.allclose(predict(model, loader), expected, atol=1e-6)
    res = evaluate(model, loader)
    assert res["accuracy"] == pytest.approx((expected.argmax(1) == y).float().mean().item())
    trained = fit(model, loader, epochs=10, lr=1e-2, progress=False, val=loader)
    assert evaluate(trained, loader)["accuracy"] >= max(0.8, res["accuracy"])


def test_shuffling_dataloader_training_is_seeded():
    x, y = blobs()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    a = fit(mlp(), loader, epochs=3, seed=5, progress=False)
    b = fit(mlp(), loader, epochs=3, seed=5, progress=False)
    c = fit(mlp(), loader, epochs=3, seed=6, progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    base = evaluate(mlp(), (x, y))["accuracy"]
    assert evaluate(a, (x, y))["accuracy"] >= max(0.8, base)


def test_head_reads_only_the_first_samples():
    x, y = blobs(n=100)
    read = []

    class Counting:
        def __iter__(self):
            for i in range(0, 100, 8):
                read.append(i)
                yield x[i:i + 8], y[i:i + 8]

    head = feed(Counting()).head(20)
    assert len(head) == 20 and torch.equal(head.x, x[:20]) and torch.equal(head.y, y[:20])
    assert len(read) == 3


def test_generator_can_be_read_once():
    x, y = blobs(n=64)
    gen = ((x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16))
    batches = feed(gen)
    assert sum(len(b[1]) for b in batches) == 64
    with pytest.raises(DataError, match="read only once"):
        list(batches)


def test_quantize_calibration_from_a_loader_equals_the_split():
    x, y = blobs()
    torch.manual_seed(0)
    model = fit(mlp(), Splits(Split(x, y), Split(x[:0], y[:0]), Split(x[:0], y[:0]),
                              Task("blobs", "classification", 2, (6,))), epochs=3, progress=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    a = sf.quantize(model, "int8-static", calib=loader, backend="torch")
    b = sf.quantize(model, "int8-static", calib=Split(x, y), backend="torch")
    assert torch.equal(a(x), b(x))
    assert sf.lineage_of(a)[-1]["validation"]["ran"]


@pytest.mark.parametrize("scheme", ["qat", "codebook:4"])
def test_schemes_that_fine_tune_train_on_a_whole_loader(scheme, digits):
    torch.manual_seed(0)
    model = fit(sf.zoo.for_task("mlp", digits.task, hidden=[32]), digits, epochs=4, progress=False)
    base = sf.evaluate(model, digits.test)["accuracy"]
    loader = DataLoader(TensorDataset(digits.train.x, digits.train.y), batch_size=64)
    options = {"epochs": 2, "lr": 1e-3}
    streamed = sf.quantize(model, scheme, calib=loader, **options)
    in_memory = sf.quantize(model, scheme, calib=digits, **options)
    got, want = sf.evaluate(streamed, digits.test)["accuracy"], sf.evaluate(in_memory, digits.test)["accuracy"]
    assert got >= base - 0.03 and abs(got - want) <= 0.03, (base, got, want)
    assert sf.lineage_of(streamed)[-1]["params"]["finetune_epochs" if scheme != "qat" else "epochs"] == 2
    with pytest.raises(DataError, match="no labels|label"):  # fine-tuning needs labelled batches
        sf.quantize(model, scheme, calib=DataLoader(TensorDataset(digits.train.x), batch_size=64), **options)


def test_export_checks_parity_on_a_loaders_first_samples(digits, digits_mlp):
    from slimfuse.export import to_onnx

    loader = DataLoader(TensorDataset(digits.val.x, digits.val.y), batch_size=32)
    streamed, in_memory = to_onnx(digits_mlp, sample=loader), to_onnx(digits_mlp, sample=digits.val)
    assert torch.equal(streamed(digits.test.x), in_memory(digits.test.x))
    parity = sf.lineage_of(streamed)[-1]["params"]["parity"]
    assert parity == sf.lineage_of(in_memory)[-1]["params"]["parity"]  # the same 256 samples checked
    with pytest.raises(sf.ConfigError, match="one input tensor"):
        to_onnx(digits_mlp, sample=DataLoader([{"a": x, "b": x} for x in digits.val.x[:8]], batch_size=4))


def test_ensemble_validation_data_from_a_loader_equals_the_split():
    x, y = blobs(n=240)
    task = Task("blobs", "classification", 2, (6,))
    empty = Split(x[:0], y[:0])
    members = []
    for seed, h in ((0, 4), (1, 16)):
        torch.manual_seed(seed)
        members.append(fit(sf.zoo.mlp(6, [h], 2), Splits(Split(x[:120], y[:120]), empty, empty, task), epochs=2,
                           progress=False, seed=seed))
    val = (x[120:], y[120:])
    loader = DataLoader(TensorDataset(*val), batch_size=40)
    a = sf.ensemble(members, "weighted", data=loader, fallback=False)
    b = sf.ensemble(members, "weighted", data=Splits(empty, Split(*val), empty, task), fallback=False)
    assert torch.equal(a.weights, b.weights)
    assert torch.equal(a(x), b(x))
    c = sf.ensemble(members, "weighted", data={"val": loader, "test": (x[:60], y[:60])}, fallback=False)
    assert torch.equal(c.weights, b.weights)


def test_output_selector_is_used_and_carried_to_derived_models():
    x, y = blobs(features=3)

    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden, self.fc = nn.Linear(3, 8), nn.Linear(8, 2)

        def forward(self, a):
            return {"scores": self.fc(torch.relu(self.hidden(a))), "other": a}

    torch.manual_seed(0)
    model = Scores()
    with pytest.raises(DataError, match="without 'logits'"):
        predict(model, x)
    sf.set_output(model, "scores")
    assert torch.equal(predict(model, x), model(x)["scores"].detach())
    pruned = sf.prune(model, sparsity=0.5, schedule="oneshot", data=(x, y), epochs=0)
    assert torch.equal(predict(pruned, x), pruned(x)["scores"].detach())


@pytest.mark.parametrize("batch, problem", [
    ((torch.zeros(8, 3), torch.zeros(7, dtype=torch.long)), "8 inputs but 7 labels"),
    ((torch.tensor([[0.0, float("nan")]] * 4), torch.zeros(4, dtype=torch.long)), "NaN/inf values .*sample 0"),
    ({"input_ids": torch.zeros(4, 5, dtype=torch.long)}, "no labels: a dict batch needs one of the keys"),
    ({"input_ids": torch.zeros(4, 5, dtype=torch.long), "attention_mask": torch.ones(3, 5), "labels": torch.zeros(4)},
     "'attention_mask' has 3 samples but the batch's first input has 4"),
    ({"x": torch.zeros(4, 2), "labels": torch.zeros(4, 2, dtype=torch.long)}, "one integer per sample"),
    ((torch.zeros(4, 2), torch.tensor([0, 1, -1, 0])), "labels must be >= 0"),
    ((torch.zeros(4, 2), torch.tensor([0.0, 0.5, 1.0, 1.0])), "non-integer"),
    ((torch.zeros(4, 2),), "no labels: a tuple batch"),
    ("some text", "a batch must be"),
])
def test_bad_batches_are_one_clear_data_error(batch, problem):
    with pytest.raises(DataError, match=problem):
        split_batch(batch, where="batch 0")
    with pytest.raises(DataError, match="batch 0: .*" + problem):
        evaluate(mlp(), [batch])


def test_bad_data_and_options_are_clear_errors():
    x, y = blobs()
    with pytest.raises(DataError, match="cannot read data of type int"):
        feed(3)
    with pytest.raises(DataError, match="cannot take inputs"):  # wrong feature count
        fit(mlp(), [(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))], epochs=1, progress=False)
    with pytest.raises(ConfigError, match="checkpoint= needs in-memory data"):
        fit(mlp(), [(x, y)], epochs=1, checkpoint="/nonexistent/ckpt", progress=False)
    with pytest.raises(ConfigError, match="patience= .* pass val="):
        fit(mlp(), [(x, y)], epochs=2, patience=1, progress=False)


def test_channel_pruning_traces_a_keyword_input_model_on_the_loaders_inputs():
    x, y = blobs(features=3)
    b = torch.zeros(len(y), 3)
    loader = DataLoader([{"a": x[i], "b": b[i], "labels": y[i]} for i in range(len(y))], batch_size=50)
    torch.manual_seed(0)
    trained = fit(KeywordInputs(), loader, epochs=10, lr=1e-2, progress=False)
    acc = evaluate(trained, loader)["accuracy"]
    small = sf.prune(trained, channels=0.5, data=loader, epochs=2, progress=False)
    assert small.net.fa.out_features == small.net.fb.out_features == 4 and small.net.out.in_features == 4
    assert evaluate(small, loader)["accuracy"] >= acc - 0.05
    assert sf.lineage_of(small)[-1]["validation"]["agreement"] >= 0.5


def test_arrays_train_exactly_like_the_same_splits(tmp_path):
    x, y = blobs()
    task = Task("blobs", "classification", 2, (6,))
    splits = Splits(Split(x[:200], y[:200]), Split(x[200:], y[200:]), Split(x[:0], y[:0]), task)
    a = fit(mlp(), splits, epochs=3, seed=2, progress=False)
    b = fit(mlp(), (x[:200].double().numpy(), y[:200].numpy()), epochs=3, seed=2, progress=False,
            val=(x[200:], y[200:]), checkpoint=tmp_path / "ckpt")  # in memory: seeded shuffles, checkpoints
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _two_blob_models():
    """Two MLPs trained independently on blobs, and the data as loaders and as the same Splits."""
    x, y = blobs(n=360)
    task = Task("blobs", "classification", 2, (6,))
    parts = {"train": (x[:200], y[:200]), "val": (x[200:280], y[200:280]), "test": (x[280:], y[280:])}
    splits = Splits(*(Split(*parts[k]) for k in ("train", "val", "test")), task)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(fit(sf.zoo.mlp(6, [16], 2), splits, epochs=3, progress=False, seed=seed))
    loaders = {k: DataLoader(TensorDataset(*v), batch_size=32, shuffle=False) for k, v in parts.items()}
    return models, loaders, splits


def test_merge_takes_a_dict_of_loaders_and_equals_the_same_splits():
    models, loaders, splits = _two_blob_models()
    a = sf.merge(models, "rebasin", loaders)
    b = sf.merge(models, "rebasin", splits)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    # chosen on the same val, verified on the same test (the latency beside it is measured anew)
    same = {k: v for k, v in a.verification.items() if k != "latency"}
    assert same == {k: v for k, v in b.verification.items() if k != "latency"}
    # without training data, activation statistics come from the validation inputs
    c = sf.merge(models, "rebasin", {"val": loaders["val"], "test": loaders["test"]})
    d = sf.merge(models, "rebasin", Splits(splits.val, splits.val, splits.test, splits.task))
    assert all(torch.equal(p, q) for p, q in zip(c.state_dict().values(), d.state_dict().values()))
    with pytest.warns(UserWarning, match="do not share a loss basin"):  # BatchNorm-free: ranked on val alone
        e = sf.merge(models, "greedy", {"val": loaders["val"], "test": loaders["test"]})
    with pytest.warns(UserWarning, match="do not share a loss basin"):
        f = sf.merge(models, "greedy", Splits(splits.val, splits.val, splits.test, splits.task))
    assert all(torch.equal(p, q) for p, q in zip(e.state_dict().values(), f.state_dict().values()))


def test_optimize_takes_a_dict_of_loaders_and_equals_the_same_splits():
    from slimfuse.compress.prune import prune
    from slimfuse.export import to_onnx
    from slimfuse.search import Move

    models, loaders, splits = _two_blob_models()
    moves = [Move("prune 0.5", lambda m, seed: prune(m, 0.5, data=splits, epochs=1, seed=seed)),
             Move("prune 0.9 oneshot", lambda m, seed: prune(m, 0.9, schedule="oneshot")),
             Move("onnx fp32", lambda m: to_onnx(m, sample=splits.val), finishing=True)]
    a = sf.optimize(models[0], loaders, max_drop=5.0, objective="bytes", moves=moves, seconds=0.02, ensemble=False)
    b = sf.optimize(models[0], splits, max_drop=5.0, objective="bytes", moves=moves, seconds=0.02, ensemble=False)
    assert [c.name for c in a.candidates] == [c.name for c in b.candidates]
    assert not any(c.error for c in a.candidates), [c.error for c in a.candidates]

    def chosen(r):  # what the search chose on and reported: validation and test accuracy, the drop
        return [(c.row.get("val_accuracy"), c.row.get("accuracy"), c.drop) for c in r.candidates]
    assert chosen(a) == chosen(b) and len(a.candidates) >= 3


def test_verbs_that_choose_and_verify_name_the_missing_or_bad_split():
    models, loaders, splits = _two_blob_models()
    with pytest.raises(DataError, match="no 'test' data in the dict .*'val', 'test'"):
        sf.merge(models, "rebasin", {"val": loaders["val"]})
    with pytest.raises(DataError, match="no 'train' data"):
        sf.merge(models, "rebasin", {"val": loaders["val"], "test": loaders["test"]}, fallback="distill")
    with pytest.raises(DataError, match="pass slimfuse Splits or a dict of 'val', 'test' data .*got DataLoader"):
        sf.merge(models, "rebasin", loaders["val"])
    with pytest.raises(DataError, match="no 'train' data"):
        sf.optimize(models[0], {"val": loaders["val"], "test": loaders["test"]})
    x, y = splits.test.x, splits.test.y.clone()
    y[3] = 5
    with pytest.raises(DataError, match="'test'.*labels go up to 5 but the model predicts 2 classes"):
        sf.merge(models, "rebasin", {"val": loaders["val"], "test": (x, y)})
    with pytest.raises(DataError, match=r"the 'test' inputs \(dict\[a\]\) differ in form from the others \(tensor\)"):
        sf.merge(models, "rebasin", {"val": loaders["val"], "test": ({"a": x}, splits.test.y)})
    with pytest.raises(DataError, match="'test'.*NaN"):
        sf.merge(models, "rebasin", {"val": loaders["val"], "test": (torch.full_like(x, float("nan")), splits.test.y)})

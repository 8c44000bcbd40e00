import pytest
import torch

import slimfuse as sf
from slimfuse import ConfigError, DataError


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_lenet_300_100_reaches_the_bar_on_mnist5k(mnist):
    torch.manual_seed(0)
    model = sf.fit(sf.zoo.mlp(784, [300, 100], 10), mnist, epochs=20)
    assert sf.evaluate(model, mnist.test)["accuracy"] >= 0.92


def test_fit_returns_a_new_model_and_leaves_the_input_alone(digits):
    torch.manual_seed(0)
    model = sf.zoo.for_task("mlp", digits.task, hidden=[32])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = sf.fit(model, digits, epochs=2)
    assert trained is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not _same_weights(model, trained)
    assert sf.lineage_of(trained)[-1]["op"] == "train"


def test_fit_is_deterministic_for_a_seed(digits):
    torch.manual_seed(0)
    model = sf.zoo.for_task("cnn", digits.task, widths=[8], hidden=16)
    a = sf.fit(model, digits, epochs=2, seed=3)
    b = sf.fit(model, digits, epochs=2, seed=3)
    c = sf.fit(model, digits, epochs=2, seed=4)
    assert _same_weights(a, b) and not _same_weights(a, c)


def test_early_stopping_keeps_the_best_epoch(digits):
    torch.manual_seed(0)
    history = []
    model = sf.fit(sf.zoo.for_task("mlp", digits.task, hidden=[32]), digits, epochs=30, lr=0.05,
                   optimizer="sgd", patience=2, history=history)
    assert len(history) < 30
    best = max(r["accuracy"] for r in history)
    assert sf.evaluate(model, digits.val)["accuracy"] == pytest.approx(best)


def test_extra_loss_hook_is_used(digits):
    torch.manual_seed(0)
    model = sf.zoo.for_task("mlp", digits.task, hidden=[16])
    # A loss that only pushes logits toward zero: the result must not learn the task.
    flat = sf.fit(model, digits, epochs=3, loss=lambda logits, batch: logits.pow(2).mean())
    assert sf.predict(flat, digits.test).abs().max() < 0.5


def test_resume_from_checkpoint_reaches_the_same_weights(digits, tmp_path, monkeypatch):
    import slimfuse.train as train_mod

    torch.manual_seed(0)
    model = sf.zoo.for_task("mlp", digits.task, hidden=[32], dropout=0.2)
    kwargs = dict(epochs=5, schedule="cosine", patience=10)
    reference = sf.fit(model, digits, **kwargs)

    calls = {"n": 0}
    real_evaluate = train_mod.evaluate

    def crash_on_third_epoch(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process dies during epoch 3
        return real_evaluate(*args, **kw)

    monkeypatch.setattr(train_mod, "evaluate", crash_on_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        sf.fit(model, digits, checkpoint=tmp_path / "ckpt", **kwargs)
    monkeypatch.setattr(train_mod, "evaluate", real_evaluate)
    assert (tmp_path / "ckpt" / "state.safetensors").is_file()

    history = []
    resumed = sf.fit(model, digits, checkpoint=tmp_path / "ckpt", history=history, **kwargs)
    assert _same_weights(reference, resumed)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "ckpt").exists()


def test_checkpoint_of_another_run_is_ignored(digits, tmp_path):
    from slimfuse.checkpoint import Checkpoint

    torch.manual_seed(0)
    model = sf.zoo.for_task("mlp", digits.task, hidden=[16])
    stranger = sf.fit(model, digits, epochs=1, lr=0.01)
    opt = torch.optim.Adam(stranger.parameters())
    Checkpoint(tmp_path / "ck", "another run").save(
        epoch=1, model=stranger, opt=opt, sched=None, gen=torch.Generator(), best=(-1, None), since_best=0, history=[])
    plain = sf.fit(model, digits, epochs=2)
    with pytest.warns(UserWarning, match="other parameters"):
        again = sf.fit(model, digits, epochs=2, checkpoint=tmp_path / "ck")
    assert _same_weights(plain, again)


@pytest.mark.parametrize("kwargs,message", [
    ({"epochs": -1}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 10**9}, "field 'batch_size'"),
    ({"lr": 0}, "lr"),
    ({"optimizer": "lion"}, "field 'optimizer': unknown value 'lion'"),
    ({"schedule": "step"}, "field 'schedule': unknown value 'step'"),
    ({"patience": 0}, "patience"),
])
def test_bad_training_arguments(digits, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        sf.fit(sf.zoo.for_task("mlp", digits.task, hidden=[8]), digits, **kwargs)


def test_model_that_does_not_fit_the_data(digits, mnist):
    with pytest.raises(DataError, match="cannot take inputs of shape"):
        sf.fit(sf.zoo.mlp(784, [8], 10), digits, epochs=1)
    with pytest.raises(DataError, match="task has 10"):
        sf.fit(sf.zoo.mlp(64, [8], 3), digits, epochs=1)


def test_predict_outputs(digits_mlp, digits):
    logits = sf.predict(digits_mlp, digits.test)
    proba = sf.predict(digits_mlp, digits.test.x.numpy(), output="proba")
    labels = sf.predict(digits_mlp, digits.test, output="label")
    assert logits.shape == (len(digits.test), 10)
    assert torch.allclose(proba.sum(-1), torch.ones(len(digits.test)))
    assert torch.equal(labels, logits.argmax(-1))
    with pytest.raises(ConfigError):
        sf.predict(digits_mlp, digits.test, output="scores")


def test_zoo_rejects_bad_widths():
    with pytest.raises(ConfigError):
        sf.zoo.mlp(784, [0], 10)
    with pytest.raises(ConfigError):
        sf.zoo.lenet5(widths=[6, 16])
    with pytest.raises(ConfigError, match="at least 12x12"):
        sf.zoo.lenet5(image_size=8)

"""A user's own modules save and reload with one trust_factory=True; zoo.student narrows any prunable model."""

from __future__ import annotations

import pytest
import torch
from own_models import Forgetful, Plain, Recorded, Residual
from torch import nn

import slimfuse as sf
from slimfuse.errors import ArtifactError, ConfigError


def _roundtrip(model, tmp_path, x):
    sf.save(model, tmp_path / "a")
    with pytest.raises(ArtifactError, match="trust_factory=True"):
        sf.load(tmp_path / "a")
    back = sf.load(tmp_path / "a", trust_factory=True)
    assert type(back) is type(model)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), back(x))
    return back


def test_a_decorated_class_records_its_constructor_arguments(tmp_path):
    torch.manual_seed(0)
    model = Recorded(64, [24, 12], classes=5, act="tanh")
    assert sf.models.spec_of(model) == {"factory": "own_models:Recorded",
                                        "args": {"in_features": 64, "hidden": [24, 12], "classes": 5, "act": "tanh"}}
    _roundtrip(model, tmp_path, torch.randn(7, 64))


def test_a_plain_class_is_recorded_from_its_attributes_and_checked_by_a_rebuild(tmp_path):
    torch.manual_seed(0)
    model = Plain(64, width=20, classes=3)
    _roundtrip(model, tmp_path, torch.randn(5, 64))
    assert sf.read_card(tmp_path / "a")["spec"] == {
        "factory": "own_models:Plain", "args": {"in_features": 64, "width": 20, "classes": 3}}
    # bias=False is kept nowhere: the default would rebuild a bias the model lacks, so save refuses
    with pytest.raises(ArtifactError, match="does not rebuild this model's tensors.*rebuildable"):
        sf.save(Plain(64, bias=False), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_save_names_what_it_cannot_record(tmp_path):
    with pytest.raises(ArtifactError, match="which 'in_features'.*@slimfuse.zoo.rebuildable"):
        sf.save(Forgetful(8, 4), tmp_path / "a")
    with pytest.raises(ArtifactError, match=r"\*args"):
        sf.save(nn.Sequential(nn.Linear(3, 2)), tmp_path / "b")

    class Local(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

    with pytest.raises(ArtifactError, match="not defined at the top level"):
        sf.save(Local(), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_torch_layers_save_too(tmp_path):
    _roundtrip(nn.Linear(6, 3), tmp_path, torch.randn(4, 6))


@pytest.mark.parametrize("width", [0.5, 0.25])
def test_student_of_a_user_model_is_narrower_untrained_and_reloads(tmp_path, width):
    torch.manual_seed(0)
    teacher = Residual(channels=16, classes=10)
    with torch.no_grad():  # a "trained" teacher: the student must not inherit its weights
        teacher.head.weight.fill_(0.5)
    x = torch.randn(3, 1, 12, 12)
    small = sf.zoo.student(teacher, width=width, example_inputs=x)
    kept = round(16 * width)
    assert small.conv.out_channels == small.stem.out_channels == small.bn.num_features == kept
    assert small.head.out_features == 10 and small(x).shape == (3, 10)
    assert not torch.all(small.head.weight == 0.5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in teacher.parameters())
    assert teacher.conv.out_channels == 16  # the teacher is untouched
    back = _roundtrip(small, tmp_path, x)
    assert back.conv.out_channels == kept


def test_student_of_a_user_model_trains_like_any_model(digits):
    torch.manual_seed(0)
    teacher = sf.fit(Plain(64, width=64), digits, epochs=2, progress=False)
    small = sf.zoo.student(teacher, width=0.25, example_inputs=digits.train.x[:2])
    assert small.fc.out_features == 16
    trained = sf.evaluate(sf.fit(small, digits, epochs=8, progress=False), digits.test)["accuracy"]
    baseline = sf.evaluate(sf.fit(Plain(64, width=16), digits, epochs=8, progress=False), digits.test)["accuracy"]
    assert trained >= baseline - 0.05, (trained, baseline)  # as good as the same narrow net built by hand


def test_student_errors_are_clear():
    with pytest.raises(ConfigError, match="example_inputs="):
        sf.zoo.student(Residual())
    with pytest.raises(ConfigError, match="depth= applies"):
        sf.zoo.student(Residual(), width=0.5, depth=1, example_inputs=torch.zeros(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="no neurons or channels"):
        sf.zoo.student(nn.Linear(4, 2), width=0.5, example_inputs=torch.zeros(2, 4))

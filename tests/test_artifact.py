import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import slimfuse as sf
from slimfuse import ArtifactError


def _card(path):
    return json.loads((path / "card.json").read_text())


def _write_card(path, card):
    (path / "card.json").write_text(json.dumps(card))


@pytest.mark.parametrize("arch,kwargs", [("mlp", {"hidden": [32, 16]}), ("lenet5", {}), ("cnn", {"widths": [8, 8]})])
def test_save_load_is_bit_exact(mnist, tmp_path, arch, kwargs):
    torch.manual_seed(0)
    small = sf.Splits(mnist.train.subset(range(256)), mnist.val.subset(range(64)), mnist.test, mnist.task)
    model = sf.fit(sf.zoo.for_task(arch, mnist.task, **kwargs), small, epochs=1)
    sf.save(model, tmp_path / "a", metrics={"test": 0.5})
    again = sf.load(tmp_path / "a")
    assert torch.equal(sf.predict(model, mnist.test), sf.predict(again, mnist.test))
    assert sf.spec_of(again) == sf.spec_of(model)
    assert sf.lineage_of(again) == sf.lineage_of(model)
    card = sf.read_card(tmp_path / "a")
    assert card["metrics"] == {"test": 0.5} and card["format_version"] == 1


def test_save_replaces_an_artifact_but_never_a_user_folder(digits_mlp, tmp_path):
    sf.save(digits_mlp, tmp_path / "a")
    sf.save(digits_mlp, tmp_path / "a")  # replacing an artifact is fine
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="not a slimfuse artifact"):
        sf.save(digits_mlp, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "mine"]


def test_failed_save_leaves_nothing(digits_mlp, tmp_path, monkeypatch):
    import slimfuse.models.artifact as art

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(art, "_write_file", broken)
    with pytest.raises(OSError):
        sf.save(digits_mlp, tmp_path / "out" / "a")
    assert list((tmp_path / "out").iterdir()) == []


def test_module_whose_class_cannot_be_imported_cannot_be_saved(tmp_path):
    class Local(torch.nn.Module):  # a loader could not import it
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

    with pytest.raises(ArtifactError, match="not defined at the top level of its module"):
        sf.save(Local(), tmp_path / "a")
    assert not (tmp_path / "a").exists()


class _RunsCommand:
    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    evil = _RunsCommand()
    evil.target = tmp_path / "pwned"
    (tmp_path / "model.pt").write_bytes(pickle.dumps(evil))
    with pytest.raises(ArtifactError, match="pickle"):
        sf.load(tmp_path / "model.pt")
    # The same bytes dressed up as an artifact folder's weights.
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(pickle.dumps(evil))
    _write_card(folder, {"format": "slimfuse-artifact", "format_version": 1, "spec": {"arch": "mlp", "args": {}},
                         "lineage": [], "metrics": {}, "storage": {"codec": "dense"}, "weights_sha256": "0"})
    with pytest.raises(ArtifactError):
        sf.load(folder)
    assert not evil.target.exists()


def test_pickle_bomb_and_torch_save_files_are_refused(tmp_path):
    bomb = b"\x80\x04" + b"(" * 100000 + b"."  # nesting that blows up an unpickler
    (tmp_path / "bomb.pkl").write_bytes(bomb)
    with pytest.raises(ArtifactError, match="pickle"):
        sf.load(tmp_path / "bomb.pkl")
    torch.save({"w": torch.zeros(2)}, tmp_path / "m.pt")
    with pytest.raises(ArtifactError, match="zip"):
        sf.load(tmp_path / "m.pt")


@pytest.mark.parametrize("damage", ["truncate", "bitflip-header", "bitflip-data", "empty", "missing"])
def test_damaged_weights_are_refused(digits_mlp, digits, tmp_path, damage):
    path = sf.save(digits_mlp, tmp_path / "a")
    weights = path / "weights.safetensors"
    blob = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(blob[: len(blob) // 2])
    elif damage == "bitflip-header":
        blob[20] ^= 0x10
        weights.write_bytes(blob)
    elif damage == "bitflip-data":
        blob[-100] ^= 0x01  # one bit of one weight: only the checksum can see it
        weights.write_bytes(blob)
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        weights.unlink()
    with pytest.raises(ArtifactError) as err:
        sf.load(path)
    assert "weights.safetensors" in str(err.value)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(format_version=2), "newer slimfuse"),
    (lambda c: c.update(format_version="1"), "format_version must be an integer"),
    (lambda c: c.update(format="something-else"), "not a slimfuse card"),
    (lambda c: c.update(spec="mlp"), "'spec' must be"),
    (lambda c: c.update(lineage="train"), "'lineage' must be"),
    (lambda c: c.update(metrics=[1]), "'metrics' must be"),
    (lambda c: c["spec"].update(arch="transformer-xl"), "unknown architecture"),
    (lambda c: c["spec"]["args"].update(hidden=[7]), "do not fit the architecture"),
    (lambda c: c["spec"]["args"].update(bogus=1), "cannot build"),
    (lambda c: c["storage"].update(codec="../../etc/passwd"), "unknown storage codec"),
])
def test_bad_cards_are_refused(digits_mlp, tmp_path, edit, message):
    path = sf.save(digits_mlp, tmp_path / "a")
    card = _card(path)
    edit(card)
    _write_card(path, card)
    with pytest.raises(ArtifactError, match=message):
        sf.load(path)


def test_card_that_is_not_json_or_absent(digits_mlp, tmp_path):
    path = sf.save(digits_mlp, tmp_path / "a")
    (path / "card.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        sf.load(path)
    (path / "card.json").unlink()
    with pytest.raises(ArtifactError, match="no card.json"):
        sf.load(path)
    with pytest.raises(ArtifactError, match="no such artifact"):
        sf.load(tmp_path / "nothing-here")


def test_user_factory_is_imported_only_when_trusted(digits, tmp_path):
    import factories

    model = sf.zoo.user_model("factories:two_branch", in_features=64, classes=10, width=8)
    trained = sf.fit(model, digits, epochs=1)
    path = sf.save(trained, tmp_path / "a")
    card = _card(path)
    card["spec"]["factory"] = "factories:evil"
    _write_card(path, card)
    with pytest.raises(ArtifactError, match="trust_factory=True"):
        sf.load(path)
    assert factories.MARKER == []
    card["spec"]["factory"] = "factories:two_branch"
    _write_card(path, card)
    again = sf.load(path, trust_factory=True)
    assert torch.equal(sf.predict(trained, digits.test), sf.predict(again, digits.test))


@pytest.mark.slow
def test_sigkill_during_save_never_leaves_half_an_artifact(tmp_path):
    """Kill a process that saves in a loop at random moments: the artifact is always whole."""
    script = textwrap.dedent(f"""
        import sys, torch, slimfuse as sf
        torch.manual_seed(0)
        model = sf.zoo.mlp(784, [1024, 1024], 10)   # ~12 MB of weights: saves take a while
        print("ready", flush=True)
        while True:
            sf.save(model, {str(tmp_path / "a")!r})
    """)
    reference = None
    for delay in (0.05, 0.13, 0.31, 0.47, 2.0):  # the last one lets a save finish
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (tmp_path / "a").exists():
            model = sf.load(tmp_path / "a")  # whole, checksum verified
            state = model.state_dict()
            reference = reference or state
            assert all(torch.equal(reference[k], state[k]) for k in state)
    assert reference is not None, "no save ever completed: the test proved nothing"
    visible = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert visible == ["a"]

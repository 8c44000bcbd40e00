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


# -- crafted cards: the schema refuses them before anything is built --------------------------------

def _nest(depth):
    spec = {"arch": "mlp", "args": {"in_features": 64, "hidden": [8], "classes": 10}}
    for _ in range(depth):
        spec = {"arch": "ensemble", "args": {"members": [spec], "method": "mean", "classes": 10}}
    return spec


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(lineage=[3]), r"field 'lineage.0' must be a valid dictionary"),
    (lambda c: c.update(lineage=[{"params": {}}]), r"field 'lineage.0.op' is missing"),
    (lambda c: c["storage"].update(codec=["dense"]), r"field 'storage.codec' must be a valid string"),
    (lambda c: c.update(task={"name": "d", "kind": "classification", "num_classes": 10, "input_shape": "64"}),
     r"field 'task.input_shape' must be a valid list"),
    (lambda c: c.update(task={"name": "d", "kind": "classification", "num_classes": "10", "input_shape": [64]}),
     r"field 'task.num_classes' must be a valid integer"),
    (lambda c: c.update(task={"name": "d", "kind": "classification", "num_classes": 10, "input_shape": [-64]}),
     r"field 'task.input_shape.0' must be greater than or equal to 0"),
    (lambda c: c.update(spec={"args": {}}), r"exactly one of 'arch' or 'factory'"),
    (lambda c: c.update(weights_sha256="abc"), r"field 'weights_sha256'"),
    (lambda c: c.update(spec=_nest(40)), r"implausible card \(nested more than 64 levels deep\)"),
    (lambda c: c["spec"]["args"].update(hidden=[-5]), r"widths must be positive"),
    (lambda c: c["spec"]["args"].update(hidden="8"), r"widths must be positive"),
    (lambda c: c.update(spec={"arch": "pruned", "args": {"base": c["spec"], "shapes": {}, "attrs": {"nope.fc": {}}}}),
     r"cannot build 'pruned'"),
    (lambda c: c.update(spec={"arch": "quantized",
                              "args": {"base": c["spec"], "scheme": "int8", "layers": {"fc1": {}}}}),
     r"cannot build 'quantized'|quantized"),
])
def test_crafted_cards_are_refused_naming_the_field(digits_mlp, tmp_path, edit, message):
    path = sf.save(digits_mlp, tmp_path / "a")
    card = _card(path)
    edit(card)
    _write_card(path, card)
    with pytest.raises(sf.SlimfuseError, match=message):
        sf.load(path)


def test_a_card_nested_100000_levels_is_refused(digits_mlp, tmp_path):
    path = sf.save(digits_mlp, tmp_path / "a")
    text = (path / "card.json").read_text()
    (path / "card.json").write_text(text[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ArtifactError, match="nested too deeply|nested more than"):
        sf.load(path)


# -- resource bombs: refused before the memory is allocated, peak memory measured --------------------

def _zstd_bomb(total: int) -> bytes:
    import zstandard

    frame = zstandard.ZstdCompressor(level=3).compress(b"\xff" * (100 << 20))
    return frame * (total // (100 << 20))


BOMBS = {
    # a card asking for a 10^9-wide hidden layer (and 10^7: 2.5 GB once initialized)
    "hidden-1e9": ("mlp", {"hidden": [10**9]}, "parameters is over the limit"),
    "hidden-1e7": ("mlp", {"hidden": [10**7]}, "tensors do not fit the architecture"),  # checked before allocating
    # pruned shapes asking for a 10^6 x 10^6 tensor
    "pruned-shape": ("pruned", None, "over the limit"),
    # a 2.9 GB sparse-zstd payload in a few KB, under a layout that claims a legitimate shape
    "sparse-payload": ("sparse", "payload", "decodes to more than"),
    # a sparse-zstd layout that declares a 10^5 x 10^5 tensor
    "sparse-shape": ("sparse", "shape", "over the limit"),
    # a codebook layout that declares a 10^6 x 10^6 tensor
    "codebook-shape": ("codebook", None, "over the limit"),
}


def _make_bomb(kind, tmp_path):
    from hostile import craft_artifact, small_mlp_artifact

    name, arg, _ = BOMBS[kind]
    base = {"arch": "mlp", "args": {"in_features": 64, "hidden": [8], "classes": 10, "dropout": 0.0}}
    dummy = {"x": torch.zeros(1)}
    if name == "mlp":
        return craft_artifact(tmp_path / kind, {"arch": "mlp", "args": {**base["args"], **arg}}, dummy)
    if name == "pruned":
        spec = {"arch": "pruned", "args": {"base": base, "shapes": {"fc1.weight": [10**6, 10**6]}, "attrs": {}}}
        return craft_artifact(tmp_path / kind, spec, dummy)
    if name == "sparse":
        import slimfuse.compress.sparse

        state = sf.load(small_mlp_artifact(tmp_path / "src")).state_dict()
        shape = [8, 64] if arg == "payload" else [10**5, 10**5]
        payload = _zstd_bomb(3 * 10**9) if arg == "payload" else b"\x00"
        tensors = {k: v for k, v in state.items() if k != "fc1.weight"}
        tensors["sparse::fc1.weight::mask"] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        tensors["sparse::fc1.weight::values"] = torch.zeros(4, dtype=torch.uint8)
        layout = {k: {"shape": list(v.shape), "dtype": "float32", "layout": "dense"} for k, v in tensors.items()
                  if not k.startswith("sparse::")}
        layout["fc1.weight"] = {"shape": shape, "dtype": "float32", "layout": "bitmask+values", "nonzeros": 1}
        return craft_artifact(tmp_path / kind, base, tensors,
                              storage={"codec": "sparse-zstd", "meta": {"tensors": layout}})
    import slimfuse.compress.codebook  # noqa: F401

    entries = [{"name": "fc1.weight", "dtype": "float32", "shape": [10**6, 10**6], "mode": "raw", "len": 4}]
    return craft_artifact(tmp_path / kind, base, {"codebook.payload": torch.zeros(4, dtype=torch.uint8)},
                          storage={"codec": "codebook", "meta": {"tensors": entries}})


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_resource_bombs_are_refused_under_1_5_gb(tmp_path, kind):
    from hostile import run_measured

    path = _make_bomb(kind, tmp_path)
    result, peak_mb = run_measured(f"""
        import slimfuse.compress.sparse, slimfuse.compress.codebook
        sf.load({str(path)!r})
    """)
    assert result.startswith("ArtifactError:") and BOMBS[kind][2] in result, result
    assert peak_mb < 1536, f"{kind}: peak {peak_mb:.0f} MB"


def test_the_budget_is_one_setting(digits_mlp, tmp_path, monkeypatch):
    path = sf.save(digits_mlp, tmp_path / "a")
    monkeypatch.setenv("SLIMFUSE_MAX_BYTES", "10K")
    with pytest.raises(ArtifactError, match=r"over the limit of 10,240 bytes \(set SLIMFUSE_MAX_BYTES"):
        sf.load(path)
    monkeypatch.setenv("SLIMFUSE_MAX_BYTES", "lots")
    with pytest.raises(sf.SlimfuseError, match="SLIMFUSE_MAX_BYTES must be a byte count"):
        sf.load(path)
    monkeypatch.setenv("SLIMFUSE_MAX_BYTES", "1G")
    assert torch.equal(sf.load(path).state_dict()["out.weight"], digits_mlp.state_dict()["out.weight"])


def test_loading_does_not_change_the_callers_random_stream(digits_mlp, tmp_path):
    path = sf.save(digits_mlp, tmp_path / "a")
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    sf.load(path)
    assert torch.equal(torch.rand(3), expected)


# -- writes: symlinks, full disks, concurrent savers -------------------------------------------------

def test_a_symlinked_output_replaces_its_target_and_keeps_the_link(digits_mlp, tmp_path):
    target = sf.save(digits_mlp, tmp_path / "real")
    (tmp_path / "link").symlink_to(target)
    sf.save(digits_mlp, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "card.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .link.old-* left
    (tmp_path / "dangling").symlink_to(tmp_path / "gone" / "deeper")
    with pytest.raises(sf.ConfigError, match="is a symlink to .*whose folder does not exist"):
        sf.save(digits_mlp, tmp_path / "dangling")


def test_a_save_that_runs_out_of_space_leaves_nothing(digits_mlp, tmp_path):
    """RLIMIT_FSIZE makes writes fail like a full disk (EFBIG): no partial artifact, no temp folder."""
    script = textwrap.dedent(f"""
        import resource, signal, torch, slimfuse as sf
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        model = sf.zoo.mlp(784, [512], 10)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            sf.save(model, {str(tmp_path / "out" / "a")!r})
        except OSError as e:
            print("OSError", e.errno)
        try:
            sf.export(model, "onnx", {str(tmp_path / "out" / "a.onnx")!r})
        except OSError as e:
            print("OSError", e.errno)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["OSError", "27", "OSError", "27"], proc.stdout + proc.stderr[-2000:]
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_concurrent_saves_to_one_path_end_with_one_complete_artifact(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch, slimfuse as sf
        torch.manual_seed(int(sys.argv[1]))
        model = sf.zoo.mlp(64, [16], 10)
        for _ in range(150):
            sf.save(model, {str(tmp_path / "a")!r})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    sf.load(tmp_path / "a")  # whole, checksum verified
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_an_output_selector_by_key_or_index_is_saved_and_a_callable_one_refused(digits, tmp_path):
    from peer_models import MultiOutput

    torch.manual_seed(0)
    model = sf.set_output(MultiOutput(), 1)  # read the reconstruction, the second of the two outputs
    x = digits.test.x[:16]
    back = sf.load(sf.save(model, tmp_path / "m"), trust_factory=True)
    assert _card(tmp_path / "m")["output"] == 1
    assert torch.equal(sf.predict(back, x), model(x)[1].detach())
    sf.set_output(model, lambda out: out[0])
    with pytest.raises(ArtifactError, match="callable .*cannot record"):
        sf.save(model, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    pruned = sf.prune(model, sparsity=0.5, schedule="oneshot", data=digits, epochs=0)  # the gate skips the reload
    assert sf.lineage_of(pruned)[-1]["validation"]["reload"].startswith("skipped: its output is selected by a callable")
    ens = sf.ensemble([sf.set_output(MultiOutput(), 0), sf.set_output(MultiOutput(), 0)], "mean")  # members too
    back = sf.load(sf.save(ens, tmp_path / "e"), trust_factory=True)
    assert [sf.models.calling.selector(m) for m in back.members] == [0, 0]
    assert torch.equal(sf.predict(back, x), sf.predict(ens, x))
    bad = _card(tmp_path / "e")
    bad["spec"]["args"]["outputs"] = [{"key": "x"}, None]
    _write_card(tmp_path / "e", bad)
    with pytest.raises(ArtifactError, match="'outputs' must list a key, an index or null"):
        sf.load(tmp_path / "e", trust_factory=True)
    card = _card(tmp_path / "m")
    card["output"] = {"key": "x"}
    _write_card(tmp_path / "m", card)
    with pytest.raises(ArtifactError, match="output"):
        sf.load(tmp_path / "m", trust_factory=True)

"""Bounded fuzzing of every file slimfuse reads: card.json, .npz/.csv data, recipe YAML, ONNX.

Each reader must either accept its input or raise one ``SlimfuseError`` subclass: never another
exception, never a hang. Examples are derandomized (CI is deterministic) and few; run with
``SLIMFUSE_FUZZ_EXAMPLES=10000`` for a long local campaign.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slimfuse as sf
from slimfuse.errors import SlimfuseError

N = int(os.environ.get("SLIMFUSE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=N, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
CARD_FIELDS = ["spec", "task", "lineage", "metrics", "storage", "weights_sha256", "format_version"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    return sf.save(sf.zoo.mlp(8, [4], 3), tmp_path_factory.mktemp("fuzz") / "a")


def _mutate(value, path, new):
    """``value`` with the item at ``path`` (a list of keys/indices) replaced by ``new``."""
    if not path:
        return new
    if isinstance(value, dict) and value:
        key = sorted(value)[path[0] % len(value)]
        return {**value, key: _mutate(value[key], path[1:], new)}
    if isinstance(value, list) and value:
        i = path[0] % len(value)
        return value[:i] + [_mutate(value[i], path[1:], new)] + value[i + 1:]
    return new


@FUZZ
@given(field=st.sampled_from(CARD_FIELDS), path=st.lists(st.integers(0, 50), max_size=5), new=json_values)
def test_card_mutations_load_or_raise_one_error(artifact, tmp_path, field, path, new):
    target = tmp_path / "a"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(artifact, target)
    card = json.loads((target / "card.json").read_text())
    card[field] = _mutate(card.get(field), path, new)
    (target / "card.json").write_text(json.dumps(card))
    try:
        sf.load(target)
    except SlimfuseError:
        pass


@FUZZ
@given(blob=st.binary(max_size=2000), at=st.integers(0, 10**6), flips=st.lists(st.integers(0, 255), max_size=8))
def test_npz_byte_mutations_raise_only_data_error(tmp_path, blob, at, flips):
    path = tmp_path / "d.npz"
    np.savez_compressed(path, X=np.arange(40.0).reshape(20, 2), y=np.arange(20) % 2)
    data = bytearray(path.read_bytes())
    for i, f in enumerate(flips):  # flip bytes, then splice in arbitrary bytes
        data[(at + 97 * i) % len(data)] ^= f or 1
    if blob:
        pos = at % len(data)
        data[pos:pos + len(blob)] = blob
    path.write_bytes(bytes(data))
    try:
        sf.datasets.load(path)
    except sf.DataError:
        pass


@FUZZ
@given(rows=st.lists(st.lists(st.one_of(st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=4)),
                              min_size=2, max_size=3), min_size=1, max_size=20))
def test_csv_tables_raise_only_data_error(tmp_path, rows):
    text = "a,label\n" + "\n".join(",".join(str(v) for v in r[:2]) for r in rows)
    (tmp_path / "d.csv").write_text(text)
    try:
        sf.datasets.load(tmp_path / "d.csv")
    except sf.DataError:
        pass


@FUZZ
@given(doc=st.one_of(st.text(max_size=300), json_values.map(json.dumps)),
       steps=st.lists(st.dictionaries(st.sampled_from(["name", "step", "input", "hidden", "epochs", "scheme",
                                                         "teacher", "student", "sparsity", "members"]),
                                      json_values, max_size=5), max_size=3))
def test_recipe_yaml_validates_or_raises_config_error(tmp_path, doc, steps):
    from slimfuse.pipeline.recipe import load_recipe

    for text in (doc, json.dumps({"data": "digits", "steps": steps})):
        (tmp_path / "r.yaml").write_text(text)
        try:
            load_recipe(tmp_path / "r.yaml")
        except sf.ConfigError:
            pass


@FUZZ
@given(at=st.integers(0, 10**6), flips=st.lists(st.integers(1, 255), min_size=1, max_size=6),
       cut=st.integers(0, 10**6))
def test_onnx_byte_mutations_raise_only_artifact_error(tmp_path, onnx_bytes, at, flips, cut):
    from slimfuse.runtime import load_onnx

    data = bytearray(onnx_bytes)
    for i, f in enumerate(flips):
        data[(at + 131 * i) % len(data)] ^= f
    if cut % 3 == 0:
        data = data[: cut % len(data)]
    (tmp_path / "m.onnx").write_bytes(bytes(data))
    try:
        pred = load_onnx(tmp_path / "m.onnx")
        pred(torch.zeros(2, 8))
    except SlimfuseError:
        pass


@pytest.fixture(scope="module")
def onnx_bytes(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fuzz-onnx") / "m.onnx"
    model = sf.zoo.mlp(8, [4], 3)
    sf.export(model, "onnx", path, sample=torch.rand(8, 8))
    return path.read_bytes()

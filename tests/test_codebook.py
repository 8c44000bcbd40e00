"""codebook:N weight sharing and its entropy-coded storage codec."""

import pytest
import torch
from safetensors.torch import load_file

import slimfuse as sf
from slimfuse.compress.codebook import decode, encode, payload_bytes
from slimfuse.export import to_onnx
from slimfuse.models import folder_bytes


def _weights(model):
    return {n: p for n, p in model.named_parameters() if p.ndim > 1}


def test_codebook_shares_weights_shrinks_and_reloads_bit_exactly(digits_mlp, digits, tmp_path):
    base = sf.evaluate(digits_mlp, digits.test)["accuracy"]
    q = sf.quantize(digits_mlp, "codebook:4", data=digits, epochs=1)
    for name, w in _weights(q).items():
        assert torch.unique(w).numel() <= 16, name
    assert not any(torch.equal(a, b) for a, b in zip(_weights(q).values(), _weights(digits_mlp).values()))
    assert sf.evaluate(q, digits.test)["accuracy"] >= base - 0.02
    dense = folder_bytes(sf.save(digits_mlp, tmp_path / "dense"))
    coded = folder_bytes(sf.save(q, tmp_path / "q"))
    assert coded < dense / 3
    back = sf.load(tmp_path / "q")
    for (n, a), (_, b) in zip(q.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(sf.predict(back, digits.test), sf.predict(q, digits.test))
    assert sf.lineage_of(back)[-1]["params"]["float_params"] == ["fc1.bias", "out.bias"]


def test_codebook_keeps_the_zeros_of_a_pruned_model(digits_mlp, digits, tmp_path):
    pruned = sf.prune(digits_mlp, sparsity=0.8, data=digits, epochs=2)
    q = sf.quantize(pruned, "codebook:3", data=digits, epochs=1)
    for (name, w), p in zip(_weights(q).items(), _weights(pruned).values()):
        assert torch.equal(w == 0, p == 0), name
    assert sf.evaluate(q, digits.test)["accuracy"] >= sf.evaluate(pruned, digits.test)["accuracy"] - 0.03
    sf.save(q, tmp_path / "q")
    meta = sf.read_card(tmp_path / "q")["storage"]["meta"]["tensors"]
    assert {e["name"]: e["mode"] for e in meta}["fc1.weight"] == "sparse"
    unpruned = folder_bytes(sf.save(sf.quantize(digits_mlp, "codebook:3"), tmp_path / "u"))
    assert folder_bytes(tmp_path / "q") < unpruned
    assert torch.equal(sf.predict(sf.load(tmp_path / "q"), digits.test), sf.predict(q, digits.test))
    # the staged-compression table's two last stages: packed indices, then entropy coded
    coded, packed = payload_bytes(q), payload_bytes(q, entropy=False)
    assert coded == load_file(str(tmp_path / "q" / "weights.safetensors"))["codebook.payload"].numel()
    assert coded < packed  # the bitmask of an 80%-zero layer and skewed indices compress


def test_codec_is_lossless_on_bit_patterns():
    gen = torch.Generator().manual_seed(0)
    values = torch.tensor([-0.0, 0.0, 1.5, -2.25, 3e-8, float("inf")])
    state = {
        "shared": values[torch.randint(0, 6, (40, 30), generator=gen)],
        "sparse": torch.where(torch.rand(50, 50, generator=gen) < 0.9, 0.0, torch.randn(50, 50, generator=gen).round()),
        "free": torch.randn(20, 20, generator=gen),
        "steps": torch.tensor(7),
        "half": torch.randn(100, generator=gen).half(),
    }
    tensors, meta = encode(state)
    back = decode(tensors, meta)
    for name, t in state.items():
        assert t.dtype == back[name].dtype and torch.equal(t.view(-1).view(torch.uint8),
                                                           back[name].view(-1).view(torch.uint8)), name


def test_corrupt_payload_is_an_artifact_error(digits_mlp, tmp_path):
    sf.save(sf.quantize(digits_mlp, "codebook:2"), tmp_path / "q")
    card = (tmp_path / "q" / "card.json").read_text()
    (tmp_path / "q" / "card.json").write_text(card.replace('"k": 4', '"k": 3', 1))
    with pytest.raises(sf.ArtifactError):
        sf.load(tmp_path / "q")


@pytest.mark.parametrize("scheme", ["codebook", "codebook:1", "codebook:9", "codebook:four"])
def test_bit_width_out_of_range_is_a_clear_error(digits_mlp, scheme):
    with pytest.raises(sf.ConfigError, match="2..8"):
        sf.quantize(digits_mlp, scheme)


def test_codebook_refuses_onnx_models_and_unknown_options(digits_mlp):
    with pytest.raises(sf.ConfigError, match="torch modules"):
        sf.quantize(to_onnx(digits_mlp), "codebook:4")
    with pytest.raises(sf.ConfigError, match="unknown field"):
        sf.quantize(digits_mlp, "codebook:4", clusters=3)

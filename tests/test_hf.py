"""Hugging Face transformers models as slimfuse artifacts (the ``hf`` architecture): tiny models built
offline from configs save, reload bit-exactly without pickle or trust_factory, join ensembles, teach, and
hostile cards are refused before anything large is built."""

import json
import pickle

import pytest
import torch

import slimfuse as sf
from slimfuse import ArtifactError
from slimfuse.models.calling import select

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()


def bert(seed=0, labels=3, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
               max_position_embeddings=16, num_labels=labels)
    return T.BertForSequenceClassification(T.BertConfig(**{**cfg, **kw})).eval()


def gpt2():
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=60, n_positions=16, n_embd=16, n_layer=2, n_head=4,
                                          bos_token_id=0, eos_token_id=0)).eval()


def resnet():
    torch.manual_seed(0)
    return T.ResNetForImageClassification(T.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                                         depths=[1, 1], layer_type="basic", num_labels=3)).eval()


def mobilenet():
    torch.manual_seed(0)
    return T.MobileNetV2ForImageClassification(T.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.25,
                                                                   num_labels=3)).eval()


def convnext():
    torch.manual_seed(0)
    return T.ConvNextForImageClassification(T.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16],
                                                             depths=[1, 1], num_labels=3, image_size=32)).eval()


def ids(n=4, length=10, vocab=60, seed=1):
    return torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


MODELS = {"bert": (bert, ids), "gpt2": (gpt2, ids), "resnet": (resnet, images), "mobilenet_v2": (mobilenet, images),
          "convnext": (convnext, images)}


@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_model_saves_and_reloads_bit_exactly(tmp_path, name):
    make, inputs = MODELS[name]
    model, x = make(), inputs()
    with torch.no_grad():
        ref = select(model(x))
    sf.save(model, tmp_path / "a")
    card = sf.read_card(tmp_path / "a")
    assert card["spec"]["arch"] == "hf" and card["spec"]["args"]["cls"] == type(model).__name__
    assert card["spec"]["args"]["config"]["model_type"] == model.config.model_type
    assert "factory" not in card["spec"]
    raw = (tmp_path / "a" / "weights.safetensors").read_bytes()
    assert not raw.startswith(b"\x80") and b"pickle" not in raw[:64]
    again = sf.load(tmp_path / "a")  # no trust_factory: only transformers' own classes are rebuilt
    assert type(again) is type(model)
    with torch.no_grad():
        assert torch.equal(select(again(x)), ref)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_tied_weights_are_stored_once_and_tied_again(tmp_path):
    model = gpt2()
    sf.save(model, tmp_path / "a")
    card = sf.read_card(tmp_path / "a")
    assert card["storage"]["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "weights.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    again = sf.load(tmp_path / "a")
    assert again.lm_head.weight is again.transformer.wte.weight


def test_attention_implementation_is_recorded(tmp_path):
    model = bert()
    model.config._attn_implementation = "eager"
    sf.save(model, tmp_path / "a")
    assert sf.load(tmp_path / "a").config._attn_implementation == "eager"
    model.config._attn_implementation = "sdpa"
    sf.save(model, tmp_path / "b")
    assert sf.load(tmp_path / "b").config._attn_implementation == "sdpa"


def _tamper(path, **changes):
    card = json.loads((path / "card.json").read_text())
    args = card["spec"]["args"]
    for key, value in changes.items():
        if key == "config":
            args["config"].update(value)
        else:
            args[key] = value
    (path / "card.json").write_text(json.dumps(card))


@pytest.mark.parametrize("changes,message", [
    ({"cls": "AutoConfig"}, "not a PreTrainedModel class"),
    ({"cls": "__import__"}, "must be the name of a transformers model class"),
    ({"cls": "NoSuchModelForAnything"}, "has no model class"),
    ({"cls": "GPT2LMHeadModel"}, "takes a 'gpt2' config"),
    ({"config": {"num_hidden_layers": 10**6}}, "more than"),
    ({"config": {"hidden_size": 2**20, "num_attention_heads": 1}}, "parameters"),
    ({"config": {"vocab_size": 10**30}}, "implausibly large integer"),
    ({"config": {"quantization_config": {"load_in_4bit": True}}}, "quantized"),
    ({"attn": "my_kernels"}, "attention implementation"),
    ({"shapes": {"classifier.weight": [2**30, 2**30]}}, "parameters"),
    ({"shapes": {"no.such.weight": [2]}}, "does not have"),
    ({"attrs": {"bert.encoder.layer.0.attention.self": {"forward": 3}}}, "not a structural attribute"),
])
def test_hostile_hf_cards_are_refused(tmp_path, changes, message):
    sf.save(bert(), tmp_path / "a")
    _tamper(tmp_path / "a", **changes)
    with pytest.raises(ArtifactError, match=message):
        sf.load(tmp_path / "a")


def test_a_nested_config_bomb_is_refused(tmp_path):
    sf.save(bert(), tmp_path / "a")
    deep = {}
    for _ in range(40):
        deep = {"x": deep}
    _tamper(tmp_path / "a", config={"id2label": deep})
    with pytest.raises(ArtifactError, match="implausible config"):
        sf.load(tmp_path / "a")


def test_a_user_subclass_of_a_transformers_model_is_not_rebuilt_as_hf():
    class Mine(T.BertForSequenceClassification):
        pass

    model = Mine(bert().config)
    from slimfuse.models.hf import is_hf

    assert not is_hf(model) and sf.spec_of(model) is None


def test_a_transformers_model_changed_beyond_its_config_says_why_it_cannot_be_saved(tmp_path):
    model = bert()
    model.extra = torch.nn.Linear(2, 2)  # a tensor no build of its config has
    assert sf.spec_of(model) is None  # still trains and predicts: only saving needs a spec
    with pytest.raises(ArtifactError, match="extra.weight"):
        sf.save(model, tmp_path / "a")


def test_ensemble_of_transformers_members_round_trips(tmp_path):
    from slimfuse.fuse.combine import make

    members = [bert(seed=0), bert(seed=1), bert(seed=2, num_attention_heads=2)]
    ens = make(members, "mean", classes=3).eval()
    x = ids(6)
    with torch.no_grad():
        ref = ens(x)
        manual = torch.stack([m(x).logits.log_softmax(-1) for m in members]).exp().mean(0).log()
    assert torch.allclose(ref, manual, atol=1e-6)
    sf.save(ens, tmp_path / "ens")
    again = sf.load(tmp_path / "ens")
    with torch.no_grad():
        assert torch.equal(again(x), ref)
    assert [type(m).__name__ for m in again.members] == ["BertForSequenceClassification"] * 3
    assert again.members[2].config.num_attention_heads == 2


def _token_splits(n=96, length=10, classes=3, seed=0):
    x = ids(n, length, seed=seed)
    y = (x[:, 1] % classes).long()  # the class is the second token's id mod 3: learnable by attention
    task = sf.Task("tokens", "classification", classes, (length,))
    k, v = n * 2 // 3, n * 5 // 6
    return sf.Splits(sf.Split(x[:k], y[:k]), sf.Split(x[k:v], y[k:v]), sf.Split(x[v:], y[v:]), task)


def test_transformers_model_teaches_a_student(tmp_path):
    data = _token_splits()
    teacher = bert()
    student = bert(seed=5, num_hidden_layers=1, intermediate_size=16)
    out = sf.distill(teacher, student, data, epochs=1, transfer="train", validate=False)
    assert type(out).__name__ == "BertForSequenceClassification"
    assert out.config.num_hidden_layers == 1
    sf.save(out, tmp_path / "s")
    again = sf.load(tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(again(data.test.x).logits, out(data.test.x).logits)
    assert [s["op"] for s in sf.lineage_of(again)] == ["distill"]


def test_a_transformers_teacher_gets_a_narrower_student_of_its_own_class(tmp_path):
    data = _token_splits()
    teacher = bert(num_attention_heads=4, intermediate_size=32)
    student = sf.zoo.student(teacher, width=0.5, example_inputs=data.train.x[:2])
    assert type(student) is type(teacher)
    assert [layer.attention.self.num_attention_heads for layer in student.bert.encoder.layer] == [2, 2]
    assert student.bert.encoder.layer[0].intermediate.dense.out_features == 16
    out = sf.distill(teacher, student, data, epochs=1, transfer="train", validate=False)
    sf.save(out, tmp_path / "s")
    again = sf.load(tmp_path / "s")
    assert [layer.attention.self.num_attention_heads for layer in again.bert.encoder.layer] == [2, 2]
    with torch.no_grad():
        assert torch.equal(again(data.test.x).logits, out(data.test.x).logits)


def test_no_pickle_anywhere_in_the_artifact(tmp_path):
    sf.save(bert(), tmp_path / "a")
    for f in (tmp_path / "a").iterdir():
        with pytest.raises((pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError)):
            pickle.loads(f.read_bytes())

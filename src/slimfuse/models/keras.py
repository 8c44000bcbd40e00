"""Keras 3 models in slimfuse: the ``keras`` architecture.

A Keras 3 ``Sequential`` or functional model (any backend) is translated into an equivalent torch module
(:func:`from_keras`): each Keras layer becomes the standard torch layer that computes the same thing
(``Dense`` -> ``nn.Linear``, ``Conv2D`` -> ``nn.Conv2d``, ``BatchNormalization`` -> ``nn.BatchNorm2d`` ...),
wired as the Keras graph wires them. Every slimfuse verb then works on it as on any torch model: pruning
and int8 find ``nn.Linear``/``nn.Conv2d`` (a Keras ``Dense`` on the torch backend is not one: "nothing to
prune"), module names are stable across the copies techniques make (``copy.deepcopy`` renames a Keras
model's variables), and the artifact is ``{"arch": "keras", "args": {"graph": ...}}`` + safetensors,
rebuilt from the JSON graph alone: reloading needs neither Keras nor pickle.

The translation takes the same inputs as the Keras model and returns the same outputs: image tensors
arrive channels-last (NHWC) as Keras expects and are computed channels-first inside (what torch's
kernels, Torch-Pruning and the int8 backends expect); the rows of a ``Dense`` after a ``Flatten`` are
reordered accordingly, and a 4-D output goes back to NHWC. Verbs given a Keras model translate it first
(:func:`torch_of`) and return torch modules. Layers without a torch counterpart here (recurrent layers,
``Reshape``, shared or nested layers, subclassed models) are refused, naming the layer.
"""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import torch
from torch import nn

from ..errors import ArtifactError, ConfigError
from .spec import attach
from .zoo import check_params, register

ARCH = "keras"
MAX_NODES = 4096
MAX_DIM = 2**24

# Keras activation name -> torch module factory (``dim`` is the channel dimension, for softmax)
ACTIVATIONS = {
    "linear": lambda dim: None, "relu": lambda dim: nn.ReLU(), "relu6": lambda dim: nn.ReLU6(),
    "sigmoid": lambda dim: nn.Sigmoid(), "tanh": lambda dim: nn.Tanh(), "softmax": lambda dim: nn.Softmax(dim),
    "gelu": lambda dim: nn.GELU(), "silu": lambda dim: nn.SiLU(), "swish": lambda dim: nn.SiLU(),
    "elu": lambda dim: nn.ELU(), "selu": lambda dim: nn.SELU(), "softplus": lambda dim: nn.Softplus(),
    "hard_sigmoid": lambda dim: nn.Hardsigmoid(), "hard_silu": lambda dim: nn.Hardswish(),
    "hard_swish": lambda dim: nn.Hardswish(), "leaky_relu": lambda dim: nn.LeakyReLU(0.2),
}
ELEMENTWISE = {"act", "dropout"}  # ops that keep a flattened image's element order
MERGES = {"add", "subtract", "multiply", "average", "maximum", "minimum", "concat"}
IGNORED = {"Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
           "ActivityRegularization"}  # identity at inference; Dropout keeps its rate for training


# --------------------------------------------------------------------------- recognising


def is_keras(model) -> bool:
    """Whether ``model`` is a Keras 3 model, a user's subclass included (nothing is imported: a model can only
    be a Keras one once ``keras`` has been imported)."""
    keras = sys.modules.get("keras")
    model_class = getattr(keras, "Model", None)
    return isinstance(model_class, type) and isinstance(model, model_class)


def torch_of(model):
    """``model`` itself, or its torch translation when it is a Keras model: what every verb works on. In a list
    or tuple (or a dict) of models each Keras one is translated; a collection holding none comes back as it is
    (``train_members``' result keeps its out-of-fold records)."""
    if isinstance(model, (list, tuple, dict)):
        items = model.values() if isinstance(model, dict) else model
        if not any(is_keras(m) for m in items):
            return model
        if isinstance(model, dict):
            return {k: torch_of(m) for k, m in model.items()}
        return [torch_of(m) for m in model]
    return from_keras(model) if is_keras(model) else model


# --------------------------------------------------------------------------- translating a Keras model


def _refuse(layer: str, why: str) -> ConfigError:
    return ConfigError(f"Keras layer {layer!r}: {why}; slimfuse translates Sequential and functional models of "
                       "Dense, Conv2D, DepthwiseConv2D, BatchNormalization, LayerNormalization, pooling, Flatten, "
                       "Embedding, Add/Concatenate-style merges, activations and dropout (docs/models.md); "
                       "export other models to ONNX (model.export(path, format='onnx')) and pass the .onnx file")


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


def _same_pads(size: int | None, k: int, s: int, d: int, layer: str) -> tuple[int, int]:
    """TensorFlow's "same" padding along one axis: (before, after); the extra pixel goes after."""
    span = (k - 1) * d + 1
    if s == 1:
        total = span - 1
    elif size is None:
        raise _refuse(layer, "'same' padding with a stride needs a known input size (give the Input a fixed shape)")
    else:
        total = max((math.ceil(size / s) - 1) * s + span - size, 0)
    return total // 2, total - total // 2


class _Graph:
    """The JSON graph under construction, with each tensor's layout (``image``: an NCHW tensor that Keras
    holds as NHWC) and, for flattened images, the (H, W, C) shape whose order the next Dense must follow."""

    def __init__(self):
        self.inputs: list[dict] = []
        self.nodes: list[dict] = []
        self.outputs: list[str] = []
        self.image: dict[str, bool] = {}
        self.flat: dict[str, tuple[int, int, int]] = {}
        self.weights: dict[str, dict[str, np.ndarray]] = {}
        self.names: set[str] = set()

    def name(self, keras_name: str) -> str:
        base = re.sub(r"\W", "_", keras_name) or "layer"
        if base[0].isdigit():
            base = f"l_{base}"
        name, i = base, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def add(self, keras_name: str, op: str, inputs: list[str], image: bool, **args) -> str:
        name = self.name(keras_name)
        self.nodes.append({"name": name, "op": op, "in": inputs, "args": args})
        self.image[name] = image
        if op in ELEMENTWISE and inputs[0] in self.flat:
            self.flat[name] = self.flat[inputs[0]]
        return name


def _activation(g: _Graph, layer: str, fn, source: str) -> str:
    if fn is None or fn == "linear":
        return source
    if isinstance(fn, dict):
        fn = fn.get("config", {}).get("name", fn.get("class_name"))
    if fn not in ACTIVATIONS:
        raise _refuse(layer, f"activation {fn!r} has no torch counterpart here")
    return g.add(f"{layer}_{fn}", "act", [source], g.image[source], fn=fn)


def _weights(layer) -> dict[str, np.ndarray]:
    return {v.name.split("/")[-1].split(":")[0]: np.asarray(v.numpy() if hasattr(v, "numpy") else v)
            for v in layer.weights}


def _affine(w: dict, n: int) -> dict[str, np.ndarray]:
    """A normalisation's scale and shift (Keras leaves out the ones made with scale=False / center=False)."""
    return {"weight": w.get("gamma", np.ones(n, np.float32)), "bias": w.get("beta", np.zeros(n, np.float32))}


def _translate_layer(g: _Graph, layer, cfg: dict, cls: str, sources: list[str], in_shape) -> str:
    """Add the nodes of one Keras layer; return the name of the node holding its output."""
    name = cfg.get("name", cls)
    w = _weights(layer)
    x = sources[0] if sources else None
    image = bool(sources) and g.image[x]
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise _refuse(name, "only data_format='channels_last' (Keras's default) is translated")
    if cls in IGNORED:
        return g.add(name, "dropout", [x], image, p=float(cfg.get("rate", 0.0)) if cls == "Dropout" else 0.0)
    if cls == "Dense":
        if image:
            raise _refuse(name, "a Dense applied to a 4-D image tensor")
        kernel = w["kernel"]
        if x in g.flat:  # Keras flattened (H, W, C); the translation flattens (C, H, W)
            h, wd, c = g.flat[x]
            kernel = kernel.reshape(h, wd, c, -1).transpose(2, 0, 1, 3).reshape(h * wd * c, -1)
        node = g.add(name, "linear", [x], False, **{"in": int(kernel.shape[0])}, out=int(kernel.shape[1]),
                     bias="bias" in w)
        g.weights[node] = {"weight": kernel.T, **({"bias": w["bias"]} if "bias" in w else {})}
        return _activation(g, name, cfg.get("activation"), node)
    if cls in ("Conv2D", "DepthwiseConv2D"):
        if not image:
            raise _refuse(name, "a 2-D convolution of a tensor that is not a 4-D image")
        k, s, d = _pair(cfg["kernel_size"]), _pair(cfg["strides"]), _pair(cfg["dilation_rate"])
        if cls == "Conv2D":
            kernel = w["kernel"]  # (kh, kw, in / groups, out)
            groups = int(cfg.get("groups", 1))
            weight = kernel.transpose(3, 2, 0, 1)
            cin, cout = kernel.shape[2] * groups, kernel.shape[3]
        else:
            # (kh, kw, in, multiplier): output channel c * multiplier + m, as torch's groups order them
            kernel = w.get("depthwise_kernel", w.get("kernel"))
            cin, mult = kernel.shape[2], kernel.shape[3]
            groups, cout = cin, cin * mult
            weight = kernel.transpose(2, 3, 0, 1).reshape(cout, 1, k[0], k[1])
        padding = [0, 0]
        if cfg["padding"] == "same":
            size = list(in_shape[1:3]) if in_shape is not None else [None, None]
            (top, bottom), (left, right) = (_same_pads(size[i], k[i], s[i], d[i], name) for i in range(2))
            if (top, left) == (bottom, right):
                padding = [top, left]
            elif top + bottom + left + right:
                x = g.add(f"{name}_pad", "pad", [x], True, pads=[left, right, top, bottom], value=0.0)
        elif cfg["padding"] != "valid":
            raise _refuse(name, f"padding {cfg['padding']!r}")
        node = g.add(name, "conv2d", [x], True, **{"in": int(cin)}, out=int(cout), kernel=k, stride=s, dilation=d,
                     padding=padding, groups=groups, bias="bias" in w)
        g.weights[node] = {"weight": weight, **({"bias": w["bias"]} if "bias" in w else {})}
        return _activation(g, name, cfg.get("activation"), node)
    if cls == "BatchNormalization":
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if axis not in (-1, (4 if image else 2) - 1) or (not image and len(in_shape or []) != 2):
            raise _refuse(name, f"batch normalisation over axis {axis} of a {len(in_shape or [])}-D tensor "
                          "(only the channel axis of images and of (batch, features) tensors)")
        n = int(w["moving_mean"].shape[0])
        node = g.add(name, "batchnorm", [x], image, features=n, eps=float(cfg.get("epsilon", 1e-3)),
                     momentum=1.0 - float(cfg.get("momentum", 0.99)))
        g.weights[node] = {**_affine(w, n), "running_mean": w["moving_mean"], "running_var": w["moving_variance"]}
        return node
    if cls == "LayerNormalization":
        axis = cfg.get("axis", -1)
        if image or axis not in (-1, [-1]) or cfg.get("rms_scaling"):
            raise _refuse(name, "layer normalisation other than over the last axis of a non-image tensor")
        n = int(in_shape[-1])
        node = g.add(name, "layernorm", [x], False, features=n, eps=float(cfg.get("epsilon", 1e-3)))
        g.weights[node] = _affine(w, n)
        return node
    if cls in ("Activation", "ReLU", "Softmax", "LeakyReLU", "ELU"):
        fn = {"ReLU": "relu", "Softmax": "softmax", "LeakyReLU": "leaky_relu", "ELU": "elu"}.get(cls)
        fn = fn or cfg.get("activation")
        odd_relu = cls == "ReLU" and (cfg.get("negative_slope") or cfg.get("threshold"))
        if odd_relu or (cls == "ELU" and cfg.get("alpha", 1.0) != 1.0):
            raise _refuse(name, "a ReLU/ELU with a slope, threshold or alpha other than the defaults")
        if cls == "ReLU" and cfg.get("max_value") is not None:
            if cfg["max_value"] != 6:
                raise _refuse(name, f"ReLU(max_value={cfg['max_value']})")
            fn = "relu6"
        if cls == "Softmax" and cfg.get("axis", -1) != -1:
            raise _refuse(name, "softmax over an axis other than the last")
        if cls == "LeakyReLU":
            return g.add(name, "act", [x], image, fn="leaky_relu", slope=float(cfg.get("negative_slope", 0.3)))
        if isinstance(fn, str) and fn == "linear":
            return g.add(name, "dropout", [x], image, p=0.0)
        return _activation(g, name, fn, x)
    if cls == "Flatten":
        node = g.add(name, "flatten", [x], False)
        if image:
            g.flat[node] = tuple(int(i) for i in in_shape[1:4])
        return node
    if cls in ("MaxPooling2D", "AveragePooling2D"):
        k = _pair(cfg["pool_size"])
        s = _pair(cfg.get("strides") or cfg["pool_size"])
        pad = [0, 0]
        if cfg["padding"] == "same":
            if cls == "AveragePooling2D":
                raise _refuse(name, "average pooling with 'same' padding (Keras leaves the padding out of each mean)")
            size = list(in_shape[1:3])
            (top, bottom), (left, right) = (_same_pads(size[i], k[i], s[i], 1, name) for i in range(2))
            if top + bottom + left + right:
                x = g.add(f"{name}_pad", "pad", [x], True, pads=[left, right, top, bottom], value=-math.inf)
        op = "maxpool2d" if cls == "MaxPooling2D" else "avgpool2d"
        return g.add(name, op, [x], True, kernel=k, stride=s, padding=pad)
    if cls in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        if cfg.get("keepdims"):
            raise _refuse(name, "global pooling with keepdims=True")
        return g.add(name, "gap2d" if "Average" in cls else "gmp2d", [x], False)
    if cls in ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate"):
        if len({g.image[s] for s in sources}) > 1:
            raise _refuse(name, "merging image and non-image tensors")
        if cls != "Concatenate":
            return g.add(name, cls.lower(), sources, image)
        rank = 4 if image else len(in_shape[0])
        axis = int(cfg.get("axis", -1)) % rank
        if image:
            axis = {1: 2, 2: 3, 3: 1}[axis]
        return g.add(name, "concat", sources, image, dim=axis)
    if cls == "Embedding":
        table = w["embeddings"]
        node = g.add(name, "embedding", [x], False, num=int(table.shape[0]), dim=int(table.shape[1]))
        g.weights[node] = {"weight": table}
        return node
    if cls == "Rescaling":
        scale, offset = cfg.get("scale", 1.0), cfg.get("offset", 0.0)
        if not all(isinstance(v, (int, float)) for v in (scale, offset)):
            raise _refuse(name, "per-channel rescaling")
        return g.add(name, "rescale", [x], image, scale=float(scale), offset=float(offset))
    if cls in ("Sequential", "Functional"):
        raise _refuse(name, "a model nested inside the model (flatten it into one functional model)")
    raise _refuse(name, f"layer type {cls} has no torch translation here")


def _history(arg) -> list:
    """The (layer, node, tensor) references of one inbound-node argument (a tensor or a list of them)."""
    if isinstance(arg, list):
        return [h for a in arg for h in _history(a)]
    if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__":
        return [arg["config"]["keras_history"]]
    return []


def from_keras(model) -> nn.Module:
    """The torch module that computes what the Keras 3 ``model`` computes (a ``Sequential`` or functional
    model, any backend), with its weights; ``ConfigError`` naming the first layer that cannot be translated."""
    if not is_keras(model):
        raise ConfigError(f"{type(model).__name__} is not a Keras model")
    cls = type(model).__name__
    config = model.get_config()
    if cls not in ("Sequential", "Functional") or not isinstance(config.get("layers"), list):
        raise ConfigError(f"{cls} is a subclassed Keras model: it has no graph slimfuse can read; build it as a "
                          "Sequential or functional model, or export it to ONNX and pass the .onnx file")
    if not model.inputs:
        raise ConfigError("the Keras model is not built: give it an Input (or call it once) first")
    g = _Graph()
    layers = {layer.name: layer for layer in model.layers}
    made: dict[str, str] = {}  # Keras layer name -> node holding its output
    for i, tensor in enumerate(model.inputs):
        shape = list(tensor.shape[1:])
        history = getattr(tensor, "_keras_history", None)
        keras_name = history[0].name if history is not None else f"input_{i}"
        name = g.name(keras_name)
        image = len(shape) == 3
        g.inputs.append({"name": name, "shape": [s if s is None else int(s) for s in shape],
                         "dtype": str(getattr(tensor, "dtype", "float32")), "layout": "nhwc" if image else "plain"})
        g.image[name] = image
        made[keras_name] = name
    entries = config["layers"]
    for entry in entries:
        lcls, lcfg = entry["class_name"], entry["config"]
        lname = lcfg.get("name")
        if lcls == "InputLayer":
            continue
        if cls == "Sequential":
            sources = [g.nodes[-1]["name"] if g.nodes else g.inputs[0]["name"]]
        else:
            nodes = entry.get("inbound_nodes", [])
            if len(nodes) != 1:
                raise _refuse(lname, f"the layer is called {len(nodes)} times (shared layers are not translated)")
            refs = [h for a in nodes[0].get("args", []) for h in _history(a)]
            kwargs = sorted(k for k, v in (nodes[0].get("kwargs") or {}).items() if v is not None)
            if kwargs:
                raise _refuse(lname, f"called with keyword arguments {kwargs}")
            if any(r[2] != 0 for r in refs) or any(r[0] not in made for r in refs):
                raise _refuse(lname, "its inputs come from a layer with several outputs or out of order")
            sources = [made[r[0]] for r in refs]
        if lname not in layers:
            raise _refuse(lname, "not found among the model's layers")
        layer = layers[lname]
        made[lname] = _translate_layer(g, layer, lcfg, lcls, sources, _input_shape(layer, lcls))
        if len(g.nodes) > MAX_NODES:
            raise ConfigError(f"the Keras model has more than {MAX_NODES} layers")
    if cls == "Sequential":
        g.outputs = [g.nodes[-1]["name"]]
    else:
        outs = config["output_layers"]
        outs = [outs] if outs and isinstance(outs[0], str) else outs
        g.outputs = [made[o[0]] for o in outs]
    graph = {"inputs": g.inputs, "nodes": g.nodes, "outputs": g.outputs,
             "output_layout": ["nhwc" if g.image[o] else "plain" for o in g.outputs]}
    net = keras_net(graph)
    state = net.state_dict()
    for node, tensors in g.weights.items():
        for key, value in tensors.items():
            target = state[f"layers.{node}.{key}"]
            array = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
            if tuple(array.shape) != tuple(target.shape):
                raise _refuse(node, f"weight {key} has shape {tuple(array.shape)}, expected {tuple(target.shape)}")
            target.copy_(array)
    return net.eval()


def _input_shape(layer, cls: str):
    """The shape (batch first) of the tensor a layer of the built model reads; a list of them for a Concatenate."""
    try:
        tensors = layer.input
    except (AttributeError, ValueError):
        return None
    if isinstance(tensors, (list, tuple)):
        shapes = [list(t.shape) for t in tensors]
        return shapes if cls == "Concatenate" else shapes[0]
    return list(tensors.shape)


# --------------------------------------------------------------------------- the torch module


def _node_module(op: str, a: dict, dim: int) -> nn.Module | None:
    if op == "linear":
        return nn.Linear(a["in"], a["out"], bias=a["bias"])
    if op == "conv2d":
        return nn.Conv2d(a["in"], a["out"], tuple(a["kernel"]), stride=tuple(a["stride"]), padding=tuple(a["padding"]),
                         dilation=tuple(a["dilation"]), groups=a["groups"], bias=a["bias"])
    if op == "batchnorm":
        return (nn.BatchNorm2d if dim == 1 else nn.BatchNorm1d)(a["features"], eps=a["eps"], momentum=a["momentum"])
    if op == "layernorm":
        return nn.LayerNorm(a["features"], eps=a["eps"])
    if op == "embedding":
        return nn.Embedding(a["num"], a["dim"])
    if op == "act":
        if a["fn"] == "leaky_relu":
            return nn.LeakyReLU(a.get("slope", 0.2))
        if a["fn"] not in ACTIVATIONS or a["fn"] == "linear":
            raise ArtifactError(f"unknown activation {a['fn']!r}")
        return ACTIVATIONS[a["fn"]](dim)
    if op == "dropout":
        return nn.Dropout(a["p"]) if a["p"] else nn.Identity()
    if op == "flatten":
        return nn.Flatten()
    if op == "pad":
        return nn.ConstantPad2d(tuple(a["pads"]), a["value"])
    if op == "maxpool2d":
        return nn.MaxPool2d(tuple(a["kernel"]), tuple(a["stride"]), tuple(a["padding"]))
    if op == "avgpool2d":
        return nn.AvgPool2d(tuple(a["kernel"]), tuple(a["stride"]), tuple(a["padding"]))
    if op in ("gap2d", "gmp2d", "rescale") or op in MERGES:
        return None  # computed in forward
    raise ArtifactError(f"unknown Keras graph op {op!r}")


def _params(op: str, a: dict) -> int:
    if op == "linear":
        return (a["in"] + 1) * a["out"]
    if op == "conv2d":
        return (a["in"] // max(a["groups"], 1) * a["kernel"][0] * a["kernel"][1] + 1) * a["out"]
    if op in ("batchnorm", "layernorm"):
        return 4 * a["features"]
    if op == "embedding":
        return a["num"] * a["dim"]
    return 0


def _check_graph(graph) -> None:
    """A graph read from a card is data: bounded, every name defined before use, every width an integer in range."""
    if not isinstance(graph, dict) or not all(isinstance(graph.get(k), list) for k in ("inputs", "nodes", "outputs")):
        raise ArtifactError("a keras graph needs lists 'inputs', 'nodes' and 'outputs'")
    if len(graph["nodes"]) > MAX_NODES or not graph["inputs"] or len(graph["inputs"]) > 64:
        raise ArtifactError(f"a keras graph has 1 to 64 inputs and at most {MAX_NODES} nodes")
    seen: set[str] = set()
    for item in graph["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ArtifactError("every keras graph input needs a name")
        seen.add(item["name"])
    for node in graph["nodes"]:
        if not isinstance(node, dict) or not isinstance(node.get("name"), str) or not node["name"].isidentifier():
            raise ArtifactError(f"bad keras graph node {str(node)[:80]!r}")
        if not isinstance(node.get("in"), list) or not node["in"] or any(i not in seen for i in node["in"]):
            raise ArtifactError(f"keras graph node {node['name']!r} reads a tensor not computed before it")
        if not isinstance(node.get("args"), dict):
            raise ArtifactError(f"keras graph node {node['name']!r} needs an 'args' object")
        for key, v in node["args"].items():
            for i in v if isinstance(v, list) else [v]:
                if isinstance(i, int) and not isinstance(i, bool) and not -8 <= i <= MAX_DIM:
                    raise ArtifactError(f"keras graph node {node['name']!r}: {key}={v} is out of range")
        if node["name"] in seen:
            raise ArtifactError(f"keras graph node {node['name']!r} is defined twice")
        seen.add(node["name"])
    if not graph["outputs"] or any(o not in seen for o in graph["outputs"]):
        raise ArtifactError("keras graph outputs name tensors the graph does not compute")


class KerasNet(nn.Module):
    """A Keras model's graph run by torch layers (see the module docstring); inputs and outputs as Keras has them."""

    def __init__(self, graph: dict):
        super().__init__()
        self.graph = graph
        image = {i["name"]: i.get("layout") == "nhwc" for i in graph["inputs"]}
        self.layers = nn.ModuleDict()
        self.order: list[tuple[str, str, list[str], dict]] = []
        for node in graph["nodes"]:
            img = image[node["in"][0]]  # an NCHW image in, an NCHW image out, but for these:
            module = _node_module(node["op"], node["args"], 1 if img else -1)
            if module is not None:
                self.layers[node["name"]] = module
            image[node["name"]] = img and node["op"] not in ("flatten", "gap2d", "gmp2d")
            self.order.append((node["name"], node["op"], node["in"], node["args"]))
        self.nhwc = [i.get("layout") == "nhwc" for i in graph["inputs"]]
        self.out_nhwc = [image[o] for o in graph["outputs"]]

    def forward(self, *inputs):
        if len(inputs) != len(self.nhwc):
            raise ValueError(f"this model takes {len(self.nhwc)} input(s), got {len(inputs)}")
        values = {}
        for spec_, x, nhwc in zip(self.graph["inputs"], inputs, self.nhwc):
            values[spec_["name"]] = x.permute(0, 3, 1, 2) if nhwc else x
        for name, op, ins, args in self.order:
            xs = [values[i] for i in ins]
            if name in self.layers:
                y = self.layers[name](xs[0])
            elif op == "gap2d":
                y = xs[0].mean(dim=(2, 3))
            elif op == "gmp2d":
                y = xs[0].amax(dim=(2, 3))
            elif op == "rescale":
                y = xs[0] * args["scale"] + args["offset"]
            elif op == "concat":
                y = torch.cat(xs, dim=args["dim"])
            elif op == "add":
                y = xs[0]
                for other in xs[1:]:
                    y = y + other
            elif op == "subtract":
                y = xs[0] - xs[1]
            elif op == "multiply":
                y = xs[0]
                for other in xs[1:]:
                    y = y * other
            elif op == "average":
                y = torch.stack(xs).mean(0)
            elif op == "maximum":
                y = torch.stack(xs).amax(0)
            else:  # minimum
                y = torch.stack(xs).amin(0)
            values[name] = y
        outs = [values[o].permute(0, 2, 3, 1) if nhwc else values[o]
                for o, nhwc in zip(self.graph["outputs"], self.out_nhwc)]
        return outs[0] if len(outs) == 1 else tuple(outs)


@register(ARCH)
def keras_net(graph: dict) -> nn.Module:
    """Rebuild a translated Keras model from its JSON graph (no Keras needed)."""
    _check_graph(graph)
    try:
        count = sum(_params(n["op"], n["args"]) for n in graph["nodes"])
    except (KeyError, TypeError, IndexError) as e:
        raise ArtifactError(f"a keras graph node lacks a width: {type(e).__name__}: {e}") from None
    check_params("keras", count)
    return attach(KerasNet(graph), {"arch": ARCH, "args": {"graph": graph}})

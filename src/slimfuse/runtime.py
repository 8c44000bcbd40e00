"""ONNX Runtime as a predictor: an ``nn.Module`` whose forward runs an ONNX model.

``load_onnx(path)`` validates the file with ``onnx.checker`` (nothing in it is
executed before that, and external-data references are refused) and returns an
:class:`OnnxPredictor`: torch tensor in, logits tensor out, through an
``onnxruntime.InferenceSession`` with a fixed intra-op thread count. It is a
module like any other, so ``measure`` times it (``slimfuse_runtime =
"onnxruntime"``), ensembles take it as a member and distillation as a teacher.

Saving: the predictor keeps the serialized ONNX model as a ``uint8`` buffer,
so ``slimfuse.save`` / ``load`` store it in ``weights.safetensors`` unchanged
(architecture ``"onnx"``; its args carry the byte count and SHA-256, checked on
load). ``slimfuse.export(predictor, "onnx", path)`` writes the ``.onnx`` file
back out for deployment.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from .errors import ArtifactError, ConfigError
from .models.spec import attach, derive, lineage_of, task_of
from .models.zoo import register

META_KEY = "slimfuse"  # ONNX metadata_props key: JSON with lineage and task
LAYOUTS = ("nchw", "nhwc")
OUTPUTS = ("auto", "logits", "proba")

# Inputs that hold quantization parameters (scale / zero point), not weights: op -> input indices.
_QPARAM_INPUTS = {
    "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "MatMulInteger": (2, 3), "ConvInteger": (2, 3),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7), "QLinearConv": (1, 2, 4, 5, 6, 7), "QGemm": (1, 2, 4, 5, 7, 8),
    "DynamicQuantizeMatMul": (2, 3),
}


# ONNX input element type -> the numpy dtype fed to it: float32 features, int64 token ids
_INPUT_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64}


def providers() -> list[str]:
    """ONNX Runtime's execution providers for a session: its CUDA provider first when the installed build has
    it (``onnxruntime-gpu``; nodes it lacks fall back to the CPU), else the CPU alone."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# op domains ONNX Runtime implements itself: the standard ones and its own contrib ops (which its
# quantizer and transformer optimizer emit); anything else is a custom op library
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


def parse_onnx(data: bytes, *, where: str = "ONNX model", allow_custom_ops: bool = False) -> onnx.ModelProto:
    """Decode and check ONNX bytes; raise ArtifactError for anything that is not a usable model.

    Refused before the checker or ONNX Runtime see the model: tensors stored in external files
    anywhere in the graph (initializers, Constant nodes, any tensor attribute, the subgraphs of
    If/Loop/Scan, local functions), ops from a domain ONNX Runtime does not implement itself
    unless ``allow_custom_ops``, and ConstantOfShape nodes whose constant shape is over the
    memory budget."""
    try:
        proto = onnx.load_model_from_string(bytes(data))
    except Exception as e:  # protobuf DecodeError and friends
        raise ArtifactError(f"{where}: not an ONNX model "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not proto.graph.node and not proto.graph.output:
        raise ArtifactError(f"{where}: not an ONNX model (no graph)")
    _check_graph_intake(proto, where, allow_custom_ops)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # onnx.checker.ValidationError and protobuf errors
        raise ArtifactError(f"{where}: invalid ONNX model ({str(e).splitlines()[0]})") from None
    feeds = _graph_inputs(proto)
    if len(feeds) != 1:
        raise ArtifactError(f"{where}: slimfuse runs models with one tensor input; this one has {len(feeds)}")
    if feeds[0].type.tensor_type.elem_type not in _INPUT_DTYPES:
        raise ArtifactError(f"{where}: the model input must be float32 (features) or int64 (token ids)")
    return proto


def _node_name(node) -> str:
    article = "an" if node.op_type[:1] in "AEIOU" else "a"
    return f"{node.op_type} node {node.name!r}" if node.name else f"{article} {node.op_type} node"


def _check_graph_intake(proto: onnx.ModelProto, where: str, allow_custom_ops: bool) -> None:
    from .limits import check_bytes

    external = onnx.TensorProto.EXTERNAL
    A = onnx.AttributeProto

    def tensors_of(attr):
        if attr.type == A.TENSOR:
            yield attr.t
        elif attr.type == A.TENSORS:
            yield from attr.tensors
        elif attr.type == A.SPARSE_TENSOR:
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        elif attr.type == A.SPARSE_TENSORS:
            for st in attr.sparse_tensors:
                yield st.values
                yield st.indices

    def refuse_external(t, what):
        if t.data_location == external or len(t.external_data):
            raise ArtifactError(
                f"{where}: {what} stores tensor {t.name!r} in an external file; slimfuse reads only "
                "self-contained ONNX files (embed the weights, e.g. onnx.save(..., save_as_external_data=False))")

    consts: dict[str, onnx.TensorProto] = {}
    graphs = [(proto.graph, "the graph")]
    nodes_lists = [(f.node, f"function {f.name!r}") for f in proto.functions]
    local_domains = {f.domain for f in proto.functions}
    while graphs:
        g, gwhere = graphs.pop()
        for t in g.initializer:
            refuse_external(t, f"an initializer of {gwhere}")
            consts[t.name] = t
        for st in g.sparse_initializer:
            refuse_external(st.values, f"a sparse initializer of {gwhere}")
            refuse_external(st.indices, f"a sparse initializer of {gwhere}")
        nodes_lists.append((g.node, gwhere))
        for node in g.node:
            for attr in node.attribute:
                if attr.type == A.GRAPH:
                    graphs.append((attr.g, f"the {attr.name!r} subgraph of {_node_name(node)}"))
                elif attr.type == A.GRAPHS:
                    graphs.extend((sg, f"a {attr.name!r} subgraph of {_node_name(node)}") for sg in attr.graphs)
    for nodes, nwhere in nodes_lists:
        for node in nodes:
            if node.domain not in STANDARD_DOMAINS and not allow_custom_ops:
                kind = "a local function" if node.domain in local_domains else "a custom op"
                raise ArtifactError(
                    f"{where}: {_node_name(node)} in {nwhere} is {kind} of domain {node.domain!r}, which ONNX "
                    "Runtime does not implement itself; pass allow_custom_ops=True if you trust it")
            for attr in node.attribute:
                for t in tensors_of(attr):
                    refuse_external(t, f"attribute {attr.name!r} of {_node_name(node)} in {nwhere}")
                    if node.op_type == "Constant" and node.output:
                        consts[node.output[0]] = t
    for node in proto.graph.node:  # shapes fixed in the file: refuse a constant tensor bomb statically
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in consts:
            try:
                shape = onnx.numpy_helper.to_array(consts[node.input[0]]).reshape(-1)
            except Exception:
                continue
            if (shape < 0).any():
                raise ArtifactError(f"{where}: {_node_name(node)} has a negative shape {shape.tolist()}")
            check_bytes(math.prod(int(d) for d in shape) * 8, f"{where}: {_node_name(node)}", ArtifactError)


def _ort_error(e: Exception, doing: str) -> ArtifactError:
    """An ONNX Runtime failure as one line, naming the node when ORT says which."""
    import re

    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    node = (re.search(r"Name:'([^']*)'", text) or re.search(r"[Nn]ode \(([^)]*)\)", text)
            or re.search(r"node[: ]+'([\w/.:-]+)'", text))
    at = f" at node {node.group(1)!r}" if node else ""
    return ArtifactError(f"ONNX Runtime failed {doing}{at}: {first[:500]}")


def _graph_inputs(proto: onnx.ModelProto) -> list:
    inits = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


# ONNX Runtime's worker threads spin for a while after each run (its default), which serves one model
# called back to back; several sessions called in turn (an ensemble's members) then compete with each
# other's spinning threads for the cores (BENCHMARKS.md, "ONNX Runtime members"). None: the default.
_SPINNING: ContextVar[bool | None] = ContextVar("slimfuse_onnxruntime_spinning", default=None)


@contextmanager
def spinning(allowed: bool) -> Iterator[None]:
    """ONNX Runtime predictors called inside run sessions whose worker threads spin after a run
    (``True``, ONNX Runtime's default) or sleep (``False``). An ensemble runs several ONNX Runtime
    members with ``spinning(False)`` unless its caller chose otherwise."""
    token = _SPINNING.set(bool(allowed))
    try:
        yield
    finally:
        _SPINNING.reset(token)


def spinning_chosen() -> bool:
    """Whether a caller has chosen with :func:`spinning`."""
    return _SPINNING.get() is not None


class OnnxPredictor(nn.Module):
    """An ONNX model run by ONNX Runtime, as an ``nn.Module`` (inference only, no gradients).

    ``threads``: intra-op threads of the session (``None``: follow ``torch.get_num_threads()`` at
    call time, which is what ``measure`` sets, so both runtimes get the same cores).
    ``input_layout``: ``nhwc`` transposes NCHW image batches for models exported from
    TensorFlow/Keras; inputs are then reshaped to the model's static input shape when the element
    count matches (e.g. an MLP that expects flat vectors). ``output``: ``logits``, ``proba``
    (the model ends in softmax: forward returns log-probabilities, which are valid logits), or
    ``auto`` (``proba`` when the graph's output is produced by a Softmax node).
    """

    slimfuse_runtime = "onnxruntime"

    def __init__(self, nbytes: int, sha256: str = "", threads: int | None = None,
                 input_layout: str = "nchw", output: str = "auto", allow_custom_ops: bool = False):
        super().__init__()
        self.allow_custom_ops = bool(allow_custom_ops)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
            raise ConfigError(f"nbytes must be a positive integer, got {nbytes!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"threads must be a positive integer or None, got {threads!r}")
        if input_layout not in LAYOUTS:
            raise ConfigError(f"input_layout must be one of {', '.join(LAYOUTS)}, got {input_layout!r}")
        if output not in OUTPUTS:
            raise ConfigError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        self.sha256, self.threads, self.input_layout, self.output = sha256, threads, input_layout, output
        self.register_buffer("onnx_model", torch.zeros(nbytes, dtype=torch.uint8))
        self._sessions: dict[tuple[int, bool], object] = {}
        self.register_load_state_dict_post_hook(lambda module, _keys: module._reset(check=True))

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes, *, threads: int | None = None, input_layout: str = "nchw",
                   output: str = "auto", where: str = "ONNX model", allow_custom_ops: bool = False) -> OnnxPredictor:
        """A predictor for serialized ONNX ``data`` (checked first); the spec records how to rebuild it."""
        proto = parse_onnx(data, where=where, allow_custom_ops=allow_custom_ops)
        digest = hashlib.sha256(data).hexdigest()
        pred = cls(len(data), digest, threads, input_layout, output, allow_custom_ops)
        pred.onnx_model.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        pred.__dict__["proto"] = proto
        args = {"nbytes": len(data), "sha256": digest, "threads": threads, "input_layout": input_layout,
                "output": output}
        if allow_custom_ops:
            args["allow_custom_ops"] = True
        return attach(pred, {"arch": "onnx", "args": args})

    def _reset(self, *, check: bool) -> None:
        self._sessions = {}
        self.__dict__.pop("proto", None)
        self.__dict__.pop("_io", None)
        if check:
            data = self.model_bytes()
            if self.sha256 and hashlib.sha256(data).hexdigest() != self.sha256:
                raise ArtifactError("the stored ONNX model does not match the SHA-256 in its card (corrupt artifact)")
            self.__dict__["proto"] = parse_onnx(data, where="stored ONNX model", allow_custom_ops=self.allow_custom_ops)

    def model_bytes(self) -> bytes:
        return self.onnx_model.numpy().tobytes()

    @cached_property
    def proto(self) -> onnx.ModelProto:
        return parse_onnx(self.model_bytes(), allow_custom_ops=self.allow_custom_ops)

    # -- inference --------------------------------------------------------------------------------
    @cached_property
    def _io(self) -> dict:
        feed = _graph_inputs(self.proto)[0]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in feed.type.tensor_type.shape.dim]
        out = self.proto.graph.output[0].name
        producer = next((n.op_type for n in self.proto.graph.node if out in n.output), None)
        proba = self.output == "proba" or (self.output == "auto" and producer == "Softmax")
        dtype = _INPUT_DTYPES[feed.type.tensor_type.elem_type]
        return {"input": feed.name, "dims": dims, "output": out, "proba": proba, "dtype": dtype}

    def session(self, threads: int | None = None):
        """The ONNX Runtime session for ``threads`` intra-op threads (cached); inside
        ``spinning(False)`` one whose worker threads do not spin after a run."""
        import onnxruntime as ort

        n = threads or self.threads or torch.get_num_threads()
        key = (n, _SPINNING.get() is not False)
        if key not in self._sessions:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = n
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if not key[1]:
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                self._sessions[key] = ort.InferenceSession(self.model_bytes(), opts, providers=providers())
            except Exception as e:  # ORT rejects a checked model: unsupported op or opset
                raise _ort_error(e, "to create a session for this model") from None
        return self._sessions[key]

    def feed(self, x) -> np.ndarray:
        """``x`` (torch or numpy, N x ...) as the array the ONNX input expects (float32 or int64)."""
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        x = x.astype(self._io["dtype"], copy=False)
        if self.input_layout == "nhwc" and x.ndim == 4:
            x = x.transpose(0, 2, 3, 1)
        dims = self._io["dims"]
        if len(dims) >= 2 and all(d is not None for d in dims[1:]) and list(x.shape[1:]) != dims[1:]:
            if math.prod(dims[1:]) != math.prod(x.shape[1:]):
                raise ConfigError(f"the ONNX model expects inputs of shape {dims[1:]}, got {list(x.shape[1:])}")
            x = x.reshape(len(x), *dims[1:])
        return np.ascontiguousarray(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        session, feed = self.session(), self.feed(x)
        try:
            out = session.run([self._io["output"]], {self._io["input"]: feed})[0]
        except Exception as e:  # a graph that passes the checker but fails at run time (bad Reshape ...)
            raise _ort_error(e, "running this model") from None
        y = torch.from_numpy(np.asarray(out, dtype=np.float32))
        if self._io["proba"]:
            y = y.clamp_min(1e-12).log()
        return y.to(x.device) if isinstance(x, torch.Tensor) else y

    # -- measurement hooks ------------------------------------------------------------------------
    def slimfuse_device(self) -> str:
        """Where the session runs: ``cuda`` when its first provider is ONNX Runtime's CUDA one, else ``cpu``."""
        return "cuda" if self.session().get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def slimfuse_artifact_bytes(self) -> int:
        """Bytes of the ``.onnx`` file this predictor deploys as."""
        return int(self.onnx_model.numel())

    def slimfuse_counts(self) -> dict[str, int]:
        return dict(self._stats["counts"])

    def slimfuse_macs(self) -> int | None:
        return self._stats["macs"]

    def slimfuse_classes(self) -> int | None:
        """The output's last dimension when the graph states it (the class count of a classifier)."""
        dims = self.proto.graph.output[0].type.tensor_type.shape.dim
        return int(dims[-1].dim_value) if len(dims) >= 2 and dims[-1].HasField("dim_value") else None

    @cached_property
    def _stats(self) -> dict:
        return graph_stats(self.proto)

    def __getstate__(self):  # sessions cannot be copied or pickled; they are rebuilt on demand
        state = {k: v for k, v in self.__dict__.items() if k not in ("proto", "_io", "_stats")}
        state["_sessions"] = {}
        return state

    def extra_repr(self) -> str:
        return f"bytes={self.onnx_model.numel()}, threads={self.threads}, input_layout={self.input_layout!r}"


register("onnx")(OnnxPredictor)


def load_onnx(path: str | Path, *, threads: int | None = None, input_layout: str = "nchw",
              output: str = "auto", allow_custom_ops: bool = False) -> OnnxPredictor:
    """Load an ``.onnx`` file as an :class:`OnnxPredictor` (checked; ArtifactError if invalid or foreign).

    ``allow_custom_ops``: accept ops from domains ONNX Runtime does not implement itself.

    A file written by ``slimfuse.export`` brings back the source model's lineage and task; any other
    ONNX file starts a lineage with an ``import_onnx`` step.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such ONNX file")
    data = path.read_bytes()
    pred = OnnxPredictor.from_bytes(data, threads=threads, input_layout=input_layout, output=output, where=str(path),
                                    allow_custom_ops=allow_custom_ops)
    meta = read_metadata(pred.proto)
    if meta is not None:
        return attach(pred, pred.slimfuse["spec"], lineage=meta.get("lineage"), task=meta.get("task"))
    return derive(pred, pred, "import_onnx", producer=pred.proto.producer_name or None, file=path.name)


def ensemble_graph(members: list[OnnxPredictor], method: str, log_weights: list[float],
                   temperature: float = 1.0) -> onnx.ModelProto | None:
    """One ONNX graph holding every member and the combiner: the members' graphs side by side on one
    shared input, each output as logits (log p for a member that outputs probabilities), stacked
    (K, B, C), then ``mean`` / ``weighted``: log sum_k w_k softmax(z_k) (LogSoftmax, the log weights
    added, ReduceLogSumExp over the members; a temperature as ``LogSoftmax(out / T)``), or
    ``mean-logits``: LogSoftmax of the mean logits. ``None`` when the members cannot share one graph
    (different input layouts, dtypes or sample shapes, class counts not stated alike in the graphs,
    different opset imports, opset < 13)."""
    if method not in ("mean", "weighted", "mean-logits") or len(members) < 2:
        return None
    protos, ios = [m.proto for m in members], [m._io for m in members]
    imports = [{o.domain or "ai.onnx": o.version for o in p.opset_import} for p in protos]
    opset = imports[0].get("ai.onnx", 0)
    if (len({m.input_layout for m in members}) > 1 or len({io["dtype"] for io in ios}) > 1
            or any(io["dims"][1:] != ios[0]["dims"][1:] for io in ios) or any(i != imports[0] for i in imports)
            or opset < 13 or any(len(_graph_inputs(p)) != 1 for p in protos)
            or members[0].slimfuse_classes() is None
            or any(m.slimfuse_classes() != members[0].slimfuse_classes() for m in members)):
        return None
    from onnx import TensorProto, compose, helper

    shared = "input"  # the members' own names all start "m{i}/", the combiner's never do
    nodes, inits, stacked, functions = [], [], [], []
    for i, (proto, io) in enumerate(zip(protos, ios)):
        prefixed = compose.add_prefix(proto, f"m{i}/")
        g = prefixed.graph
        functions.extend(prefixed.functions)
        nodes.append(helper.make_node("Identity", [shared], [f"m{i}/{io['input']}"], name=f"ens/m{i}/input"))
        nodes.extend(g.node)
        inits.extend(g.initializer)
        out = f"m{i}/{io['output']}"
        if io["proba"]:  # the predictor's own log(max(p, 1e-12))
            inits.append(numpy_helper.from_array(np.array(1e-12, np.float32), f"ens/m{i}/eps"))
            nodes += [helper.make_node("Max", [out, f"ens/m{i}/eps"], [f"ens/m{i}/clamped"]),
                      helper.make_node("Log", [f"ens/m{i}/clamped"], [f"ens/m{i}/logits"])]
            out = f"ens/m{i}/logits"
        nodes.append(helper.make_node("Unsqueeze", [out, "axis0"], [f"ens/m{i}/stacked"]))
        stacked.append(f"ens/m{i}/stacked")
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "axis0"))
    nodes.append(helper.make_node("Concat", stacked, ["members"], axis=0))

    def reduce(op, x, y):  # axes an input from opset 18 on, an attribute before
        if opset >= 18:
            return helper.make_node(op, [x, "axis0"], [y], keepdims=0)
        return helper.make_node(op, [x], [y], axes=[0], keepdims=0)

    if method == "mean-logits":
        nodes += [reduce("ReduceMean", "members", "mean"),
                  helper.make_node("LogSoftmax", ["mean"], ["log_probs"], axis=-1)]
    else:
        inits.append(numpy_helper.from_array(np.asarray(log_weights, np.float32).reshape(-1, 1, 1), "log_weights"))
        last = "log_probs" if temperature == 1.0 else "untempered"
        nodes += [helper.make_node("LogSoftmax", ["members"], ["member_log_probs"], axis=-1),
                  helper.make_node("Add", ["member_log_probs", "log_weights"], ["weighted"]),
                  reduce("ReduceLogSumExp", "weighted", last)]
        if temperature != 1.0:
            inits.append(numpy_helper.from_array(np.array(temperature, np.float32), "temperature"))
            nodes += [helper.make_node("Div", [last, "temperature"], ["tempered"]),
                      helper.make_node("LogSoftmax", ["tempered"], ["log_probs"], axis=-1)]
    first = _graph_inputs(protos[0])[0]
    graph_input = onnx.ValueInfoProto()
    graph_input.CopyFrom(first)
    graph_input.name = shared
    dims = first.type.tensor_type.shape.dim
    batch = (dims[0].dim_value if dims[0].HasField("dim_value") else dims[0].dim_param or "batch") if dims else "batch"
    out_info = helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, [batch, members[0].slimfuse_classes()])
    graph = helper.make_graph(nodes, "slimfuse_ensemble", [graph_input], [out_info], initializer=inits)
    model = helper.make_model(graph, opset_imports=list(protos[0].opset_import), functions=functions,
                              ir_version=max(p.ir_version for p in protos), producer_name="slimfuse")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError:
        return None
    return model


def from_proto(proto: onnx.ModelProto, source: nn.Module | None = None, **kwargs) -> OnnxPredictor:
    """An :class:`OnnxPredictor` for an in-memory ModelProto, keeping ``source``'s lineage and task."""
    pred = OnnxPredictor.from_bytes(proto.SerializeToString(), **kwargs)
    if source is not None:
        attach(pred, pred.slimfuse["spec"], lineage=lineage_of(source), task=task_of(source))
    return pred


def read_metadata(proto: onnx.ModelProto) -> dict | None:
    """The slimfuse lineage/task stored in an ONNX file's metadata (None for foreign files)."""
    for prop in proto.metadata_props:
        if prop.key == META_KEY:
            try:
                meta = json.loads(prop.value)
            except ValueError:  # not JSON, or not UTF-8 (protobuf decodes string fields lazily)
                return None
            if isinstance(meta, dict) and isinstance(meta.get("lineage"), list):
                return meta if meta.get("task") is None or isinstance(meta["task"], dict) else None
    return None


def write_metadata(proto: onnx.ModelProto, model: nn.Module) -> None:
    """Record ``model``'s lineage and task in ``proto``'s metadata (replacing an earlier record)."""
    keep = [p for p in proto.metadata_props if p.key != META_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    value = json.dumps({"lineage": lineage_of(model), "task": task_of(model)}, sort_keys=True)
    proto.metadata_props.add(key=META_KEY, value=value)


def graph_stats(proto: onnx.ModelProto) -> dict:
    """Parameters, non-zeros (weights and biases, not quantization scales) and MACs per sample."""
    qparams = set()
    for node in proto.graph.node:
        for i in _QPARAM_INPUTS.get(node.op_type, ()):
            if i < len(node.input):
                qparams.add(node.input[i])
    params = nonzeros = 0
    for t in proto.graph.initializer:
        if t.name in qparams or t.data_type == onnx.TensorProto.INT64:
            continue
        arr = numpy_helper.to_array(t)
        params += arr.size
        nonzeros += int(np.count_nonzero(arr))
    return {"counts": {"params": params, "nonzeros": nonzeros}, "macs": _macs(proto)}


def _macs(proto: onnx.ModelProto) -> int | None:
    """Multiply-accumulates of MatMul/Gemm/Conv-like nodes for batch 1, from ONNX shape inference."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for feed in _graph_inputs(model):
        dims = feed.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = 1
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return None
    shapes = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = v.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    total = 0
    for node in model.graph.node:
        op = node.op_type
        if op in ("MatMul", "MatMulInteger", "Gemm", "QGemm", "QLinearMatMul", "DynamicQuantizeMatMul"):
            a_i, b_i = (0, 3) if op in ("QLinearMatMul", "QGemm") else (0, 1)
            a, b, out = shapes.get(node.input[a_i]), shapes.get(node.input[b_i]), shapes.get(node.output[0])
            if a is None or b is None or out is None:
                return None
            k = a[-1]
            if op in ("Gemm", "QGemm") and any(at.name == "transA" and at.i for at in node.attribute):
                k = a[0]
            total += math.prod(out) * k
        elif op in ("Conv", "ConvInteger", "QLinearConv"):
            w, out = shapes.get(node.input[3 if op == "QLinearConv" else 1]), shapes.get(node.output[0])
            if w is None or out is None:
                return None
            total += math.prod(out) * math.prod(w[1:])
    return int(total)

"""Artifacts: a folder with ``weights.safetensors`` and ``card.json``.

Loading never unpickles: tensors come from safetensors, the architecture is
rebuilt from the card's spec. Writes go to a temporary sibling folder that is
renamed into place, so a crash never leaves half an artifact.

How tensors are stored is a *codec* (``card["storage"]["codec"]``): ``dense``
writes the state dict as is; compression techniques register codecs that
store sparse or low-bit tensors and restore the exact state on load.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib
import json
import os
import platform
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_bytes
from torch import nn

from .. import limits
from .._version import __version__
from ..distributed import is_main
from ..errors import ArtifactError, ConfigError, SlimfuseError
from ..hardware import summary as hardware_summary
from ..limits import check_bytes
from . import zoo
from .calling import selector, set_output
from .card_schema import validate_card
from .keras import torch_of
from .spec import attach, lineage_of, spec_of, task_of
from .zoo import build, check_params, factory_spec

FORMAT = "slimfuse-artifact"
FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
CARD = "card.json"
MAX_CARD_BYTES = 16 * 2**20
PRECHECK_BYTES = 64 << 20
STALE_SECONDS = 3600  # a temp folder this old belongs to a save that was killed

Encoder = Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], dict]]
Decoder = Callable[[dict[str, torch.Tensor], dict], dict[str, torch.Tensor]]
CODECS: dict[str, tuple[Encoder, Decoder]] = {}


def register_codec(name: str, encode: Encoder, decode: Decoder) -> None:
    """Register a storage codec: ``encode(state) -> (tensors, meta)``, ``decode(tensors, meta) -> state``."""
    CODECS[name] = (encode, decode)


register_codec("dense", lambda state: (state, {}), lambda tensors, meta: tensors)
# codecs registered by higher layers, imported by name when an artifact names one (a plugin table)
PROVIDERS = {"sparse-zstd": "slimfuse.compress.sparse", "codebook": "slimfuse.compress.codebook",
             "half": "slimfuse.compress.quant_torch"}


def _codec(name) -> tuple[Encoder, Decoder] | None:
    if isinstance(name, str) and name not in CODECS and name in PROVIDERS:
        importlib.import_module(PROVIDERS[name])
    return CODECS.get(name) if isinstance(name, str) else None


def save(model: nn.Module, path: str | Path, *, metrics: dict | None = None, codec: str | None = None) -> Path:
    """Write ``model`` as an artifact folder at ``path`` (replacing an earlier artifact there).

    A module from outside slimfuse is recorded by its importable class and constructor arguments
    (:func:`slimfuse.zoo.factory_spec`) and reloads with ``load(path, trust_factory=True)``.
    ``codec`` defaults to the model's preference (``model.slimfuse_codec``) or ``dense``. A codec
    never makes the artifact larger: when its tensors and card (the per-tensor layout counted) would
    take more bytes than the dense form, the dense form is written and the card says ``dense``.
    """
    model = torch_of(model)
    spec = spec_of(model)
    if spec is None and type(model).__module__.startswith("transformers."):
        from .hf import is_hf, spec_for

        if is_hf(model):
            spec = spec_for(model)  # raises ArtifactError saying what its spec cannot record
    if spec is None:  # a user's own module: its importable class and constructor arguments
        spec = factory_spec(model)
    output = selector(model)
    if output is not None and not isinstance(output, (str, int)):
        raise ArtifactError("the model reads its output through a callable (set_output), which an artifact cannot "
                            "record; select it by key or index (slimfuse.set_output(model, 'pooler_output')) or wrap "
                            "the model in a module that returns the tensor")
    codec = codec or getattr(model, "slimfuse_codec", "dense")
    if codec not in CODECS:
        raise ArtifactError(f"unknown storage codec {codec!r} (known: {', '.join(sorted(CODECS))})")
    raw = model.state_dict()
    tied = tied_keys(raw)
    state = {k: v.detach().contiguous().clone() for k, v in raw.items() if k not in tied}
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": spec,
        "task": task_of(model),
        "lineage": lineage_of(model),
        "metrics": metrics or {},
        "versions": {"slimfuse": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "hardware": hardware_summary(),  # the machine that made it (and measured its metrics)
    }
    if output is not None:
        card["output"] = output  # the output selector, restored by load
    card["storage"] = {"tied": tied} if tied else {}  # _encoded adds the codec and its meta
    weights, card_text = _encoded(state, codec, card)
    if codec != "dense":
        # The dense form takes at least its raw tensor bytes: serialize it only when it might win.
        dense_floor = sum(t.numel() * t.element_size() for t in state.values())
        if len(weights) + len(card_text) >= dense_floor:
            dense = _encoded(state, "dense", card)
            if len(dense[0]) + len(dense[1]) <= len(weights) + len(card_text):
                weights, card_text = dense
    path = Path(path)
    try:
        with atomic_folder(path) as tmp:
            _write_file(tmp / WEIGHTS, weights)
            _write_file(tmp / CARD, card_text)
    except OSError as e:
        raise _naming(e, path) from None
    return path


def _naming(e: BaseException, path: Path) -> BaseException:
    """An OSError without a file name (a failed write() or fsync()) gets the output's path."""
    if isinstance(e, OSError) and e.filename is None and e.errno is not None:
        return OSError(e.errno, e.strerror, str(path))
    return e


def save_safetensors(tensors: dict, file: Path, output: Path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, its I/O errors (a full disk ...) raised as the OSError they
    are, naming ``output`` (what the user asked to write)."""
    try:
        save_file(tensors, str(file), metadata=metadata)
    except SafetensorError as e:
        raise _as_os_error(e, output) from None


def _as_os_error(e: Exception, path: Path) -> Exception:
    import re

    code = re.search(r"(?:code: |os error )(\d+)", str(e))
    if code is None:
        return ArtifactError(f"{path}: cannot write safetensors file ({str(e)[:200]})")
    n = int(code.group(1))
    return OSError(n, os.strerror(n), str(path))


def output_path(path: str | Path) -> Path:
    """Where a write to ``path`` really goes: a symlink is followed to its target (so the link
    stays and the target is replaced); a dangling symlink is refused rather than guessed at."""
    path = Path(path)
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.exists() and not target.parent.is_dir():
            raise ConfigError(f"{path}: is a symlink to {target}, whose folder does not exist")
        return target
    return path


def tied_keys(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: first key}`` for state entries that are one tensor under several names (tied weights)."""
    first: dict[tuple, str] = {}
    tied = {}
    for key, t in state.items():
        if t.numel() == 0:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in first:
            tied[key] = first[ident]
        else:
            first[ident] = key
    return tied


def _retie(model: nn.Module, tied: dict[str, str]) -> None:
    """Make each alias the very tensor of its source again (a module that does not tie itself on build)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, source in tied.items():
        if alias in params and source in params and params[alias] is not params[source]:
            owner, _, name = alias.rpartition(".")
            setattr(model.get_submodule(owner), name, params[source])


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _encoded(state: dict[str, torch.Tensor], codec: str, card: dict) -> tuple[bytes, bytes]:
    """(``weights.safetensors`` bytes, ``card.json`` bytes) of ``state`` stored with ``codec``."""
    tensors, codec_meta = CODECS[codec][0](state)
    weights = save_bytes(tensors, metadata={"format": FORMAT})
    card = {**card, "storage": {"codec": codec, "meta": codec_meta, **card.get("storage", {})},
            "weights_sha256": hashlib.sha256(weights).hexdigest()}
    return weights, json.dumps(card, indent=2, sort_keys=True).encode("utf-8")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write one file atomically: a temp file next to ``path``, fsynced, then renamed into place.

    A symlink is followed (its target is replaced); on any failure (a full disk included) the temp
    file is removed, so nothing partial is left. In a data-parallel run only rank 0 writes."""
    if not is_main():
        return
    path = output_path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; give the path of a file to write", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise _naming(e, path) from None


def write_text_atomic(path: str | Path, text: str | bytes) -> None:
    """Write ``text`` (UTF-8) or bytes to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8") if isinstance(text, str) else text)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class atomic_folder:
    """Context manager: yields a temp folder next to ``path``; on success it replaces ``path``.

    An existing ``path`` is replaced only when it holds ``marker`` (an artifact's card.json) or
    is empty; anything else is refused so a user's folder is never clobbered. In a data-parallel
    run only rank 0 writes: other ranks write into a private temp folder that is discarded.
    """

    def __init__(self, path: Path, *, marker: str = CARD):
        self.path, self.marker = Path(path), marker

    def __enter__(self) -> Path:
        self.discard = not is_main()
        if self.discard:
            self.tmp = Path(tempfile.mkdtemp(prefix="slimfuse-rank-"))
            return self.tmp
        self.path = output_path(self.path)
        if self.path.parent.is_dir():  # under the lock: another process may be swapping its save in right now
            with _folder_lock(self.path.parent):
                if self.path.exists() and not _replaceable(self.path, self.marker):
                    raise ArtifactError(f"{self.path} exists and is not a slimfuse artifact; refusing to overwrite it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.path.parent.glob(f".{self.path.name}.tmp-*"):  # left by a killed process
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > STALE_SECONDS:
                    shutil.rmtree(stale, ignore_errors=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or self.discard:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        try:
            for f in self.tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            # Concurrent saves to one path (other processes, other threads) swap one at a time: an
            # exclusive lock on the parent folder, which leaves no lock file behind.
            with _folder_lock(self.path.parent):
                if self.path.exists() and not _replaceable(self.path, self.marker):
                    raise ArtifactError(f"{self.path} exists and is not a slimfuse artifact; refusing to overwrite it")
                if self.path.exists():
                    old = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:8]}"
                    os.replace(self.path, old)
                os.replace(self.tmp, self.path)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if old is not None and not self.path.exists():
                os.replace(old, self.path)  # put the previous artifact back
                old = None
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return False


_THREAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive ``flock`` on ``folder`` itself (plus a lock for this process's threads)."""
    with _THREAD_LOCK:
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _replaceable(path: Path, marker: str) -> bool:
    return path.is_dir() and ((path / marker).is_file() or not any(path.iterdir()))


def read_card(path: str | Path) -> dict:
    """Read and validate an artifact's ``card.json``; raise ArtifactError on anything foreign."""
    path = Path(path)
    if not path.exists():
        backups = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        hint = f" (a save was interrupted; the previous version is in {backups[0]})" if backups else ""
        raise ArtifactError(f"{path}: no such artifact{hint}")
    if path.is_file():
        raise ArtifactError(f"{path}: {_describe_file(path)}; "
                            f"a slimfuse artifact is a folder with {CARD} and {WEIGHTS}")
    card_path = path / CARD
    if not card_path.is_file():
        raise ArtifactError(f"{path}: not a slimfuse artifact (no {CARD})")
    if card_path.stat().st_size > MAX_CARD_BYTES:
        raise ArtifactError(f"{card_path}: implausibly large card ({card_path.stat().st_size} bytes)")
    try:
        card = json.loads(card_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{card_path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ArtifactError(f"{card_path}: JSON nested too deeply to be a card") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ArtifactError(f"{card_path}: not a slimfuse card (format field is not {FORMAT!r})")
    version = card.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArtifactError(f"{card_path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{card_path}: written by a newer slimfuse (format {version}, this one reads up to "
            f"{FORMAT_VERSION}); upgrade slimfuse"
        )
    validate_card(card, card_path)
    return card


def load(path: str | Path, *, trust_factory: bool = False) -> nn.Module:
    """Load an artifact folder; predictions are bit-identical to the saved module's."""
    path = Path(path)
    card = read_card(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{path}: {WEIGHTS} is missing")
    planned, shapes = _planned(card["spec"], trust_factory, path)
    check_bytes(weights.stat().st_size + planned, f"{path} (weights file plus the model its card describes)",
                ArtifactError)
    if card.get("weights_sha256") != _sha256(weights):  # truncation, bit flips, a swapped file
        raise ArtifactError(f"{weights}: checksum does not match {CARD}; the file is corrupt or was replaced")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{weights}: corrupt or truncated safetensors file ({e})") from None
    codec = card["storage"].get("codec", "dense")
    if _codec(codec) is None:
        raise ArtifactError(f"{path}: unknown storage codec {codec!r}")
    # a codec may decode no more than the model the card describes can hold (8 bytes per element
    # at most), whatever sizes its own meta claims: a small file cannot decompress to gigabytes
    bound = limits.cap(8 * planned + (16 << 20)) if planned else contextlib.nullcontext()
    try:
        with bound:
            state = CODECS[codec][1](tensors, card["storage"].get("meta", {}))
    except ArtifactError:
        raise
    except Exception as e:  # a codec reading damaged data
        raise ArtifactError(f"{weights}: cannot decode {codec!r} storage ({e})") from None
    tied = card["storage"].get("tied") or {}
    if not isinstance(tied, dict) or any(not isinstance(s, str) or s not in state for s in tied.values()):
        raise ArtifactError(f"{path}: the card's tied tensors name tensors the weights file does not hold")
    for alias, source in tied.items():  # tied weights are stored once
        state[alias] = state[source]
    # a large model is only allocated once the tensors are known to fit it (small ones are simply
    # built, so a builder whose meta-device state differs from its real one still loads)
    if shapes is not None and planned > PRECHECK_BYTES:
        wrong = sorted(set(shapes) ^ set(state)) or sorted(k for k in state if tuple(state[k].shape) != shapes[k])
        if wrong:
            raise ArtifactError(f"{weights}: tensors do not fit the architecture in {CARD}: "
                                f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''} missing, extra or misshapen")
    # Building initializes weights that load_state_dict then overwrites; doing that on a forked RNG
    # keeps loading from changing the caller's random stream, so a recipe step whose input comes
    # from the cache draws the same numbers as one whose input is still in memory.
    with torch.random.fork_rng(devices=[]):
        model = build(card["spec"], trust_factory=trust_factory)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{weights}: tensors do not fit the architecture in {CARD}: {e}") from None
    _retie(model, tied)
    model.eval()
    attach(model, card["spec"], lineage=card["lineage"], task=card.get("task"))
    if card.get("output") is not None:
        set_output(model, card["output"])
    if codec != "dense":
        object.__setattr__(model, "slimfuse_codec", codec)
    return model


def _planned(spec: dict, trust_factory: bool, path: Path) -> tuple[int, dict | None]:
    """Bytes and state-dict shapes of the model the card's spec implies, found by building it on
    the meta device (no memory is allocated), so a card asking for a huge model is refused
    before it is built. ``(0, None)`` for a builder that cannot run on the meta device."""
    try:
        with torch.device("meta"), torch.random.fork_rng(devices=[]), zoo.probing():
            model = build(spec, trust_factory=trust_factory)
    except SlimfuseError as e:
        raise ArtifactError(f"{path}: {e}") from None
    except Exception as e:  # a builder that cannot run on the meta device is built for real later
        if isinstance(e, (MemoryError, RecursionError)):
            raise ArtifactError(f"{path}: the card's spec is implausible ({type(e).__name__})") from None
        return 0, None
    tensors = [*model.parameters(), *model.buffers()]
    try:
        check_params(f"{path}: the model in {CARD}", sum(t.numel() for t in tensors))
    except SlimfuseError as e:
        raise ArtifactError(str(e)) from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return sum(t.numel() * t.element_size() for t in tensors), shapes


def folder_bytes(path: str | Path) -> int:
    """Total bytes of the files in an artifact folder (what a user ships)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _describe_file(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:1] == b"\x80":
        return "is a Python pickle; slimfuse never unpickles files"
    if head[:2] == b"PK":
        return "is a zip archive (torch.save output is a pickle inside a zip); slimfuse never unpickles files"
    return "is a file, not an artifact folder"

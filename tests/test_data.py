import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slimfuse as sf
from slimfuse import DataError


def test_builtin_shapes_and_ranges(mnist, digits):
    assert mnist.task.input_shape == (1, 28, 28) and mnist.task.num_classes == 10
    assert len(mnist.train) + len(mnist.val) + len(mnist.test) == 5000
    assert float(mnist.train.x.min()) >= 0.0 and float(mnist.train.x.max()) <= 1.0
    assert mnist.train.x.dtype == torch.float32 and mnist.train.y.dtype == torch.int64
    assert digits.task.input_shape == (1, 8, 8) and len(digits.test) == 360


def test_splits_reproducible_and_seeded(mnist):
    again = sf.datasets.load("mnist5k", seed=0)
    for a, b in zip(mnist, again):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    other = sf.datasets.load("mnist5k", seed=1)
    assert not torch.equal(mnist.test.y, other.test.y)


def test_splits_are_stratified_and_disjoint(mnist):
    assert torch.bincount(mnist.test.y).tolist() == [100] * 10
    rows = lambda s: {r.numpy().tobytes() for r in s.x}  # noqa: E731
    assert not rows(mnist.test) & rows(mnist.val)


def test_npz_with_ready_made_splits_and_class_names(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"{a}_{s}": None for a in "Xy" for s in ("train", "val", "test")}
    for s, n in (("train", 30), ("val", 10), ("test", 12)):
        arrays[f"X_{s}"] = rng.normal(size=(n, 5))
        arrays[f"y_{s}"] = rng.integers(0, 3, n)
    np.savez(tmp_path / "d.npz", class_names=np.array(["a", "b", "c"]), **arrays)
    d = sf.datasets.load(tmp_path / "d.npz")
    assert (len(d.train), len(d.val), len(d.test)) == (30, 10, 12)
    assert d.task.class_names == ("a", "b", "c") and d.task.input_shape == (5,)


def test_csv_with_string_labels(tmp_path):
    lines = ["f1,f2,kind"] + [f"{i},{i % 7},{'cat' if i % 2 else 'dog'}" for i in range(60)]
    (tmp_path / "d.csv").write_text("\n".join(lines))
    d = sf.datasets.load(tmp_path / "d.csv", label="kind")
    assert d.task.class_names == ("cat", "dog") and d.task.num_classes == 2
    assert d.train.x.shape[1] == 2


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _write(path, content):
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


BAD_DATA = [
    ("nan", lambda p: _npz(p / "d.npz", X=np.array([[np.nan, 1.0]] * 20), y=np.arange(20) % 2), "NaN"),
    ("inf", lambda p: _npz(p / "d.npz", X=np.array([[np.inf, 1.0]] * 20), y=np.arange(20) % 2), "NaN/inf"),
    ("label range", lambda p: _npz(p / "d.npz", X=np.ones((20, 2)), y=np.arange(20) % 4,
                                   class_names=np.array(["a", "b"])),
     "outside the class range"),
    ("negative label", lambda p: _npz(p / "d.npz", X=np.ones((20, 2)), y=-(np.arange(20) % 2)), ">= 0"),
    ("length mismatch", lambda p: _npz(p / "d.npz", X=np.ones((20, 2)), y=np.arange(19) % 2), "19"),
    ("missing y", lambda p: _npz(p / "d.npz", X=np.ones((20, 2))), "missing array(s) y"),
    ("object array", lambda p: _npz(p / "d.npz", X=np.array([{"a": 1}] * 20, dtype=object), y=np.arange(20) % 2),
     "unpickling"),
    ("empty npz", lambda p: _write(p / "d.npz", b""), "empty"),
    ("garbage npz", lambda p: _write(p / "d.npz", b"\x00garbage" * 10), "not a valid .npz"),
    ("missing column", lambda p: _write(p / "d.csv", "a,b\n1,2\n"), "no label column 'label'"),
    ("empty csv", lambda p: _write(p / "d.csv", "\n\n"), "empty"),
    ("header only", lambda p: _write(p / "d.csv", "a,label\n"), "no data rows"),
    ("non-numeric", lambda p: _write(p / "d.csv", "a,label\n1,0\nx,1\n"), "'x' is not a number"),
    ("ragged csv", lambda p: _write(p / "d.csv", "a,label\n1,0\n1,2,3\n"), "3 fields"),
    ("stray carriage return", lambda p: _write(p / "d.csv", "a,label\n1\r2,0\n3,1\n"), "1 fields"),
    ("latin-1 csv", lambda p: _write(p / "d.csv", "a,label\n\xe9,0\n".encode("latin-1")), "UTF-8"),
    ("one class", lambda p: _write(p / "d.csv", "a,label\n" + "1,0\n" * 20), "at least 2 classes"),
    ("suffix", lambda p: _write(p / "d.txt", "1,2"), "unsupported file type"),
    ("unknown name", lambda p: p / "nope", "unknown data set"),
    # crafted and corrupt bytes (mutation fuzzing found each of these kinds)
    ("npz header bomb", lambda p: _npz_bomb(p / "d.npz"), "declares an array of shape (100000000000,)"),
    ("encrypted member", lambda p: _npz_flag(p / "d.npz", 0x1), "is encrypted"),
    ("unsupported zip version", lambda p: _npz_patch(p / "d.npz", "version"), "not a valid .npz"),
    ("unsupported compression", lambda p: _npz_patch(p / "d.npz", "method"), "not a valid .npz"),
    ("corrupt deflate stream", lambda p: _npz_patch(p / "d.npz", "deflate"), "not a valid .npz"),
    ("bad npy header", lambda p: _npz_patch(p / "d.npz", "header"), "not a valid .npz"),
    ("zero-size axis", lambda p: _npz(p / "d.npz", X=np.ones((20, 0)), y=np.arange(20) % 2), "zero-size feature axis"),
    ("csv label 1e9", lambda p: _write(p / "d.csv", "a,label\n" + "1,0\n2,1000000000\n" * 5),
     "implies 1,000,000,001 classes"),
    ("csv label 3e8", lambda p: _write(p / "d.csv", "a,label\n" + "1,0\n2,300000000\n" * 5),
     "implies 300,000,001 classes"),
    ("csv label beyond int64", lambda p: _write(p / "d.csv", "a,label\n1,0\n2,99999999999999999999999\n"),
     "does not fit a 64-bit integer"),
    ("npz label 1e9", lambda p: _npz(p / "d.npz", X=np.ones((20, 2)), y=np.arange(20) * 10**8),
     "classes for 20 samples"),
]


def _npz_bomb(path):
    """An .npz of 300 bytes whose X.npy header declares 10^11 float64 values."""
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (10**11,)})
    buf.write(b"\0" * 8)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("X.npy", buf.getvalue())
        z.writestr("y.npy", _npy(np.arange(10) % 2))
    return path


def _npy(a):
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _npz_flag(path, flag):
    import zipfile

    np.savez_compressed(path, X=np.ones((20, 2)), y=np.arange(20) % 2)
    blob = bytearray(path.read_bytes())
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # local header and central directory entries
        at = blob.find(sig)
        while at >= 0:
            off = 6 if sig == b"PK\x03\x04" else 8
            blob[at + off] |= flag
            at = blob.find(sig, at + 4)
    path.write_bytes(bytes(blob))
    assert zipfile.is_zipfile(path)
    return path


def _npz_patch(path, what):
    np.savez_compressed(path, X=np.arange(200.0).reshape(100, 2), y=np.arange(100) % 2)
    blob = bytearray(path.read_bytes())
    local = blob.find(b"PK\x03\x04")
    central = blob.find(b"PK\x01\x02")
    if what == "version":  # "needs zip version 9.9 to extract"
        blob[central + 6] = 99
        blob[local + 4] = 99
    elif what == "method":  # compression method 99 (AES), unsupported
        blob[central + 10] = 99
        blob[local + 8] = 99
    elif what == "deflate":  # damage the compressed stream of the first member
        name_len = blob[local + 26] | blob[local + 27] << 8
        start = local + 30 + name_len
        for i in range(start, start + 40):
            blob[i] ^= 0x5A
    else:  # the .npy header of a stored member made into garbage
        np.savez(path, X=np.arange(200.0).reshape(100, 2), y=np.arange(100) % 2)
        blob = bytearray(path.read_bytes())
        at = blob.find(b"{'descr'")
        blob[at:at + 8] = b"{'\xff\xfe\x00\x00\x00"
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.parametrize("case,make,message", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_raises_one_clear_data_error(tmp_path, case, make, message):
    path = make(tmp_path)
    with pytest.raises(DataError) as err:
        sf.datasets.load(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400), st.sampled_from([".csv", ".npz"]))
def test_readers_never_fail_with_anything_but_data_error(tmp_path, blob, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(blob)
    try:
        sf.datasets.load(path)
    except DataError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=3)),
                         min_size=2, max_size=4), min_size=1, max_size=30))
def test_csv_reader_on_fuzzed_tables(tmp_path, table):
    width = len(table[0])
    text = ",".join(f"c{i}" for i in range(width - 1)) + ",label\n"
    text += "\n".join(",".join(str(v).replace(",", ";").replace("\n", " ") for v in row) for row in table)
    path = tmp_path / "fuzz.csv"
    path.write_text(text)
    try:
        d = sf.datasets.load(path)
    except DataError:
        return
    assert torch.isfinite(d.train.x).all()
    assert int(d.train.y.max()) < d.task.num_classes


def test_data_larger_than_memory_is_refused_before_loading(tmp_path, monkeypatch):
    np.savez(tmp_path / "d.npz", X=np.ones((100, 4)), y=np.arange(100) % 2)
    monkeypatch.setenv("SLIMFUSE_MAX_BYTES", "1000")
    with pytest.raises(DataError, match="over the limit of 1,000 bytes"):
        sf.datasets.load(tmp_path / "d.npz")

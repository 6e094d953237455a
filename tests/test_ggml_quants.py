"""GGML block quantizers: byte-exactness against real ggml goldens, error bounds, API checks.

Goldens: tests/data/ggml_golden/ggml_golden.npz, produced by tools/make_ggml_goldens.py from
ggml 0.9.8 (stable-diffusion-cpp-python 0.4.7) with ``ggml_quantize_chunk(..., imatrix=NULL)``.
"""
from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import pytest

from convkit.kernels import QTYPES, block_info, dequantize, quantize

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "data", "ggml_golden", "ggml_golden.npz")
LEGACY = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")

# Relative RMSE bound ||x - deq(q(x))|| / ||x|| on standard-normal data (rows of 4096).
# Measured values (2026-06, this implementation == ggml): Q8_0 0.0053, Q6_K 0.0177,
# Q5_K 0.0361, Q5_1 0.0377, Q5_0 0.0427, Q4_K 0.0713, Q4_1 0.0780, Q4_0 0.0857, Q3_K 0.151,
# Q2_K 0.296.  Bounds leave ~10 % headroom.
REL_RMSE_BOUND = {
    "Q8_0": 0.006, "Q6_K": 0.020, "Q5_K": 0.040, "Q5_1": 0.042, "Q5_0": 0.047,
    "Q4_K": 0.079, "Q4_1": 0.086, "Q4_0": 0.095, "Q3_K": 0.167, "Q2_K": 0.326,
}


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as g:
        return {k: g[k] for k in g.files}


def test_golden_metadata(golden):
    meta = json.loads(str(golden["meta"]))
    assert meta["ggml_version"] and set(meta["qtypes"]) == set(QTYPES)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n", [256, 512, 3072])
def test_matches_ggml_golden_bytes(golden, qtype, n):
    x = golden[f"x_{n}"]
    want = golden[f"{qtype}_{n}"]
    got = quantize(x, qtype)
    assert got.dtype == np.uint8 and got.shape == want.shape
    if not np.array_equal(got, want):
        ts = block_info(qtype)[1]
        bad = np.nonzero((got.reshape(-1, ts) != want.reshape(-1, ts)).any(axis=1))[0]
        pytest.fail(f"{qtype} n={n}: {bad.size} blocks differ from ggml, first {bad[:8]}")


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantized_error_bound(qtype):
    rng = np.random.default_rng(123)
    x = rng.standard_normal((16, 4096)).astype(np.float32)
    y = dequantize(quantize(x, qtype), qtype, 4096)
    assert y.shape == x.shape and y.dtype == np.float32
    rel = float(np.sqrt(np.mean((x - y) ** 2) / np.mean(x ** 2)))
    assert rel <= REL_RMSE_BOUND[qtype], (qtype, rel)


@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_equals_gguf_py(qtype):
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 1024)).astype(np.float32)
    x[0, :64] = 0.0
    x[1] *= np.float32(1e-6)
    x[2] = np.float32(0.25)
    want = gguf_quantize(x, GGMLQuantizationType[qtype])
    assert np.array_equal(quantize(x, qtype), want)


@pytest.mark.parametrize("qtype", QTYPES)
def test_shapes(qtype):
    bs, ts = block_info(qtype)
    x = np.random.default_rng(0).standard_normal((3, 2 * 256)).astype(np.float32)
    out = quantize(x, qtype)
    assert out.shape == (3, 2 * 256 // bs * ts) and out.dtype == np.uint8
    # rows are independent: quantizing one row alone gives the same bytes
    assert np.array_equal(quantize(x[1:2], qtype), out[1:2])
    # float16 / float64 input is converted to float32 first
    assert np.array_equal(quantize(x.astype(np.float64), qtype), out)
    assert quantize(np.zeros((0, 256), np.float32), qtype).shape == (0, 256 // bs * ts)


def test_block_info():
    assert block_info("Q4_K") == (256, 144)
    assert block_info("q8_0") == (32, 34)
    assert block_info("Q6_K") == (256, 210)
    assert block_info("Q2_K") == (256, 84)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "Q3_K"])
def test_bad_row_length_raises(qtype):
    bs = block_info(qtype)[0]
    with pytest.raises(ValueError, match=f"multiple of {bs}"):
        quantize(np.zeros((2, bs + 16), np.float32), qtype)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2-D"):
        quantize(np.zeros(256, np.float32), "Q4_K")
    with pytest.raises(ValueError, match="unknown GGML quantization type"):
        quantize(np.zeros((1, 256), np.float32), "Q7_K")
    with pytest.raises(ValueError, match="not supported"):
        quantize(np.zeros((1, 256), np.float32), "IQ2_XXS")
    with pytest.raises(ValueError, match="floating point"):
        quantize(np.zeros((1, 256), np.int32), "Q4_K")
    with pytest.raises(ValueError, match="bytes"):
        dequantize(np.zeros((1, 100), np.uint8), "Q4_K")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"])
def test_threads_and_out_buffer_give_same_bytes(golden, qtype, monkeypatch):
    """nthreads > 1 (runs of blocks on a thread pool) and ``out=`` change nothing."""
    import convkit.kernels.ggml_quants as gq

    monkeypatch.setattr(gq, "CHUNK_VALUES", 2048)     # many runs of blocks, uneven last one
    x = golden["x_3072"]
    want = golden[f"{qtype}_3072"]
    assert np.array_equal(quantize(x, qtype, nthreads=3), want)
    buf = np.full(want.size, 0xAB, np.uint8)
    got = quantize(x, qtype, out=buf, nthreads=2)
    assert np.array_equal(got, want) and np.shares_memory(got, buf)
    with pytest.raises(ValueError, match="out must be"):
        quantize(x, qtype, out=np.empty(want.size - 1, np.uint8))


# --- optional: live comparison with a local ggml build (dev machines only; skipped in CI) ----

def _ggml_ref():
    sys.path.insert(0, os.path.join(HERE, "..", "tools"))
    try:
        from make_ggml_goldens import DEFAULT_GLOBS, GGMLRef
    finally:
        sys.path.pop(0)
    lib = os.environ.get("CONVKIT_GGML_LIB")
    hits = [lib] if lib else [h for p in DEFAULT_GLOBS for h in sorted(glob.glob(p))]
    if not hits:
        return None
    try:
        return GGMLRef(hits[0])
    except OSError:
        return None


@pytest.mark.parametrize("qtype", QTYPES)
def test_matches_live_ggml_random(qtype):
    ref = _ggml_ref()
    if ref is None:
        pytest.skip("no local ggml library (see tools/make_ggml_goldens.py)")
    rng = np.random.default_rng(99)
    xs = [
        rng.standard_normal((16, 1024)).astype(np.float32),
        rng.standard_t(2, (16, 1024)).astype(np.float32),
        (np.exp(rng.uniform(-14, 8, (8, 1024))) * rng.choice([-1, 1], (8, 1024))).astype(
            np.float32),
        (np.round(rng.standard_normal((8, 1024)) * 3) / 4).astype(np.float32),
    ]
    for x in xs:
        assert np.array_equal(quantize(x, qtype), ref.quantize(x, qtype))


def _random_superblocks(rng, nsb: int) -> np.ndarray:
    """nsb random 256-value super-blocks made of 16-value groups of varied kinds: tiny..huge
    groups, zero / -0.0 / constant groups, +-a ties with zeros, one-sided, single spikes, heavy
    tails, few distinct values, subnormals, +0/-0 next to positives; then a per-super-block
    scale (tiny or huge super-blocks)."""
    g = rng.standard_normal((nsb, 16, 16)).astype(np.float32)
    kind = rng.integers(0, 12, (nsb, 16))
    scale = np.exp(rng.uniform(-30, 25, (nsb, 16, 1))).astype(np.float32)
    g = g * np.where(kind[..., None] == 0, scale, np.float32(1.0))
    g[kind == 1] = 0.0
    g[kind == 2] = np.float32(-0.0)
    g[kind == 3] = rng.choice(np.float32([-1.5, 0.25, 3.0]), (np.sum(kind == 3), 1))
    m = kind == 4
    g[m] = rng.choice(np.float32([-0.5, 0.5, 0.0, -0.0, 0.25]), (np.sum(m), 16))
    m = kind == 5
    g[m] = np.abs(g[m])
    m = kind == 6
    g[m] = -np.abs(g[m])
    m = kind == 7
    g[m] = 0.0
    g[m, rng.integers(0, 16, np.sum(m))] = rng.standard_normal(np.sum(m)).astype(np.float32) * 10
    m = kind == 8
    g[m] = rng.standard_t(1.5, (np.sum(m), 16)).astype(np.float32)
    m = kind == 9
    g[m] = (np.round(rng.standard_normal((np.sum(m), 16)) * 4) / 8).astype(np.float32)
    m = kind == 10
    g[m] = (rng.standard_normal((np.sum(m), 16)) * 1e-39).astype(np.float32)
    m = kind == 11
    g[m] = np.abs(g[m])
    g[m, :2] = np.float32([0.0, -0.0])
    x = g.reshape(nsb, 256) * np.exp(rng.uniform(-20, 20, (nsb, 1))).astype(np.float32)
    assert np.isfinite(x).all()
    return x


@pytest.mark.parametrize("qtype", QTYPES)
def test_matches_live_ggml_random_superblocks(qtype):
    """7,328 random super-blocks (58,624 legacy blocks) per type, bytes equal to ggml's."""
    ref = _ggml_ref()
    if ref is None:
        pytest.skip("no local ggml library (see tools/make_ggml_goldens.py)")
    x = _random_superblocks(np.random.default_rng(2024), 7328)
    got, want = quantize(x, qtype), ref.quantize(x, qtype)
    if not np.array_equal(got, want):
        ts = block_info(qtype)[1]
        bad = np.nonzero((got.reshape(-1, ts) != want.reshape(-1, ts)).any(axis=1))[0]
        pytest.fail(f"{qtype}: {bad.size} blocks differ from ggml, first {bad[:8]}")


@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_numba_equals_numpy_version(qtype):
    from convkit.kernels import legacy

    rng = np.random.default_rng(11)
    x = np.concatenate([rng.standard_normal((64, 32)), np.zeros((2, 32)),
                        np.full((2, 32), -0.75), rng.standard_normal((4, 32)) * 1e-7,
                        rng.standard_normal((4, 32)) * 3e4]).astype(np.float32)
    assert np.array_equal(legacy.QUANTIZERS[qtype](x), legacy.NUMPY_QUANTIZERS[qtype](x))


def test_fp16_rounding_matches_numpy():
    """The numba GGML_FP32_TO_FP16 / FP16_TO_FP32 equal numpy's IEEE conversion (finite)."""
    from numba import njit

    from convkit.kernels import _kq_pack as K

    @njit(cache=False)
    def conv(v, h_out, f_out):
        for k in range(v.size):
            h = K.fp32_to_fp16(v[k])
            h_out[k] = h
            f_out[k] = K.fp16_to_fp32(h)

    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32)
    v = bits.view(np.float32)
    v = np.concatenate([v[np.isfinite(v)], np.float32([0.0, -0.0, 65504, 65520, 65519.99,
                                                       2 ** -24, 2 ** -25, 3 * 2 ** -26])])
    v = np.concatenate([v, (rng.standard_normal(100_000) * 1e-4).astype(np.float32)])
    h = np.empty(v.size, np.int64)
    f = np.empty(v.size, np.float32)
    conv(v, h, f)
    with np.errstate(over="ignore"):
        want = v.astype(np.float16)
    assert np.array_equal(h.astype(np.uint16), want.view(np.uint16))
    assert np.array_equal(f.view(np.uint32), want.astype(np.float32).view(np.uint32))

"""Our GGML block types against gguf-py and against looped ports of ggml-quants.c.

- Legacy and float types: bytes equal ``gguf.quants.quantize`` (itself bit-exact with
  llama-quantize, formats.md §4), on Student-t weights with all-zero, constant, outlier and
  tiny blocks.
- Every type: our dequantize equals ``gguf.quants.dequantize`` bit for bit on our bytes.
- The vectorized fitting routines equal element-by-element ports of their C namesakes.
- Quantizer protocol behaviour: fake_quant, clip, check, registry, chunking, importance.
The byte comparison with llama.cpp itself, K-quants and the imatrix path included, is in
test_ggml_llamacpp.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants

from llmquant.quant.ggml import GGML_TYPES, base, fitting, fitting_types, get_ggml_type, iquants
from llmquant.quant.ggml.numerics import seq_sum
from llmquant.quant.grid import clamp_to_clip
from llmquant.quant.quantizers import GgmlQuantizer, Quantizer, quantizer_from_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEGACY = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
F = np.float32


def edge_weights(rows: int = 16, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Student-t(3) weights with the blocks that break quantizers injected."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(rows, cols)) * 0.02).astype(np.float32)
    w[0, :256] = 0.0  # all zero
    w[1, :256] = 0.5  # constant positive
    w[2, :256] = -0.25  # constant negative
    w[3, :256] = 0.0
    w[3, 7] = 3.0  # a single outlier among zeros
    w[4, 256:] *= 1e-6  # tiny values (fp16 scales underflow)
    w[5] = np.abs(w[5])  # positive only
    w[6, 100] = 50.0  # an outlier in normal data
    w[7, :64] = np.round(w[7, :64] * 100) / 100  # many exact ties
    return w


def as_bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(np.uint8)


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_bytes_equal_gguf_py(name: str):
    w = edge_weights()
    ggml_type = get_ggml_type(name)
    ours = ggml_type.quantize(torch.from_numpy(w))
    ref = as_bytes(gguf_quants.quantize(w, ggml_type.type_id)).reshape(ours.shape)
    differing = int(
        (ours.reshape(-1, ggml_type.type_size) != ref.reshape(-1, ggml_type.type_size)).any(1).sum()
    )
    assert differing == 0, f"{name}: {differing} blocks differ from gguf-py"
    assert ours.shape == (16, 512 // ggml_type.block_size * ggml_type.type_size)


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0"])
def test_negative_zero_block_scale_follows_c(name: str):
    """C starts max at +0.0, so d = +0.0 / -8 = -0.0 (0x8000) for any all-zero block.

    gguf-py picks the block's own -0.0 and stores +0.0 there; llama-quantize agrees with us
    (test_ggml_llamacpp.py quantizes such a block).
    """
    w = torch.zeros(2, 32)
    w[1] = -0.0
    raw = get_ggml_type(name).quantize(w)
    assert raw[0, :2].tolist() == [0x00, 0x80]
    assert raw[1, :2].tolist() == [0x00, 0x80]


@pytest.mark.parametrize("name", list(GGML_TYPES))
@pytest.mark.parametrize("with_importance", [False, True])
def test_dequantize_equals_gguf_py(name: str, with_importance: bool):
    w = edge_weights(seed=1)
    ggml_type = get_ggml_type(name)
    importance = None
    if with_importance:
        importance = torch.from_numpy(np.random.default_rng(2).gamma(0.5, 2.0, 512).astype(F))
    raw = ggml_type.quantize(torch.from_numpy(w), importance)
    ours = ggml_type.dequantize(raw, 512).numpy()
    ref = gguf_quants.dequantize(raw, ggml_type.type_id).reshape(ours.shape)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.all(ours[0, :256] == 0), "an all-zero block must come back as zeros"
    fake = ggml_type.fake_quant(torch.from_numpy(w), importance).numpy()
    assert np.array_equal(fake.view(np.uint32), ours.view(np.uint32))


# Relative RMS error on Student-t(3) rows, measured 0.0, 2e-4, 1.9e-3, 0.0093, 0.126, 0.111,
# 0.071, 0.047, 0.326, 0.170, 0.090, 0.046, 0.030, 0.100, 0.101; bounds about 1.25x that.
ERROR_BOUNDS = {
    "F32": 1e-9, "F16": 3e-4, "BF16": 3e-3, "Q8_0": 0.012, "Q4_0": 0.16, "Q4_1": 0.14,
    "Q5_0": 0.09, "Q5_1": 0.06, "Q2_K": 0.41, "Q3_K": 0.21, "Q4_K": 0.115, "Q5_K": 0.058,
    "Q6_K": 0.038, "IQ4_NL": 0.125, "IQ4_XS": 0.127,
}  # fmt: skip


def test_error_is_small_and_ordered_by_bits():
    w = torch.from_numpy(edge_weights(seed=3))[8:]  # rows without injected blocks
    errors = {}
    for name, ggml_type in GGML_TYPES.items():
        errors[name] = ((ggml_type.fake_quant(w) - w).norm() / w.norm()).item()
        assert errors[name] < ERROR_BOUNDS[name], f"{name}: relative error {errors[name]:.4f}"
    k_quants = [errors[name] for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")]
    assert k_quants == sorted(k_quants, reverse=True)


# --- element-by-element ports of the ggml-quants.c fitting routines (float32 scalars) ---


def nearest(value) -> F:
    return F(np.rint(F(value)))


def port_qx(x, nmax, w=None):
    amax, vmax = F(0), F(0)
    for v in x:
        if abs(v) > amax:
            amax, vmax = abs(v), v
    if amax < F(1e-15):
        return F(0), [0] * len(x)
    w = x * x if w is None else w

    def sums(iscale):
        levels = [min(max(nearest(iscale * v), -nmax), nmax - 1) for v in x]
        slx, sl2 = F(0), F(0)
        for wi, v, lv in zip(w, x, levels, strict=True):
            slx, sl2 = F(slx + F(F(wi * v) * F(lv))), F(sl2 + F(F(wi * F(lv)) * F(lv)))
        return levels, slx, sl2

    levels, slx, sl2 = sums(F(-nmax) / vmax)
    best_levels = [lv + nmax for lv in levels]
    scale = F(slx / sl2) if sl2 else F(0)
    best = F(scale * slx)
    for step in [k for k in range(-9, 10) if k]:
        levels, slx, sl2 = sums(F(-(F(nmax) + F(F(0.1) * F(step)))) / vmax)
        if sl2 > 0 and F(slx * slx) > F(best * sl2):
            best_levels, scale = [lv + nmax for lv in levels], F(slx / sl2)
            best = F(scale * slx)
    return scale, best_levels


def port_qkx(x, w, nmax, rmin, rdelta, nstep, use_mad):
    lo, hi = x[0], x[0]
    sum_w, sum_x = w[0], F(w[0] * x[0])
    for v, wi in zip(x[1:], w[1:], strict=True):
        lo, hi = (v if v < lo else lo), (v if v > hi else hi)
        sum_w, sum_x = F(sum_w + wi), F(sum_x + F(wi * v))
    lo = F(0) if lo > 0 else lo
    if hi == lo:
        return F(0), -lo, [0] * len(x)

    def error(scale, offset, levels):
        total = F(0)
        for v, wi, lv in zip(x, w, levels, strict=True):
            diff = F(F(F(scale * F(lv)) + offset) - v)
            total = F(total + F(wi * (abs(diff) if use_mad else F(diff * diff))))
        return total

    iscale = F(F(nmax) / F(hi - lo))
    scale = F(F(1) / iscale)
    levels = [min(max(nearest(F(iscale * F(v - lo))), 0), nmax) for v in x]
    best = error(scale, lo, levels)
    for step in range(nstep + 1):
        iscale = F(F(F(F(rmin) + F(F(rdelta) * F(step))) + F(nmax)) / F(hi - lo))
        trial = [min(max(nearest(F(iscale * F(v - lo))), 0), nmax) for v in x]
        sl, sl2, sxl = F(0), F(0), F(0)
        for v, wi, lv in zip(x, w, trial, strict=True):
            sl, sl2 = F(sl + F(wi * F(lv))), F(sl2 + F(F(wi * F(lv)) * F(lv)))
            sxl = F(sxl + F(F(wi * F(lv)) * v))
        det = F(F(sum_w * sl2) - F(sl * sl))
        if det > 0:
            this_scale = F(F(F(sum_w * sxl) - F(sum_x * sl)) / det)
            this_min = F(F(F(sl2 * sum_x) - F(sl * sxl)) / det)
            if this_min > 0:
                this_min, this_scale = F(0), F(sxl / sl2)
            trial_error = error(this_scale, this_min, trial)
            if trial_error < best:
                levels, best, scale, lo = trial, trial_error, this_scale, this_min
    return scale, -lo, levels


@pytest.mark.parametrize("nmax", [8, 32])
def test_make_qx_quants_equals_c_port(nmax: int):
    x = edge_weights(seed=4)[:, :256].reshape(-1, 16)[::3]  # 86 groups of 16, edge ones included
    weights = np.random.default_rng(5).gamma(0.5, 2.0, x.shape).astype(F)
    for w in (None, weights):
        scale, levels = fitting.make_qx_quants(
            torch.from_numpy(x), nmax, None if w is None else torch.from_numpy(w)
        )
        for i in range(len(x)):
            ref_scale, ref_levels = port_qx(x[i], nmax, None if w is None else w[i])
            assert scale[i].item() == ref_scale and levels[i].tolist() == ref_levels, i


@pytest.mark.parametrize(
    "settings", [(15, -1.0, 0.1, 20, False), (3, -0.5, 0.1, 15, True), (31, -0.9, 0.05, 36, False)]
)
def test_make_qkx_quants_equals_c_port(settings):
    x = edge_weights(seed=6)[:, :256].reshape(-1, 32)[::3]  # 43 groups of 32
    w = np.abs(x) + np.random.default_rng(7).random(x.shape).astype(F) * F(0.01)
    scale, the_min, levels = fitting.make_qkx_quants(
        torch.from_numpy(x), torch.from_numpy(w), *settings
    )
    for i in range(len(x)):
        ref_scale, ref_min, ref_levels = port_qkx(x[i], w[i], *settings)
        assert scale[i].item() == ref_scale, i
        assert the_min[i].item() == ref_min and np.signbit(the_min[i].item()) == np.signbit(ref_min)
        assert levels[i].tolist() == ref_levels, i


KVALUES = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]


def port_best_index(x) -> int:
    """best_index_int8: bisection, then the nearer neighbour (float32 differences, ties up)."""
    if x <= KVALUES[0]:
        return 0
    if x >= KVALUES[-1]:
        return 15
    lo, hi = 0, 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if x < KVALUES[mid] else (mid, hi)
    return lo if F(x - F(KVALUES[lo])) < F(F(KVALUES[hi]) - x) else hi


def port_iq4(x, qw):
    """quantize_row_iq4_nl_impl with ntry = 7 on one (super-)block: (d, multipliers, indices).

    ``multipliers`` is None for IQ4_NL (one group: d is the group's scale itself).
    """
    sigma2 = F(0)
    for v in x:
        sigma2 = F(sigma2 + F(v * v))
    sigma2 = F(sigma2 * F(F(2) / F(len(x))))
    scales = []
    for ib in range(len(x) // 32):
        xb = x[32 * ib : 32 * ib + 32]
        if qw is None:
            w = [F(v * v) for v in xb]
        else:
            w = [F(q * np.sqrt(F(sigma2 + F(v * v)))) for q, v in zip(qw[32 * ib :], xb)]
        amax, vmax = F(0), F(0)
        for v in xb:
            if abs(v) > amax:
                amax, vmax = abs(v), v
        if amax < F(1e-15):
            scales.append(F(0))
            continue

        def sums(inverse, xb=xb, w=w):
            sqx, sq2 = F(0), F(0)
            for v, wj in zip(xb, w, strict=True):
                q = F(KVALUES[port_best_index(F(inverse * v))])
                sqx, sq2 = F(sqx + F(F(wj * q) * v)), F(sq2 + F(F(wj * q) * q))
            return sqx, sq2

        sqx, sq2 = sums(F(F(1) / F(-vmax / F(-127))))
        d = F(sqx / sq2) if sq2 > 0 else F(0)
        best = F(d * sqx)
        for step in range(-7, 8):
            sqx, sq2 = sums(F(F(step - 127) / vmax))
            if sq2 > 0 and F(sqx * sqx) > F(best * sq2):
                d = F(sqx / sq2)
                best = F(d * sqx)
        scales.append(d)
    if len(x) == 32:
        inverse = F(F(1) / scales[0]) if scales[0] else F(0)
        return scales[0], None, [port_best_index(F(inverse * v)) for v in x]
    amax, max_scale = F(0), F(0)
    for s in scales:
        if abs(s) > amax:
            amax, max_scale = abs(s), s
    d = F(-max_scale / F(32))
    inverse = F(F(1) / d) if d else F(0)
    multipliers, indices = [], []
    for ib, s in enumerate(scales):
        m = int(min(max(nearest(F(inverse * s)), -32), 31))
        step = F(d * F(m))
        step_inverse = F(F(1) / step) if step else F(0)
        multipliers.append(m)
        indices += [port_best_index(F(step_inverse * v)) for v in x[32 * ib : 32 * ib + 32]]
    return d, multipliers, indices


def test_best_index_ties_and_ends_follow_c():
    """Midpoints between levels go up; the ends clamp; NaN lands on the last level as in C;
    the floats beside each midpoint and values of many magnitudes agree with the C search."""
    mids = [(a + b) / 2 for a, b in zip(KVALUES, KVALUES[1:])]
    values = F([*mids, -4.5, 7.0, -127, 113, -1e9, 1e9, -0.0, 0.0, 1.0, np.nan, 12.999])
    near = np.concatenate(
        [np.nextafter(values[:15], F(-np.inf)), np.nextafter(values[:15], F(np.inf))]
    )
    rng = np.random.default_rng(16)
    spread = (rng.uniform(-140, 140, 2000) * 10.0 ** rng.integers(-6, 1, 2000)).astype(F)
    values = np.concatenate([values, near, spread])
    ours = iquants.best_index(torch.from_numpy(values)).tolist()
    assert ours == [port_best_index(v) for v in values]
    assert ours[:15] == list(range(1, 16))  # exact midpoints take the upper level


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS"])
@pytest.mark.parametrize("with_importance", [False, True])
def test_iq4_equals_c_port(name: str, with_importance: bool):
    """Scale, sub-block multipliers and every index equal a scalar port of the C loop."""
    w = edge_weights(rows=8, seed=14)
    qw = np.random.default_rng(15).gamma(0.5, 2.0, 512).astype(F) if with_importance else None
    ggml_type = get_ggml_type(name)
    raw = ggml_type.quantize(torch.from_numpy(w), None if qw is None else torch.from_numpy(qw))
    blocks = raw.reshape(-1, ggml_type.type_size)
    x = w.reshape(-1, ggml_type.block_size)
    for i, block in enumerate(blocks):
        start = i * ggml_type.block_size % 512
        d, multipliers, indices = port_iq4(x[i], None if qw is None else qw[start:])
        assert block[:2].view(np.float16)[0] == np.float16(d), i
        assert np.signbit(block[:2].view(np.float16)[0]) == np.signbit(np.float16(d)), i
        nibbles = block[-ggml_type.block_size // 2 :].reshape(-1, 16)
        ours = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=1).reshape(-1)
        assert ours.tolist() == indices, i
        if multipliers is not None:
            high = int(block[2]) | int(block[3]) << 8
            codes = [(int(block[4 + j // 2]) >> 4 * (j % 2)) & 0xF | ((high >> 2 * j) & 3) << 4
                     for j in range(8)]  # fmt: skip
            assert [c - 32 for c in codes] == multipliers, i


def test_seq_sum_is_sequential_float32():
    values = torch.tensor([[1e8, 1.0, -1e8, 1.0]], dtype=torch.float32)
    assert seq_sum(values).item() == 1.0  # ((1e8 + 1) - 1e8) + 1 in float32, not 2


# --- the Quantizer protocol ---


def test_registry_and_protocol():
    assert get_ggml_type("q4_k") is get_ggml_type("Q4_K")
    with pytest.raises(ValueError, match="known types: F32, F16"):
        get_ggml_type("Q4_K_M")
    for name, ggml_type in GGML_TYPES.items():
        quantizer = GgmlQuantizer(ggml_type)
        assert isinstance(quantizer, Quantizer) and not quantizer.produces_codes
        assert quantizer.name == name and quantizer.clip_group_size == ggml_type.clip_group_size
        back = quantizer_from_spec(quantizer.spec())
        assert back.ggml_type is ggml_type and back.importance is True
    plain = GgmlQuantizer(get_ggml_type("Q4_0"), importance=False)
    assert quantizer_from_spec(plain.spec()).importance is False
    assert get_ggml_type("Q4_K").clip_group_size == 32
    assert get_ggml_type("Q6_K").clip_group_size == 16


def test_check_names_module_and_fitting_types():
    get_ggml_type("Q4_K").check("blk.0.ffn_down", 1536)
    with pytest.raises(ValueError, match=r"mlp.down_proj: in_features 576 .* Q4_K .* Q8_0, Q4_0"):
        get_ggml_type("Q4_K").check("mlp.down_proj", 576)
    with pytest.raises(ValueError, match="fit this width: none"):
        get_ggml_type("Q8_0").check("odd", 100)
    assert "IQ4_NL" in fitting_types(576) and "IQ4_XS" not in fitting_types(576)
    with pytest.raises(ValueError, match="IQ4_XS block size 256"):
        get_ggml_type("iq4_xs").check("mlp.down_proj", 576)


@pytest.mark.parametrize("name", ["Q4_K", "IQ4_NL", "IQ4_XS"])
def test_fake_quant_applies_clip(name: str):
    w = torch.from_numpy(edge_weights(seed=8)[8:])
    ggml_type = get_ggml_type(name)
    clip = torch.full((w.shape[0], w.shape[1] // 32), 0.8)
    clamped = clamp_to_clip(w, 32, clip)
    assert torch.equal(ggml_type.fake_quant(w, clip=clip), ggml_type.fake_quant(clamped))
    assert not torch.equal(ggml_type.fake_quant(w, clip=clip), ggml_type.fake_quant(w))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K", "IQ4_NL", "IQ4_XS"])
def test_row_chunks_do_not_change_bytes(name: str, monkeypatch):
    w = torch.from_numpy(edge_weights(seed=9))
    importance = torch.rand(512) + 0.1
    whole = get_ggml_type(name).quantize(w, importance)
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 3 * 512)
    assert np.array_equal(get_ggml_type(name).quantize(w, importance), whole)


@pytest.mark.parametrize(
    "name", ["Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
)
def test_importance_lowers_weighted_error(name: str):
    """The imatrix path fits the weighted error, so it must beat the plain path on it."""
    w = torch.from_numpy(edge_weights(seed=10)[8:])
    importance = torch.from_numpy(np.random.default_rng(11).lognormal(0, 2, 512).astype(F))
    ggml_type = get_ggml_type(name)

    def weighted(fake: torch.Tensor) -> float:
        return float(((fake - w) ** 2 * importance).sum())

    assert weighted(ggml_type.fake_quant(w, importance)) < weighted(ggml_type.fake_quant(w))
    # the quantizer of a file written without an imatrix ignores the importance it is given
    assert torch.equal(GgmlQuantizer(ggml_type, importance=True).fake_quant(w, importance),
                       ggml_type.fake_quant(w, importance))  # fmt: skip
    assert torch.equal(GgmlQuantizer(ggml_type, importance=False).fake_quant(w, importance),
                       ggml_type.fake_quant(w))  # fmt: skip


@pytest.mark.parametrize("name", sorted(GGML_TYPES))
def test_uses_importance_says_whether_bytes_depend_on_it(name: str):
    """A run skips its statistics pass when every type written says it ignores importance."""
    w = torch.from_numpy(edge_weights(seed=12)[8:])
    importance = torch.from_numpy(np.random.default_rng(13).lognormal(0, 2, 512).astype(F))
    ggml_type = get_ggml_type(name)
    same = np.array_equal(ggml_type.quantize(w, importance), ggml_type.quantize(w))
    assert same == (not ggml_type.uses_importance)
    quantizer = GgmlQuantizer(ggml_type, importance=True)
    assert quantizer.needs_importance == ggml_type.uses_importance
    assert not GgmlQuantizer(ggml_type, importance=False).needs_importance


def test_bad_shapes_are_reported():
    ggml_type = get_ggml_type("Q8_0")
    with pytest.raises(ValueError, match="importance must have shape"):
        ggml_type.quantize(torch.zeros(2, 64), torch.ones(32))
    with pytest.raises(ValueError, match="2-D"):
        ggml_type.quantize(torch.zeros(64))
    with pytest.raises(ValueError, match="bytes per row"):
        ggml_type.dequantize(np.zeros((2, 30), dtype=np.uint8), 32)

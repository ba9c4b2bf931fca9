"""The C kernels alone against direct integer arithmetic: conv shapes that take every path of the matrix
products (lanes along the pixels or, with fewer than a tile of pixels, along the output channels; a last partial
tile of pixels; output channels that do not fill a tile of rows; strides through the phase planes) and of the
grouped convolutions, each built plainly and with this machine's vector instructions; packed weights; the
requantizations at the edges of int32."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridquant.export.c import RUNTIME, column_blocks, native_flag
from hybridquant.export.program import pack_bits
from hybridquant.ops.conv import C_TILE_LANES

from .test_c_runtime import STRICT, compiler

FLAGS = {"plain": STRICT, "native": STRICT + native_flag()}


def _array(ctype: str, name: str, values: np.ndarray) -> str:
    return f"static const {ctype} {name}[] = {{{', '.join(str(int(v)) for v in values.reshape(-1)) or '0'}}};"


def _run(tmp_path: Path, flags: str, arrays: list[str], call: str, count: int) -> np.ndarray:
    """Compile ``call`` (which fills ``acc``) against hq_kernels.c and return the ``count`` values of acc."""
    source = "\n".join(["#include <stdio.h>", '#include "hq_kernels.h"', *arrays,
                        f"int32_t acc[{count}], temp[1 << 16];", "int main(void) {",
                        f"    int i;\n    {call}",
                        f'    for (i = 0; i < {count}; ++i) printf("%d\\n", (int)acc[i]);', "    return 0;", "}", ""])
    (tmp_path / "t.c").write_text(source)
    binary = tmp_path / "t"
    built = subprocess.run([compiler(), *flags.split(), f"-I{RUNTIME}", "-o", str(binary), str(tmp_path / "t.c"),
                            str(RUNTIME / "hq_kernels.c")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    done = subprocess.run([str(binary)], capture_output=True, text=True, check=True)
    return np.array([int(v) for v in done.stdout.split()], dtype=np.int64)


CONVS = {  # c_in, c_out, h, w, kernel, stride, padding, groups, dilation
    "pointwise-partial-tile": (5, 6, 7, 5, 1, 1, 0, 1, 1),  # 35 pixels: two tiles and 3; 6 rows: a tile and 2
    "pointwise-few-pixels": (13, 7, 3, 3, 1, 1, 0, 1, 1),  # 9 pixels: lanes along the output channels
    "3x3-stride-2": (3, 9, 7, 7, 3, 2, 1, 1, 1),  # 16 pixels from four phase planes
    "3x3-stride-2-odd": (2, 5, 9, 6, 3, 2, 1, 1, 1),  # 5 x 3 = 15 pixels: few pixels
    "3x3-few-pixels-two-blocks": (3, 20, 4, 4, 3, 2, 1, 1, 1),  # 4 pixels, weights in blocks of 16 and 4
    "3x3-rows-of-6": (4, 5, 6, 6, 3, 1, 1, 1, 1),
    "5x5-dilated": (3, 4, 9, 9, 5, 1, 2, 1, 2),  # a dilation: taps two apart
    "depthwise": (6, 6, 5, 5, 3, 1, 1, 6, 1),
    "depthwise-stride-2": (4, 4, 9, 7, 3, 2, 1, 4, 1),
    "grouped": (4, 6, 6, 5, 3, 1, 1, 2, 1),  # two input and three output channels a group
}
@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("name", list(CONVS))
def test_conv2d_kernel_is_the_integer_convolution(name, flags, tmp_path):
    c_in, c_out, h, w, k, s, p, g, d = CONVS[name]
    rng = np.random.default_rng(0)
    x, zp = rng.integers(0, 256, (c_in, h, w)), 117
    wt, bias = rng.integers(-128, 128, (c_out, c_in // g, k, k)), rng.integers(-5000, 5000, c_out)
    ho, wo = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1
    want = F.conv2d(torch.from_numpy(x - zp)[None].double(), torch.from_numpy(wt).double(),
                    torch.from_numpy(bias).double(), s, p, d, g).round().long().reshape(-1).numpy()
    stored = column_blocks(wt) if g == 1 and ho * wo < C_TILE_LANES else wt  # as the exporter stores it
    arrays = [_array("int32_t", "x", x), _array("int8_t", "wt_codes", stored), _array("int32_t", "bias", bias)]
    call = (f"hq_weights wt = {{(const uint8_t *)wt_codes, 8, 1}};\n    hq_conv2d(x, {zp}, {c_in}, {h}, {w}, &wt, "
            f"bias, {c_out}, {k}, {k}, {s}, {s}, {p}, {p}, {d}, {d}, {g}, {ho}, {wo}, acc, temp);")
    assert np.array_equal(_run(tmp_path, FLAGS[flags], arrays, call, c_out * ho * wo), want)


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("rows,k,n", [(5, 27, 7), (1, 3, 3), (8, 40, 16), (9, 20, 37), (4, 5, 32)])
def test_linear_and_matmul_kernels_are_the_integer_products(rows, k, n, flags, tmp_path):
    rng = np.random.default_rng(1)
    x, zp = rng.integers(-128, 128, (rows, k)), rng.integers(-3, 4, k)
    wt, bias = rng.integers(-128, 128, (n, k)), rng.integers(-5000, 5000, n)
    want = (x - zp) @ wt.T + bias
    arrays = [_array("int32_t", "x", x), _array("int32_t", "zp", zp), _array("int8_t", "wt_codes", column_blocks(wt)),
              _array("int32_t", "bias", bias)]  # stored as the exporter does
    call = (f"hq_weights wt = {{(const uint8_t *)wt_codes, 8, 1}};\n    hq_param z = {{zp, {k}}};\n"
            f"    hq_linear(x, z, {rows}, {k}, &wt, bias, {n}, acc, temp);")
    assert np.array_equal(_run(tmp_path, FLAGS[flags], arrays, call, rows * n), want.reshape(-1))
    # the same shapes as a batch of two products of activations, zero points along a's last dim and b's
    a, b = rng.integers(0, 256, (2, rows, k)), rng.integers(0, 256, (2, k, n))
    za, zb = rng.integers(0, 256, k), rng.integers(0, 256, n)
    want = (a - za) @ (b - zb)
    arrays = [_array("int32_t", n_, v) for n_, v in (("a", a), ("b", b), ("za", za), ("zb", zb))]
    call = (f"hq_param pa = {{za, {k}}}, pb = {{zb, {n}}};\n"
            f"    hq_matmul(a, pa, b, pb, 2, {rows}, {k}, {n}, acc, temp);")
    assert np.array_equal(_run(tmp_path, FLAGS[flags], arrays, call, 2 * rows * n), want.reshape(-1))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("signed", [True, False])
def test_packed_weights_unpack_to_their_codes(bits, signed, tmp_path):
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    codes = np.random.default_rng(bits).integers(lo, hi, 61)  # 61 fields: every offset within a byte
    codes[:2] = lo, hi - 1
    packed = pack_bits(codes, bits).view(np.uint8)
    arrays = [_array("uint8_t", "data", packed), "static int32_t out[61], part[58];"]
    call = (f"hq_weights wt = {{data, {bits}, {int(signed)}}};\n    hq_unpack_row(&wt, 0, 61, out);\n"
            "    hq_unpack_row(&wt, 3, 58, part);\n"  # from a field inside a byte
            "    for (i = 0; i < 61; ++i) acc[i] = out[i];\n    for (i = 0; i < 58; ++i) acc[61 + i] = part[i];")
    got = _run(tmp_path, FLAGS["native"], arrays, call, 61 + 58)
    assert np.array_equal(got[:61], codes) and np.array_equal(got[61:], codes[3:])


def test_threshold_requantization_counts_the_thresholds_at_or_below(tmp_path):
    """Every accumulator from below the first threshold to above the last, each threshold exactly among them."""
    rng = np.random.default_rng(2)
    thresholds = np.sort(rng.choice(np.arange(-300, 300), 63, replace=False))
    acc = np.arange(-310, 311)
    zp, qmin, qmax = -32, -32, 31
    want = np.clip(np.searchsorted(thresholds, acc, side="right") + zp, qmin, qmax)
    arrays = [_array("int32_t", "x", acc), _array("int32_t", "thr", thresholds),
              "static const int32_t zero[1] = {0}, zpv[1] = {" + str(zp) + "};"]
    call = (f"hq_requant rq = {{HQ_REQUANT_THRESHOLD, {acc.size}, 1, {{zero, 1}}, {{zero, 1}}, {{zero, 1}}, "
            f"{{zero, 1}}, {{zero, 1}}, {{zpv, 1}}, {qmin}, {qmax}, thr, 63}};\n"
            f"    hq_requantize(x, acc, {acc.size}, &rq);")
    assert np.array_equal(_run(tmp_path, STRICT, arrays, call, acc.size), want)


def test_shift_requantization_saturates_at_the_edges_of_int32(tmp_path):
    """Every shift the branch-free path takes (left shifts too) on accumulators up to the ends of int32, along
    the last dim and along planes, against the reference requantization (primitives.arith.requantize)."""
    from hybridquant.primitives.arith import requantize

    shifts = np.arange(-29, 32)
    edges = [-2**31, -2**31 + 1, -2**30 - 1, -2**30, -2**15 - 1, -2**15, -3, -2, -1, 0, 1, 2, 3, 2**15, 2**30,
             2**31 - 2, 2**31 - 1]
    acc = np.concatenate([edges, np.random.default_rng(3).integers(-2**31, 2**31, 64)])
    grid = np.tile(acc, (shifts.size, 1))  # [shift][value]
    zp, qmin, qmax = 3, -128, 127
    want = requantize(torch.from_numpy(grid), torch.from_numpy(shifts), zp, qmin, qmax, axis=0).numpy()
    for channels_last in (False, True):  # shifts along planes of values, or one shift per value of a row
        x, inner = (grid.T, 1) if channels_last else (grid, acc.size)
        arrays = [_array("int32_t", "x", x), _array("int32_t", "sh", shifts),
                  "static const int32_t zero[1] = {0}, zpv[1] = {" + str(zp) + "};"]
        call = (f"hq_requant rq = {{HQ_REQUANT_SHIFT, {inner}, {shifts.size}, {{sh, {shifts.size}}}, {{zero, 1}}, "
                f"{{zero, 1}}, {{zero, 1}}, {{zero, 1}}, {{zpv, 1}}, {qmin}, {qmax}, zero, 0}};\n"
                f"    hq_requantize(x, acc, {grid.size}, &rq);")
        got = _run(tmp_path, FLAGS["native"], arrays, call, grid.size).reshape(x.shape)
        assert np.array_equal(got.T if channels_last else got, want), channels_last


def test_the_scratch_sizing_uses_the_kernels_tiles():
    """The exporter sizes the matrix products' temp buffers with the kernels' tiles and stride limit."""
    from hybridquant.ops.conv import C_MAX_STRIDE, C_TILE_LANES, C_TILE_ROWS, c_rows

    header = (RUNTIME / "hq_kernels.h").read_text()
    assert re.search(rf"#define HQ_TR {C_TILE_ROWS}\b", header)
    assert re.search(rf"#define HQ_TN {C_TILE_LANES}\b", header)
    assert re.search(rf"#define HQ_MAX_STRIDE {C_MAX_STRIDE}\b", header)
    from hybridquant.primitives.arith import LN_MAX_ROW

    assert re.search(rf"#define HQ_LN_MAX_ROW {LN_MAX_ROW}\b", header)
    assert [c_rows(m) for m in (1, 4, 5, 8)] == [4, 4, 8, 8]


@pytest.mark.parametrize("groups,shape,square", [(1, (2, 6, 3, 5), 0), (3, (2, 6, 4, 2), 0), (1, (1, 5, 1, 1), 0),
                                                 (1, (2, 6, 3, 5), 4), (1, (1, 16, 64, 64), 2)])
def test_group_norm_kernel_is_the_integer_groupnorm(groups, shape, square, tmp_path):
    """hq_group_norm against primitives.arith.int_groupnorm: rows of a group of channels at every position, the
    affine per channel (a batch of two: the rows' groups restart); rounded squares, and a row past LN_MAX_ROW
    values (the nearest mean, no fraction)."""
    from hybridquant.primitives.arith import int_groupnorm, layernorm_constants

    gen = torch.Generator().manual_seed(sum(shape) + groups)
    q = torch.randint(-128, 128, shape, generator=gen)
    c, count = shape[1], shape[1] // groups * shape[2] * shape[3]
    shift = 0 if count > 1000 else 2
    gamma, beta = torch.randn(c, generator=gen, dtype=torch.float64), torch.randn(c, generator=gen, dtype=torch.float64)
    k = layernorm_constants(gamma, beta, 1e-5, 2**-5, c, 2**-4, -100, 110, 3, count=count)
    want = int_groupnorm(q, groups, -7, shift, k["gamma_q"], k["beta_q"], k["eps_q"], k["out_shift"], 3, -100, 110,
                         square) - 5
    arrays = [_array("int32_t", "x", q.numpy()), _array("int32_t", "g", k["gamma_q"].numpy()),
              _array("int32_t", "b", k["beta_q"].numpy())]
    call = (f"hq_group_norm(x, {shape[0]}, {groups}, {c}, {shape[2] * shape[3]}, -7, {shift}, {square}, "
            f"{k['eps_q']}, g, b, {k['out_shift']}, 3, -100, 110, 5, acc);")
    assert np.array_equal(_run(tmp_path, FLAGS["native"], arrays, call, q.numel()), want.reshape(-1).numpy())


@pytest.mark.parametrize("a_shape,b_shape", [((2, 5, 3, 4), (2, 1, 3, 4)), ((3, 4, 5), (1, 1, 5)),
                                             ((2, 3, 4), (2, 3, 1))])
def test_broadcast_mul_kernel(a_shape, b_shape, tmp_path):
    """hq_mul_bcast: ``b`` broadcast along one block of dims (MobileViT-v2's keys times the token weights)."""
    from hybridquant.ops.mul import broadcast_block

    rng = np.random.default_rng(len(a_shape))
    a, b = rng.integers(-128, 128, a_shape), rng.integers(0, 256, b_shape)
    first, end = broadcast_block(list(b_shape), list(a_shape))
    outer, mid = int(np.prod(a_shape[:first])), int(np.prod(a_shape[first:end]))
    inner = int(np.prod(a_shape[end:]))
    call = f"hq_mul_bcast(a, 3, b, 128, {outer}, {mid}, {inner}, acc);"
    got = _run(tmp_path, STRICT, [_array("int32_t", "a", a), _array("int32_t", "b", b)], call, a.size)
    assert np.array_equal(got, ((a - 3) * (b - 128)).reshape(-1))


def test_broadcast_blocks():
    from hybridquant.ops.mul import broadcast_block

    assert broadcast_block([1, 1, 4, 16], [1, 64, 4, 16]) == (1, 2)  # a leading 1 of size 1 matches already
    assert broadcast_block([4, 16], [2, 64, 4, 16]) == (0, 2)
    assert broadcast_block([2, 64, 4, 16], [2, 64, 4, 16]) == (0, 0)
    assert broadcast_block([2, 1, 4, 1], [2, 64, 4, 16]) is None  # two blocks


@pytest.mark.parametrize("shape,first,last", [((2, 3, 4, 5), 3, 3), ((2, 3, 4, 5), 1, 2), ((6, 7), 0, 1)])
def test_axis_sum_kernel(shape, first, last, tmp_path):
    rng = np.random.default_rng(first)
    x = rng.integers(0, 256, shape)
    outer, n, inner = int(np.prod(shape[:first])), int(np.prod(shape[first:last + 1])), int(np.prod(shape[last + 1:]))
    got = _run(tmp_path, STRICT, [_array("int32_t", "x", x)], f"hq_sum_axis(x, 100, {outer}, {n}, {inner}, acc);",
               outer * inner)
    assert np.array_equal(got, (x - 100).sum(axis=tuple(range(first, last + 1))).reshape(-1))


@pytest.mark.parametrize("factors,size", [((2, 2), (3, 5)), ((3, 1), (2, 2))])
def test_upsample_kernel_is_the_integer_upsampling(factors, size, tmp_path):
    from hybridquant.primitives.arith import int_upsample_bilinear

    x = torch.randint(0, 256, (1, 3, *size), generator=torch.Generator().manual_seed(1))
    want = int_upsample_bilinear(x - 77, *factors).reshape(-1).numpy()
    call = f"hq_upsample_bilinear(x, 77, 3, {size[0]}, {size[1]}, {factors[0]}, {factors[1]}, acc);"
    assert np.array_equal(_run(tmp_path, STRICT, [_array("int32_t", "x", x.numpy())], call, want.size), want)


def test_add_const_kernel(tmp_path):
    x, v = np.arange(-5, 7), np.arange(12) * 3 - 20
    got = _run(tmp_path, STRICT, [_array("int32_t", "x", x), _array("int32_t", "v", v)],
               "hq_add_const(x, -2, v, 12, acc);", 12)
    assert np.array_equal(got, x + 2 + v)

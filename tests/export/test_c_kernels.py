"""The C matrix-product kernels alone against direct integer products: shapes that take every edge path (rows
after the last group of four, an odd last column, row lengths that are not a multiple of the int16 padding,
pointwise inputs whose channels do not fill a transposition tile), each built plainly and with this machine's
vector instructions."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridquant.export.c import RUNTIME, native_flag
from hybridquant.export.program import pack_bits

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


CONVS = {  # c_in, c_out, h, w, kernel, stride, padding, groups
    "pointwise-odd-channels": (5, 6, 7, 5, 1, 1, 0, 1),
    "pointwise-13-channels": (13, 7, 3, 3, 1, 1, 0, 1),
    "3x3-stride-2": (3, 9, 7, 7, 3, 2, 1, 1),
    "3x3-row-of-32": (4, 5, 6, 6, 3, 1, 1, 1),
    "depthwise": (6, 6, 5, 5, 3, 1, 1, 6),
}


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("name", list(CONVS))
def test_conv2d_kernel_is_the_integer_convolution(name, flags, tmp_path):
    c_in, c_out, h, w, k, s, p, g = CONVS[name]
    rng = np.random.default_rng(0)
    x, zp = rng.integers(0, 256, (c_in, h, w)), 117
    wt, bias = rng.integers(-128, 128, (c_out, c_in // g, k, k)), rng.integers(-5000, 5000, c_out)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    want = F.conv2d(torch.from_numpy(x - zp)[None].double(), torch.from_numpy(wt).double(),
                    torch.from_numpy(bias).double(), s, p, 1, g).round().long().reshape(-1).numpy()
    arrays = [_array("int32_t", "x", x), _array("int8_t", "wt_codes", wt), _array("int32_t", "bias", bias)]
    call = (f"hq_weights wt = {{(const uint8_t *)wt_codes, 8, 1}};\n    hq_conv2d(x, {zp}, {c_in}, {h}, {w}, &wt, "
            f"bias, {c_out}, {k}, {k}, {s}, {s}, {p}, {p}, 1, 1, {g}, {ho}, {wo}, acc, temp);")
    assert np.array_equal(_run(tmp_path, FLAGS[flags], arrays, call, c_out * ho * wo), want)


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("rows,k,n", [(5, 27, 7), (1, 3, 3), (8, 40, 16)])
def test_linear_and_matmul_kernels_are_the_integer_products(rows, k, n, flags, tmp_path):
    rng = np.random.default_rng(1)
    x, zp = rng.integers(-128, 128, (rows, k)), rng.integers(-3, 4, k)
    wt, bias = rng.integers(-128, 128, (n, k)), rng.integers(-5000, 5000, n)
    want = (x - zp) @ wt.T + bias
    arrays = [_array("int32_t", "x", x), _array("int32_t", "zp", zp), _array("int8_t", "wt_codes", wt),
              _array("int32_t", "bias", bias)]
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
    arrays = [_array("uint8_t", "data", packed), "static int16_t out[61];"]
    call = (f"hq_weights wt = {{data, {bits}, {int(signed)}}};\n    hq_unpack_row(&wt, 0, 61, out);\n"
            "    for (i = 0; i < 61; ++i) acc[i] = out[i];")
    got = _run(tmp_path, STRICT, arrays, call, 61)
    assert np.array_equal(got, codes)


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


def test_the_scratch_sizing_pads_rows_as_the_kernels_do():
    """The exporter sizes the matrix products' temp buffers with the kernels' row padding."""
    from hybridquant.ops.conv import C_K_ALIGN, c_kpad

    header = (RUNTIME / "hq_kernels.h").read_text()
    assert re.search(rf"#define HQ_K_ALIGN {C_K_ALIGN}\b", header)
    assert [c_kpad(k) for k in (1, 16, 17, 27, 32)] == [16, 16, 32, 32, 32]

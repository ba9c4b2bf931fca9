"""A reference reader of exported integer programs: numpy only (it imports neither torch nor the rest of hybridquant).

It reads the ``.npz`` written by ``hybridquant.export.export_npz`` and runs
the program on int64 numpy arrays following the manifest alone, so it checks
that the export carries everything a hardware implementation needs (the
tests hold it bit-exact against the torch integer executor, and
``hybridquant eval --program model.npz`` runs it on a dataset):

    program = load("model.npz")
    logits, codes = run(program, images)        # images: float32 [N, C, H, W]

Weights narrower than a multiple of 8 bits come packed into int8 byte streams (the manifest entry's
``packed``: bits, signedness, shape); :meth:`Program.get` unpacks them (:func:`unpack_bits`).

Every kernel is written from the export's contract: exact int64 products
(conv2d via im2col), requantization by shifts with round half up
(``(acc + (1 << (n - 1))) >> n`` for ``n > 0``) or onto threshold grids, lookup tables, the integer
softmax, LayerNorm and GroupNorm in int32 (one reciprocal per row: a floor division of
2^30, then multiplies and rounding shifts; LayerNorm's square root rounded to
nearest from an exact floor root).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MANIFEST_KEY = "__manifest__"
VERSION = 3  # the manifest version this reader follows
SAFE = 1 << 62  # every intermediate stays below this (one bit under int64)
LN_MAX_ROW = 46340  # norm rows longer than this take their mean's fraction in fewer bits (the contract's rule)


@dataclass
class Program:
    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]
    unpacked: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # packed weights, unpacked once

    @property
    def ops(self) -> list[dict[str, Any]]:
        return self.manifest["ops"]

    def get(self, op: dict[str, Any], name: str) -> np.ndarray:
        """Op ``op``'s array ``name`` as int64 (float arrays stay float); packed weights are unpacked."""
        meta = op["arrays"][name]
        arr = self.arrays[meta["key"]]
        if "packed" in meta:
            if meta["key"] not in self.unpacked:
                self.unpacked[meta["key"]] = unpack_bits(arr, meta["packed"])
            return self.unpacked[meta["key"]]
        return arr if arr.dtype.kind == "f" else arr.astype(np.int64)

    def has(self, op: dict[str, Any], name: str) -> bool:
        return name in op["arrays"]


def load(path) -> Program:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    manifest = json.loads(str(arrays.pop(MANIFEST_KEY)))
    return checked(Program(manifest, arrays))


def checked(p: Program) -> Program:
    """``p`` when it is a program of :data:`VERSION` whose manifest lists exactly the stored arrays;
    ValueError naming the first mismatch."""
    if p.manifest.get("version") != VERSION:
        raise ValueError(f"manifest version {p.manifest.get('version')}: this reader follows version {VERSION}")
    for op in p.manifest["ops"]:
        for name, meta in op["arrays"].items():
            arr = p.arrays.get(meta["key"])
            if arr is None or arr.dtype.name != meta["dtype"] or list(arr.shape) != meta["shape"]:
                raise ValueError(f"op {op['index']} ({op['name']}): array '{name}' is missing or not "
                                 f"{meta['dtype']}{meta['shape']}")
            packed = meta.get("packed")
            if packed is not None:
                count = int(np.prod(packed["shape"], dtype=np.int64))
                if arr.ndim != 1 or arr.itemsize != 1 or arr.size != (count * int(packed["bits"]) + 7) // 8:
                    raise ValueError(f"op {op['index']} ({op['name']}): packed array '{name}' does not hold "
                                     f"{count} codes of {packed['bits']} bits")
    return p


def unpack_bits(stream: np.ndarray, packed: dict[str, Any]) -> np.ndarray:
    """The int64 codes of a packed weight (layout: the manifest's ``conventions.packing``).

    Code i occupies bits [i·b, (i+1)·b) of the byte stream, least significant bit first; a signed field is
    sign-extended from its b bits.
    """
    bits = int(packed["bits"])
    shape = [int(d) for d in packed["shape"]]
    count = int(np.prod(shape, dtype=np.int64))
    stream_bits = np.unpackbits(np.ascontiguousarray(stream).view(np.uint8), bitorder="little")
    fields = stream_bits[: count * bits].reshape(count, bits).astype(np.int64)
    codes = (fields << np.arange(bits, dtype=np.int64)).sum(axis=1)
    if packed.get("signed"):
        codes = np.where(codes >= 1 << (bits - 1), codes - (1 << bits), codes)
    return codes.reshape(shape)


# --- integer helpers ---------------------------------------------------------------
def _absmax(x: np.ndarray) -> int:
    return int(np.abs(x).max()) if x.size else 0


def _check(x: np.ndarray, what: str, shift: int = 0) -> None:
    """Raise when ``|x| << shift`` (in exact Python ints) reaches 2^62."""
    if _absmax(x) << shift >= SAFE:
        raise OverflowError(what)


def along(t: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """A 0-d or 1-d parameter shaped to broadcast along ``axis`` (1-d without an axis: last dim)."""
    if t.ndim == 0 or axis is None:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def shift_round(v: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``(v + (1 << (k - 1))) >> k`` for ``k > 0`` (round half up), ``v << -k`` for ``k <= 0``."""
    v, k = np.asarray(v, np.int64), np.asarray(k, np.int64)
    right = np.maximum(k, 0)
    left = np.maximum(-k, 0)
    bias = np.where(right > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
    return np.where(k > 0, (v + bias) >> right, v << left)


def requant(p: Program, op: dict[str, Any], acc: np.ndarray) -> np.ndarray:
    rq = op["attrs"]["requant"]
    axis = rq["axis"]

    def g(name: str) -> np.ndarray:
        return along(p.get(op, f"requant.{name}"), acc.ndim, axis)

    zp = g("zero_point")
    if rq["mode"] == "shift":
        k = g("shift")
        _check(acc, "requant", max(0, -int(np.min(k))))
        out = shift_round(acc, k)
    elif rq["mode"] in ("two_term", "threshold"):
        a, b, sign, n = g("a"), g("b"), g("sign"), g("n")
        b = np.where(sign != 0, b, a)
        lift = np.maximum(-np.minimum(np.minimum(a, b), 0), 0)
        a, b, n = a + lift, b + lift, n + lift
        _check(acc, f"requant {rq['mode']}", int(np.max(np.maximum(a, b))) + 1 + max(0, -int(np.min(n))))
        total = (acc << a) + sign * (acc << b)
        if rq["mode"] == "two_term":
            out = shift_round(total, n)
        else:  # shifted with floor, then the number of thresholds at or below
            v = np.where(n > 0, total >> np.maximum(n, 0), total << np.maximum(-n, 0))
            out = np.searchsorted(p.get(op, "requant.thresholds"), v, side="right").astype(np.int64)
    else:
        raise ValueError(f"requant mode {rq['mode']} has no integer form")
    return np.clip(out + zp, int(p.get(op, "requant.qmin")), int(p.get(op, "requant.qmax")))


def conv2d(x: np.ndarray, w: np.ndarray, stride, padding, dilation, groups: int) -> np.ndarray:
    """Exact int64 conv2d by im2col: x [N, C, H, W], w [Co, C/groups, kh, kw]."""
    n, c, h, wd = x.shape
    co, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, ho, wo), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
    cols = cols.reshape(n, groups, cg * kh * kw, ho * wo)
    wm = w.reshape(groups, co // groups, cg * kh * kw)
    out = np.matmul(wm[None], cols)  # [N, groups, Co/groups, Ho·Wo]
    return out.reshape(n, co, ho, wo)


def isqrt(v: np.ndarray) -> np.ndarray:
    """Exact floor square root of non-negative int64 values below 2^52.

    Read independently of the package's digit-by-digit kernel: a float64 estimate (exact to within one for
    values float64 holds exactly), then corrected in integers until r² ≤ v < (r + 1)².
    """
    if v.size and int(v.min()) < 0:
        raise ValueError("isqrt of a negative value")
    v = v.astype(np.int64)
    r = np.floor(np.sqrt(v.astype(np.float64))).astype(np.int64)
    for _ in range(2):
        r = np.where(r * r > v, r - 1, r)
        r = np.where((r + 1) * (r + 1) <= v, r + 1, r)
    return r


def _int32(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` unchanged when every value fits int32 (the contract computes softmax and LayerNorm in int32)."""
    if x.size and (int(x.min()) < -(1 << 31) or int(x.max()) >= 1 << 31):
        raise OverflowError(f"{what} leaves int32")
    return x


def _norm_rows(p: Program, op: dict[str, Any], x: np.ndarray, k: int = 0) -> np.ndarray:
    """The normalised values of each row (the last dim) of centred, shifted values ``x`` (layer_norm, group_norm),
    squares rounded down by ``k`` bits."""
    count = x.shape[-1]
    fs = 0  # rows past LN_MAX_ROW: the mean's fraction from rem and count shifted down by fs, no rem^2 term,
    while count >> fs > LN_MAX_ROW:  # and extra fraction bits in the normalised values
        fs += 1
    extra = max(0, (count.bit_length() - 1) // 2 - 4) if fs else 0
    total = x.sum(axis=-1, keepdims=True)
    mean = total // count
    rem = total - mean * count
    d = x - mean
    correction = rem * rem // count if fs == 0 else np.zeros_like(rem)
    v = _int32(shift_round(d * d, k).sum(axis=-1, keepdims=True) - shift_round(correction, k)
               + shift_round(int(p.get(op, "eps_q")), k), f"{op['kind']} variance")
    bits = np.zeros_like(v)
    for b in range(32):  # the bit length of each row's V
        bits = np.where(v >> b > 0, b + 1, bits)
    pw = np.minimum((31 - bits) // 2, 15)
    w = v << (2 * pw)
    t = isqrt(w)
    r = np.maximum(np.where(w - t * t > t, t + 1, t), 1)
    recip = (1 << (30 - k // 2)) // r
    frac = ((rem >> fs) * recip + (count >> fs) // 2) // (count >> fs)
    return shift_round(_int32(d * recip - frac, f"{op['kind']} product"), 15 - extra - pw)


def _norm_affine(p: Program, op: dict[str, Any], n: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    acc = _int32(n * gamma + beta, f"{op['kind']} affine")
    g = p.get
    return np.clip(shift_round(acc, int(g(op, "out_shift"))) + g(op, "out_zero_point"), int(g(op, "out_qmin")),
                   int(g(op, "out_qmax")))


def layer_norm(p: Program, op: dict[str, Any], q: np.ndarray) -> np.ndarray:
    x = (q - p.get(op, "in_zero_point")) << along(p.get(op, "ptf_shift"), q.ndim, -1)
    return _norm_affine(p, op, _norm_rows(p, op, x), p.get(op, "gamma_q"), p.get(op, "beta_q"))


def group_norm(p: Program, op: dict[str, Any], q: np.ndarray) -> np.ndarray:
    b, c = q.shape[:2]
    x = (q - p.get(op, "in_zero_point")) << int(p.get(op, "in_shift"))
    n = _norm_rows(p, op, x.reshape(b, op["attrs"]["groups"], -1), int(p.get(op, "square_shift"))).reshape(b, c, -1)
    codes = _norm_affine(p, op, n, p.get(op, "gamma_q").reshape(c, 1), p.get(op, "beta_q").reshape(c, 1))
    return codes.reshape(q.shape)


def _taps(size: int, f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pos = np.maximum(2 * np.arange(size * f) + 1 - f, 0)
    i0 = pos // (2 * f)
    w1 = pos - i0 * 2 * f
    return i0, np.minimum(i0 + 1, size - 1), 2 * f - w1, w1


def upsample_bilinear(x: np.ndarray, fh: int, fw: int) -> np.ndarray:
    """Bilinear upsampling of centred codes by integer factors (half-pixel), times 4·fh·fw: exact integers."""
    h0, h1, a0, a1 = _taps(x.shape[-2], fh)
    w0, w1, b0, b1 = _taps(x.shape[-1], fw)
    rows = x[..., h0, :] * a0[:, None] + x[..., h1, :] * a1[:, None]
    return rows[..., w0] * b0 + rows[..., w1] * b1


def softmax(p: Program, op: dict[str, Any], q: np.ndarray) -> np.ndarray:
    dim = op["attrs"]["dim"]
    table = p.get(op, "exp_table")
    d = q - q.max(axis=dim, keepdims=True)
    if d.size and int(d.min()) < -(table.size - 1):
        raise ValueError("softmax input spread exceeds the exp table")
    e = table[d + table.size - 1]
    s = _int32(e.sum(axis=dim, keepdims=True), "softmax sum")
    code = shift_round(e * (((1 << 30) + s // 2) // s), 30 - int(p.get(op, "out_exp")))
    return np.minimum(code, int(p.get(op, "out_qmax")))


def layout(op: dict[str, Any], x: np.ndarray) -> np.ndarray:
    a, kind = op["attrs"], op["op"]
    if kind == "reshape":
        return x.reshape(a["shape"])
    if kind == "transpose":
        return np.swapaxes(x, a["dim0"], a["dim1"])
    if kind == "permute":
        return np.transpose(x, a["dims"])
    if kind == "flatten":
        start, end = a["start"] % x.ndim, a["end"] % x.ndim
        return x.reshape(x.shape[:start] + (-1,) + x.shape[end + 1:])
    if kind == "select":
        dim = a["dim"] % x.ndim
        return x[(slice(None),) * dim + (a["index"],)]
    if kind == "slice":  # x[..., start:end:step] along dim
        dim = a["dim"] % x.ndim
        return x[(slice(None),) * dim + (slice(a["start"], a["end"], a.get("step", 1)),)]
    if kind == "expand":  # torch.expand: -1 keeps a size, new dims lead
        shape = list(a["shape"])
        lead = len(shape) - x.ndim
        shape = [x.shape[i - lead] if s == -1 else s for i, s in enumerate(shape)]
        return np.broadcast_to(x, shape)
    raise ValueError(f"unknown layout op {kind}")


def quantize_input(p: Program, x: np.ndarray) -> np.ndarray:
    """The host-side input quantizer, in float32 as the reference does."""
    op = p.ops[0]
    x = np.asarray(x, dtype=np.float32)
    scale = p.get(op, "scale").astype(np.float32)
    zp = along(p.get(op, "zero_point"), x.ndim, op["attrs"]["axis"]).astype(np.float32)
    v = np.floor(x / along(scale, x.ndim, op["attrs"]["axis"]) + np.float32(0.5)) + zp
    return np.clip(v, int(p.get(op, "qmin")), int(p.get(op, "qmax"))).astype(np.int64)


# --- the program -------------------------------------------------------------------
def run_codes(p: Program, q_in: np.ndarray, trace: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Run the program on input codes; returns the output op's codes (int64).

    ``trace``, when given, receives every value's codes by op name.
    """
    vals: dict[str, np.ndarray] = trace if trace is not None else {}
    accs: dict[str, np.ndarray] = {}
    for op in p.ops:
        kind, name = op["kind"], op["name"]
        ins = [vals[i] for i in op["inputs"] if i in vals]

        def zp(k: int, x: np.ndarray, op=op) -> np.ndarray:
            return x - p.get(op, f"in_zero_point.{k}")  # 1-d: along the last dim

        acc = None
        if kind == "quantize":
            vals[name] = q_in.astype(np.int64)
            continue
        if kind == "layout":
            vals[name] = layout(op, ins[0])
            continue
        if kind == "output":
            return ins[0]
        if kind == "deferred":
            continue
        if kind in ("conv2d", "linear"):
            x, w = zp(0, ins[0]), p.get(op, "weight")
            if kind == "conv2d":
                a = op["attrs"]
                acc = conv2d(x, w, a["stride"], a["padding"], a["dilation"], a["groups"])
                bias_axis = 1
            else:
                acc = np.matmul(x, w.T)
                bias_axis = acc.ndim - 1
            if p.has(op, "bias"):
                acc = acc + along(p.get(op, "bias"), acc.ndim, bias_axis)
        elif kind == "matmul":
            acc = np.matmul(zp(0, ins[0]), zp(1, ins[1]))
        elif kind in ("add", "cat"):
            parts = [zp(k, v) << p.get(op, f"align_shift.{k}") for k, v in enumerate(ins)]
            acc = parts[0] + parts[1] if kind == "add" else np.concatenate(parts, axis=op["attrs"]["dim"])
        elif kind == "upsample_bilinear":
            acc = upsample_bilinear(zp(0, ins[0]), *op["attrs"]["scale"])
        elif kind == "add_const":
            acc = zp(0, ins[0]) + p.get(op, "bias")
        elif kind == "mul":
            acc = zp(0, ins[0]) * zp(1, ins[1])
        elif kind == "mul_const":
            acc = zp(0, ins[0])
        elif kind == "global_avg_pool":
            acc = zp(0, ins[0]).sum(axis=(2, 3), keepdims=True)
        elif kind == "sum":
            acc = zp(0, ins[0]).sum(axis=tuple(op["attrs"]["dims"]), keepdims=op["attrs"]["keepdim"])
        elif kind == "lut":
            idx = ins[0] - int(p.get(op, "in_qmin"))
            table = p.get(op, "table")
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= table.size):
                raise ValueError(f"{name}: codes outside the table")
            acc = table[idx] - p.get(op, "requant.zero_point")
        elif kind == "channel_lut":
            x = ins[0]
            table = p.get(op, "table")
            axis = op["attrs"]["axis"]
            idx = x - int(p.get(op, "in_qmin"))
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= table.shape[1]):
                raise ValueError(f"{name}: codes outside the table")
            rows = along(np.arange(table.shape[0]), x.ndim, axis)
            acc = table[rows, idx] - p.get(op, "requant.zero_point")
        elif kind == "channel_requant":
            src = op["inputs"][0]
            v = accs[src] if op["attrs"]["reads"] == "accumulator" else vals[src]
            acc = zp(0, v)
        elif kind == "softmax":
            acc = softmax(p, op, ins[0]) - p.get(op, "requant.zero_point")
        elif kind == "layer_norm":
            acc = layer_norm(p, op, ins[0]) - p.get(op, "requant.zero_point")
        elif kind == "group_norm":
            acc = group_norm(p, op, ins[0]) - p.get(op, "requant.zero_point")
        else:
            raise ValueError(f"unknown op kind {kind}")
        _check(acc, name)
        if op["attrs"].get("keep_accumulator"):
            accs[name] = acc
        if "requant" in op["attrs"]:
            vals[name] = requant(p, op, acc)
    raise ValueError("program has no output op")


def dequantize_output(p: Program, codes: np.ndarray) -> np.ndarray:
    op = p.ops[-1]
    scale = p.get(op, "scale").astype(np.float64)
    return ((codes - p.get(op, "zero_point")).astype(np.float64) * scale).astype(np.float32)


def run(p: Program, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float images -> (logits float32, output codes int64)."""
    codes = run_codes(p, quantize_input(p, x))
    return dequantize_output(p, codes), codes

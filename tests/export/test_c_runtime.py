"""The C project export: it compiles warning-free as strict C99, holds no floating point, and runs the integer
program bit for bit as the integer executor does on the same uint8 images."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridquant.config import QuantConfig
from hybridquant.errors import HybridQuantError
from hybridquant.export.c import (
    RUNTIME_FILES,
    build_c,
    c_compiler,
    export_c,
    input_table,
    pixels_to_images,
    run_c,
)
from hybridquant.integer.executor import IntegerModel
from hybridquant.integer.lower import lower
from hybridquant.quantize import quantize_graph

from ..methods.conftest import make_toy_graph

META = {"class_names": ["a", "b", "c"], "data_cfg": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}
STRICT = "-std=c99 -O2 -Wall -Wextra -Werror -pedantic"  # -O2: quicker to build than -O3


def compiler() -> str:
    """The system C compiler; CI installs one, so only a machine without one skips."""
    cc = c_compiler()
    if cc is None:
        if os.environ.get("CI"):
            pytest.fail("no C compiler found: CI must install one")
        pytest.skip("no C compiler")
    return cc


def build(project: Path, cflags: str = STRICT) -> Path:
    compiler()
    return build_c(project, cflags)


def run(binary: Path, pixels: np.ndarray, tmp: Path) -> np.ndarray:
    return run_c(binary, pixels, tmp)[0]


def pixels(count: int, size: list[int], seed: int = 0) -> np.ndarray:
    c, h, w = size
    return np.random.default_rng(seed).integers(0, 256, size=(count, h, w, c), dtype=np.uint8)


def executor_codes(qg, px: np.ndarray) -> np.ndarray:
    _, codes = IntegerModel(qg).run(pixels_to_images(px, META))
    return codes.reshape(len(px), -1).numpy()


CONFIGS = {
    "minmax-w8a8": dict(method="minmax", wbits=8, abits=8),
    "hfq-w8a8": dict(method="hfq", wbits=8, abits=8, reconstruction_iters=5),
    "hfq-w4a8": dict(method="hfq", wbits=4, abits=8, reconstruction_iters=5),
    "hfq-w6a6-two-term": dict(method="hfq", wbits=6, abits=6, shift_terms=2, reconstruction_iters=5),
    "smoothquant-w6a6": dict(method="smoothquant", wbits=6, abits=6),
}


@pytest.fixture(scope="module")
def toy_calib():
    graph = make_toy_graph()
    gen = torch.Generator().manual_seed(0)
    return graph, [torch.rand(16, *graph.meta["input_size"], generator=gen) * 2 - 1]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_c_runtime_is_bit_exact_with_the_integer_executor(name, toy_calib, tmp_path):
    graph, calib = toy_calib
    qg = quantize_graph(graph, QuantConfig.build(scales="pot", **CONFIGS[name]), calib)
    project = tmp_path / "model"
    facts = export_c(qg, project, META)
    assert sorted(p.name for p in project.iterdir()) == sorted(["model.h", "model.c", "hq_test.c", "resources.json",
                                                                "resources.md", *RUNTIME_FILES])
    assert facts["scratch_bytes"] > 0 and facts["constant_bytes"] > 0
    px = pixels(24, graph.meta["input_size"])
    got = run(build(project), px, tmp_path)
    want = executor_codes(qg, px)
    assert np.array_equal(got, want)
    assert len(np.unique(want[:, 0])) > 3  # the images give the output different codes


def test_odd_sizes_take_the_edge_paths_of_the_matrix_products(tmp_path):
    """7 x 7 images: 49 output pixels and tokens, so the matrix products end on a partial tile of columns (and
    the linears on rows after the last tile of four)."""
    graph = make_toy_graph()
    graph.meta["input_size"] = [3, 7, 7]
    calib = [torch.rand(16, 3, 7, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1]
    qg = quantize_graph(graph, QuantConfig(method="minmax", scales="pot"), calib)
    export_c(qg, tmp_path / "model", META)
    px = pixels(8, graph.meta["input_size"])
    assert np.array_equal(run(build(tmp_path / "model"), px, tmp_path), executor_codes(qg, px))


def test_a_lookup_whose_requantization_is_the_identity_writes_its_codes(toy_calib, tmp_path):
    """A table's entries are its codes when its requantization changes none of them: no requantization pass in
    its C function. One table whose requantization does clip an entry keeps it, and the program stays exact."""
    graph, calib = toy_calib
    program = lower(quantize_graph(graph, QuantConfig(method="minmax", scales="pot"), calib))
    luts = [op for op in program.ops if op.kind == "lut"]
    assert len(luts) >= 2
    clipped = luts[0]
    clipped.arrays["requant.qmax"] = np.asarray(int(np.asarray(clipped.arrays["table"]).max()) - 1)
    export_c(program, tmp_path / "model", META)
    source = (tmp_path / "model" / "model.c").read_text()
    bodies = {int(m[1]): m[2] for m in re.finditer(r"static void hq_op(\d+)\(int32_t \*S\) \{(.*?)\n\}", source, re.S)}
    assert "hq_requantize" in bodies[clipped.index]
    assert all("hq_lut" in bodies[op.index] and "hq_requantize" not in bodies[op.index] for op in luts[1:])
    px = pixels(8, graph.meta["input_size"])
    assert np.array_equal(run(build(tmp_path / "model"), px, tmp_path), executor_codes(program, px))


def test_the_makefile_builds_the_program(toy_calib, tmp_path):
    graph, calib = toy_calib
    qg = quantize_graph(graph, QuantConfig(method="minmax", scales="pot"), calib)
    export_c(qg, tmp_path / "model", META)
    if shutil.which("make") is None:
        pytest.skip("no make")
    done = subprocess.run(["make", "-s", "-C", str(tmp_path / "model"), f"CC={compiler()}"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    px = pixels(4, graph.meta["input_size"])
    assert np.array_equal(run(tmp_path / "model" / "hq_model", px, tmp_path), executor_codes(qg, px))


def _exported(toy_calib, tmp_path: Path, **config) -> tuple[object, object, Path]:
    """(graph, quantized toy graph, its exported C project) for ``QuantConfig.build(scales="pot", **config)``."""
    graph, calib = toy_calib
    qg = quantize_graph(graph, QuantConfig.build(scales="pot", **config), calib)
    export_c(qg, tmp_path / "model", META)
    return graph, qg, tmp_path / "model"


def test_the_generated_code_has_no_floating_point(toy_calib, tmp_path):
    _, _, project = _exported(toy_calib, tmp_path, method="hfq", wbits=4, abits=8, reconstruction_iters=5)
    sources = sorted(p.name for p in project.iterdir() if p.suffix in (".c", ".h"))
    assert sources == ["hq_kernels.c", "hq_kernels.h", "hq_test.c", "main.c", "model.c", "model.h"]
    for name in sources:
        assert not re.search(r"\b(float|double)\b", (project / name).read_text()), name
    # every type named float or double fails to compile: the program (its debug build), the golden test
    # (-DHQ_TIMING is left out: <time.h> itself declares difftime as double)
    no_float = STRICT + " -Dfloat=HQ_NO_FLOAT -Ddouble=HQ_NO_FLOAT"
    build(project, no_float + " -DHQ_DEBUG")
    done = subprocess.run([compiler(), *no_float.split(), "-o", str(project / "hq_test"), str(project / "hq_test.c"),
                           str(project / "hq_kernels.c")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _make(project: Path, target: str, **env: str) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("no make")
    return subprocess.run(["make", "-s", "-C", str(project), target, f"CC={compiler()}", f"CFLAGS={STRICT}"],
                          capture_output=True, text=True, env={**os.environ, **env})


def test_make_test_checks_every_op_on_the_golden_vectors(toy_calib, tmp_path):
    _, qg, project = _exported(toy_calib, tmp_path, method="hfq", wbits=6, abits=6, shift_terms=2,
                               reconstruction_iters=5)
    done = _make(project, "test")
    n_ops = sum(1 for op in lower(qg).ops if f"hq_op{op.index:04d}(S);" in (project / "model.c").read_text())
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"hq_test: {n_ops} ops and the whole program on the golden image: ok" in done.stdout
    # a kernel that rounds differently fails the test, naming the op
    kernels = project / "hq_kernels.c"
    text = kernels.read_text()
    broken = text.replace("(int32_t)(1u << (31 - k)) + (int32_t)((u >> (k - 1)) & 1u);", "(int32_t)(1u << (31 - k));")
    assert broken != text
    kernels.write_text(broken)
    done = _make(project, "test")
    assert done.returncode != 0 and re.search(r"hq_test: .+: code \d+ is -?\d+, the Python kernels give", done.stderr)


def test_make_debug_checks_the_analysed_bounds(toy_calib, tmp_path):
    graph, qg, project = _exported(toy_calib, tmp_path, method="hfq", reconstruction_iters=5)
    assert _make(project, "debug").returncode == 0
    px = pixels(20, graph.meta["input_size"], seed=2)
    assert np.array_equal(run(project / "hq_model_debug", px, tmp_path), executor_codes(qg, px))
    # a bound below what the accumulator reaches aborts, naming the op
    model = project / "model.c"
    first = re.search(r"HQ_CHECK_ACC\((\d+), (\(S \+ \d+\)), (\d+), (\d+)\);", model.read_text())
    model.write_text(model.read_text().replace(first.group(0), f"HQ_CHECK_ACC({first.group(1)}, {first.group(2)}, "
                                                               f"{first.group(3)}, 0);"))
    assert _make(project, "debug").returncode == 0
    (tmp_path / "px.bin").write_bytes(px.tobytes())
    done = subprocess.run([str(project / "hq_model_debug"), str(tmp_path / "px.bin"), str(tmp_path / "o.bin")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and f"op {first.group(1)}: accumulator" in done.stderr


def test_clang_and_openmp_builds_give_the_same_codes(toy_calib, tmp_path):
    graph, qg, project = _exported(toy_calib, tmp_path, method="hfq", wbits=4, abits=8, reconstruction_iters=5)
    px = pixels(70, graph.meta["input_size"], seed=3)  # more than one batch of main.c's 64
    want = executor_codes(qg, px)
    built = 0
    for cc, extra in (("gcc", " -fopenmp -DHQ_TIMING"), ("clang", ""), ("clang", " -DHQ_TIMING")):
        if shutil.which(cc) is None:
            continue
        binary = tmp_path / f"hq_{cc}{len(extra)}"
        done = subprocess.run([cc, *(STRICT + extra).split(), "-o", str(binary),
                               *(str(project / n) for n in ("model.c", "hq_kernels.c", "main.c"))],
                              capture_output=True, text=True)
        assert done.returncode == 0, (cc, done.stderr)
        codes, seconds = run_c(binary, px, tmp_path, threads=2)
        assert np.array_equal(codes, want) and (seconds is None) == ("TIMING" not in extra)
        built += 1
    if not built:
        pytest.skip("neither gcc nor clang")


def test_the_input_table_is_the_python_preprocessing(toy_calib):
    graph, calib = toy_calib
    qg = quantize_graph(graph, QuantConfig(method="minmax", scales="pot"), calib)
    program = lower(qg)
    table = input_table(program, META)
    assert table.shape == (3, 256)
    # a batch of one image per pixel value: every channel of image p is p
    values = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None, None], 3, axis=3)
    from hybridquant.primitives import quantize

    op = program.ops[0]
    c = {k: torch.from_numpy(np.asarray(v).copy()) for k, v in op.arrays.items()}
    want = quantize(pixels_to_images(values, META), c["scale"], c["zero_point"], int(c["qmin"]), int(c["qmax"]),
                    op.attrs.get("axis"))
    assert np.array_equal(table.T, want[:, :, 0, 0].numpy())


def test_main_rejects_a_truncated_image_file(toy_calib, tmp_path):
    graph, calib = toy_calib
    qg = quantize_graph(graph, QuantConfig(method="minmax", scales="pot"), calib)
    export_c(qg, tmp_path / "model", META)
    binary = build(tmp_path / "model")
    (tmp_path / "short.bin").write_bytes(pixels(2, graph.meta["input_size"]).tobytes()[:-5])
    done = subprocess.run([str(binary), str(tmp_path / "short.bin"), str(tmp_path / "out.bin")], capture_output=True,
                          text=True)
    assert done.returncode == 1 and "not a whole number" in done.stderr
    done = subprocess.run([str(binary), str(tmp_path / "missing.bin"), str(tmp_path / "out.bin")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "cannot read" in done.stderr


def test_runs_clean_under_the_sanitizers(toy_calib, tmp_path):
    graph, calib = toy_calib
    qg = quantize_graph(graph, QuantConfig.build(method="hfq", scales="pot", wbits=6, abits=6,
                                                 reconstruction_iters=5), calib)
    export_c(qg, tmp_path / "model", META)
    probe = subprocess.run([compiler(), "-fsanitize=address,undefined", "-x", "c", "-", "-o", str(tmp_path / "p")],
                           input="int main(void){return 0;}", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the compiler has no address/undefined sanitizers")
    binary = build(tmp_path / "model", STRICT.replace("-O2", "-O1 -g") + " -fsanitize=address,undefined "
                   "-fno-sanitize-recover=all")
    px = pixels(100, graph.meta["input_size"], seed=1)
    assert np.array_equal(run(binary, px, tmp_path), executor_codes(qg, px))


def test_an_intermediate_over_32_bits_is_refused(toy_calib, tmp_path):
    graph, calib = toy_calib
    program = lower(quantize_graph(graph, QuantConfig(method="minmax", scales="pot"), calib))
    conv = next(op for op in program.ops if op.kind == "conv2d")
    conv.arrays["bias"] = np.full_like(conv.arrays["bias"].astype(np.int64), 2**31 - 1)
    with pytest.raises(HybridQuantError, match=rf"op {conv.index} \(stem.conv, conv2d\) needs 33 bits for its acc"):
        export_c(program, tmp_path / "model", META)
    assert not (tmp_path / "model").exists()


def test_resources_list_the_widths(toy_calib, tmp_path):
    import json

    graph, calib = toy_calib
    qg = quantize_graph(graph, QuantConfig.build(method="hfq", scales="pot", reconstruction_iters=5), calib)
    export_c(qg, tmp_path / "model", META)
    res = json.loads((tmp_path / "model" / "resources.json").read_text())
    kinds = {r["kind"] for r in res["ops"]}
    assert {"conv2d", "linear", "matmul", "softmax", "layer_norm"} <= kinds
    assert res["macs_per_image"] == lower(qg).op_counts()["macs"]
    # every intermediate of every op fits int32, LayerNorm's and softmax's included
    assert res["max_bits"] <= 32 and res["ops_over_32_bits"] == []
    ln = next(r for r in res["ops"] if r["kind"] == "layer_norm")
    assert {"variance", "reciprocal", "product", "affine"} <= set(ln["bits"])
    assert "| layer_norm |" in (tmp_path / "model" / "resources.md").read_text()
    # operations per image: LayerNorm and softmax divide once per row, not per element
    for r in res["ops"]:
        assert r["counts"]["macs"] == r["macs"]
        if r["kind"] in ("layer_norm", "softmax"):
            rows = math.prod(lower(qg)[r["name"]].out_shape[:-1]) if r["kind"] == "layer_norm" else None
            assert r["counts"]["divisions"] == (4 * rows if rows else r["counts"]["divisions"]) > 0
            assert r["counts"]["divisions"] < r["counts"]["multiplies"]
    # the totals: every op's counts, and the input table's lookups (the host's op in the program)
    total, pixels_in = res["counts_per_image"], math.prod(graph.meta["input_size"])
    for key, value in total.items():
        assert value == sum(r["counts"][key] for r in res["ops"]) + (pixels_in if key == "lookups" else 0), key
    # the C arrays' bytes follow exactly from the program's deployed bytes
    rec = res["constant_bytes_reconciliation"]
    assert rec["c_constant_bytes"] == res["constant_bytes"] and rec["deployed_bytes"] == res["deployed_bytes"]
    assert rec["deployed_bytes"] == lower(qg).storage()["deployed_bytes"]
    assert rec["widened_to_int32"] + rec["immediates"] < 0.2 * rec["deployed_bytes"]


def test_the_code_size_is_measured(toy_calib, tmp_path):
    import json

    graph, calib = toy_calib
    qg = quantize_graph(graph, QuantConfig(method="minmax", scales="pot"), calib)
    compiler()
    if shutil.which("size") is None:
        pytest.skip("no size (binutils)")
    export_c(qg, tmp_path / "model", META, measure_code=True)
    code = json.loads((tmp_path / "model" / "resources.json").read_text())["code"]
    assert set(code["objects"]) == {"model.o", "hq_kernels.o"}
    # the constants are in the object: at least the C arrays' bytes
    model = code["objects"]["model.o"]
    assert model["text"] + model["data"] >= json.loads((tmp_path / "model" / "resources.json").read_text())["constant_bytes"]


def test_a_model_that_cannot_run_in_c_is_refused_before_writing(toy_calib, tmp_path):
    graph, calib = toy_calib
    qg = quantize_graph(graph, QuantConfig.build(method="hfq", scales="pot", wbits=8, abits=8,
                                                 reconstruction_iters=5), calib)
    program = lower(qg)
    conv = next(op for op in program.ops if op.kind == "conv2d")
    conv.attrs["weight_bits"] = 12  # wider than the kernels take
    with pytest.raises(HybridQuantError, match="12-bit weights"):
        export_c(program, tmp_path / "model", META)
    assert not (tmp_path / "model").exists()

"""Pinned outputs of the bundled model: what a refactor must not change.

For ``mobilevit_xxs.cifar10`` quantized with hfq W8A8 and W6A6 (power-of-two scales, seed 0, ``CALIB``
calibration images, ``ITERS`` reconstruction steps per block), on a fixed 1,000-image subset of the CIFAR-10
test split (the first 100 images of each class, file order), the SHA-256 of:

* ``model``: the quantized model's decisions (every activation and weight quantizer, integer weights and
  biases), in name order;
* ``simulated``: the simulation's logits (float32);
* ``integer``: the integer program's logits (its integer output codes);
* ``npz``: every array of the npz export, in key order, and its manifest without the config (the config's
  JSON form is not behaviour).

Float kernels sum in another order on other CPUs, and the search picks from quantized errors, so the pins
are per machine kind (:func:`machine`: torch's CPU capability, the CPU model and its AVX-512 extensions).
Record a machine's with ``python tools/pins.py --write``; ``tests/test_pins.py`` compares against them on
the machine kinds they were recorded for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10"
PINS = REPO / "tests" / "golden" / "pins.json"
MODEL = "mobilevit_xxs.cifar10"
SETTINGS = {"W8A8": (8, 8), "W6A6": (6, 6)}
SUBSET, CALIB, ITERS, SEED, THREADS, BATCH = 1000, 64, 30, 0, 2, 200


def machine() -> str:
    """The key of this machine's float kernels: torch's CPU capability, the CPU model and its AVX-512
    extensions (oneDNN picks its convolution kernels from the CPU flags, whatever torch's capability)."""
    model, flags = "unknown CPU", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith("avx512"))
    except OSError:
        pass
    return f"{torch.backends.cpu.get_cpu_capability()} / {model} / {' '.join(flags) or 'no avx512'}"


def _sha(*arrays: Any) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _model_hash(qgraph) -> str:
    parts: list[Any] = []
    for kind, table in (("act", qgraph.act), ("weight", qgraph.weight)):
        for name in sorted(table):
            qp = table[name]
            head = f"{kind}:{name}:{qp.grid}:{qp.bits}:{qp.qmin}:{qp.qmax}:{qp.axis}:{qp.twin_shift}"
            parts += [np.frombuffer(head.encode(), np.uint8), qp.scale, qp.zero_point]
            if qp.grid == "threshold":
                parts += [qp.thresholds, qp.levels]
    for table in (qgraph.weight_int, qgraph.bias_int):
        for name in sorted(table):
            parts.append(table[name])
    return _sha(*parts)


def compute(progress: bool = False) -> dict[str, dict[str, str]]:
    """The pins of every setting on this machine."""
    from hybridquant.config import QuantConfig
    from hybridquant.data import DataOverrides
    from hybridquant.export.npz import export_npz, load_npz
    from hybridquant.integer.executor import IntegerModel
    from hybridquant.pipeline import DataSpec, model_meta, prepare
    from hybridquant.quantize import quantize_graph

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        torch.manual_seed(SEED)
        data = DataSpec(DATA, DataOverrides(), limit=SUBSET, calib=CALIB, batch_size=BATCH, workers=0, seed=SEED)
        prep = prepare(MODEL, None, False, data, progress=progress)
        images = [x for x, _ in prep.eval_loader(BATCH)]
        out: dict[str, dict[str, str]] = {}
        for label, (wbits, abits) in SETTINGS.items():
            config = QuantConfig.build(method="hfq", wbits=wbits, abits=abits, scales="pot",
                                       reconstruction_iters=ITERS)
            qgraph = quantize_graph(prep.graph, config, prep.calib, progress=progress)
            integer = IntegerModel(qgraph)
            with tempfile.TemporaryDirectory() as tmp:
                export_npz(qgraph, Path(tmp) / "p.npz", model_meta(prep.loaded, prep.cfg))
                manifest, arrays = load_npz(Path(tmp) / "p.npz")
            manifest.pop("config", None)
            out[label] = {
                "model": _model_hash(qgraph),
                "simulated": _sha(*[qgraph.run(x) for x in images]),
                "integer": _sha(*[integer.run(x)[1] for x in images]),
                "npz": _sha(np.frombuffer(json.dumps(manifest, sort_keys=True, default=str).encode(), np.uint8),
                            *[arrays[k] for k in sorted(arrays)]),
            }
        return out
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help=f"record this machine's pins in {PINS.relative_to(REPO)}")
    args = p.parse_args(argv)
    if not DATA.is_dir():
        print(f"pins: CIFAR-10 ImageFolder not found at {DATA}", file=sys.stderr)
        return 2
    key, got = machine(), compute(progress=True)
    print(json.dumps({key: got}, indent=2))
    if args.write:
        pins = json.loads(PINS.read_text()) if PINS.exists() else {}
        pins[key] = got
        PINS.parent.mkdir(parents=True, exist_ok=True)
        tmp = PINS.with_suffix(".tmp")
        tmp.write_text(json.dumps(pins, indent=2, sort_keys=True) + "\n")
        tmp.replace(PINS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

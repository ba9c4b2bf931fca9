"""The C heap set-up of :mod:`hybridquant.heap`: large tensors go back to the system when freed."""

import os
import subprocess
import sys
import textwrap

import pytest

from hybridquant import heap

glibc = pytest.mark.skipif(heap._LIBC is None, reason="glibc's mallopt/malloc_trim needed")

# a 16 MiB tensor freed once (glibc raises its mmap threshold past it), then again with a small one after it
# so that glibc cannot give its memory back by shrinking the heap's top: how much of it stays resident?
_PROBE = textwrap.dedent("""
    import sys, torch
    from hybridquant import heap
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    if sys.argv[1] == "configure":
        assert heap.configure()
    big = torch.ones(4 * 2**20); del big
    before = rss()
    big = torch.ones(4 * 2**20); keep = torch.ones(1000); del big
    if sys.argv[1] == "release":
        heap.release()
    print((rss() - before) / 2**20)
""")


def _retained_mib(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


@glibc
@pytest.mark.parametrize("mode", ["configure", "release"])
def test_freed_large_tensor_leaves_resident_memory(mode):
    assert _retained_mib("none") > 8  # as glibc leaves it: the freed block stays in the heap
    assert _retained_mib(mode) < 1


def test_command_line_module_imports_no_torch():
    # prepare_environment only works before torch is imported, and cli.main calls it first
    code = "import sys, hybridquant.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_prepare_environment_keeps_a_users_choice(monkeypatch):
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    heap.prepare_environment()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    heap.prepare_environment()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"

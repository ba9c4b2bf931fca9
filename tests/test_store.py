"""Values over calibration images in bounded memory: chunks in memory up to the budget, spilled exactly past it."""

from __future__ import annotations

import pytest
import torch

from hybridquant import store
from hybridquant.store import MAX_BUDGET, MIN_BUDGET, Held, Mapped, Stored, Workspace, default_budget


def _value(ws: Workspace, n: int = 7, per: int = 3, chunk: int = 3) -> tuple[Stored, torch.Tensor]:
    t = torch.randn(n * per, 5, generator=torch.Generator().manual_seed(0))  # image i owns rows i·per .. i·per+per-1
    s = Stored(ws)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        s.append(t[lo * per:hi * per], hi - lo)
    return s, t


@pytest.mark.parametrize("budget", [0, 10**9])
def test_rows_pick_every_row_of_each_image_across_chunks(tmp_path, budget):
    with Workspace(budget, tmp_path) as ws:
        s, t = _value(ws)
        picked = s.rows(torch.tensor([5, 0, 3]))
        per = 3
        assert torch.equal(picked, torch.cat([t[5 * per:6 * per], t[0:per], t[3 * per:4 * per]]))
        assert torch.equal(s.whole(), t)
        assert s.num_images == 7 and len(s) == 3


def test_a_spilled_value_is_exact_on_disk_and_gone_when_freed(tmp_path):
    with Workspace(0, tmp_path) as ws:
        s, t = _value(ws)
        assert ws.resident == 0 and ws.spilled_bytes == t.numel() * 4
        files = list(tmp_path.rglob("*.bin"))
        assert len(files) == 1 and files[0].stat().st_size == t.numel() * 4
        assert all(not isinstance(c, torch.Tensor) for c in s.chunks)  # nothing held in memory
        assert torch.equal(torch.cat(list(s)), t)  # bit for bit
        s.free()
        assert not list(tmp_path.rglob("*.bin"))
    assert not any(tmp_path.iterdir())  # the spill folder goes with the workspace


def test_the_budget_keeps_what_fits_and_spills_the_rest(tmp_path):
    chunk_bytes = 3 * 3 * 5 * 4
    with Workspace(2 * chunk_bytes, tmp_path) as ws:
        s, _ = _value(ws)
        held = [isinstance(c, torch.Tensor) for c in s.chunks]
        assert held == [True, True, False]
        assert ws.resident == 2 * chunk_bytes == ws.peak_resident
        s.free()
        assert ws.resident == 0


def test_mapped_and_held_read_like_stored():
    h = Held([torch.ones(2, 3), torch.zeros(1, 3)])
    m = Mapped(h, lambda t: t + 1)
    assert m.images == [2, 1] and len(m) == 2
    assert torch.equal(torch.cat(list(m)), torch.tensor([[2.0] * 3, [2.0] * 3, [1.0] * 3]))
    assert torch.equal(h.rows(torch.tensor([2, 0])), torch.tensor([[0.0] * 3, [1.0] * 3]))


@pytest.mark.parametrize("phys, want", [(24 * 2**30, 24 * 2**30 // 96), (2**30, MIN_BUDGET),
                                         (2**40, MAX_BUDGET)])
def test_default_budget_is_a_share_of_the_machine_within_bounds(monkeypatch, phys, want):
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": phys // 4096}
    monkeypatch.setattr(store.os, "sysconf", pages.__getitem__)
    assert default_budget() == want


def test_negative_budget_is_refused():
    with pytest.raises(ValueError):
        Workspace(-1)


def test_chunk_images_follow_the_largest_value():
    ws = Workspace(0, chunk_bytes=1000)
    assert ws.chunk_images(100) == 10
    assert ws.chunk_images(100, cap=4) == 4
    assert ws.chunk_images(10**6) == 1


def test_a_view_is_stored_as_its_own_copy():
    """A slice of a bigger tensor (q out of qkv) would keep the whole base alive while counting only itself."""
    base = torch.randn(4, 30)
    with Workspace(10**9) as ws:
        s = Stored.of(ws, [base[:, :10]], [4])
        kept = s.chunks[0]
        assert torch.equal(kept, base[:, :10])
        assert kept.untyped_storage().nbytes() == 4 * 10 * 4 == ws.resident

"""kernels.pick_ring: the publishing kernel against its reference, the tag check, the ring in the step
graphs' pick reader (CPU: graphs run eagerly, the kernel interpreted), and on a GPU the mapped pinned
buffer written by the kernel inside a CUDA graph."""

import pytest
import torch

from kernels.pick_ring import RING, mapped_ring, publish_pick, publish_reference, read_pick
from tests.kernels._util import DEVICE, HAS_CUDA, gpu


@pytest.mark.parametrize("position", [0, 7, 40000])
def test_publish_equals_reference(position):
    pick = torch.tensor([151935], dtype=torch.int64, device=DEVICE)
    pos = torch.tensor([position], dtype=torch.int64, device=DEVICE)
    ring = torch.full((RING,), -1, dtype=torch.int64, device=DEVICE)
    want = torch.full((RING,), -1, dtype=torch.int64)
    publish_pick(pick, pos, ring)
    publish_reference(want, pick.cpu(), pos.cpu())
    assert ring.cpu().tolist() == want.tolist()
    assert ring.cpu().tolist()[position % RING] == position * 2**32 + 151935
    assert read_pick(ring.cpu(), position) == 151935


def test_a_slot_of_another_position_is_an_error():
    ring = torch.full((RING,), -1, dtype=torch.int64)
    publish_reference(ring, torch.tensor([5]), torch.tensor([3]))
    assert read_pick(ring, 3) == 5
    with pytest.raises(RuntimeError, match="position 3, not 5"):
        read_pick(ring, 5)  # the same slot, written for position 3
    with pytest.raises(RuntimeError):
        read_pick(ring, 4)  # never written


def test_mapped_ring_only_on_cuda(monkeypatch):
    assert mapped_ring(torch.zeros(RING, dtype=torch.int64), torch.device("cpu")) is None
    if HAS_CUDA:
        host = torch.zeros(RING, dtype=torch.int64, pin_memory=True)
        assert mapped_ring(host, torch.device("cuda")) is not None
        monkeypatch.setattr(torch, "as_tensor", lambda obj, device: torch.zeros(RING, dtype=torch.int64,
                                                                                device=device))
        assert mapped_ring(host, torch.device("cuda")) is None  # torch made a copy: not the host buffer
        monkeypatch.undo()
        monkeypatch.setenv("TANDEM_MAPPED_PICKS", "0")
        assert mapped_ring(host, torch.device("cuda")) is None


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests of the session cover the mapped ring")
@pytest.mark.parametrize("ahead", [False, True])
def test_greedy_chain_through_the_ring_equals_copied_picks(ahead):
    """The pick reader with the ring (its slots standing in for the mapped buffer, the graphs run eagerly):
    the 1-row steps publish tagged picks, the host reads them by position, the same chain as copying."""
    from engine.cuda_graphs import StepGraphs
    from tests.engine.test_cuda_engine import ListCache, PrefixModel, greedy_chain

    chains = []
    for ring in (False, True):
        model = PrefixModel()
        graphs, cache = StepGraphs(model), ListCache()
        if ring:
            graphs.picks.ring = graphs.picks.slots
        graphs.run([3, 1, 4], 0, cache)
        chains.append(greedy_chain(graphs, cache, 5, 3, 12, ahead))
        if ring:  # the slots hold the last two steps' positions, each in its own slot
            assert [int(v) >> 32 for v in graphs.picks.slots] == [14, 13]
    assert chains[0] == chains[1] and len(set(chains[0])) > 3


@gpu
def test_mapped_ring_written_inside_a_graph():
    host = torch.zeros(RING, dtype=torch.int64, pin_memory=True)
    ring = mapped_ring(host, torch.device("cuda"))
    pick = torch.tensor([42], dtype=torch.int64, device="cuda")
    pos = torch.tensor([9], dtype=torch.int64, device="cuda")
    publish_pick(pick, pos, ring)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        publish_pick(pick, pos, ring)
    for p, k in ((10, 7), (11, 151935), (12, 3)):
        pos.fill_(p)
        pick.fill_(k)
        graph.replay()
        torch.cuda.synchronize()
        assert read_pick(host, p) == k
    assert read_pick(host, 11) == 151935  # the other slot still holds the step before

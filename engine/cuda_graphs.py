"""CUDA graphs of the model's small steps: decode (1 row) and speculative verify (2..16 rows).

A step of R rows is a few hundred kernel launches (about 14 per layer); launched one by one from
Python they would cost more than the GPU work. Each row bucket (1, 2, 4, 8, 16; a block is padded up
to its bucket) is captured once per model and cache, on first use, and then replayed:

- static inputs: one (2, R) int64 device tensor [token ids; positions], filled by a single
  asynchronous copy from a pinned host buffer. Padding rows get position -1: the cache kernels skip
  their writes and their attention length is 0.
- static cache: the graph holds the addresses of the cache stores, its smoothing and K-equalization
  buffers, its f16 attention sinks, the RoPE tables and the weights; a different cache object drops the
  graphs and captures anew.
- kernels chained by programmatic dependent launch (kernels/pdl.py) keep it inside the graph: each
  kernel's launch overlaps the end of the one before it.
- static outputs: logits (R, vocab) float32, each row's pick (R,) (its argmax, computed on the device; a
  sampled 1-row step's draw), and any captured hidden states; valid until the next replay. The 1-row step
  feeds itself: its first launch copies its position out and advances the inputs' positions row, and its
  pick is written into the inputs' token row, so the buffer ends holding the inputs of the step that
  follows it in plain decoding, [its pick; its position + 1].
Nothing inside a step reads the device from the host; the caller reads the picks once per step.

Plain decoding runs one step ahead of the host (`StepGraphs.pick`): the step after token n is queued (a
replay on the inputs the previous replay left in place) before the host waits for token n, so the host's
turn-around (reading the pick, the next upload, the graph launch: ~80 us a token on the H200) overlaps
the GPU's work instead of leaving it idle (tg128 730 -> 762 tok/s with an f16 cache, 671 -> 718 with
q4_0: BENCHMARKS.md, GPU run 10). A step queued ahead that turns out not to be wanted (the answer ended)
only wrote K/V at a position past the tokens the session keeps.
Sampled decoding does the same with a 1-row step captured for the sampler's parameters: it runs the
sampler's filters and its inverse-CDF draw (engine.sampling) on the device, with the uniform number the
host's seeded generator gives that step, so it picks what the host would have picked from its logits
(T 0.8: 656 tok/s with the host sampling -> 730; with top-k 40, top-p 0.95, min-p 0.05: 629 -> 704;
BENCHMARKS.md, "Sampling on the GPU").

Three more things keep a step short (H200, Qwen2.5-1.5B layout, f16 cache at depth 16, A/Bs of the step
graph, BENCHMARKS.md "GPU runs 11 and 12"):
- steps whose context fits decode attention's first split (`CudaKVCache.length_bound`: the first 128
  positions on an H200) replay a graph captured for that bound, where attention is one launch a layer
  instead of split + merge (kernels/decode_attention.py, `DIRECT`; the same bits). The key of a graph
  includes its bound; a step queued ahead must use the same graph, so the one step that crosses the bound
  is not queued ahead. TANDEM_SHORT_STEPS=0 turns it off. 1280 -> 1221 us a step (q4_0, whose sinks keep
  the merge: 1364 -> 1345). Verify steps (several rows) get the same bound since session 10 (their
  attention within one split runs as the decode's, a row a sequence: kernels/verify_attention.py).
- greedy steps widen the LM head's float16 logits and take the argmax in two launches chained by PDL
  (kernels/argmax.py) instead of torch's copy and one-pass argmax (7.8 us for a 152k vocabulary);
  TANDEM_FUSED_ARGMAX=0 keeps torch's. 1214 -> 1209 us a step.
- every step starts with one launch that embeds its rows, computes their attention lengths and writes the
  next step's positions (`CudaTransformer.step_rows`, kernels/step_inputs.py) instead of five torch
  kernels; TANDEM_FUSED_STEP_INPUTS=0 keeps those. 1169 -> 1164 us a step.

Capture runs the step once eagerly first (compiling the Triton kernels; it writes the same cache rows
the replay then writes again), then records it.
"""

from __future__ import annotations

import gc
import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.api import VERIFY_ROWS_MAX, SamplingParams

if TYPE_CHECKING:
    from engine.sampling import Sampler

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16)
assert ROW_BUCKETS[-1] == VERIFY_ROWS_MAX


def bucket_for(n_rows: int) -> int:
    for rows in ROW_BUCKETS:
        if rows >= n_rows:
            return rows
    raise ValueError(f"a graph step takes at most {ROW_BUCKETS[-1]} rows, got {n_rows}")


def fill_step_inputs(host: torch.Tensor, ids: list[int], pos: int) -> None:
    """host: (2, R) int64 [token ids; positions]; rows past len(ids) become padding (token 0, position -1)."""
    n = len(ids)
    view = host.numpy()
    view[0, :n] = ids
    view[0, n:] = 0
    view[1, :n] = range(pos, pos + n)
    view[1, n:] = -1


def record_graph(body, device: torch.device):
    """Run body() once eagerly on a side stream (compiles kernels, initialises libraries), then capture
    it into a CUDA graph, which is returned. body must not read the device from the host."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        body()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # No garbage collection while capturing: a collection there can free a previous session's graph
    # or pinned buffers, CUDA calls that invalidate the capture ("operation failed due to a previous
    # error during capture", seen on the H200 when sessions were made one after another).
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with torch.cuda.graph(graph):
            body()
    finally:
        if gc_was_enabled:
            gc.enable()
    return graph


class StepGraph:
    """One captured step of `rows` rows for one cache and one set of captured layers."""

    def __init__(
        self, model, cache, rows: int, capture_layers: tuple[int, ...],
        sampling: SamplingParams | None = None, max_length: int | None = None,
        pick_ring: torch.Tensor | None = None,
    ) -> None:
        self.model, self.cache, self.rows, self.capture_layers = model, cache, rows, capture_layers
        self.sampling = sampling  # 1-row steps: pick by these parameters instead of the argmax
        self.max_length = max_length  # the longest attention a replay may ask for (None: the cache's room)
        device = model.device
        self.host = torch.zeros(2, rows, dtype=torch.long, pin_memory=device.type == "cuda")
        self.inputs = torch.zeros(2, rows, dtype=torch.long, device=device)  # [tokens; positions]
        self.uploaded = torch.cuda.Event() if device.type == "cuda" else None
        self.graph = None
        self.logits = self.picks = None
        self.hidden: list[torch.Tensor] = []
        # 1-row steps leave [pick; position + 1] in `inputs`: the inputs of the next step
        self.feeds_itself = rows == 1
        # and store the pick, tagged, into the host's ring (kernels.pick_ring) when it maps one
        self.pick_ring = pick_ring if self.feeds_itself else None
        # a sampled step's uniform number in [0, 1), set before each replay
        self.uniform = None if sampling is None else torch.zeros(1, dtype=torch.float64, device=device)

    def set_inputs(self, ids: list[int], pos: int) -> None:
        self._upload(ids, pos)

    def _upload(self, ids: list[int] | None = None, pos: int = 0) -> None:
        """Copy the pinned inputs to the device, refilled first with rows ids at pos when given."""
        if self.uploaded is not None:
            self.uploaded.synchronize()  # the previous upload has read the pinned buffer (long done)
        if ids is not None:
            fill_step_inputs(self.host, ids, pos)
        self.inputs.copy_(self.host, non_blocking=True)
        if self.uploaded is not None:
            self.uploaded.record()

    def _body(self) -> None:
        step = self.model.step_rows(self.inputs, self.max_length, advance=self.feeds_itself)
        pick_into = self.inputs[0] if self.feeds_itself else None  # (1,): the next step's token
        fused = self.sampling is None and fused_argmax_enabled() and self.model.device.type == "cuda"
        logits, hidden = self.model.run_rows(
            step, self.cache, None, "all", self.capture_layers, widen=not fused
        )  # (R, vocab) float32, or the LM head's float16 when fused
        if fused:  # widened and picked in two launches (kernels.argmax): the picks of torch.argmax
            from kernels.argmax import argmax_rows

            wide = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
            self.picks = argmax_rows(logits, wide, pick_into)
            logits = wide
        elif pick_into is None:
            self.picks = logits.argmax(-1)  # (R,)
        elif self.sampling is None:
            self.picks = torch.argmax(logits, -1, out=pick_into)  # (1,)
        else:  # the pick the host's sampler would draw from these logits with this uniform number
            from engine.sampling import draw_with, probabilities

            self.picks = pick_into  # (1,)
            self.picks.copy_(draw_with(probabilities(logits[0], self.sampling, []), self.uniform))
        if self.pick_ring is not None:
            from kernels.pick_ring import publish_pick

            publish_pick(self.picks, step.positions, self.pick_ring)
        self.logits, self.hidden = logits, hidden

    def capture(self) -> None:
        """Record the step (inputs must be set, and are again afterwards: the eager run before the capture
        advances a 1-row step's). Without CUDA (tests of this logic on the CPU) nothing is recorded and
        `replay` runs the step eagerly."""
        if self.model.device.type != "cuda":
            return
        inputs = self.inputs.clone()
        self.graph = record_graph(self._body, self.model.device)
        self.inputs.copy_(inputs)
        log.info("captured a %d-row step graph (capture layers %s)", self.rows, self.capture_layers)

    def replay(self) -> None:
        if self.graph is None:  # no CUDA (tests of this logic on the CPU): run the body eagerly
            self._body()
        else:
            self.graph.replay()

    def rewind(self) -> None:
        """Set the inputs back to those `set_inputs` gave last (a 1-row step advances them each replay):
        for tools that replay one step many times at one position."""
        self._upload()

    def replay_following(self, uniform: float | None = None) -> None:
        """Replay the 1-row step on the inputs the previous replay left in place (its pick, one position
        on); a sampled step draws with `uniform`."""
        if not self.feeds_itself:
            raise RuntimeError("only the 1-row step leaves the inputs of the step after it")
        self.replay_with(uniform)

    def replay_with(self, uniform: float | None) -> None:
        if self.sampling is not None:
            self.uniform.fill_(uniform)
        self.replay()


@dataclass
class QueuedPick:
    """A replayed 1-row step whose pick is on its way to the host."""

    pos: int  # the step's position
    token: int | None  # the token it ran on, once the host knows it
    key: tuple  # its graph's key in StepGraphs.graphs (greedy or sampled, which parameters)
    sampler: Sampler | None  # whose stream gave its uniform number
    slot: int  # its index in the pinned pick slots (copied picks)
    done: torch.cuda.Event | None  # recorded after the step (and the pick's copy); None without CUDA
    published: bool = False  # the step stored its pick in the ring itself (kernels.pick_ring)


class PickReader:
    """Picks brought to the host without waiting for them, in two pinned slots, with an event per queued
    step the host waits on when it needs that pick. On CUDA the slots are the ring the 1-row graphs write
    their tagged picks into themselves (`ring`, kernels.pick_ring: slot = position % 2); elsewhere (or if
    the pinned memory cannot be mapped) each pick is copied into slot count % 2 after its step. Either
    way the host reads a slot's pick before it queues the step after next, its next writer (it waits for
    one step while one more is queued). Steps dropped unread (StepGraphs.forget_queued) may still write a
    slot new steps use: they are on the same stream, before the new step, and the host waits on the event
    recorded last."""

    def __init__(self, device: torch.device) -> None:
        from kernels.pick_ring import RING, mapped_ring

        cuda = device.type == "cuda"
        self.slots = torch.zeros(RING, dtype=torch.long, pin_memory=cuda)
        self.ring = mapped_ring(self.slots, device) if cuda else None  # the slots as the GPU sees them
        self.events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.count = 0

    def queue(
        self, graph: StepGraph, key: tuple, sampler: Sampler | None, pos: int, token: int | None
    ) -> QueuedPick:
        index = self.count % 2
        self.count += 1
        published = graph.pick_ring is not None
        if not published:
            self.slots[index : index + 1].copy_(graph.picks, non_blocking=True)
        done = self.events[index]
        if done is not None:
            done.record()
        return QueuedPick(pos, token, key, sampler, index, done, published)

    def read(self, queued: QueuedPick) -> int:
        from kernels.pick_ring import read_pick

        if queued.done is not None:
            queued.done.synchronize()
        if queued.published:
            return read_pick(self.slots, queued.pos)
        return int(self.slots[queued.slot])


def short_steps_enabled() -> bool:
    """Steps early in the cache get graphs of their own (`StepGraphs.key`) unless TANDEM_SHORT_STEPS is "0"
    (an A/B; read when a key is made)."""
    return os.environ.get("TANDEM_SHORT_STEPS", "1") != "0"


def fused_argmax_enabled() -> bool:
    """Greedy steps widen their logits and take the argmax with kernels.argmax unless TANDEM_FUSED_ARGMAX
    is "0" (torch's copy and argmax then, the same picks; read when a step is captured)."""
    return os.environ.get("TANDEM_FUSED_ARGMAX", "1") != "0"


class StepGraphs:
    """The model's step graphs, keyed by `key`, for the cache last used (and of sampled steps only the
    parameters last used)."""

    def __init__(self, model) -> None:
        self.model = model
        self.cache = None
        self.graphs: dict[tuple, StepGraph] = {}
        self.picks = PickReader(model.device)
        self.queued: deque[QueuedPick] = deque()  # 1-row steps replayed, picks not read yet (oldest first)

    def forget_queued(self) -> None:
        """Any other work on the model or cache makes a step queued ahead stale (it may have read cache rows
        that work rewrites); its pick is then never read, its K/V row is rewritten when needed."""
        self.queued.clear()

    def _graph(
        self, ids: list[int], pos: int, cache, capture: tuple[int, ...],
        sampling: SamplingParams | None = None,
    ) -> StepGraph:
        """The graph of len(ids) rows at pos (`key`), captured now if new, its inputs set to ids at pos."""
        if cache is not self.cache:
            self.graphs.clear()  # the graphs hold the old cache's addresses
            self.cache = cache
        key = self.key(len(ids), pos, cache, capture, sampling)
        graph = self.graphs.get(key)
        if graph is None:
            if sampling is not None:  # one parameter set's sampled steps kept (they change rarely)
                for other in [k for k in self.graphs if k[2] is not None and k[2] != key[2]]:
                    del self.graphs[other]
            graph = StepGraph(self.model, cache, key[0], capture, sampling, key[3], self.picks.ring)
            graph.set_inputs(ids, pos)
            graph.capture()
            self.graphs[key] = graph
        else:
            graph.set_inputs(ids, pos)
        return graph

    @staticmethod
    def key(
        n_rows: int, pos: int, cache, capture: tuple[int, ...] = (), sampling: SamplingParams | None = None
    ) -> tuple:
        """The key of the graph that runs n_rows rows at [pos, pos + n_rows) in this cache: (row bucket,
        captured layers, sampling, attention bound). sampling: None for the argmax, else the parameters a
        1-row step samples with. bound: the cache's `length_bound` for the rows' longest attention (decode
        attention in one launch, for verify rows too, while the context fits one split: its direct path),
        None (the cache's room) past it or with TANDEM_SHORT_STEPS=0."""
        bound = cache.length_bound(pos + n_rows) if short_steps_enabled() else None
        if sampling is None:
            return bucket_for(n_rows), capture, None, bound
        return 1, capture, (sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p), bound

    def run(self, ids: list[int], pos: int, cache, capture: tuple[int, ...] = ()):
        """Rows ids at [pos, pos + len(ids)); returns a StepOutput of views into the graph's outputs."""
        from engine.models.cuda_transformer import StepOutput

        self.forget_queued()
        graph = self._graph(ids, pos, cache, capture)
        graph.replay()
        n = len(ids)
        return StepOutput(graph.logits[:n], graph.picks[:n], [h[:n] for h in graph.hidden])

    def pick(self, token: int, pos: int, cache, ahead: bool, sampler: Sampler | None = None) -> int:
        """The pick after token at pos (a 1-row step): the argmax, or with a sampler (whose `graph_params`
        are set) its draw. With ahead, the step after it (on that pick, at pos + 1) is queued on the device
        before the host waits: the next call with that pick at pos + 1 only queues the one after and reads.
        The caller checks that pos + 1 has room in the cache."""
        sampling = None if sampler is None else sampler.graph_params
        key = self.key(1, pos, cache, (), sampling)
        ahead = ahead and self.key(1, pos + 1, cache, (), sampling) == key  # the next step replays this graph
        head = self.queued[0] if self.queued else None
        if (
            cache is not self.cache
            or head is None
            or (head.pos, head.token, head.key) != (pos, token, key)
            or head.sampler is not sampler
        ):
            self.forget_queued()
            graph = self._graph([token], pos, cache, (), sampling)
            graph.replay_with(self._uniform(sampler))
            self.queued.append(self.picks.queue(graph, key, sampler, pos, token))
        graph = self.graphs[key]
        if ahead:
            graph.replay_following(self._uniform(sampler))
            self.queued.append(self.picks.queue(graph, key, sampler, pos + 1, None))
        pick = self.picks.read(self.queued.popleft())
        if self.queued:
            self.queued[0].token = pick  # the step queued ahead runs on this pick
        return pick

    @staticmethod
    def _uniform(sampler: Sampler | None) -> float | None:
        """A sampled step's number from the sampler's stream, taken when the step is queued: in the order of
        the steps, as the host would draw them."""
        return None if sampler is None else float(sampler.uniform())

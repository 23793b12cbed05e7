"""Static plans for computing per-sample streaming features with shared frame prefixes (a prefix forest).

In a causal stream the keys/values a frame leaves in the cache depend only on the frames fed before it,
so samples whose stream orders (:func:`featstore.discover.samples.stream_order`) share a prefix can share its
computation. Each forest node is one frame run on top of its parent's cache; a sample ends at a node and
takes its features there. Strategies (for measurement; ``tree`` is the one to use):

* ``none``: one pass per sample (JanusVLN's way): every sample is its own chain.
* ``prefix``: a sample that is a prefix of (or equal to) another sample's stream is taken from that
  sample's pass; other samples do not share.
* ``tree``: every distinct prefix is computed once.

:func:`plan_steps` turns the forest into a list of :class:`Step` s, each a batch of at most ``batch_size``
nodes of equal depth and image size whose parents are computed. The next step's nodes come from one
queue of ready nodes (parent computed), taken oldest first so that siblings and the children of one step
stay together; the queue is chosen by `order`:

* ``deepest``: the deepest non-empty queue: a depth-first walk, batched across trees.
* ``fill`` (default for ``tree``): the deepest queue holding a full batch, else the shallowest non-empty
  one. Steps are fuller: 20 JanusVLN episodes of 100 frames at B=8 take 1181 steps (1180 at best) against
  1913 for ``deepest``.

Memory bound (per image size; a node of depth d holds a cache of d+1 frames). A node's cache is alive
from its step until its last child's step. Under ``deepest`` a step at depth d runs only when no computed
node of depth >= d has an uncomputed child, so the only depth-d caches alive are those of the last depth-d
step: at most B. Under ``fill`` a step at depth d runs when the depth-(d+1) queue is not full (it is deeper
than the chosen full queue, or no queue is full), and each alive depth-d node has an uncomputed child in
it, so fewer than B depth-d caches are alive before the step and at most 2B-1 after. With samples of at
most L frames, the node caches alive at once (the step being computed included) hold at most
B' * L(L+1)/2 frame caches, B' = B (deepest) or 2B-1 (fill): :func:`cache_bound_frames`.
:func:`peak_cache_frames` gives a plan's actual peak (JanusVLN episodes, L = 9: 27 frame caches at B=1,
258 at B=8; bounds 45 and 675). Chain strategies (``none``, ``prefix``) under ``deepest`` hold only the
previous and the current step: B(2L-1).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from featstore.discover.samples import Sample, stream_order

STRATEGIES = ("none", "prefix", "tree")
ORDERS = ("deepest", "fill")
ImageSize = tuple[int, int]
ImageSizeOf = Callable[[str], ImageSize]


@dataclass
class Forest:
    """Prefix forest: parallel per-node lists; node ids are list indices, parents come before children."""

    parent: list[int | None]
    frame: list[str]
    depth: list[int]
    children: list[list[int]]
    ends: list[list[Sample]]  # samples that end at the node (take their features there)

    @property
    def num_nodes(self) -> int:
        """Frame passes needed to compute every sample: one per node."""
        return len(self.frame)

    def add(self, parent: int | None, frame: str) -> int:
        """Append a node and return its id."""
        self.parent.append(parent)
        self.frame.append(frame)
        self.depth.append(0 if parent is None else self.depth[parent] + 1)
        self.children.append([])
        self.ends.append([])
        if parent is not None:
            self.children[parent].append(len(self.frame) - 1)
        return len(self.frame) - 1

    def roots(self) -> list[int]:
        """Nodes without a parent, in creation order."""
        return [n for n, p in enumerate(self.parent) if p is None]


def _empty_forest() -> Forest:
    return Forest([], [], [], [], [])


def _chain(forest: Forest, frames: Sequence[str]) -> list[int]:
    """Add a new chain of nodes for `frames` (no sharing) and return its node ids."""
    ids: list[int] = []
    for f in frames:
        ids.append(forest.add(ids[-1] if ids else None, f))
    return ids


def _trie(samples: Sequence[Sample]) -> tuple[Forest, list[int]]:
    """Forest sharing every common prefix; returns it and the node each sample ends at."""
    forest = _empty_forest()
    index: dict[tuple[int | None, str], int] = {}
    end_nodes = []
    for s in samples:
        node: int | None = None
        for f in stream_order(s):
            nxt = index.get((node, f))
            if nxt is None:
                nxt = index[(node, f)] = forest.add(node, f)
            node = nxt
        assert node is not None
        forest.ends[node].append(s)
        end_nodes.append(node)
    return forest, end_nodes


def _prefix_forest(samples: Sequence[Sample]) -> Forest:
    """One chain per sample that is no prefix of another (first of equal ones); the others end on the chain
    of the first such sample whose stream starts with theirs."""
    trie, end_nodes = _trie(samples)
    forest = _empty_forest()
    chain_at: dict[int, int] = {}  # trie node -> node of the chain that covers it
    for s, end in zip(samples, end_nodes):
        if trie.children[end] or end in chain_at:
            continue
        path = [end]
        while trie.parent[path[-1]] is not None:
            path.append(trie.parent[path[-1]])  # type: ignore[arg-type]
        path.reverse()
        for trie_node, node in zip(path, _chain(forest, stream_order(s))):
            chain_at.setdefault(trie_node, node)
    for s, end in zip(samples, end_nodes):
        forest.ends[chain_at[end]].append(s)
    return forest


def build_forest(samples: Sequence[Sample], strategy: str = "tree") -> Forest:
    """The forest of node computations for `samples` under `strategy` (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if strategy == "tree":
        return _trie(samples)[0]
    if strategy == "prefix":
        return _prefix_forest(samples)
    forest = _empty_forest()
    for s in samples:
        forest.ends[_chain(forest, stream_order(s))[-1]].append(s)
    return forest


def frame_passes_per_sample(samples: Sequence[Sample], strategy: str = "tree") -> float:
    """Model frame passes per sample under `strategy` (nodes of the forest / number of samples)."""
    if not samples:
        raise ValueError("no samples")
    return build_forest(samples, strategy).num_nodes / len(samples)


@dataclass(frozen=True)
class Step:
    """One batched model call: a frame for each of `nodes` (equal depth and image size) on its parent's cache.

    `frames[j]` is the frame fed for `nodes[j]` (on top of `parents[j]`'s cache; None at depth 0).
    `distinct_frames` lists each frame once (first-appearance order) and `frame_index[j]` indexes it, so a
    frame used by several nodes of the step is decoded once. `ends[j]` are the samples that take their
    features at `nodes[j]`. After the step, the caches of `keep` (nodes of this step with children) must be
    held, and those of `release` (parents whose last child ran in this step) can be dropped.
    """

    depth: int
    image_size: ImageSize | None
    nodes: tuple[int, ...]
    parents: tuple[int | None, ...]
    frames: tuple[str, ...]
    distinct_frames: tuple[str, ...]
    frame_index: tuple[int, ...]
    ends: tuple[tuple[Sample, ...], ...]
    keep: tuple[int, ...]
    release: tuple[int, ...]

    @property
    def size(self) -> int:
        """Number of nodes (batch rows)."""
        return len(self.nodes)

    def samples(self) -> list[Sample]:
        """Samples that finish in this step, in row order."""
        return [s for ends in self.ends for s in ends]


def _node_sizes(forest: Forest, image_size_of: ImageSizeOf | None) -> list[ImageSize | None]:
    """Image size per node; every sample's frames must share one size (a stream has one size)."""
    if image_size_of is None:
        return [None] * forest.num_nodes
    memo: dict[str, ImageSize] = {}
    sizes: list[ImageSize] = []
    for node, frame in enumerate(forest.frame):
        size = memo.get(frame)
        if size is None:
            height, width = image_size_of(frame)
            size = memo[frame] = (int(height), int(width))
        parent = forest.parent[node]
        if parent is not None and sizes[parent] != size:
            before = sizes[parent]
            raise ValueError(f"frame {frame!r} is {size[0]}x{size[1]} but an earlier frame of the same sample "
                             f"stream is {before[0]}x{before[1]}: the frames of a sample must have one "
                             "preprocessed size")
        sizes.append(size)
    return list(sizes)


def _make_step(forest: Forest, nodes: list[int], size: ImageSize | None, pending: list[int]) -> Step:
    """Build the Step for `nodes` and update `pending` (uncomputed children per node)."""
    frames = tuple(forest.frame[n] for n in nodes)
    distinct = tuple(dict.fromkeys(frames))
    position = {f: i for i, f in enumerate(distinct)}
    release = []
    for n in nodes:
        p = forest.parent[n]
        if p is not None:
            pending[p] -= 1
            if pending[p] == 0:
                release.append(p)
    return Step(depth=forest.depth[nodes[0]], image_size=size, nodes=tuple(nodes),
                parents=tuple(forest.parent[n] for n in nodes), frames=frames, distinct_frames=distinct,
                frame_index=tuple(position[f] for f in frames), ends=tuple(tuple(forest.ends[n]) for n in nodes),
                keep=tuple(n for n in nodes if forest.children[n]), release=tuple(release))


ReadyQueues = dict[tuple[int, "ImageSize | None"], deque[int]]


def _next_queue(ready: ReadyQueues, batch_size: int, order: str) -> tuple[int, ImageSize | None] | None:
    """The (depth, size) key of the queue the next step takes nodes from (None when all are empty).

    ``deepest``: the deepest non-empty queue. ``fill``: the deepest queue holding a full batch, else the
    shallowest non-empty one (its nodes move down and join deeper queues). Among equal depths, the queue
    created first.
    """
    deepest = shallowest = full = None
    for key, queue in ready.items():
        if not queue:
            continue
        if deepest is None or key[0] > deepest[0]:
            deepest = key
        if shallowest is None or key[0] < shallowest[0]:
            shallowest = key
        if len(queue) >= batch_size and (full is None or key[0] > full[0]):
            full = key
    if order == "deepest":
        return deepest
    return full if full is not None else shallowest


def plan_forest(forest: Forest, batch_size: int, image_size_of: ImageSizeOf | None = None,
                order: str = "fill") -> list[Step]:
    """Batched depth-first walk of `forest` in `order` (see the module docstring for orders and memory bounds)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}: expected one of {', '.join(ORDERS)}")
    sizes = _node_sizes(forest, image_size_of)
    pending = [len(c) for c in forest.children]
    ready: ReadyQueues = {}
    for root in forest.roots():
        ready.setdefault((0, sizes[root]), deque()).append(root)
    steps = []
    while (key := _next_queue(ready, batch_size, order)) is not None:
        queue = ready[key]
        nodes = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
        steps.append(_make_step(forest, nodes, key[1], pending))
        for n in nodes:
            for child in forest.children[n]:
                ready.setdefault((key[0] + 1, sizes[child]), deque()).append(child)
    return steps


def plan_steps(samples: Sequence[Sample], batch_size: int, image_size_of: ImageSizeOf | None = None,
               strategy: str = "tree", order: str | None = None) -> list[Step]:
    """A static plan computing every sample: steps of at most `batch_size` nodes of equal depth and image size
    (`image_size_of(frame_key) -> (H, W)`; None when all frames have one size), parents before children.
    `order` defaults to ``fill`` for ``tree`` and ``deepest`` for the chain strategies."""
    order = order or ("fill" if strategy == "tree" else "deepest")
    return plan_forest(build_forest(samples, strategy), batch_size, image_size_of, order)


def cache_bound_frames(batch_size: int, max_frames: int, order: str = "fill", num_sizes: int = 1) -> int:
    """Upper bound on the node caches alive at once (in frame caches: one frame of one sample), the step
    being computed included: B' * L(L+1)/2 per image size, B' = B for ``deepest`` and 2B-1 for ``fill``."""
    rows = batch_size if order == "deepest" else 2 * batch_size - 1
    return num_sizes * rows * max_frames * (max_frames + 1) // 2


def peak_cache_frames(steps: Iterable[Step]) -> int:
    """Peak frame caches (one frame of one sample) held by node caches while `steps` run in order: the caches
    alive before each step plus the step's new ones."""
    alive: dict[int, int] = {}  # node -> frames of its cache
    held = peak = 0
    for step in steps:
        peak = max(peak, held + step.size * (step.depth + 1))
        for n in step.keep:
            alive[n] = step.depth + 1
            held += step.depth + 1
        for n in step.release:
            held -= alive.pop(n)
    return peak

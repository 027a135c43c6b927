"""Region arithmetic over chunk boxes, pure (no files, no torch): intersections, and whether
a tensor's chunks tile its shape exactly (a grid check, a sweep for irregular tilings).

Part of :mod:`ckpt_ir.converters.storage.dcp_files`; its docstring describes the layout on disk."""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Iterator, Sequence

from ckpt_ir.converters.storage.dcp_files.records import Box

# Above this many grid cells per chunk a tiling is "irregular" and checked by a sweep instead.
_GRID_CELLS_PER_CHUNK = 4
_GRID_MIN_CELLS = 1 << 16

_SWEEP_PAIRS = 200_000  # pairs tested to name an overlap in an irregular tiling that fails


def _volume(sizes: Sequence[int]) -> int:
    return math.prod(sizes)


def _intersection(a: Box, b: Box) -> Box | None:
    starts = tuple(max(x, y) for x, y in zip(a[0], b[0], strict=True))
    ends = tuple(min(x + s, y + t) for x, s, y, t in zip(a[0], a[1], b[0], b[1], strict=True))
    if any(e <= s for s, e in zip(starts, ends, strict=True)):
        return None
    return starts, tuple(e - s for s, e in zip(starts, ends, strict=True))


def _contains(outer: Box, inner: Box) -> bool:
    return all(o <= i and i + t <= o + s
               for o, s, i, t in zip(outer[0], outer[1], inner[0], inner[1], strict=True))


class _Grid:
    """The cells cut by every chunk boundary, and which chunk owns each cell.

    Real layouts (TP/PP/EP shards, stacked layers) are grids, so there are about as many cells
    as chunks and both the exact-cover check and region lookups cost O(n log n). ``build``
    returns None when the boxes cut the shape into too many cells (irregular tilings).
    """

    def __init__(self, bounds: list[list[int]], owner: list[int]) -> None:
        self.bounds = bounds
        self.owner = owner
        self.strides = [math.prod(len(b) - 1 for b in bounds[d + 1:]) for d in range(len(bounds))]

    @staticmethod
    def cuts(shape: Sequence[int], boxes: Sequence[Box]) -> list[list[int]]:
        bounds: list[set[int]] = [{0, n} for n in shape]
        for offsets, sizes in boxes:
            for d, (o, s) in enumerate(zip(offsets, sizes, strict=True)):
                bounds[d].update((o, o + s))
        return [sorted(b) for b in bounds]

    @classmethod
    def build(cls, shape: Sequence[int], boxes: Sequence[Box]
              ) -> tuple[_Grid | None, tuple[int, int] | None]:
        """The grid, and the first pair of overlapping boxes (by index) if any."""
        bounds = cls.cuts(shape, boxes)
        cells = math.prod(len(b) - 1 for b in bounds)
        if cells > max(_GRID_CELLS_PER_CHUNK * len(boxes), _GRID_MIN_CELLS):
            return None, None
        grid = cls(bounds, [-1] * cells)
        for i, box in enumerate(boxes):
            for cell in grid.cells(box):
                if grid.owner[cell] >= 0:
                    return grid, (grid.owner[cell], i)
                grid.owner[cell] = i
        return grid, None

    def cells(self, box: Box) -> Iterator[int]:
        """Flat indices of the cells that intersect ``box``."""
        ranges = []
        for d, (o, s) in enumerate(zip(*box, strict=True)):
            cuts = self.bounds[d]
            first = bisect.bisect_right(cuts, o) - 1
            last = bisect.bisect_left(cuts, o + s)
            if first >= last:
                return
            ranges.append(range(first * self.strides[d], last * self.strides[d],
                                self.strides[d]))
        for combo in itertools.product(*ranges):
            yield sum(combo)


def _sweep_overlap(boxes: Sequence[Box], budget: int) -> tuple[int, int] | None:
    """First overlapping pair of an irregular tiling found by a sweep along its most-cut
    dimension, testing at most ``budget`` pairs (None: none found within it)."""
    if not boxes:
        return None
    ndim = len(boxes[0][0])
    if ndim == 0:
        return (0, 1) if len(boxes) > 1 else None
    dim = max(range(ndim), key=lambda d: len({b[0][d] for b in boxes}))
    order = sorted(range(len(boxes)), key=lambda i: boxes[i][0][dim])
    active: list[tuple[int, int]] = []  # heap of (end along dim, box index)
    found: list[tuple[int, int]] = []
    for i in order:
        start = boxes[i][0][dim]
        while active and active[0][0] <= start:
            heapq.heappop(active)
        budget -= len(active)
        if budget < 0:
            break
        for _, j in active:
            if _intersection(boxes[i], boxes[j]) is not None:
                found.append((min(i, j), max(i, j)))
        heapq.heappush(active, (start + boxes[i][1][dim], i))
    return min(found) if found else None


def _tiles_exactly(shape: Sequence[int], boxes: Sequence[Box]) -> bool | None:
    """Whether boxes that lie inside ``shape`` and whose volumes sum to its volume tile it.

    O(n 2^d) for n boxes cutting d dimensions, whatever the arrangement: count every box
    corner modulo 2. The mixed finite difference of the coverage count f (how many boxes hold
    a point) is the signed sum of the box corners, so the corners that occur an odd number of
    times fix f modulo 2. If they are exactly the corners of ``shape``, f is odd, so at least 1,
    everywhere inside; with the volumes summing to the shape's volume, f is 1 everywhere: no
    overlap, no gap. None when 2^d is too many corners to count (d > 16 dimensions cut).
    """
    cut = [d for d, n in enumerate(shape)
           if any(offsets[d] != 0 or sizes[d] != n for offsets, sizes in boxes)]
    if len(cut) > 16:
        return None
    odd: set[tuple[int, ...]] = set()
    for offsets, sizes in [*boxes, ((0,) * len(shape), tuple(shape))]:
        # Toggling the shape's own corners too: an exact tiling leaves nothing.
        ends = [(offsets[d], offsets[d] + sizes[d]) for d in cut]
        odd.symmetric_difference_update(itertools.product(*ends))
    return not odd


def _coverage_problem(shape: tuple[int, ...], boxes: Sequence[Box]) -> str | None:
    """Why ``boxes`` do not tile ``shape`` exactly (inside, disjoint, complete), or None.

    Grid layouts (every real TP/PP/EP split) are checked cell by cell; irregular tilings by
    corner parity (:func:`_tiles_exactly`), and only a failing one is searched, within a
    budget, for an overlapping pair to name. Both are O(n log n) in the number of chunks.
    """
    for offsets, sizes in boxes:
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            return (f"chunk at offsets {offsets} with sizes {sizes} does not have "
                    f"{len(shape)} dimensions")
        if any(o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True)):
            return f"chunk at offsets {offsets} with sizes {sizes} lies outside its shape {shape}"
    solid = [i for i, (_, sizes) in enumerate(boxes) if _volume(sizes) > 0]
    solid_boxes = [boxes[i] for i in solid]
    covered = sum(_volume(sizes) for _, sizes in solid_boxes)
    numel = _volume(shape)
    grid, pair = _Grid.build(shape, solid_boxes)
    if grid is None:
        exact = covered == numel and _tiles_exactly(shape, solid_boxes)
        if exact is None:
            return (f"has chunks cutting more than 16 of its {len(shape)} dimensions "
                    f"irregularly (not a grid)")
        if exact:
            return None
        pair = _sweep_overlap(solid_boxes, budget=_SWEEP_PAIRS + 4 * len(solid_boxes))
        if pair is None and covered >= numel:
            # Not exact with the full volume covered: some chunks overlap (and leave a gap).
            return f"has overlapping chunks (they cover {covered} of {numel} elements)"
    if pair is not None:
        a, b = boxes[solid[pair[0]]][0], boxes[solid[pair[1]]][0]
        return f"has overlapping chunks at offsets {a} and {b}"
    if covered != numel:
        return f"has a gap: its chunks cover {covered} of {numel} elements"
    return None

"""Seeded batches of sentences, grouped by image, split across processes.

A batch holds `batch_size` sentences drawn from about `images_per_batch`
images, so that one visual encoding serves several sentences. Each epoch:
every image's sentences are shuffled and cut into chunks of
ceil(batch_size / images_per_batch) sentences, the chunks of all images are
shuffled together, and the resulting sentence sequence is cut into batches.
Every sentence appears exactly once per epoch; `images_per_batch=0` gives
chunks of one sentence (an ordinary shuffle).

With `ref_ids` (one per sentence; the train option `group_refs`) the
sentences of one ref stay together: each image's refs are shuffled, then each
ref's sentences, and the chunks are packed from whole refs (a ref longer than
a chunk is cut), so the expressions of one object meet in the same batch;
SaG's ``w_distill`` loss term reads such pairs.

The order is a pure function of (seed, epoch), so the position in training
is (epoch, batch index), which checkpoints store for an exact resume. With
several processes every global batch is split into equal contiguous parts,
one per rank (batch_size must divide by the world size).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np


class GroupBatchSampler:
    def __init__(self, image_ids: Sequence[int], batch_size: int, images_per_batch: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 ref_ids: Optional[Sequence[int]] = None):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the number of processes {world_size}")
        self.batch_size = batch_size
        self.chunk = math.ceil(batch_size / images_per_batch) if 0 < images_per_batch < batch_size else 1
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        image_ids = np.asarray(image_ids, dtype=np.int64)
        self.n = len(image_ids)
        # sentence indices of each image, in data set order
        _, inverse = np.unique(image_ids, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.diff(inverse[order])) + 1
        self.groups: List[np.ndarray] = np.split(order, bounds) if self.n else []
        self.ref_ids = None
        if ref_ids is not None:
            self.ref_ids = np.asarray(ref_ids, dtype=np.int64)
            if self.ref_ids.shape != image_ids.shape:
                raise ValueError(f"ref_ids has {len(self.ref_ids)} entries for {self.n} sentences")

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        full, rest = divmod(self.n, self.batch_size)
        return full + int(rest > 0 and (not self.drop_last or full == 0))

    def global_batches(self, epoch: int) -> List[np.ndarray]:
        """The epoch's batches of sentence indices, before splitting across ranks."""
        rng = np.random.default_rng([self.seed, epoch])
        chunks = []
        for g in self.groups:
            g = g[rng.permutation(len(g))]
            if self.ref_ids is None:
                chunks.extend(g[i:i + self.chunk] for i in range(0, len(g), self.chunk))
                continue
            refs = np.unique(self.ref_ids[g])
            rank = np.empty(len(refs), dtype=np.int64)
            rank[rng.permutation(len(refs))] = np.arange(len(refs))  # a random order of the refs
            g = g[np.argsort(rank[np.searchsorted(refs, self.ref_ids[g])], kind="stable")]
            chunk: List[int] = []
            for ref in np.split(g, np.flatnonzero(np.diff(self.ref_ids[g])) + 1):
                if chunk and len(chunk) + len(ref) > self.chunk:
                    chunks.append(np.asarray(chunk, dtype=np.int64))
                    chunk = []
                for i in range(0, len(ref), self.chunk):  # a ref longer than a chunk is cut
                    part = ref[i:i + self.chunk].tolist()
                    if len(part) == self.chunk:
                        chunks.append(np.asarray(part, dtype=np.int64))
                    else:
                        chunk.extend(part)
            if chunk:
                chunks.append(np.asarray(chunk, dtype=np.int64))
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
        return [flat[i * self.batch_size:(i + 1) * self.batch_size] for i in range(len(self))]

    def batches(self, epoch: int, start: int = 0) -> List[List[int]]:
        """This rank's part of each batch of the epoch, from batch index `start` on (a resumed position).
        Raises ValueError for a start outside the epoch (0 <= start < len(self); 0 for an empty epoch): a
        position saved under other batch settings or data would otherwise give no batch at all."""
        if start < 0 or (start > 0 and start >= len(self)):
            raise ValueError(f"batch position {start} is outside the epoch's {len(self)} batches "
                             f"({self.n} sentences, batch_size {self.batch_size})")
        out = []
        for b in self.global_batches(epoch)[start:]:
            part = np.array_split(b, self.world_size)[self.rank]
            out.append((part if len(part) else b[:1]).tolist())  # a batch smaller than the world: repeat one
        return out

"""Reproducible Gaussian noise for randomized smoothing, generated in torch from recorded seeds.

Where the noise goes: every backend takes pixels in [0, 1] and normalizes inside the model, so
noise is added to the [0, 1] pixels, before the model's normalization, exactly as in Cohen et al.
(σ is measured in [0, 1]-pixel units, and so are the radii). Noisy pixels are not clipped.

How a stream is made: a point has one integer seed. Its noise for one phase (selection,
estimation, ...) is a stream of samples cut into blocks of ``NOISE_BLOCK`` samples; block ``i`` is
``sigma * torch.randn(block, *shape, generator=g)`` on CPU in float32, where ``g`` is seeded with
``SeedSequence([point_seed, phase, i])``. So

- the same (point seed, phase) always gives the same samples, on any backend and any batch size;
- phases and points are independent streams (SeedSequence mixes its entropy well);
- the first k samples of a stream of n > k samples are the stream of k samples (IRS replays them).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

import numpy as np
import torch

from arqc.base import ArqcError

NOISE_BLOCK = 100
"""Samples drawn from one torch.Generator seed. Part of the noise scheme: changing it changes every count."""

NOISE_SCHEME = f"torch.randn/cpu/float32/SeedSequence(point,phase,block)/block={NOISE_BLOCK}/v1"
"""Recorded in caches and state files, so results made with another noise scheme are refused."""


class Phase(enum.IntEnum):
    """Independent noise streams of one point."""

    SELECTION = 0  # n0 samples that pick the top class
    ESTIMATION = 1  # n samples that bound its probability
    PREDICTION = 2  # samples of PREDICT (the two-sided test)
    FRESH = 3  # IRS fallback: fresh samples for f' when pA_lower >= gamma


def _mix(*entropy: int) -> int:
    """A well-mixed 63-bit integer from non-negative integers (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def point_seed(run_seed: int, image_id: int) -> int:
    """The seed of one point: a function of the run's seed and the image id only (subsets, resumes agree)."""
    if run_seed < 0 or image_id < 0:
        raise ArqcError(f"seed ({run_seed}) and image id ({image_id}) must be non-negative integers")
    return _mix(run_seed, image_id)


def block_seed(seed: int, phase: Phase, block: int) -> int:
    """The torch.Generator seed of block ``block`` of the (point seed, phase) stream."""
    return _mix(seed, int(phase), block)


def noise_block(seed: int, phase: Phase, block: int, shape: tuple[int, ...], sigma: float) -> torch.Tensor:
    """Block ``block`` of the stream: ``NOISE_BLOCK`` samples of N(0, σ²I), shape ``shape``, float32, CPU."""
    g = torch.Generator(device="cpu")
    g.manual_seed(block_seed(seed, phase, block))
    return sigma * torch.randn((NOISE_BLOCK, *shape), generator=g, dtype=torch.float32)


def noisy_batches(
    x: np.ndarray, sigma: float, num: int, batch_size: int, seed: int, phase: Phase
) -> Iterator[np.ndarray]:
    """Yield x + ε for the first ``num`` samples ε of the stream, in float32 arrays of ≤ batch_size rows."""
    if batch_size < 1:
        raise ArqcError(f"batch_size must be >= 1, got {batch_size}")
    image = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    pending: list[torch.Tensor] = []
    pending_rows = 0
    for block in range((num + NOISE_BLOCK - 1) // NOISE_BLOCK):
        rows = min(NOISE_BLOCK, num - block * NOISE_BLOCK)
        pending.append(image + noise_block(seed, phase, block, tuple(image.shape), sigma)[:rows])
        pending_rows += rows
        while pending_rows >= batch_size:
            joined = torch.cat(pending)
            yield joined[:batch_size].numpy()
            pending, pending_rows = [joined[batch_size:]], pending_rows - batch_size
    if pending_rows:
        yield torch.cat(pending).numpy()

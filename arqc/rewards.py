"""Rewards for the search, which the driver hands to the search loop (passes/search/ knows nothing of
runtime/): each asks runtime/ for a number about a candidate policy.

- :class:`CertifiedReward` (ARQ): ACR of the quantized smoothed classifier on the search images, certified
  by IRS against the FP32 model's cache (runtime/irs.py), plus λ × its clean smoothed accuracy. Images whose
  cached FP32 prediction is wrong are not sampled: IRS can only certify the cached class there, which scores
  zero in both terms, so the reward is exactly what certifying every image would give.
- :class:`AccuracyReward` (HAQ): top-1 accuracy of the quantized base classifier on the search images.
Certificates computed here rank candidates only; reported certificates come from a fresh CERTIFY on test
images (DESIGN §3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.fx

from arqc.passes.policy import Policy
from arqc.runtime.backends import Backend, TorchBackend
from arqc.runtime.irs_cache import IrsCache
from arqc.runtime.run import certify_dataset

if TYPE_CHECKING:
    from arqc.runtime.cluster import RayPool

SimFactory = Callable[[Policy], torch.fx.GraphModule]  # policy → calibrated simulated model


class _Memo:
    """Scores each distinct policy once (the budget wall often maps episodes onto the same policy)."""

    def __init__(self):
        self.cache: dict[tuple, tuple[float, dict]] = {}

    def __call__(self, policy: Policy) -> tuple[float, dict]:
        key = tuple(sorted(policy.items()))
        if key not in self.cache:
            self.cache[key] = self.score(policy)
        return self.cache[key]

    def score(self, policy: Policy) -> tuple[float, dict]:
        raise NotImplementedError


class CertifiedReward(_Memo):
    """``make_backend`` builds the executor of a candidate (e.g. its lowered ONNX model in onnxruntime, what
    will be deployed; by default the torch simulation from ``make_sim``). With ``pool`` the search images are
    certified on a Ray cluster, split into chunks (the same reward)."""

    def __init__(self, make_sim: SimFactory, images: torch.Tensor, labels: torch.Tensor, ids: list[int],
                 cache: IrsCache, n_prime: int, lam: float = 0.0, batch_size: int = 400,
                 make_backend: Callable[[Policy], Backend] | None = None, pool: RayPool | None = None):
        super().__init__()
        keep = [i for i, (label, image_id) in enumerate(zip(labels.tolist(), ids, strict=True))
                if cache.point(image_id).top_class == label]
        self.total = len(ids)
        self.images, self.labels, self.ids = images[keep], labels[keep], [ids[i] for i in keep]
        self.make_backend = make_backend or (lambda policy: TorchBackend(make_sim(policy), batch_size=batch_size))
        self.cache_fp32, self.n_prime, self.lam, self.batch_size = cache, n_prime, lam, batch_size
        self.samples, self.pool = 0, pool

    def score(self, policy: Policy) -> tuple[float, dict]:
        if not self.ids:
            return 0.0, {"acr": 0.0, "clean_accuracy": 0.0, "samples": 0}
        result = certify_dataset(self.make_backend(policy), self.images, self.labels, self.ids,
                                 sigma=self.cache_fp32.sigma, n=self.n_prime, alpha=self.cache_fp32.alpha,
                                 batch_size=self.batch_size, irs_cache=self.cache_fp32, progress=False,
                                 pool=self.pool)
        samples = sum(p["samples"] for p in result.points)
        self.samples += samples
        share = len(self.ids) / self.total  # the skipped images score 0 in both terms
        acr, clean = result.acr * share, result.clean_accuracy * share
        return acr + self.lam * clean, {"acr": acr, "clean_accuracy": clean, "samples": samples}


class AccuracyReward(_Memo):
    def __init__(self, make_sim: SimFactory, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 400):
        super().__init__()
        self.make_sim, self.images, self.labels, self.batch_size = make_sim, images, labels, batch_size

    def score(self, policy: Policy) -> tuple[float, dict]:
        sim = self.make_sim(policy)
        with torch.inference_mode():
            predictions = torch.cat([sim(x).argmax(1) for x in self.images.split(self.batch_size)])
        accuracy = float((predictions == self.labels).float().mean())
        return accuracy, {"accuracy": accuracy}

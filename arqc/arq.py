"""The ARQ driver: search → noise-aware QAT → lower → fresh certification in onnxruntime → report.

Every stage keeps its result in a work directory, so ``--resume`` continues an interrupted run and gives
the same result as an uninterrupted one (same seed):

    args.json            the run's arguments (a resume with other arguments is refused)
    fp32_irs_cache.npz   the FP32 smoothed model certified on the search images (IRS cache)
    search_state.pt      the search after every episode (agent, log)        → policy.json, search_log.json
    fp32_refine_cache.npz, refine_state.pt   with refine_images: the FP32 cache of the refine images, and the
                         best candidates' refined rewards after every candidate
    qat.pt               the fine-tuned simulated model after every epoch
    certify_quantized.jsonl / certify_fp32.jsonl   resumable final certification states

Search images come from the training split (after the calibration images); the reported certificates come
from a fresh CERTIFY (other seeds) of the ONNX model in onnxruntime on test images the search never saw.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch

from arqc.base import ArqcError, first_difference, write_json
from arqc.data import ImageSet
from arqc.passes.analysis import profile
from arqc.passes.lower import attach
from arqc.passes.meta import FP32, SEMANTICS, check_semantics
from arqc.passes.policy import Policy, apply_policy, policy_from_json, policy_to_json
from arqc.passes.quantize import Observed, observed_ranges, one_layer_quantized
from arqc.passes.search.agent import DDPGConfig
from arqc.passes.search.baselines import greedy_policy, sensitivity, uniform_policy
from arqc.passes.search.budget import check_budget, layer_specs
from arqc.passes.search.env import BitAllocationEnv
from arqc.passes.search.loop import chosen, ddpg_search, random_search, refine
from arqc.pipeline import PreparedModel, model_identity, quantize, to_onnx
from arqc.qat import finetune
from arqc.rewards import AccuracyReward, CertifiedReward
from arqc.runtime.backends import OrtBackend, TorchBackend
from arqc.runtime.devices import resolve_device
from arqc.runtime.irs import build_cache, load_cache
from arqc.runtime.layerwise import LAYERWISE_IMAGES, check_layers
from arqc.runtime.run import CertifyResult, certify_dataset, check_comparisons, deployed_backend
from arqc.settings import CertifySettings, CompileSettings, SearchSettings

if TYPE_CHECKING:
    from arqc.runtime.cluster import RayPool

TEST_SEED_OFFSET = 7919  # final certificates use other seeds than anything in the search


class Run:
    def __init__(self, prep: PreparedModel, train: ImageSet, test: ImageSet, settings: SearchSettings,
                 workdir: Path, resume: bool, progress: bool = True, fp32_dir: Path | None = None,
                 finetune: ImageSet | None = None, pool: RayPool | None = None):
        """``fp32_dir``: where the FP32 model's IRS cache and certification live (default: ``workdir``);
        runs that differ only in method or budget can share them. ``finetune``: the QAT images (default:
        ``train``, which also provides the calibration and search images). ``pool``: a Ray pool that runs the
        FP32 cache, the candidates' rewards and the final certificates (the agent stays here; same results)."""
        self.prep, self.train, self.test, self.s, self.pool = prep, train, test, settings, pool
        self.finetune_set = finetune if finetune is not None else train
        self.dir, self.progress = Path(workdir), progress
        self.fp32_dir = Path(fp32_dir) if fp32_dir is not None else self.dir
        self.timings: dict[str, float] = {}
        self.device = str(resolve_device(settings.device))
        self.layers = layer_specs(prep.gm)
        names = [layer.name for layer in self.layers]
        self.fixed = {names[0]: 8, names[-1]: 8} if settings.keep_first_last else {}
        check_budget(self.layers, settings.budget, settings.min_bits, self.fixed)
        needed = settings.calib_images + settings.search_images + settings.refine_images
        if len(train) < needed:
            raise ArqcError(f"--data has {len(train)} images; calibration and search need {needed}: lower "
                            "--search-images" + (" or --refine-images" if settings.refine_images else ""))
        self.calib = train.subset(num=settings.calib_images)
        self.search = train.subset(num=settings.search_images, start=settings.calib_images)
        self.refine_set = None if not settings.refine_images else \
            train.subset(num=settings.refine_images, start=settings.calib_images + settings.search_images)
        self.test_set = test.subset(num=min(settings.test_images, len(test)))
        self._check_args(resume)

    # -- bookkeeping -----------------------------------------------------------------------------------
    def _signature(self) -> dict:
        # "device" is where the torch stages run, resolved (None → this machine's choice): a GPU's float sums
        # differ from a CPU's, so a run started on one is not continued on the other
        settings = asdict(self.s)
        del settings["device"]
        return {"semantics": SEMANTICS, "settings": settings, "model": model_identity(self.prep.gm),
                "train": self.train.spec, "test": self.test.spec, "finetune": self.finetune_set.spec,
                "device": self.device}

    def _check_args(self, resume: bool) -> None:
        args = self.dir / "args.json"
        if args.exists():
            if not resume:
                raise ArqcError(f"work directory {self.dir} holds an earlier run; pass --resume to continue "
                                "it, or remove the directory to start over")
            saved, now = json.loads(args.read_text()), self._signature()
            check_semantics(saved.get("semantics"), f"the run in {self.dir}")
            key = first_difference(saved, now)
            if key is not None:
                if key == "device" and key in saved:
                    raise ArqcError(f"the run in {self.dir} ran its torch stages on {saved.get(key)}, this one "
                                    f"would use {now[key]}; resume it with --device {saved.get(key)}, or remove "
                                    "the directory to start over")
                raise ArqcError(f"--resume with other arguments than the run in {self.dir} (they differ in "
                                f"'{key}'); use the same arguments, or remove the directory to start over")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json(args, self._signature())

    def _timed(self, stage: str, fn):
        start = time.perf_counter()
        out = fn()
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
        return out

    def make_sim(self, policy: Policy, ranges: dict[str, Observed] | None = None) -> torch.fx.GraphModule:
        """The calibrated simulation of ``policy`` (with ``ranges``: what calibration observed, no calibration
        run)."""
        calib_sigma = self.s.sigma if self.s.calib_sigma is None else self.s.calib_sigma
        return quantize(self.prep, policy, self.calib, self.s.calib_images, self.s.scales, calib_sigma, ranges,
                        self.s.calibration)

    @cached_property
    def episode_tune(self) -> ImageSet:
        """The images of the per-candidate fine-tune: --data without the search and refine images the rewards
        score."""
        s, train = self.s, self.train
        scored = s.calib_images + s.search_images + s.refine_images
        outside = torch.cat([torch.arange(s.calib_images), torch.arange(scored, len(train))])
        return ImageSet(train.x[outside], train.y[outside], train.ids[outside], train.spec, train.num_classes)

    def candidate_sim(self, policy: Policy) -> torch.fx.GraphModule:
        """A search candidate: the calibrated simulation, fine-tuned for ``episode_finetune_epochs`` if set."""
        s, sim = self.s, self.make_sim(policy)
        if s.episode_finetune_epochs > 0:
            tune = self.episode_tune
            finetune(sim, tune.x, tune.y, sigma=s.sigma, epochs=s.episode_finetune_epochs, lr=s.lr, seed=s.seed,
                     progress=False, augmentation=s.finetune_augment, device=self.device, teacher=self.prep.gm,
                     distill=s.qat_distill, unfold_bn=s.qat_bn == "unfolded")
        return sim

    # -- stages ----------------------------------------------------------------------------------------
    def fp32_cache(self, images: ImageSet | None = None, name: str = "fp32_irs_cache.npz"):
        """The FP32 model's IRS cache of the search images (or of ``images``, kept as ``name``)."""
        images = self.search if images is None else images
        path, s = self.fp32_dir / name, self.s
        backend = TorchBackend(self.prep.gm, batch_size=s.batch_size, device=self.device)
        ids = [int(i) for i in images.ids]
        if path.exists():
            return load_cache(path, fingerprint=backend.fingerprint(), sigma=s.sigma, n=s.cache_n, ids=ids)
        self.fp32_dir.mkdir(parents=True, exist_ok=True)
        cache = build_cache(backend, images.x.numpy(), images.y.numpy(), ids, sigma=s.sigma,
                            n0=s.n0, n=s.cache_n, alpha=s.alpha, batch_size=s.batch_size, seed=s.seed,
                            progress=self.progress, pool=self.pool)
        cache.save(path)
        return cache

    def search_policy(self) -> tuple[Policy, list[dict]]:
        s = self.s
        if s.method == "uniform":
            return uniform_policy(self.layers, s.budget, s.min_bits, s.max_bits, self.fixed), []
        if s.method == "greedy":
            return self._greedy(), []
        env = BitAllocationEnv(self.layers, s.budget, s.min_bits, s.max_bits, self.fixed)
        ids = [int(i) for i in self.search.ids]
        if s.method == "haq":
            reward = AccuracyReward(self.candidate_sim, self.search.x, self.search.y, s.batch_size)
        else:
            cache = self._timed("fp32 cache", self.fp32_cache)
            reward = CertifiedReward(self.candidate_sim, self.search.x, self.search.y, ids, cache, s.search_n,
                                     s.lam, s.batch_size, make_backend=self._candidate_backend, pool=self.pool)
        state = self.dir / "search_state.pt"
        if s.method == "random":
            log = random_search(env, reward, s.episodes, s.seed, state, progress=self.progress)
        else:
            demo = self._timed("demo", self._greedy) if s.demo == "greedy" else None
            config = DDPGConfig(warmup=s.warmup, seed=s.seed) if demo is None else \
                DDPGConfig(warmup=s.warmup, seed=s.seed, init_sigma=s.explore_sigma, sigma_decay=s.explore_decay)
            log = ddpg_search(env, reward, s.episodes, config, state, progress=self.progress, demo=demo)
        episodes = log.episodes
        if s.refine_images and s.method != "haq":
            episodes = self._timed("refine", lambda: self._refine(episodes))
        return policy_from_json(chosen(episodes)["policy"]), episodes

    def _refine(self, episodes: list[dict]) -> list[dict]:
        """Adaptive reward precision (SearchSettings.refine_images): the best candidates' reward over the search
        images and the refine images, at the same n'. Per-image noise seeds derive from the image id, so this
        equals the reward of a search on all those images; only the refine images are certified here."""
        s, extra = self.s, self.refine_set
        cache = self._timed("fp32 cache", lambda: self.fp32_cache(extra, "fp32_refine_cache.npz"))
        more = CertifiedReward(self.candidate_sim, extra.x, extra.y, [int(i) for i in extra.ids], cache, s.search_n,
                               s.lam, s.batch_size, make_backend=self._candidate_backend, pool=self.pool)
        n, r = s.search_images, s.refine_images

        def score(episode: dict) -> tuple[float, dict]:
            value, info = more(policy_from_json(episode["policy"]))
            return (n * episode["reward"] + r * value) / (n + r), {"images": n + r, **info}

        return refine(episodes, score, s.refine_top, self.dir / "refine_state.pt", progress=self.progress)

    def _candidate_backend(self, policy: Policy) -> OrtBackend:
        """A candidate as it will be deployed: lowered to QDQ ONNX and run in onnxruntime (about twice as
        fast as the torch simulation on a CPU, so the search can afford more samples)."""
        return OrtBackend(to_onnx(self.candidate_sim(policy)).SerializeToString(), batch_size=self.s.batch_size)

    def _greedy(self) -> Policy:
        gen = torch.Generator().manual_seed(self.s.seed)
        x = self.search.x[:64]
        x = x + self.s.sigma * torch.randn(x.shape, generator=gen)
        with torch.inference_mode():
            reference = self.prep.gm(x)

        # With one layer quantized at a time, every layer's range is the float model's: calibrate once.
        names = [layer.name for layer in self.layers]
        float_sim = self.make_sim({name: (FP32, 8) for name in names})
        ranges = observed_ranges(float_sim)
        probe = self.make_sim({name: (FP32, FP32) for name in names}, ranges)

        def logits_of(policy: Policy) -> torch.Tensor:  # one layer's weights or input quantized, in place
            (name, (w, a)), = [(k, v) for k, v in policy.items() if v != (FP32, FP32)]
            with one_layer_quantized(probe, name, w, a, ranges), torch.inference_mode():
                return probe(x)

        sens = sensitivity(self.layers, logits_of, reference, self.s.min_bits, self.s.max_bits)
        return greedy_policy(self.layers, self.s.budget, sens, self.s.min_bits, self.s.max_bits, self.fixed)

    def certify(self, backend, state_path: Path) -> CertifyResult:
        s, t = self.s, self.test_set
        return certify_dataset(backend, t.x, t.y, [int(i) for i in t.ids], sigma=s.sigma, n0=s.n0, n=s.n,
                               alpha=s.alpha, batch_size=s.batch_size, seed=s.seed + TEST_SEED_OFFSET,
                               state_path=state_path, progress=self.progress, pool=self.pool)

    def fp32_certificate(self) -> CertifyResult:
        """The FP32 model's certificate on the test images (kept in ``fp32_dir``, which runs may share)."""
        self.fp32_dir.mkdir(parents=True, exist_ok=True)
        backend = TorchBackend(self.prep.gm, batch_size=self.s.batch_size, device=self.device)
        return self.certify(backend, self.fp32_dir / "certify_fp32.jsonl")

    def policy(self) -> tuple[Policy, list[dict]]:
        """The search stage: the chosen policy and the episode log (from policy.json once it is done)."""
        policy_path = self.dir / "policy.json"
        if policy_path.exists():
            saved = json.loads(policy_path.read_text())
            self.timings.update(saved.get("timings_s", {}))  # the search ran in an earlier process
            return policy_from_json(saved["policy"]), saved["episodes"]
        policy, episodes = self._timed("search", self.search_policy)
        write_json(policy_path, {"semantics": SEMANTICS, "policy": policy_to_json(policy), "episodes": episodes,
                                 "timings_s": dict(self.timings)})
        return policy, episodes

    def run(self, settings: CompileSettings, check: CertifySettings | None = None
            ) -> tuple[onnx.ModelProto, dict, torch.fx.GraphModule]:
        """All stages; returns the ONNX model (with the report and the L2 certificate in its metadata), the report
        and the fine-tuned simulation the model was lowered from. The final certificate is computed in
        ``check.runtime`` (onnxruntime by default); with ``check.verify`` that runtime and the torch simulation
        run on the same noisy samples and their disagreement rate goes into the report (with
        ``check.compare_runtime`` also that of a second runtime), refused above ``check.max_disagreement``."""
        s = self.s
        check = check or CertifySettings(sigma=s.sigma, n=s.n, n0=s.n0, alpha=s.alpha)
        policy, episodes = self.policy()
        sim = self.make_sim(policy)
        ft = self.finetune_set
        self._timed("qat", lambda: finetune(sim, ft.x, ft.y, sigma=s.sigma, epochs=s.finetune_epochs, lr=s.lr,
                                            seed=s.seed, state_path=self.dir / "qat.pt", progress=self.progress,
                                            augmentation=s.finetune_augment, device=self.device,
                                            learned_scales=s.qat_scales == "lsq", scale_lr=s.qat_scale_lr,
                                            teacher=self.prep.gm, distill=s.qat_distill,
                                            unfold_bn=s.qat_bn == "unfolded"))
        model = to_onnx(sim, replace(settings, search=asdict(s)))
        data = model.SerializeToString()
        layerwise = check_layers(sim, model, self.test.x[:LAYERWISE_IMAGES]) if check.verify else None
        reference = TorchBackend(sim, batch_size=s.batch_size, device=self.device) if check.verify else None
        backend, comparisons = deployed_backend(data, check.runtime, reference, check.compare_runtime, s.batch_size)
        quantized = self._timed("certify onnx", lambda: self.certify(backend, self.dir / "certify_quantized.jsonl"))
        fp32 = self._timed("certify fp32", self.fp32_certificate)
        apply_policy(self.prep.gm, policy)
        report = build_report(s, policy, profile(self.prep.gm), quantized, fp32, episodes, self.timings)
        report["certification"]["runtime"] = backend.runtime
        checked = check_comparisons(comparisons, check.alpha, check.max_disagreement)
        report |= {key: value for key, value in checked.items() if value is not None}
        if layerwise is not None:
            report["layerwise"] = layerwise
        quantized.data = self.test.spec
        attach(model, {"arqc.certificate_l2": l2_certificate(quantized, backend.runtime, data),
                       "arqc.report": report})
        return model, report, sim


def l2_certificate(result: CertifyResult, runtime: str, model: bytes) -> dict:
    """What the ONNX metadata carries of a randomized-smoothing certificate: the settings, the data, the backend
    and ``runtime`` it was computed in (the certificate holds for the file as that runtime computes it), the
    sha256 of the certified ``model`` bytes and the summary; the per-point records and timings stay in the
    certification's JSON."""
    return {"kind": "L2, randomized smoothing", "runtime": runtime, "model_sha256": hashlib.sha256(model).hexdigest(),
            **{k: v for k, v in result.to_json().items() if k not in ("points", "time_per_point_s")}}


def build_report(s: SearchSettings, policy: Policy, prof, quantized: CertifyResult, fp32: CertifyResult,
                 episodes: list[dict], timings: dict) -> dict:
    """The stable report JSON (README: "compile report")."""
    def cert(result: CertifyResult) -> dict:
        return {"certified_accuracy": result.certified_accuracy, "acr": result.acr,
                "clean_accuracy": result.clean_accuracy, "abstain_rate": result.abstain_rate}

    return {
        "semantics": SEMANTICS, "method": s.method, "budget": s.budget, "bitops_ratio_fp32": prof.bitops_ratio_fp32,
        "size_ratio_fp32": prof.to_json()["size_ratio_fp32"],
        "policy": policy_to_json(policy), **cert(quantized), "fp32": cert(fp32),
        "episodes": episodes,
        "certification": {"sigma": s.sigma, "n": s.n, "n0": s.n0, "alpha": s.alpha,
                          "num_images": quantized.num_images, "backend": quantized.backend,
                          "seed": quantized.seed},
        "layers": prof.to_json()["layers"], "timings_s": timings,
        "search_samples": search_samples(episodes),
    }


def search_samples(episodes: list[dict]) -> int:
    """Noisy samples the search spent over its episodes (the report's ``search_samples``)."""
    return int(np.sum([e.get("samples", 0) + e.get("refined", {}).get("samples", 0) for e in episodes]))

"""The staged ARQ driver (arqc/arq.py): an interrupted run resumed with the same arguments gives the same
result as an uninterrupted one, and a resume with other arguments is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest

from arqc import rewards
from arqc.arq import Run
from arqc.base import ArqcError
from arqc.data import load_images
from arqc.pipeline import prepare_model
from arqc.settings import SearchSettings

SETTINGS = SearchSettings(method="arq", budget=0.05, sigma=0.25, episodes=3, warmup=1, search_images=6,
                          cache_n=40, search_n=20, n0=10, n=40, test_images=4, finetune_epochs=1, calib_images=16,
                          batch_size=64)


@pytest.fixture(scope="module")
def setup(search_inputs):
    root = search_inputs
    train, test = load_images(f"npz:{root / 'train.npz'}"), load_images(f"npz:{root / 'test.npz'}")
    return root, prepare_model(str(root / "m.pt"), images=train), train, test


def _comparable(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "timings_s"}


def test_interrupted_run_resumes_to_the_same_result(setup, monkeypatch):
    root, prep, train, test = setup
    _, whole, _ = Run(prep, train, test, SETTINGS, root / "whole", resume=False, progress=False).run(prep.settings())
    score, calls = rewards.CertifiedReward.score, []

    def interrupted(self, policy):
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped during the third episode
        calls.append(policy)
        return score(self, policy)

    monkeypatch.setattr(rewards.CertifiedReward, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Run(prep, train, test, SETTINGS, root / "cut", resume=False, progress=False).run(prep.settings())
    monkeypatch.setattr(rewards.CertifiedReward, "score", score)
    model, resumed, _ = Run(prep, train, test, SETTINGS, root / "cut", resume=True, progress=False).run(prep.settings())
    assert _comparable(resumed) == _comparable(whole)
    assert len(resumed["episodes"]) == 3 and resumed["method"] == "arq"
    assert any(p.key == "arqc.report" for p in model.metadata_props)


def test_existing_workdir_needs_resume_and_the_same_arguments(setup):
    root, prep, train, test = setup
    Run(prep, train, test, replace(SETTINGS, method="uniform"), root / "u", resume=False, progress=False)
    with pytest.raises(ArqcError, match="pass --resume"):
        Run(prep, train, test, replace(SETTINGS, method="uniform"), root / "u", resume=False, progress=False)
    with pytest.raises(ArqcError, match="other arguments"):
        Run(prep, train, test, replace(SETTINGS, method="uniform", seed=1), root / "u", resume=True,
            progress=False)


def test_a_run_is_resumed_only_on_the_device_it_started_on(setup):
    """The torch stages' device is part of the run's arguments, resolved (a GPU's sums differ from a CPU's);
    a resume elsewhere is refused with the --device that continues it. A cuda run is faked in args.json."""
    import json

    root, prep, train, test = setup
    s = replace(SETTINGS, method="uniform", device="cpu")
    Run(prep, train, test, s, root / "dev", resume=False, progress=False)
    args = json.loads((root / "dev" / "args.json").read_text())
    assert args["device"] == "cpu" and "device" not in args["settings"]
    Run(prep, train, test, replace(s, device=None), root / "dev", resume=True, progress=False)  # None → cpu here
    (root / "dev" / "args.json").write_text(json.dumps(dict(args, device="cuda:0")))
    with pytest.raises(ArqcError, match="ran its torch stages on cuda:0.*--device cuda:0"):
        Run(prep, train, test, s, root / "dev", resume=True, progress=False)
    del args["device"]  # a run whose arguments lack a key (an older arqc's): refused, naming the key
    (root / "dev" / "args.json").write_text(json.dumps(args))
    with pytest.raises(ArqcError, match="other arguments .*differ in 'device'"):
        Run(prep, train, test, s, root / "dev", resume=True, progress=False)


def test_qat_runs_on_the_finetune_images(setup):
    """--finetune-data: QAT uses those images (another set gives other weights), and it is part of the run's
    arguments (a resume with another set is refused)."""
    import torch

    root, prep, train, test = setup
    s = replace(SETTINGS, method="uniform")
    other = load_images(f"npz:{root / 'test.npz'}")  # any other labelled set of the same shape
    Run(prep, train, test, s, root / "ft_train", resume=False, progress=False).run(prep.settings())
    Run(prep, train, test, s, root / "ft_other", resume=False, progress=False, finetune=other).run(prep.settings())
    a = torch.load(root / "ft_train" / "qat.pt", weights_only=True)["model"]
    b = torch.load(root / "ft_other" / "qat.pt", weights_only=True)["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    with pytest.raises(ArqcError, match="other arguments"):
        Run(prep, train, test, s, root / "ft_other", resume=True, progress=False)


def test_episode_finetune_tunes_each_candidate_outside_the_search_images(setup, monkeypatch):
    """--episode-finetune-epochs (HAQ's per-candidate fine-tune): every distinct candidate is fine-tuned once,
    on the calibration and remaining training images but never on the search images its reward scores."""
    import arqc.arq

    root, prep, train, test = setup
    tuned = []
    real = arqc.arq.finetune

    def spy(sim, images, labels, **kwargs):
        tuned.append(images)
        return real(sim, images, labels, **kwargs)

    monkeypatch.setattr(arqc.arq, "finetune", spy)
    s = replace(SETTINGS, method="random", finetune_epochs=0, episode_finetune_epochs=1)
    run = Run(prep, train, test, s, root / "episode_ft", resume=False, progress=False)
    policy, episodes = run.policy()
    assert len(episodes) == 3 and 1 <= len(tuned) <= 3  # distinct policies only (the reward memoizes)
    search = {tuple(x.flatten().tolist()) for x in run.search.x}
    for images in tuned:
        assert len(images) == len(train) - s.search_images
        assert not search & {tuple(x.flatten().tolist()) for x in images}


def test_refined_rewards_are_the_reward_on_the_search_and_refine_images_together(setup):
    """Adaptive reward precision (--refine-images): the best distinct candidates, and only they, are scored
    again, and each refined reward equals an independent CertifiedReward over the search and refine images
    together (its own FP32 cache of all of them); the search returns the best refined candidate."""
    import torch

    from arqc.data import ImageSet
    from arqc.passes.policy import policy_from_json
    from arqc.rewards import CertifiedReward
    from arqc.runtime.backends import TorchBackend
    from arqc.runtime.irs import build_cache

    root, prep, train, test = setup
    with torch.inference_mode():  # labels the FP32 model gets right, so that the rewards are not all 0
        labels = prep.gm(train.x).argmax(1)
    train = ImageSet(train.x, labels, train.ids, train.spec, train.num_classes)
    s = replace(SETTINGS, episodes=4, warmup=1, refine_images=10, refine_top=2, finetune_epochs=0)
    run = Run(prep, train, test, s, root / "refine", resume=False, progress=False)
    policy, episodes = run.policy()
    refined = [e for e in episodes if "refined_reward" in e]
    firsts = {}
    for e in episodes:
        firsts.setdefault(str(e["policy"]), e)
    best = sorted(firsts.values(), key=lambda e: (-e["reward"], e["episode"]))[:2]
    assert [e["episode"] for e in refined] == sorted(e["episode"] for e in best)
    assert policy == policy_from_json(max(refined, key=lambda e: e["refined_reward"])["policy"])

    both = train.subset(num=s.search_images + s.refine_images, start=s.calib_images)
    ids = [int(i) for i in both.ids]
    cache = build_cache(TorchBackend(prep.gm, batch_size=s.batch_size), both.x.numpy(), both.y.numpy(), ids,
                        sigma=s.sigma, n0=s.n0, n=s.cache_n, alpha=s.alpha, batch_size=s.batch_size, seed=s.seed,
                        progress=False)
    oracle = CertifiedReward(run.candidate_sim, both.x, both.y, ids, cache, s.search_n, s.lam, s.batch_size,
                             make_backend=run._candidate_backend)
    for e in refined:
        assert e["refined_reward"] == pytest.approx(oracle(policy_from_json(e["policy"]))[0], abs=1e-12)
        assert e["refined"]["images"] == 16
    assert any(e["refined_reward"] > 0 for e in refined)
    assert any(e["refined_reward"] != e["reward"] for e in refined)  # the refine images count

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

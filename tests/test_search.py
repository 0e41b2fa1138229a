"""The bit-allocation search: environment, budget wall, baselines, DDPG agent, resumable loops."""

from __future__ import annotations

import pytest
import torch
from qnets import NetSpec, SmallNet

from arqc.base import ArqcError
from arqc.passes.search.agent import DDPGConfig
from arqc.passes.search.baselines import greedy_policy, uniform_policy
from arqc.passes.search.budget import LayerSpec, bitops, check_budget, enforce_budget, fp32_bitops, parse_budget
from arqc.passes.search.env import STATE_DIM, BitAllocationEnv, action_to_bits
from arqc.passes.search.loop import ddpg_search, random_search


def _layers(n: int = 5) -> list[LayerSpec]:
    return [LayerSpec(f"l{i}", i, 16 * (i + 1), 16 * (i + 2), 3, 1 + (i % 2), False, 100 * (i + 1), 64, 1000 * (i + 1))
            for i in range(n)]


def test_action_to_bits_uses_equal_bins_over_the_range():
    bits = [action_to_bits(a / 1000, 2, 8) for a in range(1001)]
    assert min(bits) == 2 and max(bits) == 8
    counts = [bits.count(b) for b in range(2, 9)]
    assert max(counts) - min(counts) <= 2  # seven equal-width bins


def test_parse_budget():
    assert parse_budget("1.5%") == pytest.approx(0.015)
    assert parse_budget("0.03") == pytest.approx(0.03)
    with pytest.raises(ArqcError):
        parse_budget("cheap")


def test_budget_wall_meets_budget_lowers_from_the_back_and_keeps_fixed_layers():
    layers = _layers()
    policy = {layer.name: (8, 8) for layer in layers}
    walled = enforce_budget(layers, policy, 0.02, fixed={"l0": 8})
    assert bitops(layers, walled) <= 0.02 * fp32_bitops(layers)
    assert walled["l0"] == (8, 8)
    assert walled["l4"][0] <= walled["l1"][0]  # the wall starts from the last layer
    assert enforce_budget(layers, walled, 0.02, fixed={"l0": 8}) == walled  # already within budget: unchanged


def test_budget_wall_takes_the_wider_side_first():
    layers = _layers()
    policy = {layer.name: (2, 8) if i % 2 else (8, 3) for i, layer in enumerate(layers)}
    walled = enforce_budget(layers, policy, 0.01)
    assert bitops(layers, walled) <= 0.01 * fp32_bitops(layers)
    for i, layer in enumerate(layers):
        w, a = walled[layer.name]
        assert (w, a) != policy[layer.name]
        assert (w == 2) if i % 2 else (a == 3)  # the narrow side is never lowered while the wide side is wider


def test_budget_checks_name_the_problem():
    layers = _layers()
    with pytest.raises(ArqcError, match="below what 2-bit"):
        check_budget(layers, 0.001, 2, {})
    with pytest.raises(ArqcError, match="below 100%"):
        check_budget(layers, 1.5, 2, {})
    check_budget(layers, 0.015625, 2, {})


def test_uniform_policy_is_the_highest_that_fits():
    layers = _layers()
    assert set(uniform_policy(layers, 1 / 64, fixed={}).values()) == {(4, 4)}
    assert set(uniform_policy(layers, 1 / 64 - 1e-6, fixed={}).values()) == {(3, 3)}


def test_greedy_spends_bits_where_sensitivity_is_high():
    layers = _layers(3)
    # layer l1 is very sensitive, others not at all
    sens = {(layer.name, kind, b): (10.0 / b if layer.name == "l1" else 0.0)
            for layer in layers for kind in (0, 1) for b in range(2, 9)}
    policy = greedy_policy(layers, 0.03, sens)
    assert bitops(layers, policy) <= 0.03 * fp32_bitops(layers)
    assert policy["l1"][0] > policy["l0"][0] and policy["l1"][0] > policy["l2"][0]


def test_environment_episode_shape_and_state():
    env = BitAllocationEnv(_layers(), 0.03, fixed={"l0": 8, "l4": 8})
    s = env.reset()
    assert s.shape == (STATE_DIM,) and env.steps == 6
    done, steps = False, 0
    while not done:
        s, done = env.step(0.99)
        steps += 1
    assert steps == 6
    policy = env.policy()
    assert policy["l0"] == (8, 8) and policy["l4"] == (8, 8) and list(policy) == [f"l{i}" for i in range(5)]
    assert bitops(env.layers, policy) <= 0.03 * fp32_bitops(env.layers)


def _toy_reward(policy):
    """Prefers bits on the largest layer (l4): a signal the agent can learn."""
    return policy["l3"][0] + policy["l3"][1] - 0.2 * (policy["l1"][0] + policy["l1"][1]), {}


def test_ddpg_learns_a_toy_preference():
    env = BitAllocationEnv(_layers(), 0.2)
    log = ddpg_search(env, _toy_reward, 45, DDPGConfig(warmup=15, seed=3, batch_size=32), progress=False)
    random_phase = sum(e["reward"] for e in log.episodes[:15]) / 15
    learned = sum(e["reward"] for e in log.episodes[-10:]) / 10
    assert learned > random_phase + 1.0


def test_demonstration_ends_the_warmup_and_the_actor_imitates_it():
    env = BitAllocationEnv(_layers(), 0.2, fixed={"l0": 8})
    demo = {"l0": (8, 8), "l1": (3, 6), "l2": (7, 2), "l3": (4, 4), "l4": (5, 3)}
    assert enforce_budget(env.layers, demo, 0.2, fixed={"l0": 8}) == demo  # inside the budget: the wall keeps it
    config = DDPGConfig(warmup=2, seed=0, init_sigma=0.01)
    log = ddpg_search(env, _toy_reward, 4, config, progress=False, demo=demo)
    played = {name: (b["w_bits"], b["a_bits"]) for name, b in log.episodes[1]["policy"].items()}
    assert played == demo and log.episodes[1]["reward"] == _toy_reward(demo)[0]  # the last warm-up episode
    assert len(log.episodes) == 4  # the demonstration counts as one of the episodes
    after = {name: (b["w_bits"], b["a_bits"]) for name, b in log.episodes[2]["policy"].items()}
    assert after == demo  # the actor imitates it: with little exploration noise it plays it again
    plain = ddpg_search(env, _toy_reward, 4, config, progress=False)
    assert all(e["policy"] != log.episodes[1]["policy"] for e in plain.episodes)


@pytest.mark.parametrize("kind", ["ddpg", "random"])
def test_interrupted_search_resumes_to_the_same_result(tmp_path, kind):
    env = BitAllocationEnv(_layers(), 0.05)
    config = DDPGConfig(warmup=3, seed=1, batch_size=16)

    def run(reward, state):
        if kind == "ddpg":
            return ddpg_search(env, reward, 8, config, state, progress=False)
        return random_search(env, reward, 8, 1, state, progress=False)

    whole = run(_toy_reward, tmp_path / "whole.pt")
    calls = []

    def interrupted(policy):
        if len(calls) == 5:
            raise KeyboardInterrupt  # the user stops the run during episode 6
        calls.append(policy)
        return _toy_reward(policy)

    with pytest.raises(KeyboardInterrupt):
        run(interrupted, tmp_path / "state.pt")
    assert len(torch.load(tmp_path / "state.pt", weights_only=True)["log"]) == 5
    resumed = run(_toy_reward, tmp_path / "state.pt")
    assert resumed.episodes == whole.episodes


def test_resume_with_other_arguments_is_refused(tmp_path):
    env = BitAllocationEnv(_layers(), 0.05)
    random_search(env, _toy_reward, 2, 0, tmp_path / "s.pt", progress=False)
    with pytest.raises(ArqcError, match="other arguments"):
        random_search(env, _toy_reward, 2, 1, tmp_path / "s.pt", progress=False)


def test_float_ranges_give_the_calibrated_simulation_of_single_layer_policies():
    """The sensitivity proxy quantizes one layer at a time and reuses the float model's activation ranges
    instead of calibrating each policy: that must be exactly what calibration would have found."""
    from arqc.passes.analysis import analyze
    from arqc.passes.capture import capture
    from arqc.passes.meta import FP32, info, quantizable_nodes
    from arqc.passes.policy import apply_policy
    from arqc.passes.quantize import observed_ranges, simulate

    spec = NetSpec((2, 4, 4), width=4)
    gm = analyze(capture(SmallNet(spec).eval(), torch.zeros(1, *spec.shape)))
    names = [info(n).layer for n in quantizable_nodes(gm)]
    calibration = [torch.rand(16, *spec.shape, generator=torch.Generator().manual_seed(3))]
    ranges = observed_ranges(simulate(apply_policy(gm, {name: (FP32, 8) for name in names}), calibration))
    x = torch.rand(32, *spec.shape, generator=torch.Generator().manual_seed(4))
    for name in names:
        for bits in ((3, FP32), (FP32, 3)):
            policy = {other: (FP32, FP32) for other in names} | {name: bits}
            calibrated = simulate(apply_policy(gm, policy), calibration)(x)
            reused = simulate(apply_policy(gm, policy), [], ranges=ranges)(x)
            assert torch.equal(calibrated, reused)


def _episodes(rewards: list[float], policies: list[int]) -> list[dict]:
    return [{"episode": i, "policy": {"l": {"w_bits": p, "a_bits": p}}, "reward": r}
            for i, (r, p) in enumerate(zip(rewards, policies, strict=True))]


def test_refine_scores_the_best_distinct_policies_once_and_resumes(tmp_path):
    from arqc.passes.search.loop import chosen, refine

    # policies 4 (episodes 0, 3), 5 (1, 2), 7: the best distinct are 7 (0.30), 4 (0.29: episode 0, the first of the
    # equals) and 5 (0.28 in episode 2)
    episodes = _episodes([0.29, 0.20, 0.28, 0.29, 0.30], [4, 5, 5, 4, 7])
    calls = []

    def score(e):
        calls.append(e["episode"])
        if len(calls) == 2 and "stop" in score.__dict__:
            raise KeyboardInterrupt
        return {7: 0.25, 4: 0.27, 5: 0.26}[e["policy"]["l"]["w_bits"]], {"images": 9}

    score.stop = True
    with pytest.raises(KeyboardInterrupt):
        refine(episodes, score, top=3, state_path=tmp_path / "refine.pt", progress=False)
    del score.stop
    out = refine(episodes, score, top=3, state_path=tmp_path / "refine.pt", progress=False)
    assert calls == [4, 0, 0, 2]  # the first candidate's score was kept across the interruption
    assert [e.get("refined_reward") for e in out] == [0.27, None, 0.26, None, 0.25]
    assert chosen(out)["episode"] == 0  # the best refined, not the best coarse reward (episode 4)
    assert chosen(episodes)["episode"] == 4 and "refined_reward" not in episodes[0]  # the input is not changed

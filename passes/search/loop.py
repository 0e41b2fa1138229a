"""Search loops: DDPG episodes (ARQ, HAQ) and random search, resumable episode by episode.

A reward function maps a policy to (reward, info) — info holds what the log should keep (ACR, accuracy…).
The loop checkpoints after every episode (agent state, log) into ``state_path`` (written atomically), so an
interrupted search resumed with the same arguments gives the same result as an uninterrupted one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from arqc.base import ArqcError, atomic_write, first_difference
from arqc.passes.meta import SEMANTICS, check_semantics
from arqc.passes.policy import Policy, policy_to_json
from arqc.passes.search.agent import DDPG, DDPGConfig
from arqc.passes.search.budget import bitops, enforce_budget, fp32_bitops
from arqc.passes.search.env import STATE_DIM, BitAllocationEnv

RewardFn = Callable[[Policy], tuple[float, dict]]


@dataclass
class SearchLog:
    episodes: list[dict] = field(default_factory=list)  # policy, bitops ratio, reward, info per episode

    def best(self) -> dict:
        return max(self.episodes, key=lambda e: e["reward"])


def chosen(episodes: list[dict]) -> dict:
    """The episode whose policy a search returns: the best refined reward when its best candidates were scored
    again (:func:`refine`), otherwise the best reward."""
    refined = [e for e in episodes if "refined_reward" in e]
    return max(refined, key=lambda e: e["refined_reward"]) if refined else max(episodes, key=lambda e: e["reward"])


def refine(episodes: list[dict], score: Callable[[dict], tuple[float, dict]], top: int,
           state_path: Path | None = None, signature: dict | None = None, progress: bool = True) -> list[dict]:
    """Adaptive reward precision: the ``top`` distinct policies with the best rewards are scored again by
    ``score`` (episode → (refined reward, info): a more precise reward, too costly for every episode). The
    policy's best episode (the first of equals) gets ``refined_reward`` and ``refined`` (the info);
    :func:`chosen` then picks among them. Resumable candidate by candidate through ``state_path``."""
    rank = sorted(episodes, key=lambda e: (-e["reward"], e["episode"]))
    distinct: dict[str, dict] = {}
    for e in rank:
        distinct.setdefault(json.dumps(e["policy"], sort_keys=True), e)
    best = list(distinct.values())[:top]
    signature = {"kind": "refine", "semantics": SEMANTICS, "top": top,
                 "candidates": [e["episode"] for e in best], **(signature or {})}
    state = _load_state(state_path, signature)
    done: dict[int, list] = state["done"] if state is not None else {}
    for e in tqdm(best, desc="refine", disable=not progress):
        if e["episode"] not in done:
            done[e["episode"]] = list(score(e))
            _save_state(state_path, {"signature": signature, "done": done})
    out = [dict(e) for e in episodes]
    for e in out:
        if e["episode"] in done:
            e["refined_reward"], e["refined"] = done[e["episode"]]
    return out


def _record(env: BitAllocationEnv, policy: Policy, reward: float, info: dict, episode: int) -> dict:
    return {"episode": episode, "policy": policy_to_json(policy), "reward": reward,
            "bitops_ratio_fp32": bitops(env.layers, policy) / fp32_bitops(env.layers), **info}


def _load_state(state_path: Path | None, signature: dict) -> dict | None:
    if state_path is None or not state_path.exists():
        return None
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    check_semantics((state.get("signature") or {}).get("semantics"), f"search state {state_path}")
    key = first_difference(state.get("signature") or {}, signature)
    if key is not None:
        raise ArqcError(f"{state_path} belongs to a search with other arguments (they differ in '{key}'); use the "
                        "same arguments to resume, or remove the work directory to start over")
    return state


def _save_state(state_path: Path | None, state: dict) -> None:
    if state_path is not None:
        atomic_write(state_path, lambda f: torch.save(state, f))


def demo_actions(env: BitAllocationEnv, policy: Policy) -> list[float]:
    """The actions (centres of the bits' bins) with which the environment reproduces ``policy``."""
    span = env.max_bits - env.min_bits + 1
    return [(bits - env.min_bits + 0.5) / span for layer in env.free for bits in policy[layer.name]]


def ddpg_search(env: BitAllocationEnv, reward_fn: RewardFn, episodes: int, config: DDPGConfig,
                state_path: Path | None = None, signature: dict | None = None, progress: bool = True,
                demo: Policy | None = None) -> SearchLog:
    """HAQ's loop: per episode, the agent picks every layer's bits, the wall enforces the budget, the reward
    function scores the policy, and the agent learns from the episode.

    ``demo``: a policy played instead of the agent's actions in the last warm-up episode (a demonstration, as
    in DDPG from demonstrations). It is scored, logged and stored in the replay buffer like any episode and
    counts as one of the ``episodes``; coming after the random warm-up, its reward is measured against their
    moving average, and the actor is then fitted to it (:meth:`DDPG.imitate`), so that exploration searches
    around the demonstrated policy."""
    agent = DDPG(STATE_DIM, config)
    log = SearchLog()
    signature = {"kind": "ddpg", "semantics": SEMANTICS, "episodes": episodes,
                 "demo": None if demo is None else policy_to_json(demo), "config": asdict(config), **(signature or {})}
    scripted = demo_actions(env, demo) if demo is not None else None
    demo_episode = max(0, min(config.warmup, episodes) - 1)
    state = _load_state(state_path, signature)
    if state is not None:
        agent.load_state_dict(state["agent"])
        log.episodes = state["log"]
    bar = tqdm(range(len(log.episodes), episodes), initial=len(log.episodes), total=episodes,
               desc="search", disable=not progress)
    for episode in bar:
        s = env.reset()
        transitions, done = [], False
        while not done:
            a = scripted[len(transitions)] if scripted is not None and episode == demo_episode else agent.act(s)
            s2, done = env.step(a)
            transitions.append((s, a, s2, done))
            s = s2
        policy = env.policy()
        reward, info = reward_fn(policy)
        agent.end_episode(transitions, reward)
        if scripted is not None and episode == demo_episode:
            agent.imitate(torch.stack([t[0] for t in transitions]), torch.tensor([t[1] for t in transitions]))
        log.episodes.append(_record(env, policy, reward, info, episode))
        bar.set_postfix(reward=f"{reward:.4f}", best=f"{log.best()['reward']:.4f}")
        _save_state(state_path, {"signature": signature, "agent": agent.state_dict(), "log": log.episodes})
    return log


def random_search(env: BitAllocationEnv, reward_fn: RewardFn, episodes: int, seed: int = 0,
                  state_path: Path | None = None, signature: dict | None = None, progress: bool = True) -> SearchLog:
    """Uniformly random bits per layer (then the budget wall), as many evaluations as the agent gets."""
    log = SearchLog()
    signature = {"kind": "random", "semantics": SEMANTICS, "episodes": episodes, "seed": seed, **(signature or {})}
    state = _load_state(state_path, signature)
    if state is not None:
        log.episodes = state["log"]
    for episode in tqdm(range(len(log.episodes), episodes), initial=len(log.episodes), total=episodes,
                        desc="random search", disable=not progress):
        rng = random.Random(f"{seed}:{episode}")  # one stream per episode: resuming needs no RNG state
        policy = {layer.name: (env.fixed[layer.name],) * 2 if layer.name in env.fixed else
                  (rng.randint(env.min_bits, env.max_bits), rng.randint(env.min_bits, env.max_bits))
                  for layer in env.layers}
        policy = enforce_budget(env.layers, policy, env.budget, env.min_bits, env.fixed)
        reward, info = reward_fn(policy)
        log.episodes.append(_record(env, policy, reward, info, episode))
        _save_state(state_path, {"signature": signature, "log": log.episodes})
    return log

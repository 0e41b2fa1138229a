"""DDPG agent for bit allocation, with HAQ's settings (Wang et al. 2019, lib/rl/ddpg.py).

Actor and critic are MLPs with two hidden layers of 300 units; actor lr 1e-4, critic lr 1e-3; soft target
updates with τ = 0.01; replay batches of 64; discount 1 (the only reward comes at the end of an episode and
is given to every step of it, as in HAQ). Exploration: during the warm-up episodes actions are uniform in
[0, 1]; afterwards the actor's action plus truncated normal noise (kept inside [0, 1]) whose σ starts at
0.5 and decays by 0.99 per episode. Rewards are centred by a moving average (HAQ's baseline).

All randomness comes from one torch.Generator so that :meth:`state_dict`/:meth:`load_state_dict`
resume a search exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DDPGConfig:
    hidden: int = 300
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    tau: float = 0.01
    batch_size: int = 64
    discount: float = 1.0
    warmup: int = 20  # episodes of random actions
    init_sigma: float = 0.5
    sigma_decay: float = 0.99
    moving_alpha: float = 0.5  # HAQ's moving-average baseline rate
    buffer_size: int = 2000 * 40  # transitions (HAQ: rmsize 128 episodes of up to ~50 steps)
    seed: int = 0


def _mlp(inputs: int, hidden: int, out: nn.Module | None) -> nn.Sequential:
    layers = [nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)]
    return nn.Sequential(*layers, *([out] if out is not None else []))


class DDPG:
    def __init__(self, state_dim: int, config: DDPGConfig | None = None):
        self.config = c = config or DDPGConfig()
        self.gen = torch.Generator().manual_seed(c.seed)
        with torch.random.fork_rng():
            torch.manual_seed(c.seed)
            self.actor = _mlp(state_dim, c.hidden, nn.Sigmoid())
            self.critic = _mlp(state_dim + 1, c.hidden, None)
        self.actor_target = _mlp(state_dim, c.hidden, nn.Sigmoid())
        self.critic_target = _mlp(state_dim + 1, c.hidden, None)
        self.actor_target.load_state_dict(self.actor.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=c.lr_actor)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=c.lr_critic)
        self.state_dim = state_dim
        self.buffer = torch.zeros(0, 2 * state_dim + 3)  # rows: s, a, r, s', done
        self.episode = 0
        self.sigma = c.init_sigma
        self.baseline: float | None = None

    # -- acting ----------------------------------------------------------------------------------------
    def act(self, state: torch.Tensor) -> float:
        """An exploratory action in [0, 1] for the current episode."""
        if self.episode < self.config.warmup:
            return float(torch.rand((), generator=self.gen))
        with torch.no_grad():
            mean = float(self.actor(state.float().unsqueeze(0)))
        return self._truncated_normal(mean, self.sigma)

    def greedy(self, state: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self.actor(state.float().unsqueeze(0)))

    def _truncated_normal(self, mean: float, sigma: float) -> float:
        for _ in range(1000):  # rejection sampling inside [0, 1]
            x = mean + sigma * float(torch.randn((), generator=self.gen))
            if 0.0 <= x <= 1.0:
                return x
        return min(max(mean, 0.0), 1.0)

    # -- learning --------------------------------------------------------------------------------------
    def end_episode(self, transitions: list[tuple[torch.Tensor, float, torch.Tensor, bool]], reward: float) -> None:
        """Store an episode (state, action, next state, done per step) with its final reward, then train."""
        c = self.config
        self.baseline = reward if self.baseline is None else \
            self.baseline + c.moving_alpha * (reward - self.baseline)
        centred = reward - self.baseline
        rows = [torch.cat([s.float(), torch.tensor([a, centred]), s2.float(), torch.tensor([float(done)])])
                for s, a, s2, done in transitions]
        self.buffer = torch.cat([self.buffer, torch.stack(rows)])[-c.buffer_size:]
        if self.episode >= c.warmup:
            for _ in range(len(transitions)):
                self._update()
            self.sigma *= c.sigma_decay
        self.episode += 1

    def _update(self) -> None:
        c, d = self.config, self.state_dim
        idx = torch.randint(len(self.buffer), (min(c.batch_size, len(self.buffer)),), generator=self.gen)
        batch = self.buffer[idx]
        s, a, r, s2, done = batch[:, :d], batch[:, d:d + 1], batch[:, d + 1:d + 2], batch[:, d + 2:2 * d + 2], \
            batch[:, -1:]
        with torch.no_grad():
            target = r + c.discount * (1 - done) * self.critic_target(torch.cat([s2, self.actor_target(s2)], 1))
        critic_loss = nn.functional.mse_loss(self.critic(torch.cat([s, a], 1)), target)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        actor_loss = -self.critic(torch.cat([s, self.actor(s)], 1)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        for net, target_net in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
            for p, tp in zip(net.parameters(), target_net.parameters(), strict=True):
                tp.data.mul_(1 - c.tau).add_(c.tau * p.data)

    def imitate(self, states: torch.Tensor, actions: torch.Tensor, steps: int = 300, lr: float = 1e-3) -> float:
        """Behaviour cloning: fit the actor (and its target) to a demonstration's actions, full batch, so that
        exploration after the warm-up starts around the demonstrated policy. Returns the final squared error."""
        opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        target = actions.float().reshape(-1, 1)
        for _ in range(steps):
            loss = nn.functional.mse_loss(self.actor(states.float()), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.actor_target.load_state_dict(self.actor.state_dict())
        return float(loss.detach())

    # -- resuming --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "actor_target": self.actor_target.state_dict(), "critic_target": self.critic_target.state_dict(),
                "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                "buffer": self.buffer, "episode": self.episode, "sigma": self.sigma,
                "baseline": self.baseline, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("actor", "critic", "actor_target", "critic_target", "actor_opt", "critic_opt"):
            getattr(self, name).load_state_dict(state[name])
        self.buffer, self.episode, self.sigma = state["buffer"], state["episode"], state["sigma"]
        self.baseline = state["baseline"]
        self.gen.set_state(state["gen"])

"""Bit-allocation search: the environment (env.py), the DDPG agent (agent.py), the budget wall
(budget.py), baselines (baselines.py), and the search loop (loop.py).
The environment and the agent know nothing of each other's internals, and neither knows how a reward is
computed: the loop hands the environment's policies to a reward function, which the driver passes in
(arqc/rewards.py asks runtime/ for certificates; nothing in passes/ imports runtime/)."""

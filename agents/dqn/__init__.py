"""The native DQN (Mnih et al. 2015) with the weight-normalization paper's protocol (section 5.4).

Modules: ``config`` (typed, frozen run config), ``envs`` (Atari / MinAtar / gymnasium vector envs),
``networks`` (Q-networks through ``wn_rl.Parameterization``), ``replay`` (frame-deduplicated replay on
the device), ``learner`` (the TD math and the update), ``evaluation`` (acting, the paper's evaluation),
``runner`` (the loop: logs, checkpoints, resume).
"""

"""``kdiff-align arena``: every inference-time scaling method at equal compute on the shipped Fashion-MNIST model.

Unconditional sampling (null class) of the 28×28 model; every method starts from the same noises and
gets the same budgets of network evaluations (NFE) per image; its hyper-parameters (steps, N, K,
particles, iterations) are the largest whose cost formula fits the budget, and the NFE reported is
the one counted by ``testing.CountingDenoiser`` (forward rows) plus the backward rows (a backward pass
through the network counts as one evaluation). Scores per (method, budget), see ``score``: the target
reward (mean ± s.e.m. over images), a held-out reward no method sees, diversity and fidelity in the
held-out classifier's feature space (``toy.load_heldout_classifier``), and wall time per image.

Methods (``METHODS``; the ``--sampler`` ODE solver is used wherever a method integrates the PF-ODE):
``plain-ode`` (more solver steps), ``plain-sde`` (ancestral steps), ``best_of_n-ode`` (N samples on the
usual 20-step grid), ``demon-{tanh,boltzmann,optimal}-{tweedie,rollout}`` (Sampling Demon; the rollout
look-ahead uses the solver), ``smc-{fk,das}-{resample,argmax}`` (FK steering's prior proposal, DAS's
guided proposal; one resampled draw or the highest-weight particle), ``guidance-dps`` (reward gradient
guidance, ``align.guidance``) and ``search-{random,zero-order}`` (Ma et al. 2025, ``align.search``, on
10-step samples). Gradient methods are skipped for non-differentiable rewards. SMC moves by its ancestral
kernel and Demon by the β-SDE with a Heun tail whatever the solver; adaptive solvers (dopri5, ...) take the
evaluations their tolerance needs, so their counted NFE need not match the budget.

Modules: ``costs`` (each method's rows per image and the fit to a budget), ``methods`` (the runners and
``METHODS``), ``scores`` (built-in rewards, held-out twins, diversity, FD), ``run`` (``run_arena``),
``report`` (arena.json/.md, plots, grids) and ``cli`` (``kdiff-align arena``).
"""
from .costs import formula_nfe
from .methods import METHODS, Task
from .report import FAMILIES, KEYS
from .run import BUDGETS, run_arena, run_cell

__all__ = ["BUDGETS", "FAMILIES", "KEYS", "METHODS", "Task", "formula_nfe", "run_arena", "run_cell"]

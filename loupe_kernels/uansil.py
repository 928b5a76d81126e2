"""UANSIL: uncertainty-aware neural Shapley interaction learning (METHOD section 8).

A small MLP ``g`` predicts, from detached features of a game, the mean ``mu`` and log-variance
``log_var`` of its interaction. The policy decides which games are sampled:

- warm-up: the first ``warmup_steps`` calls sample every game;
- after it, a game whose predicted standard deviation ``exp(log_var / 2)`` is below
  ``skip_threshold * running_std`` (the running standard deviation of the sampled interactions)
  uses ``mu`` and skips sampling; the others are sampled;
- a random ``calibration_fraction`` of all games is always sampled and scores the calibration:
  the share with ``|I_hat - mu| < 2 sqrt(exp(log_var) + se^2)`` (ideally about 95%).

The predictor learns from the sampled games with :func:`uncertainty_interaction_loss` and the
sampler's own variance ``se^2`` as ``target_var``: ``exp(log_var)`` is then the predictor's error
variance beyond the sampling noise.

Games are addressed as pairs ``(g, m)`` (game g, subset m), like the samplers' ``[G, M]`` outputs.
A *sampler* is a callable ``sampler(pairs: LongTensor [Ns, 2], seed: int) -> (estimate [Ns], stderr
[Ns])`` that samples only the given pairs; :func:`pooled_sampler` and :func:`maxsim_sampler` build
one around :func:`loupe_kernels.shapley_interaction_pooled` / :func:`loupe_kernels.shapley_interaction`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .interaction_loss import uncertainty_interaction_loss
from .shapley import shapley_interaction, shapley_interaction_pooled

__all__ = ["InteractionPredictor", "UansilConfig", "UansilResult", "UansilPolicy", "pooled_sampler",
           "maxsim_sampler"]

Sampler = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
LOG_VAR_BOUND = 20.0  # the interaction loss is stable for log_var in [-20, 20]


class InteractionPredictor(nn.Module):
    """MLP ``[..., in_features] -> (mu [...], log_var [...])``; ``log_var`` is squashed smoothly into
    [-20, 20] (``20 * tanh(raw / 20)``), the range where the interaction loss is stable."""

    def __init__(self, in_features: int, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"InteractionPredictor: in_features must be a positive int, got {in_features!r}")
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"InteractionPredictor: layers must be a positive int, got {layers!r}")
        mods: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        mods.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*mods)
        self.in_features = in_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"InteractionPredictor: features must end in {self.in_features}, got {list(x.shape)}")
        out = self.net(x)
        mu, raw = out[..., 0], out[..., 1]
        return mu, LOG_VAR_BOUND * torch.tanh(raw / LOG_VAR_BOUND)


@dataclass
class UansilConfig:
    """Policy settings (METHOD section 9 defaults)."""
    warmup_steps: int = 500
    skip_threshold: float = 0.5       # skip when predicted std < skip_threshold * running std
    calibration_fraction: float = 0.1
    std_momentum: float = 0.99        # EMA of the sampled interactions' mean and mean square
    standardize: bool = True          # predictor in units of the running mean / std (see predict)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"UansilConfig: warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not self.skip_threshold >= 0:
            raise ValueError(f"UansilConfig: skip_threshold must be >= 0, got {self.skip_threshold!r}")
        if not 0.0 <= self.calibration_fraction <= 1.0:
            raise ValueError(f"UansilConfig: calibration_fraction must be in [0, 1], got {self.calibration_fraction!r}")
        if not 0.0 <= self.std_momentum < 1.0:
            raise ValueError(f"UansilConfig: std_momentum must be in [0, 1), got {self.std_momentum!r}")


@dataclass
class UansilResult:
    """What one policy call returns. Shapes ``[G, M]``."""
    interactions: torch.Tensor   # sampled estimate where sampled, mu elsewhere (detached)
    sampled: torch.Tensor        # bool: the game was sampled
    calibration: torch.Tensor    # bool: the game is a calibration game (always sampled)
    estimate: torch.Tensor       # sampled estimate, NaN where not sampled
    stderr: torch.Tensor         # sampler's standard error, NaN where not sampled
    mu: torch.Tensor             # predictions (with grad through the predictor)
    log_var: torch.Tensor
    stats: dict = field(default_factory=dict)


class UansilPolicy(nn.Module):
    """The predictor plus the sampling policy (see the module docstring)."""

    def __init__(self, predictor: InteractionPredictor, config: Optional[UansilConfig] = None) -> None:
        super().__init__()
        self.predictor = predictor
        self.config = config or UansilConfig()
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("run_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("run_sq", torch.zeros((), dtype=torch.float64))
        self._gen = torch.Generator().manual_seed(self.config.seed)

    @property
    def running_std(self) -> float:
        """Running standard deviation of the sampled interactions (0 before the first call)."""
        return float((self.run_sq - self.run_mean ** 2).clamp(min=0).sqrt())

    @property
    def warming_up(self) -> bool:
        return int(self.steps) < self.config.warmup_steps

    def forward(self, game_features: torch.Tensor, sampler: Sampler) -> UansilResult:
        """Predict every game of ``game_features [G, M, F]``, sample the games the policy picks."""
        if not isinstance(game_features, torch.Tensor) or game_features.dim() != 3:
            raise ValueError("UansilPolicy: game_features must be a [G, M, F] tensor, got "
                             f"{getattr(game_features, 'shape', type(game_features).__name__)}")
        G, M, _ = game_features.shape
        cfg = self.config
        device = game_features.device
        calib = (torch.rand(G, M, generator=self._gen) < cfg.calibration_fraction).to(device)
        est = torch.full((G, M), float("nan"), dtype=torch.float32, device=device)
        se = torch.full((G, M), float("nan"), dtype=torch.float32, device=device)
        warm = self.warming_up or self.running_std == 0.0
        if warm:  # sample everything first, so that the predictions use this batch's statistics
            sampled = torch.ones(G, M, dtype=torch.bool, device=device)
            self._sample(sampler, sampled, est, se)
            mu, log_var = self.predict(game_features)
        else:
            mu, log_var = self.predict(game_features)
            pred_std = torch.exp(0.5 * log_var.detach().double())
            confident = pred_std < cfg.skip_threshold * self.running_std
            sampled = ~confident | calib
            self._sample(sampler, sampled, est, se)
        interactions = torch.where(sampled, est, mu.detach().float())
        with torch.no_grad():
            n_cal = int(calib.sum())
            if n_cal > 0:
                tot = torch.exp(log_var[calib].double()) + se[calib].double() ** 2
                inside = (est[calib].double() - mu[calib].double()).abs() < 2 * tot.sqrt()
                calibration = float(inside.double().mean())
            else:
                calibration = float("nan")
        frac = float(sampled.double().mean()) if sampled.numel() else 0.0
        stats = {"fraction_sampled": frac, "work_saved": 1.0 - frac, "calibration": calibration,
                 "calibration_games": n_cal, "running_std": self.running_std, "warming_up": self.warming_up,
                 "step": int(self.steps)}
        self.steps += 1
        return UansilResult(interactions, sampled, calib, est, se, mu, log_var, stats)

    def predict(self, game_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, log_var)`` of games ``[..., F]``. With ``standardize`` the predictor works in units
        of the running statistics of the sampled interactions (``mu = mean + std * raw``,
        ``log_var = raw + 2 log std``), so that it needs no knowledge of their scale; ``log_var`` is
        kept in [-20, 20]."""
        raw_mu, raw_lv = self.predictor(game_features.detach())
        std = self.running_std
        if not self.config.standardize or std == 0.0:
            return raw_mu, raw_lv
        mu = float(self.run_mean) + std * raw_mu
        log_var = (raw_lv + 2.0 * math.log(std)).clamp(-LOG_VAR_BOUND, LOG_VAR_BOUND)
        return mu, log_var

    def _sample(self, sampler: Sampler, sampled: torch.Tensor, est: torch.Tensor, se: torch.Tensor) -> None:
        pairs = sampled.nonzero()
        if pairs.shape[0] == 0:
            return
        seed = (self.config.seed * 1_000_003 + int(self.steps)) % 2**63
        e, s = sampler(pairs, seed)
        est[sampled] = e.reshape(-1).to(est.dtype)
        se[sampled] = s.reshape(-1).to(se.dtype)
        self._update_std(e.reshape(-1).double())

    def _update_std(self, x: torch.Tensor) -> None:
        m, sq = x.mean(), (x * x).mean()
        if float(self.run_sq) == 0.0 and float(self.run_mean) == 0.0:
            self.run_mean.fill_(float(m))
            self.run_sq.fill_(float(sq))
        else:
            a = self.config.std_momentum
            self.run_mean.mul_(a).add_((1 - a) * m)
            self.run_sq.mul_(a).add_((1 - a) * sq)

    def loss(self, result: UansilResult, backend: Optional[str] = None) -> torch.Tensor:
        """Uncertainty-weighted loss of the predictions on the sampled games (mean over them); the
        skipped games get weight 0 (their NaN targets never enter the arithmetic)."""
        w = result.sampled.to(result.mu.dtype)
        n = int(result.sampled.sum())
        if n == 0:
            return result.mu.sum() * 0.0
        total = uncertainty_interaction_loss(result.mu, result.log_var, result.estimate.to(result.mu.dtype),
                                             target_var=torch.nan_to_num(result.stderr.to(result.mu.dtype) ** 2),
                                             weight=w, reduction="sum", backend=backend)
        return total / n


def pooled_sampler(features: torch.Tensor, target: torch.Tensor, subsets: torch.Tensor, *,
                   player_mask: Optional[torch.Tensor] = None, num_samples: int = 64,
                   size_schedule: str = "uniform", backend: Optional[str] = None) -> Sampler:
    """Sampler of pooled games (``features [G, n, D]``, ``target [G, D]``, ``subsets [G, M, n]``):
    each requested pair (g, m) becomes one game of :func:`shapley_interaction_pooled`."""
    def sample(pairs: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g, m = pairs[:, 0], pairs[:, 1]
        pm = None if player_mask is None else player_mask[g]
        est, se = shapley_interaction_pooled(features[g], target[g], subsets[g, m][:, None, :], player_mask=pm,
                                             num_samples=num_samples, seed=seed, size_schedule=size_schedule,
                                             backend=backend)
        return est[:, 0], se[:, 0]
    return sample


def maxsim_sampler(sim: torch.Tensor, subsets: torch.Tensor, *, query_mask: Optional[torch.Tensor] = None,
                   player_mask: Optional[torch.Tensor] = None, num_samples: int = 64,
                   size_schedule: str = "uniform", backend: Optional[str] = None) -> Sampler:
    """Sampler of max-sim games (``sim [G, Lq, n]``, ``subsets [G, M, n]``) through
    :func:`shapley_interaction`, one game per requested pair."""
    def sample(pairs: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g, m = pairs[:, 0], pairs[:, 1]
        qm = None if query_mask is None else query_mask[g]
        pm = None if player_mask is None else player_mask[g]
        est, se = shapley_interaction(sim[g], subsets[g, m][:, None, :], query_mask=qm, player_mask=pm,
                                      num_samples=num_samples, seed=seed, size_schedule=size_schedule,
                                      backend=backend)
        return est[:, 0], se[:, 0]
    return sample

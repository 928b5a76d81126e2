"""UANSIL: uncertainty-aware neural Shapley interaction learning (METHOD section 8).

A small MLP ``g`` (:class:`InteractionPredictor`) predicts, from detached features of a game, the
mean ``mu`` and log-variance ``log_var`` of its interaction. :class:`UansilPolicy` holds ``g`` and
the running variance of the sampled interactions, and decides which games are sampled:

- while ``enabled`` is False, before ``warmup`` steps, or before any interaction was sampled: every
  game is sampled;
- after it, a game whose predicted standard deviation ``exp(log_var / 2)`` is below
  ``threshold * sqrt(running_var)`` is *confident* and skips sampling (its ``mu`` stands in), except
  a random ``calibration`` share of the confident games, which are sampled to check the prediction;
- safety [ours]: skipping is allowed only while the prediction is calibrated on a rolling window of
  the last ``window`` steps (the share of checked games with ``|I - mu| < 2 sqrt(exp(log_var) + se^2)``
  is at least ``min_calibration``, over at least ``min_games`` checked games) *and* it has skill there
  (``1 - sum (I - mu)^2 / sum (I - mean I)^2`` over the same checked games is at least ``min_skill``:
  the prediction beats the window's mean). Coverage alone is passed by any predictor wide enough: a
  flat ``mu`` with a large ``log_var`` covers every target and carries nothing (the collapse of
  docs/METHOD-notes.md, behind a gate that read 0.96-1.0). Until both hold every game is sampled and
  every confident one counts as a check. A random ``min_fraction`` of all games is always sampled
  (a floor), so the predictor keeps seeing fresh targets.

The predictor learns from the sampled games with :func:`uncertainty_interaction_loss` and the
sampler's own variance ``se^2`` as ``target_var``: ``exp(log_var)`` is then the predictor's error
variance beyond the sampling noise. The caller samples the chosen games with
:func:`loupe_kernels.shapley_interaction` (or any estimator with a standard error) and reports
them back through :meth:`UansilPolicy.update`. Decisions draw from the caller's generator
and are keyed to the caller's step (a resumed training run continues its warm-up; the same batch
seed gives the same decisions). ``loupe.objectives`` runs it for LOUPE's two kinds of games.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["InteractionPredictor", "UansilPolicy", "LOG_VAR_BOUND", "CALIB_STATS"]

LOG_VAR_BOUND = 20.0  # the interaction loss is stable for log_var in [-20, 20]
CALIB_STATS = 5  # per step: hits within 2 sigma, games, sum (I - mu)^2, sum I, sum I^2


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


class UansilPolicy(nn.Module):
    """The predictor ``g`` and the running statistics of the skip policy (see the module docstring).

    ``forward(x [G, F]) -> (mu [G], log_var [G])``; :meth:`decide` picks the games to sample;
    :meth:`update` feeds back the sampled interactions. Buffers: ``running_var`` (EMA of the
    variance of sampled interactions) and ``steps`` (number of updates), both checkpointed.
    """

    def __init__(self, in_features: int, hidden: int = 128, layers: int = 2, window: int = 50,
                 min_games: int = 20) -> None:
        super().__init__()
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"UansilPolicy: window must be a positive int, got {window!r}")
        self.predictor = InteractionPredictor(in_features, hidden, layers=layers)
        self.min_games = int(min_games)
        self.register_buffer("running_var", torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # per step of the rolling window, over its calibration games: (within 2 sigma, games,
        # sum (I - mu)^2, sum I, sum I^2) -- see :meth:`calibration_stats`
        self.register_buffer("calib_window", torch.zeros(window, CALIB_STATS, dtype=torch.float64))
        self.register_buffer("calib_pos", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [G, F]`` detached game features -> ``(mu [G], log_var [G])`` (log-variance in [-20, 20]),
        in the dtype of ``x``. The predictor runs in the dtype of its weights (bf16 under mixed
        precision), whatever the features'."""
        w = self.predictor.net[0].weight.dtype
        mu, log_var = self.predictor(x.to(w))
        return mu.to(x.dtype), log_var.to(x.dtype)

    def decide(self, log_var: torch.Tensor, step: int, generator: torch.Generator, *, enabled: bool,
               warmup: int, threshold: float, calibration: float, min_fraction: float = 0.0,
               min_calibration: float = 0.0, min_skill: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sample, calib)`` bool ``[G]``: sample this game; it was confident and is sampled as a
        check of the prediction. ``log_var [G]`` are the predictions; ``step`` the caller's step
        (compared with ``warmup``); ``generator`` draws the calibration and floor games (on the CPU).
        With ``min_calibration > 0`` nothing is skipped until :meth:`rolling_calibration` reaches it;
        with ``min_skill`` (a number, may be negative) nothing is skipped until :meth:`rolling_skill`
        reaches it."""
        G = log_var.shape[0]
        sample = torch.ones(G, dtype=torch.bool, device=log_var.device)
        calib = torch.zeros(G, dtype=torch.bool, device=log_var.device)
        if not enabled or step < warmup:
            return sample, calib
        var = float(self.running_var)
        if var <= 0:
            return sample, calib
        confident = (log_var.detach() * 0.5).exp() < threshold * var ** 0.5
        if min_calibration > 0:
            rolling = self.rolling_calibration()
            if rolling is None or rolling < min_calibration:  # not shown calibrated: sample all, check all
                return sample, confident
        if min_skill is not None:
            skill = self.rolling_skill()
            if skill is None or skill < min_skill:  # no better than the targets' mean: sample all, check all
                return sample, confident
        u = torch.rand(2, G, generator=generator).to(log_var.device)
        checked = confident & ((u[0] < calibration) | (u[1] < min_fraction))
        return ~confident | checked, checked

    @staticmethod
    @torch.no_grad()
    def calibration_stats(sampled: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor,
                          target_var: torch.Tensor | float = 0.0) -> torch.Tensor:
        """The calibration checks of one step, ``[CALIB_STATS]`` float64 on the CPU: (games with
        ``|I - mu| < 2 sqrt(exp(log_var) + target_var)``, games, ``sum (I - mu)^2``, ``sum I``,
        ``sum I^2``), over the checked games' sampled interactions ``sampled`` (any shape, one value per
        game), predictions ``mu``, ``log_var`` and the sampler's variance ``target_var``."""
        I, m = sampled.detach().double().reshape(-1), mu.detach().double().reshape(-1)
        lv = log_var.detach().double().reshape(-1)
        if not (I.shape == m.shape == lv.shape):
            raise ValueError(f"calibration_stats: sampled, mu and log_var must hold one value per game, got "
                             f"{list(sampled.shape)}, {list(mu.shape)}, {list(log_var.shape)}")
        tv = torch.as_tensor(target_var, dtype=torch.float64, device=I.device).detach()
        sd = (lv.exp() + tv).sqrt()
        return torch.stack([((I - m).abs() < 2 * sd).double().sum(), torch.tensor(float(I.numel()), dtype=torch.float64,
                            device=I.device), (I - m).pow(2).sum(), I.sum(), I.pow(2).sum()]).cpu()

    @torch.no_grad()
    def record_calibration(self, stats: torch.Tensor) -> None:
        """One step's calibration checks (:meth:`calibration_stats`, or their sum over several calls)."""
        stats = torch.as_tensor(stats, dtype=torch.float64).reshape(-1)
        if stats.numel() != CALIB_STATS:
            raise ValueError(f"record_calibration: expected {CALIB_STATS} statistics (calibration_stats), "
                             f"got {stats.numel()}")
        W = self.calib_window.shape[0]
        self.calib_window[int(self.calib_pos) % W] = stats.to(self.calib_window.device)
        self.calib_pos.add_(1)

    @staticmethod
    def summarise(stats: torch.Tensor, min_games: int = 1) -> tuple[float | None, float | None]:
        """``(coverage, skill)`` of summed :meth:`calibration_stats`: the share of checked games within
        two standard deviations, and ``1 - sum (I - mu)^2 / sum (I - mean I)^2`` (1: exact; 0: no
        better than the targets' mean; negative: worse). None where fewer than ``min_games`` (at
        least 1) were checked; the skill is None too where the checked targets do not vary."""
        hits, n, sse, s1, s2 = torch.as_tensor(stats, dtype=torch.float64).reshape(-1).tolist()
        if n < max(1, min_games):
            return None, None
        sst = s2 - s1 * s1 / n
        return hits / n, (1.0 - sse / sst if sst > 1e-12 * max(1.0, s2) else None)

    def rolling_calibration(self) -> float | None:
        """Share of the checked games of the last ``window`` steps within two standard deviations;
        None while fewer than ``min_games`` were checked."""
        return self.summarise(self.calib_window.sum(0), self.min_games)[0]

    def rolling_skill(self) -> float | None:
        """The skill (:meth:`summarise`) of the checked games of the last ``window`` steps; None while
        fewer than ``min_games`` were checked, or when their targets do not vary."""
        return self.summarise(self.calib_window.sum(0), self.min_games)[1]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checkpoints written before the skill statistics hold a [window, 2] window: it restarts
        # empty (the gate has to be earned again over one window)
        key = prefix + "calib_window"
        old = state_dict.get(key)
        if old is not None and old.dim() == 2 and old.shape[1] == 2 and self.calib_window.shape[1] != 2:
            state_dict[key] = torch.zeros(old.shape[0], CALIB_STATS, dtype=torch.float64)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def update(self, sampled: torch.Tensor, momentum: float = 0.99) -> None:
        """Update the running variance with the interactions ``sampled`` at one step."""
        if sampled.numel() == 0:
            return
        v = sampled.float().var(unbiased=False) if sampled.numel() > 1 else sampled.float().pow(2).mean()
        if int(self.steps) == 0:
            self.running_var.copy_(v)
        else:
            self.running_var.mul_(momentum).add_((1 - momentum) * v)
        self.steps.add_(1)

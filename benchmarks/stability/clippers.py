"""The clippers of the stability study: every optaxclip transform.

Each entry builds the optimizer of one row from the task's base optimizer
(``base``, without its learning rate), a threshold ``thr`` (a traced scalar:
one compiled program serves every threshold, learning rate and seed) and the
run's ``seed`` (for randomised clippers). ``default`` is the documented
default of the threshold argument, or, where the argument has none, the
conventional value users start from (1.0 for a norm cap, as in Keras'
``clipnorm`` examples and most training scripts). ``candidates`` are the
values tuned over (see ``study.py``: the tuned value is the candidate with
the best median score over every learning rate on two seeds that the report
does not use).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

import optaxclip as oc


@dataclasses.dataclass(frozen=True)
class Clipper:
  name: str
  build: Callable[[optax.GradientTransformation, Any, Any],
                  optax.GradientTransformation]
  default: float | None  # None: the row has no threshold to tune
  candidates: tuple[float, ...] = ()
  argument: str = ""  # which argument ``thr`` sets
  per_example: bool = False  # takes per-example gradients (the DP task)


def _before(factory: Callable[[Any], optax.GradientTransformation]):
  """A clipper applied to the gradient before the base optimizer."""
  return lambda base, thr, seed: optax.chain(factory(thr), base)


def _mean_over_batch() -> optax.GradientTransformation:
  """Averages per-example gradients over their leading axis (no clipping)."""
  return optax.stateless(
      lambda updates, params: jax.tree.map(lambda u: u.mean(0), updates))


CLIPPERS: tuple[Clipper, ...] = (
    Clipper("none", lambda base, thr, seed: base, None),
    Clipper("clip_by_value", _before(oc.clip_by_value), 1.0,
            (0.01, 0.1, 1.0), "max_value"),
    Clipper("clip_by_norm", _before(oc.clip_by_norm), 1.0, (0.1, 1.0, 10.0),
            "max_norm"),
    Clipper("clip_by_global_norm", _before(oc.clip_by_global_norm), 1.0,
            (0.1, 1.0, 10.0), "max_norm"),
    Clipper("clip_by_block_rms", _before(oc.clip_by_block_rms), 1.0,
            (0.01, 0.1, 1.0), "threshold"),
    Clipper("adaptive_grad_clip",
            _before(oc.adaptive_grad_clip), 0.01, (0.01, 0.1, 1.0),
            "clipping"),
    Clipper("autoclip", _before(oc.autoclip), 10.0, (1.0, 10.0, 50.0),
            "percentile"),
    Clipper("zclip", _before(lambda thr: oc.zclip(z_thresh=thr)), 2.5,
            (1.5, 2.5, 4.0), "z_thresh"),
    Clipper("adagc", _before(lambda thr: oc.adagc(lambda_rel=thr)), 1.05,
            (1.01, 1.05, 1.5), "lambda_rel"),
    Clipper("skip_step",
            lambda base, thr, seed: oc.skip_step(base, spike_sigmas=thr),
            6.0, (2.0, 4.0, 6.0), "spike_sigmas"),
    Clipper("clip_norm_growth",
            _before(lambda thr: oc.clip_norm_growth(gamma=thr)), 1.01,
            (1.01, 1.1, 2.0), "gamma"),
    Clipper("spam_clip",
            _before(lambda thr: oc.spam_clip(threshold=thr)), 5000.0,
            (50.0, 500.0, 5000.0), "threshold"),
    Clipper("momentum_reset",
            lambda base, thr, seed: oc.momentum_reset(base), None),
    Clipper("adaclip", _before(lambda thr: oc.adaclip()), None),
    Clipper("adagn", _before(lambda thr: oc.adagn()), None),
)

NOISE_MULTIPLIER = 1.0

DP_CLIPPERS: tuple[Clipper, ...] = (
    Clipper("none (not private)",
            lambda base, thr, seed: optax.chain(_mean_over_batch(), base),
            None, per_example=True),
    Clipper("clip_per_example",
            lambda base, thr, seed: optax.chain(
                oc.clip_per_example(thr, noise_multiplier=NOISE_MULTIPLIER,
                                    seed=seed), base),
            1.0, (0.1, 1.0, 10.0), "max_norm", per_example=True),
)

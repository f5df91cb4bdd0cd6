"""The registry: one row per public transform, for every generic test suite.

The generic suites (input policy, hostile inputs, export, checkpoint,
multidevice, multiprocess, ``clip_stats``) are parametrized over ``ROWS``, so
a transform added here inherits all of them, and ``test_policy.py`` fails
while a public transform in ``optaxclip.__all__`` has no row.

How to add a row
----------------

Append a :class:`Row` to ``ROWS`` (keep the order of ``optaxclip.__all__``
roughly; names must be unique, they are the test ids):

* ``make``: a configuration that *acts* (clips, skips, resets...) on
  :func:`params` scaled by 1 (17 elements of N(0, 1): global L2 norm about
  4), ``passing``: one that leaves them alone (or ``None``);
* set the flags that are true of the transform: ``keeps_history`` (its state
  carries information between steps, so ``update(g, None)`` must raise),
  ``needs_params`` (``update`` reads ``params``), ``per_example`` (updates
  carry a leading batch axis), ``wrapper`` (it wraps an inner optax
  transformation), ``extra_args`` (keyword arguments ``update`` needs, built
  from the updates, e.g. ``loss=``), ``threshold_arg`` (the name of the
  factory's main threshold argument, for ``inject_hyperparams``);
* a transform that needs a special tree (e.g. attention weights with named
  leaves, or matrices only) sets ``tree`` to a function of a NumPy
  ``Generator`` returning the params tree; keep it small (it is compiled for
  every row of every suite) and keep a bfloat16 leaf if the transform accepts
  one;
* more than one row per factory is fine for options that change the program
  (another ``ord``, ``groups=``, the loss rule), but every row costs compiles
  in every suite: add one only for a genuinely different code path.

Use the helpers below (:func:`params`, :func:`updates`, :func:`update_fn`)
rather than calling ``row.make().update`` directly, so ``extra_args`` and
per-example batches are handled in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc

# Public names that are not transforms (or transform factories): functions,
# state classes. test_policy checks that everything else in __all__ has a row.
NOT_TRANSFORMS = frozenset(
  {
    "PathValues",
    "clip_stats",
    "default_unit_axes",
    "global_norm",
    "max_attention_logits",
    "stacked_by_path",
    "top_spikes",
    "tree_norms",
  }
)

BATCH = 2  # per-example rows: examples in a batch.


def default_tree(rng: np.random.Generator) -> dict:
  """17 elements of N(0, 1): float32 kernel and bias, a bfloat16 scale."""
  return {
    "kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
    "bias": jnp.asarray(rng.standard_normal((3,)), jnp.float32),
    "scale": jnp.asarray(rng.standard_normal((2,)), jnp.bfloat16),
  }


def loss_of(updates: Any) -> jax.Array:
  """A float32 scalar "loss" computed from the updates (an input of jit)."""
  return sum(
    jnp.mean(jnp.square(x.astype(jnp.float32)))
    for x in jax.tree.leaves(updates)
  )


@dataclasses.dataclass(frozen=True)
class Row:
  """One public transform (or one option of it) under the generic suites.

  Attributes:
    name: unique test id.
    factory: the public factory this row exercises.
    make: () -> transform, configured to act on the default tree.
    passing: () -> transform, configured to leave the default tree alone,
      or None.
    keeps_history: the state carries information between steps, so
      ``update(updates, None)`` raises (else the state only records
      diagnostics and ``None`` rebuilds it).
    needs_params: ``update`` reads ``params``.
    per_example: updates carry a leading batch axis of per-example
      gradients (``init`` takes the per-example shapes).
    wrapper: wraps an inner optax transformation.
    extra_args: updates -> keyword arguments ``update`` also needs, or None.
    threshold_arg: the factory's main threshold argument, or None.
    tree: rng -> params tree, for a transform that needs special inputs.
    stats: ``clip_stats`` of its state has at least one key.
  """

  name: str
  factory: Callable[..., Any]
  make: Callable[[], optax.GradientTransformation]
  passing: Callable[[], optax.GradientTransformation] | None = None
  keeps_history: bool = False
  needs_params: bool = False
  per_example: bool = False
  wrapper: bool = False
  extra_args: Callable[[Any], dict] | None = None
  threshold_arg: str | None = None
  tree: Callable[[np.random.Generator], Any] = default_tree
  stats: bool = True

  def __repr__(self) -> str:
    return self.name


# ---------------------------------------------------------------------------
# Helpers every suite uses.


def params(row: Row, seed: int = 0) -> Any:
  """The row's params tree (its per-example shapes for per-example rows)."""
  return row.tree(np.random.default_rng(seed))


def updates(row: Row, tree: Any, scale: float = 1.0) -> Any:
  """Gradients shaped for ``row`` from a params-shaped ``tree``.

  Per-example rows get a batch of ``BATCH`` examples: ``tree`` and
  ``-2 * tree`` (so the per-example norms differ).
  """
  tree = jax.tree.map(lambda x: x * jnp.asarray(scale, x.dtype), tree)
  if row.per_example:
    tree = jax.tree.map(lambda x: jnp.stack([x, -2 * x][:BATCH]), tree)
  return tree


def update_fn(row: Row, tx: optax.GradientTransformation) -> Callable:
  """``(updates, state, params) -> (updates, state)`` with the extra args."""
  if row.extra_args is None:
    return lambda u, s, p=None: tx.update(u, s, p)
  return lambda u, s, p=None: tx.update(u, s, p, **row.extra_args(u))


def by_name(name: str) -> Row:
  (row,) = [r for r in ROWS if r.name == name]
  return row


def _loss(u: Any) -> dict:
  return {"loss": loss_of(u)}


# ---------------------------------------------------------------------------
# The rows. Thresholds: the default tree's global L2 norm is about 4.

ROWS: list[Row] = [
  Row(
    "clip_by_value",
    oc.clip_by_value,
    # With its diagnostics: the default (no diagnostics) is the "clip" row's
    # program.
    lambda: oc.clip_by_value(0.5, diagnostics=True),
    lambda: oc.clip_by_value(100.0, diagnostics=True),
    threshold_arg="max_value",
  ),
  Row(
    "clip",
    oc.clip,
    lambda: oc.clip(0.5),
    lambda: oc.clip(100.0),
    threshold_arg="max_delta",
    stats=False,  # diagnostics=False by default, as optax.clip
  ),
  Row(
    "clip_by_norm",
    oc.clip_by_norm,
    lambda: oc.clip_by_norm(0.5),
    lambda: oc.clip_by_norm(100.0),
    threshold_arg="max_norm",
  ),
  Row(
    "clip_by_global_norm",
    oc.clip_by_global_norm,
    lambda: oc.clip_by_global_norm(0.5),
    lambda: oc.clip_by_global_norm(100.0),
    threshold_arg="max_norm",
  ),
  Row(
    "clip_by_global_norm_l1",
    oc.clip_by_global_norm,
    lambda: oc.clip_by_global_norm(0.5, ord=1),
    lambda: oc.clip_by_global_norm(100.0, ord=1),
    threshold_arg="max_norm",
  ),
  Row(
    "clip_by_global_norm_linf",
    oc.clip_by_global_norm,
    lambda: oc.clip_by_global_norm(0.5, ord="inf"),
    lambda: oc.clip_by_global_norm(100.0, ord="inf"),
    threshold_arg="max_norm",
  ),
  Row(
    "clip_by_global_norm_groups",
    oc.clip_by_global_norm,
    lambda: oc.clip_by_global_norm(
      0.5, groups={"kernel": "k", "bias": "b", "scale": None}
    ),
    lambda: oc.clip_by_global_norm(
      100.0, groups={"kernel": "k", "bias": "b", "scale": None}
    ),
    threshold_arg="max_norm",
  ),
  Row(
    "clip_by_block_rms",
    oc.clip_by_block_rms,
    lambda: oc.clip_by_block_rms(0.5),
    lambda: oc.clip_by_block_rms(100.0),
    threshold_arg="threshold",
  ),
  # In the generic suites params == updates, so |g|/|w| is 1 unit-wise.
  Row(
    "adaptive_grad_clip",
    oc.adaptive_grad_clip,
    lambda: oc.adaptive_grad_clip(0.01),
    lambda: oc.adaptive_grad_clip(100.0),
    needs_params=True,
    threshold_arg="clipping",
  ),
  Row(
    "record_norms",
    oc.record_norms,
    lambda: oc.record_norms(),
  ),
  # With ema= the recorder keeps per-leaf history (EMAs of the norms).
  Row(
    "record_norms_ema",
    oc.record_norms,
    lambda: oc.record_norms(ema=0.9),
    keeps_history=True,
  ),
  # autoclip has no fixed threshold: the configurations differ in percentile.
  Row(
    "autoclip",
    oc.autoclip,
    lambda: oc.autoclip(10.0, history_size=4),
    lambda: oc.autoclip(100.0, history_size=4),
    keeps_history=True,
    threshold_arg="percentile",
  ),
  Row(
    "zclip",
    oc.zclip,
    lambda: oc.zclip(max_norm=0.5, warmup_steps=1),
    lambda: oc.zclip(max_norm=100.0, warmup_steps=1),
    keeps_history=True,
  ),
  Row(
    "adagc",
    oc.adagc,
    lambda: oc.adagc(lambda_abs=0.5, warmup_steps=1),
    lambda: oc.adagc(lambda_abs=100.0, warmup_steps=1),
    keeps_history=True,
  ),
  Row(
    "skip_step",
    oc.skip_step,
    lambda: oc.skip_step(
      optax.sgd(0.1), max_norm=0.5, spike_sigmas=3.0, window=4, warmup_steps=1
    ),
    lambda: oc.skip_step(
      optax.sgd(0.1),
      max_norm=100.0,
      spike_sigmas=3.0,
      window=4,
      warmup_steps=1,
    ),
    keeps_history=True,
    wrapper=True,
  ),
  Row(
    "skip_step_loss",
    oc.skip_step,
    lambda: oc.skip_step(
      optax.sgd(0.1),
      max_norm=0.5,
      loss_window=8,
      loss_warmup_steps=1,
      loss_spike_sigmas=0.5,
      record_skipped=True,
    ),
    lambda: oc.skip_step(
      optax.sgd(0.1),
      max_norm=100.0,
      loss_window=8,
      loss_warmup_steps=1,
      loss_spike_sigmas=100.0,
    ),
    keeps_history=True,
    wrapper=True,
    extra_args=_loss,
  ),
  # axlearn's rule: the EMA thresholds act from the second step on; the
  # clip acts at once.
  Row(
    "skip_and_clip_by_global_norm",
    oc.skip_and_clip_by_global_norm,
    lambda: oc.skip_and_clip_by_global_norm(
      optax.sgd(0.1),
      drop_norm="stddev",
      grad_norm_ema_decay=0.9,
      drop_min_count=1,
      drop_multipliers=(3,),
      max_norm=0.5,
    ),
    lambda: oc.skip_and_clip_by_global_norm(
      optax.sgd(0.1), drop_norm=1e6, max_norm=100.0
    ),
    keeps_history=True,
    wrapper=True,
    threshold_arg="max_norm",
  ),
  Row(
    "clip_norm_growth",
    oc.clip_norm_growth,
    lambda: oc.clip_norm_growth(1.01),
    lambda: oc.clip_norm_growth(100.0),
    keeps_history=True,
    threshold_arg="gamma",
  ),
  # Levanter's rule is inactive until max(2, window // 2) norms are held:
  # with window=2 and sigmas=0 the third step clips to the mean of two.
  Row(
    "clip_by_historical_norm",
    oc.clip_by_historical_norm,
    lambda: oc.clip_by_historical_norm(window=2, sigmas=0.0),
    lambda: oc.clip_by_historical_norm(window=2, sigmas=100.0),
    keeps_history=True,
    threshold_arg="sigmas",
  ),
  Row(
    "spam_clip",
    oc.spam_clip,
    lambda: oc.spam_clip(5000.0, warmup_steps=1),
    lambda: oc.spam_clip(1e5, warmup_steps=1),
    keeps_history=True,
    threshold_arg="threshold",
  ),
  # A shadow never changes the updates; its inner clipper's diagnostics
  # record what it would have done (tests/test_shadow.py runs it over every
  # row).
  Row(
    "shadow",
    oc.shadow,
    lambda: oc.shadow(oc.clip_by_global_norm(0.5)),
    wrapper=True,
  ),
  # A soft clip changes every matrix it sees: no passing configuration.
  Row(
    "spectral_clip",
    oc.spectral_clip,
    lambda: oc.spectral_clip(0.5),
    threshold_arg="threshold",
  ),
  # QK-Clip rescales the query/key weights of the heads whose reported
  # maximum logit (the extra argument: 40 and 1) exceeds the threshold.
  Row(
    "qk_clip",
    oc.qk_clip,
    lambda: oc.qk_clip(10.0),
    lambda: oc.qk_clip(100.0),
    needs_params=True,
    extra_args=lambda u: {"max_logits": {"attn": jnp.asarray([40.0, 1.0])}},
    threshold_arg="threshold",
    tree=lambda rng: {
      "attn": {
        "query": jnp.asarray(rng.standard_normal((4, 2, 2)), jnp.float32),
        "key": jnp.asarray(rng.standard_normal((4, 2, 2)), jnp.bfloat16),
      },
      "mlp": jnp.asarray(rng.standard_normal((8,)), jnp.float32),
    },
  ),
  Row(
    "momentum_reset",
    oc.momentum_reset,
    lambda: oc.momentum_reset(
      optax.sgd(0.1, momentum=0.9), interval=1, warmup_steps=2
    ),
    lambda: oc.momentum_reset(
      optax.sgd(0.1, momentum=0.9), interval=100, warmup_steps=2
    ),
    keeps_history=True,
    wrapper=True,
  ),
  # AdaClip trims a little even at theta = 0.01 on a 3x second step.
  Row(
    "adaclip",
    oc.adaclip,
    lambda: oc.adaclip(theta=0.999),
    lambda: oc.adaclip(theta=0.01),
    keeps_history=True,
  ),
  Row(
    "adaclip_global",
    oc.adaclip,
    lambda: oc.adaclip(theta=0.999, per_tensor=False),
    keeps_history=True,
  ),
  # The configurations cover the per-tensor and the global statistic.
  Row(
    "adagn",
    oc.adagn,
    lambda: oc.adagn(per_tensor=True),
    lambda: oc.adagn(per_tensor=False),
    keeps_history=True,
  ),
  # make adds DP-SGD noise from the key in the state; passing adds none and
  # adapts the threshold instead.
  Row(
    "clip_per_example",
    oc.clip_per_example,
    lambda: oc.clip_per_example(0.5, noise_multiplier=1.0, seed=7),
    lambda: oc.clip_per_example(100.0, seed=7, target_quantile=0.5),
    keeps_history=True,
    per_example=True,
    threshold_arg="max_norm",
  ),
  # Opacus' automatic per-layer clipping (AUTO-S): every example is scaled,
  # so there is no passing configuration.
  Row(
    "clip_per_example_automatic_per_layer",
    oc.clip_per_example,
    lambda: oc.clip_per_example(
      0.5, rule="automatic", per_layer=True, noise_multiplier=1.0, seed=7
    ),
    keeps_history=True,
    per_example=True,
    threshold_arg="max_norm",
  ),
]

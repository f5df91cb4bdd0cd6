"""``shadow``: run any transform without applying it.

Tuning a clipping threshold on a live run needs to know what the clipper
*would* do -- how often it would clip or skip, at which norms -- while
training goes on unchanged. :func:`shadow` wraps a transform, calls its
``update`` on every step's inputs, keeps the state that update returns, and
passes the incoming updates through untouched. The transform's diagnostics
therefore evolve exactly as if it were applied, and ``clip_stats`` reports
them under its own name. Under ``jax.jit`` the discarded updates are dead
code, which XLA removes: a shadow costs at most what its transform costs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optax


class ShadowState(NamedTuple):
  """State of :func:`shadow`: the wrapped transform's state.

  Not a clipper state of its own: ``clip_stats`` looks through it, so the
  wrapped transform's diagnostics appear under that transform's name
  (``"clip_by_global_norm/global_norm_clipped"``: would have clipped).
  """

  # The wrapped transform's state, as its own update returned it.
  shadow_inner_state: Any


def shadow(
  inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` in shadow mode: its state evolves, its updates are dropped.

  .. math::
    s_{t+1} = \text{state of } \mathrm{inner.update}(u_t, s_t, \theta_t),
    \qquad u_t \mapsto u_t

  Every call hands ``inner.update`` the same updates, params and extra
  arguments (``loss=...``) it would get in the shadow's place, and keeps the
  state it returns: its norms, thresholds, histories and "clipped" /
  "skipped" flags are those of the applied transform on the same inputs. The
  updates come back unchanged (the same arrays). ``clip_stats`` sees
  through the shadow: the wrapped clipper's diagnostics keep its name.

  For a wrapper such as ``skip_step(opt)``, "as if applied" includes ``opt``:
  its moments stay put on would-be-skipped steps, exactly as under the real
  wrapper. To shadow a skip rule alone, wrap the identity:
  ``shadow(skip_step(optax.identity(), ...))``. Inputs that depend on the
  earlier updates (the params) are the real run's, not a counterfactual run's.

  Args:
    inner: any optax transformation (plain or ``ExtraArgs``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ShadowState`.

  Raises:
    TypeError: ``inner`` is not an optax transformation.

  Examples:
    >>> import jax.numpy as jnp, optax, optaxclip as oc
    >>> tx = optax.chain(oc.shadow(oc.clip_by_global_norm(1.0)), optax.sgd(1.0))
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> updates["w"]  # not clipped
    Array([-3., -4.], dtype=float32)
    >>> bool(oc.clip_stats(state)["clip_by_global_norm/global_norm_clipped"])
    True
  """
  fn = "shadow"
  if not (
    callable(getattr(inner, "init", None))
    and callable(getattr(inner, "update", None))
  ):
    raise TypeError(
      f"{fn}: inner must be an optax transformation (with init and update),"
      f" got {inner!r} of type {type(inner).__name__}; e.g."
      " oc.shadow(oc.clip_by_global_norm(1.0))."
    )
  inner_tx = optax.with_extra_args_support(inner)

  def init_fn(params):
    return ShadowState(shadow_inner_state=inner_tx.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    inner_state = None if state is None else state.shadow_inner_state
    _, new_inner_state = inner_tx.update(
      updates, inner_state, params, **extra_args
    )
    return updates, ShadowState(shadow_inner_state=new_inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

"""optaxclip: gradient clipping for JAX, as composable optax transforms."""

from optaxclip._adagc import AdaGCState, adagc
from optaxclip._agc import (
  AdaptiveGradClipState,
  adaptive_grad_clip,
  default_unit_axes,
)
from optaxclip._autoclip import AutoClipState, autoclip
from optaxclip._monitor import RecordNormsState, record_norms, tree_norms
from optaxclip._norm_clip import (
  ClipByBlockRmsState,
  ClipByGlobalNormState,
  ClipByNormState,
  clip_by_block_rms,
  clip_by_global_norm,
  clip_by_norm,
)
from optaxclip._norms import global_norm
from optaxclip._per_example import ClipPerExampleState, clip_per_example
from optaxclip._skip import SkipStepState, skip_step
from optaxclip._stats import clip_stats
from optaxclip._tree import stacked_by_path
from optaxclip._value import ClipByValueState, clip, clip_by_value
from optaxclip._zclip import ZClipState, zclip

__version__ = "0.1.0"

__all__ = (
  "AdaGCState",
  "AdaptiveGradClipState",
  "AutoClipState",
  "ClipByBlockRmsState",
  "ClipByGlobalNormState",
  "ClipByNormState",
  "ClipByValueState",
  "ClipPerExampleState",
  "RecordNormsState",
  "SkipStepState",
  "ZClipState",
  "adagc",
  "adaptive_grad_clip",
  "autoclip",
  "clip",
  "clip_by_block_rms",
  "clip_by_global_norm",
  "clip_by_norm",
  "clip_by_value",
  "clip_per_example",
  "clip_stats",
  "default_unit_axes",
  "global_norm",
  "record_norms",
  "skip_step",
  "stacked_by_path",
  "tree_norms",
  "zclip",
)

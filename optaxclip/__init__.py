"""optaxclip: gradient clipping for JAX, as composable optax transforms."""

from optaxclip._adagc import AdaGCState, adagc
from optaxclip._agc import (
  AdaptiveGradClipState,
  adaptive_grad_clip,
  default_unit_axes,
)
from optaxclip._autoclip import AutoClipState, autoclip
from optaxclip._growth import ClipNormGrowthState, clip_norm_growth
from optaxclip._historical import (
  ClipByHistoricalNormState,
  clip_by_historical_norm,
)
from optaxclip._monitor import (
  RecordNormsEmaState,
  RecordNormsState,
  record_norms,
  top_spikes,
  tree_norms,
)
from optaxclip._norm_clip import (
  ClipByBlockRmsState,
  ClipByGlobalNormGroupsState,
  ClipByGlobalNormState,
  ClipByNormState,
  clip_by_block_rms,
  clip_by_global_norm,
  clip_by_norm,
)
from optaxclip._norms import global_norm
from optaxclip._per_example import ClipPerExampleState, clip_per_example
from optaxclip._qk_clip import QKClipState, max_attention_logits, qk_clip
from optaxclip._shadow import ShadowState, shadow
from optaxclip._skip import (
  SkipAndClipByGlobalNormState,
  SkipStepState,
  skip_and_clip_by_global_norm,
  skip_step,
)
from optaxclip._spam import (
  MomentumResetState,
  SpamClipState,
  momentum_reset,
  spam_clip,
)
from optaxclip._spectral import SpectralClipState, spectral_clip
from optaxclip._stable_spam import AdaClipState, AdaGNState, adaclip, adagn
from optaxclip._stats import clip_stats
from optaxclip._tree import PathValues, stacked_by_path
from optaxclip._value import ClipByValueState, clip, clip_by_value
from optaxclip._zclip import ZClipState, zclip

__version__ = "0.1.0"

__all__ = (
  "AdaClipState",
  "AdaGCState",
  "AdaGNState",
  "AdaptiveGradClipState",
  "AutoClipState",
  "ClipByBlockRmsState",
  "ClipByGlobalNormGroupsState",
  "ClipByGlobalNormState",
  "ClipByHistoricalNormState",
  "ClipByNormState",
  "ClipByValueState",
  "ClipNormGrowthState",
  "ClipPerExampleState",
  "MomentumResetState",
  "PathValues",
  "QKClipState",
  "RecordNormsEmaState",
  "RecordNormsState",
  "ShadowState",
  "SkipAndClipByGlobalNormState",
  "SkipStepState",
  "SpamClipState",
  "SpectralClipState",
  "ZClipState",
  "adaclip",
  "adagc",
  "adagn",
  "adaptive_grad_clip",
  "autoclip",
  "clip",
  "clip_by_block_rms",
  "clip_by_global_norm",
  "clip_by_historical_norm",
  "clip_by_norm",
  "clip_by_value",
  "clip_norm_growth",
  "clip_per_example",
  "clip_stats",
  "default_unit_axes",
  "global_norm",
  "max_attention_logits",
  "momentum_reset",
  "qk_clip",
  "record_norms",
  "shadow",
  "skip_and_clip_by_global_norm",
  "skip_step",
  "spam_clip",
  "spectral_clip",
  "stacked_by_path",
  "top_spikes",
  "tree_norms",
  "zclip",
)

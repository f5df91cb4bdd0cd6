"""optaxclip: gradient clipping for JAX, as composable optax transforms."""

from optaxclip._agc import AdaptiveGradClipState
from optaxclip._autoclip import AutoClipState
from optaxclip._autoclip import autoclip
from optaxclip._agc import adaptive_grad_clip
from optaxclip._adagc import AdaGCState
from optaxclip._adagc import adagc
from optaxclip._norm_clip import ClipByBlockRmsState
from optaxclip._norm_clip import ClipByGlobalNormState
from optaxclip._norm_clip import ClipByNormState
from optaxclip._norm_clip import clip_by_block_rms
from optaxclip._norm_clip import clip_by_global_norm
from optaxclip._norm_clip import clip_by_norm
from optaxclip._norms import global_norm
from optaxclip._per_example import ClipPerExampleState
from optaxclip._per_example import clip_per_example
from optaxclip._skip import SkipStepState
from optaxclip._skip import skip_step
from optaxclip._stats import clip_stats
from optaxclip._value import ClipByValueState
from optaxclip._value import clip
from optaxclip._value import clip_by_value
from optaxclip._zclip import ZClipState
from optaxclip._zclip import zclip

__version__ = "0.1.0"

__all__ = (
    "AdaptiveGradClipState",
    "AdaGCState",
    "adagc",
    "adaptive_grad_clip",
    "AutoClipState",
    "autoclip",
    "ClipByBlockRmsState",
    "ClipByGlobalNormState",
    "ClipByNormState",
    "ClipByValueState",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "ClipPerExampleState",
    "clip_per_example",
    "clip_stats",
    "global_norm",
    "SkipStepState",
    "skip_step",
    "ZClipState",
    "zclip",
)

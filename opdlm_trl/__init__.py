"""opdlm-trl: turn any autoregressive LM into a block-diffusion LM by self on-policy distillation."""

from .attention import causal_attention, convert_to_dlm, is_dlm, make_4d_mask, position_ids_from_mask
from .sampler import DiffusionOutput, diffusion_generate


__version__ = "0.1.0"

__all__ = [
    "DiffusionOutput",
    "causal_attention",
    "convert_to_dlm",
    "diffusion_generate",
    "is_dlm",
    "make_4d_mask",
    "position_ids_from_mask",
]

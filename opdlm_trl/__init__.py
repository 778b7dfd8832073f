"""opdlm-trl: turn any autoregressive LM into a block-diffusion LM by self on-policy distillation (OPDLM)."""

from typing import TYPE_CHECKING, Any

from .attention import causal_attention, convert_to_dlm, is_dlm, make_4d_mask, position_ids_from_mask
from .sampler import DiffusionOutput, diffusion_generate


__version__ = "0.1.0"

# The trainers and the Hub helpers import TRL / datasets / huggingface_hub: loaded on first use.
_LAZY = {
    "OPDLMConfig": ".config",
    "OPDLMTrainer": ".trainer",
    "BD3LMConfig": ".baseline",
    "BD3LMTrainer": ".baseline",
    "load_dlm": ".hub",
    "save_dlm": ".hub",
    "push_to_hub": ".hub",
    "count_training_tokens": ".metrics",
}

__all__ = [
    "DiffusionOutput",
    "causal_attention",
    "convert_to_dlm",
    "diffusion_generate",
    "is_dlm",
    "make_4d_mask",
    "position_ids_from_mask",
    "OPDLMConfig",
    "OPDLMTrainer",
    "BD3LMConfig",
    "BD3LMTrainer",
    "load_dlm",
    "save_dlm",
    "push_to_hub",
    "count_training_tokens",
]

if TYPE_CHECKING:
    from .baseline import BD3LMConfig, BD3LMTrainer
    from .config import OPDLMConfig
    from .hub import load_dlm, push_to_hub, save_dlm
    from .metrics import count_training_tokens
    from .trainer import OPDLMTrainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'opdlm_trl' has no attribute {name!r}")

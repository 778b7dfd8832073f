"""Trainer callbacks: a progress bar that shows what a diffusion conversion is about."""

from __future__ import annotations

from typing import Any

from transformers import ProgressCallback


class DiffusionProgressCallback(ProgressCallback):
    """transformers' progress bar, with the conversion's running figures in its postfix.

    After every log the bar shows the training tokens seen so far (`num_tokens`), the training loss under the name of
    the objective (e.g. `KL` for OPDLM's forward KL, `CE` for the BD3LM baseline) and, for OPDLM, the rollouts' tokens
    per forward (`rollout/tokens_per_forward`). The log lines themselves are printed as by `ProgressCallback`.

    Args:
        loss_name: Label of the loss on the bar.
        max_str_len: As in `ProgressCallback`.
    """

    def __init__(self, loss_name: str = "loss", max_str_len: int = 100):
        super().__init__(max_str_len=max_str_len)
        self.loss_name = loss_name

    @staticmethod
    def postfix(logs: dict[str, Any], loss_name: str = "loss") -> dict[str, str]:
        """The bar's postfix for one log dict (keys absent from the log are left out).

        Args:
            logs: A log dict of the trainer.
            loss_name: Label of the loss.

        Returns:
            An ordered dict of display strings: `tokens`, `<loss_name>`, `tok/fwd`.
        """
        shown: dict[str, str] = {}
        if "num_tokens" in logs:
            shown["tokens"] = f"{int(float(logs['num_tokens'])):,}"
        if "loss" in logs:
            shown[loss_name] = f"{float(logs['loss']):.4g}"
        if "rollout/tokens_per_forward" in logs:
            shown["tok/fwd"] = f"{float(logs['rollout/tokens_per_forward']):.2f}"
        return shown

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = self.postfix(logs, self.loss_name)
            if shown:
                self.training_bar.set_postfix(shown, refresh=True)


def use_diffusion_progress_bar(trainer: Any, loss_name: str) -> None:
    """Replaces the trainer's default `ProgressCallback` (if it has one: not with `disable_tqdm`) by a
    `DiffusionProgressCallback`. Other progress callbacks (notebooks, a user's own) are left alone."""
    handler = trainer.callback_handler
    default = [cb for cb in handler.callbacks if type(cb) is ProgressCallback]
    for callback in default:
        handler.remove_callback(callback)
    if default:
        handler.add_callback(DiffusionProgressCallback(loss_name))


__all__ = ["DiffusionProgressCallback", "use_diffusion_progress_bar"]

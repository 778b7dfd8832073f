# Copyright 2026 The opdlm-trl authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

# /// script
# dependencies = [
#     "opdlm-trl",
#     "trl",
#     "peft",
# ]
# ///

"""
Self on-policy distillation of an autoregressive LM into a block-diffusion LM (OPDLM, arXiv 2606.06712).

Only prompts are needed: the student (the model's own weights with block-causal attention and a mask token) samples
completions with the block-diffusion sampler, and learns to match the frozen original model's next-token distributions
at the positions it had not decoded yet. The result is saved (and pushed with `--push_to_hub`) as a folder that
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` loads as a diffusion LM.

# Full training (the paper's recipe, scaled down)
```bash
python examples/scripts/opdlm.py \
    --model_name_or_path Qwen/Qwen3-0.6B \
    --dataset_name trl-lib/ultrafeedback-prompt \
    --block_size 4 \
    --steps_per_block 4 \
    --threshold 0.9 \
    --max_completion_length 512 \
    --learning_rate 1e-5 \
    --lr_scheduler_type cosine \
    --warmup_steps 5 \
    --per_device_train_batch_size 8 \
    --num_train_epochs 1 \
    --bf16 \
    --output_dir Qwen3-0.6B-OPDLM
```

# Multi-GPU
```bash
accelerate launch examples/scripts/opdlm.py --model_name_or_path Qwen/Qwen3-0.6B \
    --dataset_name trl-lib/ultrafeedback-prompt --output_dir Qwen3-0.6B-OPDLM
```

# LoRA
```bash
python examples/scripts/opdlm.py \
    --model_name_or_path Qwen/Qwen3-0.6B \
    --dataset_name trl-lib/ultrafeedback-prompt \
    --learning_rate 2.0e-4 \
    --output_dir Qwen3-0.6B-OPDLM-LoRA \
    --use_peft \
    --lora_r 32 \
    --lora_alpha 16
```

Any `OPDLMConfig` / `ModelConfig` field is a flag, and `--config recipe.yaml` reads them from a YAML file. The student
can also be a checkpoint released in the dLLM a2d format (`model_type: a2d-qwen3`), loaded without remote code. The
same run is available as `opdlm train ...`.
"""

import argparse
import os


def main(script_args, training_args, model_args):
    from datasets import load_dataset, load_from_disk
    from trl import get_peft_config, get_quantization_config

    from opdlm_trl.hub import detect_format, load_dlm
    from opdlm_trl.trainer import OPDLMTrainer

    # Student: loaded by the trainer from its name (like TRL's scripts), except for a2d checkpoints, which are mapped
    # to their stock architecture first.
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation or "sdpa",  # block masks need sdpa, eager or flex
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    model, tokenizer = model_args.model_name_or_path, None
    if detect_format(model_args.model_name_or_path, revision=model_args.model_revision) == "a2d":
        import torch

        dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
        model, tokenizer = load_dlm(
            model_args.model_name_or_path,
            block_size=training_args.block_size,
            mask_token=training_args.mask_token,
            attn_implementation=model_args.attn_implementation or "auto",
            revision=model_args.model_revision,
            dtype=dtype,
        )
        model.train()
    else:
        training_args.model_init_kwargs = model_init_kwargs

    # Prompts: a Hub dataset, or a local folder written by `save_to_disk`.
    if os.path.isdir(script_args.dataset_name) and os.path.exists(
        os.path.join(script_args.dataset_name, "dataset_dict.json")
    ):
        dataset = load_from_disk(script_args.dataset_name)
    else:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )

    trainer = OPDLMTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")

    # Save (block-causal config, tokenizer with its mask token, custom_generate/ sampler, model card) and push.
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")

    if hasattr(trainer, "end"):  # finish the trackers and destroy the process group (transformers >= 5.18)
        trainer.end()


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import ModelConfig, ScriptArguments, TrlParser

    from opdlm_trl.config import OPDLMConfig

    dataclass_types = (ScriptArguments, OPDLMConfig, ModelConfig)
    if subparsers is not None:
        parser = subparsers.add_parser("opdlm", help="Run the OPDLM training script", dataclass_types=dataclass_types)
    else:
        parser = TrlParser(dataclass_types, prog=prog)
    return parser


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)

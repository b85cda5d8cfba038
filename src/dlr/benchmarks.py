"""What an RL step costs (docs/design.md §11): `src/bench.py rollout|decode|memory` on a named backbone;
the probes of what the frozen main reads are in `dlr.probes`.

`tiny` loads the shipped tiny backbone; a real backbone name (`qwen2.5-0.5b+1.5b`, ...) builds its
models from the config's `shapes` with random weights and the tiny tokenizer (no download), saves
them once to a temporary folder and loads them as the project does (main frozen in NF4, assistant
with LoRA). Timings are
CUDA-synchronised wall seconds on a GPU and wall seconds on the CPU; compare ratios from one run.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from dlr.data.datamodule import ProceduralSpec, procedural_record
from dlr.models.backbones import ModelSpec, PromptFormat, add_lora, load_assistant, load_main, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Backbone:
    name: str
    main: torch.nn.Module
    main_tokenizer: object
    assistant: torch.nn.Module
    assistant_tokenizer: object
    fmt: PromptFormat
    placeholder: str
    device: torch.device


def backbone_config(name: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"backbone={name}", f"paths.root_dir={ROOT}"])


def random_weights_folder(model_type: str, shape: dict, folder: Path) -> str:
    """Save a random-weight model of `shape` with the tiny word-level tokenizer, without any download.

    Benchmarks time the real architectures; the tokenizer only has to supply ids, the latent markers
    and the placeholder, so the tiny one (built locally) serves every shape.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from dlr.models import tiny

    if not (folder / "config.json").exists():
        tokenizer = tiny.build_tokenizer()
        config = AutoConfig.for_model(
            model_type,
            **shape,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def load_backbone(name: str, device: str) -> Backbone:
    """The named backbone's main (frozen, quantized as configured) and assistant (LoRA) on `device`.
    A real backbone gets random weights of its configured shapes and the tiny tokenizer and prompt."""
    from dlr.runner.common import model_spec, prompt_format

    cfg = backbone_config(name)
    main_spec, assistant_spec = model_spec(cfg.backbone.main, str(ROOT)), model_spec(cfg.backbone.assistant, str(ROOT))
    fmt, placeholder = prompt_format(cfg), cfg.backbone.placeholder
    if name != "tiny":
        folder = Path(tempfile.gettempdir()) / f"dlr-bench-{name}"
        shapes = OmegaConf.to_container(cfg.backbone.shapes)
        main_spec = ModelSpec(
            random_weights_folder(cfg.backbone.model_type, shapes["main"], folder / "main"),
            main_spec.quantization,
            main_spec.dtype,
        )
        assistant_spec = ModelSpec(
            random_weights_folder(cfg.backbone.model_type, shapes["assistant"], folder / "assistant"),
            assistant_spec.quantization,
            assistant_spec.dtype,
            assistant_spec.lora,
        )
        fmt, placeholder = PromptFormat(template="{question} answer :"), "<lat>"
    return Backbone(
        name,
        load_main(main_spec, device),
        load_tokenizer(main_spec.name_or_path),
        load_assistant(assistant_spec, device),
        load_tokenizer(assistant_spec.name_or_path),
        fmt,
        placeholder,
        torch.device(device),
    )


def questions(count: int, seed: int = 0) -> list:
    spec = ProceduralSpec({"math": 0.5, "logic": 0.5}, 1, 4)
    return [procedural_record(spec, seed, 0, i) for i in range(count)]


def timed(device: torch.device, fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def dlr_module(
    bb: Backbone,
    num_samples: int,
    num_decoded: int,
    latent_steps: int,
    latent_dim: int,
    decode_tokens: int,
    readout: str = "rationale",
):
    from dlr.config import reward_from_yaml, settings_from_yaml
    from dlr.methods.dlr_module import DLRModule, DLRSettings

    settings = settings_from_yaml(
        DLRSettings,
        "dlr",
        {
            # fixed-length parallel chains: one assistant pass (what the rollout and probe benchmarks time and read)
            "latent": {"steps": latent_steps, "dim": latent_dim, "mode": "parallel", "projector": "mlp"},
            "alignment": {"steps": 0},
            "rl": {"num_samples": num_samples, "num_decoded": num_decoded, "beta": 0.0},
            "readout": readout,
            # the other readout's budget only has to be valid
            "max_new_tokens": {"rationale": decode_tokens, "answer": 1}
            if readout == "rationale"
            else {"rationale": decode_tokens + 1, "answer": decode_tokens},
        },
    )
    return DLRModule(
        bb.main,
        bb.main_tokenizer,
        bb.assistant,
        bb.assistant_tokenizer,
        bb.fmt,
        settings,
        reward_from_yaml(),
        bb.placeholder,
    ).to(bb.device)


def bench_rollout(
    bb: Backbone,
    questions_per_batch: int,
    num_samples: int,
    num_decoded: int,
    latent_steps: int,
    latent_dim: int,
    dlr_decode_tokens: int,
    grpo_new_tokens: int,
    repeats: int,
    readout: str = "rationale",
) -> dict:
    """Device-seconds per sampled reasoning attempt, DLR vs GRPO, same main model and K; both decode
    their full budget (EOS forbidden before it), so the timing does not depend on what the weights say."""
    from dlr.models.critic import select_latents
    from dlr.models.generation import greedy_decode_embeds, sample_completions

    records = questions(questions_per_batch)
    module = dlr_module(bb, num_samples, num_decoded, latent_steps, latent_dim, dlr_decode_tokens, readout)

    @torch.no_grad()
    def dlr_rollout():  # one assistant pass, G draws, the critic's choice of K, one decode of B*K chains
        ids, mask = module.encode_questions(records)
        dist = module.policy(ids, mask)
        z, _ = module.policy.sample(dist, num_samples)
        kept = select_latents(module.critic(dist.pooled, z), num_decoded, 1, "critic")
        embeds, emask = module.main_inputs(records, z[torch.arange(len(records), device=z.device)[:, None], kept])
        greedy_decode_embeds(module.main, embeds, emask, bb.main_tokenizer, dlr_decode_tokens, dlr_decode_tokens)

    dlr_seconds = timed(bb.device, dlr_rollout, repeats)
    policy = add_lora(bb.main, {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    prompts = [bb.fmt.prompt(r.question, bb.main_tokenizer) for r in records]

    def grpo_rollout():  # K full-length completions per question
        sample_completions(
            policy, bb.main_tokenizer, prompts, num_decoded, grpo_new_tokens, min_new_tokens=grpo_new_tokens
        )

    grpo_seconds = timed(bb.device, grpo_rollout, repeats)
    attempts = questions_per_batch * num_decoded
    return {
        "backbone": bb.name,
        "readout": readout,
        "questions": questions_per_batch,
        "G": num_samples,
        "K": num_decoded,
        "T": latent_steps,
        "Dz": latent_dim,
        "dlr_decode_tokens": dlr_decode_tokens,
        "grpo_new_tokens": grpo_new_tokens,
        "dlr_seconds_per_attempt": dlr_seconds / attempts,
        "grpo_seconds_per_attempt": grpo_seconds / attempts,
        "grpo_over_dlr": grpo_seconds / dlr_seconds,
    }


def copy_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    x = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    seconds = timed(device, lambda: y.copy_(x), repeats=5)
    return 2 * x.numel() / seconds


def bench_decode(bb: Backbone, batch_sizes: list[int], prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """GRPO generation tokens/s by batch size against the memory-bandwidth floor."""
    from dlr.models.generation import sample_completions

    weight_bytes = bb.main.get_memory_footprint()
    bandwidth = copy_bandwidth(bb.device)
    words = bb.main_tokenizer.convert_ids_to_tokens(list(range(10, min(200, len(bb.main_tokenizer)))))
    prompt = " ".join(random.Random(0).choices(words, k=prompt_tokens))
    rows = []
    for batch in batch_sizes:
        seconds = timed(
            bb.device,
            lambda batch=batch: sample_completions(
                bb.main, bb.main_tokenizer, [prompt], batch, new_tokens, min_new_tokens=new_tokens
            ),
            repeats,
        )
        tokens_per_s = batch * new_tokens / seconds
        floor = batch * bandwidth / weight_bytes  # every decode step reads all weights once
        rows.append(
            {
                "batch": batch,
                "tokens_per_s": tokens_per_s,
                "floor_tokens_per_s": floor,
                "fraction_of_floor": tokens_per_s / floor,
            }
        )
    return {
        "backbone": bb.name,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "rows": rows,
    }


def bench_memory(
    bb: Backbone,
    questions_per_batch: int,
    num_samples: int,
    num_decoded: int,
    latent_steps: int,
    latent_dim: int,
    grpo_generations: int,
    grpo_new_tokens: int,
) -> dict:
    """Peak device memory of one full RL step of each arm (training step with backward and update)."""
    from lightning import Trainer

    from dlr.accounting import peak_memory_bytes, reset_peak_memory
    from dlr.config import reward_from_yaml, settings_from_yaml
    from dlr.data.datamodule import ReasoningDataModule
    from dlr.methods.grpo_module import GRPOModule, GRPOSettings

    def one_step(module) -> float:
        reset_peak_memory(bb.device)
        data = ReasoningDataModule(
            "mixed",
            questions_per_batch,
            [1, 4],
            [1, 1],
            train_seed=0,
            test_seed=1000,
            test_per_depth=1,
            mix_weights={"math": 0.5, "logic": 0.5},
        )
        Trainer(
            max_steps=1,
            accelerator="gpu" if bb.device.type == "cuda" else "cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            precision="bf16-mixed" if bb.device.type == "cuda" else "32-true",
            default_root_dir=tempfile.mkdtemp(),
        ).fit(module, datamodule=data)
        return peak_memory_bytes(bb.device) / 2**30

    dlr_peak = one_step(
        dlr_module(bb, num_samples, num_decoded, latent_steps, latent_dim, grpo_new_tokens)
    )  # rationale readout
    lora = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    settings = settings_from_yaml(
        GRPOSettings,
        "grpo",
        {"num_generations": grpo_generations, "max_new_tokens": grpo_new_tokens, "micro_batch_size": 8, "lora": lora},
    )
    grpo_peak = one_step(GRPOModule(add_lora(bb.main, lora), bb.main_tokenizer, bb.fmt, settings, reward_from_yaml()))
    return {
        "backbone": bb.name,
        "questions": questions_per_batch,
        "G": num_samples,
        "K": num_decoded,
        "T": latent_steps,
        "grpo_K": grpo_generations,
        "grpo_new_tokens": grpo_new_tokens,
        "measure": "CUDA peak allocated" if bb.device.type == "cuda" else "process peak RSS (lifetime)",
        "dlr_peak_gb": dlr_peak,
        "grpo_peak_gb": grpo_peak,
    }

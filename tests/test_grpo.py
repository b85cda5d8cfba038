"""The GRPO arm: rollout masks, log-probs, micro-batch aggregation, the module's parameter hygiene, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import quiet_cpu_trainer, reward_from_yaml, run_train, settings_from_yaml
from dlr.accounting import compute_parameters
from dlr.data.datamodule import ReasoningDataModule
from dlr.methods.grpo_module import GRPOModule, GRPOSettings, shuffle_across_batch
from dlr.methods.losses import LOSS_TYPES, aggregate_token_loss, clipped_surrogate, micro_batch_weight
from dlr.models.backbones import ModelSpec, PromptFormat, add_lora, load_main, load_tokenizer, weights_sha256
from dlr.models.generation import completion_log_probs, completion_mask_after_eos, sample_completions
from dlr.rewards import TOTAL


def test_completion_mask_stops_after_the_first_eos():
    eos, pad = 2, 0
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 2, 2, 2], [7, 8, 9, 5, 6]])  # pad may even equal eos
    mask = completion_mask_after_eos(ids, [eos, 99])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert pad not in ids[mask.bool()].tolist()


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "bnpo"])
def test_weighted_micro_batches_sum_to_the_whole_batch_loss(loss_type):
    torch.manual_seed(0)
    per_token = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).long()
    mask[:, 0] = 1
    whole = aggregate_token_loss(per_token, mask, loss_type, max_completion_length=5)
    parts = [slice(0, 4), slice(4, 6)]
    total_tokens = float(mask.sum())
    summed = sum(
        aggregate_token_loss(per_token[p], mask[p], loss_type, 5)
        * micro_batch_weight(loss_type, mask[p].shape[0], 6, float(mask[p].sum()), total_tokens, len(parts))
        for p in parts
    )
    torch.testing.assert_close(summed, whole)


def test_dapo_over_two_ranks_averaged_like_ddp_is_the_mean_over_all_tokens():
    ranks = [
        (torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1, 1, 1]])),  # rank 0: 3 tokens
        (torch.tensor([[5.0, 9.0, 9.0]]), torch.tensor([[1, 0, 0]])),
    ]  # rank 1: 1 token
    mean_tokens = (3 + 1) / 2
    per_rank = [
        aggregate_token_loss(x, m, "dapo", 3) * micro_batch_weight("dapo", 1, 1, float(m.sum()), mean_tokens, 1)
        for x, m in ranks
    ]
    assert (sum(per_rank) / 2).item() == pytest.approx((1 + 2 + 3 + 5) / 4)  # DDP averages the ranks' gradients


def test_bnpo_micro_batches_average_their_own_token_means():
    per_token, mask = torch.tensor([[1.0, 3.0], [5.0, 0.0]]), torch.tensor([[1, 1], [1, 0]])
    parts = [slice(0, 1), slice(1, 2)]
    summed = sum(
        aggregate_token_loss(per_token[p], mask[p], "bnpo", 2) * micro_batch_weight("bnpo", 1, 2, 0, 0, 2)
        for p in parts
    )
    assert summed.item() == pytest.approx((2.0 + 5.0) / 2)


def test_completion_log_probs_ignore_left_padding(tiny_pair):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pair / "main").eval()
    tokenizer = load_tokenizer(str(tiny_pair / "main"))
    torch.manual_seed(0)
    prompts = ["<bos> ana has 7 pens . she gets 5 . answer :", "<bos> kai is a dax . answer :"]
    prompt_ids, prompt_mask, completion_ids, completion_mask = sample_completions(model, tokenizer, prompts, 2, 6)
    assert prompt_ids.shape[0] == completion_ids.shape[0] == 4 and completion_ids.shape[1] <= 6
    logp, entropy = completion_log_probs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    # The second prompt alone, without the left padding the batch gave it.
    real = prompt_mask[2].bool()
    alone, _ = completion_log_probs(
        model, prompt_ids[2:3, real], prompt_mask[2:3, real], completion_ids[2:3], completion_mask[2:3]
    )
    keep = completion_mask[2].bool()
    torch.testing.assert_close(alone[0, keep], logp[2, keep], atol=1e-4, rtol=1e-4)
    assert (logp <= 0).all() and (entropy >= 0).all()


def grpo_module(tiny_pair, **overrides) -> GRPOModule:
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    settings = settings_from_yaml(
        GRPOSettings,
        "grpo",
        {
            "num_generations": 3,
            "max_new_tokens": 6,
            "micro_batch_size": 4,
            "lora": lora,
            "beta": 0.04,
            "lr": 1e-2,
            **overrides,
        },
    )
    policy = add_lora(load_main(ModelSpec(str(tiny_pair / "main"), quantization="nf4")), settings.lora)
    tokenizer = load_tokenizer(str(tiny_pair / "main"))
    return GRPOModule(
        policy,
        tokenizer,
        PromptFormat(template="{question} answer :"),
        settings,
        reward_from_yaml(),
        base_sha256=weights_sha256(policy, exclude="lora_"),
    )


def test_a_grpo_step_changes_only_lora_weights(tiny_pair, tmp_path):
    # An untrained model rarely earns a reward spread, so the entropy bonus guarantees a gradient.
    module = grpo_module(tiny_pair, entropy_coef=0.1, num_iterations=2)
    before = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    data = ReasoningDataModule(
        "mixed",
        3,
        [1, 1],
        [1, 1],
        train_seed=0,
        test_seed=1000,
        test_per_depth=1,
        mix_weights={"math": 0.5, "logic": 0.5},
    )
    trainer = quiet_cpu_trainer(tmp_path, 2)
    shapes = []
    rollout = module.rollout

    def recorded_rollout(records):
        out = rollout(records)
        shapes.append((out[0].shape[0], out[0].shape[1], out[2].shape[1]))  # N, Lp, Lc
        return out

    module.rollout = recorded_rollout
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2  # num_iterations=2: two optimizer steps on one batch of rollouts
    # FLOPs by hand: 2 per parameter per position, the body at every position it reads, the head where
    # logits are computed; sampling = prefill + Lc - 1 cached steps with Lc logits per row; the old and the
    # reference log-prob passes read Lp + Lc positions and keep Lc + 1 logits; 2 training passes at x2.
    ((N, Lp, Lc),) = shapes
    body, head = module.cost.body, module.cost.head
    sampling = 2 * body * N * (Lp + Lc - 1) + 2 * head * N * Lc
    log_prob_pass = 2 * body * N * (Lp + Lc) + 2 * head * N * (Lc + 1)
    assert float(module.flops_spent) == pytest.approx(sampling + 2 * log_prob_pass + 2 * 2 * log_prob_pass)
    assert head == module.policy.get_output_embeddings().weight.numel() > 0
    assert body + head == compute_parameters(module.policy)
    changed = {k for k, v in module.policy.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)
    assert weights_sha256(module.policy, exclude="lora_") == module.base_sha256
    assert int(module.generated_tokens) > 0
    assert module.last_scores.shape == (3, 3, 3)  # [B, K, (correct, format, total)] of the last batch
    assert module.last_reward == float(module.last_scores[..., TOTAL].mean())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"loss_type": "ppo"}, "loss_type"),
        ({"num_generations": 1}, "num_generations"),
        ({"cache": "paged"}, "cache"),
        ({"lora": {}}, "lora"),
        ({"num_iterations": 2, "accumulate_grad_batches": 2}, "num_iterations"),
    ],
)
def test_bad_grpo_settings_fail_with_the_key_named(override, message):
    with pytest.raises(ValueError, match=message):
        settings_from_yaml(GRPOSettings, "grpo", override)


def test_grpo_runs_end_to_end_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        [
            "experiment=grpo",
            "method.steps=2",
            "data.batch_size=4",
            "method.num_generations=3",
            "method.max_new_tokens=24",
            "data.test_per_depth=1",
            "eval.modes=[cot]",
            "eval.max_new_tokens=24",
            "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    models = {s["model"] for s in json.loads((run_dir / "eval.json").read_text())["scores"]}
    assert models == {"main/cot", "grpo/cot"}
    assert json.loads((run_dir / "base_sha256.json").read_text())["unchanged"] is True
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in (
        "train/reward",
        "train/reward_std",
        "train/frac_reward_zero_std",
        "train/completions/mean_length",
        "train/completions/clipped_ratio",
        "train/clip_ratio/region_mean",
        "train/entropy",
        "train/kl",
        "train/num_tokens",
        "train/generation_tokens_per_s",
    ):
        assert key in header, key
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"] if k.startswith("policy."))


def test_repeated_nans_stop_the_run_with_a_clear_error_and_keep_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        [
            "experiment=grpo",
            "method.steps=4",
            "data.batch_size=2",
            "method.num_generations=2",
            "method.max_new_tokens=8",
            "data.test_per_depth=1",
            "eval.modes=[cot]",
            "eval.max_new_tokens=8",
            "trainer.enable_progress_bar=false",
            "callbacks.model_checkpoint.every_n_train_steps=1",
            "debug.inject_nonfinite_at_step=1",
            "debug.inject_nonfinite_times=10",
            "method.max_consecutive_nonfinite=3",
            f"hydra.run.dir={run_dir}",
        ],
        timeout=300,
    )
    assert result.returncode != 0
    assert "3 consecutive optimizer steps had a non-finite loss or gradient (at step 1)" in result.stderr
    assert "Traceback" not in result.stderr  # one readable message
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 1  # the last good step


def test_shuffle_across_batch_is_a_uniform_permutation_of_the_rewards():
    torch.manual_seed(0)
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.2, 0.0]])
    landed = torch.zeros(6)
    for _ in range(600):
        shuffled = shuffle_across_batch(rewards)
        assert shuffled.shape == rewards.shape and sorted(shuffled.flatten().tolist()) == sorted(
            rewards.flatten().tolist()
        )
        landed += (shuffled.flatten() == 1.0).float()
    assert landed.min() > 60  # each of the 6 places gets the 1 about 100 times in 600 draws


def test_a_shuffled_reward_grpo_step_takes_its_advantages_from_the_shuffled_rewards(tiny_pair, tmp_path, monkeypatch):
    """With method.shuffle_rewards the surrogate sees advantages of the shuffled rewards; the logged
    scores stay the completions' own."""
    from dlr.methods import grpo_module as grpo
    from dlr.methods.losses import group_advantages

    module = grpo_module(tiny_pair, shuffle_rewards=True)
    true_rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.2]])
    rollout = module.rollout

    def fixed_scores(records):
        out = list(rollout(records))
        out[4] = torch.stack([true_rewards, torch.zeros(3, 3), true_rewards], dim=-1)  # (correct, format, total)
        return tuple(out)

    seen = []

    def recorded(logp, old, advantages, eps_low, eps_high):
        seen.append(advantages.clone())
        return clipped_surrogate(logp, old, advantages, eps_low, eps_high)

    monkeypatch.setattr(module, "rollout", fixed_scores)
    monkeypatch.setattr(grpo, "shuffle_across_batch", lambda r: r.flip(0))  # groups 0 and 2 swap places
    monkeypatch.setattr(grpo, "clipped_surrogate", recorded)
    data = ReasoningDataModule("mixed", 3, [1, 1], [1, 1], 0, 1000, 1, {"math": 0.5, "logic": 0.5})
    quiet_cpu_trainer(tmp_path, 1).fit(module, datamodule=data)
    expected = group_advantages(true_rewards.flip(0), "group")[0].flatten()
    torch.testing.assert_close(torch.cat(seen), expected)
    assert torch.equal(module.last_scores[..., TOTAL], true_rewards)

"""The DLR arm: its stage-2 objective, the toy direction test, its diagnostics, and the module end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config, quiet_cpu_trainer, reward_from_yaml, run_train, settings_from_yaml
from dlr.callbacks.latent_diversity import effective_rank, mean_pairwise_cosine_distance
from dlr.callbacks.reward_filter import filter_quality
from dlr.data.datamodule import ReasoningDataModule
from dlr.methods.dlr_module import DLRModule, DLRSettings
from dlr.methods.losses import (
    LatentRLWeights,
    chain_similarities,
    dispersion_loss,
    gaussian_entropy,
    gaussian_kl,
    gaussian_log_prob,
    group_advantages,
    latent_rl_loss,
    reward_info_nce,
)
from dlr.models.backbones import ModelSpec, PromptFormat, load_assistant, load_main, load_tokenizer, weights_sha256
from dlr.models.critic import RewardCritic, select_latents
from dlr.models.latent_policy import LatentDistribution
from dlr.rewards import TOTAL


def test_latent_rl_loss_is_the_weighted_sum_of_its_terms():
    torch.manual_seed(0)
    mu = torch.randn(2, 3, 2, 4, requires_grad=True)  # [B, K, T, Dz]
    log_sigma = torch.full((2, 3, 2, 4), -0.5, requires_grad=True)
    z = mu.detach() + torch.randn(2, 3, 2, 4) * 0.6
    advantages = torch.tensor([[1.0, -0.5, -0.5], [0.0, 0.0, 0.0]])
    anchors = mu.mean(1)
    ref = (mu.detach() + 0.1, log_sigma.detach() - 0.2)
    weights = LatentRLWeights("reward_infonce", 0.3, False, tau=0.1, beta=0.05, lambda_ent=0.01, clip_eps=0.2)
    loss, terms = latent_rl_loss(mu, log_sigma, z, advantages, anchors, weights, ref)

    pg = -(advantages * gaussian_log_prob(z, mu, log_sigma)).mean()
    con, skipped = reward_info_nce(anchors, z, advantages, 0.1)
    kl = gaussian_kl(mu, log_sigma, *ref).mean()
    entropy = gaussian_entropy(log_sigma).mean()
    torch.testing.assert_close(loss, pg + 0.3 * con + 0.05 * kl - 0.01 * entropy)
    assert skipped == 1 and terms["contrastive_skipped"] == 1  # question 2 has no positive
    # With the reference equal to the policy, the KL term vanishes.
    _, same = latent_rl_loss(mu, log_sigma, z, advantages, anchors, weights, (mu, log_sigma))
    assert float(same["kl"]) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="beta > 0"):
        latent_rl_loss(mu, log_sigma, z, advantages, anchors, weights, None)

    # The paper's terms: Eq. (8) on the reparameterized samples, each chain's term over n = T*Dz = 8.
    paper = LatentRLWeights("dispersion", 0.1, False, tau=0.1, beta=0.01, lambda_ent=0.0, clip_eps=0.2)
    loss, terms = latent_rl_loss(mu, log_sigma, z, advantages, None, paper, ref)
    dispersion = dispersion_loss(chain_similarities(z, None, False, 0.1)).sum(1).mean()  # Eq. (8)
    torch.testing.assert_close(loss, pg + 0.1 * dispersion / 8 + 0.01 * kl)
    torch.testing.assert_close(terms["contrastive"], dispersion)


def test_direction_toy_moves_mu_toward_the_rewarded_direction_and_the_critic_ranks_it_first():
    """Reward 1 only for latents within ~60 degrees of a fixed direction d. The stage-2 loss moves the
    mean toward d, and the critic, trained only on decoded (kept) latents, ranks d above other directions."""
    torch.manual_seed(0)
    Dz, G, K = 8, 32, 8
    d = F.normalize(torch.ones(Dz), dim=0)
    mu = torch.nn.Parameter(
        F.normalize(torch.randn(1, 1, 1, Dz), dim=-1) * 0.5 - 0.3 * d
    )  # [B, M, T, Dz], pointing away
    log_sigma = torch.full((1, 1, 1, Dz), math.log(0.7))
    pooled = torch.ones(1, 4)
    critic = RewardCritic(question_dim=4, latent_dim=Dz, hidden=32)
    optimizer = torch.optim.Adam([{"params": [mu], "lr": 0.05}, {"params": critic.parameters(), "lr": 0.01}])
    weights = LatentRLWeights("dispersion", 0.1, False, tau=0.1, beta=0.0, lambda_ent=0.0, clip_eps=0.2)

    def reward(z: torch.Tensor) -> torch.Tensor:
        return (F.cosine_similarity(z.flatten(2), d.expand(z.shape[-1]), dim=-1) > 0.5).float()

    start = F.cosine_similarity(mu.flatten(), d, dim=0).item()
    for step in range(150):
        z_all = (mu + log_sigma.exp() * torch.randn(1, G, 1, Dz)).detach()  # [1, G, 1, Dz]
        predicted = critic(pooled, z_all)
        kept = select_latents(predicted.detach(), K, 2, "critic" if step >= 10 else "random")
        z = z_all[:, kept[0]]
        rewards = reward(z)  # [1, K]
        advantages, _ = group_advantages(rewards)
        loss, _ = latent_rl_loss(
            mu.expand(1, K, 1, Dz), log_sigma.expand(1, K, 1, Dz), z, advantages, mu[:, 0], weights
        )
        loss = loss + F.mse_loss(predicted[:, kept[0]], rewards)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = F.cosine_similarity(mu.detach().flatten(), d, dim=0).item()
    assert start < 0 and end > 0.9, (start, end)
    others = F.normalize(torch.randn(7, Dz), dim=-1)
    candidates = torch.cat([d[None], -d[None], others]) * mu.detach().norm()  # [8, Dz], d first
    scores = critic(pooled, candidates[None, :, None, :])  # [1, 8]
    assert scores.argmax().item() == 0


def test_filter_quality_counts_ties_as_hits():
    predicted = torch.tensor([[0.9, 0.8, 0.1, 0.0]])
    rewards = torch.tensor([[1.2, 0.2, 1.2, 0.2]])
    quality = filter_quality(predicted, rewards, keep=2)  # true top-2: indices 0 and 2; critic picks 0 and 1
    assert quality["precision_at_k"].item() == pytest.approx(0.5)
    assert quality["precision_at_k_random"].item() == pytest.approx(0.5)
    assert quality["critic_mse"].item() == pytest.approx((0.3**2 + 0.6**2 + 1.1**2 + 0.2**2) / 4)
    tied = filter_quality(predicted, torch.tensor([[0.2, 0.2, 0.2, 0.2]]), keep=2)
    assert tied["precision_at_k"].item() == 1.0  # every pick is as good as the best


def test_diversity_metrics_on_hand_made_chains():
    e = torch.eye(4)
    orthogonal = e[None, :, None, :]  # [1, G=4, T=1, Dz=4], pairwise cosine 0
    assert mean_pairwise_cosine_distance(orthogonal).item() == pytest.approx(1.0)
    same = torch.ones(1, 3, 2, 4)
    assert mean_pairwise_cosine_distance(same).item() == pytest.approx(0.0, abs=1e-6)
    line = torch.arange(5.0)[None, :, None, None] * torch.tensor([1.0, 2.0, 0.0])  # chains along one direction
    assert effective_rank(line).item() == pytest.approx(1.0, abs=1e-4)
    # Centred orthonormal rows: 4 chains span 3 directions with equal singular values -> rank 3.
    assert effective_rank(orthogonal).item() == pytest.approx(3.0, abs=1e-4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"rl": {"filter": "best"}}, "method.rl.filter"),
        ({"rl": {"num_samples": 4, "num_decoded": 8}}, "num_decoded"),
        ({"rl": {"num_samples": 8, "num_decoded": 4, "filter": "none"}}, "filter=none"),
        ({"readout": "soft"}, "method.readout"),
        ({"latent": {"steps": -1}}, "method.latent.steps"),
        ({"max_new_tokens": {"rationale": 4, "answer": 4}}, "method.max_new_tokens.rationale must exceed"),
        ({"max_new_tokens": {"rationale": 8}}, "a budget >= 1 for each readout"),
        ({"alignment": {"pull_weight": -1.0}}, "method.alignment.pull_weight"),
        ({"latent": {"mode": "lstm"}}, "latent.mode"),
        ({"readout": "answer", "latent": {"compression": 0}}, "method.latent.compression"),
        ({"readout": "answer", "latent": {"compression": 1.5}}, "method.latent.compression"),
        ({"readout": "answer", "latent": {"max_steps": 0}}, "method.latent.max_steps"),
        ({"latent": {"projector": "linear"}}, "method.latent.projector"),
        ({"latent": {"mode": "recurrent"}}, "method.latent.mode=recurrent needs method.readout=answer"),
        ({"readout": "answer", "latent": {"num_modes": 2}}, "num_modes > 1 needs method.latent.mode=parallel"),
        ({"alignment": {"stop_weight": -1.0}}, "stop_weight"),
        ({"latent": {"init": "tied"}}, "method.latent.init must be one of"),
        ({"readout": "answer", "latent": {"init": "assistant", "projector": "mlp"}}, "method.latent.init=assistant"),
        ({"latent": {"width": 3}}, "unknown settings"),
        ({"rl": {"ppo_epochs": 2}, "accumulate_grad_batches": 2}, "ppo_epochs"),
    ],
)
def test_bad_dlr_settings_fail_with_the_key_named(override, message):
    with pytest.raises(ValueError, match=message):
        settings_from_yaml(DLRSettings, "dlr", override)


def test_each_readout_gets_its_latent_mode_and_projector_unless_the_config_names_them():
    rationale = settings_from_yaml(DLRSettings, "dlr")
    assert (rationale.latent.mode, rationale.latent.projector, rationale.latent.init) == ("parallel", "mlp", "random")
    answer = settings_from_yaml(DLRSettings, "dlr", {"readout": "answer"})
    latent = answer.latent
    assert (latent.mode, latent.projector, latent.compression, latent.init) == (
        "recurrent",
        "soft_tokens",
        1,
        "assistant",
    )
    assert answer.latent.max_steps == 80  # the tiny backbone's cap: depth-8 chains have 72 tokens
    chosen = settings_from_yaml(
        DLRSettings, "dlr", {"readout": "answer", "latent": {"mode": "parallel", "projector": "mlp"}}
    )
    assert (chosen.latent.mode, chosen.latent.projector, chosen.latent.init) == ("parallel", "mlp", "random")
    mlp = settings_from_yaml(DLRSettings, "dlr", {"readout": "answer", "latent": {"projector": "mlp"}})
    assert (mlp.latent.mode, mlp.latent.init) == (
        "recurrent",
        "random",
    )  # fresh heads where the text start does not apply


def test_a_bad_latent_setting_fails_before_any_model_loads(tmp_path):
    result = run_train(
        ["experiment=dlr", "method.readout=answer", "method.latent.compression=0", f"hydra.run.dir={tmp_path}"],
        timeout=120,
    )
    assert result.returncode != 0 and "method.latent.compression" in result.stderr
    assert "Loading weights" not in result.stderr


def build_module(tiny_pair, settings: DLRSettings, assistant_dtype: str = "float32") -> DLRModule:
    main_spec = ModelSpec(str(tiny_pair / "main"), quantization="nf4")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    assistant = load_assistant(ModelSpec(str(tiny_pair / "assistant"), dtype=assistant_dtype, lora=lora))
    main = load_main(main_spec)
    tokenizer = load_tokenizer(str(tiny_pair / "main"))
    return DLRModule(
        main,
        tokenizer,
        assistant,
        tokenizer,
        PromptFormat(template="{question} answer :"),
        settings,
        reward_from_yaml(),
        "<lat>",
        main_sha256=weights_sha256(main),
    )


@pytest.mark.parametrize(
    ("readout", "projector", "num_modes", "ppo_epochs", "contrastive"),
    [
        ("rationale", "mlp", 1, 1, "dispersion"),
        ("answer", "mlp", 1, 1, "reward_infonce"),
        ("answer", "soft_tokens", 1, 2, "dispersion"),
        ("rationale", "mlp", 2, 2, "reward_infonce"),
    ],
)
def test_both_stages_train_exactly_the_dlr_parameters_and_never_the_main_model(
    tiny_pair, tmp_path, readout, projector, num_modes, ppo_epochs, contrastive
):
    """rationale: parallel chains; answer: recurrent chains with a stop head (stage 1: chain
    distillation, closed loop included), rolled out with chains of their own lengths; each with the
    paper's dispersion term or our reward-aware InfoNCE (which rolls out the anchors' mean chain)."""
    settings = settings_from_yaml(
        DLRSettings,
        "dlr",
        {
            "readout": readout,
            "latent": {"steps": 3, "max_steps": 3, "dim": 8, "num_modes": num_modes, "projector": projector},
            "alignment": {"steps": 2, "answer_weight": 1.0},  # recurrent: the closed-loop term too
            "rl": {
                "steps": 3,
                "num_samples": 6,
                "num_decoded": 3,
                "lr": 1e-4,
                "beta": 0.01,
                "lambda_ent": 0.01,
                "ppo_epochs": ppo_epochs,
                "contrastive": contrastive,
            },
            "critic": {"hidden": 16, "warmup": 1},
            "max_new_tokens": {"rationale": 3, "answer": 2},
        },
    )
    module = build_module(tiny_pair, settings)  # an untrained backbone: rewards are mostly equal, so the
    # entropy bonus is what moves log sigma (the policy gradient is zero on zero-spread groups)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    main_hash = weights_sha256(module.main)
    data = ReasoningDataModule(
        "mixed",
        4,
        [1, 2],
        [1, 1],
        train_seed=0,
        test_seed=1000,
        test_per_depth=1,
        mix_weights={"math": 0.5, "logic": 0.5},
    )
    total = settings.alignment.steps + settings.rl.steps * ppo_epochs  # each PPO epoch is an optimizer step
    trainer = quiet_cpu_trainer(tmp_path, total)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == total and int(module.rl_batches) == 3

    changed = {k for k, v in module.state_dict().items() if k in before and not torch.equal(v, before[k])}
    recurrent = readout == "answer"
    trainable = {"policy.mu_head", "policy.log_sigma_head", "projector.", "critic."}
    for key in changed:
        assert (
            "lora_" in key
            or key.startswith(tuple(trainable))
            or key.startswith("reference.")
            or key in ("rl_batches", "reference_synced", "flops_spent", "generated_tokens")
            or (recurrent and key.startswith(("policy.latent_to_input", "policy.stop_head")))
            or key == "policy.mode_embeddings"
        ), key
    assert not any(k.startswith(("main.", "projector.embeddings.")) for k in changed)
    assert weights_sha256(module.main) == main_hash
    assert not any(k.startswith("policy.assistant") and "lora_" not in k for k in changed)
    moving = ("policy.mu_head", "policy.log_sigma_head", "critic.net")
    moving += ("projector.to_vocabulary",) if projector == "soft_tokens" else ("projector.net",)
    moving += ("policy.stop_head", "policy.latent_to_input") if recurrent else ()
    for prefix in moving:
        assert any(k.startswith(prefix) for k in changed), prefix  # every trainable part moved
    assert any("lora_B" in k for k in changed)
    rollout = module.last_rollout
    assert rollout.z.shape[:2] == (4, 6) and rollout.z.shape[3] == 8 and rollout.rewards.shape == (4, 3)
    if recurrent:  # chains of their own lengths, at most max_steps
        lengths = rollout.step_mask.sum(-1)
        assert rollout.z.shape[2] == lengths.max() <= 3 and (lengths >= 1).all()
    else:
        assert rollout.z.shape[2] == 3 and rollout.step_mask is None
    assert ((rollout.rewards >= 0) & (rollout.rewards <= 1.2)).all()
    assert module.last_scores.shape == (4, 3, 3)  # [B, K, (correct, format, total)], question-major
    torch.testing.assert_close(module.last_scores[..., TOTAL], rollout.rewards)


def test_the_papers_algorithm_1_decodes_every_sample_and_trains_the_heads_at_their_own_rate(tiny_pair, tmp_path):
    """method=dlr_paper: all G chains decoded and rewarded, advantages over all G, one update per batch;
    rl.heads_lr gives the latent heads (the paper's projection) their own parameter group and rate."""
    settings = settings_from_yaml(
        DLRSettings,
        "dlr_paper",
        {
            "latent": {"steps": 2, "dim": 8},
            "alignment": {"steps": 1},
            "rl": {"steps": 2, "num_samples": 4, "num_decoded": 4, "lr": 1e-4, "heads_lr": 1e-3},
            "critic": {"hidden": 8},
            "max_new_tokens": {"rationale": 3, "answer": 2},
        },
    )
    rl = settings.rl
    assert (rl.filter, rl.scale, rl.ppo_epochs, rl.contrastive, rl.contrastive_normalize) == (
        "none",
        "group",
        1,
        "dispersion",
        False,
    )
    assert (rl.beta, rl.lambda_con, rl.lambda_ent, settings.critic.weight) == (0.01, 0.1, 0.0, 0.0)
    module = build_module(tiny_pair, settings)
    data = ReasoningDataModule("mixed", 2, [1, 1], [1, 1], 0, 1000, 1, {"math": 0.5, "logic": 0.5})
    trainer = quiet_cpu_trainer(tmp_path, 3)
    trainer.fit(module, datamodule=data)
    rollout = module.last_rollout
    assert rollout.kept.tolist() == [[0, 1, 2, 3]] * 2 and rollout.rewards.shape == (2, 4)
    assistant_group, heads_group, critic_group = module.optimizers()[1].param_groups
    assert (assistant_group["lr"], heads_group["lr"]) == (1e-4, 1e-3)
    heads = {id(p) for p in module.policy.parameters() if p.requires_grad} - {
        id(p) for p in module.policy.assistant.parameters()
    }
    assert {id(p) for p in heads_group["params"]} == heads
    assert {id(p) for p in module.policy.mu_head.parameters()} <= heads
    assert {id(p) for p in critic_group["params"]} == {id(p) for p in module.critic.parameters()}


@pytest.mark.parametrize("mode", ["parallel", "recurrent"])
def test_a_charged_decode_counts_the_projector_and_the_main_head_only_at_new_tokens(tiny_pair, monkeypatch, mode):
    settings = settings_from_yaml(
        DLRSettings,
        "dlr",
        {
            "readout": "answer" if mode == "recurrent" else "rationale",
            "latent": {
                "steps": 3,
                "max_steps": 3,
                "dim": 8,
                "mode": mode,
                "projector": "soft_tokens" if mode == "recurrent" else "mlp",
            },
            "critic": {"hidden": 16},
            "max_new_tokens": {"rationale": 5, "answer": 2},
        },
    )
    module = build_module(tiny_pair, settings)
    import dlr.methods.dlr_module as dlr_module

    shapes = []
    decode = dlr_module.greedy_decode_embeds

    def recorded_decode(main, embeds, mask, tokenizer, max_new_tokens):
        texts, ids = decode(main, embeds, mask, tokenizer, max_new_tokens)
        shapes.append((embeds.shape[0], embeds.shape[1], ids.shape[1]))  # rows, prompt positions, new tokens
        return texts, ids

    monkeypatch.setattr(dlr_module, "greedy_decode_embeds", recorded_decode)
    records = ReasoningDataModule("mixed", 2, [1, 1], [1, 1], 0, 1000, 1, {"math": 0.5, "logic": 0.5}).test_records()
    module.decode(records, torch.randn(2, 4, 3, 8), charge=True)
    ((rows, prompt, new),) = shapes
    assert rows == 8 and 1 <= new <= 5
    main, projector = module.main_cost, module.projector_cost.body
    # the projector once per latent (2*4 chains x 3); the main's body over the prefill and all new tokens
    # but the last (each is read by the next step), its head once per new token
    expected = 2 * projector * 24 + 2 * main.body * rows * (prompt + new - 1) + 2 * main.head * rows * new
    assert float(module.flops_spent) == pytest.approx(expected)
    assert main.head == module.main.get_output_embeddings().weight.numel()

    # 5 chains over 7 question tokens and T=3 latents: a recurrent rollout calls the assistant T times
    # (one logit each), a parallel or teacher-forced pass once; the latent heads run once per latent
    before = float(module.flops_spent)
    module.charge_policy(5, 7)
    assistant, heads = module.assistant_cost, module.latent_heads_cost.body
    calls = 3 if mode == "recurrent" else 1
    hand = 2 * assistant.body * 5 * 10 + 2 * assistant.head * 5 * calls + 2 * heads * 5 * 3
    assert float(module.flops_spent) - before == pytest.approx(hand)
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    fed_back_and_stop = (
        numel(module.policy.latent_to_input) + numel(module.policy.stop_head) if mode == "recurrent" else 0
    )
    assert heads == 2 * (module.policy.mu_head.weight.numel() + 8) + fed_back_and_stop
    if mode == "parallel":
        return
    # soft tokens: the vocabulary head and the [V] x [V, D] expected embedding, once per latent
    assert (
        module.projector_cost.body
        == numel(module.projector.to_vocabulary) + module.main.get_input_embeddings().weight.numel()
    )
    # a rollout of chains of 2 and 1 steps over 7 question tokens: 3 real latents, 3 assistant calls,
    # 10 + 8 positions, and the projector feeding 1 latent back (a chain's last is not fed back)
    before = float(module.flops_spent)
    rolled = LatentDistribution(
        torch.zeros(2, 1, 2, 8),
        torch.zeros(2, 1, 2, 8),
        torch.zeros(2, 4),
        step_mask=torch.tensor([[[1, 1]], [[1, 0]]]),
    )
    module.charge_rollout(2, 7, rolled)
    hand = 2 * assistant.body * 17 + 2 * assistant.head * 3 + 2 * heads * 3 + 2 * module.projector_cost.body * 1
    assert float(module.flops_spent) - before == pytest.approx(hand)
    # a decode of those chains projects their 3 real latents only
    before = float(module.flops_spent)
    module.decode(records[:2], torch.randn(2, 1, 2, 8), charge=True, step_mask=rolled.step_mask)
    ((rows, prompt, new),) = shapes[1:]
    decoded = (
        2 * module.projector_cost.body * 3 + 2 * main.body * rows * (prompt + new - 1) + 2 * main.head * rows * new
    )
    assert float(module.flops_spent) - before == pytest.approx(decoded)


def test_dlr_runs_end_to_end_from_the_command_line_and_resumes(tmp_path):
    """`experiment=dlr` on the shipped tiny backbone: both stages, logged rewards and diagnostics, the
    main-model hash check, a checkpoint without backbone weights, and a resume that continues it."""
    run_dir = tmp_path / "run"
    common = [
        "experiment=dlr",
        "data.test_per_depth=1",
        "data.batch_size=4",
        "method.rl.num_samples=6",
        "method.rl.num_decoded=3",
        "method.critic.warmup=1",
        "trainer.log_every_n_steps=1",
        "callbacks.reward_filter.every_n_steps=1",
        "callbacks.latent_diversity.every_n_steps=1",
        "callbacks.latent_diversity.projector_every_n_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "trainer.enable_progress_bar=false",
        "eval.modes=[direct]",
    ]
    result = run_train(
        [*common, "method.alignment.steps=2", "method.rl.steps=2", f"hydra.run.dir={run_dir}"], timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    models = {s["model"] for s in json.loads((run_dir / "eval.json").read_text())["scores"]}
    assert models == {"main/direct", "dlr/after_alignment", "dlr/final"}
    assert json.loads((run_dir / "main_sha256.json").read_text())["unchanged"] is True
    metrics = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    for key in (
        "train/align_nll",
        "train/reward",
        "train/kl",
        "train/loss/contrastive",
        "filter/precision_at_k",
        "latent/effective_rank",
        "eval_alignment/math_acc_d1",
    ):
        assert key in header, key
    reward_column = header.index("train/reward")
    assert sum(1 for row in metrics[1:] if row.split(",")[reward_column]) == 2  # one row per RL step, no stale repeats
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    keys = checkpoint["state_dict"].keys()
    assert not any(k.startswith("main.") for k in keys)
    assert all("lora_" in k for k in keys if k.startswith("policy.assistant."))

    resumed_dir = tmp_path / "resumed"
    result = run_train(
        [
            *common,
            "method.alignment.steps=2",
            "method.rl.steps=3",
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
            f"hydra.run.dir={resumed_dir}",
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5 steps" in (resumed_dir / "eval.md").read_text()
    assert "after latent alignment" not in result.stdout  # restored from the checkpoint, not re-evaluated


def test_the_answer_readout_trains_its_own_stage1_when_told_to(tmp_path):
    """`readout=answer` with init_from=null trains its stage 1 in the run, then RL, and evaluates both."""
    result = run_train(
        [
            "experiment=dlr",
            "method.readout=answer",
            "method.alignment.init_from=null",
            "method.alignment.steps=2",
            "method.rl.steps=1",
            "data.test_per_depth=1",
            "data.batch_size=4",
            "method.rl.num_samples=4",
            "method.rl.num_decoded=2",
            "callbacks.reward_filter=null",
            "callbacks.latent_diversity=null",
            "trainer.enable_progress_bar=false",
            "eval.modes=[direct]",
            f"hydra.run.dir={tmp_path}",
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((tmp_path / "eval.json").read_text())["scores"]
    latent = [s for s in scores if s["model"].startswith("dlr/")]
    assert {s["model"] for s in latent} == {"dlr/after_alignment", "dlr/final"}
    assert {s["depth"] for s in latent} == set(range(1, 9))


def test_the_shipped_stage1_fails_over_other_latent_sizes_before_training(tmp_path):
    result = run_train(["experiment=dlr", "method.latent.steps=3", f"hydra.run.dir={tmp_path}"], timeout=120)
    assert result.returncode != 0 and "this run asks for" in result.stderr


def test_real_scale_backbone_config_gives_the_reported_dlr_sizes():
    """The paper's reported setup (secondary source): G=64, Dz=512, T=32, 4 questions per batch."""
    from omegaconf import OmegaConf

    from conftest import compose_config
    from dlr.methods.grpo_module import GRPOSettings

    cfg = compose_config(["experiment=dlr", "backbone=qwen2.5-0.5b+1.5b", "data=gsm8k"])
    settings = DLRSettings.from_dict(OmegaConf.to_container(cfg.method, resolve=True))
    assert (settings.rl.num_samples, settings.latent.dim, settings.latent.steps, cfg.data.batch_size) == (
        64,
        512,
        32,
        4,
    )
    assert cfg.backbone.main.quantization == "nf4" and cfg.backbone.prompt.use_chat_template
    grpo = compose_config(["experiment=grpo", "backbone=qwen2.5-0.5b+1.5b", "data=gsm8k"])
    assert GRPOSettings.from_dict(OmegaConf.to_container(grpo.method, resolve=True)).max_new_tokens == 512


@pytest.mark.parametrize(("backbone", "main_billions"), [("qwen2.5-0.5b+1.5b", 1.54), ("qwen2.5-0.5b+7b", 7.62)])
def test_real_backbone_shapes_build_the_models_they_name(backbone, main_billions):
    """Built from the configs' shapes with no weights (meta device): the parameter counts of the hub models."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from conftest import compose_config
    from dlr.models.projector import LatentProjector

    cfg = compose_config(["experiment=dlr_vs_grpo_gsm8k", f"backbone={backbone}"])
    with torch.device("meta"):
        main = Qwen2ForCausalLM(Qwen2Config(**cfg.backbone.shapes.main))
        assistant = Qwen2ForCausalLM(Qwen2Config(**cfg.backbone.shapes.assistant))
        projector = LatentProjector(cfg.backbone.dlr_scale.latent_dim, main.config.hidden_size, target_norm=1.0)
    assert main.num_parameters() / 1e9 == pytest.approx(main_billions, rel=0.02)
    assert assistant.num_parameters() / 1e9 == pytest.approx(0.494, rel=0.02)
    assert projector.net[0].in_features == 512 and projector.net[-1].out_features == main.config.hidden_size


def test_the_papers_setup_config_gives_table_2():
    """experiment=dlr_paper_gsm8k: Table 2's d, G, T, rates, beta, gamma and batch per device on 8 devices,
    Algorithm 1 (every sample decoded), the paper's reward on <think>/<answer>, the frozen NF4 LLaMA-2-7B."""
    from omegaconf import OmegaConf

    from conftest import compose_config
    from dlr.rewards import RewardConfig

    cfg = compose_config(["experiment=dlr_paper_gsm8k"])
    settings = DLRSettings.from_dict(OmegaConf.to_container(cfg.method, resolve=True))
    rl, latent = settings.rl, settings.latent
    assert (latent.dim, rl.num_samples, rl.num_decoded, latent.steps, latent.max_steps) == (512, 64, 64, 32, 32)
    assert (rl.lr, rl.heads_lr, rl.beta, rl.lambda_con) == (3e-5, 1e-4, 0.01, 0.1)
    assert (rl.contrastive, rl.contrastive_normalize, rl.filter, rl.scale, rl.ppo_epochs) == (
        "dispersion",
        False,
        "none",
        "group",
        1,
    )
    assert (cfg.data.batch_size, cfg.trainer.devices, cfg.trainer.strategy, rl.steps) == (4, 8, "ddp", 701)
    assert rl.steps == math.ceil(3 * 7473 / (4 * 8))  # 3 epochs of GSM8K's training split
    assert (cfg.data.source, cfg.data.test_size) == ("gsm8k", 1319)
    reward = RewardConfig.from_dict(OmegaConf.to_container(cfg.reward, resolve=True))
    assert (reward.signed, reward.structure, reward.w_correct) == (True, "tags", 1.0)
    backbone = cfg.backbone
    assert (backbone.main.name_or_path, backbone.main.quantization) == ("meta-llama/Llama-2-7b-hf", "nf4")
    assert backbone.assistant.name_or_path == "princeton-nlp/Sheared-LLaMA-1.3B"
    assert not backbone.prompt.use_chat_template and "<think>" in backbone.prompt.template


def test_the_papers_backbone_shapes_build_llama2_7b_and_sheared_llama_1_3b():
    """Built from the config's shapes with no weights (meta device): LLaMA-2-7B's 6.74B parameters and
    Sheared-LLaMA-1.3B's 1.35B (by hand: 2 * 32000 * 2048 embeddings and head + 24 layers of
    4 * 2048^2 attention + 3 * 2048 * 5504 MLP + 2 * 2048 norms, + 2048), and the latent sizes between them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import compose_config
    from dlr.models.projector import LatentProjector

    cfg = compose_config(["experiment=dlr_paper_gsm8k"])
    with torch.device("meta"):
        main = LlamaForCausalLM(LlamaConfig(**cfg.backbone.shapes.main))
        assistant = LlamaForCausalLM(LlamaConfig(**cfg.backbone.shapes.assistant))
        projector = LatentProjector(cfg.backbone.dlr_scale.latent_dim, main.config.hidden_size, target_norm=1.0)
    assert main.num_parameters() / 1e9 == pytest.approx(6.74, rel=0.005)
    by_hand = 2 * 32000 * 2048 + 24 * (4 * 2048**2 + 3 * 2048 * 5504 + 2 * 2048) + 2048
    assert assistant.num_parameters() == by_hand and by_hand / 1e9 == pytest.approx(1.345, rel=0.001)
    assert main.config.vocab_size == assistant.config.vocab_size == 32000  # one tokenizer
    assert (main.config.hidden_size, assistant.config.hidden_size) == (4096, 2048)
    assert projector.net[0].in_features == 512 and projector.net[-1].out_features == 4096


@pytest.mark.parametrize("mode", ["parallel", "recurrent"])
def test_a_bf16_assistant_gives_float32_gaussians_and_evaluates(tiny_pair, mode):
    """Real assistants run in bf16 outside autocast during evaluation: heads, critic and projector still work."""
    import random

    from dlr.data.synthetic_math import generate

    settings = settings_from_yaml(
        DLRSettings,
        "dlr",
        {
            "readout": "answer" if mode == "recurrent" else "rationale",
            "latent": {"steps": 2, "max_steps": 4, "dim": 8, "mode": mode},
            "critic": {"hidden": 8},
            "max_new_tokens": {"rationale": 3, "answer": 2},
        },
    )
    module = build_module(tiny_pair, settings, assistant_dtype="bfloat16")
    records = [generate(random.Random(i), 1, i, "t") for i in range(3)]
    ids, mask = module.encode_questions(records)
    chain = module.policy.mean_chain(ids, mask, module.projector).mu
    assert chain.dtype == torch.float32
    if mode == "parallel":
        dist = module.policy(ids, mask)
        z, _ = module.policy.sample(dist, 4)
        assert module.critic(dist.pooled, z).shape == (3, 4)
    scores = module.evaluate_latent(records, "dlr/bf16", batch_size=3)
    assert sum(s.n for s in scores) == 3


def test_an_injected_nan_skips_one_step_and_training_goes_on(tiny_pair, tmp_path):
    from dlr.methods.guard import NonFiniteGuard

    settings = settings_from_yaml(
        DLRSettings,
        "dlr",
        {
            "latent": {"steps": 2, "dim": 8},
            "alignment": {"steps": 2},
            "rl": {"steps": 2, "num_samples": 4, "num_decoded": 2, "lr": 1e-4, "beta": 0.0},
            "critic": {"hidden": 8},
            "max_new_tokens": {"rationale": 3, "answer": 2},
        },
    )
    module = build_module(tiny_pair, settings)
    module.guard = NonFiniteGuard(3, inject_at_step=1, inject_times=1)
    data = ReasoningDataModule(
        "mixed",
        2,
        [1, 1],
        [1, 1],
        train_seed=0,
        test_seed=1000,
        test_per_depth=1,
        mix_weights={"math": 0.5, "logic": 0.5},
    )
    trainer = quiet_cpu_trainer(tmp_path, 4)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4 and module.guard.skipped == 1 and module.guard.consecutive == 0
    assert all(torch.isfinite(p).all() for p in module.parameters() if p.requires_grad)


def test_evaluation_decodes_with_the_evaluation_budget_and_rollouts_with_the_training_one(tiny_pair, monkeypatch):
    """DLR's greedy and sampled evaluation give the main `method.eval_max_new_tokens` (in a comparison the
    `eval.max_new_tokens` GRPO's evaluation gets), its training rollouts `method.max_new_tokens`: before, DLR was
    evaluated at the training budget, which cut its depth-8 chains where GRPO's had room."""
    settings = settings_from_yaml(
        DLRSettings,
        "dlr",
        {
            "latent": {"steps": 3, "max_steps": 3, "dim": 8},
            "critic": {"hidden": 16},
            "max_new_tokens": {"rationale": 5, "answer": 2},
            "eval_max_new_tokens": {"rationale": 9, "answer": 2},
        },
    )
    module = build_module(tiny_pair, settings)
    import dlr.methods.dlr_module as dlr_module

    budgets = []
    decode = dlr_module.greedy_decode_embeds

    def recorded_decode(main, embeds, mask, tokenizer, max_new_tokens):
        budgets.append(max_new_tokens)
        return decode(main, embeds, mask, tokenizer, max_new_tokens)

    monkeypatch.setattr(dlr_module, "greedy_decode_embeds", recorded_decode)
    records = ReasoningDataModule("mixed", 2, [1, 1], [1, 1], 0, 1000, 1, {"math": 0.5, "logic": 0.5}).test_records()
    module.decode(records, torch.randn(2, 4, 3, 8), charge=True)
    module.evaluate_latent(records, "dlr", batch_size=8)
    module.sample_attempts(records, 2)
    assert budgets == [5, 9, 9]
    assert (
        compose_config(["experiment=dlr_vs_grpo"]).method.dlr.eval_max_new_tokens.rationale == 96
    )  # eval.max_new_tokens

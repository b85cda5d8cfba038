"""The benchmarks run on the CPU in CI size and write well-formed results (timings are not checked)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("bench", ROOT / "src" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

SMALL = [
    "--device",
    "cpu",
    "--repeats",
    "1",
    "--B",
    "2",
    "--G",
    "4",
    "--K",
    "2",
    "--T",
    "2",
    "--Dz",
    "8",
    "--grpo-new-tokens",
    "6",
    "--dlr-decode-tokens",
    "2",
]


def test_rollout_compares_both_arms_per_attempt(tmp_path):
    result = bench.main(["rollout", *SMALL, "--out", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["dlr_seconds_per_attempt"] > 0 and saved["grpo_seconds_per_attempt"] > 0
    assert saved["grpo_over_dlr"] == pytest.approx(saved["grpo_seconds_per_attempt"] / saved["dlr_seconds_per_attempt"])
    assert (saved["G"], saved["K"], saved["backbone"]) == (4, 2, "tiny") and saved["device"].startswith("CPU")


def test_decode_reports_each_batch_against_the_bandwidth_floor(tmp_path):
    result = bench.main(
        ["decode", *SMALL, "--batch-sizes", "2", "4", "--prompt-tokens", "8", "--out", str(tmp_path / "d.json")]
    )
    assert [r["batch"] for r in result["rows"]] == [2, 4]
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0
        assert row["floor_tokens_per_s"] == pytest.approx(
            row["batch"] * result["copy_bandwidth_bytes_per_s"] / result["weight_bytes"]
        )
        assert row["fraction_of_floor"] == pytest.approx(row["tokens_per_s"] / row["floor_tokens_per_s"])


def test_memory_runs_one_step_of_each_arm(tmp_path):
    result = bench.main(["memory", *SMALL, "--out", str(tmp_path / "m.json")])
    assert result["dlr_peak_gb"] > 0 and result["grpo_peak_gb"] > 0 and "RSS" in result["measure"]


def test_a_real_shape_builds_with_random_weights_and_loads_in_nf4(tmp_path):
    from dlr.benchmarks import random_weights_folder
    from dlr.models.backbones import ModelSpec, load_main

    shape = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "tie_word_embeddings": True,
    }
    folder = random_weights_folder("qwen2", shape, tmp_path / "main")
    main = load_main(ModelSpec(folder, quantization="nf4"))
    assert main.config.num_key_value_heads == 2 and getattr(main, "is_loaded_in_4bit", False)


def test_probe_scores_every_span_of_both_readouts_by_task_and_depth(tmp_path):
    """One problem per task and depth, every span of both readouts, the shipped stage 1s among them. The
    testbed main is only partly right, so its accuracies are not pinned here; what holds by construction
    is: given the whole gold chain, the main only has to copy its last number."""
    result = bench.main(["probe", "--device", "cpu", "--T", "4", "--per-depth", "1", "--out", str(tmp_path / "p.json")])
    by = {(s["model"], s["task"], s["depth"]): s["accuracy"] for s in result["scores"]}
    assert all(by[("answer/gold chain (c=1)", "math", d)] == 1.0 for d in range(1, 5))
    models = {m for m, _, _ in by}
    assert {
        "rationale/no latents (own chain)",
        "rationale/4 random latents",
        "rationale/untrained policy",
        "rationale/shipped stage 1",
        "answer/empty span (direct)",
        "answer/shipped stage 1",
        "answer/assistant's text chain as soft tokens (untrained, ends at its <eol>)",
    } <= models
    assert {d for _, _, d in by} == set(range(1, 9)) and all(0.0 <= a <= 1.0 for a in by.values())


@pytest.mark.parametrize("readout", ["rationale", "answer"])
def test_explore_reports_spread_and_accuracy_by_sigma(tmp_path, readout):
    result = bench.main(
        ["explore", "--device", "cpu", "--G", "2", "--per-depth", "2", "--sigmas", "1.0", "--depths", "1", "5",
         "--readout", readout, "--out", str(tmp_path / "e.json")]
    )  # fmt: skip
    rows = {(r["sigma"], r["depth"]): r for r in result["rows"]}
    assert set(rows) == {(0.0, 1), (0.0, 5), (1.0, 1), (1.0, 5)}
    for depth in (1, 5):  # the mean chain is decoded once: no spread, no movement
        assert rows[(0.0, depth)]["groups_with_spread"] == 0.0 and rows[(0.0, depth)]["latent_moved"] == 0.0
        assert rows[(1.0, depth)]["latent_moved"] > 0.0
    if readout == "answer":  # a recurrent chain: about one latent per gold-chain token (9 per math step)
        assert 5 <= rows[(0.0, 1)]["chain_length"] <= 13


def test_compress_chain_averages_runs_of_c_tokens_and_rescales_each_mean():
    import torch

    from dlr.probes import compress_chain

    chain = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [3.0, 4.0]])  # 5 tokens, D=2
    # means of (1,2), (3,4), (5): [2, 0], [0, 3], [3, 4]; norms 2, 3, 5; rescaled to norm 10
    expected = torch.tensor([[10.0, 0.0], [0.0, 10.0], [6.0, 8.0]])
    assert torch.allclose(compress_chain(chain, 2, 10.0), expected)
    # c=4: means of (1-4) = [1, 1.5] (norm sqrt(3.25)) and of (5) = [3, 4] (norm 5); rescaled to norm 5
    assert torch.allclose(compress_chain(chain, 4, 5.0), torch.tensor([[5 / 3.25**0.5, 7.5 / 3.25**0.5], [3.0, 4.0]]))
    assert torch.equal(compress_chain(chain, 1, 10.0), chain)  # c=1: the embeddings as they are, not rescaled


def test_compress_rejects_a_ratio_below_one_naming_the_flag():
    import torch

    from dlr.probes import compress_chain

    with pytest.raises(ValueError, match="--ratios"):
        compress_chain(torch.zeros(3, 2), 0, 1.0)
    with pytest.raises(ValueError, match="--ratios"):  # before the backbone loads
        bench.main(["compress", "--device", "cpu", "--ratios", "1", "0", "--out", "/nonexistent/c.json"])


def test_compress_reads_the_gold_embeddings_as_the_gold_text(tmp_path):
    """One problem per task and depth: the uncompressed chain's embeddings (c=1) decode the same
    answers as the chain given as text, in one left-padded batch of spans of different lengths."""
    result = bench.main(["compress", "--device", "cpu", "--per-depth", "1", "--json", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text()) == json.loads(json.dumps(result))
    by = {(s["model"], s["task"], s["depth"]): s["accuracy"] for s in result["scores"]}
    models = {m for m, _, _ in by}
    assert models == {
        "gold chain as text (ceiling)",
        "gold embeddings, c=1 (as is)",
        "gold embeddings, c=2 (means)",
        "gold embeddings, c=4 (means)",
        "random span (c=1 length)",
        "empty span (direct)",
    }
    cells = {(t, d) for _, t, d in by}
    assert cells == {(t, d) for t in ("logic", "math") for d in range(1, 9)}
    assert result["c1_matches_text"] == 1.0
    for task, depth in cells:
        assert by[("gold embeddings, c=1 (as is)", task, depth)] == by[("gold chain as text (ceiling)", task, depth)]
    assert by[("gold chain as text (ceiling)", "math", 1)] == 1.0
    lengths = {(r["task"], r["depth"]): r for r in result["lengths"]}
    assert set(lengths) == cells
    assert set(lengths[("math", 1)]) == {"task", "depth", "chain_tokens", "span_c2", "span_c4"}
    for row in lengths.values():  # one problem per cell: the latents are ceil(tokens / c)
        assert row["span_c2"] == -(-row["chain_tokens"] // 2) and row["span_c4"] == -(-row["chain_tokens"] // 4)


def test_unbiased_pass_at_k_and_spread_match_hand_counts():
    from dlr.probes import spread_at_k
    from dlr.scoring import unbiased_pass_at_k

    assert unbiased_pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert unbiased_pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)  # 1 - C(6,4)/C(8,4)
    assert unbiased_pass_at_k(5, 3, 1) == pytest.approx(3 / 5)  # pass@1 is the fraction right
    assert unbiased_pass_at_k(4, 0, 4) == 0.0 and unbiased_pass_at_k(4, 4, 1) == 1.0
    assert spread_at_k(4, 2, 2) == pytest.approx(1 - (1 + 1) / 6)  # 1 - [C(2,2) + C(2,2)] / C(4,2)
    assert spread_at_k(8, 1, 8) == 1.0 and spread_at_k(8, 0, 8) == 0.0 and spread_at_k(8, 8, 4) == 0.0
    with pytest.raises(ValueError, match="1 <= k <= n"):
        unbiased_pass_at_k(4, 1, 5)


def test_frontier_rows_average_each_task_and_depth_over_its_problems():
    from dlr.data.schema import Record
    from dlr.probes import frontier_rows

    def rec(i, depth):
        return Record(id=str(i), task="math", question=f"q{i}", cot="", answer="1", depth=depth, source="s")

    records = [rec(0, 1), rec(1, 1), rec(2, 2)]
    rows = frontier_rows("x", records, [True, False, False], [4, 1, 0], samples=4, ks=[2])
    assert [(r["depth"], r["problems"]) for r in rows] == [(1, 2), (2, 1)]
    d1 = rows[0]
    assert d1["greedy"] == 0.5 and d1["pass@1"] == pytest.approx((4 / 4 + 1 / 4) / 2)
    assert d1["pass@2"] == pytest.approx((1.0 + 0.5) / 2)  # c=4: 1; c=1: 1 - C(3,2)/C(4,2) = 0.5
    assert d1["spread@2"] == pytest.approx((0.0 + 0.5) / 2)  # c=1 of 4: 1 - [0 + C(3,2)] / C(4,2) = 0.5
    assert rows[1]["pass@2"] == 0.0 and rows[1]["spread@2"] == 0.0


def test_frontier_scores_the_main_and_both_readouts_greedy_and_sampled(tmp_path):
    result = bench.main(
        ["frontier", "--device", "cpu", "--per-depth", "1", "--samples", "2", "--ks", "1", "2",
         "--out", str(tmp_path / "f.json")]
    )  # fmt: skip
    sources = list(dict.fromkeys(r["source"] for r in result["rows"]))
    assert sources == ["main text chain (T=1)", "DLR rationale readout (sigma=1)", "DLR answer readout (sigma=1)"]
    assert len(result["rows"]) == 3 * 2 * 8  # sources x tasks x depths
    for row in result["rows"]:
        assert row["pass@1"] <= row["pass@2"] <= 1.0 and 0.0 <= row["spread@2"] <= row["pass@2"]
    with pytest.raises(ValueError, match="--ks"):
        bench.main(["frontier", "--device", "cpu", "--per-depth", "1", "--samples", "2", "--ks", "3"])


def test_sweep_ranks_jobs_by_final_accuracy_at_their_trained_depths(tmp_path):
    """Two finished jobs of a Hydra sweep (and one that did not finish): each row's start and final are the
    means over the trained depths 1-2 only; the untrained depth 3 is read by neither."""
    for job, lr, start, final in (
        ("0", "3e-5", [0.5, 0.3, 0.9], [0.6, 0.4, 0.0]),
        ("1", "1e-4", [0.5, 0.3, 0.9], [0.8, 0.5, 0.0]),
    ):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- method.grpo.lr={lr}\n")
        (tmp_path / job / "config_resolved.yaml").write_text("data:\n  train_depths: [1, 2]\n  test_seed: 2000\n")
        by_depth = lambda values: {str(d + 1): v for d, v in enumerate(values)}  # noqa: E731
        summary = {"arms": {"grpo": {"start_accuracy_by_depth": by_depth(start), "accuracy_by_depth": by_depth(final)}}}
        (tmp_path / job / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "2").mkdir()  # a job still running: no summary.json yet
    rows = bench.main(["sweep", str(tmp_path)])["rows"]
    assert [r["overrides"] for r in rows] == ["method.grpo.lr=1e-4", "method.grpo.lr=3e-5"]
    assert rows[0]["start"] == pytest.approx(0.4) and rows[0]["final"] == pytest.approx(0.65)
    assert rows[0]["gain"] == pytest.approx(0.25) and rows[1]["final"] == pytest.approx(0.5)
    assert rows[0]["test_seed"] == 2000 and rows[0]["trained_depths"] == "1-2"
    with pytest.raises(SystemExit, match="no finished job"):
        bench.main(["sweep", str(tmp_path / "2")])

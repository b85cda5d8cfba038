"""Performance benchmarks: each sub-command prints a table and writes JSON (docs/design.md §11).

python src/bench.py rollout                      # DLR vs GRPO seconds per attempt, tiny backbone
python src/bench.py decode --batch-sizes 16 64 256 --backbone qwen2.5-0.5b+1.5b --device cuda
python src/bench.py memory --backbone qwen2.5-0.5b+7b --device cuda --G 64 --K 16 --T 32
python src/bench.py probe --T 4                  # what the frozen tiny main reads in its latent span, by readout
python src/bench.py explore --G 8 [--readout answer]  # reward spread and accuracy of noisy latents, by sigma and depth
python src/bench.py compress --ratios 1 2 4      # answer readout: the gold chain's embeddings, c tokens per latent
python src/bench.py frontier --per-depth 50 --samples 16  # greedy, pass@1 and pass@k by task and depth: main text chain, DLR readouts
python src/bench.py sweep logs/sweep_grpo/multirun_<time>  # a Hydra sweep of the comparison, ranked on its validation set
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "src"))  # run from a checkout without `pip install -e .`


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(
        ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        + ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "command", choices=["rollout", "decode", "memory", "probe", "explore", "compress", "frontier", "sweep"]
    )
    parser.add_argument("folder", nargs="?", default=None, help="sweep: the multirun folder to rank")
    parser.add_argument("--backbone", default="tiny", help="a configs/backbone name; real ones get random weights")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument(
        "--out", "--json", dest="out", default=None, help="JSON path (default logs/bench/<timestamp>/<command>.json)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median reported)")
    parser.add_argument("--B", type=int, default=4, help="questions per batch")
    parser.add_argument("--G", type=int, default=16, help="DLR latents sampled per question")
    parser.add_argument("--K", type=int, default=4, help="attempts decoded per question (both arms)")
    parser.add_argument("--T", type=int, default=8, help="DLR latent steps")
    parser.add_argument("--Dz", type=int, default=64, help="DLR latent width")
    parser.add_argument(
        "--readout", choices=["rationale", "answer"], default="rationale", help="rollout, explore: DLR's readout"
    )
    parser.add_argument(
        "--dlr-decode-tokens",
        type=int,
        default=None,
        help="DLR's decode per chain (default: rationale = GRPO's, answer 4)",
    )
    parser.add_argument("--grpo-new-tokens", type=int, default=64, help="GRPO completion length")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64], help="decode: batch sizes")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="decode: prompt length")
    parser.add_argument(
        "--per-depth", type=int, default=20, help="probe, explore, compress: test problems per task and depth"
    )
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.37, 1.0, 2.0, 4.0], help="explore: latent noise")
    parser.add_argument(
        "--ratios", type=int, nargs="+", default=[1, 2, 4], help="compress: chain tokens averaged into one latent"
    )
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 4, 5, 6], help="explore: math depths")
    parser.add_argument("--samples", type=int, default=16, help="frontier: sampled attempts per test problem")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8], help="frontier: k of the unbiased pass@k")
    parser.add_argument("--sigma", type=float, default=1.0, help="frontier: DLR's latent sigma (stage 2's start)")
    parser.add_argument("--temperature", type=float, default=1.0, help="frontier: the main's sampling temperature")
    parser.add_argument("--test-seed", type=int, default=1000, help="frontier: 1000 is the fixed test set")
    args = parser.parse_args(argv)
    if args.command == "sweep":  # reads a finished sweep: no backbone, no device
        from dlr.report.sweep import sweep_rows

        if args.folder is None:
            parser.error("sweep needs the multirun folder: python src/bench.py sweep logs/sweep_grpo/multirun_<time>")
        rows = sweep_rows(Path(args.folder))
        print(table(rows))
        return {"folder": args.folder, "rows": rows}

    import torch

    from dlr import benchmarks, probes

    if args.command == "compress":  # a bad --ratios fails before the backbone loads
        for ratio in args.ratios:
            probes.check_ratio(ratio)
    if args.command == "frontier" and not all(1 <= k <= args.samples for k in args.ks):
        raise ValueError(f"--ks: each k must lie in 1..--samples ({args.samples}), got {args.ks}")
    torch.manual_seed(0)
    bb = benchmarks.load_backbone(args.backbone, args.device)
    if args.command == "rollout":
        decode_tokens = args.dlr_decode_tokens or (args.grpo_new_tokens if args.readout == "rationale" else 4)
        result = benchmarks.bench_rollout(
            bb, args.B, args.G, args.K, args.T, args.Dz, decode_tokens, args.grpo_new_tokens, args.repeats, args.readout
        )
        rows = [result]
    elif args.command == "decode":
        result = benchmarks.bench_decode(bb, args.batch_sizes, args.prompt_tokens, args.grpo_new_tokens, args.repeats)
        rows = result["rows"]
    elif args.command == "explore":
        stage1_root = PROJECT_ROOT / "data" / "backbones" / "tiny" / "dlr_stage1"
        result = probes.probe_exploration(
            bb, stage1_root, args.sigmas, args.per_depth, args.G, args.depths, args.readout
        )
        rows = result["rows"]
    elif args.command == "probe":
        from dlr.scoring import DepthScore, depth_table

        stage1_root = PROJECT_ROOT / "data" / "backbones" / "tiny" / "dlr_stage1"
        result = probes.probe_readouts(bb, args.per_depth, args.T, args.Dz, stage1_root)
        rows = None
        print(depth_table([DepthScore(**s) for s in result["scores"]]))
    elif args.command == "frontier":
        stage1_root = PROJECT_ROOT / "data" / "backbones" / "tiny" / "dlr_stage1"
        result = probes.probe_frontier(
            bb, stage1_root, args.per_depth, args.samples, args.ks, args.sigma, args.temperature, args.test_seed
        )
        rows = None
        print(probes.frontier_table(result))
    elif args.command == "compress":
        result = probes.probe_compression(bb, args.per_depth, args.ratios)
        rows = None
        print(probes.compression_tables(result))
    else:
        result = benchmarks.bench_memory(bb, args.B, args.G, args.K, args.T, args.Dz, args.K, args.grpo_new_tokens)
        rows = [result]
    result["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else _cpu_name()
    out = (
        Path(args.out)
        if args.out
        else PROJECT_ROOT / "logs" / "bench" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S") / f"{args.command}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    shown = f"\n{table(rows)}" if rows else ""
    print(f"{args.command} on {result['device']}, backbone {args.backbone}{shown}\nwritten to {out}")
    return result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cpu_name() -> str:
    from dlr.runner.common import device_name

    return device_name("cpu")


if __name__ == "__main__":
    main()

"""What the frozen main can read and how much spread latent noise buys (docs/design.md §7):
`src/bench.py probe|explore|compress|frontier`. Each probe scores greedy (or noisy) decodes on the fixed
test set by task and depth, before any RL, on a backbone loaded by `dlr.benchmarks.load_backbone`.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from pathlib import Path

import torch

from dlr.benchmarks import Backbone, dlr_module
from dlr.config import reward_from_yaml
from dlr.data.datamodule import ReasoningDataModule
from dlr.methods.losses import compress_chain_embeddings
from dlr.methods.stage1 import STAGE1_COMMANDS, load_stage1
from dlr.models.backbones import weights_sha256
from dlr.models.generation import greedy_complete, greedy_decode_embeds, sample_completions
from dlr.models.projector import mean_embedding_norm
from dlr.models.readout import Readout, latent_main_inputs
from dlr.rewards import CORRECT
from dlr.scoring import evaluate_by_depth, score_by_depth, unbiased_pass_at_k


def mixed_test_set(per_depth: int, test_seed: int = 1000) -> list:
    """The probes' records: math and logic at depths 1-8, `per_depth` each; seed 1000 is the fixed test set."""
    data = ReasoningDataModule("mixed", 1, [1, 4], [1, 8], 0, test_seed, per_depth, {"math": 0.5, "logic": 0.5})
    return data.test_records()


def probe_readouts(bb: Backbone, per_depth: int, latent_steps: int, latent_dim: int, stage1_root: Path) -> dict:
    """What the frozen main model can read in its latent span: greedy accuracy by task and depth of
    the fixed test set under each readout, for spans the project can make before any RL: no latents
    (its own text chain, or direct answering), T random vectors at the mean embedding norm, the
    untrained policy and projector, the shipped stage 1 (where one exists for that readout) and, as
    the ceiling, the gold chain's own tokens (its first T, or all of it; given as text, which equals
    giving their embeddings)."""

    records = mixed_test_set(per_depth)
    main_sha = weights_sha256(bb.main)
    scores = []
    for readout in ("rationale", "answer"):
        scores += _probe_readout(bb, readout, records, latent_steps, latent_dim, stage1_root / readout, main_sha)
    return {"per_depth": per_depth, "T": latent_steps, "scores": [s.__dict__ for s in scores]}


@torch.no_grad()
def _probe_readout(
    bb: Backbone, readout: str, records: list, latent_steps: int, latent_dim: int, stage1: Path, main_sha: str
) -> list:

    tok, fmt, n = bb.main_tokenizer, bb.fmt, len(records)
    reward = reward_from_yaml()
    module = dlr_module(bb, 4, 1, latent_steps, latent_dim, 96 if readout == "rationale" else 4, readout)
    module.main_sha256 = main_sha
    decode_tokens = module.readout.max_new_tokens

    def text_span(label: str, span_text) -> list:
        def complete(chunk):
            tail = "" if readout == "rationale" else f" {fmt.eol} {fmt.answer_cue}"
            prompts = [f"{fmt.prompt(r.question, tok)} {fmt.bol} {span_text(r)}{tail}" for r in chunk]
            return [module.readout.scored_text(o) for o in greedy_complete(bb.main, tok, prompts, decode_tokens)]

        return score_by_depth(records, complete, label=label, batch_size=n, reward=reward)

    def latent_span(label: str, projected_of) -> list:
        def complete(chunk):
            questions = [r.question for r in chunk]
            embeds, mask = latent_main_inputs(bb.main, tok, module.readout, questions, projected_of(chunk))
            texts, _ = greedy_decode_embeds(bb.main, embeds, mask, tok, decode_tokens)
            return [module.readout.scored_text(t) for t in texts]

        return score_by_depth(records, complete, label=label, batch_size=n, reward=reward)

    def policy_span(chunk):
        ids, mask = module.encode_questions(chunk)
        return module.projector(module.policy.mean_chain(ids, mask).mu[:, 0])

    def random_span(chunk):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(len(chunk), latent_steps, bb.main.get_input_embeddings().embedding_dim, generator=g)
        return (x / x.norm(dim=-1, keepdim=True) * module.embedding_norm).to(bb.device)

    if readout == "rationale":
        scores = evaluate_by_depth(
            bb.main, tok, fmt, records, label="rationale/no latents (own chain)", batch_size=n, reward=reward
        )
        scores += text_span(
            f"rationale/gold chain's first {latent_steps} tokens", lambda r: " ".join(r.cot.split()[:latent_steps])
        )
    else:
        scores = evaluate_by_depth(
            bb.main,
            tok,
            fmt,
            records,
            label="answer/empty span (direct)",
            mode="direct",
            max_new_tokens=4,
            batch_size=n,
            reward=reward,
        )
        scores += text_span("answer/gold chain (c=1)", lambda r: r.cot)
        scores += score_by_depth(
            records,
            untrained_text_chain(bb),
            label="answer/assistant's text chain as soft tokens (untrained, ends at its <eol>)",
            batch_size=n,
            reward=reward,
        )
    scores += latent_span(f"{readout}/{latent_steps} random latents", random_span)
    scores += latent_span(f"{readout}/untrained policy", policy_span)
    if (stage1 / "stage1.json").is_file():  # its own latent settings (answer: a recurrent chain of its own length)
        shipped = shipped_stage1_module(bb, stage1.parent, readout, 1).eval()
        scores += score_by_depth(
            records, shipped.greedy_completions, label=f"{readout}/shipped stage 1", batch_size=n, reward=reward
        )
    return scores


def probe_module(bb: Backbone, changes: dict):
    """A DLR module of configs/method/dlr.yaml with `changes`, on its own copy of the assistant (loading
    or changing its adapters must not change the backbone's, which other probes read)."""
    from dlr.config import settings_from_yaml
    from dlr.methods.dlr_module import DLRModule, DLRSettings

    return DLRModule(
        bb.main,
        bb.main_tokenizer,
        copy.deepcopy(bb.assistant),
        bb.assistant_tokenizer,
        bb.fmt,
        settings_from_yaml(DLRSettings, "dlr", changes),
        reward_from_yaml(),
        bb.placeholder,
        main_sha256=weights_sha256(bb.main),
    ).to(bb.device)


@torch.no_grad()
def shipped_stage1_module(bb: Backbone, stage1_root: Path, readout: str, samples: int):
    """A DLR module with the shipped stage 1 of `readout` loaded (its latent settings read from the
    folder's stage1.json), G = `samples` chains per question."""
    info = json.loads((stage1_root / readout / "stage1.json").read_text())
    rl = {"num_samples": samples, "num_decoded": 1, "beta": 0.0}
    module = probe_module(bb, {"readout": readout, "latent": info["latent"], "alignment": {"steps": 0}, "rl": rl})
    load_stage1(module, stage1_root, STAGE1_COMMANDS[readout])
    return module


def untrained_text_chain(bb: Backbone):
    """A decoder of records through an untrained recurrent soft-token chain started as the assistant's
    text chain (latent.init=assistant): it never stops by its (untrained) stop head and ends before its
    first soft token whose most likely token is the assistant's end-of-chain marker (backbone.prompt.eol),
    as the text chain would. No gold field is read: not even the gold chain's length, which would give a
    logic answer away (a negated last rule is one token longer)."""
    module = probe_module(bb, {"readout": "answer", "alignment": {"steps": 0}, "rl": {"num_decoded": 1, "beta": 0.0}})
    module.eval()
    with torch.no_grad():  # the untrained stop head would end chains at random
        module.policy.stop_head.weight.zero_()
        module.policy.stop_head.bias.fill_(-30.0)
    eol = bb.main_tokenizer.convert_tokens_to_ids(bb.fmt.eol)

    @torch.no_grad()
    def decode(records: list) -> list[str]:
        ids, mask = module.encode_questions(records)
        chain = module.policy.mean_chain(ids, mask, module.projector)  # [N, 1, T, Dz], T = the cap
        ends = module.projector.vocabulary_logits(chain.mu[:, 0]).argmax(-1) == eol  # [N, T]
        steps = torch.arange(ends.shape[1], device=ends.device)
        length = torch.where(ends, steps, ends.shape[1]).min(1).values.clamp(min=1)  # first <eol>, else the cap
        step_mask = (steps < length[:, None]).long()[:, None]  # [N, 1, T]
        return module.decode(records, chain.mu, step_mask=step_mask)

    return decode


def probe_exploration(
    bb: Backbone,
    stage1: Path,
    sigmas: list[float],
    per_depth: int,
    samples: int,
    depths: list[int],
    readout: str = "rationale",
) -> dict:
    """How much reward spread latent noise buys, and what it costs in accuracy: for each sigma (in the
    latent space the policy samples), `samples` chains z = mu + sigma * eps per math question of the
    fixed test set, each decoded greedily by the frozen main through the shipped stage 1 of `readout`
    (answer: recurrent chains, each sampled z_t fed back and each stop bit drawn, as stage 2 samples
    them). By depth: accuracy of the mean chain, of the sampled chains, the share of questions whose
    samples disagree in reward (the groups RL can learn from), how far the noise moves the projected
    latents (||P(z_t) - P(mu_t)|| / ||P(mu_t)||, mu_t the mean given the sampled prefix) and the
    chains' mean length."""
    module = shipped_stage1_module(bb, stage1, readout, samples)
    data = ReasoningDataModule("synthetic_math", 1, [1, 4], [min(depths), max(depths)], 0, 1000, per_depth)
    records = [r for r in data.test_records() if r.depth in depths]
    ids, mask = module.encode_questions(records)
    policy, recurrent = module.policy, module.policy.mode == "recurrent"
    rows = []
    generator = torch.Generator(device=ids.device).manual_seed(0)
    with torch.no_grad():
        for sigma in [0.0, *sigmas]:
            if recurrent:
                if sigma == 0.0:
                    dist = policy.mean_chain(ids, mask, module.projector)
                    z = dist.mu
                else:
                    policy.set_sigma(sigma)
                    z, dist = policy.sample_recurrent(ids, mask, samples, module.projector, generator)
                mu, step_mask = dist.mu, dist.step_mask  # [N, k, T, Dz], [N, k, T]
            else:
                mu = policy.mean_chain(ids, mask).mu[:, :1]  # [N, 1, T, Dz]
                noise = torch.randn((mu.shape[0], samples, *mu.shape[2:]), generator=generator, device=mu.device)
                z = mu if sigma == 0.0 else mu + sigma * noise
                step_mask = torch.ones(z.shape[:3], dtype=torch.long, device=z.device)
            k = z.shape[1]
            texts = module.decode(records, z, step_mask=step_mask if recurrent else None)  # question-major
            golds = [r.answer for r in records for _ in range(k)]
            tasks = [r.task for r in records for _ in range(k)]
            correct = reward_from_yaml().score_batch(texts, golds, tasks)[:, CORRECT].reshape(-1, k)
            moved_steps = (module.projector(z) - module.projector(mu)).norm(dim=-1) / module.projector(mu).norm(dim=-1)
            real = step_mask.float()
            moved = (moved_steps * real).sum((1, 2)) / real.sum((1, 2))  # [N]
            length = real.sum(-1).mean(-1)  # [N], mean over the question's chains
            for depth in depths:
                rows_at = [i for i, r in enumerate(records) if r.depth == depth]
                c = correct[rows_at]
                rows.append(
                    {
                        "sigma": sigma,
                        "depth": depth,
                        "accuracy": float(c.mean()),
                        "groups_with_spread": float(((c.max(1).values - c.min(1).values) > 0).float().mean()),
                        "latent_moved": float(moved[rows_at].mean()),
                        "chain_length": float(length[rows_at].mean()),
                    }
                )
    return {"readout": readout, "samples": samples, "per_depth": per_depth, "rows": rows}


def check_ratio(ratio: int) -> None:
    """A compression ratio is a whole number of chain tokens per latent, at least 1."""
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"--ratios: a compression ratio is a whole number of tokens per latent >= 1, got {ratio!r}")


def compress_chain(embeds: torch.Tensor, ratio: int, norm: float) -> torch.Tensor:
    """A chain of token embeddings [L, D] compressed `ratio` to one: the mean of each run of `ratio`
    consecutive rows (the last run may be shorter), rescaled to L2 norm `norm`; [ceil(L / ratio), D].
    At ratio 1 the embeddings come back as they are (not rescaled), so the span equals the text."""
    check_ratio(ratio)
    mask = torch.ones(1, embeds.shape[0], dtype=torch.long, device=embeds.device)
    return compress_chain_embeddings(embeds[None], mask, ratio, norm)[0][0]


def span_main_inputs(
    main: torch.nn.Module, tokenizer, readout, questions: list[str], spans: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`latent_main_inputs` for spans of different lengths (spans: N tensors [T_i, Dmain]), each row
    `before span after`, left-padded. Returns (inputs_embeds [N, L, Dmain], attention_mask [N, L])."""
    width = max(s.shape[0] for s in spans)
    projected = torch.stack([torch.nn.functional.pad(s, (0, 0, 0, width - s.shape[0])) for s in spans])
    lengths = torch.tensor([s.shape[0] for s in spans], device=projected.device)
    step_mask = (torch.arange(width, device=projected.device) < lengths[:, None]).long()  # [N, width]
    return latent_main_inputs(main, tokenizer, readout, questions, projected, step_mask)


@torch.no_grad()
def probe_compression(bb: Backbone, per_depth: int, ratios: list[int], batch_size: int = 100) -> dict:
    """What the frozen main reads in the `answer` readout (`prompt <bol> span <eol> ####`, answer at
    once) when the span holds its own input embeddings of the gold chain, compressed c to one: greedy
    accuracy by task and depth of the fixed test set (math and logic, depths 1-8, `per_depth` each)
    for each c in `ratios`, against the gold chain given as text (the ceiling), direct answering
    (empty span) and random vectors at the mean embedding norm as long as the uncompressed chain.

    The chain is `record.cot` tokenised by the main's tokenizer (with its leading space, as the
    readout's gold text has it). At c=1 the span is the chain's embeddings as they are (not rescaled):
    the same input as the text, so its accuracy should equal the ceiling's (`c1_matches_text` counts
    the problems whose decoded answers agree). At c>1 each latent is the mean of c consecutive token
    embeddings (the last group may be shorter) rescaled to the main's mean embedding norm."""

    for ratio in ratios:  # fail on a bad ratio before any decoding
        check_ratio(ratio)
    reward = reward_from_yaml()
    records = mixed_test_set(per_depth)
    tok, fmt, main = bb.main_tokenizer, bb.fmt, bb.main
    readout = Readout("answer", fmt, 4)
    norm = mean_embedding_norm(main)
    embed = main.get_input_embeddings()
    chain_ids = {r.question: tok(f" {r.cot}", add_special_tokens=False).input_ids for r in records}

    def chain(record) -> torch.Tensor:
        return embed(torch.tensor(chain_ids[record.question], device=bb.device))  # [L, D]

    def random_span(record) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(record.question.encode()))  # whatever the batching
        x = torch.randn(len(chain_ids[record.question]), embed.embedding_dim, generator=g)
        return (x / x.norm(dim=-1, keepdim=True) * norm).to(bb.device, embed.weight.dtype)

    outputs: dict[str, dict[str, str]] = {}

    def kept(label: str, complete):
        def run(chunk):
            texts = complete(chunk)
            outputs.setdefault(label, {}).update({r.question: t for r, t in zip(chunk, texts, strict=True)})
            return texts

        return run

    def span_variant(label: str, span_of) -> list:
        def complete(chunk):
            embeds, mask = span_main_inputs(
                main, tok, readout, [r.question for r in chunk], [span_of(r) for r in chunk]
            )
            texts, _ = greedy_decode_embeds(main, embeds, mask, tok, readout.max_new_tokens)
            return [readout.scored_text(t) for t in texts]

        return score_by_depth(records, kept(label, complete), label=label, batch_size=batch_size, reward=reward)

    def gold_text(chunk):
        prompts = [f"{fmt.prompt(r.question, tok)} {fmt.bol} {r.cot} {fmt.eol} {fmt.answer_cue}" for r in chunk]
        return [readout.scored_text(o) for o in greedy_complete(main, tok, prompts, readout.max_new_tokens)]

    text_label = "gold chain as text (ceiling)"
    scores = score_by_depth(
        records, kept(text_label, gold_text), label=text_label, batch_size=batch_size, reward=reward
    )
    for ratio in ratios:
        label = "gold embeddings, c=1 (as is)" if ratio == 1 else f"gold embeddings, c={ratio} (means)"
        scores += span_variant(label, lambda r, ratio=ratio: compress_chain(chain(r), ratio, norm))
    scores += span_variant("random span (c=1 length)", random_span)
    scores += evaluate_by_depth(
        main,
        tok,
        fmt,
        records,
        label="empty span (direct)",
        mode="direct",
        max_new_tokens=4,
        batch_size=batch_size,
        reward=reward,
    )
    lengths = []
    for task, depth in sorted({(r.task, r.depth) for r in records}):
        counts = [len(chain_ids[r.question]) for r in records if (r.task, r.depth) == (task, depth)]
        row = {"task": task, "depth": depth, "chain_tokens": sum(counts) / len(counts)}
        row |= {f"span_c{c}": sum(-(-n // c) for n in counts) / len(counts) for c in ratios if c > 1}
        lengths.append(row)
    result = {
        "per_depth": per_depth,
        "ratios": list(ratios),
        "embedding_norm": norm,
        "scores": [s.__dict__ for s in scores],
        "lengths": lengths,
    }
    if 1 in ratios:
        c1 = outputs["gold embeddings, c=1 (as is)"]
        result["c1_matches_text"] = sum(c1[q] == t for q, t in outputs[text_label].items()) / len(records)
    return result


def compression_tables(result: dict) -> str:
    """Markdown: one accuracy table per task (rows: span variant, columns: depth), then the gold
    chain's mean length in tokens and in latents at each c, by task and depth."""
    scores = result["scores"]
    variants = list(dict.fromkeys(s["model"] for s in scores))
    depths = sorted({s["depth"] for s in scores})
    by = {(s["model"], s["task"], s["depth"]): s["accuracy"] for s in scores}
    blocks = []
    for task in sorted({s["task"] for s in scores}):
        lines = [f"**{task}** (greedy accuracy, n={result['per_depth']} per depth)", ""]
        lines += ["| span | " + " | ".join(f"d{d}" for d in depths) + " |", "|" + "---|" * (len(depths) + 1)]
        for v in variants:
            cells = [f"{100 * by[(v, task, d)]:.0f}%" if (v, task, d) in by else "–" for d in depths]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    keys = [k for k in result["lengths"][0] if k not in ("task", "depth")]
    lines = ["**gold chain length** (mean tokens; latents at each c)", ""]
    lines += ["| task | length | " + " | ".join(f"d{d}" for d in depths) + " |", "|" + "---|" * (len(depths) + 2)]
    rows = {(r["task"], r["depth"]): r for r in result["lengths"]}
    for task in sorted({r["task"] for r in result["lengths"]}):
        for k in keys:
            name = "tokens" if k == "chain_tokens" else f"latents at c={k.removeprefix('span_c')}"
            cells = [f"{rows[(task, d)][k]:.1f}" if (task, d) in rows else "–" for d in depths]
            lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    blocks.append("\n".join(lines))
    if "c1_matches_text" in result:
        blocks.append(f"c=1 embeddings and gold text decode the same answer on {100 * result['c1_matches_text']:.1f}%")
    return "\n\n".join(blocks)


def spread_at_k(n: int, c: int, k: int) -> float:
    """The chance that a group of k of the n attempts (drawn without replacement) disagrees in
    correctness, i.e. gives GRPO-style advantages a non-zero spread: 1 - [C(c, k) + C(n-c, k)] / C(n, k)."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"spread@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    return 1.0 - (math.comb(c, k) + math.comb(n - c, k)) / math.comb(n, k)


def frontier_rows(
    label: str, records: list, greedy: list[bool], correct_counts: list[int], samples: int, ks: list[int]
) -> list[dict]:
    """One row per (task, depth): greedy accuracy, pass@1 at the sampler's own noise (the mean fraction
    of the n samples that are right, as DeepSeek-R1 reports it), unbiased pass@k for each k and the
    chance that a group of max(ks) samples has reward spread."""
    group = max(ks)
    rows = []
    for task, depth in sorted({(r.task, r.depth) for r in records}):
        at = [i for i, r in enumerate(records) if (r.task, r.depth) == (task, depth)]
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        row = {"source": label, "task": task, "depth": depth, "problems": len(at)}
        row["greedy"] = mean([float(greedy[i]) for i in at])
        row["pass@1"] = mean([correct_counts[i] / samples for i in at])
        for k in ks:
            row[f"pass@{k}"] = mean([unbiased_pass_at_k(samples, correct_counts[i], k) for i in at])
        row[f"spread@{group}"] = mean([spread_at_k(samples, correct_counts[i], group) for i in at])
        rows.append(row)
    return rows


@torch.no_grad()
def probe_frontier(
    bb: Backbone,
    stage1_root: Path,
    per_depth: int,
    samples: int,
    ks: list[int],
    sigma: float,
    temperature: float,
    test_seed: int,
    batch_size: int = 32,
) -> dict:
    """Where each policy stands before any RL, by task and depth of a test set (test_seed 1000 is the
    fixed one): its greedy accuracy (the test metric), pass@1 over `samples` attempts at its own sampling
    noise and unbiased pass@k (what RL can draw on), and how often a group of max(ks) attempts has reward
    spread (what a group-relative advantage can learn from). The policies: the main's own text chain
    (greedy, and sampled at `temperature` as GRPO samples it) and each DLR readout through its shipped
    stage 1 (the noise-free chain decoded once, and `samples` latent chains at `sigma` each decoded once
    greedily, as DLR's stage 2 starts)."""
    for k in ks:
        if not 1 <= k <= samples:
            raise ValueError(f"--ks: each k must lie in 1..--samples ({samples}), got {k}")
    reward = reward_from_yaml()
    records = mixed_test_set(per_depth, test_seed)
    tok, fmt = bb.main_tokenizer, bb.fmt
    decode_tokens = 96  # eval.max_new_tokens: depth-8 chains need about 80

    def right(texts: list[str], chunk: list) -> list[bool]:
        return [reward.score(t, r.answer, r.task).correct for t, r in zip(texts, chunk, strict=True)]

    def measured(label: str, greedy_of, samples_of) -> list[dict]:
        greedy, counts = [], []
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            greedy += right(greedy_of(chunk), chunk)
            attempts = samples_of(chunk)  # len(chunk) lists of `samples` texts
            counts += [round(sum(right(a, [r] * samples))) for a, r in zip(attempts, chunk, strict=True)]
        return frontier_rows(label, records, greedy, counts, samples, ks)

    def main_greedy(chunk):
        return greedy_complete(bb.main, tok, [fmt.prompt(r.question, tok) for r in chunk], decode_tokens)

    def main_sampled(chunk):
        prompts = [fmt.prompt(r.question, tok) for r in chunk]
        _, _, ids, mask = sample_completions(bb.main, tok, prompts, samples, decode_tokens, temperature)
        texts = [tok.decode(i[m.bool()], skip_special_tokens=True) for i, m in zip(ids, mask, strict=True)]
        return [texts[i * samples : (i + 1) * samples] for i in range(len(chunk))]

    rows = measured(f"main text chain (T={temperature:g})", main_greedy, main_sampled)
    for readout in ("rationale", "answer"):
        if not (stage1_root / readout / "stage1.json").is_file():
            raise SystemExit(
                f"error: no shipped stage 1 in {stage1_root / readout}; build it: {STAGE1_COMMANDS[readout]}"
            )
        module = shipped_stage1_module(bb, stage1_root, readout, samples).eval()
        module.policy.set_sigma(sigma)
        rows += measured(
            f"DLR {readout} readout (sigma={sigma:g})",
            module.greedy_completions,
            lambda c, m=module: m.sample_attempts(c, samples),
        )
    return {
        "per_depth": per_depth,
        "samples": samples,
        "ks": ks,
        "sigma": sigma,
        "temperature": temperature,
        "test_seed": test_seed,
        "rows": rows,
    }


def frontier_table(result: dict) -> str:
    """Markdown, one table per task: rows are sources and measures, columns depths."""
    rows = result["rows"]
    measures = [k for k in rows[0] if k not in ("source", "task", "depth", "problems")]
    depths = sorted({r["depth"] for r in rows})
    by = {(r["source"], r["task"], r["depth"]): r for r in rows}
    blocks = []
    for task in sorted({r["task"] for r in rows}):
        lines = [
            f"**{task}** ({result['per_depth']} problems per depth, test seed {result['test_seed']}, n={result['samples']} samples)",
            "",
        ]
        lines += [
            "| source | measure | " + " | ".join(f"d{d}" for d in depths) + " |",
            "|" + "---|" * (len(depths) + 2),
        ]
        for source in dict.fromkeys(r["source"] for r in rows):
            for m in measures:
                cells = [f"{100 * by[(source, task, d)][m]:.0f}%" if (source, task, d) in by else "–" for d in depths]
                lines.append(f"| {source} | {m} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)

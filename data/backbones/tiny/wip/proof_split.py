"""Does a main look rules up by subject, or copy a plausible object? (issue 15 diagnostic, kept with the WIP.)

Scores the main's own greedy proof, sentence for sentence, against the gold proof on the fixed logic test set
(test_seed 1000), split by how many distractor rules the question holds, and counts the first wrong sentence.
A main that has learned the lookup keeps its chains right as distractors grow; one that copies "the object
that is not the query" is right with one distractor and guesses with two.

    python data/backbones/tiny/wip/proof_split.py data/backbones/tiny/wip/main 100   # folder, problems per depth
"""

import sys
from collections import Counter

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dlr.data.datamodule import ProceduralSpec, fixed_test_set
from dlr.models.backbones import PromptFormat
from dlr.models.generation import greedy_complete
from dlr.scoring import completion_prefix

torch.set_num_threads(2)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
prompt_format = PromptFormat()
records = fixed_test_set(ProceduralSpec({"logic": 1.0}, 1, 4), 1000, int(sys.argv[2]))
total, chain_right, first_wrong = Counter(), Counter(), Counter()
for depth in (1, 2, 3, 4):
    at_depth = [r for r in records if r.depth == depth]
    # the depth evaluation's "cot" prompt: the main writes <bol>, its proof, <eol> and the answer line itself
    prompts = [prompt_format.prompt(r.question, tokenizer) + completion_prefix(prompt_format, "cot") for r in at_depth]
    for record, output in zip(at_depth, greedy_complete(model, tokenizer, prompts, 80), strict=True):
        distractors = record.question.count("every") - depth  # one rule per hop; the rest are distractors
        proof = output.split("####")[0].strip()
        total[depth, distractors] += 1
        chain_right[depth, distractors] += proof == record.cot
        gold_sentences, sentences = record.cot.split(" . "), proof.split(" . ")
        for hop, gold in enumerate(gold_sentences):
            if hop >= len(sentences) or sentences[hop].strip(" .") != gold.strip(" ."):
                first_wrong[depth, hop] += 1
                break
for depth, distractors in sorted(total):
    key = depth, distractors
    print(f"depth {depth}, {distractors} distractor rules: chain right {chain_right[key]}/{total[key]}")
print("first wrong sentence (depth, 0 = 'x is a c' / i = hop i): count", sorted(first_wrong.items()))

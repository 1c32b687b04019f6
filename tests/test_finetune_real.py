"""Candidate scoring on the real SmolLM2-135M (its tokenizer, GQA, RoPE, SDPA) against full forwards."""

import pytest
import torch
from numerics import assert_same_outputs
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_one.recipes.data import prompt_ids, response_ids
from lora_one.recipes.embedded_data import TREC_TYPES, load
from lora_one.recipes.evaluate import score_candidates

pytestmark = pytest.mark.slow


def test_smollm2_cached_candidate_scores_equal_full_forwards(smollm2_dir):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [prompt_ids(tok, r["prompt"]) for r in load("trec:val")[:5]]
    cands = [response_ids(tok, " " + t) for t in TREC_TYPES.values()] + [response_ids(tok, " a long answer here")]
    got = score_candidates(model, prompts, cands, batch_size=2)
    want = torch.empty_like(got)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for j, c in enumerate(cands):
                logp = model(input_ids=torch.tensor([p + c])).logits[0].float().log_softmax(-1)
                want[i, j] = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(c))
    # a cached prompt and batches of 2 against one whole forward per candidate: other arithmetic
    assert_same_outputs(got, want, model, max(len(p) for p in prompts) + max(len(c) for c in cands))

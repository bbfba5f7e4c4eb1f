"""How much a stop rule could save on completions (issue #30's headroom), before any rule is built.

    python benchmarks/stop_headroom.py --data builtin:stdlib-code --prompts 64 --prompt-tokens 64 --new-tokens 64

Held-out windows of the corpus give a prompt (their first `--prompt-tokens`) and a reference (the next
`--new-tokens`, the document's real continuation). The full model completes each prompt greedily. A
completion's value is its longest prefix matching the reference (tokens). Reported:
- the oracle stop (stop right after the matching prefix): tokens saved at 100% of value;
- a simple confidence rule (stop at the first generated token whose final-layer max probability is below
  tau), per tau: tokens saved, value kept (sum over prompts of the value still shown / full value), and the
  precision of the shown tokens (share that match the reference), with the no-rule precision beside it.
Nothing here is certified: it says where the savings are, for the rule #30 asks to certify.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from provenance import provenance

from dyninfer.core.data import load_windows
from dyninfer.core.models import load_model


def matched_prefix(generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per row, the length of the longest prefix of `generated` equal to `reference`."""
    equal = (generated == reference).int()
    return equal.cumprod(dim=1).sum(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default="builtin:stdlib-code")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--taus", default="0.3,0.5,0.7,0.9")
    args = parser.parse_args()
    started = time.perf_counter()
    loaded = load_model(args.model)
    model = loaded.model
    windows = load_windows(args.data, loaded.tokenizer, seq_len=args.prompt_tokens + args.new_tokens, seed=0)
    rows = windows.heldout[torch.randperm(windows.heldout.shape[0], generator=torch.Generator().manual_seed(0))[: args.prompts]]
    prompts, reference = rows[:, : args.prompt_tokens], rows[:, args.prompt_tokens : args.prompt_tokens + args.new_tokens]
    generated, confidence = [], []
    with torch.no_grad():
        for start in range(0, prompts.shape[0], args.batch_size):
            out = model.generate(
                prompts[start : start + args.batch_size],
                attention_mask=torch.ones_like(prompts[start : start + args.batch_size]),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=loaded.tokenizer.eos_token_id,
            )
            generated.append(out.sequences[:, args.prompt_tokens :])
            confidence.append(torch.stack([s.float().softmax(-1).max(-1).values for s in out.scores], dim=1))
    generated, confidence = torch.cat(generated), torch.cat(confidence)
    value = matched_prefix(generated, reference)  # tokens of the full completion that are right, in a row
    total_value = int(value.sum())
    n, length = generated.shape
    right = (generated == reference).float()
    result = {
        "prompts": n,
        "new_tokens": length,
        "mean_value_tokens": total_value / n,
        "share_of_prompts_with_value_0": float((value == 0).float().mean()),
        "precision_without_rule": float(right.mean()),
        "oracle": {"tokens_saved": 1 - float(value.sum()) / (n * length), "value_kept": 1.0},
        "confidence_rule": {},
    }
    for tau in [float(t) for t in args.taus.split(",")]:
        below = confidence < tau
        # shown tokens: those before the first low-confidence token
        shown = torch.where(below.any(dim=1), below.int().argmax(dim=1), torch.full((n,), length))
        kept = torch.minimum(shown, value)
        mask = torch.arange(length)[None] < shown[:, None]
        result["confidence_rule"][str(tau)] = {
            "tokens_saved": 1 - float(shown.sum()) / (n * length),
            "value_kept": float(kept.sum()) / max(total_value, 1),
            "prompts_losing_value": float((kept < value).float().mean()),
            "precision_of_shown": float((right * mask).sum() / mask.sum().clamp(min=1)),
        }
    result["seconds"] = time.perf_counter() - started
    result["provenance"] = provenance()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

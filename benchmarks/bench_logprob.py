"""Teacher-forced log-probabilities of 16 steered 64-token continuations (one batch at the default profile's batch size):
saif_utils' chunked LM head at the scored positions vs the full-vocabulary `log_softmax` it replaced.
Prints the largest difference, the time ratio, and each path's peak extra resident memory, measured in a fresh process
per path (Linux VmHWM after the scoring minus before it, weights already paged in). Target: chunked / full peak memory ≤ 0.5 at equal results."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from common import content_prompts, default_model, median_seconds, peak_rss_mb, report

N_ROWS, N_CONT, LAYER = 16, 64, 15


def full_vocab_logprob(model, prefix_ids, cont_ids, layer, vector):
    """The replaced path: the model's own [batch, seq, vocab] logits, float32 log-softmax, gather (one batch)."""
    from saif_utils.architectures import blocks, lm_head
    from saif_utils.interventions import AddVector
    from saif_utils.models import length_buckets

    full = [list(p) + list(c) for p, c in zip(prefix_ids, cont_ids)]
    (batch,) = length_buckets(full, len(full), model.tokenizer.pad_token_id)
    with torch.inference_mode(), model.trace(batch.input_ids, attention_mask=batch.attention_mask):
        resid = blocks(model)[layer].output
        resid[:] += AddVector(vector).delta(resid)
        logits = lm_head(model).output
        token_lp = logits[:, :-1].float().log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0].save()
    width = batch.input_ids.shape[1]
    out = torch.empty(len(full))
    for r, i in enumerate(batch.rows):
        out[i] = token_lp[r, width - 1 - len(cont_ids[i]):].mean()
    return out.numpy()


def setup():
    """Model, prompts, fixed continuations and a steering vector (seeded)."""
    torch.manual_seed(0)
    profile, model = default_model()
    prefix = content_prompts(model.tokenizer, N_ROWS)
    cont = [torch.randint(100, 20_000, (N_CONT,)).tolist() for _ in prefix]
    vector = torch.randn(model.config.hidden_size) * 20
    return profile, model, prefix, cont, vector


def measure_memory(path: str) -> None:
    """Child process: score once with one path and print its peak extra resident memory in MB (JSON)."""
    from saif_utils.interventions import AddVector
    from saif_utils.likelihood import continuation_logprob

    _, model, prefix, cont, vector = setup()
    with torch.inference_mode():  # page the (memory-mapped) weights in first: they are not the scoring's memory
        model._module(torch.tensor([prefix[0][:8]]))
    before = peak_rss_mb()
    if path == "chunked":
        continuation_logprob(model, prefix, cont, LAYER, AddVector(vector), batch_size=N_ROWS)
    else:
        full_vocab_logprob(model, prefix, cont, LAYER, vector)
    print(json.dumps({"peak_extra_mb": peak_rss_mb() - before}))


def main() -> None:
    from saif_utils.interventions import AddVector
    from saif_utils.likelihood import continuation_logprob

    _, model, prefix, cont, vector = setup()
    chunked = continuation_logprob(model, prefix, cont, LAYER, AddVector(vector), batch_size=N_ROWS)
    full = full_vocab_logprob(model, prefix, cont, LAYER, vector)
    times = median_seconds({
        "chunked": lambda: continuation_logprob(model, prefix, cont, LAYER, AddVector(vector), batch_size=N_ROWS),
        "full": lambda: full_vocab_logprob(model, prefix, cont, LAYER, vector),
    })
    memory = {path: json.loads(subprocess.run([sys.executable, __file__, path], capture_output=True, text=True,
                                              check=True).stdout.strip().splitlines()[-1])["peak_extra_mb"]
              for path in ("chunked", "full")}
    report("logprob", {
        "rows": N_ROWS, "continuation_tokens": N_CONT, "vocab": model.config.vocab_size,
        "max_abs_diff": float(abs(chunked - full).max()),
        "chunked_s": times["chunked"], "full_s": times["full"], "chunked_over_full_time": times["chunked"] / times["full"],
        "chunked_peak_extra_mb": memory["chunked"], "full_peak_extra_mb": memory["full"],
        "chunked_over_full_memory": memory["chunked"] / memory["full"], "target_chunked_over_full_memory": 0.5,
    })


if __name__ == "__main__":
    if len(sys.argv) > 1:
        measure_memory(sys.argv[1])
    else:
        main()

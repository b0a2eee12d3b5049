"""KL stage: how far the tuned model's next-token distributions moved from the base model's, on held-out text.

For each held-out prompt (plain text, no chat or training template: text that has nothing to do with the
fine-tuning task), both models read the same tokens; at every position t the score is
KL(p_base(· | x_<t) ‖ p_tuned(· | x_<t)) = Σ_v p_base(v) (log p_base(v) − log p_tuned(v)) in nats over the whole
vocabulary. A prompt's score is the mean over its positions; the stage's value is the mean over prompts (stderr:
their standard deviation / √n). Per-prompt scores go to `<task>.samples.jsonl` (for the paired bootstrap). The
base row scores 0 exactly (the same model), recorded without computing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import fmean, stdev

import torch
from tqdm import tqdm

from oplora.device import batch_size, resolve_device
from oplora.evaluation.stage import Stage, register
from oplora.evaluation.target import Target
from oplora.io import atomic_write_text
from oplora.resources import resolve


def read_prompts(path: str, limit: int | None) -> list[dict]:
    """{id, text} rows of a jsonl file (`text` required), the first `limit` of them."""
    file = Path(resolve(path))
    if not file.exists():
        raise FileNotFoundError(f"KL prompts {file} do not exist")
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = None if isinstance(row, dict) else "is not a JSON object"
        except json.JSONDecodeError as err:
            problem = f"is not JSON ({err})"
        if problem is None and "text" not in row:
            problem = f"has no field 'text' (fields: {', '.join(row)})"
        if problem:
            raise ValueError(f"KL prompts {file} line {number} {problem}: fix or remove that line")
        rows.append(row)
    return rows[:limit] if limit else rows


def load(model_dir: str, target: Target, adapter: str | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, target.dtype),
                                                 trust_remote_code=target.trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.to(resolve_device()).eval()


@torch.no_grad()
def token_kl(base, tuned, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the mean over its real positions of KL(base ‖ tuned) of the next-token distributions, and the
    mean over its real next tokens of the tuned model's negative log-likelihood minus the base model's (nats). A
    position's KL is ≥ 0; float rounding can give −1e-7 where the models (nearly) agree, set to 0."""
    log_p = torch.log_softmax(base(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    log_q = torch.log_softmax(tuned(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0)
    following = mask[:, 1:]  # positions whose next token is real text
    gain = (log_p[:, :-1] - log_q[:, :-1]).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (kl * mask).sum(1) / mask.sum(1), (gain * following).sum(1) / following.sum(1).clamp(min=1)


def mean_metric(name: str, values: tuple[float, ...]) -> dict:
    """A stage metric: the mean over prompts, its standard error, n (`name`: the per-prompt field of the samples)."""
    n, std = len(values), stdev(values) if len(values) > 1 else None
    return {"metric": name, "value": fmean(values), "stderr": std / math.sqrt(n) if std else None, "n": n}


@register
class KL(Stage):
    """Both models are loaded per task and freed when it ends."""

    name = "kl"
    version = 2  # 2: the NLL increase beside the KL

    def scores(self, prompts: list[dict]) -> list[tuple[float, float]]:
        """(KL, NLL increase) per prompt; both 0 for the base model itself."""
        from transformers import AutoTokenizer

        if self.target.adapter is None:
            return [(0.0, 0.0)] * len(prompts)
        tokenizer = AutoTokenizer.from_pretrained(self.target.base)
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        base = load(self.target.base, self.target)
        tuned = load(self.merged, self.target) if self.merged else load(self.target.base, self.target,
                                                                         self.target.adapter)
        size = batch_size(self.settings)
        out = []
        for start in tqdm(range(0, len(prompts), size), desc="KL(base ‖ tuned)", unit="batch"):
            batch = tokenizer([p["text"] for p in prompts[start:start + size]], return_tensors="pt", padding=True,
                              truncation=True, max_length=self.settings["max_length"])
            kl, nll = token_kl(base, tuned, batch["input_ids"].to(base.device), batch["attention_mask"].to(base.device))
            out += zip(kl.tolist(), nll.tolist(), strict=True)
        return out

    def run(self, task: str) -> dict:
        spec = self.settings["tasks"][task]
        prompts = read_prompts(spec["path"], self.limit)
        scores = self.scores(prompts)
        if bad := sum(not math.isfinite(v) for pair in scores for v in pair):
            raise FloatingPointError(f"kl/{task}: {bad} of {2 * len(scores)} scores are not finite: the model is "
                                     "broken")
        samples = self.workdir / f"{task}.samples.jsonl"
        samples.parent.mkdir(parents=True, exist_ok=True)
        rows = ({"doc_id": p.get("id", i), "kl": kl, "nll_increase": nll}
                for i, (p, (kl, nll)) in enumerate(zip(prompts, scores, strict=True)))
        atomic_write_text(samples, "".join(json.dumps(row) + "\n" for row in rows))
        kl, nll = zip(*scores, strict=True)
        return {"metrics": {task: mean_metric("kl", kl), f"{task}_nll": mean_metric("nll_increase", nll)},
                "details": {task: {"prompts": spec["path"], "max_length": self.settings["max_length"],
                                   "computed": self.target.adapter is not None, "samples": str(samples)}}}

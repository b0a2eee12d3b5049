"""Plain helpers shared by the tests (fixtures live in conftest.py)."""

import subprocess
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from oplora.config import CONFIG_DIR
from oplora.config import compose as compose_overrides
from oplora.methods import AdapterSettings, build
from oplora.methods.base import IDENTITY, OWN_DROPOUT, shared_config
from oplora.slurm import available
from oplora.svd import SVDCache

# A method config's settings that do not fit the tiny models (hidden size 64, v_proj 32×64), resized for them
TINY = {"oplora128": {"k": 24}}


def load(directory, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    model.eval()
    return model


def settings(method: str, calibration_file=None, **overrides) -> AdapterSettings:
    """Small test settings; keys that are not AdapterSettings fields are the method's options (k, …)."""
    common = {"method": method, "r": 8, "alpha": 16, "dropout": 0.0}
    options = {"calibration": {"source": str(calibration_file), "n_samples": 6, "seq_len": 48}} \
        if method == "lora_null" else {}
    for key, value in overrides.items():
        (common if key in AdapterSettings.__dataclass_fields__ else options)[key] = value
    return AdapterSettings(**common, options=options)


def method_configs() -> dict[str, tuple[str, dict]]:
    """{config: (method name, options)} of every method config that trains (configs/method/*.yaml), the options
    resized for the tiny models (TINY) and without the shared blocks a method reads (LoRA-Null's calibration corpus
    comes from `settings`, the dropout from the test's own): the cases of the method tests, so a new config or
    method is tested without a test edit."""
    found = {}
    for path in sorted((Path(CONFIG_DIR) / "method").glob("*.yaml")):
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if config.get("trained", True):
            options = {k: v for k, v in config.items() if k not in (*IDENTITY, OWN_DROPOUT, *shared_config())}
            found[path.stem] = (config["name"], {**options, **TINY.get(path.stem, {})})
    return found


def one_config_per_method() -> list[str]:
    """The first method config (by file name) of each method: the cases of the slower per-method tests (training)."""
    first = {}
    for config, (name, _) in method_configs().items():
        first.setdefault(name, config)
    return list(first.values())


def adapt(directory, method_settings: AdapterSettings, svd: SVDCache, dtype=torch.float32):
    """(base model before wrapping: its original target weights, the wrapped model)."""
    model = load(directory, dtype)
    original = {name: m.weight.detach().clone() for name, m in model.named_modules()
                if name.rsplit(".", 1)[-1] in method_settings.target_modules}
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return original, build(model, method_settings, svd, tokenizer)


def train(model, steps: int = 20, lr: float = 1e-3, seed: int = 0, vocab: int = 1000) -> None:
    """Real AdamW steps on random token sequences (next-token loss)."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2, 24), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss), "a non-finite loss would make every check after training meaningless"
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def compose(*overrides: str):
    """The training config as `python -m oplora.train OVERRIDES…` would resolve it."""
    return compose_overrides(list(overrides))


def eval_overrides(tasks_dir, *extra):
    """Evaluate on the two toy lm_eval tasks of the `tasks` fixture: one fine-tuning, one forgetting column."""
    columns = ("[{label:Capitals,stage:lm_eval,task:toy_capitals,role:finetune},"
               "{label:Sums,stage:lm_eval,task:toy_sums,role:forget}]")
    return [f"eval.columns={columns}", f"eval.lm_eval.include_path=[{tasks_dir}]", *extra]


def start_cluster() -> str | None:
    """Start (or check) the local cluster: None when it is up, else why not."""
    try:
        script = Path(__file__).resolve().parents[1] / "slurm" / "local-cluster.sh"
        result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "slurm/local-cluster.sh did not finish within 300 s"
    if result.returncode != 0:
        return f"no local SLURM: {(result.stderr or result.stdout).strip()}"
    reason = available()
    return f"no local SLURM: {reason}" if reason else None

"""Model-generated code runs only in the bubblewrap sandbox: malicious solutions through evalplus's real evaluator."""

import json
import logging
import socket
from pathlib import Path

import evaluate
import pytest

from oplora import sandbox
from oplora.demo_data import MC_TASK
from oplora.evaluation.code import evaluate_samples, humaneval_plus_file, run_evalplus
from oplora.evaluation.code_eval import sandboxed_code_eval

ORIGINAL_LOAD = evaluate.load

SECRET = "OPLORA_TEST_SECRET_TOKEN"


@pytest.fixture(autouse=True)
def evalplus_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv(SECRET, "hf_fake_secret")


@pytest.fixture
def listener():
    """A TCP server on the host's loopback: reachable from any process that shares the host's network."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


def payloads(outside, port) -> list[str]:
    """Module-level code appended to canonical solutions: two attacks (errors ignored) and three isolation probes
    (an AssertionError fails the problem, so a probe's problem passes only when the sandbox holds)."""
    return [
        f"try:\n    import io\n    io.open({str(outside / 'io-open.txt')!r}, 'w').write('written')\n"
        "except Exception:\n    pass\n",
        "try:\n    import ctypes\n    ctypes.CDLL(None).system("
        f"{('id > ' + str(outside / 'id.txt')).encode()!r})\nexcept Exception:\n    pass\n",
        "import os\nassert os.getuid() == os.geteuid() == 65534, os.getuid()\n",
        f"import os\nassert {SECRET!r} not in os.environ\n",
        f"import socket\n_s = socket.socket()\n_s.settimeout(2)\nassert _s.connect_ex(('127.0.0.1', {port})) != 0\n",
    ]


def run_samples(tmp_path, outside, port, mode):
    problems = [json.loads(line) for line in open(humaneval_plus_file(tmp_path / "he.jsonl", limit=6))]
    attacks = payloads(outside, port) + [""]  # the last problem: the honest canonical solution alone
    samples = tmp_path / "samples.jsonl"
    solutions = [p["prompt"] + p["canonical_solution"] + "\n" + attack
                 for p, attack in zip(problems, attacks, strict=True)]
    samples.write_text("".join(json.dumps({"task_id": p["task_id"], "solution": s}) + "\n"
                               for p, s in zip(problems, solutions, strict=True)))
    result = evaluate_samples(samples, "humaneval", tmp_path / "he.jsonl", sandbox_mode=mode)
    return [d["base"] for d in result["details"]], result["metrics"]["humaneval"]["pass@1"]


def test_malicious_solutions_are_contained(tmp_path, listener):
    outside = tmp_path / "outside"
    outside.mkdir()
    verdicts, pass_at_1 = run_samples(tmp_path, outside, listener, "bwrap")
    assert verdicts == ["pass"] * 6 and pass_at_1 == 1.0  # uid 65534, no secret, no network; honest code passes
    assert list(outside.iterdir()) == []  # neither io.open nor libc system() could write outside the scratch dir
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".evaluate-")] == []  # scratch removed


def test_without_the_sandbox_the_same_samples_escape(tmp_path, listener, caplog):
    """The control: eval.sandbox=none runs them with this process's rights, and says so."""
    outside = tmp_path / "outside"
    outside.mkdir()
    with caplog.at_level(logging.WARNING, logger="oplora.sandbox"):
        verdicts, _ = run_samples(tmp_path, outside, listener, "none")
    assert "UNSANDBOXED" in caplog.text
    assert (outside / "io-open.txt").read_text() == "written"
    assert (outside / "id.txt").read_text().startswith("uid=")
    assert verdicts[2:] == ["fail", "fail", "fail", "pass"]  # own uid, the secret visible, the host's loopback reached


def test_refuses_without_bwrap_and_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    sandbox._probe.cache_clear()
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match=r"apt-get install bubblewrap.*eval\.sandbox=none"):
            run_evalplus("unused-model", tmp_path / "out", dataset="humaneval", limit=1)
        assert not (tmp_path / "out").exists(), "refused before generating anything"
        with sandboxed_code_eval("bwrap"), pytest.raises(sandbox.SandboxUnavailable, match="apt-get install"):
            load_mbpp_utils()  # lm_eval's mbpp: refused when the task loads, before generation
    finally:
        sandbox._probe.cache_clear()
    with pytest.raises(ValueError, match="valid: bwrap, none"):
        sandbox.require("docker")


def load_mbpp_utils():
    """lm_eval's own mbpp metric module: it loads code_eval and runs a self-test at import."""
    import importlib.util

    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "mbpp" / "utils.py"
    spec = importlib.util.spec_from_file_location("mbpp_utils_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lm_eval_mbpp_metric_runs_generations_in_the_sandbox(tmp_path, listener):
    outside = tmp_path / "outside"
    outside.mkdir()
    attacks, probes = payloads(outside, listener)[:2], payloads(outside, listener)[2:]
    with sandboxed_code_eval("bwrap"):
        utils = load_mbpp_utils()  # offline: code_eval is not fetched from the hub
        honest = utils.pass_at_1(["assert add(2, 3) == 5"], [["def add(a, b):\n    return a + b"]])
        wrong = utils.pass_at_1(["assert add(2, 3) == 5"], [["def add(a, b):\n    return a * b"]])
        attacked = [utils.pass_at_1(["assert True"], [[code]]) for code in attacks]
        probed = [utils.pass_at_1(["assert True"], [[code]]) for code in probes]
    assert (honest, wrong) == (1.0, 0.0)
    assert attacked == [1.0, 1.0] and list(outside.iterdir()) == []
    assert probed == [1.0, 1.0, 1.0]  # uid 65534, the secret not visible, the host's loopback not reachable
    assert evaluate.load is ORIGINAL_LOAD  # restored after the block

    with sandboxed_code_eval("none"):  # the control: unsandboxed, the same generations escape
        utils = load_mbpp_utils()
        assert [utils.pass_at_1(["assert True"], [[code]]) for code in probes] == [0.0, 0.0, 0.0]
        utils.pass_at_1(["assert True"], [[attacks[0]]])
    assert (outside / "io-open.txt").exists()


def test_unsafe_task_without_code_eval_is_refused(tmp_path):
    """A task marked unsafe_code that does not go through code_eval would execute code outside the sandbox."""
    from lm_eval.tasks import TaskManager

    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "1 + 1 =", "choices": ["2", "3"], "label": 0}) + "\n")
    task = MC_TASK.format(name="toy_unsafe", data=tmp_path / "rows.jsonl", version=1, delimiter=" ")
    (tmp_path / "toy_unsafe.yaml").write_text(task + "unsafe_code: true\n")
    manager = TaskManager(include_path=[str(tmp_path)], include_defaults=False)
    with sandboxed_code_eval("bwrap", manager), pytest.raises(RuntimeError, match=r"\['toy_unsafe'\] execute code "
                                                                                  r"without HF code_eval"):
        manager.load(["toy_unsafe"])
    with sandboxed_code_eval("none", manager):
        assert list(manager.load(["toy_unsafe"])["tasks"]) == ["toy_unsafe"]


def test_code_task_loads_again_in_a_later_stage(tmp_path):
    """lm_eval caches task modules in sys.modules: a second stage in the same process (the next cell) must still get
    a sandboxed code_eval, not be refused because the cached module did not load code_eval again."""
    from lm_eval.tasks import TaskManager

    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "def f():", "test": "assert True"}) + "\n")
    (tmp_path / "toy_code.yaml").write_text(CODE_TASK.format(data=tmp_path / "rows.jsonl"))
    (tmp_path / "utils.py").write_text(CODE_UTILS)
    manager = TaskManager(include_path=[str(tmp_path)], include_defaults=False)
    for _ in range(2):
        with sandboxed_code_eval("bwrap", manager):
            task = manager.load(["toy_code"])["tasks"]["toy_code"]
            metric = task._metric_fn_list["pass_at_1"]
            assert metric(references=["import os\nassert os.getuid() == 65534"], predictions=[[""]]) == 1.0


CODE_TASK = """task: toy_code
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
unsafe_code: true
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{test}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
filter_list:
  - name: blank
    filter:
      - function: custom
        filter_fn: !function utils.blank
metric_list:
  - metric: !function utils.pass_at_1
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""
CODE_UTILS = '''import evaluate as hf_evaluate

pass_at_k = hf_evaluate.load("code_eval")  # as lm_eval's mbpp does


def blank(resps, docs):  # a random tiny model writes no code: score the tests alone
    return [["" for _ in resp] for resp in resps]


def pass_at_1(references, predictions):
    return pass_at_k.compute(references=references, predictions=predictions, k=[1])[0]["pass@1"]
'''


def test_lm_eval_stage_scores_generated_code_only_in_the_sandbox(tiny_dirs, tmp_path, listener):
    """lm_eval's evaluate_task end to end on a task built like mbpp: generate, then code_eval in the sandbox."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from oplora.evaluation.harness import evaluate_task

    outside = tmp_path / "outside"
    outside.mkdir()
    tests = [*payloads(outside, listener), "assert sorted([3, 1, 2]) == [1, 2, 3]"]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"prompt": f"def f{i}():", "test": test}) + "\n"
                                                 for i, test in enumerate(tests)))
    (tmp_path / "toy_code.yaml").write_text(CODE_TASK.format(data=tmp_path / "rows.jsonl"))
    (tmp_path / "utils.py").write_text(CODE_UTILS)
    settings = {"sandbox": "bwrap", "allow_code_execution": True, "num_fewshot": {}, "metrics": ["pass_at_1"],
                "include_path": []}
    lm = HFLM(pretrained=str(tiny_dirs["llama"]), dtype="float32", batch_size=4, device="cpu")
    result = evaluate_task(lm, "toy_code", settings, None, tmp_path / "samples.jsonl",
                           TaskManager(include_path=[str(tmp_path)], include_defaults=False))
    assert result["metrics"]["toy_code"]["value"] == 1.0  # every probe held, the honest test passed
    assert list(outside.iterdir()) == []

"""Model-generated code runs only in the bubblewrap sandbox: malicious solutions through evalplus's real evaluator."""

import concurrent.futures
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import evaluate
import pytest

from oplora import sandbox
from oplora.demo_data import MC_TASK
from oplora.evaluation.code import evaluate_samples, humaneval_plus_file, run_evalplus
from oplora.evaluation.code_eval import SandboxedCodeEval, sandboxed_code_eval

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


# The sandbox protects the score as well as the machine (issue 22): nothing a candidate writes is read back, each
# candidate runs alone, and every run has a deadline and memory and process limits.

HANG_GUARD_S = 300  # a hang fails the test instead of stalling the suite; no timing is asserted
WRONG = "    return None\n"


def finishes(function, *args, **kwargs):
    """`function(*args, **kwargs)` (its value, or its exception raised here), or a test failure when it hangs."""
    future = concurrent.futures.Future()

    def call():  # in a daemon thread: a hung one does not hold the test run either
        try:
            future.set_result(function(*args, **kwargs))
        except BaseException as err:  # raised again in the test's thread
            future.set_exception(err)

    threading.Thread(target=call, daemon=True).start()
    try:
        return future.result(HANG_GUARD_S)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"{function.__name__} hung")


def evaluate_with(tmp_path, extras: list[str | None], **kwargs) -> tuple[list[str], dict]:
    """evalplus's evaluator on the first len(extras) HumanEval problems: problem i's solution is its canonical one with
    extras[i] appended, or a wrong one (`return None`) where extras[i] is None."""
    problems = [json.loads(line) for line in open(humaneval_plus_file(tmp_path / "he.jsonl", limit=len(extras)))]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": p["task_id"], "solution": p["prompt"] + (
        WRONG if extra is None else p["canonical_solution"] + "\n" + extra)}) + "\n"
                               for p, extra in zip(problems, extras, strict=True)))
    result = finishes(evaluate_samples, samples, "humaneval", tmp_path / "he.jsonl", **kwargs)
    return [d["base"] for d in result["details"]], result


def forged_results(task_ids) -> str:
    """evalplus's result file, every task passing: evalplus keeps such a file when it finds one."""
    verdict = {"solution": "", "base_status": "pass", "plus_status": "pass", "base_fail_tests": [],
               "plus_fail_tests": []}
    return json.dumps({"date": "", "hash": "", "eval": {t: [{"task_id": t, **verdict}] for t in task_ids}})


PLANT = """
import io, posix
for _dir in ("/scratch", "/tmp", posix.getcwd()):
    try:
        {action}
    except Exception:
        pass
"""


def test_a_planted_result_file_forges_no_verdict(tmp_path):
    """One solution writes an all-pass evalplus result file wherever it can; the five others are wrong."""
    task_ids = [f"HumanEval/{i}" for i in range(6)]
    write = f"io.open(_dir + '/samples_eval_results.json', 'w').write({forged_results(task_ids)!r})"
    verdicts, result = evaluate_with(tmp_path, [PLANT.format(action=write)] + [None] * 5)
    assert verdicts == ["pass"] + ["fail"] * 5
    assert result["metrics"]["humaneval"]["pass@1"] == pytest.approx(1 / 6)  # not 1.0


@pytest.mark.skipif(os.geteuid() != 0, reason="the attack reads a root-only file through the host running as root")
def test_a_planted_symlink_is_never_followed(tmp_path):
    """A solution points the result file at /etc/shadow (which exists in the sandbox, unreadable there); the host,
    as root, must not copy it out."""
    link = "posix.symlink('/etc/shadow', _dir + '/samples_eval_results.json')"
    verdicts, result = evaluate_with(tmp_path, [PLANT.format(action=link), ""])
    assert verdicts == ["pass", "pass"]
    shadow = Path("/etc/shadow").read_bytes()
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == shadow] == []
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))


def test_a_stopped_evaluator_fails_its_candidate_only(tmp_path):
    """SIGSTOP to the process that runs evalplus's check: the sandbox's deadline ends it, the others are scored."""
    stop = "import posix, signal\nposix.kill(posix.getppid(), signal.SIGSTOP)\n"
    verdicts, result = evaluate_with(tmp_path, ["", stop, ""], deadline_s=10)
    assert verdicts == ["pass", "fail", "pass"]
    assert "deadline of 10 s" in result["details"][1]["error"] and "error" not in result["details"][0]


def test_a_killed_check_fails_its_candidate_and_all_killed_fail_the_stage(tmp_path):
    """SIGKILL to the process that runs evalplus's check: that solution fails with a record; when no solution gets a
    verdict at all, the stage fails with an error instead of scoring 0."""
    kill = "import posix, signal\nposix.kill(posix.getppid(), signal.SIGKILL)\n"
    verdicts, result = evaluate_with(tmp_path, [kill, ""])
    assert verdicts == ["fail", "pass"] and result["details"][0]["error"].startswith("no verdict: exit status")
    with pytest.raises(RuntimeError, match="no solution of .* got a verdict"):
        evaluate_with(tmp_path, [kill, kill])


MEMORY_PROBE = """
import mmap
try:
    mmap.mmap(-1, 5 << 30)
except (OSError, MemoryError):
    pass
else:
    raise AssertionError("5 GiB of address space")
"""
PROCESS_PROBE = """
import posix
_forks = 0
try:
    for _ in range(200):
        if posix.fork() == 0:
            posix._exit(0)
        _forks += 1
except OSError:
    pass
assert _forks < 200, _forks
"""


def test_memory_and_processes_are_limited_in_evalplus(tmp_path):
    """Probes appended to canonical solutions: each passes only when its limit holds (memory: evalplus's own 4 GiB,
    which the sandbox enforces as well; processes: 200 forks, unlimited before)."""
    verdicts, _ = evaluate_with(tmp_path, [MEMORY_PROBE, PROCESS_PROBE, ""])
    assert verdicts == ["pass", "pass", "pass"]


ADD_TEST = "assert add(2, 3) == 5"
RIGHT, WRONG_ADD = "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a * b\n"


def code_eval_verdicts(programs: list[str], test: str = ADD_TEST, **kwargs) -> list[dict]:
    """SandboxedCodeEval on one candidate per problem, each problem with `test`: the per-candidate results."""
    _, results = finishes(SandboxedCodeEval("bwrap").compute, predictions=[[p] for p in programs],
                          references=[test] * len(programs), k=[1], **kwargs)
    return [results[i][0][1] for i in range(len(programs))]


def test_code_eval_candidates_cannot_rewrite_each_other(tmp_path):
    """Program 0 rewrites every Python file it can reach, before the ten wrong programs run (one worker)."""
    rewrite = RIGHT + """
import glob, os
for _path in glob.glob(os.getcwd() + "/**/*.py", recursive=True) + glob.glob("/tmp/**/*.py", recursive=True):
    try:
        open(_path, "w").write("pass\\n")
    except OSError:
        pass
"""
    results = code_eval_verdicts([rewrite] + [WRONG_ADD] * 10, num_workers=1)
    assert [r["passed"] for r in results] == [True] + [False] * 10  # main: all eleven pass


def test_code_eval_limits_and_deadline(tmp_path):
    """A program that stops its parent and itself ends at the deadline; 2 GiB and 200 forks are refused."""
    stop = "import os, signal\ntry:\n    os.kill(os.getppid(), signal.SIGSTOP)\nexcept OSError:\n    pass\n" \
           "os.kill(os.getpid(), signal.SIGSTOP)\n"
    memory = "import mmap\nm = mmap.mmap(-1, 2 << 30)\n"
    forks = "import os\nfor _ in range(200):\n    if os.fork() == 0:\n        os._exit(0)\n"
    results = code_eval_verdicts([RIGHT + stop, RIGHT + memory, RIGHT + forks, RIGHT], timeout=2.0)
    assert [r["passed"] for r in results] == [False, False, False, True]
    assert results[0]["result"].startswith("timed out") and "deadline" in results[0]["result"]
    assert "Cannot allocate memory" in results[1]["result"] or "MemoryError" in results[1]["result"]
    assert "Resource temporarily unavailable" in results[2]["result"]


def test_sandbox_runs_through_a_symlinked_venv(tmp_path):
    """With the venv reached through a symlink, the sandbox binds the real directories and runs the interpreter
    from there (it used to exit 127: setpriv could not execute .../venv/bin/python)."""
    venv = tmp_path / "venv"
    venv.symlink_to(Path(sys.prefix).resolve(), target_is_directory=True)
    script = ("import sys\nfrom oplora import sandbox\n"
              "outcome = sandbox.run([sys.executable, '-c', 'import evalplus.eval; print(6 * 7)'], {}, 'bwrap', "
              "sandbox.Limits(deadline_s=60))\n"
              "print(outcome.failure(), outcome.stdout.decode())\n")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["None", "42"]  # the venv's packages import inside


def test_the_deadline_kills_every_process_of_the_sandbox():
    """A run that stops itself and leaves children behind: when `run` returns, none of them is left."""
    token = f"{os.getpid()}.{threading.get_ident() % 1000}"  # sleep's argument, unique to this test
    script = f"sleep 1{token} & (sleep 2{token} &) ; kill -STOP $$"
    outcome = sandbox.run(["/bin/sh", "-c", script], {}, "bwrap", sandbox.Limits(deadline_s=2))
    assert outcome.failure() == "exceeded the sandbox's wall-clock deadline of 2 s"
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and token in read_cmdline(p)]
    assert left == []


def read_cmdline(process: Path) -> str:
    try:
        return (process / "cmdline").read_bytes().decode(errors="replace")
    except OSError:  # gone meanwhile
        return ""


def test_sandbox_outputs_are_read_as_plain_files_only(tmp_path):
    """What sandboxed code may have written is never followed through a link, never a fifo, never too big."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "result.json").write_text("{}")
    (tmp_path / "out" / "link.json").symlink_to("/etc/hostname")
    (tmp_path / "linked-dir").symlink_to(tmp_path / "out")
    os.mkfifo(tmp_path / "out" / "fifo.json")
    assert sandbox.read_output(tmp_path, "out/result.json", max_bytes=2) == b"{}"
    refused = {"out/link.json": "symlink", "linked-dir/result.json": "symlink", "out/fifo.json": "not a regular file",
               "out/result.json": "larger than 1 bytes", "../out/result.json": "not a plain relative name"}
    for name, why in refused.items():
        with pytest.raises(sandbox.UntrustedOutput, match=f"{tmp_path / name}: .*{why}"):
            sandbox.read_output(tmp_path, name, max_bytes=1 if name == "out/result.json" else 100)

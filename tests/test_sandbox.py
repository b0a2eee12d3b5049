"""Model-generated code runs only in the bubblewrap sandbox: malicious solutions through evalplus's real evaluator."""

import json
import logging
import socket

import pytest

from oplora import sandbox
from oplora.evaluation.code import evaluate_samples, humaneval_plus_file, run_evalplus

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
        f"try:\n    import io\n    io.open({str(outside / 'io-open.txt')!r}, 'w').write('written')\nexcept Exception:\n    pass\n",
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
    samples.write_text("".join(json.dumps({"task_id": p["task_id"], "solution": p["prompt"] + p["canonical_solution"]
                                           + "\n" + attack}) + "\n" for p, attack in zip(problems, attacks)))
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
    finally:
        sandbox._probe.cache_clear()
    with pytest.raises(ValueError, match="valid: bwrap, none"):
        sandbox.require("docker")

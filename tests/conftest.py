import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from oplora.models import smollm2_dir, tiny_dir  # noqa: E402
from oplora.svd import SVDCache  # noqa: E402

ARCHS = ("llama", "qwen2")


@pytest.fixture(scope="session")
def svd(tmp_path_factory) -> SVDCache:
    return SVDCache(tmp_path_factory.mktemp("svd-cache"))


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory):
    """Plain-text calibration corpus: short factual questions separated by blank lines."""
    path = tmp_path_factory.mktemp("calibration") / "questions.txt"
    countries = ["France", "Japan", "Kenya", "Peru", "Norway", "Egypt", "Canada", "India", "Chile", "Spain"]
    docs = [f"what is the capital of {c}? who wrote the national anthem of {c}?" for c in countries * 8]
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_dirs():
    return {a: tiny_dir(a) for a in ARCHS}


@pytest.fixture(scope="session")
def smollm2():
    return smollm2_dir()

"""The SVD cache: exact triples, one computation per matrix, atomic and concurrent-safe files."""

import multiprocessing as mp

import pytest
import torch
from safetensors.torch import load_file

from oplora.svd import SVDCache, matrix_key


def spectrum_matrix(m=96, n=80, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -0.8
    return (U[:, : len(s)] * s) @ V[:, : len(s)].T


def test_top_and_bottom_match_full_svd(tmp_path):
    W = spectrum_matrix().float()
    U, S, Vh = torch.linalg.svd(W.double())
    cache = SVDCache(tmp_path, min_rank=4)
    top, bottom = cache.top(W, 10), cache.bottom(W, 6)
    assert torch.allclose(top.S.double(), S[:10], rtol=1e-6)
    assert torch.allclose(bottom.S.double(), S[-6:], rtol=1e-5)
    for got, ref in ((top.U, U[:, :10]), (top.V, Vh[:10].T), (bottom.U, U[:, 74:80]), (bottom.V, Vh[74:80].T)):
        cosines = (got.double() * ref).sum(0).abs()  # each vector equals the reference up to sign
        assert torch.allclose(cosines, torch.ones_like(cosines), atol=1e-6)
    assert top.residual < 1e-6


def test_one_file_per_matrix_shared_across_ranks(tmp_path):
    W = spectrum_matrix().float()
    cache = SVDCache(tmp_path, min_rank=16)
    cache.top(W, 8)
    path = next(cache.dir.glob("*.safetensors"))
    stamp = path.stat().st_mtime_ns
    cache.top(W, 16), cache.bottom(W, 8)  # covered by the first computation: no rewrite
    assert path.stat().st_mtime_ns == stamp
    cache.top(W, 40)  # a larger rank grows the entry in place
    assert path.stat().st_mtime_ns != stamp and load_file(path)["U_top"].shape == (96, 40)
    assert len(list(cache.dir.glob("*.safetensors"))) == 1
    cache.top(W.double(), 8)  # other bytes, other entry
    assert len(list(cache.dir.glob("*.safetensors"))) == 2


def test_randomized_mode_reports_its_residual(tmp_path):
    W = spectrum_matrix(200, 160).float()
    exact = SVDCache(tmp_path, min_rank=8).top(W, 8)
    rand = SVDCache(tmp_path, mode="randomized", min_rank=8).top(W, 8)
    assert 0 < rand.residual < 1e-4
    assert torch.allclose(rand.S, exact.S, rtol=1e-4)
    crude = SVDCache(tmp_path / "crude", mode="randomized", min_rank=8, oversample=0, niter=0).top(W, 8)
    assert crude.residual > 10 * rand.residual  # the residual tells a poor approximation apart


def test_corrupt_entry_is_recomputed(tmp_path, caplog):
    W = spectrum_matrix().float()
    cache = SVDCache(tmp_path, min_rank=4)
    good = cache.top(W, 4)
    path = next(cache.dir.glob("*.safetensors"))
    path.write_bytes(b"not a safetensors file")
    again = cache.top(W, 4)
    assert torch.equal(again.S, good.S)
    assert str(path) in caplog.text


def build_entry(root: str, seed: int, queue) -> None:
    triples = SVDCache(root, min_rank=64).top(spectrum_matrix(300, 256, seed).float(), 64)
    queue.put(triples.U.sum().item())


def test_two_processes_building_the_same_entry_agree(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=build_entry, args=(str(tmp_path), 3, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    a, b = queue.get(), queue.get()
    assert a == b
    files = list((tmp_path / "svd").iterdir())
    assert [f.suffix for f in files if not f.name.endswith(".lock")] == [".safetensors"]  # no temp file left
    entry = SVDCache(tmp_path, min_rank=64).top(spectrum_matrix(300, 256, 3).float(), 64)
    assert entry.U.sum().item() == a


def test_key_depends_on_content_shape_and_dtype():
    W = spectrum_matrix().float()
    assert matrix_key(W) == matrix_key(W.clone())
    assert matrix_key(W) != matrix_key(W.double()) != matrix_key(W.T.contiguous())
    W2 = W.clone()
    W2[0, 0] += 1e-3
    assert matrix_key(W) != matrix_key(W2)


@pytest.mark.parametrize("k", [97])
def test_rank_beyond_matrix_is_refused(tmp_path, k):
    with pytest.raises(ValueError, match="has only 80 singular triples"):
        SVDCache(tmp_path).top(spectrum_matrix().float(), k)

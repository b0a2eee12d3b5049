"""The SVD cache: exact triples, one computation per matrix, atomic and concurrent-safe files."""

import json
import multiprocessing as mp

import pytest
import torch
from safetensors.torch import load_file

from oplora.svd import SVDCache, matrix_key, triple_residual


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


@pytest.mark.parametrize("damage", [lambda raw: b"not a safetensors file", lambda raw: raw[: len(raw) // 2]])
def test_corrupt_or_truncated_entry_is_recomputed(tmp_path, caplog, damage):
    W = spectrum_matrix().float()
    cache = SVDCache(tmp_path, min_rank=4)
    good = cache.top(W, 4)
    path = next(cache.dir.glob("*.safetensors"))
    path.write_bytes(damage(path.read_bytes()))
    again = cache.top(W, 4)
    assert torch.equal(again.S, good.S)
    assert f"ignoring unreadable SVD cache file {path}" in caplog.text


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


def flip_sign_bits(path, tensor: str, count: int) -> None:
    """Bit rot: flip the sign bit of `count` float32 values of `tensor`, in the file's bytes."""
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + header_len])[tensor]["data_offsets"]
    for i in torch.randperm((end - start) // 4, generator=torch.Generator().manual_seed(0))[:count].tolist():
        raw[8 + header_len + start + 4 * i + 3] ^= 0x80
    path.write_bytes(raw)


def test_bit_rot_is_detected_and_recomputed(tmp_path, caplog):
    W = spectrum_matrix(256, 192).float()
    cache = SVDCache(tmp_path, min_rank=32)
    good = cache.top(W, 16)
    path = next(cache.dir.glob("*.safetensors"))
    flip_sign_bits(path, "U_top", 64)
    again = cache.top(W, 16)
    assert f"SVD cache file {path} fails verification (checksum mismatch in U_top)" in caplog.text
    assert torch.equal(again.U, good.U) and torch.equal(again.V, good.V)
    caplog.clear()
    assert cache.top(W, 16).U.equal(good.U) and caplog.text == ""  # the rewritten entry verifies


def rotted(entry: dict) -> dict:
    """64 sign flips in the first 16 columns of U_top (with checksums that match, as if written that way)."""
    U = entry["U_top"].clone()
    flat = U[:, :16].reshape(-1).clone()
    flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:64]] *= -1
    U[:, :16] = flat.reshape(U.shape[0], 16)
    return {**entry, "U_top": U}


def shifted(entry: dict) -> dict:
    """Valid singular triples of W, but not the top ones: the first is missing."""
    return {**entry, **{f"{x}_top": entry[f"{x}_top"][..., 1:].contiguous() for x in "UV"},
            "S_top": entry["S_top"][1:].contiguous(), "top": entry["top"] - 1}


def other_matrix(entry: dict) -> dict:
    """The exact triples of another matrix of the same shape."""
    return SVDCache(min_rank=32)._compute(spectrum_matrix(256, 192, seed=5).float(), entry["top"], 0, "other")


@pytest.mark.parametrize("corrupt, problem", [(rotted, "top triples do not fit the matrix"),
                                              (shifted, "triples missing"),
                                              (other_matrix, "top triples do not fit the matrix")])
def test_consistent_but_wrong_entry_fails_against_W(tmp_path, caplog, corrupt, problem):
    W = spectrum_matrix(256, 192).float()
    cache = SVDCache(tmp_path, min_rank=32)
    good = cache.top(W, 16)
    path = next(cache.dir.glob("*.safetensors"))
    cache._save(path, corrupt(cache._load(path, W)))  # checksums of the corrupted tensors
    assert torch.allclose(cache.top(W, 16).S, good.S) and problem in caplog.text and str(path) in caplog.text


@pytest.mark.parametrize("mode, claim", [("exact", "huge"), ("exact", "measured"), ("refined", "huge"),
                                         ("randomized", "huge")])
def test_the_tolerance_is_the_codes_not_the_files(mode, claim, tmp_path, caplog):
    """Another matrix's triples whose metadata claims a huge residual (which once widened the tolerance to match),
    or the residual they really have against W: an exact entry must fit W within the code's bound, an approximate
    one (refined, randomized) must have the residual it records."""
    W = spectrum_matrix(256, 192).float()
    cache = SVDCache(tmp_path, mode=mode, min_rank=32)
    good = cache.top(W, 16)
    path = next(cache.dir.glob("*.safetensors"))
    forged = other_matrix(cache._load(path, W))
    measured = triple_residual(W, forged["U_top"], forged["S_top"], forged["V_top"])
    cache._save(path, {**forged, "residual": 1e6 if claim == "huge" else measured})
    assert torch.allclose(cache.top(W, 16).S, good.S) and f"SVD cache file {path} fails verification" in caplog.text


def test_diagnose_measures_against_W_not_the_training_cache(tmp_path, caplog):
    """OPLoRA trained against a rotted cache protects the wrong subspace; diagnose must report the true ρ."""
    from oplora.diagnose import diagnose, rho  # here: the spawned workers above import this module, keep it light

    W = spectrum_matrix(256, 192).float()
    cache = SVDCache(tmp_path, min_rank=32)
    cache.top(W, 16)
    path = next(cache.dir.glob("*.safetensors"))
    bad = rotted(cache._load(path, W))
    cache._save(path, bad)
    Q, _ = torch.linalg.qr(bad["U_top"][:, :16].double())  # the subspace that training kept its update out of
    X = torch.randn(256, 192, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    delta = X - Q @ (Q.T @ X)
    assert rho(delta, Q, [16])[16] < 1e-12  # what trusting the cache reports
    U, _, _ = torch.linalg.svd(W.double())
    true_rho = rho(delta, U, [16])[16]
    report = diagnose({"m": W}, {"m": delta}, [16], cache)
    assert report["modules"]["m"]["rho"]["16"] == pytest.approx(true_rho, rel=1e-5) and true_rho > 1e-3
    assert str(path) in caplog.text


def test_refined_mode_is_exact_to_float64_and_verifies_on_read(tmp_path, caplog):
    W = spectrum_matrix(300, 240).float()  # σ_i ∝ i^-0.8: slowly decaying, small gaps near k
    U, S, Vh = torch.linalg.svd(W.double())
    cache = SVDCache(tmp_path, mode="refined", min_rank=24, oversample=24, niter=2, device="cpu")
    top = cache.top(W, 24)
    assert top.residual <= 1e-12  # the float64 refinement converged (before float32 storage)
    assert torch.allclose(top.S.double(), S[:24], rtol=1e-6)
    leak = torch.linalg.matrix_norm(U[:, :24].T @ (torch.eye(300, dtype=torch.float64)
                                                    - top.U.double() @ top.U.double().T)) ** 2
    assert leak <= 1e-12  # ρ-like leakage of the exact U_k outside the cached subspace
    crude = SVDCache(tmp_path / "crude", mode="randomized", min_rank=24, oversample=24, niter=2).top(W, 24)
    assert crude.residual > 1e3 * top.residual  # the same start without the float64 refinement
    with caplog.at_level("WARNING"):
        again = SVDCache(tmp_path, mode="refined", min_rank=24, device="cpu").top(W, 24)
    assert not caplog.records and torch.equal(again.U, top.U)  # read back and verified, not recomputed


def test_sharded_build_splits_by_layer_and_fills_the_same_cache(tmp_path):
    from oplora.svd import build, shard_names

    names = [f"model.layers.{i}.self_attn.{p}" for i in range(5) for p in ("q_proj", "v_proj")]
    shards = [shard_names(names, i, 3) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(names)  # a partition
    assert all(len({n.split(".")[2] for n in s} & {n.split(".")[2] for n in t}) == 0
               for s in shards for t in shards if s is not t)  # whole layers
    matrices = {name: spectrum_matrix(40, 32, seed=i).float() for i, name in enumerate(names)}
    cache = SVDCache(tmp_path, min_rank=4)
    eight = lambda shape: (8, 0)  # noqa: E731
    computed = [build(cache, names, matrices.__getitem__, eight, shard=i, shards=3) for i in range(3)]
    assert sum(computed) == len(names)
    assert build(cache, names, matrices.__getitem__, eight) == 0  # one unsharded pass finds everything
    with pytest.raises(ValueError, match="shard 3"):
        shard_names(names, 3, 3)


def test_lowrank_mode_is_the_papers_projection_and_leaks(tmp_path):
    """torch.svd_lowrank(W, q=k) with its defaults (the paper's): an OPLoRA update projected with its U_k, V_k leaks
    into the true top-k subspace (the paper's ρ_128 = 0.003); the exact default does not."""
    from oplora.diagnose import rho

    W = spectrum_matrix(512, 512).float()  # σ_i ∝ i^-0.8
    g = torch.Generator().manual_seed(1)
    B, A = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((512, 16), (16, 512)))
    truth = SVDCache(tmp_path / "exact").top(W, 128).U
    leakage = {}
    for mode in ("exact", "lowrank"):
        U, _, V, residual = SVDCache(tmp_path / mode, mode=mode).top(W, 128)
        U, V = U.double(), V.double()
        leakage[mode] = rho((B - U @ (U.T @ B)) @ (A - (A @ V) @ V.T), truth, [64, 128])
        assert (residual > 1e-4) == (mode == "lowrank")
    assert leakage["exact"][128] < 1e-10 and leakage["lowrank"][128] > 1e-4
    assert leakage["lowrank"][64] < leakage["lowrank"][128]  # the tail of the 128 is the least accurate
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _, S, _ = torch.svd_lowrank(W, q=128, niter=2)
    assert torch.equal(SVDCache(tmp_path / "lowrank", mode="lowrank").top(W, 128).S, S.float())

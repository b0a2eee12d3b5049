"""Singular triples of frozen weights, computed once per matrix and cached on disk.

An entry is keyed by the matrix's content (shape, dtype and bytes), so every method and every
projection rank that needs the same matrix reads the same file: PiSSA and both OPLoRA ranks share
the top triples, MiLoRA the bottom ones. Exact mode runs one full SVD in float64 and keeps both
ends; randomized mode (`torch.svd_lowrank`, by default 2×top columns and 6 power iterations)
keeps the top and records its residual; lowrank mode is the paper's projection, `torch.svd_lowrank(W, q=top)`
with its defaults (2 power iterations, no oversampling, float32), kept to show its leakage (the paper's
ρ_128 = 0.003); refined mode (`refined_top`) starts like randomized mode in float32 and then iterates the
subspace in float64 with a Rayleigh–Ritz step until the top triples' residual reaches `REFINE_TARGET`
(exact to float64 round-off for the top end, at a fraction of a full SVD's cost; bottom triples always come
from the exact SVD). The work runs on `device` ("auto": CUDA when present, else the CPU with every core the process
may use: its affinity, a SLURM job's allocation).
`build` fills the cache for one shard of a model's matrices (split by layer), so that a SLURM array can share
the work. Files are safetensors, written atomically under a per-entry lock so that concurrent builders agree.

Every read is verified, so that a damaged or wrong entry can never reach training or diagnostics: the xxh3-128
checksum of each tensor stored in the file's metadata must match, and the triples must fit the matrix W they are
read for (`verify`, O(mnk), far below an SVD): residuals max_i ‖W v_i − σ_i u_i‖/σ_1, orthonormality of U and V, and
no singular value above σ_k left in W − U_k S_k V_kᵀ (power iteration), within bounds set here, never read from the
file. An entry that fails is named in a warning and recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
import xxhash
from filelock import FileLock
from omegaconf import DictConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from oplora.cache import Cache
from oplora.config import trains
from oplora.device import compute_dtype, resolve_device
from oplora.io import atomic_file, tensor_checksums
from oplora.methods import adapter_settings, get_method
from oplora.models import LazyWeights, weight_files
from oplora.resources import resolve

log = logging.getLogger(__name__)
MODES = ("exact", "randomized", "refined", "lowrank")
LOWRANK_NITER = 2  # torch.svd_lowrank's default, which the paper's projection used
REFINE_TARGET = 1e-12  # refined mode iterates in float64 until max_i ‖W v_i − σ_i u_i‖/σ_1 is below this
REFINE_MAX_ITERATIONS = 40


def allowed_cores() -> int:
    """The cores this process may run on: its affinity mask (`taskset`, a SLURM job's cpuset), not the node's, and at
    most the job's --cpus-per-task where SLURM does not bind jobs to their cores."""
    cores = len(os.sched_getaffinity(0))
    allocated = os.environ.get("SLURM_CPUS_PER_TASK")
    return min(cores, int(allocated)) if allocated else cores


@contextmanager
def all_cores(device: torch.device):
    """On the CPU, let torch use every core this process may run on for the duration (an SVD is the only work then)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(allowed_cores())
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def refined_top(W: torch.Tensor, top: int, oversample: int, niter: int, seed: int = 0):
    """Top-`top` triples (U, S, V, float64) of W: randomized subspace iteration, then float64 Rayleigh–Ritz.

    A float32 start (`niter` power iterations on top + oversample columns, re-orthonormalised each time) finds
    the subspace cheaply; float64 subspace iterations then refine it, each followed by the Rayleigh–Ritz step
    (the SVD of the small QᵀW), until max_i max(‖W v_i − σ_i u_i‖, ‖Wᵀu_i − σ_i v_i‖)/σ_1 ≤ REFINE_TARGET.
    Each float64 iteration costs 4·m·n·q flops, q = top + oversample.
    """
    m, n = W.shape
    q = min(min(m, n), top + oversample)
    g = torch.Generator(W.device).manual_seed(seed)  # the same matrix always gets the same triples
    W32 = W.float()
    Q = torch.linalg.qr(W32 @ torch.randn(n, q, device=W.device, generator=g)).Q
    for _ in range(niter):
        Q = torch.linalg.qr(W32 @ torch.linalg.qr(W32.T @ Q).Q).Q
    del W32
    W64 = W.double()
    Q = Q.double()
    for _ in range(REFINE_MAX_ITERATIONS):
        Q = torch.linalg.qr(W64 @ torch.linalg.qr(W64.T @ Q).Q).Q
        Ub, S, Vh = torch.linalg.svd(Q.T @ W64, full_matrices=False)  # Rayleigh–Ritz on span(Q)
        U, S, V = Q @ Ub[:, :top], S[:top], Vh[:top].T
        if triple_residual(W64, U, S, V) <= REFINE_TARGET:
            break
    return U, S, V


def layer_of(name: str) -> int:
    """The decoder layer index in a module name (`model.layers.12.mlp.up_proj` → 12); -1 when there is none."""
    found = re.search(r"\.(\d+)\.", f".{name}.")
    return int(found.group(1)) if found else -1


def shard_names(names: Iterable[str], shard: int = 0, shards: int = 1) -> list[str]:
    """The matrices of shard `shard` of `shards`: whole layers, layer i going to shard i mod shards."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    return [name for name in sorted(names) if layer_of(name) % shards == shard]


def build(svd: "SVDCache", names: Iterable[str], load: Callable[[str], torch.Tensor],
          needs: Callable[[tuple[int, int]], tuple[int, int]], shard: int = 0, shards: int = 1) -> int:
    """Fill the cache with the (top, bottom) triples `needs(shape)` asks for of every matrix of one shard; the number
    computed.

    `load(name)` returns a matrix when it is needed, so only one is held at a time. SLURM array task i of n:
    `build(svd, names, load, needs, shard=i, shards=n)`; any task count gives the same cache.
    """
    from tqdm.auto import tqdm

    computed = 0
    for name in tqdm(shard_names(names, shard, shards), desc=f"SVD cache {shard + 1}/{shards}", unit="matrix"):
        W = load(name)
        top, bottom = needs(tuple(W.shape))
        k = min(top, min(W.shape))
        if not svd.has(W, k, bottom):
            svd.top(W, k, name)
            svd.bottom(W, bottom, name) if bottom else None
            computed += 1
    return computed


class Triples(NamedTuple):
    U: torch.Tensor  # m×k, float32
    S: torch.Tensor  # k, float32
    V: torch.Tensor  # n×k, float32
    residual: float  # max_i max(‖W v_i − σ_i u_i‖, ‖Wᵀu_i − σ_i v_i‖) / σ_1 of the cached top triples


def matrix_key(W: torch.Tensor) -> str:
    data = W.detach().contiguous().cpu().view(torch.uint8).numpy()
    digest = xxhash.xxh3_128_hexdigest(data)  # hashes the buffer in place, no copy
    return f"{W.shape[0]}x{W.shape[1]}-{str(W.dtype).removeprefix('torch.')}-{digest}"


def triple_residual(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> float:
    W64, U64, S64, V64 = W.double(), U.double(), S.double(), V.double()
    right = torch.linalg.vector_norm(W64 @ V64 - U64 * S64, dim=0)
    left = torch.linalg.vector_norm(W64.T @ U64 - V64 * S64, dim=0)
    return float(torch.maximum(right, left).max() / S64.max())  # top triples: S64.max() is σ₁


VERIFY_TOLERANCE = 1e-5  # float32 storage of exact triples leaves residuals near 1e-7


def verify(W: torch.Tensor, entry: dict, mode: str, power_iterations: int = 8) -> str | None:
    """None when the entry's triples fit W, else what is wrong (see the module docstring); float64, O(mnk).

    Every bound comes from here, none from the entry: exact triples (exact mode, and bottom triples in every mode) must
    fit W within VERIFY_TOLERANCE; the top triples of the other modes are approximations (refined mode's float64
    iterations may stop short of REFINE_TARGET): they must have the residual the entry records, measured here, and
    are held to twice that."""
    W64 = W.detach().double()
    sigma_1 = float(entry["S_top"][0])
    top = tuple(entry[f"{x}_top"].double().to(W64.device) for x in "USV")
    measured = triple_residual(W64, *top)
    approximation = 0.0 if mode == "exact" else 2 * measured
    for end in ("top", "bot") if entry["bottom"] else ("top",):
        U, S, V = top if end == "top" else (entry[f"{x}_bot"].double().to(W64.device) for x in "USV")
        tolerance = VERIFY_TOLERANCE + (approximation if end == "top" else 0.0)
        residual = float(torch.linalg.vector_norm(W64 @ V - U * S, dim=0).max()) / sigma_1
        if residual > tolerance:
            return f"{end} triples do not fit the matrix: max ‖W v_i − σ_i u_i‖/σ_1 = {residual:.2e} > {tolerance:.0e}"
        for name, Q in (("U", U), ("V", V)):
            gap = float((Q.T @ Q - torch.eye(Q.shape[1], dtype=Q.dtype, device=Q.device)).abs().max())
            if gap > tolerance:
                return f"{name}_{end} is not orthonormal: max |QᵀQ − I| = {gap:.2e} > {tolerance:.0e}"
    U, S, V = top
    x = torch.randn(W64.shape[1], dtype=W64.dtype, device=W64.device, generator=torch.Generator(W64.device)
                    .manual_seed(0))
    rest = 0.0
    for _ in range(power_iterations):  # the largest singular value left after removing the cached top triples
        x = x / torch.linalg.vector_norm(x)
        y = W64 @ x - U @ (S * (V.T @ x))
        rest = float(torch.linalg.vector_norm(y))
        x = W64.T @ y - V @ (S * (U.T @ y))
    if rest > float(S[-1]) + (VERIFY_TOLERANCE + approximation) * sigma_1:
        return f"W keeps a singular value {rest:.4g} above the last cached σ_k = {float(S[-1]):.4g}: triples missing"
    if abs(measured - entry["residual"]) > VERIFY_TOLERANCE:
        return f"its recorded residual {entry['residual']:.2e} is not the measured {measured:.2e}"
    return None


class SVDCache:
    """Top/bottom singular triples of weight matrices, cached under `root/svd/` (root: a cache root, oplora.cache)."""

    def __init__(self, root: str | Path | None = None, mode: str = "exact", min_rank: int = 128,
                 oversample: int | None = None, niter: int = 6, device: str | torch.device = "auto"):
        if mode not in MODES:
            raise ValueError(f"unknown SVD mode {mode!r}; valid modes: {', '.join(MODES)}")
        self.cache = Cache(root) if root else Cache.default()  # its place in the cache (LoRA-Null's null spaces too)
        self.dir = self.cache.svd
        self.mode, self.min_rank, self.oversample, self.niter = mode, min_rank, oversample, niter
        self.device = resolve_device(device)

    @classmethod
    def default(cls) -> "SVDCache":
        return cls()

    def top(self, W: torch.Tensor, k: int, name: str = "") -> Triples:
        """The k largest singular triples of W, on W's device (computed and verified on the cache's device)."""
        entry = self._entry(W.to(self.device), top=k, bottom=0, name=name)
        U, S, V = (entry[f"{x}_top"].to(W.device) for x in "USV")
        return Triples(U[:, :k], S[:k], V[:, :k], entry["residual"])

    def bottom(self, W: torch.Tensor, r: int, name: str = "") -> Triples:
        """The r smallest singular triples, ordered largest first (as MiLoRA uses them)."""
        entry = self._entry(W.to(self.device), top=0, bottom=r, name=name)
        U, S, V = (entry[f"{x}_bot"].to(W.device) for x in "USV")
        return Triples(U[:, -r:], S[-r:], V[:, -r:], 0.0)

    def has(self, W: torch.Tensor, top: int, bottom: int = 0) -> bool:
        """Whether the cache already holds `top` largest and `bottom` smallest triples of W (verified)."""
        W = W.to(self.device)
        return self._covers(self._load(self._path(W), W), top, bottom)

    # -- internals ---------------------------------------------------------------------------
    def _path(self, W: torch.Tensor) -> Path:
        return self.dir / f"{matrix_key(W)}-{self.mode}.safetensors"

    def _entry(self, W: torch.Tensor, top: int, bottom: int, name: str) -> dict:
        rank = min(W.shape)
        if max(top, bottom) > rank:
            raise ValueError(f"{name or 'matrix'} {tuple(W.shape)} has only {rank} singular triples")
        path = self._path(W)
        entry = self._load(path, W)
        if not self._covers(entry, top, bottom):
            path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(path) + ".lock"):
                entry = self._load(path, W)  # another process may have written it meanwhile
                if not self._covers(entry, top, bottom):
                    have_top, have_bottom = (entry["top"], entry["bottom"]) if entry else (0, 0)
                    entry = self._compute(W, max(top, have_top), max(bottom, have_bottom), name)
                    self._save(path, entry)
        return entry

    @staticmethod
    def _covers(entry: dict | None, top: int, bottom: int) -> bool:
        return entry is not None and entry["top"] >= top and entry["bottom"] >= bottom

    def _compute(self, W: torch.Tensor, top: int, bottom: int, name: str) -> dict:
        rank = min(W.shape)
        top = min(rank, max(top, self.min_rank)) if top else 0
        start = time.perf_counter()
        W64 = W.detach().double()
        oversample = top if self.oversample is None else self.oversample
        with all_cores(W.device):
            if self.mode == "exact" or bottom:
                U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
                V = Vh.T
                bottom = min(rank, max(bottom, self.min_rank))
                top = top or min(rank, self.min_rank)
            elif self.mode == "refined":
                U, S, V = refined_top(W64, top, oversample, self.niter)  # one float64 copy of W
            else:
                lowrank = self.mode == "lowrank"
                with torch.random.fork_rng(devices=[W.device] if W.is_cuda else []):
                    torch.manual_seed(0)  # the same matrix always gets the same triples
                    U, S, V = torch.svd_lowrank(W.detach().float() if lowrank else W64,
                                                q=top if lowrank else min(rank, top + oversample),
                                                niter=LOWRANK_NITER if lowrank else self.niter)
            if W.is_cuda:
                torch.cuda.synchronize(W.device)
            seconds = time.perf_counter() - start
            residual = triple_residual(W64, U[:, :top], S[:top], V[:, :top])
        if self.mode != "exact":
            log.info("%s SVD of %s: top-%d residual %.2e (%.2fs)", self.mode, name, top, residual, seconds)
        f32 = lambda t: t.float().contiguous()  # noqa: E731
        entry = {"U_top": f32(U[:, :top]), "S_top": f32(S[:top]), "V_top": f32(V[:, :top]),
                 "top": top, "bottom": bottom,
                 "residual": residual, "seconds": seconds, "name": name}
        if bottom:
            entry.update(U_bot=f32(U[:, -bottom:]), S_bot=f32(S[-bottom:]), V_bot=f32(V[:, -bottom:]))
        return entry

    @staticmethod
    def _save(path: Path, entry: dict) -> None:
        tensors = {k: v.cpu() for k, v in entry.items() if isinstance(v, torch.Tensor)}
        meta = {k: v for k, v in entry.items() if not isinstance(v, torch.Tensor)}
        meta["checksums"] = tensor_checksums(tensors)
        with atomic_file(path) as tmp:
            save_file(tensors, tmp, metadata={"oplora": json.dumps(meta)})

    def _load(self, path: Path, W: torch.Tensor) -> dict | None:
        """The entry at `path`, verified against its checksums and against W; None (with a warning) if it fails."""
        if not path.exists():
            return None
        try:
            tensors = load_file(path, device=str(W.device))
            with safe_open(path, "pt") as f:
                entry = json.loads(f.metadata()["oplora"])
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
            log.warning("ignoring unreadable SVD cache file %s (%s); recomputing", path, err)
            return None
        checksums = entry.pop("checksums", None)
        if checksums is None:
            problem = "no stored checksums (written by an older version)"
        elif bad := [name for name, sum_ in tensor_checksums(tensors).items() if checksums.get(name) != sum_]:
            problem = f"checksum mismatch in {', '.join(bad)}"
        else:
            problem = verify(W, {**entry, **tensors}, self.mode)
        if problem:
            log.warning("SVD cache file %s fails verification (%s); recomputing", path, problem)
            return None
        return {**entry, **tensors}


def target_weights(cfg: DictConfig) -> LazyWeights:
    """Every adapted weight matrix of the base model, read one at a time in the dtype training sees."""
    base = resolve(cfg.model.path)
    names = [k.removesuffix(".weight") for k in sorted(weight_files(base))
             if k.endswith(".weight") and k.rsplit(".", 2)[-2] in cfg.model.target_modules]
    return LazyWeights(base, names, getattr(torch, compute_dtype(cfg.model)))


def svd_step(cfg: DictConfig, cells: dict) -> bool:
    """The singular triples every method of the grid and figure 2a need, computed once into the cache; with
    `pipeline.svd_shards=n`, `pipeline.shard=i` does the layers of shard i (a SLURM array task each)."""
    settings = [adapter_settings(c) for c in cells.values() if trains(c.method)]

    def needs(shape: tuple[int, int]) -> tuple[int, int]:
        wanted = [get_method(s.method).svd_needs(s, shape) for s in settings]
        return max([max(cfg.pipeline.rho_ks), *(t for t, _ in wanted)]), max((b for _, b in wanted), default=0)

    weights = target_weights(cfg)
    shards = cfg.pipeline.svd_shards
    shard_list = [cfg.pipeline.shard] if cfg.pipeline.shard is not None else range(shards)
    svd = SVDCache(Cache.of(cfg).root, mode=cfg.svd_mode)
    return sum(build(svd, list(weights), weights.__getitem__, needs, shard, shards) for shard in shard_list) > 0

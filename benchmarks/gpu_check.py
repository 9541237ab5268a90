"""GPU check (issue 10): every method on CUDA against the CPU, on Llama-3-8B-shaped tensors.

Imports only the merging library and builds two decoder layers of Llama-3-8B's shape in memory
(hidden 4096, MLP 14336, 8 KV heads of 128; no checkpoints): a bf16-valued base and three
fine-tunes whose deltas are a rank-64 part plus noise, so the SVD methods see a real spectrum.

Checks, each printed and failing the exit code when missed:
* every registered method's merged tensor on CUDA against the CPU's (``merging.api.merge_tensors``,
  float32): relative Frobenius error of the merged delta ≤ 1e-5 for element-wise methods,
  ≤ 1e-4 for the SVD and linear-solve methods. Element-wise methods are compared on q_proj,
  k_proj, down_proj and a norm of layer 0 (``--tensors``; gate/up have down's shape
  transposed), the SVD methods on the attention shapes (``--svd-tensors``), where the CPU's
  reference SVDs take seconds, not minutes;
* random methods (DARE, DELLA, ...) drop the same entries on both devices (the zero pattern
  of the merged delta is identical: masks are drawn on the CPU per tensor and moved);
* the ``gesvd`` fallback of ``kernels.svd.thin_svd`` runs on CUDA (forced) and matches the CPU;
* DRM-H and DRM-V with T = 3 over all seven matrices of each layer: time per layer and peak
  GPU memory, and ×32 for the whole 8B model's layers.

Usage (on a machine with CUDA; about 3-6 minutes on one GPU, most of it the CPU references)::

    benchmarks/gpu_check.sh                       # writes benchmarks/gpu_check.json
    .venv/bin/python benchmarks/gpu_check.py --quick --device cpu   # a smoke run of the script
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from merging.api import merge_tensors
from merging.kernels import svd as svd_kernels
from merging.registry import METHODS

LLAMA3_8B = {"hidden": 4096, "intermediate": 14336, "kv": 1024}
QUICK = {"hidden": 64, "intermediate": 160, "kv": 16}
MODELS = 3
SVD_TOLERANCE, ELEMENTWISE_TOLERANCE = 1e-4, 1e-5
LINEAR_ALGEBRA = {"regmean", "regmean_plusplus"}  # a linear solve: the SVD methods' tolerance

# method -> (fine-tuned inputs, shared parameters, per-model parameters or None, statistics kind or None)
SETTINGS: dict[str, tuple[int, dict, list[dict] | None, str | None]] = {
    "linear": (3, {}, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], None),
    "task_arithmetic": (3, {"lambda": 0.8}, None, None),
    "ties": (3, {"density": 0.3, "lambda": 1.0}, None, None),
    "dare_linear": (3, {"density": 0.5}, None, None),
    "dare_ties": (3, {"density": 0.5}, None, None),
    "breadcrumbs": (3, {"density": 0.8, "gamma": 0.05}, None, None),
    "breadcrumbs_ties": (3, {"density": 0.8, "gamma": 0.05}, None, None),
    "della": (3, {"density": 0.6, "epsilon": 0.1}, None, None),
    "della_linear": (3, {"density": 0.6, "epsilon": 0.1}, None, None),
    "slerp": (1, {"t": 0.3}, None, None),
    "nuslerp": (2, {}, [{"weight": 0.6}, {"weight": 0.4}], None),
    "multislerp": (3, {}, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], None),
    "karcher": (3, {"max_iter": 20}, None, None),
    "model_stock": (3, {}, None, None),
    "circuit_merge": (3, {"temperature": 0.3}, None, None),
    "consensus": (3, {"k": 2}, None, None),
    "tall_masks": (3, {"k": 1}, None, None),
    "sce": (3, {"select_topk": 0.5}, None, None),
    "nearswap": (1, {"t": 0.01}, None, None),
    "arcee_fusion": (1, {}, None, None),
    "passthrough": (1, {}, [{"scale": 0.9}], None),
    "ram": (3, {"epsilon": 0.01}, None, None),
    "ramplus_tl": (3, {"epsilon": 0.01, "r": 0.5, "alpha": 0.5}, None, None),
    "drm": (3, {"singular_matrices_drop_rate": 0.8}, None, None),
    "tsv_m": (3, {}, None, None),
    "iso_c": (3, {}, None, None),
    "iso_cts": (3, {"common_space_fraction": 0.7}, None, None),
    "scale_svd": (3, {"rank_ratio": 0.5}, None, None),
    "regmean": (3, {"alpha": 0.5}, None, "gram"),
    "regmean_plusplus": (2, {}, None, "gram"),
    "fisher": (3, {"eps": 1e-8}, None, "fisher"),
}


def layer_shapes(dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """The tensors of one Llama decoder layer: name -> shape."""
    h, i, kv = dims["hidden"], dims["intermediate"], dims["kv"]
    return {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}


def build_tensor(name: str, shape: tuple[int, ...], models: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A bf16-valued base and ``models`` fine-tunes of it: deltas of a rank-64 part plus noise."""
    g = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    if len(shape) == 1:
        base = (1 + 0.1 * torch.randn(shape, generator=g)).bfloat16().float()
        return base, [(base + 1e-3 * torch.randn(shape, generator=g)).bfloat16().float() for _ in range(models)]
    base = (0.02 * torch.randn(shape, generator=g)).bfloat16().float()
    fine = []
    rank = min(64, *shape)
    for _ in range(models):
        low = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g) / rank
        fine.append((base + 2e-3 * low + 2e-4 * torch.randn(shape, generator=g)).bfloat16().float())
    return base, fine


def statistics(kind: str | None, shape: tuple[int, ...], models: int) -> list[torch.Tensor] | None:
    """Per-model statistics of a tensor: RegMean's input Gram (in, in), Fisher's diagonal."""
    if kind is None or (kind == "gram" and len(shape) != 2):
        return None
    g = torch.Generator().manual_seed(31 * shape[-1] + len(shape))
    if kind == "fisher":
        return [torch.rand(shape, generator=g) + 1e-3 for _ in range(models)]
    out = []
    for _ in range(models):
        x = torch.randn(2 * shape[1], shape[1], generator=g)
        out.append(x.T @ x / x.shape[0])
    return out


def merge(method: str, base: torch.Tensor, fine: list[torch.Tensor], name: str, device: str) -> torch.Tensor:
    count, shared, per_model, stats_kind = SETTINGS[method]
    stats = statistics(stats_kind, tuple(base.shape), count)
    return merge_tensors(method, base.to(device), [f.to(device) for f in fine[:count]], shared, per_model, seed=0,
                         name=name, stats=None if stats is None else [s.to(device) for s in stats]).cpu()


def compare_methods(device: str, dims: dict[str, int], elementwise_tensors: set[str], svd_tensors: set[str]) -> list[dict]:
    """Every method on ``device`` against the CPU, on the named tensors of layer 0."""
    rows = []
    tensors = {f"model.layers.0.{k}": build_tensor(k, s, MODELS) for k, s in layer_shapes(dims).items()}
    for method in sorted(SETTINGS):
        spec = METHODS[method]
        svd_like = spec.has_decompose or method in LINEAR_ALGEBRA
        tolerance = SVD_TOLERANCE if svd_like else ELEMENTWISE_TOLERANCE
        for name, (base, fine) in tensors.items():
            if name.rsplit(".", 2)[-2] not in (svd_tensors if svd_like and base.dim() == 2 else elementwise_tensors):
                continue
            started = time.perf_counter()
            want = merge(method, base, fine, name, "cpu")
            got = merge(method, base, fine, name, device)
            want_delta, got_delta = want.double() - base.double(), got.double() - base.double()
            error = float((got_delta - want_delta).norm() / want_delta.norm().clamp_min(1e-30))
            same_mask = bool(torch.equal(want_delta == 0, got_delta == 0)) if spec.random else None
            ok = error <= tolerance and same_mask is not False
            rows.append({"method": method, "tensor": name, "relative_error": error, "tolerance": tolerance,
                         "same_mask": same_mask, "ok": ok, "seconds": round(time.perf_counter() - started, 3)})
            print(f"{'ok  ' if ok else 'FAIL'} {method:18s} {name:42s} rel {error:.2e} (≤ {tolerance:.0e})"
                  + ("" if same_mask is None else f" masks {'same' if same_mask else 'DIFFER'}"), flush=True)
    return rows


def check_gesvd_fallback(device: str, n: int = 256) -> dict:
    """``thin_svd``'s gesvd fallback forced on ``device`` on a matrix with repeated singular values."""
    g = torch.Generator().manual_seed(5)
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.cat([torch.ones(n // 2, dtype=torch.float64), torch.zeros(n - n // 2, dtype=torch.float64)])
    matrix = ((q1 * s) @ q2.T).float()
    real, calls = torch.linalg.svd, []

    def failing_default(a, full_matrices=True, *, driver=None, **kwargs):
        calls.append(driver)
        if driver is None:
            raise torch.linalg.LinAlgError("forced: the default driver did not converge")
        return real(a, full_matrices=full_matrices, driver=driver, **kwargs)

    torch.linalg.svd = failing_default
    try:
        u, sv, vh = svd_kernels.thin_svd(matrix.to(device))
    finally:
        torch.linalg.svd = real
    rebuilt = (u.double() * sv.double()) @ vh.double()
    error = float((rebuilt.cpu() - matrix.double()).norm() / matrix.double().norm())
    values = float((sv.cpu().double() - s).abs().max())
    used_gesvd = device == "cpu" or "gesvd" in calls
    ok = error <= 1e-5 and values <= 1e-5 and used_gesvd
    print(f"{'ok  ' if ok else 'FAIL'} gesvd fallback on {device}: reconstruction {error:.2e}, singular values "
          f"{values:.2e}, drivers tried {calls}", flush=True)
    return {"relative_error": error, "singular_value_error": values, "drivers": calls, "ok": ok}


def time_drm(device: str, dims: dict[str, int], layers: int) -> list[dict]:
    """DRM-H and DRM-V (T = 3) over every matrix of each layer: seconds and peak GPU memory."""
    rows = []
    cuda = device.startswith("cuda")
    for direction in ("horizontal", "vertical"):
        for layer in range(layers):
            tensors = {f"model.layers.{layer}.{k}": build_tensor(f"{layer}.{k}", s, MODELS)
                       for k, s in layer_shapes(dims).items() if len(s) == 2}
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            for name, (base, fine) in tensors.items():  # streamed: host -> device -> host, one tensor at a time
                merge_tensors("drm", base.to(device), [f.to(device) for f in fine], {
                    "direction": direction, "singular_matrices_drop_rate": 0.8}, name=name).cpu()
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
            rows.append({"direction": direction, "layer": layer, "seconds": round(seconds, 2),
                         "peak_gpu_mib": None if peak is None else round(peak), "whole_model_seconds": round(32 * seconds, 1)})
            print(f"DRM-{direction[0].upper()} layer {layer}: {seconds:.2f} s, peak GPU memory "
                  f"{'n/a' if peak is None else f'{peak:.0f} MiB'}; x32 layers: {32 * seconds:.0f} s", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N; cpu only for a smoke run")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run of the script)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tensors", default="q_proj,k_proj,down_proj,input_layernorm",
                        help="layer-0 tensors the element-wise methods are compared on (gate/up are down's shape, transposed)")
    parser.add_argument("--svd-tensors", default="q_proj,k_proj",
                        help="layer-0 matrices the SVD methods are compared on (CPU SVDs of the MLP shapes take minutes)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("gpu_check.json"))
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine (use --device cpu --quick for a smoke run)", file=sys.stderr)
        return 2
    dims = QUICK if args.quick else LLAMA3_8B
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    report = {"device": args.device, "dims": dims, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
              "methods": compare_methods(args.device, dims, set(args.tensors.split(",")), set(args.svd_tensors.split(","))),
              "gesvd_fallback": check_gesvd_fallback(args.device),
              "drm": time_drm(args.device, dims, args.layers)}
    report["seconds"] = round(time.perf_counter() - started, 1)
    failed = [r for r in report["methods"] if not r["ok"]] + ([report["gesvd_fallback"]] if not report["gesvd_fallback"]["ok"] else [])
    report["ok"] = not failed
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'all checks passed' if not failed else f'{len(failed)} check(s) FAILED'} in {report['seconds']} s; "
          f"report: {args.out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())

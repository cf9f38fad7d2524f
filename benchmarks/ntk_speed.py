"""Empirical-NTK speed, memory and accuracy: torch_crit against the PyTorch recipes, side by side.

One run, same model, weights and inputs for every method; each (config, method) runs in its
own subprocess so that its peak RSS (``ru_maxrss``) is its own. Per method: 1 warm-up call,
then the median of 3 timed calls; the max relative error ``max|Θ−Θ_ref| / max|Θ_ref|`` on the
first ≤128 examples against a float64 reference (torch_crit's structured path in float64,
itself checked against brute-force autograd Jacobians to 1e-10 in tests/ntk).

Methods:
    jc            torch.func tutorial, Jacobian contraction (vmap(jacrev) + einsum per parameter)
    ntkvp         torch.func tutorial, NTK-vector products (verbatim; skipped when its
                  N²·k·max-layer-P expansion exceeds the memory budget)
    nngeometry    nngeometry 0.4 ``GramMatrix`` (dense), if installed
    generic       torch_crit.empirical_ntk(method="generic")
    struct_torch  torch_crit.empirical_ntk(method="structured", backend="torch")
    struct_ext    torch_crit.empirical_ntk(method="structured", backend="ext") (C++/CUDA kernel)

Usage::

    python benchmarks/ntk_speed.py            # full CPU run (tens of minutes on 2 cores)
    python benchmarks/ntk_speed.py --quick    # small smoke run (~1 min)
    python benchmarks/ntk_speed.py --device cuda   # GPU configs incl. 3072→2048×3→8, N=16

Writes ``benchmarks/results/ntk_speed.json`` (``ntk_speed_quick.json`` / ``ntk_speed_cuda.json``)
after every finished row (atomic), and prints a table with /work/shared/baselines.md's numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _common import write_results  # noqa: E402

BUDGET = 12 * 2**30  # skip methods whose predicted memory exceeds this (24 GiB machine)

# Baselines measured on this machine (/work/shared/baselines.md), seconds, float32 medians.
BASELINES = {
    "mlp512_N64_full": "baselines.md has no n=512; nearest: N=64,L=8,n=256,k=10 tanh: JC 4.23 s, NTK-VP 78.6 s, "
    "nngeometry 0.203 s, NT SD 0.0423 s, eager structured 0.0221 s; n=1024: nngeometry 1.78 s, NT SD 0.295 s, eager 0.14 s",
    "mlp512_N1024_full": "no baseline at N=1024 (largest: N=256,L=8,n=1024,k=10: nngeometry 6.1 s, NT SD 2.36 s, eager 1.58 s)",
    "mlp512_N4096_trace": "no baseline at N=4096 (N=256,L=8,n=1024,k=10 trace: NT SD 0.968 s (relu), eager 0.439 s)",
    "cnn_N64_full": "no CNN baseline in baselines.md",
    "cnn_N4096_trace": "no CNN baseline in baselines.md",
    "fcn3072_N16_full": "neural-tangents SD 3.46 ms, NTK-VP 81.4 ms, JC 243 ms on an NVIDIA T4 (anchors.md §4.1)",
}


# ----------------------------------------------------------------------------- configs


def configs(quick: bool, device: str) -> List[Dict[str, Any]]:
    if quick:
        return [
            dict(name="mlp_quick_N32_full", model="mlp", d=32, width=64, depth=3, k=10, N=32, output="full",
                 methods=["jc", "ntkvp", "nngeometry", "generic", "struct_torch", "struct_ext"]),
            dict(name="cnn_quick_N16_full", model="cnn", width=8, k=10, N=16, output="full",
                 methods=["jc", "generic", "struct_torch", "struct_ext"]),
        ]
    if device == "cuda":
        return [
            dict(name="fcn3072_N16_full", model="mlp", d=3072, width=2048, depth=3, k=8, N=16, output="full",
                 act="relu", methods=["jc", "ntkvp", "generic", "struct_torch", "struct_ext"]),
            dict(name="mlp512_N1024_full", model="mlp", d=64, width=512, depth=8, k=10, N=1024, output="full",
                 methods=["struct_torch", "struct_ext"]),
            dict(name="cnn_N64_full", model="cnn", width=16, k=10, N=64, output="full",
                 methods=["jc", "struct_torch", "struct_ext"]),
        ]
    return [
        dict(name="mlp512_N64_full", model="mlp", d=64, width=512, depth=8, k=10, N=64, output="full",
             methods=["jc", "ntkvp", "nngeometry", "generic", "struct_torch", "struct_ext"]),
        dict(name="cnn_N64_full", model="cnn", width=16, k=10, N=64, output="full",
             methods=["jc", "nngeometry", "generic", "struct_torch", "struct_ext"]),
        dict(name="cnn64_N64_full", model="cnn", width=64, k=10, N=64, output="full",
             methods=["jc", "generic", "struct_torch", "struct_ext"]),
        dict(name="mlp512_N1024_full", model="mlp", d=64, width=512, depth=8, k=10, N=1024, output="full",
             methods=["jc", "struct_torch", "struct_ext"]),
        dict(name="mlp512_N4096_trace", model="mlp", d=64, width=512, depth=8, k=10, N=4096, output="trace",
             methods=["struct_torch", "struct_ext"]),
        dict(name="cnn_N4096_trace", model="cnn", width=16, k=10, N=4096, output="trace",
             methods=["struct_ext"]),
    ]


def build(cfg: Dict[str, Any], device: str, dtype):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if cfg["model"] == "mlp":
        act = nn.Tanh if cfg.get("act", "tanh") == "tanh" else nn.ReLU
        layers: List[nn.Module] = []
        fan = cfg["d"]
        for _ in range(cfg["depth"]):
            layers += [nn.Linear(fan, cfg["width"]), act()]
            fan = cfg["width"]
        layers.append(nn.Linear(fan, cfg["k"]))
        net = nn.Sequential(*layers)
        x = torch.randn(cfg["N"], cfg["d"], generator=torch.Generator().manual_seed(1))
    else:
        w = cfg["width"]
        net = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * w * 16, cfg["k"]),
        )
        x = torch.randn(cfg["N"], 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return net.to(device=device, dtype=dtype).eval(), x.to(device=device, dtype=dtype)


def n_params(cfg: Dict[str, Any]) -> int:
    import torch

    net, _ = build({**cfg, "N": 1}, "cpu", torch.float32)
    return sum(p.numel() for p in net.parameters())


def predicted_bytes(cfg: Dict[str, Any], method: str) -> Optional[int]:
    """Memory the per-sample-Jacobian recipes need (None: no skip rule)."""
    import torch

    N, k = cfg["N"], cfg["k"]
    P = n_params(cfg)
    if method == "jc":
        return 2 * N * k * P * 4  # J plus vmap(jacrev) intermediates
    if method == "ntkvp":
        net, _ = build({**cfg, "N": 1}, "cpu", torch.float32)
        return N * N * k * max(p.numel() for p in net.parameters()) * 4
    if method == "generic":
        return 2 * N * k * P * 4
    return None


# ----------------------------------------------------------------------------- methods


def run_method(method: str, net, x, output: str):
    import torch
    from torch.func import functional_call, jacrev, jvp, vjp, vmap

    import torch_crit

    params = {k: v.detach() for k, v in net.named_parameters()}

    def fnet_single(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    if method == "jc":  # torch.func tutorial, "Jacobian contraction" (jac2 = jac1 for Θ(X, X))
        jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x)
        jac1 = [j.flatten(2) for j in jac1.values()]
        expr = "Naf,Mbf->NMab" if output == "full" else "Naf,Maf->NM"
        return torch.stack([torch.einsum(expr, j1, j1) for j1 in jac1]).sum(0)
    if method == "ntkvp":  # torch.func tutorial, "NTK-vector products", verbatim
        def get_ntk(x1, x2):
            def func_x1(params):
                return fnet_single(params, x1)

            def func_x2(params):
                return fnet_single(params, x2)

            output_, vjp_fn = vjp(func_x1, params)

            def get_ntk_slice(vec):
                vjps = vjp_fn(vec)
                _, jvps = jvp(func_x2, (params,), vjps)
                return jvps

            basis = torch.eye(output_.numel(), dtype=output_.dtype, device=output_.device).view(output_.numel(), -1)
            return vmap(get_ntk_slice)(basis)

        result = vmap(vmap(get_ntk, (None, 0)), (0, None))(x, x)
        return result if output == "full" else torch.einsum("NMKK->NM", result)
    if method == "nngeometry":
        from nngeometry import GramMatrix

        G = GramMatrix(net, (x,)).data  # [k, N, k, N]
        G = G.permute(1, 3, 0, 2)
        return G if output == "full" else G.diagonal(dim1=2, dim2=3).sum(-1)
    if method == "generic":
        return torch_crit.empirical_ntk(net, x, output=output, method="generic")
    if method == "struct_torch":
        return torch_crit.empirical_ntk(net, x, output=output, method="structured", backend="torch")
    if method in ("struct_ext", "ref64"):
        return torch_crit.empirical_ntk(net, x, output=output, method="structured", backend="ext")
    raise ValueError(method)


def child(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    cfg, method, device = spec["cfg"], spec["method"], spec["device"]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if method == "ref64":
        cfg = {**cfg, "N": min(cfg["N"], 128)}
        net, x = build(cfg, device, torch.float64)
        out = run_method("ref64", net, x, cfg["output"])
        torch.save(out.cpu(), spec["save"])
        return {"ok": True}
    net, x = build(cfg, device, torch.float32)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = run_method(method, net, x, cfg["output"])
    sync()
    first = time.perf_counter() - t0
    times = []
    reps = 0 if first > 60 else 3  # a call over 60 s is timed once (its first call; marked †)
    if reps == 0:
        times = [first]
    for _ in range(reps):
        del out
        t0 = time.perf_counter()
        out = run_method(method, net, x, cfg["output"])
        sync()
        times.append(time.perf_counter() - t0)
    n = min(cfg["N"], 128)
    sub = out[:n, :n].detach().double().cpu()
    torch.save(sub, spec["save"])
    res = {"ok": True, "first_call_s": first, "times_s": times, "median_s": statistics.median(times),
           "maxrss_before_mib": rss0 / 1024, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "shape": list(out.shape), "single_call": reps == 0}
    if device == "cuda":
        res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def spawn(spec: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"ok": False, "error": f"exit {p.returncode}: " + " | ".join(tail)[-400:]}
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--only", default=None, help="comma-separated config names")
    ap.add_argument("--methods", default=None, help="comma-separated methods subset")
    ap.add_argument("--timeout", type=float, default=900.0, help="per-method subprocess limit, s")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return

    import torch

    import torch_crit._ops as ops

    name = "ntk_speed" + ("_quick" if args.quick else "") + ("_cuda" if args.device == "cuda" else "")
    cfgs = configs(args.quick, args.device)
    if args.only:
        keep = set(args.only.split(","))
        cfgs = [c for c in cfgs if c["name"] in keep]
    try:
        import nngeometry  # noqa: F401

        have_nngeom = True
    except ImportError:
        have_nngeom = False
    rows: List[Dict[str, Any]] = []
    if args.only or args.methods:  # a partial run replaces its own rows and keeps the others
        old = HERE / "results" / f"{name}.json"
        if old.exists():
            wanted = {(c["name"], m) for c in cfgs for m in c["methods"]
                      if not args.methods or m in args.methods.split(",")}
            rows.extend(r for r in json.loads(old.read_text()).get("rows", [])
                        if (r.get("config"), r.get("method")) not in wanted)
    payload: Dict[str, Any] = {"rows": rows, "baselines": BASELINES, "load_average_at_start": list(os.getloadavg()),
                               "notes": [
        "float32 timings, median of 3 after 1 warm-up (a first call over 60 s is timed once: single_call, †); "
        "peak RSS per method subprocess (ru_maxrss, MiB)",
        "rel_err = max|Θ−Θ_ref|/max|Θ_ref| on the first ≤128 examples vs torch_crit float64 structured; "
        "for the ReLU CNN it is set by a few pre-activations within ~1e-8 of the kink whose sign differs "
        "between float32 and float64 (a cotangent entry flips to 0), so it varies by method/summation order "
        "between ~2e-7 and ~3e-4",
        "load_average_at_start: the 1/5/15-min load of the machine when the run began (2 cores; "
        "above ~0.5 other jobs shared the cores and timings include that load)",
        f"C++ extension loaded: {ops.HAS_EXT}",
    ]}
    tmp = Path(tempfile.mkdtemp(prefix="ntk_speed_"))
    for cfg in cfgs:
        P = n_params(cfg)
        print(f"\n== {cfg['name']}: {cfg['model']} P={P:,} N={cfg['N']} k={cfg['k']} output={cfg['output']} "
              f"device={args.device}", flush=True)
        print(f"   baseline: {BASELINES.get(cfg['name'], '-')}", flush=True)
        ref_path = tmp / f"{cfg['name']}_ref.pt"
        r = spawn({"cfg": cfg, "method": "ref64", "device": args.device, "save": str(ref_path)}, args.timeout)
        ref = torch.load(ref_path) if r.get("ok") else None
        methods = cfg["methods"] if not args.methods else [m for m in cfg["methods"] if m in args.methods.split(",")]
        results: Dict[str, Dict[str, Any]] = {}
        for m in methods:
            row: Dict[str, Any] = {"config": cfg["name"], "method": m, "P": P, **{k: cfg[k] for k in ("N", "k", "output")}}
            pred = predicted_bytes(cfg, m)
            if m == "nngeometry" and not have_nngeom:
                row.update(ok=False, skipped="nngeometry not installed (.venv/bin/pip install --no-deps nngeometry)")
            elif m == "nngeometry" and args.device == "cuda":
                row.update(ok=False, skipped="nngeometry run on CPU only")
            elif pred is not None and pred > BUDGET:
                row.update(ok=False, skipped=f"predicted memory {pred / 2**30:.1f} GiB > {BUDGET / 2**30:.0f} GiB budget")
            else:
                save = tmp / f"{cfg['name']}_{m}.pt"
                res = spawn({"cfg": cfg, "method": m, "device": args.device, "save": str(save)}, args.timeout)
                row.update(res)
                if res.get("ok") and ref is not None:
                    got = torch.load(save)
                    row["rel_err"] = float((got - ref).abs().max() / ref.abs().max())
                    save.unlink()
            results[m] = row
            rows.append(row)
            msg = (f"{row['median_s']:.4g} s, RSS {row['maxrss_mib']:.0f} MiB, rel err {row.get('rel_err', float('nan')):.2g}"
                   if row.get("ok") else f"skipped: {row.get('skipped') or row.get('error')}")
            print(f"   {m:13s} {msg}", flush=True)
            _write(name, payload)
        # speed-ups against the recipes, per config
        ours = results.get("struct_ext", {})
        if ours.get("ok"):
            for other in ("jc", "ntkvp", "nngeometry", "generic", "struct_torch"):
                o = results.get(other, {})
                if o.get("ok"):
                    ours.setdefault("speedup_over", {})[other] = o["median_s"] / ours["median_s"]
                    ours.setdefault("rss_ratio", {})[other] = o["maxrss_mib"] / ours["maxrss_mib"]
        _write(name, payload)
    print_table(rows)
    write_results(name, payload)


def _write(name: str, payload: Dict[str, Any]) -> None:
    from torch_crit._io import atomic_write_json

    atomic_write_json(HERE / "results" / f"{name}.json", payload)


def print_table(rows: List[Dict[str, Any]]) -> None:
    print("\n| config | method | P | N | k | output | median s | first s | peak RSS MiB | rel err | struct_ext speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("ok"):
            sp = ", ".join(f"{k} {v:.3g}×" for k, v in r.get("speedup_over", {}).items())
            print(f"| {r['config']} | {r['method']} | {r['P']:,} | {r['N']} | {r['k']} | {r['output']} | "
                  f"{r['median_s']:.4g}{'†' if r.get('single_call') else ''} | {r['first_call_s']:.3g} | {r['maxrss_mib']:.0f} | "
                  f"{r.get('rel_err', float('nan')):.2g} | {sp} |")
        else:
            print(f"| {r['config']} | {r['method']} | {r['P']:,} | {r['N']} | {r['k']} | {r['output']} | "
                  f"– | – | – | – | {r.get('skipped') or r.get('error')} |")


if __name__ == "__main__":
    main()

r"""``torch-crit critical ACT [ACT ...]``: critical points of activations as a table or JSON.

Each row: universality class, :math:`C_b`, :math:`C_W`, :math:`K^\star`, the main critical
exponents, :math:`\nu` of (A.69)/(A.70), and the :math:`\ell`/:math:`L` scalings of the
learning-rate equivalence principle (9.94)–(9.96). Activations are given as ``name``,
``name:value`` (``leaky_relu:0.1``, ``monomial:3``, ``elu:0.5``) or ``name:key=value``.
Non-critical activations print their reason and the nearest usable setting.

Example:
    $ torch-crit critical relu tanh sigmoid --json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from .activations import parse_activation_spec
from .criticality import NoCriticalPointError, critical_point
from .learning_rates import learning_rate_scaling
from .residual import residual_critical_point

__all__ = ["DEFAULT_ACTIVATIONS", "add_arguments", "run", "rows"]

DEFAULT_ACTIVATIONS = (
    "relu", "leaky_relu:0.1", "linear", "tanh", "sin", "erf", "swish", "gelu", "gelu_tanh",
    "elu", "selu", "sigmoid", "softplus", "monomial:3",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``critical`` sub-command's arguments on ``parser``."""
    parser.add_argument("activations", nargs="*", metavar="ACT",
                        help="activations, e.g. relu leaky_relu:0.1 monomial:3 (default: a common list)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--gamma", type=float, default=0.0,
                        help="residual strength gamma of a residual MLP (Appendix B); default 0")


def _fmt(v: Any, digits: int = 8) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}g}"
    return str(v)


def rows(specs: list[str], gamma: float = 0.0) -> list[dict[str, Any]]:
    """One JSON-friendly dict per activation spec (never raises for non-critical activations)."""
    out: list[dict[str, Any]] = []
    for spec in specs:
        try:
            act = parse_activation_spec(spec)
        except (ValueError, TypeError) as exc:
            out.append({"spec": spec, "error": str(exc)})
            continue
        try:
            cp = critical_point(act)
            if gamma:
                cp = residual_critical_point(cp, gamma)
            sc = learning_rate_scaling(cp)
            row = cp.as_dict()
            row["spec"] = spec
            row["learning_rates"] = {
                "bias": {"layer_exp": sc.bias_layer_exp, "depth_exp": sc.bias_depth_exp},
                "weight": {"layer_exp": sc.weight_layer_exp, "depth_exp": sc.weight_depth_exp},
                "equation": sc.equation,
            }
            out.append(row)
        except NoCriticalPointError as err:
            row = err.nearest.as_dict()
            row.update(spec=spec, reason=err.reason, suggestion=err.suggestion)
            out.append(row)
        except ValueError as exc:
            out.append({"spec": spec, "activation": act.key, "error": str(exc)})
    return out


def _table(data: list[dict[str, Any]]) -> str:
    head = ["activation", "class", "C_b", "C_W", "K*", "p0", "p_perp", "nu", "lambda_b", "lambda_W"]
    lines: list[list[str]] = []
    notes: list[str] = []
    for r in data:
        if "error" in r:
            lines.append([r.get("activation", r["spec"]), "error"] + ["-"] * (len(head) - 2))
            notes.append(f"{r['spec']}: {r['error']}")
            continue
        ex = r.get("exponents") or {}
        lr = r.get("learning_rates")
        lb = f"l^{lr['bias']['layer_exp']:g} L^{lr['bias']['depth_exp']:g}" if lr else "-"
        lw = f"l^{lr['weight']['layer_exp']:g} L^{lr['weight']['depth_exp']:g}" if lr else "-"
        k_star = r["K_star"] if r["K_star"] is not None else ("any" if r["universality_class"] == "scale_invariant" else None)
        cls = r["universality_class"] if "reason" not in r else "none (nearest)"
        lines.append([r["activation"], cls, _fmt(r["C_b"]), _fmt(r["C_W"]), _fmt(k_star),
                      _fmt(ex.get("p0")), _fmt(r.get("p_perp")), _fmt(r.get("nu"), 6), lb, lw])
        if "reason" in r:
            notes.append(f"{r['activation']}: {r['reason']} Suggestion: {r['suggestion']}")
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    text = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    text += [fmt.format(*l) for l in lines]
    if notes:
        text.append("")
        text += [f"* {n}" for n in notes]
    return "\n".join(text)


def run(args: argparse.Namespace) -> int:
    """Print the table (or JSON) for ``args.activations``; returns the exit status (0)."""
    specs = list(args.activations) or list(DEFAULT_ACTIVATIONS)
    gamma = float(getattr(args, "gamma", 0.0) or 0.0)
    try:
        data = rows(specs, gamma)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(_table(data))
    return 1 if any("error" in r for r in data) else 0

"""Cost-versus-size curves of the NIRVANA scoring pass (peak memory and wall time), lean vs straightforward.

Purpose: measure how the scoring pass's memory and time grow with model size and calibration tokens
on random-initialised Llama-architecture models at real shapes, fit a two-term growth model to the
measured peaks, compare it with the analytic model of ``scoring_memory.py`` and project
Llama-3.1-8B and Llama-3.1-70B. Also times the rest of a pruning run per size: allocation
(``plan_from_scores``), surgery (``cut``) and export (``save_pruned``).

Command (from the repository root; ~21 min on 2 CPU cores; writes docs/scaling.{json,png,md}):

    nice -n 19 .venv/bin/python benchmarks/scaling.py

    --quick                  tiny shapes, seconds, writes to /tmp/scaling-quick (a check that it works)
    --sizes 135m,1b          which shapes (see SHAPES)
    --windows 8 135m=8,32,128   calibration windows: a default list for every size, then per-size lists
    --lean-only 3b           sizes whose straightforward runs are dropped
    --render-only            redraw docs/scaling.{md,png} from an existing docs/scaling.json

Models: ``LlamaForCausalLM`` built from a ``LlamaConfig`` with the real model's shape (hidden,
layers, heads, KV heads, MLP width, vocabulary, tied embeddings), transformers' default
initialisation under ``torch.manual_seed(seed)``, in the dtype listed in SHAPES (SDPA attention).
Calibration: random token ids ``(windows, seq_len)`` from ``torch.Generator().manual_seed(seed)``.
The weights' values do not change the cost of scoring; the shapes do.

Measurement: the method of ``scoring_memory.py``, whose helpers this script imports. Every run
(one size, one window count, one approach) is a FRESH subprocess (this script re-invoked with
``--worker``); the parent imports nothing heavy (no torch) until every worker has finished, and the
analytic projections are computed in a worker too. A worker builds the model, draws the
calibration, runs one no-grad forward of one window, records VmRSS ("RSS after load"), resets the
kernel's RSS high-water mark (``/proc/self/clear_refs``), scores, and reads VmHWM ("scoring peak");
scoring delta = scoring peak - RSS after load. ``ru_maxrss`` (whole-process peak, building
included) is recorded as well. The first lean run of each size then times ``plan_from_scores``
(sparsity 0.2, gamma 3), ``cut`` and ``save_pruned`` into a temporary directory.

Memory guard: before each run the analytic projection (``project_scoring_memory``) of that run,
weights + ``--safety`` x (scoring memory) + 1 GiB of process overhead, is compared with the
machine's MemAvailable minus ``--margin-gib``; a run that would not fit is skipped and recorded
with the reason (there is no swap: an out-of-memory kill could hit other processes).

Fit, per approach, over every measured run (non-negative least squares on GiB, unweighted):

    scoring delta  =  a * W  +  c * A(tokens)

    W  weight bytes of the model as scored (dtype bytes x parameters)
    A  tokens x the analytic per-token activation bytes of that approach: the "activations" +
       "logits" components of project_scoring_memory (every layer's saved tensors and the full
       logits for straightforward; the checkpointed layer inputs, one recomputed layer and one
       vocabulary chunk for lean), so c = 1 means the analytic activation model is exact and
       a = (gradients held + reduction scratch) / W is what the analytic model expects.

Projected total peak = W + scoring delta (no process overhead; docs/results.md's 17.6 / 53.6 GiB for
Llama-3.1-8B are the same quantity from the analytic model), at bf16, 32 x 128 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scoring_memory import APPROACHES, GIB, LLAMA_31_8B, measure_scoring, project_scoring_memory

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
SMOL_VOCAB, LLAMA3_VOCAB = 49152, 128256


def llama(hidden, layers, heads, kv, inter, vocab, tied):
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab, "tie_word_embeddings": tied}


#: measured shapes: name -> label, dtype, LlamaConfig keyword arguments
SHAPES = {
    "135m": {"label": "SmolLM2-135M", "dtype": "float32", "config": llama(576, 30, 9, 3, 1536, SMOL_VOCAB, True)},
    "360m": {"label": "SmolLM2-360M", "dtype": "float32", "config": llama(960, 32, 15, 5, 2560, SMOL_VOCAB, True)},
    "1b": {"label": "Llama-3.2-1B", "dtype": "float32", "config": llama(2048, 16, 32, 8, 8192, LLAMA3_VOCAB, True)},
    "3b": {"label": "Llama-3.2-3B", "dtype": "bfloat16", "config": llama(3072, 28, 24, 8, 8192, LLAMA3_VOCAB, True)},
}
#: --quick shapes (seconds)
QUICK_SHAPES = {
    "tiny-s": {"label": "tiny-s", "dtype": "float32", "config": llama(64, 2, 4, 2, 128, 512, True)},
    "tiny-bf16": {"label": "tiny-bf16", "dtype": "bfloat16", "config": llama(96, 3, 4, 2, 192, 768, True)},
}
#: projected only (bf16, PROJECT_WINDOWS x seq_len tokens)
TARGETS = {
    "llama-3.1-8b": {"label": "Llama-3.1-8B", "config": {k: v for k, v in LLAMA_31_8B.items() if k != "head_dim"}},
    "llama-3.1-70b": {"label": "Llama-3.1-70B", "config": llama(8192, 80, 64, 8, 28672, LLAMA3_VOCAB, False)},
}
PROJECT_WINDOWS, PROJECT_DTYPE = 32, "bfloat16"
#: docs/results.md, "Scoring memory": Llama-3.1-8B, bf16, 32 x 128 tokens (project_scoring_memory)
README_8B_GIB = {"lean": 17.58, "straightforward": 53.56}
PLAN_SPARSITY, PLAN_GAMMA = 0.2, 3.0
OVERHEAD_GIB = 1.0  # Python, torch, the calibration: added to the memory guard's estimate


# --------------------------------------------------------------------------- workers (fresh processes)
def build_model(shape: dict, name: str, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**shape["config"])
    model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, shape["dtype"]))
    model.config._name_or_path = f"random-llama-{name}"
    return model.eval()


def run_worker(args: argparse.Namespace) -> None:
    """Build one model, score one calibration with one approach; optionally time plan, cut, export."""

    import torch

    from nirvana_lightning import save_pruned
    from nirvana_lightning.pruning.api import count_parameters, cut, plan_from_scores
    from nirvana_lightning.pruning.gradients import fingerprint

    shape = json.loads(args.shape_json)
    start = time.perf_counter()
    model = build_model(shape, args.size, args.seed)
    build_s = time.perf_counter() - start
    vocab = shape["config"]["vocab_size"]
    calibration = torch.randint(0, vocab, (args.n_window, args.seq_len),
                                generator=torch.Generator().manual_seed(args.seed))
    scores, measured = measure_scoring(model, calibration, APPROACHES[args.worker])
    result = {
        "size": args.size, "approach": args.worker, "n_window": args.n_window, "seq_len": args.seq_len,
        "dtype": shape["dtype"], "threads": torch.get_num_threads(), "params": count_parameters(model)["total"],
        "calibration_fingerprint": fingerprint([calibration]), "build_s": build_s, **measured,
    }
    if args.pipeline:
        timing = {}
        start = time.perf_counter()
        plan = plan_from_scores(model, scores, sparsity=PLAN_SPARSITY, gamma=PLAN_GAMMA)
        timing["plan_s"] = time.perf_counter() - start
        start = time.perf_counter()
        plan = cut(model, plan)
        timing["cut_s"] = time.perf_counter() - start
        with tempfile.TemporaryDirectory(prefix="scaling-export-") as tmp:
            start = time.perf_counter()
            out = save_pruned(model, None, Path(tmp) / "export", plan=plan)
            timing["export_s"] = time.perf_counter() - start
            timing["export_bytes"] = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
        timing.update(params_before=plan.provenance["params_before"], params_after=plan.provenance["params_after"],
                      realised_sparsity=plan.realised_sparsity, sparsity=PLAN_SPARSITY, gamma=PLAN_GAMMA)
        result["pipeline"] = timing
    Path(args.result_out).write_text(json.dumps(result))


def run_projection_worker(args: argparse.Namespace) -> None:
    """project_scoring_memory for every request in --project-in (it instantiates models on the meta device)."""
    from transformers import LlamaConfig

    requests = json.loads(Path(args.project_in).read_text())
    out = {}
    for key, req in requests.items():
        proj = project_scoring_memory(LlamaConfig(**req["config"]), req["n_token"], b=req["b"])
        out[key] = {**req, "projection": proj}
    Path(args.result_out).write_text(json.dumps(out))


# --------------------------------------------------------------------------- parent helpers
def meminfo_kib(field: str) -> int:
    """A field of /proc/meminfo in KiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def parse_windows(items: list[str], sizes: list[str]) -> dict[str, list[int]]:
    """``["8", "135m=8,32,128"]`` -> windows per size (a bare list is the default for every size)."""
    default, per_size = None, {}
    for item in items:
        name, _, values = item.rpartition("=")
        counts = [int(v) for v in values.split(",") if v]
        if not counts or min(counts) < 1:
            raise SystemExit(f"--windows: bad item {item!r}")
        if name:
            per_size[name] = counts
        else:
            default = counts
    unknown = sorted(set(per_size) - set(sizes))
    if unknown:
        print(f"[scaling] --windows: ignoring sizes not in --sizes: {unknown}", file=sys.stderr)
    out = {}
    for size in sizes:
        counts = per_size.get(size, default)
        if counts is None:
            raise SystemExit(f"--windows: no window count for size {size!r} (give a bare default list)")
        out[size] = list(dict.fromkeys(counts))
    return out


def spawn(cmd_args: list[str], workdir: Path, tag: str, timeout: float | None = None) -> dict:
    result_out = workdir / f"{tag}.json"
    cmd = [sys.executable, os.path.abspath(__file__), *cmd_args, "--result-out", str(result_out)]
    subprocess.run(cmd, check=True, timeout=timeout)
    return json.loads(result_out.read_text())


def analytic_key(size: str, n_token: int, b: int) -> str:
    return f"{size}|{n_token}|{b}"


def nnls_fit(rows: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares (scipy), imported only after every worker has finished."""
    import numpy as np
    from scipy.optimize import nnls

    coef, _ = nnls(np.asarray(rows, dtype=float), np.asarray(y, dtype=float))
    return [float(c) for c in coef]


def activation_bytes(proj: dict, approach: str) -> float:
    return proj[approach]["activations"] + proj[approach]["logits"]


def fit_and_project(data: dict) -> None:
    """Add ``fit`` and ``projections`` to ``data`` (in place) from its runs and analytic projections."""
    analytic = data["analytic"]
    runs = [r for r in data["runs"] if r.get("scoring_peak_kib") is not None]
    fits = {}
    for approach in APPROACHES:
        points = [r for r in runs if r["approach"] == approach]
        if len(points) < 2:
            fits[approach] = None
            continue
        rows, y = [], []
        for r in points:
            proj = analytic[analytic_key(r["size"], r["n_window"] * r["seq_len"], DTYPE_BYTES[r["dtype"]])]["projection"]
            rows.append([proj[approach]["weights"] / GIB, activation_bytes(proj, approach) / GIB])
            y.append((r["scoring_peak_kib"] - r["rss_after_load_kib"]) / 2**20)
        a, c = nnls_fit(rows, y)
        residual = [a * w + c * act - m for (w, act), m in zip(rows, y)]
        fits[approach] = {"a": a, "c": c, "n_points": len(points),
                          "max_abs_residual_gib": max(abs(e) for e in residual),
                          "max_rel_residual": max(abs(e) / m for e, m in zip(residual, y) if m > 0)}
        for r, (w, act), m in zip(points, rows, y):
            proj = analytic[analytic_key(r["size"], r["n_window"] * r["seq_len"], DTYPE_BYTES[r["dtype"]])]["projection"]
            r["scoring_delta_gib"] = m
            r["fit_delta_gib"] = a * w + c * act
            r["analytic_delta_gib"] = proj[approach]["total - weights"] / GIB
            r["weights_gib"] = w
    data["fit"] = {
        "model": "scoring delta = a * W + c * A; W = weight bytes, A = tokens x analytic per-token activation "
                 "bytes of the approach (project_scoring_memory activations + logits); non-negative least squares "
                 "on GiB, unweighted, over every measured run of the approach",
        "coefficients": fits,
    }
    projections = {}
    n_token = PROJECT_WINDOWS * data["settings"]["seq_len"]
    b = DTYPE_BYTES[PROJECT_DTYPE]
    for name, spec in {**data["shapes"], **data["targets"]}.items():
        proj = analytic[analytic_key(name, n_token, b)]["projection"]
        weights = proj["lean"]["weights"] / GIB
        entry = {"label": spec["label"], "params": proj["counts"]["params"], "weights_gib": weights,
                 "measured_size": name in data["shapes"]}
        for approach in APPROACHES:
            fit = fits[approach]
            entry[approach] = {
                "analytic_total_gib": proj[approach]["total"] / GIB,
                "analytic_delta_gib": proj[approach]["total - weights"] / GIB,
                "analytic_a": (proj[approach]["gradients held"] + proj[approach]["reduction scratch"])
                / proj[approach]["weights"],
                "fit_delta_gib": None if fit is None else fit["a"] * weights + fit["c"] * activation_bytes(
                    proj, approach) / GIB,
            }
            entry[approach]["fit_total_gib"] = (None if fit is None else weights + entry[approach]["fit_delta_gib"])
        projections[name] = entry
    data["projections"] = {"dtype": PROJECT_DTYPE, "n_window": PROJECT_WINDOWS, "seq_len": data["settings"]["seq_len"],
                           "readme_8b_gib": README_8B_GIB, "models": projections}


def target_notes(data: dict) -> list[str]:
    """Why the projection targets were not measured, with their memory and an extrapolated scoring time."""
    n_token = PROJECT_WINDOWS * data["settings"]["seq_len"]
    ram = data["machine"]["mem_total_kib"] / 2**20
    measured = [r for r in data["runs"] if r.get("wall_s") and r["approach"] == "lean"]
    ref = max(measured, key=lambda r: (r["dtype"] == PROJECT_DTYPE, r["params"] * r["n_window"]), default=None)
    notes = []
    fits = {}
    for name, spec in TARGETS.items():
        proj = data["analytic"][analytic_key(name, n_token, DTYPE_BYTES[PROJECT_DTYPE])]["projection"]
        totals = {a: proj[a]["total"] / GIB for a in APPROACHES}
        fits[name] = {a: t + OVERHEAD_GIB <= ram for a, t in totals.items()}
        note = (f"{spec['label']}: projected only. Analytic total at {PROJECT_DTYPE}, {PROJECT_WINDOWS} x "
                f"{data['settings']['seq_len']} tokens: "
                + ", ".join(f"{a} {t:.1f} GiB ({'would fit' if fits[name][a] else 'does not fit'} in this machine's "
                            f"{ram:.1f} GiB with {OVERHEAD_GIB:g} GiB of process overhead)" for a, t in totals.items()))
        if ref is not None:
            scale = proj["counts"]["params"] * n_token / (ref["params"] * ref["n_window"] * ref["seq_len"])
            note += (f". Lean scoring alone, extrapolated from the {ref['size']} lean run ({ref['dtype']}, "
                     f"{ref['n_window']} windows, {ref['wall_s']:.0f} s) by parameters x tokens, would take about "
                     f"{ref['wall_s'] * scale / 60:.0f} min on these 2 cores")
            if any(fits[name].values()):
                note += (f", beyond this run's time budget (--budget-s {data['settings']['budget_s']:.0f} s for "
                         "everything), so it was not attempted")
        notes.append(note + ".")
    windows = data["settings"]["windows"]
    swept = [s for s, w in windows.items() if len(w) > 1]
    single = [s for s, w in windows.items() if len(w) == 1]
    if swept and single:
        notes.append(f"Window sweep ({', '.join(f'{s}: ' + '/'.join(map(str, windows[s])) for s in swept)} windows) "
                     f"on {', '.join(swept)} only; {', '.join(single)} at "
                     f"{'/'.join(sorted({str(windows[s][0]) for s in single}))} windows only, to keep the whole run "
                     "within the time budget.")
    notes += [
        "Wall times are CPU times on this machine (2 cores, nice 19, other work running); they scale with the "
        "shapes but say nothing about a GPU.",
        "Scores are not compared between approaches here (random weights); benchmarks/scoring_memory.py checks "
        "that lean and straightforward agree on the real SmolLM2-135M.",
    ]
    return notes


# --------------------------------------------------------------------------- rendering
def g(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def render_plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def params_label(x, _pos=None):
        return f"{x / 1e9:g}B" if x >= 1e9 else f"{x / 1e6:g}M" if x >= 1e6 else f"{x:g}"

    def style(ax, params_axis: bool) -> None:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = (ax.get_xlim() if axis is ax.xaxis else ax.get_ylim())
            if hi / lo < 100:  # two decades or fewer: label 1-2-5 ticks, not only powers of ten
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(params_label if params_axis else lambda x, _pos: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)

    colors = {"lean": "tab:blue", "straightforward": "tab:red"}
    markers = {"lean": "o", "straightforward": "s"}
    runs = [r for r in data["runs"] if r.get("scoring_peak_kib") is not None]
    first_windows = {s: w[0] for s, w in data["settings"]["windows"].items()}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))

    # (a) measured: total scoring peak vs parameters at each size's first window count
    ax = axes[0]
    for approach in APPROACHES:
        pts = sorted((r for r in runs if r["approach"] == approach and r["n_window"] == first_windows[r["size"]]),
                     key=lambda r: r["params"])
        if not pts:
            continue
        x = [r["params"] for r in pts]
        base = [r["rss_after_load_kib"] / 2**20 for r in pts]
        ax.plot(x, [r["scoring_peak_kib"] / 2**20 for r in pts], markers[approach], color=colors[approach],
                ms=8, label=f"{approach}, measured")
        if "fit_delta_gib" in pts[0]:
            ax.plot(x, [b0 + r["fit_delta_gib"] for b0, r in zip(base, pts)], "-", color=colors[approach],
                    label=f"{approach}, fit")
            ax.plot(x, [b0 + r["analytic_delta_gib"] for b0, r in zip(base, pts)], ":", color=colors[approach],
                    label=f"{approach}, analytic")
        for r in pts:
            ax.annotate({"float32": "fp32", "bfloat16": "bf16"}.get(r["dtype"], r["dtype"]),
                        (r["params"], r["scoring_peak_kib"] / 2**20), textcoords="offset points", xytext=(6, -10),
                        fontsize=7)
    counts = sorted(set(first_windows.values()))
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="scoring peak RSS (GiB)",
           title=f"measured: scoring peak vs size\n({'/'.join(map(str, counts))} windows x "
                 f"{data['settings']['seq_len']} tokens; lines: RSS after load + model)")
    ax.legend(fontsize=7)
    style(ax, True)

    # (b) measured: scoring delta vs tokens for sizes with several window counts
    ax = axes[1]
    swept = [s for s, w in data["settings"]["windows"].items() if len(w) > 1]
    for size in swept:
        for approach in APPROACHES:
            pts = sorted((r for r in runs if r["approach"] == approach and r["size"] == size),
                         key=lambda r: r["n_window"])
            if not pts:
                continue
            x = [r["n_window"] * r["seq_len"] for r in pts]
            ax.plot(x, [r["scoring_delta_gib"] if "scoring_delta_gib" in r else
                        (r["scoring_peak_kib"] - r["rss_after_load_kib"]) / 2**20 for r in pts],
                    markers[approach], color=colors[approach], ms=8, label=f"{size} {approach}, measured")
            if "fit_delta_gib" in pts[0]:
                ax.plot(x, [r["fit_delta_gib"] for r in pts], "-", color=colors[approach], label=f"{size} {approach}, fit")
                ax.plot(x, [r["analytic_delta_gib"] for r in pts], ":", color=colors[approach],
                        label=f"{size} {approach}, analytic")
    ax.set(xscale="log", yscale="log", xlabel="calibration tokens", ylabel="scoring delta, peak - RSS after load (GiB)",
           title="measured: scoring memory vs tokens\n(" + (", ".join(swept) or "no window sweep") + ")")
    ax.legend(fontsize=7)
    style(ax, False)

    # (c) projected total at bf16, 32 x seq_len tokens
    ax = axes[2]
    proj = data["projections"]
    models = sorted(proj["models"].values(), key=lambda m: m["params"])
    x = [m["params"] for m in models]
    for approach in APPROACHES:
        if models[0][approach]["fit_total_gib"] is not None:
            ax.plot(x, [m[approach]["fit_total_gib"] for m in models], "-" + markers[approach], color=colors[approach],
                    label=f"{approach}, fit")
        ax.plot(x, [m[approach]["analytic_total_gib"] for m in models], ":", color=colors[approach],
                label=f"{approach}, analytic (project_scoring_memory)")
    ax.plot(x, [m["weights_gib"] for m in models], "--", color="gray", label="weights alone")
    target_8b = next((m for m in models if m["label"] == "Llama-3.1-8B"), None)
    if target_8b is not None:
        for approach in APPROACHES:
            ax.plot([target_8b["params"]], [proj["readme_8b_gib"][approach]], "*", color=colors[approach], ms=14,
                    mec="k", label=f"docs/results.md 8B {approach} ({proj['readme_8b_gib'][approach]} GiB)")
    ax.axhline(data["machine"]["mem_total_kib"] / 2**20, color="k", lw=0.8, alpha=0.5)
    ax.text(x[0], data["machine"]["mem_total_kib"] / 2**20 * 1.08, "this machine's RAM", fontsize=7)
    for m in models:
        ax.annotate(m["label"], (m["params"], m["weights_gib"]), textcoords="offset points", xytext=(4, -12),
                    fontsize=7, rotation=-30)
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="projected total peak = weights + scoring (GiB)",
           title=f"projected: {proj['dtype']}, {proj['n_window']} x {proj['seq_len']} tokens")
    ax.legend(fontsize=7, loc="upper left")
    style(ax, True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def both_ran(measured: list[dict]) -> list[tuple[dict, dict]]:
    """(lean, straightforward) pairs of runs of the same size and window count."""
    pairs = []
    for r in measured:
        other = next((o for o in measured if o["approach"] == "straightforward" and o["size"] == r["size"]
                      and o["n_window"] == r["n_window"]), None)
        if r["approach"] == "lean" and other is not None:
            pairs.append((r, other))
    return sorted(pairs, key=lambda p: (p[0]["params"], p[0]["n_window"]))


def summary(data: dict) -> str:
    """The page's opening paragraph: every number from ``data``."""
    measured = [r for r in data["runs"] if r.get("scoring_peak_kib") is not None]
    pairs = both_ran(measured)
    fits, proj = data["fit"]["coefficients"], data["projections"]
    out = []
    if pairs:
        mem = [lean["scoring_delta_gib"] / full["scoring_delta_gib"] for lean, full in pairs]
        wall = [lean["wall_s"] / full["wall_s"] for lean, full in pairs]
        out.append(f"Where both ran ({len(pairs)} size/window pairs), lean scoring needed {min(mem):.2f}-{max(mem):.2f} x "
                   f"the straightforward scoring memory and took {min(wall):.2f}-{max(wall):.2f} x its wall time on "
                   "this CPU (lean recomputes every layer's forward in backward and runs the head in vocabulary chunks).")
    ratios = {}
    for approach in APPROACHES:
        values = [r["scoring_delta_gib"] / r["analytic_delta_gib"] for r in measured
                  if r["approach"] == approach and "analytic_delta_gib" in r]
        if values:
            ratios[approach] = f"{approach} {min(values):.2f}-{max(values):.2f}"
    if ratios:
        out.append("Measured / analytic scoring memory: " + ", ".join(ratios.values()) + ". The analytic model "
                   "sums its components as if all were alive at once (straightforward can peak lower: activations "
                   "are freed while gradients accumulate) and ignores allocator slack (a large share of lean's "
                   "small scoring memory).")
    if all(fits.values()):
        out.append(f"Fitted: lean delta = {fits['lean']['a']:.3f} W + {fits['lean']['c']:.2f} A, straightforward "
                   f"delta = {fits['straightforward']['a']:.3f} W + {fits['straightforward']['c']:.2f} A.")
        for m in proj["models"].values():
            if m["measured_size"]:
                continue
            line = (f"{m['label']} ({proj['dtype']}, {proj['n_window']} x {proj['seq_len']}): lean "
                    f"{m['lean']['fit_total_gib']:.1f} GiB by the fit vs {m['lean']['analytic_total_gib']:.1f} GiB "
                    f"analytic, straightforward {m['straightforward']['fit_total_gib']:.1f} vs "
                    f"{m['straightforward']['analytic_total_gib']:.1f} GiB")
            if m["label"] == "Llama-3.1-8B":
                line += (f" (docs/results.md: {proj['readme_8b_gib']['lean']} / {proj['readme_8b_gib']['straightforward']} GiB); "
                         f"lean / straightforward {m['lean']['fit_total_gib'] / m['straightforward']['fit_total_gib']:.2f} "
                         f"by the fit, {m['lean']['analytic_total_gib'] / m['straightforward']['analytic_total_gib']:.2f} "
                         "analytic")
            out.append(line + ".")
    return "".join(f"- {line}\n" for line in out)


def render_markdown(data: dict, path: Path, png_name: str) -> None:
    s, lines = data["settings"], []
    add = lines.append
    runs = data["runs"]
    measured = [r for r in runs if r.get("scoring_peak_kib") is not None]
    seq = s["seq_len"]
    add("# Scoring cost versus model size\n")
    add("How the NIRVANA scoring pass's peak memory and wall time grow with model size and calibration tokens, "
        "lean (`compute_unit_scores(lean=True, checkpointing=True, head_chunk=8192)`) vs straightforward "
        "(`lean=False, checkpointing=False, head_chunk=None`), measured on random-initialised Llama-architecture "
        "models at real shapes, fitted, and projected to Llama-3.1-8B and -70B. Method, fit model and memory guard "
        "are in the docstring of `benchmarks/scaling.py`; the measurement is `benchmarks/scoring_memory.py`'s "
        "(a fresh process per run, VmHWM reset before scoring).\n")
    add("```bash\n" + data["command"] + "\n```\n")
    add(f"Machine: {data['machine']['cpus']} CPU cores ({measured[0]['threads'] if measured else '?'} torch "
        f"threads), {data['machine']['mem_total_kib'] / 2**20:.1f} GiB RAM, no GPU, no swap. Total wall time of the "
        f"run: {data['total_wall_s'] / 60:.1f} min. Calibration: random token ids, seed {s['seed']}, {seq} tokens "
        "per window. Every number below comes from `scaling.json` next to this page, written by the run above "
        "(`--render-only` redraws this page and the plot from it).\n")
    if "git_at_start" in data:
        state = data["git_at_start"]
        add(f"Code: commit {state['commit']}" + (f", with uncommitted changes to {', '.join(state['uncommitted'])}"
                                                 if state["uncommitted"] else "") + ", when the run started.\n")
    add(f"![peak memory vs size]({png_name})\n")
    add(summary(data))

    add("## Shapes\n")
    add("| size | shape of | dtype | hidden | layers | heads / KV | MLP | vocab | tied | parameters |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    for name, spec in data["shapes"].items():
        c = spec["config"]
        params = data["projections"]["models"].get(name, {}).get("params")
        add(f"| {name} | {spec['label']} | {spec['dtype']} | {c['hidden_size']} | {c['num_hidden_layers']} | "
            f"{c['num_attention_heads']} / {c['num_key_value_heads']} | {c['intermediate_size']} | {c['vocab_size']} | "
            f"{'yes' if c['tie_word_embeddings'] else 'no'} | {params:,} |")
    add("")

    add("## Measured scoring runs\n")
    add("GiB; scoring delta = scoring peak - RSS after load (model built + one warm forward); analytic = "
        "`project_scoring_memory` (total - weights) for that run; fit = the fitted model below.\n")
    add("| size | dtype | windows x T | approach | RSS after load | scoring peak | scoring delta | analytic delta | "
        "fit delta | ru_maxrss | scoring wall (s) |")
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(measured, key=lambda r: (r["params"], r["n_window"], r["approach"])):
        add(f"| {r['size']} | {r['dtype']} | {r['n_window']} x {r['seq_len']} | {r['approach']} | "
            f"{r['rss_after_load_kib'] / 2**20:.2f} | {r['scoring_peak_kib'] / 2**20:.2f} | "
            f"{g(r.get('scoring_delta_gib'))} | {g(r.get('analytic_delta_gib'))} | {g(r.get('fit_delta_gib'))} | "
            f"{r['ru_maxrss_kib'] / 2**20:.2f} | {r['wall_s']:.1f} |")
    add("")
    pairs = both_ran(measured)
    if pairs:
        add("Lean / straightforward where both ran:\n")
        add("| size | windows | scoring delta ratio | scoring peak ratio | wall ratio |")
        add("|---|---|---|---|---|")
        for lean, full in pairs:
            add(f"| {lean['size']} | {lean['n_window']} | {lean['scoring_delta_gib'] / full['scoring_delta_gib']:.3f} | "
                f"{lean['scoring_peak_kib'] / full['scoring_peak_kib']:.3f} | {lean['wall_s'] / full['wall_s']:.2f} |")
        add("")

    pipe = [r for r in measured if "pipeline" in r]
    if pipe:
        p0 = pipe[0]["pipeline"]
        add("## Allocation, surgery, export\n")
        add(f"Timed in the first lean run of each size, after scoring: `plan_from_scores(sparsity={p0['sparsity']}, "
            f"gamma={p0['gamma']})`, `cut`, `save_pruned(model, None, tmpdir, plan=plan)` (safetensors, finiteness "
            "check, sha256 manifest, model card).\n")
        add("| size | dtype | allocation (s) | surgery (s) | export (s) | export size (MiB) | params before -> after | "
            "block sparsity | scoring wall, same run (s) |")
        add("|---|---|---|---|---|---|---|---|---|")
        for r in sorted(pipe, key=lambda r: r["params"]):
            p = r["pipeline"]
            add(f"| {r['size']} | {r['dtype']} | {p['plan_s']:.2f} | {p['cut_s']:.2f} | {p['export_s']:.1f} | "
                f"{p['export_bytes'] / 2**20:.0f} | {p['params_before']:,} -> {p['params_after']:,} | "
                f"{p['realised_sparsity']:.3f} | {r['wall_s']:.1f} |")
        add("")

    add("## Fit\n")
    add(f"Model: {data['fit']['model']}. c = 1 would mean the analytic activation model is exact; the analytic "
        "model's own weight coefficient a = (gradients held + reduction scratch) / W depends on the shape (listed "
        "per model in the projection table).\n")
    add("| approach | a (x weight bytes) | c (x analytic activation bytes) | points | max abs residual (GiB) | "
        "max rel residual |")
    add("|---|---|---|---|---|---|")
    for approach, f in data["fit"]["coefficients"].items():
        if f is None:
            add(f"| {approach} | n/a | n/a | < 2 | | |")
        else:
            add(f"| {approach} | {f['a']:.4f} | {f['c']:.3f} | {f['n_points']} | {f['max_abs_residual_gib']:.3f} | "
                f"{f['max_rel_residual']:.3f} |")
    add("")

    proj = data["projections"]
    add(f"## Projections ({proj['dtype']}, {proj['n_window']} x {proj['seq_len']} tokens)\n")
    add("Total peak = weights + scoring delta, in GiB, no process overhead. Fit: the coefficients above applied to "
        "the model's weight bytes and analytic activation bytes; analytic: `project_scoring_memory` (which is what "
        f"docs/results.md quotes for Llama-3.1-8B: lean {proj['readme_8b_gib']['lean']} GiB, straightforward "
        f"{proj['readme_8b_gib']['straightforward']} GiB).\n")
    add("| model | parameters | weights | lean fit | lean analytic | straightforward fit | straightforward analytic | "
        "docs/results.md | analytic a (lean / straightf.) |")
    add("|---|---|---|---|---|---|---|---|---|")
    for m in sorted(proj["models"].values(), key=lambda m: m["params"]):
        readme = (f"{proj['readme_8b_gib']['lean']} / {proj['readme_8b_gib']['straightforward']}"
                  if m["label"] == "Llama-3.1-8B" else "")
        add(f"| {m['label']}{'' if m['measured_size'] else ' (not measured)'} | {m['params'] / 1e9:.2f} B | "
            f"{m['weights_gib']:.2f} | {g(m['lean']['fit_total_gib'])} | {m['lean']['analytic_total_gib']:.2f} | "
            f"{g(m['straightforward']['fit_total_gib'])} | {m['straightforward']['analytic_total_gib']:.2f} | {readme} | "
            f"{m['lean']['analytic_a']:.4f} / {m['straightforward']['analytic_a']:.3f} |")
    add("")

    add("## Not measured\n")
    skipped = [r for r in runs if r.get("skipped")]
    for r in skipped:
        add(f"- {r['size']} {r['approach']} at {r['n_window']} x {r['seq_len']}: {r['skipped']}")
    for note in data.get("notes", []):
        add(f"- {note}")
    add("")
    path.write_text("\n".join(lines))


def derive(data: dict) -> None:
    """Everything computed from the measured runs and the analytic projections: fit, projections, notes."""
    fit_and_project(data)
    data["notes"] = target_notes(data)


def render(data: dict, out_dir: Path) -> None:
    render_plot(data, out_dir / "scaling.png")
    render_markdown(data, out_dir / "scaling.md", "scaling.png")


# --------------------------------------------------------------------------- parent
def git_state(repo: Path) -> dict:
    """The commit and the uncommitted files under nirvana_lightning/ when the run started (provenance)."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, check=False).stdout

    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "uncommitted": [line[3:] for line in git("status", "--porcelain", "--", "nirvana_lightning").splitlines()]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (seconds), output to /tmp/scaling-quick")
    parser.add_argument("--sizes", default=None, help="comma-separated shapes (default: all of SHAPES, or "
                        "QUICK_SHAPES with --quick)")
    parser.add_argument("--windows", nargs="+", default=None,
                        help="calibration windows: a default list for every size and per-size lists, e.g. "
                             "'8 135m=8,32,128' (the default; --quick: '2 tiny-s=2,4')")
    parser.add_argument("--lean-only", default="", help="comma-separated sizes whose straightforward runs are dropped")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the calibration ids")
    parser.add_argument("--safety", type=float, default=1.2,
                        help="memory guard: multiplier on the analytic scoring memory of a run")
    parser.add_argument("--margin-gib", type=float, default=1.5,
                        help="memory guard: GiB of MemAvailable left untouched")
    parser.add_argument("--budget-s", type=float, default=1500.0,
                        help="skip the remaining runs once this many seconds have passed")
    parser.add_argument("--out-dir", default=None, help="where scaling.{json,png,md} go (default docs/, "
                        "--quick: /tmp/scaling-quick)")
    parser.add_argument("--render-only", action="store_true", help="redraw md and png from OUT_DIR/scaling.json")
    parser.add_argument("--worker", choices=[*sorted(APPROACHES), "project"], help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--shape-json", help=argparse.SUPPRESS)
    parser.add_argument("--n-window", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--project-in", help=argparse.SUPPRESS)
    parser.add_argument("--result-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "project":
        run_projection_worker(args)
        return
    if args.worker:
        run_worker(args)
        return

    repo = Path(__file__).resolve().parent.parent
    out_dir = Path(args.out_dir) if args.out_dir else (Path("/tmp/scaling-quick") if args.quick else repo / "docs")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "scaling.json"
    if args.render_only:
        data = json.loads(json_path.read_text())
        derive(data)  # the derived fields are recomputed from the stored runs (same numbers, current wording)
        json_path.write_text(json.dumps(data, indent=1) + "\n")
        render(data, out_dir)
        print(f"[scaling] rendered {out_dir / 'scaling.md'} and {out_dir / 'scaling.png'}")
        return

    start = time.perf_counter()
    shapes_all = QUICK_SHAPES if args.quick else SHAPES
    sizes = args.sizes.split(",") if args.sizes else list(shapes_all)
    bad = [s for s in sizes if s not in shapes_all]
    if bad:
        raise SystemExit(f"--sizes: unknown {bad}; known: {sorted(shapes_all)}")
    windows = parse_windows(args.windows or (["2", "tiny-s=2,4"] if args.quick else ["8", "135m=8,32,128"]), sizes)
    lean_only = {s for s in args.lean_only.split(",") if s}
    shapes = {s: shapes_all[s] for s in sizes}
    command = "nice -n 19 .venv/bin/python benchmarks/scaling.py" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    data = {
        "command": command,
        "settings": {"sizes": sizes, "windows": windows, "lean_only": sorted(lean_only), "seq_len": args.seq_len,
                     "seed": args.seed, "safety": args.safety, "margin_gib": args.margin_gib, "budget_s": args.budget_s,
                     "quick": args.quick, "approaches": APPROACHES},
        "machine": {"cpus": os.cpu_count(), "mem_total_kib": meminfo_kib("MemTotal"),
                    "mem_available_at_start_kib": meminfo_kib("MemAvailable")},
        "git_at_start": git_state(repo), "shapes": shapes, "targets": TARGETS, "runs": [],
    }

    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        workdir = Path(tmp)
        # analytic projections (in a worker: the parent stays free of torch until the measurements are done)
        requests = {}
        for size in sizes:
            b = DTYPE_BYTES[shapes[size]["dtype"]]
            for n_window in windows[size]:
                requests[analytic_key(size, n_window * args.seq_len, b)] = {
                    "config": shapes[size]["config"], "n_token": n_window * args.seq_len, "b": b}
        for name, spec in {**shapes, **TARGETS}.items():
            b, n_token = DTYPE_BYTES[PROJECT_DTYPE], PROJECT_WINDOWS * args.seq_len
            requests[analytic_key(name, n_token, b)] = {"config": spec["config"], "n_token": n_token, "b": b}
        (workdir / "project-in.json").write_text(json.dumps(requests))
        print("[scaling] analytic projections ...", file=sys.stderr, flush=True)
        data["analytic"] = spawn(["--worker", "project", "--project-in", str(workdir / "project-in.json")],
                                 workdir, "project")

        # the size sweep (each size's first window count) first, then the window sweep, each cheapest first
        # (parameters x tokens), so that a budget cut drops the window sweep, then the largest runs
        plan = []
        for size in sizes:
            for n_window in windows[size]:
                for approach in APPROACHES:
                    plan.append((size, n_window, approach))
        params = {s: data["analytic"][analytic_key(s, PROJECT_WINDOWS * args.seq_len, 2)]["projection"]["counts"]["params"]
                  for s in sizes}
        plan.sort(key=lambda p: (p[1] != windows[p[0]][0], params[p[0]] * p[1], p[2] != "lean"))
        pipeline_done = set()
        for size, n_window, approach in plan:
            shape = shapes[size]
            tag = f"{size}-{n_window}-{approach}"
            record = {"size": size, "n_window": n_window, "seq_len": args.seq_len, "approach": approach,
                      "dtype": shape["dtype"], "params": params[size]}
            proj = data["analytic"][analytic_key(size, n_window * args.seq_len, DTYPE_BYTES[shape["dtype"]])]["projection"]
            need_gib = (proj[approach]["weights"] + args.safety * proj[approach]["total - weights"]) / GIB + OVERHEAD_GIB
            avail_gib = meminfo_kib("MemAvailable") / 2**20
            record["loadavg_1min_at_start"] = os.getloadavg()[0]
            elapsed = time.perf_counter() - start
            if approach == "straightforward" and size in lean_only:
                record["skipped"] = "dropped for time (--lean-only)"
            elif need_gib > avail_gib - args.margin_gib:
                record["skipped"] = (f"would not fit in memory: analytic estimate {need_gib:.1f} GiB (weights + "
                                     f"{args.safety} x scoring memory + {OVERHEAD_GIB:g} GiB overhead) > "
                                     f"{avail_gib:.1f} GiB available - {args.margin_gib:g} GiB margin")
            elif elapsed > args.budget_s:
                record["skipped"] = f"time budget: {elapsed:.0f} s spent > --budget-s {args.budget_s:.0f}"
            if record.get("skipped"):
                print(f"[scaling] skip {tag}: {record['skipped']}", file=sys.stderr, flush=True)
                data["runs"].append(record)
                continue
            pipeline = approach == "lean" and size not in pipeline_done
            cmd = ["--worker", approach, "--size", size, "--shape-json", json.dumps(shape),
                   "--n-window", str(n_window), "--seq-len", str(args.seq_len), "--seed", str(args.seed)]
            if pipeline:
                cmd.append("--pipeline")
            print(f"[scaling] {tag}{' + plan/cut/export' if pipeline else ''} (estimate {need_gib:.1f} GiB, "
                  f"{avail_gib:.1f} GiB available, {elapsed:.0f} s elapsed) ...", file=sys.stderr, flush=True)
            try:
                record.update(spawn(cmd, workdir, tag))
                if pipeline:
                    pipeline_done.add(size)
                print(f"[scaling]   wall {record['wall_s']:.1f} s, scoring delta "
                      f"{(record['scoring_peak_kib'] - record['rss_after_load_kib']) / 2**20:.2f} GiB",
                      file=sys.stderr, flush=True)
            except subprocess.CalledProcessError as err:
                record["skipped"] = f"worker failed (exit status {err.returncode})"
                print(f"[scaling]   {record['skipped']}", file=sys.stderr, flush=True)
            data["runs"].append(record)
            json_path.write_text(json.dumps(data, indent=1) + "\n")  # partial results survive a crash

    fingerprints = {(r["n_window"], r["seq_len"], r["calibration_fingerprint"]) for r in data["runs"]
                    if "calibration_fingerprint" in r}
    data["calibration_fingerprints"] = sorted(f"{n} x {t}: {f}" for n, t, f in fingerprints)
    data["total_wall_s"] = time.perf_counter() - start
    derive(data)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    render(data, out_dir)
    print(Path(out_dir / "scaling.md").read_text())
    print(f"[scaling] wrote {json_path}, {out_dir / 'scaling.png'}, {out_dir / 'scaling.md'}; "
          f"total wall {data['total_wall_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Peak memory of scoring a bf16 model in float32: whole-model upcast (0.1) vs per-layer copies (now).

0.1 converted every parameter of a bf16 model to float32 for ``scoring_dtype: float32`` (an 8B model:
15 GiB more, ~33 GiB in all, an out-of-memory on a 24 GB GPU). Now each module gets float32 copies of
its parameters only while it runs (:mod:`nirvana_lightning.pruning.gradients`). Both are run here on
the same random-initialised bf16 Llama (SmolLM2-360M shape by default), each in a fresh process
(peak RSS from VmHWM, reset after building the model and one warm forward), lean scoring of the same
calibration; the unit scores of the two are compared.

    .venv/bin/python benchmarks/upcast_memory.py            # ~3 min on 2 CPU cores
    .venv/bin/python benchmarks/upcast_memory.py --size 135m

What it measures is host memory on CPU; on a GPU the same difference is the accelerator memory
(``scripts/gpu_check.sh`` records the CUDA peak of the per-layer path on the 8B shape).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import SHAPES, build_model  # noqa: E402
from scoring_memory import _reset_peak_rss, _status_kib  # noqa: E402

GIB_KIB = 1024 ** 2


def worker(args: argparse.Namespace) -> None:
    import torch

    from nirvana_lightning.pruning.gradients import compute_unit_scores

    shape = dict(SHAPES[args.size], dtype="bfloat16")
    model = build_model(shape, args.size, 0)
    calibration = torch.randint(0, shape["config"]["vocab_size"], (args.windows, 128),
                                generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=calibration[:1], use_cache=False)
    base = _status_kib("VmRSS")
    assert _reset_peak_rss(), "cannot reset VmHWM (/proc/self/clear_refs)"
    start = time.perf_counter()
    if args.worker == "whole_model":  # the 0.1 behaviour: convert, score, convert back
        for p in model.parameters():
            p.data = p.data.float()
        scores = compute_unit_scores(model, calibration)
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    else:
        scores = compute_unit_scores(model, calibration, compute_dtype=torch.float32)
    wall = time.perf_counter() - start
    torch.save({"attention": scores.by_kind["kv_group"], "mlp": scores.by_kind["neuron"]}, args.out + ".pt")
    Path(args.out).write_text(json.dumps({"approach": args.worker, "rss_after_load_gib": base / GIB_KIB,
                                          "scoring_delta_gib": (_status_kib("VmHWM") - base) / GIB_KIB,
                                          "wall_s": wall}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="360m", choices=sorted(SHAPES))
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--worker", choices=["whole_model", "per_layer"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import torch

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for approach in ("whole_model", "per_layer"):
            out = f"{tmp}/{approach}.json"
            subprocess.run([sys.executable, __file__, "--worker", approach, "--size", args.size,
                            "--windows", str(args.windows), "--out", out], check=True)
            results[approach] = json.loads(Path(out).read_text())
            results[approach]["scores"] = torch.load(out + ".pt")
    a, b = results["whole_model"].pop("scores"), results["per_layer"].pop("scores")
    diff = max(float((x - y).abs().max() / x.abs().max().clamp_min(1e-30))
               for x, y in zip(a["attention"] + a["mlp"], b["attention"] + b["mlp"]))
    ratio = results["per_layer"]["scoring_delta_gib"] / results["whole_model"]["scoring_delta_gib"]
    print(f"bf16 {SHAPES[args.size]['label']}-shaped random Llama, {args.windows} x 128 tokens, lean scoring in float32")
    print("| approach | RSS after load (GiB) | scoring delta (GiB) | wall (s) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rss_after_load_gib']:.2f} | {r['scoring_delta_gib']:.2f} | {r['wall_s']:.1f} |")
    print(f"per-layer / whole-model scoring delta: {ratio:.2f}; max |score diff| / max |score| per layer: {diff:.2e}")


if __name__ == "__main__":
    main()

"""Would refining the path locally beat doubling it? Integrated gradients with bisected intervals.

The shipped adaptive rule (``adaptive_multiscale_saliency``) doubles every step of a slice while
completeness fails. Here instead only the intervals whose right-Riemann term disagrees with the
score change measured across them (``|slope(b) * (b - a) - (s(b) - s(a))|``, relative to the
score's total variation along the path, worst scale) are bisected, starting from 8 uniform
steps, until their summed error is under the tolerance or the point budget is spent. Each slice's
joint map is compared (Pearson r) with a 256-point Gauss-Legendre reference; uniform right
Riemann sums of the same point counts are printed beside it.

    python benchmarks/bench_ig_refine.py --slices 2 --points 24 48

Not shipped: on the crude synthetic slices it is no better than uniform steps of the same count
(the scores bend all along the path there), see docs/ig_adaptive_benchmark.md.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ig_adaptive import input_sources  # noqa: E402
from bench_saliency import pearson  # noqa: E402

from napari_wscovid.models.wsnet import SCALES  # noqa: E402

# the package re-exports a function of the same name, so the module is imported by path
ig = importlib.import_module("napari_wscovid.explain.integrated_gradients")


def _scores_and_grads(net, x, delta, targets, items, alphas):
    """Scores (P, scales) and per-scale input gradients at the path points ``alphas * x[items]``."""
    a = torch.as_tensor(alphas, dtype=x.dtype).view(-1, 1, 1, 1)
    points = (a * delta[items]).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = net(points, scales=SCALES)
    rows, t = torch.arange(len(items)), targets[items]
    scores = torch.stack([out.scores[s][rows, t].detach() for s in SCALES], 1)
    grads = {}
    for s in SCALES:
        g = ig._cropped_score_grad(net, points, out.cams[s], t, s)
        if g is None:
            (g,) = torch.autograd.grad(out.scores[s][rows, t].sum(), points, retain_graph=True)
        grads[s] = g
    return scores, grads


def refined_saliency(model, x, target, *, start=8, max_points=24, tolerance=0.05, batch=4):
    """Joint and per-scale maps with the path refined where the scores bend; and points used."""
    with torch.inference_mode(False), torch.enable_grad():
        net = ig.prepare_model(model)
        x = x.detach().clone()
        n, delta = x.shape[0], x  # zero baseline
        targets = ig._targets(target, n)
        with torch.no_grad():
            ends = net(torch.zeros_like(x).contiguous(memory_format=torch.channels_last), scales=SCALES)
            s0 = torch.stack([ends.scores[s][torch.arange(n), targets] for s in SCALES], 1)
        nodes = [{} for _ in range(n)]  # alpha -> (scores, {scale: grad})
        todo = [(i, (k + 1) / start) for i in range(n) for k in range(start)]
        while todo:
            for b in range(0, len(todo), batch):
                chunk = todo[b : b + batch]
                items = torch.tensor([i for i, _ in chunk])
                scores, grads = _scores_and_grads(net, x, delta, targets, items, [a for _, a in chunk])
                for j, (i, a) in enumerate(chunk):
                    nodes[i][a] = (scores[j], {s: grads[s][j] for s in SCALES})
            todo = []
            for i in range(n):
                alphas = sorted(nodes[i])
                prev_a, prev_s, errors = 0.0, s0[i], []
                variation = torch.zeros(len(SCALES))
                for a in alphas:
                    sc, gr = nodes[i][a]
                    slope = torch.stack([(gr[s] * delta[i]).sum() for s in SCALES])
                    errors.append(((slope * (a - prev_a) - (sc - prev_s)).abs(), prev_a, a))
                    variation += (sc - prev_s).abs()
                    prev_a, prev_s = a, sc
                rel = sorted(((float((e / variation.clamp_min(1e-6)).max()), lo, hi) for e, lo, hi in errors),
                             reverse=True)  # fmt: skip
                budget = max_points - len(alphas)
                if sum(r for r, _, _ in rel) <= tolerance or budget <= 0:
                    continue
                todo += [(i, 0.5 * (lo + hi)) for r, lo, hi in rel[: min(budget, len(alphas) // 2)]
                         if r > tolerance / len(alphas)]  # fmt: skip
        maps, used = {}, np.array([len(nd) for nd in nodes])
        for s in SCALES:
            total = torch.zeros_like(x)
            for i in range(n):
                prev = 0.0
                for a in sorted(nodes[i]):
                    total[i] += nodes[i][a][1][s] * (a - prev)
                    prev = a
            maps[s] = (total * delta).sum(1)
        maps["joint"] = math.prod(maps[s] for s in SCALES)
        return maps, used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=2, help="slices per source (crude gets two more)")
    parser.add_argument("--points", type=int, nargs="+", default=[24])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from napari_wscovid.models.registry import load_model

    net, info = load_model("default", device="cpu")
    sources = input_sources(net, args.slices)
    print(f"model {info['name']} {info['version']}; r of the joint map against 256-point Gauss-Legendre")
    print("| source | slice | points | r refined | r uniform | s refined | s uniform |")
    print("|---|---|---|---|---|---|---|")
    for source, x in sources.items():
        with torch.no_grad():
            targets = net(x).logits.argmax(1)
        for i in range(len(x)):
            xi, ti = x[i : i + 1], targets[i : i + 1]
            ref = ig.multiscale_saliency(net, xi, ti, steps=256, method="gausslegendre")["joint"]
            for budget in args.points:
                start = time.perf_counter()
                maps, used = refined_saliency(net, xi, ti, max_points=budget)
                t_refined = time.perf_counter() - start
                start = time.perf_counter()
                uniform = ig.multiscale_saliency(net, xi, ti, steps=int(used[0]), method="riemann_right")
                t_uniform = time.perf_counter() - start
                print(
                    f"| {source} | {i} | {int(used[0])} | {pearson(maps['joint'], ref):.4f} "
                    f"| {pearson(uniform['joint'], ref):.4f} | {t_refined:.2f} | {t_uniform:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

"""Fidelity and time of integrated gradients: fixed 8 steps against steps chosen by completeness.

For the bundled default WSNet and each input slice, the joint saliency (and each scale's map) is
compared with a 256-point Gauss-Legendre reference by Pearson r, for the old fixed default (8
right-Riemann steps) and for the adaptive choice (8 steps doubled while any scale misses
completeness by more than 5% of its score gap, up to 64). Inputs: crude synthetic chest slices
(``bench_saliency.synthetic_batch``: abrupt lines and blobs, where m = 8 was measured at r = 0.966),
slices of the bundled sample through the plugin's own preprocessing, and, when ``../shared/data``
is present, slices of the real CT P001.

    python benchmarks/bench_ig_adaptive.py                # about 10 minutes on 2 cores
    python benchmarks/bench_ig_adaptive.py --quick        # 2 slices per source
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_saliency import pearson, synthetic_batch  # noqa: E402

from napari_wscovid.explain.integrated_gradients import (  # noqa: E402
    adaptive_multiscale_saliency,
    multiscale_saliency,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def plugin_slices(volume, n: int, net) -> torch.Tensor:
    """``n`` lung slices of ``volume`` prepared exactly as ``detect`` prepares them."""
    from napari_wscovid.lung import segment_lungs
    from napari_wscovid.preprocess import prepare_slices
    from napari_wscovid.stages import lung_slices, model_input_kwargs

    lung = segment_lungs(volume, method="classical")
    idx = lung_slices(lung, volume.spacing)
    chosen = idx[np.linspace(len(idx) * 0.2, len(idx) * 0.8, n).astype(int)]
    x, _ = prepare_slices(volume.hu, lung, chosen, **model_input_kwargs(volume, lung, net.config.input_size))
    return torch.from_numpy(x)


def input_sources(net, n: int) -> dict[str, torch.Tensor]:
    """The benchmarks' inputs: ``n + 2`` crude synthetic slices, ``n`` of the bundled sample and,
    when ``../shared/data`` is present, ``n`` of the real CT P001."""
    from napari_wscovid.io import load_ct

    sources = {"crude synthetic": synthetic_batch(n + 2, 224, np.random.default_rng(0))[0]}
    sources["bundled sample"] = plugin_slices(load_ct(str(REPO / "sample_data" / "phantom_covid")), n, net)
    p001 = SHARED / "covid-ct-md" / "sample_data" / "COVID-19 subjects" / "P001"
    if p001.is_dir():
        sources["real CT P001"] = plugin_slices(load_ct(str(p001)), n, net)
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from napari_wscovid.models.registry import load_model

    net, info = load_model("default", device="cpu")
    sources = input_sources(net, 2 if args.quick else 4)
    print(f"model {info['name']} {info['version']}; reference: 256-point Gauss-Legendre; r of the joint map")
    print("| source | slice | target | r fixed 8 | r adaptive | steps | s fixed 8 | s adaptive |")
    print("|---|---|---|---|---|---|---|---|")
    worst = {"fixed": 1.0, "adaptive": 1.0}
    times = {"fixed": [], "adaptive": []}
    for source, x in sources.items():
        with torch.no_grad():
            targets = net(x).logits.argmax(1)
        for i in range(len(x)):
            xi, ti = x[i : i + 1], targets[i : i + 1]
            ref = multiscale_saliency(net, xi, ti, steps=256, method="gausslegendre")["joint"]
            start = time.perf_counter()
            fixed = multiscale_saliency(net, xi, ti, steps=8, method="riemann_right")["joint"]
            t_fixed = time.perf_counter() - start
            start = time.perf_counter()
            adaptive, steps = adaptive_multiscale_saliency(net, xi, ti)
            t_adaptive = time.perf_counter() - start
            r_fixed, r_adaptive = pearson(fixed, ref), pearson(adaptive["joint"], ref)
            worst["fixed"] = min(worst["fixed"], r_fixed)
            worst["adaptive"] = min(worst["adaptive"], r_adaptive)
            times["fixed"].append(t_fixed)
            times["adaptive"].append(t_adaptive)
            print(
                f"| {source} | {i} | {int(ti)} | {r_fixed:.4f} | {r_adaptive:.4f} | {int(steps[0])} "
                f"| {t_fixed:.2f} | {t_adaptive:.2f} |",
                flush=True,
            )
    print(f"\nworst r: fixed 8 {worst['fixed']:.4f}, adaptive {worst['adaptive']:.4f}")
    for name, values in times.items():
        print(f"seconds per slice, {name}: mean {np.mean(values):.2f}, max {np.max(values):.2f}")


if __name__ == "__main__":
    main()

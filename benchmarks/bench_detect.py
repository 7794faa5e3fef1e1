"""Whole-pipeline speed and memory on this machine (issue 3's targets), printed as measured.

    python benchmarks/bench_detect.py                 # 300-slice 512x512 phantom, then 600 slices for memory
    python benchmarks/bench_detect.py --slices 60     # quicker look

Stages timed: lung segmentation, classification with CAMs of every lung slice, the joint
saliency of one slice (three scales) at the pipeline's default IG steps, and peak RSS of a
600-slice run with all results kept (CAMs of every lung slice, saliency of every positive
slice). The convolution throughput is reported as a fraction of a measured float32 matmul peak.
Memory is measured in a child process so that the first run's allocations do not count.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def wsnet_forward_gflop(net) -> float:
    """Multiply-adds of the convolutions for one input, counted with forward hooks."""
    macs = []

    def hook(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1]
        macs.append(output.numel() * module.in_channels * k // module.groups)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    size = net.config.input_size
    with torch.inference_mode():
        net(torch.zeros(1, net.config.in_channels, size, size))
    for h in handles:
        h.remove()
    return 2 * sum(macs) / 1e9


def load_benchmark_model(name: str):
    from napari_wscovid.models.registry import ModelLoadError, load_model
    from napari_wscovid.models.wsnet import WSNet

    if name:
        try:
            return load_model(name, device="cpu")
        except ModelLoadError as err:
            print(f"# {name!r} not loadable ({err}); timing a randomly initialised full-size WSNet")
    torch.manual_seed(0)
    return WSNet().eval(), {"name": "random-full-size", "sha256": None}


def forward_plain_vs_inference_copy(
    net, n: int = 64, batch: int = 16, repeats: int = 3
) -> tuple[float, float]:
    """Seconds per slice of the trained network as is and of its folded, channels-last copy.

    Interleaved in one run, best of ``repeats``, so machine load affects both alike.
    """
    from napari_wscovid.models.wsnet import inference_copy

    fast = inference_copy(net)
    size = net.config.input_size
    x = torch.rand(batch, net.config.in_channels, size, size)
    x_last = x.contiguous(memory_format=torch.channels_last)
    best = {"plain": float("inf"), "copy": float("inf")}
    with torch.inference_mode():
        net(x), fast(x_last)  # warm-up
        for _ in range(repeats):
            for name, model, inp in (("plain", net, x), ("copy", fast, x_last)):
                start = time.perf_counter()
                for _ in range(n // batch):
                    model(inp)
                best[name] = min(best[name], (time.perf_counter() - start) / n)
    return best["plain"], best["copy"]


def run_stages(n_slices: int, model_name: str) -> dict:
    from napari_wscovid.lung import segment_lungs
    from napari_wscovid.phantom import make_phantom
    from napari_wscovid.pipeline import detect, explain_slices, lung_slices

    start = time.perf_counter()
    phantom = make_phantom("COVID-19", n_slices=n_slices, size=512, spacing=(1.0, None, None), seed=7)
    out = {"phantom_s": time.perf_counter() - start, "n_slices": n_slices}
    volume = phantom.volume

    start = time.perf_counter()
    mask = segment_lungs(volume)
    out["lung_segmentation_s"] = time.perf_counter() - start
    out["lung_dice"] = float(
        2
        * np.count_nonzero((mask > 0) & (phantom.lung_mask > 0))
        / (np.count_nonzero(mask) + np.count_nonzero(phantom.lung_mask))
    )
    net, info = load_benchmark_model(model_name)
    out["model"] = info.get("name")
    result = detect(volume, model=net, saliency="none", lung_mask=mask)
    out["n_lung_slices"] = int(len(lung_slices(mask, volume.spacing)))
    out["classification_with_cams_s"] = result.timings["classification"] + result.timings["cams"]
    gflop = wsnet_forward_gflop(net) * out["n_lung_slices"]
    out["classification_gflops"] = gflop / result.timings["classification"]
    plain, fast = forward_plain_vs_inference_copy(net)
    out["forward_per_slice_plain_s"] = plain
    out["forward_per_slice_folded_channels_last_s"] = fast
    out["forward_speedup"] = plain / fast

    positive = np.flatnonzero(phantom.lesion_mask.reshape(n_slices, -1).any(1))
    z = int(positive[len(positive) // 2]) if len(positive) else out["n_lung_slices"] // 2
    gen = explain_slices(
        volume,
        [z],
        net=net,
        lung_mask=mask,
        slice_probs=result.slice_probs,
        classes=result.classes,
        explain_class="COVID-19",
    )
    start = time.perf_counter()
    for _ in gen:
        pass
    out["joint_saliency_one_slice_s"] = time.perf_counter() - start
    return out


def peak_rss_child(n_slices: int, model_name: str) -> dict:
    """Peak RSS of a user's session: load a CT file, detect with all results kept, in a fresh process.

    The phantom is generated and written by another process first: its generator needs several
    float copies of the volume, which a user loading a scan never pays, so it must not count.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.mha"
        make = f"""
import numpy as np
from napari_wscovid.phantom import make_phantom
from napari_wscovid.io.write import write_image
p = make_phantom('COVID-19', n_slices={n_slices}, size=512, spacing=(0.6, None, None), seed=8)
write_image(p.volume, {str(path)!r})
np.save({str(Path(tmp) / "lesion.npy")!r}, np.flatnonzero(p.lesion_mask.reshape({n_slices}, -1).any(1)))
"""
        subprocess.run([sys.executable, "-c", make], capture_output=True, text=True, check=True)
        code = f"""
import json, resource, time, numpy as np
from napari_wscovid.io import load_ct
from napari_wscovid.pipeline import detect
import sys; sys.path.insert(0, 'benchmarks')
from bench_detect import load_benchmark_model
volume = load_ct({str(path)!r})
lesion = np.load({str(Path(tmp) / "lesion.npy")!r})
net, info = load_benchmark_model({model_name!r})
start = time.perf_counter()
r = detect(volume, model=net, saliency='slices', slices=lesion[:: max(1, len(lesion) // 8)].tolist())
print(json.dumps({{'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  'detect_s': time.perf_counter() - start,
                  'kept_gb': (sum(a.nbytes for a in (*r.cams.values(), *r.saliency.values()))
                              + r.lung_mask.nbytes + volume.hu.nbytes) / 2**30}}))
"""
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--memory-slices", type=int, default=600)
    parser.add_argument("--model", default="default")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-RSS run of --memory-slices")
    args = parser.parse_args()
    if args.memory_only:
        mem = peak_rss_child(args.memory_slices, args.model)
        print(
            f"{args.memory_slices} slices, all results kept: peak RSS {mem['peak_rss_gb']:.2f} GB "
            f"(results + CT {mem['kept_gb']:.2f} GB), detect {mem['detect_s']:.1f} s"
        )
        return
    torch.set_num_threads(torch.get_num_threads())
    peak = matmul_peak_gflops()
    print(f"threads: {torch.get_num_threads()}  float32 matmul peak: {peak:.1f} GFLOP/s")
    stages = run_stages(args.slices, args.model)
    for key, value in stages.items():
        print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")
    print(f"{'conv throughput / matmul peak':32s} {stages['classification_gflops'] / peak:.2f}")
    if args.memory_slices:
        mem = peak_rss_child(args.memory_slices, args.model)
        print(
            f"{args.memory_slices} slices, all results kept: peak RSS {mem['peak_rss_gb']:.2f} GB "
            f"(results + CT {mem['kept_gb']:.2f} GB), detect {mem['detect_s']:.1f} s"
        )
    print(f"self peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()

"""Speed and accuracy of the multi-scale integrated gradients on the full-size WSNet.

Prints, per network (random weights; a briefly trained one or a shipped weights file):
seconds per slice for plain captum at m = 25 (three separate runs, one per scale) and for
``multiscale_saliency``; the Pearson r of each step count / quadrature against a 256-step
reference per scale and on the joint map; and the achieved FLOP rate against a timed
float32 matmul.

    python benchmarks/bench_saliency.py             # full study, about 10 minutes on 2 cores
    python benchmarks/bench_saliency.py --quick     # fewer methods and step counts
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from captum.attr import IntegratedGradients
from torch import nn

from napari_wscovid.explain.integrated_gradients import (
    DEFAULT_IG_METHOD,
    DEFAULT_IG_STEPS,
    multiscale_saliency,
    path_integrals,
    prepare_model,
)
from napari_wscovid.models.wsnet import SCALES, WSNet, WSNetConfig

log = logging.getLogger("bench_saliency")
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "napari_wscovid" / "models" / "weights"
SIZE = 224


def full_size_weights() -> tuple[str, WSNet] | None:
    """The first weights file whose tensors fit the full-size network (test files are tiny)."""
    from safetensors.torch import load_file

    for path in sorted(WEIGHTS_DIR.glob("*.safetensors")):
        net = WSNet(WSNetConfig())
        state = load_file(path)
        expected = net.state_dict()
        if state.keys() == expected.keys() and all(state[k].shape == expected[k].shape for k in state):
            net.load_state_dict(state)
            return path.name, net.eval()
        log.info("%s does not fit the full-size WSNet; skipped", path.name)
    return None


def synthetic_batch(
    n: int, size: int, rng: np.random.Generator, label: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crude stand-ins: class 0 smooth texture, class 1 adds thin bright lines, class 2 bright blobs."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images = np.empty((n, 1, size, size), np.float32)
    labels = rng.integers(0, 3, n) if label is None else np.full(n, label)
    for i, label in enumerate(labels):
        img = 0.3 + 0.05 * rng.standard_normal((size, size)).astype(np.float32)
        # A large dark "lung" ellipse, so there is anatomy-like structure in every class.
        cy, cx = rng.uniform(0.4, 0.6, 2) * size
        img -= 0.2 * ((((yy - cy) / (0.35 * size)) ** 2 + ((xx - cx) / (0.3 * size)) ** 2) < 1)
        if label == 1:
            for _ in range(rng.integers(1, 4)):
                if rng.random() < 0.5:
                    img[int(rng.uniform(0.1, 0.9) * size), :] += 0.5
                else:
                    img[:, int(rng.uniform(0.1, 0.9) * size)] += 0.5
        elif label == 2:
            for _ in range(rng.integers(1, 4)):
                by, bx = rng.uniform(0.2, 0.8, 2) * size
                sigma = rng.uniform(0.03, 0.08) * size
                img += 0.5 * np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * sigma**2))
        images[i, 0] = img
    return torch.from_numpy(images), torch.from_numpy(labels)


def train_briefly(model: nn.Module, steps: int, rng: np.random.Generator) -> float:
    """Train on 112-pixel synthetic crops (the net is fully convolutional; 4x cheaper than 224)."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    acc = []
    for step in range(steps):
        x, y = synthetic_batch(8, 112, rng)
        out = model(x)
        logits = out.logits
        # Each scale is supervised too, as the paper first trains a classifier per block: with the
        # summed logits alone a scale the others out-vote stays untrained and its saliency is noise.
        loss = nn.functional.cross_entropy(logits, y) + sum(
            nn.functional.cross_entropy(score, y) for score in out.scores.values()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc.append(float((logits.argmax(1) == y).float().mean()))
        if step % 25 == 0:
            log.info("train step %d loss %.3f", step, loss.item())
    model.eval()
    return float(np.mean(acc[-25:]))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson r; NaN when either map is constant (e.g. a joint map that is zero everywhere)."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    norm = float(a.norm() * b.norm())
    return float(a @ b) / norm if norm > 0 else float("nan")


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _best(fn, reps: int) -> tuple[float, float]:
    """Best wall time and best CPU time / threads over ``reps`` runs.

    Colleagues share this machine, so wall time inflates under load; CPU time divided by the
    thread count estimates the wall time on an idle machine (both are printed).
    """
    walls, cpus = [], []
    for _ in range(reps):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - wall0)
        cpus.append((time.process_time() - cpu0) / torch.get_num_threads())
    return min(walls), min(cpus)


def conv_macs(model: WSNet, size: int) -> dict[str, float]:
    """Forward multiply-accumulates of all convolutions up to each scale, counted with hooks."""
    macs: dict[str, float] = {}
    for scale in SCALES:
        total = [0.0]

        def hook(mod, inp, out, total=total):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total[0] += out.numel() * k

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            model(torch.zeros(1, 1, size, size), scales=(scale,))
        for h in handles:
            h.remove()
        macs[scale] = total[0]
    return macs


def captum_plain(model: nn.Module, x: torch.Tensor, target: int, steps: int = 25) -> dict[str, torch.Tensor]:
    """The straightforward route: one captum run per scale, paper's right Riemann sum."""
    model.eval()
    out = {}
    for scale in SCALES:
        ig = IntegratedGradients(lambda z, s=scale: model.scale_score(z, s))
        out[scale] = ig.attribute(x, target=target, n_steps=steps, method="riemann_right")[:, 0]
    return out


def study(name: str, model: WSNet, slices: torch.Tensor, target: int, args) -> None:
    prepared = prepare_model(model)
    with torch.no_grad():
        probs = model(slices).logits.softmax(1)
    log.info(
        "[%s] class-%d probability on the test slices: %s", name, target, probs[:, target].numpy().round(3)
    )

    def saliency(steps, method):
        maps = path_integrals(prepared, slices, target, SCALES, steps=steps, method=method, prepared=True)
        maps = {s: a[:, 0] for s, a in maps.items()}
        maps["joint"] = maps["conv3"] * maps["conv4"] * maps["conv5"]
        return maps

    t0 = time.perf_counter()
    ref = saliency(256, "gausslegendre")
    print(
        f"\n[{name}] 256-step Gauss-Legendre reference: "
        f"{time.perf_counter() - t0:.1f} s for {len(slices)} slices"
    )
    nonzero = [float((ref["joint"][i] != 0).float().mean()) for i in range(len(slices))]
    print(f"[{name}] non-zero fraction of the reference joint map per slice: {np.round(nonzero, 3)}")
    print(f"[{name}] Pearson r vs reference (minimum over {len(slices)} slices): conv3 conv4 conv5 joint")
    for method in args.methods:
        for steps in args.steps:
            if method != "gausslegendre" and steps < 2:
                continue
            maps = saliency(steps, method)
            # np.min so that a NaN (constant map) shows instead of being skipped.
            rs = [
                float(np.min([pearson(maps[k][i], ref[k][i]) for i in range(len(slices))]))
                for k in (*SCALES, "joint")
            ]
            flag = " <- default" if (method, steps) == (DEFAULT_IG_METHOD, DEFAULT_IG_STEPS) else ""
            print(f"  {method:18s} m={steps:3d}: " + " ".join(f"{r:.4f}" for r in rs) + flag)


def timings(model: WSNet, x: torch.Tensor, target: int, peak: float, args) -> None:
    one = x[:1]
    t_plain, c_plain = _best(lambda: captum_plain(model, one, target), args.reps_plain)
    print(f"\nplain captum, m=25 riemann_right, 3 scales, 1 slice: {t_plain:.2f} s/slice", end=" ")
    print(f"(cpu/threads {c_plain:.2f})")
    multiscale_saliency(model, x, target, steps=2)  # warm-up
    runs = [(DEFAULT_IG_METHOD, DEFAULT_IG_STEPS, len(x))] + [
        (DEFAULT_IG_METHOD, steps, 1) for steps in (4, 6, 8, 10, 12, 16, 25)
    ]
    for method, steps, n in runs:
        t, c = _best(
            lambda b=x[:n], s=steps, m=method: multiscale_saliency(model, b, target, steps=s, method=m),
            args.reps,
        )
        print(
            f"multiscale_saliency {method} m={steps:2d}, {n} slice(s) per call: {t / n:.3f} s/slice "
            f"(cpu/threads {c / n:.3f}); {t_plain / (t / n):.1f}x faster than plain"
        )
    t_at_25 = t

    macs = conv_macs(model, SIZE)
    # Per path point: one forward to Conv5 and Conv5's input-gradient backward over the whole
    # image, plus a forward and backward over the receptive-field window for Conv3 (44 px) and
    # Conv4 (104 px). An input-gradient backward of a convolution costs as many MACs as its
    # forward (weight gradients are not formed); the first layer's is counted though tiny.
    window = {s: conv_macs(model, size)[s] for s, size in (("conv3", 44), ("conv4", 104))}
    executed = 2 * macs["conv5"] + 2 * window["conv3"] + 2 * window["conv4"]
    dense = macs["conv5"] + sum(macs.values())  # one forward and three whole-image backward passes
    achieved = 2 * executed * 25 / t_at_25 / 1e9
    print(
        "\nforward MACs at 224: "
        + ", ".join(f"{s} {macs[s] / 1e9:.2f} G" for s in SCALES)
        + f"; executed per path point {executed / 1e9:.2f} GMAC (whole-image backward for all"
        f" three scales would be {dense / 1e9:.2f} GMAC)"
    )
    peak = max(peak, matmul_peak_gflops())
    print(
        f"float32 matmul peak {peak:.0f} GFLOP/s (best of two measurements); achieved by multiscale_saliency"
        f" (m=25, 1 slice) {achieved:.0f} GFLOP/s = {100 * achieved / peak:.0f} % of peak"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--timings-only", action="store_true", help="skip the step-count study")
    parser.add_argument("--trained-cache", help="save / reuse the briefly trained weights (torch file)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.methods = (
        ["gausslegendre", "riemann_middle"]
        if args.quick
        else ["gausslegendre", "riemann_middle", "riemann_trapezoid", "riemann_right"]
    )
    args.steps = [4, 6, 8, 12, 25] if args.quick else [4, 6, 8, 10, 12, 16, 25]
    args.reps, args.reps_plain = (2, 1) if args.quick else (5, 2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    peak = matmul_peak_gflops()
    print(f"float32 matmul (2048^3): {peak:.0f} GFLOP/s")

    torch.manual_seed(0)
    # Test slices of the blob class (2), the one whose evidence the saliency should find.
    test, _ = synthetic_batch(args.slices, SIZE, np.random.default_rng(1), label=2)

    nets = {}
    shipped = full_size_weights()
    if shipped is not None:
        nets[f"weights file {shipped[0]}"] = shipped[1]
    else:
        trained = WSNet(WSNetConfig())
        if args.trained_cache and Path(args.trained_cache).is_file():
            trained.load_state_dict(torch.load(args.trained_cache, weights_only=True))
            print(f"trained weights loaded from {args.trained_cache}")
        else:
            t0 = time.perf_counter()
            acc = train_briefly(trained, args.train_steps, np.random.default_rng(2))
            print(
                f"trained {args.train_steps} steps on synthetic 112-px crops in "
                f"{time.perf_counter() - t0:.0f} s, last-25-step train accuracy {acc:.2f}"
            )
            if args.trained_cache:
                torch.save(trained.state_dict(), args.trained_cache)
        nets[f"trained {args.train_steps} steps"] = trained.eval()
    torch.manual_seed(0)
    nets["random weights"] = WSNet(WSNetConfig()).eval()

    for name, net in nets.items():
        if not args.timings_only:
            study(name, net, test, 2, args)
    timings(next(iter(nets.values())), test, 2, peak, args)


if __name__ == "__main__":
    main()

"""Out-of-distribution distance, status and flags of the default model on a few kinds of input:
the bundled sample, a trained-on real CT, real CTs of other kinds, display images.

    python scripts/ood_scores.py --data ../shared/data

Prints one Markdown row per input (docs/reliability.md holds the table it gave).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--model", default="default")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    from napari_wscovid import detect, load_ct

    data = Path(args.data)
    first = lambda pattern: next(iter(sorted(data.glob(pattern))), None)  # noqa: E731
    cases = {
        "sample phantom (DICOM)": Path(__file__).resolve().parents[1] / "sample_data/phantom_covid/dicom",
        "normal001 (trained on)": data / "covid-ct-md/sample_data/Normal subjects/normal001",
        "totalseg-example (3 mm thorax-abdomen)": data / "totalseg-example/example_ct.nii.gz",
        "cip-ct64 (64x64 whole chest)": data / "cip-ct64/ct-64.nrrd",
        "UCSD COVID PNG (display image)": first("ucsd-covid-ct/**/*.png"),
        "MedSeg JPG (display crop)": first("medseg-infnet/**/*.jpg"),
    }
    print("| input | distance | status | answer | flags |\n|---|---|---|---|---|")
    for name, path in cases.items():
        if path is None or not Path(path).exists():
            print(f"| {name} | absent | | | |")
            continue
        run = detect(load_ct(str(path)), model=args.model, saliency="none", device="cpu")
        flags = ", ".join(f["name"] for f in run.qc if f["severity"] != "info")
        top = max(run.patient_probs)
        print(
            f"| {name} | {run.reliability.get('feature_distance')} | {run.status} | "
            f"{run.predicted_class} {top:.2f} | {flags} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

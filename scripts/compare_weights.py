"""Compare the weights of two model folders tensor by tensor: identical, or the largest absolute difference.

    python scripts/compare_weights.py runs/public-small/model checkpoints/pretrained/atlasformer-public-small

Prints one line per differing tensor and, last, a JSON summary; exits 0 either way (a difference at another
thread count is expected and reported, not an error), 2 when the folders hold different tensors. Where one folder
stores a tensor at lower precision (the shipped model is float16, a pretraining run float32), the other is rounded
to that precision first: a rebuild is identical when it rounds to the shipped weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.numpy import load_file


def rounded_alike(a, b):
    """``a`` and ``b`` at the lower of their two precisions (float32 vs float16: both float16)."""
    if a.dtype.kind == b.dtype.kind == "f" and a.dtype.itemsize != b.dtype.itemsize:
        low = min(a.dtype, b.dtype, key=lambda d: d.itemsize)
        return a.astype(low), b.astype(low)
    return a, b


def difference(a, b):
    return a.astype("float64") - b.astype("float64")


def compare(a: Path, b: Path) -> dict:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if set(left) != set(right) or any(left[k].shape != right[k].shape for k in left):
        return {"same_tensors": False, "only_in_first": sorted(set(left) - set(right)),
                "only_in_second": sorted(set(right) - set(left))}
    diffs = {k: float(abs(difference(*rounded_alike(left[k], right[k]))).max()) for k in sorted(left)}
    for name, diff in diffs.items():
        if diff > 0:
            print(f"{name}: max |difference| {diff:.3g}")
    return {"same_tensors": True, "identical": all(d == 0 for d in diffs.values()), "n_tensors": len(diffs),
            "max_abs_difference": max(diffs.values(), default=0.0)}


if __name__ == "__main__":
    result = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps(result))
    sys.exit(0 if result["same_tensors"] else 2)

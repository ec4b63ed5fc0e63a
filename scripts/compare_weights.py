"""Compare the weights of two model folders tensor by tensor: identical, or the largest absolute difference.

    python scripts/compare_weights.py runs/public-small/model model_zoo/pretrained/atlasformer-public-small

Prints one line per differing tensor and, last, a JSON summary; exits 0 either way (a difference at another
thread count is expected and reported, not an error), 2 when the folders hold different tensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.numpy import load_file


def compare(a: Path, b: Path) -> dict:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if set(left) != set(right) or any(left[k].shape != right[k].shape for k in left):
        return {"same_tensors": False, "only_in_first": sorted(set(left) - set(right)),
                "only_in_second": sorted(set(right) - set(left))}
    diffs = {k: float(abs(left[k].astype("float64") - right[k].astype("float64")).max()) for k in sorted(left)}
    for name, diff in diffs.items():
        if diff > 0:
            print(f"{name}: max |difference| {diff:.3g}")
    return {"same_tensors": True, "identical": all(d == 0 for d in diffs.values()), "n_tensors": len(diffs),
            "max_abs_difference": max(diffs.values(), default=0.0)}


if __name__ == "__main__":
    result = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps(result))
    sys.exit(0 if result["same_tensors"] else 2)

"""How much the pretrained embedding should weigh beside the HVGs in the annotation readout (docs/model_quality.md).

For each held-out batch of the annotation protocol (BENCHMARKS.md section 1), fits L2 logistic regression (C=1)
on [log-normalised HVGs; z-scored zero-shot embedding x s], where s scales the embedding's total variance to
w x the HVGs' total variance (w = 0: the logreg baseline), with and without balanced class weights.

    python benchmarks/annotation_readout_weights.py ../shared/data/kang_pbmc_8donors.h5ad cell_type [MODEL]

Prints one row per setting (accuracy and macro-F1, mean over held-out batches) and, last, a JSON object.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from atlasformer.finetune import benchmark_methods
from atlasformer.finetune.baselines import RNAFeatures
from atlasformer.finetune.benchmark import BenchmarkConfig, annotation_holdouts, labelled_mask, load_inputs
from atlasformer.finetune.metrics import classification_metrics

WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, None)  # None: unit variance per embedding dimension


def main(path: str, labels_key: str, model: str = "atlasformer-public-small") -> dict:
    torch.set_num_threads(1)
    inp = load_inputs(path, labels_key=labels_key, batch_key="batch", model=model)
    embedding = benchmark_methods.cached_zero_shot(inp)
    labelled = labelled_mask(inp.labels)
    scores: dict[str, list] = {}
    for fold in annotation_holdouts(inp, BenchmarkConfig()):
        train = np.flatnonzero(labelled & (inp.batch != fold))
        test = np.flatnonzero(labelled & (inp.batch == fold) & np.isin(inp.labels, np.unique(inp.labels[train])))
        features = RNAFeatures.fit(inp.counts[train])
        x_train, x_test = features.hvg_matrix(inp.counts[train]), features.hvg_matrix(inp.counts[test])
        mean, sd = embedding[train].mean(0), embedding[train].std(0) + 1e-6
        z_train, z_test = (embedding[train] - mean) / sd, (embedding[test] - mean) / sd
        for weight in WEIGHTS:
            scale = 1.0 if weight is None else np.sqrt(weight * x_train.var(0).sum() / embedding.shape[1])
            a, b = np.hstack([x_train, scale * z_train]), np.hstack([x_test, scale * z_test])
            for class_weight in (None, "balanced"):
                fitted = LogisticRegression(C=1.0, max_iter=1000, class_weight=class_weight).fit(a, inp.labels[train])
                result = classification_metrics(inp.labels[test], fitted.predict(b))
                scores.setdefault(f"w={weight} class_weight={class_weight}", []).append(
                    (result["accuracy"], result["macro_f1"]))
    summary = {}
    for setting, values in scores.items():
        accuracy, macro_f1 = np.mean(values, axis=0)
        summary[setting] = {"accuracy": round(float(accuracy), 4), "macro_f1": round(float(macro_f1), 4)}
        print(f"{inp.dataset} {setting}: accuracy {accuracy:.4f} macro-F1 {macro_f1:.4f}")
    return {"dataset": inp.dataset, "model": model, "settings": summary}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))

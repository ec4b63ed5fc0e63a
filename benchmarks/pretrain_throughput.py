"""Pretraining throughput on CPU: atlasformer's CellTransformer against scGPT's TransformerModel.

Both models have the same size (4 layers, d_model 256, 8 heads, feed-forward 512), the same
architecture choices as scGPT's (post-norm, ReLU, continuous value encoder, masked-value MSE + MVC
objectives, dropout 0.2), and train on the same real cells (binned, up to 1,200 expressed genes each)
in the same batches, in the same order, alternating model by model in one process, so that a change
in machine load hits both. Reported: cells/s and non-pad tokens/s of each and their ratio, and our
achieved FLOP/s (FLOPs counted on non-pad tokens, ``training_flops``) as a fraction of this machine's
fp32 matmul FLOP/s measured in the same run.

scGPT 0.2.4 is installed with ``--no-deps``; its package ``__init__`` imports torchtext (which cannot
load with torch 2.13) and IPython, so its model and loss files are loaded on their own (see
:func:`import_scgpt_model`; here only). scGPT runs with ``use_fast_transformer=False`` (no flash-attn
on CPU), i.e. torch's ``nn.TransformerEncoder``.

Usage: python benchmarks/pretrain_throughput.py [--data FILE] [--batch-size B] [--batches N] [--rounds R]
The last line printed is one JSON object (``cells_per_s``, ``scgpt_cells_per_s``, ``ratio_vs_scgpt``,
``matmul_fraction``, against the matmul rate measured interleaved with the batches); results go to
benchmarks/results/pretrain_throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from atlasformer.model_zoo import CellTransformerConfig, CellTransformerForPretraining, count_parameters
from atlasformer.model_zoo.cell_transformer import training_flops
from atlasformer.pretrain.objectives import mask_batch
from atlasformer.tokenization import (
    CellTokenizer,
    TokenizerConfig,
    build_vocab,
    collate,
    read_h5ad,
    tokenize_anndata,
)

HERE = Path(__file__).resolve().parent
SIZE = {"d_model": 256, "n_layers": 4, "n_heads": 8, "d_ff": 512}
# (length-grouped batches, dropout): the headline first, then random batches, then no dropout at all
SETTINGS = [(True, 0.2), (False, 0.2), (True, 0.0)]


# ---------------------------------------------------------------------------------------- scGPT
def import_scgpt_model():
    """scGPT's ``TransformerModel`` and ``masked_mse_loss`` from its own files, without its package ``__init__``.

    ``import scgpt`` pulls in its tokenizer (torchtext, which cannot load with torch 2.13) and utilities
    (IPython, wandb, ...) that a ``--no-deps`` install lacks; the model and loss modules need none of
    them. Empty stand-ins for the two packages, pointing at the installed files, let exactly those
    modules load.
    """
    if "scgpt.model.model" not in sys.modules:
        root = Path(importlib.util.find_spec("scgpt").origin).parent  # finds, does not import
        for name, folder in (("scgpt", root), ("scgpt.model", root / "model")):
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules.setdefault(name, package)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flash_attn is not installed"
        model = importlib.import_module("scgpt.model.model")
        loss = importlib.import_module("scgpt.loss")
    return model.TransformerModel, loss.masked_mse_loss


# ---------------------------------------------------------------------------------------- data
def load_cells(path: Path, n_cells: int, seed: int):
    """``n_cells`` random cells of ``path``, binned (51 bins) with up to 1,200 genes each."""
    adata = read_h5ad(path)
    rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, size=min(n_cells, adata.n_obs), replace=False))
    adata = adata[rows].to_memory() if adata.isbacked else adata[rows].copy()
    tokenizer = CellTokenizer(build_vocab([adata]), TokenizerConfig(kind="binned", n_bins=51, max_seq_len=1200))
    return tokenize_anndata(adata, tokenizer).cells, tokenizer


def make_batches(lengths: np.ndarray, batch_size: int, group_by_length: bool, seed: int) -> list[np.ndarray]:
    """Shuffled full batches; with ``group_by_length`` cells of similar length share a batch (less padding)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    if group_by_length:
        order = order[np.argsort(lengths[order], kind="stable")]
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def masked_batch(cells, rows, tokenizer, seed: int) -> dict[str, torch.Tensor]:
    batch = collate(cells, rows, cls_id=tokenizer.vocab.cls_id, pad_id=tokenizer.vocab.pad_id)
    return mask_batch(batch, mask_ratio=0.4, mask_value=-1.0, mask_token_id=None, mask_genes=False,
                      generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- models
def build_ours(vocab_size: int, pad_id: int, dropout: float) -> CellTransformerForPretraining:
    config = CellTransformerConfig(
        vocab_size=vocab_size, **SIZE, dropout=dropout, norm_first=False, activation="relu",
        value_encoding="continuous", gene_embedding_norm=True, embedding_norm=False, value_head="mse",
        mvc_head=True, pad_token_id=pad_id)
    return CellTransformerForPretraining(config)


def build_scgpt(TransformerModel, vocab_size: int, pad_id: int, dropout: float):
    return TransformerModel(
        ntoken=vocab_size, d_model=SIZE["d_model"], nhead=SIZE["n_heads"], d_hid=SIZE["d_ff"],
        nlayers=SIZE["n_layers"], vocab={"<pad>": pad_id}, dropout=dropout, pad_token="<pad>", pad_value=0,
        do_mvc=True, input_emb_style="continuous", cell_emb_style="cls", use_fast_transformer=False)


def step_ours(model, optimizer, batch) -> float:
    out = model(batch["input_ids"], batch["values"], batch["attention_mask"], value_targets=batch["value_targets"],
                target_mask=batch["target_mask"], objective_weights={"masked_value": 1.0, "mvc": 1.0})
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def step_scgpt(model, optimizer, batch, masked_mse_loss) -> float:
    out = model(batch["input_ids"], batch["values"], src_key_padding_mask=~batch["attention_mask"], MVC=True)
    mask = batch["target_mask"]
    loss = masked_mse_loss(out["mlm_output"], batch["value_targets"], mask) + masked_mse_loss(
        out["mvc_output"], batch["value_targets"], mask)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


# ---------------------------------------------------------------------------------------- measuring
def matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s of ``size`` x ``size`` products on this machine, current threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def sustained_matmul(seconds: float, size: int = 2048) -> tuple[float, float]:
    """(FLOPs, seconds) of back-to-back fp32 matmuls for about ``seconds``: the rate under the current load."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n, time.perf_counter() - start


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_setting(cells, tokenizer, batch_size: int, n_batches: int, rounds: int, group_by_length: bool,
                dropout: float, seed: int) -> dict:
    """Alternate the two models, batch by batch, over identical batches; returns timings and counts."""
    TransformerModel, masked_mse_loss = import_scgpt_model()
    torch.manual_seed(seed)
    ours = build_ours(len(tokenizer.vocab), tokenizer.vocab.pad_id, dropout).train()
    theirs = build_scgpt(TransformerModel, len(tokenizer.vocab), tokenizer.vocab.pad_id, dropout).train()
    # the same optimizer for both: fused AdamW (what atlasformer's engine uses)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=True)
    rows = make_batches(cells.lengths, batch_size, group_by_length, seed)[: n_batches + 1]
    data = [masked_batch(cells, r, tokenizer, seed + i) for i, r in enumerate(rows)]
    step_ours(ours, opt_ours, data[0])  # allocator and kernel warm-up, untimed
    step_scgpt(theirs, opt_theirs, data[0], masked_mse_loss)
    t_ours = t_theirs = 0.0
    n_cells = n_tokens = n_padded = 0
    flops = mm_flops = mm_time = 0.0
    for _ in range(rounds):
        for batch in data[1:]:
            # the matmul rate right before each batch, under the same load as the training step
            f, t = sustained_matmul(1.0)
            mm_flops, mm_time = mm_flops + f, mm_time + t
            t_ours += _timed(lambda b=batch: step_ours(ours, opt_ours, b))
            t_theirs += _timed(lambda b=batch: step_scgpt(theirs, opt_theirs, b, masked_mse_loss))
            lengths = batch["attention_mask"].sum(1)
            n_cells += len(lengths)
            n_tokens += int(lengths.sum())
            n_padded += batch["attention_mask"].numel()
            flops += training_flops(ours.config, lengths)
    return {
        "group_by_length": group_by_length,
        "dropout": dropout,
        "batches_timed": len(data[1:]) * rounds,
        "cells": n_cells,
        "non_pad_tokens": n_tokens,
        "padding_fraction": 1 - n_tokens / n_padded,
        "cells_per_s": n_cells / t_ours,
        "scgpt_cells_per_s": n_cells / t_theirs,
        "tokens_per_s": n_tokens / t_ours,
        "scgpt_tokens_per_s": n_tokens / t_theirs,
        "ratio_vs_scgpt": t_theirs / t_ours,
        "flops_per_s": flops / t_ours,
        "interleaved_matmul_flops_per_s": mm_flops / mm_time,
        "matmul_fraction_interleaved": flops / t_ours / (mm_flops / mm_time),
        "parameters": count_parameters(ours),
        "scgpt_parameters": count_parameters(theirs),
    }


def write_results(results: dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "pretrain_throughput.json").write_text(json.dumps(results, indent=2))
    head = results["headline"]
    lines = [
        "# Pretraining throughput: atlasformer vs scGPT (CPU)",
        "",
        f"- date: {results['date']}; machine: {results['machine']}; torch {results['torch']}, "
        f"{results['threads']} threads",
        f"- load: {results['load_note']}",
        f"- data: {results['data']}, {results['n_cells']} cells drawn, binned (51 bins), up to 1,200 genes per cell; "
        f"batch size {results['batch_size']}, {results['n_batches']} timed batches per setting, each batch "
        "run by both models one after the other (after one untimed warm-up batch)",
        "- models: 4 layers, d_model 256, 8 heads, feed-forward 512, post-norm, ReLU, continuous value encoder, "
        f"masked-value MSE + MVC, mask ratio 0.4, fused AdamW; atlasformer {head['parameters']:,} / scGPT "
        f"{head['scgpt_parameters']:,} parameters; scGPT 0.2.4 `TransformerModel(use_fast_transformer=False)`. "
        "Dropout applies to embeddings and residual branches in both; scGPT's `nn.TransformerEncoderLayer` "
        "also drops attention probabilities, which rules out torch's fused attention kernels, while "
        "atlasformer's `attention_dropout` defaults to 0.",
        f"- fp32 matmul rate (2048^3 products): best single product before / after the run "
        f"{results['matmul_tflops']:.3f} TFLOP/s; sustained, interleaved with the batches (1 s of back-to-back "
        "products before each batch, under the same load as the training steps): "
        + ", ".join(f"{row['interleaved_matmul_flops_per_s'] / 1e12:.3f}" for row in results["settings"])
        + " TFLOP/s per setting",
        "",
        "| batches | dropout | padding | atlasformer cells/s | scGPT cells/s | ratio | atlasformer tokens/s "
        "| scGPT tokens/s | atlasformer TFLOP/s | of interleaved matmul | of best matmul |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["settings"]:
        lines.append(
            f"| {'length-grouped' if row['group_by_length'] else 'random'} | {row['dropout']} "
            f"| {row['padding_fraction']:.1%} | {row['cells_per_s']:.3f} | {row['scgpt_cells_per_s']:.3f} "
            f"| {row['ratio_vs_scgpt']:.2f}x | {row['tokens_per_s']:.0f} | {row['scgpt_tokens_per_s']:.0f} "
            f"| {row['flops_per_s'] / 1e12:.4f} | {row['matmul_fraction_interleaved']:.1%} "
            f"| {row['flops_per_s'] / 1e12 / results['matmul_tflops']:.1%} |")
    lines += [
        "",
        f"Headline ({results['headline_setting']}): {head['cells_per_s']:.3f} vs {head['scgpt_cells_per_s']:.3f} "
        f"cells/s, ratio {head['ratio_vs_scgpt']:.2f}x; matmul fraction {results['matmul_fraction']:.1%} "
        f"of the interleaved matmul rate ({results['matmul_fraction_of_best']:.1%} of the best single product).",
        "",
        "The matmul fraction compares training with matmuls measured under the same conditions: when other "
        "jobs share the cores, the load changes over a run, and a rate measured once before and after (the "
        "last column) may catch a quieter or busier moment than the training steps did; on an idle machine "
        "the two agree.",
        "",
        "FLOPs are counted on non-pad tokens only (`atlasformer.model_zoo.cell_transformer.training_flops`: "
        "3x the forward matmul FLOPs of encoder, attention and heads), so padding shows up as lost utilisation.",
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    (output / "pretrain_throughput.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "pbmc4k_10x_v2.h5ad"))
    parser.add_argument("--cells", type=int, default=256, help="cells drawn from the file (the batches' pool)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="cells per batch (scGPT's attention needs ~0.9 GB per cell at 1,200 genes)")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per setting")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the same batches")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    cells, tokenizer = load_cells(Path(args.data), args.cells, args.seed)
    matmul = matmul_flops_per_s()
    settings = [run_setting(cells, tokenizer, args.batch_size, args.batches, args.rounds, group, dropout, args.seed)
                for group, dropout in SETTINGS]
    matmul = max(matmul, matmul_flops_per_s())  # measured before and after; the better is the machine's peak
    load_after = os.getloadavg()[0]
    headline = settings[0]
    shared = max(load_before, load_after) > 0.5
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": args.threads,
        "load_note": (f"1-minute load average {load_before:.1f} before and {load_after:.1f} after the run; "
                      + ("other jobs shared the cores during the run, so absolute rates are lower than on an idle "
                         "machine (the two models alternate batch by batch, so the ratio is less affected)"
                         if shared else "the machine was otherwise idle")),
        "data": Path(args.data).name,
        "n_cells": len(cells),
        "batch_size": args.batch_size,
        "n_batches": args.batches,
        "rounds": args.rounds,
        "matmul_tflops": matmul / 1e12,
        "settings": settings,
        "headline_setting": "length-grouped batches, dropout 0.2",
        "headline": headline,
        "matmul_fraction": headline["matmul_fraction_interleaved"],
        "matmul_fraction_of_best": headline["flops_per_s"] / matmul,
        "command": "python benchmarks/pretrain_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_results(results, Path(args.output))
    final = {"cells_per_s": headline["cells_per_s"], "scgpt_cells_per_s": headline["scgpt_cells_per_s"],
             "ratio_vs_scgpt": headline["ratio_vs_scgpt"], "matmul_fraction": results["matmul_fraction"]}
    print((Path(args.output) / "pretrain_throughput.md").read_text())
    print(json.dumps(final))
    return final


if __name__ == "__main__":
    main()

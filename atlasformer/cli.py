"""The ``atlasformer`` command line: one subcommand per job, the same flags everywhere (docs/cli.md).

Inputs and outputs are flags (``--data``, ``--model``, ``--output``, ``--layer``, ``--labels-key``,
``--batch-key``); configuration fields are ``key=value`` overrides after the flags, applied over
``--config FILE``. Run as ``atlasformer ...`` or ``python -m atlasformer.cli ...`` (for torchrun).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from atlasformer.config import ConfigError, configs_root, load_config, to_plain


# ----------------------------------------------------------------------------------------- flags
def add_io(parser: argparse.ArgumentParser, *, model: bool = True, labels: bool = False, batch: bool = True,
           data_required: bool = True) -> None:
    parser.add_argument("--data", nargs="+", required=data_required, metavar="FILE",
                        help="h5ad files, folders of them, or a SOMA experiment")
    if model:
        parser.add_argument("--model", metavar="PATH_OR_HUB_ID", help="model folder or hub id (org/name)")
        parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--layer", help="read counts from this layer instead of X")
    parser.add_argument("--gene-key", help="var column with gene identifiers instead of var_names")
    if labels:
        parser.add_argument("--labels-key", help="obs column with cell labels")
    if batch:
        parser.add_argument("--batch-key", help="obs column with batches")
    parser.add_argument("--config", metavar="FILE", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lr=1e-4 model.d_model=64")


def single_input(args) -> str:
    if len(args.data) != 1:
        raise ConfigError(f"this command takes one --data file, got {len(args.data)}; run it once per file.")
    return args.data[0]


def resolved_model(args):
    if not args.model:
        return None
    from atlasformer.model_zoo.hub import resolve_model_path

    return resolve_model_path(args.model, revision=getattr(args, "revision", None))


# ----------------------------------------------------------------------------------------- commands
def cmd_pretrain(args) -> int:
    from atlasformer.pretrain import PretrainConfig, train

    base = {"data": args.data, "output": args.output}
    for key in ("layer", "gene_key", "batch_key"):
        if getattr(args, key, None):
            base[key] = getattr(args, key)
    if args.model:
        base["init_from"] = str(resolved_model(args))
    cfg = load_config(PretrainConfig, args.config, args.overrides, base=base)
    out = train(cfg, resume=args.resume, run_config=to_plain(cfg))
    print(f"model folder: {out}")
    return 0


def finetune_config(args, task: str):
    from atlasformer.finetune import FinetuneConfig

    base = {}
    if getattr(args, "from_scratch", False):
        base["from_scratch"] = True
    return load_config(FinetuneConfig, args.config, args.overrides, base=base)


def make_task(task: str, args, cfg):
    """The user-facing task object for ``task`` (a plain lookup)."""
    from atlasformer.finetune import Annotator

    keys = {"layer": args.layer, "gene_key": args.gene_key, "batch_key": args.batch_key}
    model = None if cfg.from_scratch else resolved_model(args)
    builders = {
        "annotation": lambda: Annotator(model, cfg, labels_key=_require(args, "labels_key"), **keys),
    }
    if task not in builders:
        raise ConfigError(f"unknown task {task!r}; choose from {sorted(builders)}.")
    return builders[task]()


def _require(args, name: str) -> str:
    value = getattr(args, name, None)
    if not value:
        raise ConfigError(f"--{name.replace('_', '-')} is required for this task.")
    return value


def cmd_finetune(args) -> int:
    from atlasformer.finetune import finetune_file

    cfg = finetune_config(args, args.task)
    if not cfg.from_scratch and not args.model:
        raise ConfigError("pass --model (a pretrained folder or hub id), or --from-scratch.")
    task = make_task(args.task, args, cfg)
    summary = finetune_file(task, single_input(args), args.output, with_x=args.with_x,
                            run_config={"task": args.task, **to_plain(cfg)})
    print(json.dumps({k: v for k, v in summary["validation"].items() if not isinstance(v, dict)}, indent=2))
    print(f"outputs written to {args.output}")
    return 0


def load_task(task: str, args, cfg):
    """A fitted task object from a fine-tuned folder."""
    from atlasformer.finetune import Annotator

    keys = {"layer": args.layer, "gene_key": args.gene_key}
    loaders = {
        "annotation": lambda folder: Annotator.load(folder, cfg, **keys),
    }
    if task not in loaders:
        raise ConfigError(f"unknown task {task!r}; choose from {sorted(loaders)}.")
    return loaders[task](resolved_model(args))


def cmd_predict(args) -> int:
    from atlasformer.finetune import predict_file

    if not args.model:
        raise ConfigError("predict needs --model: a fine-tuned model folder or hub id.")
    cfg = finetune_config(args, args.task)
    task = load_task(args.task, args, cfg)
    for data in expand(args.data):
        print(f"wrote {predict_file(task, data, args.output, with_x=args.with_x)}")
    return 0


def expand(paths):
    from atlasformer.tokenization import expand_data_paths

    return expand_data_paths(paths)


def cmd_embed(args) -> int:
    from atlasformer.api import cell_embeddings, from_pretrained
    from atlasformer.finetune.common import output_adata, write_h5ad_atomic
    from atlasformer.tokenization import input_stem, read_h5ad

    if not args.model:
        raise ConfigError("embed needs --model: a model folder or hub id.")
    pair = from_pretrained(args.model, revision=args.revision)
    for data in expand(args.data):
        adata = read_h5ad(data, backed=True)
        target = output_adata(adata, args.with_x)
        target.obsm["X_atlasformer"] = cell_embeddings(adata, pair, layer=args.layer, gene_key=args.gene_key)
        print(f"wrote {write_h5ad_atomic(target, Path(args.output) / f'{input_stem(data)}.h5ad')}")
    return 0


def cmd_quickstart(args) -> int:
    """Simulate (or read) data, pretrain a tiny model, fine-tune annotation, print the metrics."""
    from atlasformer.finetune import Annotator, FinetuneConfig, finetune_file
    from atlasformer.pretrain import PretrainConfig, train
    from atlasformer.tokenization import simulate_counts

    start = time.perf_counter()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.data:
        data, labels_key, batch_key = single_input(args), args.labels_key, args.batch_key
        if not labels_key:
            raise ConfigError("quickstart on your own file needs --labels-key (the obs column with cell types).")
    else:
        data, labels_key, batch_key = output / "simulated.h5ad", "cell_type", "batch"
        simulate_counts(n_cells=args.n_cells, seed=0).write_h5ad(data)
        print(f"simulated {args.n_cells:,} cells x 600 genes (5 cell types, 2 batches) -> {data}")
    root = configs_root()
    pre_cfg = load_config(PretrainConfig, root / "pretrain" / "quickstart.yaml", args.overrides,
                          base={"data": [str(data)], "output": str(output / "pretrain"), "layer": args.layer})
    model_dir = train(pre_cfg, resume=False, run_config=to_plain(pre_cfg)) if not (output / "pretrain" / "model").exists() \
        else output / "pretrain" / "model"
    ft_cfg = load_config(FinetuneConfig, root / "finetune" / "annotation" / "quickstart.yaml")
    annotator = Annotator(model_dir, ft_cfg, labels_key=labels_key, batch_key=batch_key, layer=args.layer)
    summary = finetune_file(annotator, data, output / "annotation", run_config=to_plain(ft_cfg))
    val = summary["validation"]
    print(f"\nquickstart finished in {time.perf_counter() - start:.0f} s")
    print(f"annotation on held-out cells: accuracy {val['accuracy']:.3f}, macro-F1 {val['macro_f1']:.3f} "
          f"({val['n_val']} cells)")
    print(f"pretrained model: {model_dir}\nfine-tuned model and annotated data: {output / 'annotation'}")
    return 0


# ----------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlasformer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a model on h5ad files", description="Pretrain a CellTransformer.")
    add_io(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --output")
    p.set_defaults(run=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a task head on a labelled file", description="Fine-tune a task.")
    p.add_argument("task", choices=["annotation"], help="the task")
    add_io(p, labels=True)
    p.add_argument("--from-scratch", action="store_true", help="random initialisation with a vocabulary from the data")
    p.add_argument("--with-x", action="store_true", help="copy X into the output file")
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser("predict", help="apply a fine-tuned model to new files", description="Predict with a fine-tuned model.")
    p.add_argument("task", choices=["annotation"], help="the task")
    add_io(p)
    p.add_argument("--with-x", action="store_true", help="copy X into the output file")
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("embed", help="zero-shot cell embeddings into obsm['X_atlasformer']", description="Embed cells.")
    add_io(p, batch=False)
    p.add_argument("--with-x", action="store_true", help="copy X into the output file")
    p.set_defaults(run=cmd_embed)

    p = sub.add_parser("quickstart", help="simulate data, pretrain a tiny model, fine-tune annotation",
                       description="End-to-end demo on simulated data (or --data FILE --labels-key K).")
    p.add_argument("--data", nargs="+", metavar="FILE", help="your own h5ad (default: simulated data)")
    p.add_argument("--output", default="quickstart_output", metavar="DIR", help="output folder")
    p.add_argument("--layer", help="read counts from this layer instead of X")
    p.add_argument("--labels-key", help="obs column with cell labels (with --data)")
    p.add_argument("--batch-key", help="obs column with batches (with --data)")
    p.add_argument("--n-cells", type=int, default=2000, help="cells to simulate (without --data)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pretraining config overrides")
    p.set_defaults(run=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from atlasformer.model_zoo import CheckpointError
    from atlasformer.tokenization import InputError

    try:
        return args.run(args)
    except (ConfigError, InputError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

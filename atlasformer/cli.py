"""The ``atlasformer`` command line: one subcommand per job, the same flags everywhere (docs/cli.md).

Inputs and outputs are flags (``--data``, ``--model``, ``--output``, ``--layer``, ``--labels-key``,
``--batch-key``); configuration fields are ``key=value`` overrides after the flags, applied over
``--config FILE``. Run as ``atlasformer ...`` or ``python -m atlasformer.cli ...`` (for torchrun).
"""

from __future__ import annotations

import argparse
import json
import logging
import numbers
import os
import re
import sys
import time
from pathlib import Path

from atlasformer import settings
from atlasformer.cli_analysis import add_analysis_commands
from atlasformer.config import ConfigError, configs_root, load_config, to_plain

logger = logging.getLogger("atlasformer.cli")  # not __name__: "__main__" under python -m atlasformer.cli

# ----------------------------------------------------------------------------------------- flags
SHIPPED_MODEL = "atlasformer-public-small"  # checkpoints.SHIPPED_MODELS (named here so --help needs no torch)
def overrides_help(example: str) -> str:
    """The --help epilog naming the command's own overrides (tests/test_docs_commands.py parses the example)."""
    return f"Configuration overrides follow the flags as KEY=VALUE, e.g. {example}."


def add_io(parser: argparse.ArgumentParser, *, model: bool = True, labels: bool = False, batch: bool = True,
           data_required: bool = True, overrides: str | None = None) -> None:
    parser.add_argument("--data", nargs="+", required=data_required, metavar="FILE",
                        help="h5ad files, folders of them, or a SOMA experiment")
    if model:
        parser.add_argument("--model", metavar="PATH_OR_HUB_ID", help="model folder or hub id (org/name)")
        parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
        parser.add_argument("--subfolder", help="folder inside the model repository that holds the model")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder")
    add_overwrite(parser)
    parser.add_argument("--layer", help="read counts from this layer instead of X")
    parser.add_argument("--gene-key", help="var column with gene identifiers instead of var_names")
    if labels:
        parser.add_argument("--labels-key", help="obs column with cell labels")
    if batch:
        parser.add_argument("--batch-key", help="obs column with batches")
    parser.add_argument("--config", metavar="FILE", help="YAML config (see configs/)")
    parser.epilog = overrides_help(overrides) if overrides else "This command takes no KEY=VALUE overrides."


def add_cpu(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu", action="store_true",
                        help="run on the CPU even when a GPU is present (the setting cpu=true)")


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an output folder holding files atlasformer did not write (never over an input)")


def single_input(args) -> str:
    if len(args.data) != 1:
        raise ConfigError(f"this command takes one --data file, got {len(args.data)}; run it once per file.")
    return args.data[0]


def resolved_model(args):
    if not args.model:
        return None
    from atlasformer.checkpoints import resolve_model

    # scGPT / Geneformer folders and repositories are converted on the fly (and cached)
    return resolve_model(args.model, revision=getattr(args, "revision", None), subfolder=getattr(args, "subfolder", None))


# ----------------------------------------------------------------------------------------- commands
TASK_NAMES = ("annotation", "integration", "imputation", "modality")
"""The keys of ``atlasformer.finetune.TASKS``, named here so --help needs no torch (tests/test_task_contract.py
checks they agree); everything else looks tasks up in that mapping."""


def cmd_pretrain(args) -> int:
    from atlasformer.pretrain import PretrainConfig, train

    base = {"data": args.data, "output": args.output}
    for key in ("layer", "gene_key", "batch_key", "cpu"):
        if getattr(args, key, None):
            base[key] = getattr(args, key)
    if args.model:
        base["init_from"] = str(resolved_model(args))
    cfg = load_config(PretrainConfig, args.config, args.overrides, base=base)
    out = train(cfg, resume=args.resume, run_config=to_plain(cfg), overwrite=args.overwrite)
    print(f"model folder: {out}")
    return finished_worker_exit()


def finished_worker_exit() -> int:
    """Exit code 0; a worker of a multi-process launch leaves at once, skipping interpreter teardown.

    After a finished run (outputs written, process group destroyed), destructors of gloo / DeepSpeed
    threads at teardown sometimes abort a worker with SIGABRT ("terminate called without an active
    exception"), which turns a successful launch into a failed one.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_tokenize(args) -> int:
    """Build a corpus: the YAML and ``tokenizer.``/tokenizer-field overrides make the TokenizerConfig,
    overrides naming a CorpusConfig field (shard_size, on_bad_input, ...) the build options."""
    import dataclasses

    from atlasformer.tokenization import CellTokenizer, TokenizerConfig
    from atlasformer.tokenization.corpus import CorpusConfig, build_corpus
    from atlasformer.tokenization.corpus_format import export_hf_dataset

    build_fields = {f.name for f in dataclasses.fields(CorpusConfig)} - {"tokenizer"}
    build = [o for o in args.overrides if o.split("=", 1)[0] in build_fields]
    tokenizer_items = [o.removeprefix("tokenizer.") for o in args.overrides if o not in build]
    tokenizer_cfg = load_config(TokenizerConfig, args.config, tokenizer_items)
    base = {k: getattr(args, k) for k in ("layer", "gene_key", "batch_key", "labels_key") if getattr(args, k, None)}
    if args.overwrite:
        base["overwrite"] = True
    cfg = dataclasses.replace(load_config(CorpusConfig, None, build, base=base), tokenizer=tokenizer_cfg)
    tokenizer = CellTokenizer.load(resolved_model(args)) if args.model else None
    manifest = build_corpus(args.data, args.output, tokenizer, config=cfg)
    if args.export_hf:
        print(f"Hugging Face dataset (input_ids): {export_hf_dataset(args.output, args.export_hf)}")
    print(f"corpus: {args.output} ({manifest['n_cells']:,} cells in {len(manifest['shards'])} shards)")
    return 0


def finetune_config(args, task: str):
    from atlasformer.finetune import FinetuneConfig

    base = {}
    if getattr(args, "from_scratch", False):
        base["from_scratch"] = True
    if getattr(args, "unknown_threshold", None) is not None:
        base["unknown_threshold"] = args.unknown_threshold
    if getattr(args, "cpu", False):
        base["cpu"] = True
    return load_config(FinetuneConfig, args.config, args.overrides, base=base)


def task_class(task: str) -> type:
    """The class of ``task`` in ``atlasformer.finetune.TASKS``."""
    from atlasformer.finetune import TASKS

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {sorted(TASKS)}.")
    return TASKS[task]


def constructor_keys(cls: type, values: dict) -> dict:
    """The entries of ``values`` that ``cls``'s constructor takes, by name (the flag ``--labels-key`` is
    ``labels_key``, ``--paired`` is ``paired``); ``model`` and ``config`` are passed by the caller."""
    import inspect

    names = set(inspect.signature(cls).parameters) - {"model", "config"}
    return {name: value for name, value in values.items() if name in names}


def make_task(task: str, args, cfg):
    """The user-facing task object for ``task``, built from the command's flags."""
    cls = task_class(task)
    model = None if cfg.from_scratch else resolved_model(args)
    for name in cls.required_keys:
        _require(args, name)
    return cls(model, cfg, **constructor_keys(cls, vars(args)))


def _require(args, name: str) -> str:
    value = getattr(args, name, None)
    if not value:
        raise ConfigError(f"--{name.replace('_', '-')} is required for this task.")
    return value


def cmd_finetune(args) -> int:
    from atlasformer.finetune import finetune_file
    from atlasformer.tokenization.console import is_main_process

    cfg = finetune_config(args, args.task)
    if not cfg.from_scratch and not args.model:
        raise ConfigError("pass --model (a pretrained folder or hub id), or --from-scratch.")
    task = make_task(args.task, args, cfg)
    queries = expand(args.query or [])
    summary = finetune_file(task, single_input(args), args.output, with_x=args.with_x,
                            run_config={"task": args.task, **to_plain(cfg)}, queries=tuple(queries),
                            overwrite=args.overwrite)
    if is_main_process():  # under a multi-process launch, rank 0 writes and reports
        print(json.dumps(printed_metrics(summary["validation"]), indent=2))
        for query in queries:  # label transfer / prediction on further files with the new model
            from atlasformer.finetune import predict_file

            print(f"wrote {predict_file(task, query, args.output, with_x=args.with_x)}")
        print(f"outputs written to {args.output}")
    return finished_worker_exit()


SCIB_HEADLINE = ("bio_conservation", "batch_correction", "total")


def printed_metrics(validation: dict) -> dict:
    """The validation numbers a command prints, flat and named: the task's own, its baselines'
    (``no_denoising.poisson_nll``, ``mean_baseline.rmse``) and the headline scIB scores of the unintegrated
    embedding (``scib.unintegrated_pca.total``; atlasformer's are ``scib_*``). The per-class table and the
    single scIB metrics stay in metrics.json.

    Parameters
    ----------
    validation
        A task's validation metrics, as ``metrics.json`` holds them.

    Returns
    -------
    dict
        ``name -> value``, nested names joined with dots.
    """
    flat = {}
    for key, value in validation.items():
        if key == "per_class":
            continue
        if key == "scib":
            value = {method: {k: v for k, v in scores.items() if k in SCIB_HEADLINE}
                     for method, scores in value.items() if method != "atlasformer"}
        flat.update(_flatten(key, value))
    return flat


def _flatten(name: str, value) -> dict:
    if not isinstance(value, dict):
        return {name: value}
    return {k: v for key, item in value.items() for k, v in _flatten(f"{name}.{key}", item).items()}


def load_task(task: str, args, cfg):
    """A fitted task object from a fine-tuned folder, with the obs keys its predictions use (``--batch-key`` for
    integration: Harmony corrects over the query's batches). A key the task's predictions do not use is
    refused rather than ignored."""
    cls = task_class(task)
    keys = {"layer": args.layer, "gene_key": args.gene_key}
    if args.batch_key:
        if "batch_key" not in cls.prediction_keys:
            raise ConfigError(f"predict {task} does not use --batch-key (its predictions need no batches); leave it "
                              "out. Only integration takes it: Harmony corrects over the query's batches.")
        keys["batch_key"] = args.batch_key
    return cls.load(resolved_model(args), cfg, **keys)


def cmd_predict(args) -> int:
    from atlasformer.finetune import predict_file, prepare_outputs

    if not args.model:
        raise ConfigError("predict needs --model: a fine-tuned model folder or hub id.")
    files = expand(args.data)
    prepare_outputs(args.output, files, reads=(args.model,), overwrite=args.overwrite, command="predict")
    cfg = finetune_config(args, args.task)
    task = load_task(args.task, args, cfg)
    if args.batch_key:  # a batch column named on the command line must be in every query
        from atlasformer.tokenization import read_h5ad
        from atlasformer.tokenization.anndata_io import check_obs_key

        for data in files:
            check_obs_key(read_h5ad(data, backed=True).obs, args.batch_key, source=str(data), what="batch_key")
    for data in files:
        print(f"wrote {predict_file(task, data, args.output, with_x=args.with_x)}")
    return 0


def expand(paths):
    from atlasformer.tokenization import expand_data_paths

    return expand_data_paths(paths)


def cmd_embed(args) -> int:
    from atlasformer.api import cell_embeddings, from_pretrained
    from atlasformer.finetune import prepare_outputs
    from atlasformer.finetune.common import output_adata, record_provenance, write_h5ad_atomic
    from atlasformer.finetune.runner import annotated_path
    from atlasformer.tokenization import read_h5ad

    if not args.model:
        raise ConfigError("embed needs --model: a model folder or hub id.")
    files = expand(args.data)
    prepare_outputs(args.output, files, reads=(args.model,), overwrite=args.overwrite, command="embed")
    pair = from_pretrained(args.model, revision=args.revision, subfolder=args.subfolder)
    for data in files:
        adata = read_h5ad(data, backed=True)
        target = output_adata(adata, args.with_x)
        target.obsm["X_atlasformer"] = cell_embeddings(adata, pair, layer=args.layer, gene_key=args.gene_key,
                                                       cpu=args.cpu)
        record_provenance(target, {("obsm", "X_atlasformer")}, model=args.model, layer=args.layer,
                          settings={"gene_key": args.gene_key}, weights=pair[0])
        print(f"wrote {write_h5ad_atomic(target, annotated_path(data, args.output))}")
    return 0


def cmd_quickstart(args) -> int:
    """Simulate (or read) data, pretrain a tiny model, fine-tune every head the data supports, print the metrics."""
    from atlasformer.finetune import FinetuneConfig, finetune_file
    from atlasformer.finetune.common import write_h5ad_atomic
    from atlasformer.pretrain import PretrainConfig, train
    from atlasformer.tokenization import simulate_counts, simulate_proteins
    from atlasformer.tokenization.outputs import prepare_output_folder

    start = time.perf_counter()
    output = prepare_output_folder(args.output, [*(args.data or []), *([args.paired] if args.paired else [])],
                                   overwrite=args.overwrite, command="quickstart")
    if args.data:
        data, paired, labels_key, batch_key = single_input(args), args.paired, args.labels_key, args.batch_key
        if not labels_key:
            raise ConfigError("quickstart on your own file needs --labels-key (the obs column with cell types).")
    else:
        data, paired, labels_key, batch_key = output / "simulated.h5ad", output / "simulated.protein.h5ad", "cell_type", "batch"
        adata = simulate_counts(n_cells=args.n_cells, seed=0)
        write_h5ad_atomic(adata, data)
        write_h5ad_atomic(simulate_proteins(adata, seed=0), paired)
        logger.info(f"simulated {args.n_cells:,} cells x 600 genes (5 cell types, 2 batches) and 20 proteins -> "
                    f"{data}, {paired}")
    root = configs_root()
    if args.data:  # a user's file: start from the shipped model (or --model), as the benchmark does
        model_dir = args.model or SHIPPED_MODEL
        logger.info(f"fine-tuning {model_dir} on {data}")
    elif (output / "pretrain" / "model").exists():
        model_dir = output / "pretrain" / "model"
    else:  # simulated genes are in no pretrained vocabulary: pretrain a tiny model on them
        pre_cfg = load_config(PretrainConfig, root / "pretrain" / "quickstart.yaml", args.overrides,
                              base={"data": [str(data)], "output": str(output / "pretrain"), "layer": args.layer})
        model_dir = train(pre_cfg, resume=False, run_config=to_plain(pre_cfg))
    ft_cfg = load_config(FinetuneConfig, root / "finetune" / "quickstart.yaml")
    heads = quickstart_heads(model_dir, ft_cfg, labels_key=labels_key, batch_key=batch_key, paired=paired,
                             layer=args.layer)
    results = {name: finetune_file(task, data, output / name, run_config={"task": name, **to_plain(ft_cfg)},
                                   overwrite=args.overwrite)
               for name, task in heads.items()}
    print(f"\nquickstart finished in {time.perf_counter() - start:.0f} s")
    for name, summary in results.items():
        scores = ", ".join(f"{k} {v:.3f}" for k, v in printed_metrics(summary["validation"]).items()
                           if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral))
        validation = summary["validation"]
        scib = f"; scIB scores on all {validation['scib_cells']:,} cells" if "scib_cells" in validation else ""
        print(f"{name} on held-out cells: {scores} ({validation.get('n_val', '?')} cells{scib})")
    print(f"pretrained model: {model_dir}\nfine-tuned models and outputs: "
          f"{', '.join(str(output / name) for name in results)}")
    return 0


def quickstart_heads(model_dir, cfg, *, labels_key: str, batch_key: str | None, paired, layer: str | None) -> dict:
    """The task objects the quickstart fine-tunes, in ``TASKS`` order: annotation and imputation always,
    integration with a batch key, RNA -> protein with paired protein counts."""
    from atlasformer.finetune import TASKS

    keys = {"labels_key": labels_key, "batch_key": batch_key, "layer": layer, "modality": "protein", "paired": paired}
    supported = {"integration": bool(batch_key), "modality": bool(paired)}
    return {name: cls(model_dir, cfg, **constructor_keys(cls, keys))
            for name, cls in TASKS.items() if supported.get(name, True)}


def cmd_benchmark(args) -> int:
    """Run one task of the benchmark protocol (docs/benchmarks.md) on one file with every applicable method."""
    from atlasformer.finetune.benchmark import BenchmarkConfig, run_benchmark

    cfg = load_config(BenchmarkConfig, args.config, args.overrides)
    if (args.paired is None) != (args.modality is None):
        raise ConfigError("--paired FILE and --modality protein|atac go together.")
    args.model = args.model or SHIPPED_MODEL
    from atlasformer.tokenization.outputs import prepare_output_folder

    extra = [x for x in (args.paired, args.query) if x]
    prepare_output_folder(args.output, [*args.data, *extra], overwrite=args.overwrite, command="benchmark")
    command = "atlasformer " + " ".join(sys.argv[1:]) if sys.argv else ""
    result = run_benchmark(args.task, single_input(args), output=args.output, paired=args.paired,
                           modality=args.modality, labels_key=args.labels_key, batch_key=args.batch_key,
                           layer=args.layer, gene_key=args.gene_key, model=resolved_model(args), methods=args.methods,
                           seeds=tuple(args.seeds), config=cfg, command=command, query=args.query)
    for method, reason in result["skipped"].items():
        print(f"skipped {method}: {reason}")
    print(f"results: {Path(args.output) / 'results.json'}\nreport: {result['report']}")
    return 0


# ----------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlasformer", description=__doc__.split("\n")[0])
    add_verbosity(parser, default=settings.DEFAULT_VERBOSITY)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a model on h5ad files", description="Pretrain a CellTransformer.")
    add_io(p, overrides="lr=1e-4 max_steps=20000 model=small")
    add_cpu(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --output")
    p.set_defaults(run=cmd_pretrain)

    p = sub.add_parser("tokenize", help="tokenize h5ad files / SOMA experiments into a sharded corpus",
                       description="Build a sharded, resumable corpus of tokenized cells (docs/corpus.md).")
    add_io(p, labels=True)
    p.add_argument("--export-hf", metavar="DIR", help="also export a rank-value corpus as a Hugging Face dataset")
    p.epilog = "Overrides: tokenizer fields (kind=rank max_seq_len=2048) and build options (shard_size=65536)."
    p.set_defaults(run=cmd_tokenize)

    p = sub.add_parser("finetune", help="fine-tune a task head on a labelled file", description="Fine-tune a task.")
    p.add_argument("task", choices=TASK_NAMES, help="the task")
    add_io(p, labels=True, overrides="epochs=10 lr=1e-3 mode=full")
    add_cpu(p)
    p.add_argument("--from-scratch", action="store_true", help="random initialisation with a vocabulary from the data")
    p.add_argument("--with-x", action="store_true", help="copy X into the output file")
    p.add_argument("--query", nargs="+", metavar="FILE", help="annotation: also predict these files (label transfer)")
    p.add_argument("--unknown-threshold", type=float, help="annotation: label cells below this confidence 'unknown'")
    p.add_argument("--modality", choices=["protein", "atac"], default="protein", help="modality: what to predict")
    p.add_argument("--paired", metavar="FILE", help="modality: the paired protein / ATAC h5ad (same obs_names; a .h5mu: split it with "
                   "atlasformer.finetune.modality.read_mudata_pair)")
    p.add_argument("--paired-obsm", metavar="KEY", help="modality: obsm key of --data holding the paired values")
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser("predict", help="apply a fine-tuned model to new files", description="Predict with a fine-tuned model.")
    p.add_argument("task", choices=TASK_NAMES, help="the task")
    add_io(p, overrides="chunk_size=1024")
    add_cpu(p)
    p.add_argument("--with-x", action="store_true", help="copy X into the output file")
    p.add_argument("--unknown-threshold", type=float, help="annotation: label cells below this confidence 'unknown'")
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("embed", help="zero-shot cell embeddings into obsm['X_atlasformer']", description="Embed cells.")
    add_io(p, batch=False)
    add_cpu(p)
    p.add_argument("--with-x", action="store_true", help="copy X into the output file")
    p.set_defaults(run=cmd_embed, takes_overrides=False)

    p = sub.add_parser("benchmark", help="compare atlasformer with scVI and simple baselines on one task",
                       description="Run the benchmark protocol of docs/benchmarks.md on one file.")
    p.add_argument("--task", required=True, choices=[*TASK_NAMES, "mapping"])
    add_io(p, labels=True, overrides="scvi_epochs=50 finetune.mode=full")  # --model defaults to the shipped model
    p.add_argument("--paired", metavar="FILE", help="modality: protein or ATAC counts of the same cells")
    p.add_argument("--modality", choices=["protein", "atac"], help="what --paired holds")
    p.add_argument("--query", metavar="FILE", help="mapping: a query file mapped onto --data (scored by the predicted "
                   "composition and unknown fraction; without it, each held-out batch of --data is the query)")
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="methods to run (default: all that apply)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED", help="seeds (default 0 1 2)")
    p.set_defaults(run=cmd_benchmark)

    p = sub.add_parser("quickstart", help="simulate data, pretrain a tiny model, fine-tune its heads",
                       description="End-to-end demo on simulated data (or --data FILE --labels-key K).")
    p.add_argument("--data", nargs="+", metavar="FILE", help="your own h5ad (default: simulated data)")
    p.add_argument("--output", default="quickstart_output", metavar="DIR", help="output folder")
    add_overwrite(p)
    p.add_argument("--layer", help="read counts from this layer instead of X")
    p.add_argument("--labels-key", help="obs column with cell labels (with --data)")
    p.add_argument("--batch-key", help="obs column with batches (with --data; adds the integration head)")
    p.add_argument("--paired", metavar="FILE", help="protein counts of the same cells (with --data; adds RNA -> protein)")
    p.add_argument("--model", metavar="PATH_OR_HUB_ID",
                   help=f"with --data: the model to fine-tune (default: {SHIPPED_MODEL}, shipped with the package)")
    p.add_argument("--n-cells", type=int, default=2000, help="cells to simulate (without --data)")
    p.epilog = overrides_help("max_steps=200 model.d_model=32") + " They apply to the tiny pretraining run."
    p.set_defaults(run=cmd_quickstart)
    add_convert_and_hub(sub)
    add_analysis_commands(sub)
    for command in subcommand_parsers(parser):  # -q / -v after the subcommand too; unset, they keep the top level's
        add_verbosity(command, default=argparse.SUPPRESS)
    return parser


def add_verbosity(parser: argparse.ArgumentParser, *, default) -> None:
    """``-q`` / ``-v``: ``args.verbosity`` 0 (warnings and results only) or 2 (debug), else ``default``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=0, default=default,
                       help="print warnings and results only: no progress messages or bars")
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=2, default=default,
                       help="also print debug messages")


def subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand's parser, nested ones (``hub push``) included."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += [sub, *subcommand_parsers(sub)]
    return found


# ----------------------------------------------------------------------------------- convert / hub
def cmd_convert(args) -> int:
    from atlasformer.checkpoints import convert_geneformer, convert_scgpt, load_model_folder

    where = {"revision": args.revision, "subfolder": args.subfolder}
    args.source, args.output = args.model or args.source, args.output or args.out
    if not args.source or not args.output:
        raise ConfigError("convert needs the source checkpoint and the output folder: "
                          "atlasformer convert scgpt --model DIR --output OUT (or positionally: DIR OUT).")
    converters = {
        "scgpt": lambda: convert_scgpt(args.source, args.output, overwrite=args.overwrite, **where),
        "geneformer": lambda: convert_geneformer(args.source, args.output, token_dictionary=args.token_dictionary,
                                                 gene_medians=args.gene_medians, overwrite=args.overwrite, **where),
    }
    out = converters[args.source_format]()
    model, tokenizer = load_model_folder(out)
    print(f"converted {args.source_format} checkpoint {args.source} -> {out}: {model.config.n_layers} layers, "
          f"d_model {model.config.d_model}, {len(tokenizer.vocab):,} tokens, {tokenizer.config.kind} tokenizer")
    return 0


def cmd_hub_push(args) -> int:
    from atlasformer.checkpoints import load_model, push_model_folder

    load_model(args.folder)  # the folder (transformer or VAE) must load as it is before anyone downloads it
    plan = push_model_folder(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run,
                             commit_message=args.commit_message, revision=args.revision)
    print(json.dumps(plan, indent=2))
    print("dry run: nothing uploaded" if args.dry_run else f"uploaded to {plan['url']}")
    return 0


def add_convert_and_hub(sub) -> None:
    p = sub.add_parser("convert", help="convert an scGPT or Geneformer checkpoint into an atlasformer model folder",
                       description="Convert a public checkpoint (folder or hub id) into a model folder.")
    p.add_argument("source_format", choices=["scgpt", "geneformer"], help="format of the source checkpoint")
    p.add_argument("source", metavar="DIR_OR_HUB_ID", nargs="?", help="scGPT folder (best_model.pt, vocab.json, args.json) "
                   "or Geneformer folder (BERT config.json + weights), or a hub id holding one (or --model)")
    p.add_argument("out", metavar="OUT", nargs="?", help="model folder to write (or --output)")
    p.add_argument("--model", metavar="DIR_OR_HUB_ID", help="the source checkpoint (same as the first positional)")
    p.add_argument("--output", metavar="DIR", help="model folder to write (same as the second positional)")
    add_overwrite(p)
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--subfolder", help="folder inside the source that holds the model")
    p.add_argument("--token-dictionary", metavar="PKL", help="Geneformer token dictionary (default: found by vocab size)")
    p.add_argument("--gene-medians", metavar="PKL", help="Geneformer gene-median dictionary (default: found beside it)")
    p.set_defaults(run=cmd_convert, takes_overrides=False)

    hub = sub.add_parser("hub", help="share model folders on the Hugging Face hub", description="Hub commands.")
    hub_sub = hub.add_subparsers(dest="hub_command", required=True)
    p = hub_sub.add_parser("push", help="upload a model folder (validated first)", description="Upload a model folder.")
    p.add_argument("folder", metavar="DIR", help="model folder (as exported by atlasformer)")
    p.add_argument("repo_id", metavar="ORG/NAME", help="hub repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--dry-run", action="store_true", help="validate and list the files, upload nothing")
    p.add_argument("--commit-message", help="commit message on the hub")
    p.add_argument("--revision", help="branch to push to (default: main)")
    p.set_defaults(run=cmd_hub_push, takes_overrides=False)


OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def single_value_options(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings of every (sub)command that take exactly one value (``--output DIR``, ``--commit-message M``)."""
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= single_value_options(sub)
        elif action.option_strings and action.nargs is None:
            found.update(action.option_strings)
    return found


def split_overrides(argv: list[str], single_value: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """``(flags, overrides)``: every ``key=value`` item that is not an existing path, nor the value of a
    single-value option, is an override, wherever it stands (after ``--data a.h5ad`` or ``--query q.h5ad``
    alike), so no list flag swallows one as a file name."""
    flags, overrides = [], []
    for i, item in enumerate(argv):
        is_value = i > 0 and argv[i - 1] in single_value
        (overrides if OVERRIDE.match(item) and not is_value and not Path(item).exists() else flags).append(item)
    return flags, overrides


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    flags, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv), single_value_options(parser))
    args, extras = parser.parse_known_args(flags)
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    args.overrides = overrides
    settings.verbosity = args.verbosity
    if overrides and not getattr(args, "takes_overrides", True):
        parser.error(f"{args.command} takes no KEY=VALUE overrides; got {' '.join(overrides)}")
    from atlasformer.checkpoints import CheckpointError
    from atlasformer.tokenization import InputError

    try:
        return args.run(args)
    except (ConfigError, InputError, CheckpointError, ValueError) as err:
        # settings the engine or a library refuses arrive as ValueError too; ATLASFORMER_DEBUG=1 shows the traceback
        if os.environ.get("ATLASFORMER_DEBUG") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Pretraining: one plain function, read top to bottom.

set-up (engine, seed, tokenizer, cells, model, optimizer, schedule, resume) -> loop (fetch the step's
micro-batches, count the targets across ranks, forward / backward under accumulation, clip, step) ->
log / evaluate / checkpoint at intervals -> export the model folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from atlasformer.checkpoints import export_model_folder, load_model_folder, refuse_foreign_model_folder
from atlasformer.model_zoo import CellTransformerConfig, CellTransformerForPretraining, count_parameters
from atlasformer.model_zoo.cell_transformer import training_flops
from atlasformer.model_zoo.from_tokenizer import VALUE_HEAD, config_for_tokenizer
from atlasformer.tokenization import (
    BatchOrder,
    CellTokenizer,
    Corpus,
    CorpusLoader,
    InputError,
    TokenizedCells,
    build_vocab,
    collate,
    input_stem,
    is_corpus,
    open_inputs,
    tokenize_anndata,
    vocab_of_tokens,
)
from atlasformer.tokenization.console import log_once, progress_bar
from atlasformer.tokenization.corpus_format import write_json_atomic
from atlasformer.tokenization.outputs import (
    prepare_output_folder,
    refuse_foreign_folder,
    refuse_output_over_inputs,
)
from atlasformer.tokenization.streaming import held_out_count

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import PretrainConfig
from .engine import BaseEngine, configure_threads, make_engine, peak_tflops
from .objectives import mask_batch

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ pure helpers
def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def split_rows(n_cells: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of cell positions into training and held-out evaluation rows.

    Parameters
    ----------
    n_cells
        Number of cells.
    eval_fraction
        Fraction held out: ``round(eval_fraction * n_cells)`` cells, at least one when it is > 0 and
        there are two cells or more, and never every cell.
    seed
        The run's seed; the same seed gives the same split.

    Returns
    -------
    tuple of numpy.ndarray
        Sorted training and held-out positions: disjoint, together ``0 .. n_cells - 1``.
    """
    perm = np.random.default_rng([seed, 7]).permutation(n_cells)
    n_eval = held_out_count(n_cells, eval_fraction)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A masking RNG that depends only on where we are, so resuming needs no extra state."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0]))


def seed_rank(seed: int, rank: int) -> None:
    """Seed this process's global RNGs (dropout) from ``(seed, rank)``; called once the model is built.

    Every rank builds the model from ``seed`` itself, so the initial weights agree without a broadcast
    (FSDP and ZeRO-3 have none); dropout then draws other masks on each rank, as for other cells.
    """
    from accelerate.utils import set_seed

    set_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The model's tensors of ``batch`` on ``device``.

    To a GPU they are copied from pinned memory without blocking: a copy from pageable memory waits
    for every queued kernel, and a non-blocking one overlaps the step's earlier micro-batches.
    """
    keys = ("input_ids", "values", "attention_mask", "conditions", "value_targets", "gene_targets", "target_mask",
            "domains")
    if "attention_mask" in batch and batch["attention_mask"].numpy().all():
        # checked on the host, before the copy: a batch without padding needs no mask, so flash attention can run
        keys = tuple(k for k in keys if k != "attention_mask")
    if torch.device(device).type != "cuda":
        return {k: batch[k].to(device) for k in keys if k in batch}
    pinned = {k: batch[k] if batch[k].is_pinned() else batch[k].pin_memory() for k in keys if k in batch}
    return {k: v.to(device, non_blocking=True) for k, v in pinned.items()}


# ------------------------------------------------------------------------------------ set-up helpers
def make_tokenizer(cfg: PretrainConfig, inputs) -> CellTokenizer:
    """The tokenizer of ``init_from``, or a new one over the union of the inputs' genes."""
    if cfg.init_from:
        return CellTokenizer.load(cfg.init_from)
    vocab = build_vocab([a for _, a in inputs], gene_key=cfg.gene_key, specials=cfg.tokenizer.special_tokens,
                        sources=[s for s, _ in inputs], gene_id_mode=cfg.tokenizer.gene_id_mode,
                        gene_table=cfg.tokenizer.gene_table, min_cells=cfg.vocab_min_cells, layer=cfg.layer)
    if cfg.tokenizer.kind == "rank":
        raise InputError("rank-value pretraining needs gene medians: build a corpus with `atlasformer tokenize` first.")
    tokenizer = CellTokenizer(vocab, cfg.tokenizer)
    if cfg.vocab_min_token_cells > 0:
        vocab = vocab_of_tokens([a for _, a in inputs], tokenizer, min_cells=cfg.vocab_min_token_cells,
                                gene_key=cfg.gene_key, layer=cfg.layer, sources=[s for s, _ in inputs])
        tokenizer = CellTokenizer(vocab, cfg.tokenizer)
    return tokenizer


@dataclasses.dataclass(frozen=True)
class CellTags:
    """Ids beside each cell's tokens: its condition tokens, and its domain for the batch adversary."""

    conditions: np.ndarray  # (cells,) or (cells, keys) ids into condition_names
    condition_names: list[str]
    domains: np.ndarray  # (cells,) ids into domain_names
    domain_names: list[str]


def load_cells(cfg: PretrainConfig, tokenizer: CellTokenizer, inputs, log) -> tuple[TokenizedCells, CellTags]:
    """Tokenize every input in memory; returns the cells and their condition and domain ids."""
    parts, conditions, domains = [], [], []
    offset = 0
    domain_key = [cfg.adversary_key] if cfg.adversary_key else []
    for source, adata in inputs:
        data = tokenize_anndata(adata, tokenizer, layer=cfg.layer, gene_key=cfg.gene_key, source=source, cell_offset=offset)
        log.once(data.report.summary())
        offset += adata.n_obs
        parts.append(data.cells)
        conditions.append(condition_labels(data.obs, condition_keys(cfg), source, len(data.cells)))
        domains.append(condition_labels(data.obs, domain_key, source, len(data.cells)))
    condition_table, condition_names = condition_ids(np.concatenate(conditions), condition_keys(cfg))
    domain_table, domain_names = condition_ids(np.concatenate(domains), domain_key)
    return TokenizedCells.concatenate(parts), CellTags(condition_table, condition_names, domain_table, domain_names)


def load_corpus(cfg: PretrainConfig, rank: int, world_size: int, log):
    """A corpus folder as ``--data``: its tokenizer, this rank's streaming loader, and held-out cells in memory.

    Returns ``(tokenizer, loader, eval_cells, eval_tags)``.
    """
    corpus = Corpus(cfg.data[0])
    tokenizer = corpus.tokenizer
    if cfg.init_from and CellTokenizer.load(cfg.init_from).vocab != tokenizer.vocab:
        raise InputError(f"{corpus.path} was tokenized with another vocabulary than {cfg.init_from}; rebuild it with "
                         f"`atlasformer tokenize --model {cfg.init_from} ...`.")
    loader = CorpusLoader(corpus, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world_size, config=cfg.loader,
                          eval_fraction=cfg.eval_fraction, condition_keys=tuple(condition_keys(cfg)),
                          domain_key=cfg.adversary_key)
    eval_cells, eval_conditions, eval_domains = loader.eval_cells(cfg.eval_batches * cfg.batch_size)
    log(f"corpus {corpus.path}: {len(corpus):,} cells ({tokenizer.config.kind} tokens, {len(tokenizer.vocab):,} in the "
        f"vocabulary), streamed in blocks of {cfg.loader.block_size} through a {cfg.loader.buffer_size:,}-cell shuffle "
        f"buffer; {len(corpus) - loader.n_train_cells:,} cells held out, the first {len(eval_cells):,} evaluated")
    return tokenizer, loader, eval_cells, CellTags(eval_conditions, loader.condition_names, eval_domains, loader.domain_names)


TOKENIZER_FIELDS = ("kind", "n_bins", "max_seq_len", "selection", "target_sum", "gene_id_mode")


def adopt_corpus_tokenizer(cfg: PretrainConfig, tokenizer: CellTokenizer) -> tuple[PretrainConfig, str]:
    """``cfg`` with the corpus's tokenizer (a corpus is tokenized once, so it decides), and that decision in words
    when the config asked for another one ('' when they agree). Objectives are checked against the corpus's kind."""
    asked, used = cfg.tokenizer, tokenizer.config
    differ = [f"{name} {getattr(used, name)} (the config asks {getattr(asked, name)})"
              for name in TOKENIZER_FIELDS if getattr(asked, name) != getattr(used, name)]
    try:
        adopted = dataclasses.replace(cfg, tokenizer=used)  # validates the objectives for the corpus's kind
    except ValueError as err:
        raise InputError(f"{cfg.data[0]} holds {used.kind} tokens: {err}") from err
    if not differ:
        return adopted, ""
    decision = (f"{cfg.data[0]} was tokenized with {', '.join(differ)}: pretraining with the corpus's tokenizer "
                "(rebuild the corpus with `atlasformer tokenize` to change it)")
    if adopted.objectives != cfg.objectives:
        decision += f"; objectives {adopted.objectives} for its {used.kind} tokens"
    return adopted, decision


def condition_keys(cfg: PretrainConfig) -> list[str]:
    """obs columns that become condition tokens: batch_key first, then condition_keys."""
    return ([cfg.batch_key] if cfg.batch_key else []) + [k for k in cfg.condition_keys if k != cfg.batch_key]


def condition_labels(obs, keys: list[str], source: str, n_cells: int) -> np.ndarray:
    """(cells, keys) string labels of the condition columns; ``source``, unless obs has such a column, is the input
    file's name without its extension (as a corpus names its inputs)."""
    missing = [k for k in keys if k not in obs and k != "source"]
    if missing:
        raise InputError(f"{source}: obs column(s) {missing} not in obs (batch_key / condition_keys / adversary_key); "
                         f"available: {list(obs.columns)}, or source for the input file.")
    columns = [obs[k].astype(str).to_numpy() if k in obs else np.full(n_cells, input_stem(source)) for k in keys]
    return np.stack(columns, axis=1) if keys else np.zeros((n_cells, 0), dtype=str)


def condition_ids(labels: np.ndarray, keys: list[str]) -> tuple[np.ndarray, list[str]]:
    """Ids into one condition table for (cells, keys) labels, and the table's names.

    One key (batch_key alone) gives (cells,) ids and plain names; several give (cells, keys) ids and
    names ``key=value``, whose embeddings the model sums.
    """
    if not keys:
        return np.zeros(len(labels), dtype=np.int64), []
    names, columns = [], []
    for j, key in enumerate(keys):
        values = sorted(set(labels[:, j].tolist()))  # plain str names, for messages and config.json
        columns.append(len(names) + np.searchsorted(np.asarray(values), labels[:, j]))
        names += values if len(keys) == 1 else [f"{key}={v}" for v in values]
    ids = np.stack(columns, axis=1).astype(np.int64)
    return (ids[:, 0] if len(keys) == 1 else ids), names


def make_model(cfg: PretrainConfig, tokenizer: CellTokenizer, n_conditions: int,
               domain_names: list[str] | None = None) -> CellTransformerForPretraining:
    """A new model for ``tokenizer`` (or ``init_from``'s), with ``n_conditions`` condition tokens and, with the
    ``batch_adversary`` objective, a discriminator over ``domain_names``."""
    if cfg.init_from:
        model, _ = load_model_folder(cfg.init_from)
        if not isinstance(model, CellTransformerForPretraining):
            raise InputError(f"{cfg.init_from}: init_from must be a pretrained (not fine-tuned) model folder.")
        if domain_names and (model.config.domain_names or []) != list(domain_names):
            raise InputError(f"{cfg.init_from} has domains {model.config.domain_names or 'none'} for the batch adversary, "
                             f"the data {domain_names}: continue on the same domains or start from random weights.")
        return model
    if "batch_adversary" in cfg.objectives and len(domain_names or []) < 2:
        raise InputError(f"the batch adversary needs at least 2 domains; adversary_key={cfg.adversary_key!r} gives "
                         f"{list(domain_names or [])}: choose a column that varies across cells (or several input files "
                         "with source).")
    known = set(CellTransformerConfig().to_dict())
    unknown = set(cfg.model) - known
    if unknown:
        raise InputError(f"unknown model settings {sorted(unknown)}; see configs/model/*.yaml for the fields.")
    kind = tokenizer.config.kind
    heads = {
        # no value head without its objective: an unused head makes multi-process DDP fail
        "value_head": VALUE_HEAD[kind] if "masked_value" in cfg.objectives else "none",
        "gene_head": kind == "rank" or "masked_gene" in cfg.objectives,
        "mvc_head": "mvc" in cfg.objectives,
        "domain_names": domain_names if "batch_adversary" in cfg.objectives else None,
    }
    try:
        config = config_for_tokenizer(tokenizer, n_conditions=n_conditions, **{**heads, **cfg.model})
    except ValueError as err:
        raise InputError(str(err)) from err
    return CellTransformerForPretraining(config)


def make_batch(cells: TokenizedCells, rows: np.ndarray, tags: CellTags, tokenizer: CellTokenizer, cfg: PretrainConfig,
               model_config, generator: torch.Generator) -> dict[str, torch.Tensor]:
    batch = collate(cells, rows, cls_id=tokenizer.vocab.cls_id, pad_id=tokenizer.vocab.pad_id,
                    max_width=1 + tokenizer.config.max_seq_len)  # known here: no pass over every cell per batch
    if model_config.n_conditions:
        batch["conditions"] = torch.from_numpy(tags.conditions[rows])
    if model_config.domain_names:
        batch["domains"] = torch.from_numpy(tags.domains[rows])
    return mask_for_model(batch, tokenizer, cfg, model_config, generator)


def mask_for_model(batch, tokenizer: CellTokenizer, cfg: PretrainConfig, model_config, generator) -> dict[str, torch.Tensor]:
    return mask_batch(batch, mask_ratio=cfg.mask_ratio, mask_value=model_config.mask_value,
                      mask_token_id=tokenizer.vocab.mask_id, mask_genes=tokenizer.config.kind == "rank", generator=generator)


def next_train_batch(order, cells, train_rows, tags, tokenizer, cfg, model_config, generator) -> dict[str, torch.Tensor]:
    """The next training micro-batch: streamed from a corpus, or gathered from the in-memory cells."""
    if isinstance(order, CorpusLoader):
        batch = order.next_batch()
        if not model_config.n_conditions:
            batch.pop("conditions", None)
        if not model_config.domain_names:
            batch.pop("domains", None)
        return mask_for_model(batch, tokenizer, cfg, model_config, generator)
    return make_batch(cells, train_rows[order.next()], tags, tokenizer, cfg, model_config, generator)


@torch.no_grad()
def evaluate(model, engine: BaseEngine, cells, rows, tags, tokenizer, cfg, model_config) -> dict[str, float]:
    """Held-out masked losses (sum over targets / number of targets), each rank taking every N-th batch; with the
    batch adversary, the share of held-out cells whose domain it names (``eval/domain_accuracy``, kept out of
    ``eval/loss``: it measures what the encoder failed to hide)."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}  # on the device, read once at the end
    count = torch.zeros((), dtype=torch.float64)
    named = torch.zeros(2, dtype=torch.float64)  # domains named right, cells asked
    batches = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)][: cfg.eval_batches]
    for first in range(0, len(batches), engine.world_size):
        i = first + engine.rank
        # under fsdp / ZeRO-3 every forward gathers weights from all ranks: all ranks run every round,
        # and a rank without a batch in the last round repeats one and discards it
        j = min(i, len(batches) - 1)
        batch = make_batch(cells, batches[j], tags, tokenizer, cfg, model_config, step_generator(cfg.seed, 2**31, j, 0))
        with engine.autocast():
            out = model(**model_inputs(batch, engine.device), loss_normalizer=1.0, objective_weights=cfg.objectives)
        if i >= len(batches):
            continue
        for name, term in out.loss_terms.items():
            if name != "batch_adversary":
                sums[name] = sums.get(name, 0.0) + term.detach().double()
        count += batch["target_mask"].sum()
        if "domain_logits" in out.extras:
            known = batch["domains"] >= 0
            hits = (out.extras["domain_logits"].argmax(1).cpu() == batch["domains"])[known].sum()
            named += torch.stack([hits, known.sum()]).double()
    model.train()
    names = sorted(sums) or [n for n in ("masked_value", "masked_gene", "mvc") if n in cfg.objectives]
    zero = torch.zeros((), dtype=torch.float64, device=engine.device)
    stacked = torch.stack([sums.get(n, zero).to(engine.device) for n in names] + [count.to(engine.device)])
    stacked = engine.sum_across_ranks(torch.cat([stacked, named.to(engine.device)])).cpu()
    total = float(stacked[-3]) or 1.0
    out = {f"eval/{n}": float(stacked[i]) / total for i, n in enumerate(names)}
    out["eval/loss"] = sum(out.values())
    if model_config.domain_names:
        out["eval/domain_accuracy"] = float(stacked[-2]) / max(float(stacked[-1]), 1.0)
    return out


class Logger:
    """Metric lines to metrics.jsonl, the console (the ``atlasformer`` logger) and (optionally) wandb, on the main
    process only."""

    def __init__(self, run_dir: Path, enabled: bool, cfg: PretrainConfig):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if enabled and cfg.report_to == "wandb":
            import wandb  # optional extra; WANDB_MODE=offline works without a network

            self.wandb = wandb.init(project=cfg.wandb_project, config=asdict(cfg), dir=str(run_dir))

    def __call__(self, message: str, level: int = logging.INFO) -> None:
        if self.enabled:
            logger.log(level, message)

    def once(self, message: str) -> None:
        """A report the fine-tuning of the same file would repeat: shown once per process."""
        if self.enabled:
            log_once(logger, message)

    def metrics(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


# ------------------------------------------------------------------------------------ the loop
def train(cfg: PretrainConfig, *, resume: bool = False, run_config: dict | None = None, overwrite: bool = False) -> Path:
    """Pretrain a CellTransformer on ``cfg.data``; returns the exported model folder ``<output>/model``.

    Parameters
    ----------
    cfg
        The run's settings.
    resume
        Continue from the latest complete checkpoint in ``<output>/checkpoints``.
    run_config
        The resolved config as written to YAML, stored in checkpoints and the model folder.
    overwrite
        Write into an existing ``cfg.output`` that holds files atlasformer did not write (never over an input).
    """
    configure_threads(cfg.threads)
    engine = make_engine(cfg)
    run_dir = Path(cfg.output)
    run_config = run_config or json.loads(json.dumps(asdict(cfg), default=str))
    if not resume and latest_checkpoint(run_dir) is not None:
        raise InputError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose a new --output.")
    refuse_output_over_inputs([run_dir], [*cfg.data, *([cfg.init_from] if cfg.init_from else [])])
    refuse_foreign_folder(run_dir, overwrite=overwrite or resume)
    refuse_foreign_model_folder(run_dir / "model", overwrite=overwrite)  # checked now, not after hours of training
    if engine.is_main:
        prepare_output_folder(run_dir, overwrite=True, command="pretrain")
        write_json_atomic(run_dir / "config.json", run_config)
    log = Logger(run_dir, engine.is_main, cfg)

    # data and tokenizer: a corpus folder is streamed from disk; h5ad files are tokenized in memory
    if len(cfg.data) == 1 and is_corpus(cfg.data[0]):
        tokenizer, order, cells, tags = load_corpus(cfg, engine.rank, engine.world_size, log)
        train_rows, eval_rows, n_train = None, np.arange(len(cells)), order.n_train_cells
        cfg, decision = adopt_corpus_tokenizer(cfg, tokenizer)
        if decision:  # printed, and recorded in config.json and the exported model's manifest
            log(decision, logging.WARNING)
            run_config.update(tokenizer=json.loads(json.dumps(asdict(cfg.tokenizer), default=str)),
                              objectives=dict(cfg.objectives), tokenizer_decision=decision)
            if engine.is_main:
                write_json_atomic(run_dir / "config.json", run_config)
    else:
        inputs = _open(cfg)
        tokenizer = make_tokenizer(cfg, inputs)
        cells, tags = load_cells(cfg, tokenizer, inputs, log)
        train_rows, eval_rows = split_rows(len(cells), cfg.eval_fraction, cfg.seed)
        n_train = len(train_rows)
        order = BatchOrder(n_train, cfg.batch_size, seed=cfg.seed, rank=engine.rank, world_size=engine.world_size)

    # model, optimizer, schedule
    model = make_model(cfg, tokenizer, len(tags.condition_names), tags.domain_names)
    seed_rank(cfg.seed, engine.rank)  # the same initial weights on every rank, but not the same dropout
    model.config.condition_names = tags.condition_names
    model_config = model.config
    log(f"model: {count_parameters(model):,} parameters ({model_config.n_layers} layers, d_model {model_config.d_model}); "
        f"{n_train:,} training and {len(eval_rows):,} held-out cells; {engine.world_size} process(es) on {engine.device}")
    # a factory: fsdp must build the optimizer over the sharded parameters
    model, optimizer = engine.prepare(model, lambda params: torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=engine.fused_optimizer))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
    peak, peak_source = peak_tflops(engine.device, cfg.precision, cfg.peak_tflops)
    # one CPU process: nothing to say about the strategy, and its MFU peak is a measured guess
    log(f"strategy {cfg.strategy}, precision {cfg.precision}; MFU peak per device: "
        f"{f'{peak:.2f} TFLOP/s' if peak else 'none'} ({peak_source})",
        logging.INFO if engine.world_size > 1 or engine.device.type == "cuda" else logging.DEBUG)

    step = 0
    # the newest checkpoint whose files match their checksums; damaged ones are named and skipped
    checkpoint = latest_checkpoint(run_dir, verify=True, log=lambda line: log(line, logging.WARNING)) if resume else None
    if checkpoint is not None:
        step = load_checkpoint(engine, model, optimizer, scheduler, order, checkpoint)
        log(f"resumed from {checkpoint} at step {step}")

    if step == 0 and len(eval_rows):  # the untrained model's held-out loss, the baseline to improve on
        metrics = evaluate(model, engine, cells, eval_rows, tags, tokenizer, cfg, model_config)
        log.metrics(0, metrics)
        log(f"step 0: eval loss {metrics['eval/loss']:.4f}")
    model.train()
    with progress_bar(cfg.max_steps, desc="pretrain", unit="step", initial=step, main_process=engine.is_main) as bar:
        tick, cells_seen, tokens_seen, flops_seen = time.perf_counter(), 0, 0.0, 0.0
        while step < cfg.max_steps:
            micro_batches = [
                next_train_batch(order, cells, train_rows, tags, tokenizer, cfg, model_config,
                                 step_generator(cfg.seed, step, micro * engine.world_size + engine.rank, 0))
                for micro in range(cfg.grad_accum)
            ]
            inputs = [model_inputs(b, engine.device) for b in micro_batches]  # all copies queued up front
            # normalise by the global target count so N processes compute what one process would; the
            # count, the losses and the norm stay on the device (reading one waits for the GPU) until a log line
            local_targets = torch.stack([x["target_mask"].sum() for x in inputs]).sum().float()
            normalizer = engine.sum_across_ranks(local_targets).clamp(min=1.0) / (engine.world_size * cfg.grad_accum)
            step_terms: dict[str, torch.Tensor] = {}
            for batch in inputs:
                with engine.accumulate(model):
                    with engine.autocast():
                        out = model(**batch, loss_normalizer=normalizer, objective_weights=cfg.objectives)
                    engine.backward(out.loss)
                for name, term in out.loss_terms.items():
                    step_terms[name] = step_terms.get(name, 0.0) + term.detach()
            grad_norm = engine.step(model, optimizer, cfg.clip_grad)  # clip, step, zero the gradients
            scheduler.step()
            step += 1
            cells_seen += cfg.batch_size * cfg.grad_accum * engine.world_size
            lengths = [b["attention_mask"].sum(1) for b in micro_batches]  # non-pad tokens per cell, on the host
            tokens_seen += float(sum(n.numpy().sum() for n in lengths))
            flops_seen += sum(training_flops(model_config, n, b["target_mask"].sum(1))  # heads run at targets only
                              for n, b in zip(lengths, micro_batches))

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                counts = torch.tensor([tokens_seen, flops_seen], dtype=torch.float64, device=engine.device)
                totals = torch.cat([*(step_terms[k].double().reshape(1) for k in sorted(step_terms)), counts])
                *terms, tokens_all, flops_all = engine.sum_across_ranks(totals).tolist()
                terms = [t / (engine.world_size * cfg.grad_accum) for t in terms]
                elapsed = time.perf_counter() - tick
                metrics = {f"train/{k}": v for k, v in zip(sorted(step_terms), terms)}
                metrics["train/loss"] = sum(terms)
                metrics["lr"] = scheduler.get_last_lr()[0]
                metrics["cells_per_s"] = cells_seen / elapsed
                metrics["tokens_per_s"] = tokens_all / elapsed
                if isinstance(order, CorpusLoader):  # this rank's batches since the start (or the resumed position)
                    metrics["padded_fraction"] = order.padded_fraction
                if peak:
                    metrics["mfu"] = flops_all / elapsed / (peak * 1e12 * engine.world_size)
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                log.metrics(step, metrics)
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", cells_s=f"{metrics['cells_per_s']:.0f}",
                                **({"mfu": f"{metrics['mfu']:.1%}"} if peak else {}), refresh=False)
                # the bar shows these; the line is for -v (every value is in metrics.jsonl)
                log(f"step {step}: loss {metrics['train/loss']:.4f}, {metrics['cells_per_s']:.0f} cells/s", logging.DEBUG)
                tick, cells_seen, tokens_seen, flops_seen = time.perf_counter(), 0, 0.0, 0.0
            if len(eval_rows) and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                metrics = evaluate(model, engine, cells, eval_rows, tags, tokenizer, cfg, model_config)
                log.metrics(step, metrics)
                log(f"step {step}: eval loss {metrics['eval/loss']:.4f}")
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save_checkpoint(engine, model, optimizer, scheduler, order, run_dir, step, run_config, cfg.keep_last)
            bar.update(1)
    if isinstance(order, CorpusLoader):
        order.close()  # stop its DataLoader workers

    model_dir = run_dir / "model"
    plain = engine.export_model(model)  # consolidated from the shards under fsdp / ZeRO
    if engine.is_main:
        export_model_folder(plain, tokenizer, model_dir, run_config, overwrite=overwrite)
        log(f"model folder written to {model_dir}", logging.DEBUG)  # train returns it; the CLI prints it
    engine.barrier()
    log.close()
    engine.close()
    return model_dir


def _open(cfg: PretrainConfig):
    if not cfg.data:
        raise InputError("no input data: pass --data FILE... (h5ad files or folders of them).")
    return open_inputs(list(cfg.data))

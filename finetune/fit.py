"""The one fit loop every fine-tuning task uses: tasks differ by head, targets and metrics, not loops.

A task hands over its model and two callables: ``make_batch(rows) -> model kwargs`` (targets
included) over the training cells, and ``validate(model) -> (score, metrics)`` where a higher score is
better (a loss is returned negated; ``metric`` and ``lower_is_better`` name it for the console). The loop
trains under the pretraining engine (so accelerate launches give multi-GPU fine-tuning), validates at
intervals, stops early after ``patience`` evaluations without improvement and restores the best weights.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable

import numpy as np
import torch

from atlasformer.pretrain.engine import Engine
from atlasformer.tokenization import BatchOrder
from atlasformer.tokenization.console import progress_bar

from .config import FinetuneConfig

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
LOSS_READ_EVERY = 10
"""Steps between reads of the training loss for the progress bar (their mean): each read waits for the GPU."""
HEAD_PREFIXES = ("classifier", "head", "decoder", "discriminator", "batch_discriminator")
logger = logging.getLogger(__name__)


def apply_mode(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """Full, frozen-backbone or LoRA training: sets ``requires_grad`` (and wraps with peft for LoRA)."""
    if cfg.mode == "full":
        return model
    for name, param in model.named_parameters():
        param.requires_grad = not name.startswith("backbone.")
    if cfg.mode == "frozen":
        return model
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=["in_proj", "out_proj"], bias="none")
    model.backbone = inject_adapter_in_model(lora, model.backbone)
    return model


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold LoRA adapters into the base weights, so the saved folder is a plain model.

    In place: each adapted layer is replaced by its merged base layer, so the model keeps its device and dtype
    (no fresh copy is built on the CPU). Returns ``model``.
    """
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    for module in model.modules():
        vars(module).pop("peft_config", None)  # left by inject_adapter_in_model
    return model


def trainable_parameter_groups(model: torch.nn.Module, cfg: FinetuneConfig) -> list[dict]:
    backbone, head = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if name.startswith("backbone.") else head).append(param)
    groups = [{"params": head, "lr": cfg.head_lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr})
    return groups


def score_text(score: float, metric: str, lower_is_better: bool) -> str:
    """A validation score as the metric it comes from: ``poisson_nll 1.2759 (lower is better)``."""
    value, better = (-score, "lower") if lower_is_better else (score, "higher")
    return f"{metric} {value:.4f} ({better} is better)"


def fit(
    model: torch.nn.Module,
    n_train: int,
    make_batch: Callable[[np.ndarray], dict[str, torch.Tensor]],
    validate: Callable[[torch.nn.Module], tuple[float, dict]],
    cfg: FinetuneConfig,
    *,
    description: str = "finetune",
    metric: str = "score",
    lower_is_better: bool = False,
    start_is_candidate: bool = False,
    log: Callable[[str], None] = logger.info,
) -> tuple[torch.nn.Module, dict]:
    """Train ``model`` on ``n_train`` cells; returns the best model (by validation score) and its metrics.

    Parameters
    ----------
    model, n_train, make_batch, validate, cfg
        The task's model, its number of training cells, ``rows -> model kwargs`` and
        ``model -> (score, metrics)`` (higher score is better), and the fine-tuning settings.
    description
        The progress bar's label.
    metric, lower_is_better
        The name of the metric ``validate``'s score comes from, and whether the score is that metric negated
        (a loss); the console names it: ``validation poisson_nll 1.2759 (lower is better)``.
    start_is_candidate
        Validate the model before the first step too, so that training that never beats its starting weights
        returns them (a head that starts from a closed-form fit: fine-tuning may only improve on it).
    log
        Receives the validation and early-stopping lines (default: the ``atlasformer`` logger).

    Returns
    -------
    tuple
        The best model (weights restored, eval mode) and the metrics ``validate`` returned for it.
    """
    cfg = cfg.with_recipe({})  # fields a task's recipe left unset take the general defaults
    # heads leave some backbone weights unused (condition tokens): DDP must not wait for their gradients
    engine = Engine(precision=cfg.precision, cpu=cfg.cpu, seed=cfg.seed, find_unused_parameters=True)
    model = apply_mode(model, cfg)
    order = BatchOrder(n_train, min(cfg.batch_size, n_train), seed=cfg.seed, rank=engine.rank,
                       world_size=engine.world_size, drop_last=n_train >= cfg.batch_size * engine.world_size)
    steps_per_epoch = max(1, order.batches_per_epoch())
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = max(1, int(cfg.warmup_ratio * total))
    optimizer = OPTIMIZERS[cfg.optimizer](trainable_parameter_groups(model, cfg), weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 1.0 if cfg.schedule == "constant" else (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    model, optimizer = engine.prepare(model, optimizer)
    eval_every = cfg.eval_every or steps_per_epoch

    best_score, best_state, best_metrics, stale = -math.inf, None, {}, 0
    loss_sum = torch.zeros((), device=engine.device)  # summed on the device, read every LOSS_READ_EVERY steps
    if not engine.is_main:  # every rank validates; one says so
        log = lambda message: None  # noqa: E731

    def validated(step: int) -> tuple[float, dict]:
        model.eval()
        with torch.no_grad():
            score, metrics = validate(engine.unwrap(model))
        model.train()
        score = engine.broadcast_from_main(score)  # rank 0 decides: all ranks stop at the same step
        log(f"step {step}: validation {score_text(score, metric, lower_is_better)}")
        return score, metrics

    if start_is_candidate:
        best_score, best_metrics = validated(0)
        best_state = copy.deepcopy(engine.unwrap(model).state_dict())
    model.train()
    with progress_bar(total, desc=description, unit="step", main_process=engine.is_main) as bar:
        for step in range(1, total + 1):
            batch = {k: v.to(engine.device) for k, v in make_batch(order.next()).items()}
            with engine.autocast():
                out = model(**batch)
            engine.backward(out.loss)
            engine.clip_grad_norm(model, cfg.clip_grad)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += out.loss.detach().float()
            if step % LOSS_READ_EVERY == 0:
                if not bar.disable:  # redrawn by update, at its own pace
                    bar.set_postfix(loss=f"{loss_sum.item() / LOSS_READ_EVERY:.4f}", refresh=False)
                loss_sum.zero_()
            bar.update(1)
            if step % eval_every == 0 or step == total:
                score, metrics = validated(step)
                if score > best_score:
                    best_score, best_metrics, stale = score, metrics, 0
                    best_state = copy.deepcopy(engine.unwrap(model).state_dict())
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        best_text = score_text(best_score, metric, lower_is_better)
                        log(f"early stopping at step {step} (best validation {best_text})")
                        break
    best = engine.unwrap(model)
    if best_state is not None:
        best.load_state_dict(best_state)
    if cfg.mode == "lora":
        best = merge_lora(best)
    best.eval()
    engine.barrier()
    return best, best_metrics

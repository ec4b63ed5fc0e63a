"""The task contract (issue 15, item 3): every fine-tuning task and VAE wrapper implements the ``Task`` protocol,
signatures included; the CLI finds tasks in one mapping; the VAEs split cells as every task does; and
``predict --batch-key`` is used (integration: Harmony over the query's batches) or refused, never ignored."""

from __future__ import annotations

import dataclasses
import inspect

import anndata as ad
import numpy as np
import pytest

from atlasformer import cli
from atlasformer.config import ConfigError
from atlasformer.finetune import TASKS, Integrator, SCANVIModel, SCVIModel, Task, TOTALVIModel
from atlasformer.finetune.benchmark import TASKS as BENCHMARK_TASKS
from atlasformer.finetune.vae_models import vae_training_config

MODELS = [*TASKS.values(), SCVIModel, TOTALVIModel, SCANVIModel]
CONTRACT = sorted(name for name in vars(Task) if not name.startswith("_"))


def signature_problems(impl, contract) -> list[str]:
    """How ``impl`` (a method's signature) fails to accept every call ``contract`` allows."""
    P = inspect.Parameter
    params, problems = impl.parameters, []
    takes_kwargs = any(p.kind is P.VAR_KEYWORD for p in params.values())
    for name, want in contract.parameters.items():
        have = params.get(name)
        if have is None:
            if not (want.kind is P.KEYWORD_ONLY and takes_kwargs):
                problems.append(f"no parameter {name!r}")
            continue
        allowed = (P.POSITIONAL_OR_KEYWORD,) if want.kind is P.POSITIONAL_OR_KEYWORD else (P.POSITIONAL_OR_KEYWORD,
                                                                                           P.KEYWORD_ONLY)
        if have.kind not in allowed:
            problems.append(f"{name!r} is {have.kind.description}, the contract has it {want.kind.description}")
        if want.default is not P.empty and have.default is P.empty:
            problems.append(f"{name!r} needs a default")
    for name, have in params.items():
        if name not in contract.parameters and have.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) \
                and have.default is P.empty:
            problems.append(f"extra parameter {name!r} without a default")
    positional = [n for n, p in contract.parameters.items() if p.kind is P.POSITIONAL_OR_KEYWORD]
    if [n for n, p in params.items() if p.kind is P.POSITIONAL_OR_KEYWORD][:len(positional)] != positional:
        problems.append(f"positional parameters do not start with {positional}")
    return problems


def test_the_contract_names_what_every_model_does():
    assert CONTRACT == ["embed", "fit", "load", "plots", "predict", "save", "write_outputs"]


@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
def test_every_user_facing_model_implements_the_task_protocol(cls):
    assert isinstance(cls(), Task)
    problems = {}
    for name in CONTRACT:
        contract_is_classmethod = isinstance(inspect.getattr_static(Task, name), classmethod)
        if isinstance(inspect.getattr_static(cls, name), classmethod) != contract_is_classmethod:
            problems[name] = ["classmethod in one, not the other"]
            continue
        found = signature_problems(inspect.signature(getattr(cls, name)), inspect.signature(getattr(Task, name)))
        if found:
            problems[name] = found
    assert not problems, problems


def test_the_cli_uses_the_one_task_mapping():
    assert cli.TASK_NAMES == tuple(TASKS) == BENCHMARK_TASKS[:-1] and BENCHMARK_TASKS[-1] == "mapping"
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    for command, dest in (("finetune", "task"), ("predict", "task"), ("benchmark", "task")):
        action = next(a for a in commands[command]._actions if a.dest == dest)
        # the benchmark also scores mapping (a query onto a reference), which is not a fine-tuning task
        expected = BENCHMARK_TASKS if command == "benchmark" else cli.TASK_NAMES
        assert tuple(action.choices) == expected, command


def parse(argv: list[str]):
    args = cli.build_parser().parse_args(argv)
    args.overrides = []
    return args


def test_finetune_builds_each_task_from_its_flags(tmp_path):
    base = ["--data", "x.h5ad", "--output", str(tmp_path / "o"), "--from-scratch", "--layer", "counts"]
    flags = {"annotation": ["--labels-key", "cell_type"], "integration": ["--batch-key", "donor"], "imputation": [],
             "modality": ["--modality", "atac", "--paired", "peaks.h5ad"]}
    for name, extra in flags.items():
        args = parse(["finetune", name, *base, *extra])
        task = cli.make_task(name, args, cli.finetune_config(args, name))
        assert type(task) is TASKS[name] and task.layer == "counts", name
    assert (task.modality, task.paired) == ("atac", "peaks.h5ad")
    for name, missing in (("annotation", "--labels-key"), ("integration", "--batch-key")):
        args = parse(["finetune", name, *base])
        with pytest.raises(ConfigError, match=f"{missing} is required"):
            cli.make_task(name, args, cli.finetune_config(args, name))


def test_quickstart_heads_follow_the_data(tmp_path):
    cfg = cli.finetune_config(parse(["predict", "imputation", "--data", "x", "--output", "o"]), "imputation")
    heads = cli.quickstart_heads("model", cfg, labels_key="cell_type", batch_key=None, paired=None, layer=None)
    assert list(heads) == ["annotation", "imputation"]
    heads = cli.quickstart_heads("model", cfg, labels_key="cell_type", batch_key="batch", paired="p.h5ad", layer="raw")
    assert list(heads) == list(TASKS) and all(type(heads[name]) is TASKS[name] for name in heads)
    assert heads["integration"].batch_key == "batch" and heads["modality"].paired == "p.h5ad"
    assert heads["annotation"].labels_key == "cell_type" and heads["imputation"].layer == "raw"


def test_vae_wrappers_split_cells_as_every_task(sim_adata):
    """The shared ``split_cells``: a held-out batch (``val_batch``) is the validation set, which the VAEs' own
    copy of the split ignored."""
    held_out = sorted(sim_adata.obs["batch"].astype(str).unique())[0]
    config = dataclasses.replace(vae_training_config(sim_adata.n_obs, epochs=1), val_batch=held_out)
    metrics = SCVIModel(batch_key="batch", config=config, gene_likelihood="nb").fit(sim_adata)
    n_held_out = int((sim_adata.obs["batch"].astype(str) == held_out).sum())
    assert (metrics["n_val"], metrics["n_train"]) == (n_held_out, sim_adata.n_obs - n_held_out)
    assert SCVIModel(epochs=1).fit(sim_adata[:8].copy())["n_val"] == 0  # 10 cells or fewer: none held out


# ------------------------------------------------------------------------------------ predict --batch-key
QUICK = ["max_steps=2", "val_fraction=0.2", "max_seq_len=32", "scratch_model.d_model=16",
         "scratch_model.n_heads=2"]


@pytest.fixture(scope="module")
def integration_run(tmp_path_factory, sim_adata):
    """A tiny integration model (Harmony recipe) fine-tuned on ``batch``, and a query whose batches are in
    ``donor`` (no ``batch`` column)."""
    root = tmp_path_factory.mktemp("integration")
    data = root / "cells.h5ad"
    sim_adata.write_h5ad(data)
    assert cli.main(["finetune", "integration", "--data", str(data), "--from-scratch", "--batch-key", "batch",
                     "--output", str(root / "integ"), *QUICK]) == 0
    query = sim_adata.copy()
    query.obs["donor"] = query.obs.pop("batch")
    query.write_h5ad(root / "query.h5ad")
    return root


def predicted(root, name: str, *flags) -> np.ndarray:
    assert cli.main(["predict", "integration", "--model", str(root / "integ" / "model"), "--data",
                     str(root / "query.h5ad"), "--output", str(root / name), *flags]) == 0
    return ad.read_h5ad(root / name / "query.h5ad").obsm["X_atlasformer_integrated"]


def test_predict_integration_corrects_over_the_query_batches_named_by_batch_key(integration_run, caplog):
    root = integration_run
    query = ad.read_h5ad(root / "query.h5ad")
    with_key = predicted(root, "with_key", "--batch-key", "donor")
    expected = Integrator.load(root / "integ" / "model", batch_key="donor").embed(query)
    np.testing.assert_allclose(with_key, expected, rtol=1e-5, atol=1e-5)
    without = predicted(root, "without")  # no batch column to correct over: uncorrected, and said so
    assert "not corrected by Harmony" in caplog.text
    assert not np.allclose(with_key, without, atol=1e-3)  # the flag changed the embedding: it was not ignored


def test_predict_refuses_a_batch_key_it_would_not_use(integration_run, capsys):
    root = integration_run
    model = str(root / "integ" / "model")
    assert cli.main(["predict", "annotation", "--model", model, "--data", str(root / "query.h5ad"),
                     "--output", str(root / "refused"), "--batch-key", "donor"]) == 2
    assert "predict annotation does not use --batch-key" in capsys.readouterr().err
    assert cli.main(["predict", "integration", "--model", model, "--data", str(root / "query.h5ad"),
                     "--output", str(root / "missing"), "--batch-key", "nope"]) == 2
    assert "batch_key='nope' is not a column of obs" in capsys.readouterr().err

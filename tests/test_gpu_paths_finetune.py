"""Where fine-tuned models run, on a machine with a GPU: inference (predict, embed, a task after a LoRA fit) on the
GPU, ``cpu=True`` / ``--cpu`` keeping it on the CPU; LoRA merged on the model's own device and dtype; and the fit
loop reading its loss (a host sync) at log intervals, not every step.

CPU only: ``torch.cuda.is_available`` is mocked and the "GPU" is the meta device, so these tests check where the
weights and every input of each forward pass are, not numbers (a forward on meta computes shapes only)."""

import copy
import logging

import anndata as ad
import pytest
import torch

from atlasformer.api import cell_embeddings
from atlasformer.cli import main
from atlasformer.finetune import Annotator, FinetuneConfig, common, finetune_file, fit
from atlasformer.finetune.fit import apply_mode, merge_lora
from atlasformer.model_zoo import CellTransformerConfig, CellTransformerForAnnotation
from atlasformer.tokenization import simulate_counts

TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2, "dropout": 0.0}


def tiny_cfg(**kw) -> FinetuneConfig:
    base = dict(from_scratch=True, scratch_model=TINY, max_seq_len=32, batch_size=16,
                seed=0, expression_genes=0, readout="mlp")
    return FinetuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    simulate_counts(n_cells=96, n_genes=60, n_cell_types=3, n_batches=2, seed=0).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def lora_fitted(data, tmp_path_factory):
    """An annotation task after a two-step LoRA fit (on the CPU), and the model folder it saved."""
    out = tmp_path_factory.mktemp("lora")
    task = Annotator(None, tiny_cfg(mode="lora", max_steps=2), labels_key="cell_type")
    finetune_file(task, data, out)
    return task, out / "model"


def _zeros_on_cpu(value):
    if isinstance(value, torch.Tensor):
        return torch.zeros(value.shape, dtype=value.dtype)
    if isinstance(value, dict):
        return {k: _zeros_on_cpu(v) for k, v in value.items()}
    return value


@pytest.fixture
def mocked_gpu(monkeypatch):
    """A machine whose "GPU" is the meta device. Returns the device types each annotation forward pass saw: its
    weights' and buffers', and those of every tensor passed to it."""
    seen: list[set[str]] = []
    original = CellTransformerForAnnotation.forward

    def forward(self, **inputs):
        tensors = [*self.parameters(), *self.buffers(), *(v for v in inputs.values() if isinstance(v, torch.Tensor))]
        seen.append({t.device.type for t in tensors})
        out = original(self, **inputs)
        return type(out)(**{k: _zeros_on_cpu(v) for k, v in out.items()})  # meta holds no values to read back

    monkeypatch.setattr(CellTransformerForAnnotation, "forward", forward)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common, "inference_device", lambda cpu=False: torch.device("cpu" if cpu else "meta"),
                        raising=False)
    monkeypatch.setattr(common, "weights_fingerprint", lambda module: b"meta")  # provenance cannot read meta weights
    return seen


def test_inference_device_is_the_gpu_unless_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")  # each process of a launch uses its own GPU
    assert common.inference_device() == torch.device("cuda", 1)
    assert common.inference_device(cpu=True) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.inference_device() == torch.device("cpu")


def test_task_after_lora_fit_predicts_and_embeds_on_the_gpu(lora_fitted, data, mocked_gpu):
    adata = ad.read_h5ad(data)
    task = copy.deepcopy(lora_fitted[0])  # copies: the fixture's model stays on the CPU (meta cannot come back)
    task.predict(adata)
    task.embed(adata)
    assert mocked_gpu and all(devices == {"meta"} for devices in mocked_gpu), mocked_gpu
    mocked_gpu.clear()
    task = copy.deepcopy(lora_fitted[0])
    task.config = FinetuneConfig(cpu=True)
    task.predict(adata)
    assert mocked_gpu and all(devices == {"cpu"} for devices in mocked_gpu), mocked_gpu


@pytest.mark.parametrize("cpu", [False, True])
def test_cli_predict_and_embed_use_the_gpu_unless_cpu(lora_fitted, data, tmp_path, mocked_gpu, cpu):
    folder = lora_fitted[1]
    flag = ["--cpu"] if cpu else []
    assert main(["-q", "predict", "annotation", "--data", str(data), "--model", str(folder),
                 "--output", str(tmp_path / "pred"), *flag]) == 0
    assert main(["-q", "embed", "--data", str(data), "--model", str(folder), "--output", str(tmp_path / "emb"),
                 *flag]) == 0
    expected = {"cpu"} if cpu else {"meta"}
    assert len(mocked_gpu) >= 2 and all(devices == expected for devices in mocked_gpu), mocked_gpu
    assert "atlasformer_label" in ad.read_h5ad(tmp_path / "pred" / "cells.h5ad").obs


def test_api_embeddings_use_the_gpu_unless_cpu(lora_fitted, data, mocked_gpu):
    adata = ad.read_h5ad(data)
    cell_embeddings(adata, lora_fitted[1])
    assert mocked_gpu and all(devices == {"meta"} for devices in mocked_gpu), mocked_gpu
    mocked_gpu.clear()
    cell_embeddings(adata, lora_fitted[1], cpu=True)
    assert mocked_gpu and all(devices == {"cpu"} for devices in mocked_gpu), mocked_gpu


def test_task_models_are_built_on_the_gpu(mocked_gpu):
    """A task's model is built where its frozen embeddings and closed-form readouts are computed."""
    config = CellTransformerConfig(vocab_size=40, **TINY)
    model = common.build_task_model(CellTransformerForAnnotation, None, config, seed=0, cpu=False,
                                    id2label={0: "a", 1: "b"})
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    model = common.build_task_model(CellTransformerForAnnotation, None, config, seed=0, cpu=True,
                                    id2label={0: "a", 1: "b"})
    assert {t.device.type for t in model.parameters()} == {"cpu"}


def test_merge_lora_keeps_the_device_and_dtype():
    config = CellTransformerConfig(vocab_size=40, **TINY, id2label={0: "a", 1: "b"})
    model = apply_mode(CellTransformerForAnnotation(config), FinetuneConfig(mode="lora"))
    model.to(device="meta", dtype=torch.float64)
    merged = merge_lora(model)
    tensors = [*merged.parameters(), *merged.buffers()]
    assert {t.device.type for t in tensors} == {"meta"}
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float64}
    assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())


# ------------------------------------------------------------------------------------------- host syncs
class CountedReads(torch.Tensor):
    """A tensor counting reads back to the host (``.item()``, ``float()``, formatting, ``.cpu()``, ...); the
    results of operations on it are ``CountedReads`` too, so a loss summed on the device still counts when read."""

    reads = 0
    READS = {"item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__format__", "__repr__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in cls.READS:
            CountedReads.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x, y):
        loss = torch.nn.functional.mse_loss(self.head(x).squeeze(-1), y)
        return type("Output", (), {"loss": loss.as_subclass(CountedReads)})()


def test_fit_reads_the_loss_at_log_intervals_not_every_step(caplog):
    caplog.set_level(logging.INFO, logger="atlasformer")  # the progress bar is shown: it displays the loss
    x, y = torch.randn(64, 4), torch.randn(64)
    CountedReads.reads = 0
    steps = 40
    fit(Regression(), 64, lambda rows: {"x": x[rows], "y": y[rows]}, lambda m: (0.0, {}),
        FinetuneConfig(mode="full", max_steps=steps, eval_every=steps, batch_size=8), log=lambda s: None)
    assert 1 <= CountedReads.reads <= steps // 5, CountedReads.reads

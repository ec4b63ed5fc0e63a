"""The engine: process group, device, mixed precision and the distribution strategy behind one small API.

The training loop only calls the methods of :class:`BaseEngine`; each strategy implements them:

- ``ddp`` (:class:`Engine`, also one process): accelerate's ``Accelerator``.
- ``fsdp`` (:class:`FSDPEngine`): torch FSDP2 ``fully_shard`` over an ``init_device_mesh`` mesh, each
  encoder block its own shard group. Used directly, because accelerate's FSDP plugin silently falls
  back to DDP on CPU; the same code then runs in CI on CPU (gloo) and on GPUs (NCCL).
- ``deepspeed`` (:class:`DeepSpeedEngine`): ``deepspeed.initialize`` with ZeRO stage 1, 2 or 3 and
  optional CPU offload (accelerate's DeepSpeed plugin fails on CPU).

Gradients of N processes are averaged (DDP all-reduce, FSDP reduce-scatter, ZeRO), and ``backward``
divides the loss by ``grad_accum``; the loop's loss normaliser undoes both, so every strategy computes
what one process would. Any launcher that sets the torch.distributed environment works: ``torchrun``,
``accelerate launch``, ``srun`` through ``scripts/slurm_pretrain.sbatch``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType
from typing import ClassVar

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from atlasformer.checkpoints import load_safetensors, load_weights_only

from .checkpoint import CHECKPOINT_FIX, weights_only_deepspeed_checkpoint_engine

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets; fp32 means TF32,
# which the engine enables on CUDA. Matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}
OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


# --------------------------------------------------------------------------------------- helpers
def configure_threads(threads: int) -> None:
    """Intra-op threads: as asked, else ``OMP_NUM_THREADS``, else the cores split between the local processes."""
    if threads > 0:
        torch.set_num_threads(threads)
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        # set again: numba's thread pool (scanpy's kernels) shares the OpenMP runtime and raises it to every core
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    elif "OMP_NUM_THREADS" not in os.environ and int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def measure_matmul_tflops(size: int = 1024, repeats: int = 8) -> float:
    """This CPU's fp32 matmul TFLOP/s with the current thread count (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def peak_tflops(device: torch.device, precision: str, stated: float = 0.0) -> tuple[float | None, str]:
    """Peak TFLOP/s per device for MFU and where it came from."""
    if stated > 0:
        return stated, "stated (peak_tflops)"
    if device.type == "cpu":
        return measure_matmul_tflops(), "measured fp32 matmul on this CPU"
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name and precision in peaks:
            return peaks[precision], f"{key} {precision} data-sheet peak"
    return None, f"unknown for {name!r}: set peak_tflops to log MFU"


def init_process_group(cpu: bool) -> torch.device:
    """Join the launcher's process group (torchrun / accelerate / srun env), or make a 1-process one."""
    use_cuda = torch.cuda.is_available() and not cpu
    if "RANK" not in os.environ:
        # a plain `python` run: a process group of one, so that the sharded code paths still run
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # gloo beside NCCL so that small CPU-side collectives (RNG states, data positions) work too
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return device


def name_cpu_accelerator_for_deepspeed() -> None:
    """Tell DeepSpeed it runs on CPU when CUDA is unavailable, before it is imported.

    accelerate imports deepspeed (when installed) to unwrap any model, whatever the strategy, and DeepSpeed's
    own detection then warns "Setting accelerator to CPU" on every CPU run. A value the user set stays.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def sdpa_context(backend: str):
    """Restrict scaled_dot_product_attention to one kernel; flash needs fp16/bf16 and no padding mask."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([kernels[backend]])


def encoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: units of sharding, compilation and activation checkpointing."""
    from atlasformer.model_zoo.cell_transformer import EncoderBlock

    return [m for m in model.modules() if isinstance(m, EncoderBlock)]


# ---------------------------------------------------------------------------------------- engines
@dataclass
class BaseEngine:
    """What every strategy provides to the training loop; the process facts are torch.distributed's."""

    precision: str = "fp32"
    grad_accum: int = 1
    cpu: bool = False
    seed: int = 0
    compile: bool = False
    gradient_checkpointing: bool = False
    sdpa_backend: str = "auto"
    clip_grad: float = 1.0
    micro_batch_size: int = 1
    device: torch.device = field(init=False)
    strategy: ClassVar[str] = ""
    _uses_autocast: ClassVar[bool] = True
    fused_optimizer: ClassVar[bool] = True
    """AdamW's fused kernel: on CUDA, and on CPU (torch >= 2.4), where it is ~2.5x faster than the default."""

    def __post_init__(self):
        name_cpu_accelerator_for_deepspeed()
        self.device = self._start()
        if self.device.type == "cuda":
            # TF32 matmuls for fp32 runs: the speed the fp32 peak in PEAK_TFLOPS assumes
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        from accelerate.utils import set_seed

        set_seed(self.seed)
        atexit.register(self.close)  # runs sometimes abort with SIGABRT when the group outlives them
        self._micro = 0

    def _start(self) -> torch.device:
        raise NotImplementedError

    # ---------------------------------------------------------------- process facts
    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------- model preparation
    def _apply_model_options(self, model: torch.nn.Module) -> torch.nn.Module:
        model.to(self.device)
        if self.gradient_checkpointing:
            # the encoder recomputes each block in backward (torch.utils.checkpoint, non-reentrant)
            for module in model.modules():
                if hasattr(module, "gradient_checkpointing"):
                    module.gradient_checkpointing = True
        if self.compile:
            for block in encoder_blocks(model):
                block.compile(dynamic=True)  # in place: parameter names (and checkpoints) stay the same
        return model

    def prepare(self, model, optimizer: torch.optim.Optimizer | OptimizerFactory):
        """Wrap ``model`` for the strategy; ``optimizer`` is an optimizer or ``params -> optimizer``."""
        raise NotImplementedError

    def unwrap(self, model) -> torch.nn.Module:
        return model

    # ---------------------------------------------------------------- one optimizer step
    @contextlib.contextmanager
    def accumulate(self, model):
        """One micro-batch; gradients are synchronised on the last of ``grad_accum``."""
        self._micro = (self._micro + 1) % self.grad_accum
        with self._no_sync(model, sync=self._micro == 0):
            yield

    def _no_sync(self, model, sync: bool):
        return contextlib.nullcontext()

    def autocast(self):
        stack = contextlib.ExitStack()
        if self.precision != "fp32" and self._uses_autocast:
            stack.enter_context(torch.autocast(self.device.type, dtype=DTYPES[self.precision]))
        stack.enter_context(sdpa_context(self.sdpa_backend))
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self, model, optimizer, max_norm: float) -> torch.Tensor | float | None:
        """Clip (when ``max_norm`` > 0), step and zero the gradients; returns the pre-clip norm.

        The norm stays a tensor on the device: reading it waits for the GPU, so the loop does at log intervals.
        """
        norm = self.clip_grad_norm(model, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor | None:
        if max_norm <= 0:
            return None
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    # ---------------------------------------------------------------- collectives
    def sum_across_ranks(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self.device)
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def broadcast_from_main(self, value: float) -> float:
        """Rank 0's ``value`` on every rank: a decision all ranks must take together (early stopping)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        return float(tensor.item())

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` on every rank (small, picklable Python objects only)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group at exit; leaving it makes runs abort with SIGABRT sometimes."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    # ---------------------------------------------------------------- checkpoints
    def save_state(self, model, optimizer, folder: Path) -> None:
        """Write model and optimizer state into ``folder`` (collective: every rank calls it)."""
        state = self.full_state_dict(model)
        optim = optimizer.state_dict()
        if self.is_main:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / "model.safetensors"))
            torch.save(optim, folder / "optimizer.pt")

    def load_state(self, model, optimizer, folder: Path) -> None:
        """Read what :meth:`save_state` wrote (tensors only: safetensors or ``weights_only``)."""
        self.unwrap(model).load_state_dict(load_safetensors(folder / "model.safetensors", device=str(self.device),
                                                            fix=CHECKPOINT_FIX))
        optimizer.load_state_dict(load_weights_only(folder / "optimizer.pt", map_location=self.device, fix=CHECKPOINT_FIX))

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        """The unsharded weights on the main process (empty elsewhere); collective."""
        return self.unwrap(model).state_dict()

    def export_model(self, model) -> torch.nn.Module | None:
        """A plain, unsharded copy of the model on the main process (None elsewhere); collective."""
        return self.unwrap(model) if self.is_main else None


def forget_single_process_accelerator_state(mixed_precision: str) -> None:
    """Let one process run jobs of different precisions one after the other (pretrain in bf16, then fine-tune in
    fp32, as in a notebook): accelerate keeps its state process-wide and refuses a second precision. A state
    of a multi-process launch is kept, since every rank shares it."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision) and state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def drop_fp32_output_copy(model: torch.nn.Module) -> None:
    """Keep accelerate's autocast around ``model.forward``, but not its fp32 copy of every output tensor.

    Under bf16 / fp16 accelerate converts the whole output (hidden states, vocabulary-sized logits) to
    fp32 after each forward; only the loss needs fp32, and the model computes its losses in fp32.
    """
    from accelerate.utils.operations import ConvertOutputsToFp32

    bound = hasattr(model.forward, "__func__")
    converter = getattr(model.forward.__func__ if bound else model.forward, "__wrapped__", None)
    if isinstance(converter, ConvertOutputsToFp32):
        forward = converter.model_forward  # the autocast-wrapped forward
        model.forward = MethodType(forward, model) if bound else forward


@dataclass
class Engine(BaseEngine):
    """``ddp`` through accelerate's ``Accelerator`` (one process, or DDP under any launcher)."""

    fp32_outputs: bool = True
    """Under bf16 / fp16, let accelerate copy every output tensor to fp32 (pretraining turns it off)."""
    find_unused_parameters: bool = False
    """Let DDP find the parameters a step leaves unused (fine-tuning: a backbone's condition tokens, a pretraining
    head); without it a second step fails. Costs a graph traversal per step."""
    strategy: ClassVar[str] = "ddp"
    _uses_autocast: ClassVar[bool] = False  # accelerate's autocast is used instead

    def _start(self) -> torch.device:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        forget_single_process_accelerator_state(PRECISIONS[self.precision])
        self.accelerator = Accelerator(
            mixed_precision=PRECISIONS[self.precision],
            gradient_accumulation_steps=self.grad_accum,
            cpu=self.cpu or not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=self.find_unused_parameters)],
        )
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    def prepare(self, model, optimizer):
        model = self._apply_model_options(model)
        if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(list(model.parameters()))
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if not self.fp32_outputs:
            drop_fp32_output_copy(self.accelerator.unwrap_model(model))
        return model, optimizer

    def accumulate(self, model):
        return self.accelerator.accumulate(model)

    @property
    def sync_gradients(self) -> bool:
        return self.accelerator.sync_gradients

    def autocast(self):
        stack = contextlib.ExitStack()
        stack.enter_context(self.accelerator.autocast())
        stack.enter_context(sdpa_context(self.sdpa_backend))
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # divides by grad_accum, scales for fp16

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor | None:
        if max_norm <= 0:
            return None
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)

    def step(self, model, optimizer, max_norm: float) -> torch.Tensor | float | None:
        if not self.accelerator.sync_gradients:
            raise RuntimeError("Engine.step called before the last micro-batch of an accumulation window")
        return super().step(model, optimizer, max_norm)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        return self.accelerator.get_state_dict(model)

    def save_state(self, model, optimizer, folder: Path) -> None:
        super().save_state(model, optimizer, folder)
        if self.is_main and self.accelerator.scaler is not None:
            torch.save(self.accelerator.scaler.state_dict(), folder / "grad_scaler.pt")

    def load_state(self, model, optimizer, folder: Path) -> None:
        super().load_state(model, optimizer, folder)
        if self.accelerator.scaler is not None and (folder / "grad_scaler.pt").exists():
            self.accelerator.scaler.load_state_dict(load_weights_only(folder / "grad_scaler.pt", fix=CHECKPOINT_FIX))

    def close(self) -> None:
        self.accelerator.end_training()
        super().close()


@dataclass
class FSDPEngine(BaseEngine):
    """``fsdp``: FSDP2 full sharding (parameters, gradients, optimizer state) of each block and the root.

    bf16 runs keep fp32 master weights and reduce gradients in fp32 (``MixedPrecisionPolicy``).
    Checkpoints are sharded safetensors written by every rank through torch.distributed.checkpoint
    (``sharded/``), plus the optimizer's hyper-parameters as JSON; nothing is pickled.
    """

    strategy: ClassVar[str] = "fsdp"
    _uses_autocast: ClassVar[bool] = False  # the mixed-precision policy casts parameters instead

    def _start(self) -> torch.device:
        return init_process_group(self.cpu)

    def prepare(self, model, optimizer):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("strategy=fsdp builds the optimizer after sharding: pass a factory params -> optimizer")
        # the cell embedding is a view of the last hidden state; the loop never modifies outputs in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        self._model_class = type(model)
        model = self._apply_model_options(model)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[self.precision], reduce_dtype=torch.float32)
        for block in encoder_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)  # each block casts its hidden-state input
        # the root's inputs stay as given: regression targets and continuous values keep fp32 (the value
        # encoder casts values to its weights' dtype itself)
        root_policy = MixedPrecisionPolicy(param_dtype=DTYPES[self.precision], reduce_dtype=torch.float32,
                                           cast_forward_inputs=False)
        fully_shard(model, mesh=mesh, mp_policy=root_policy)
        return model, optimizer(list(model.parameters()))

    def _no_sync(self, model, sync: bool):
        model.set_requires_gradient_sync(sync)  # accumulate unsharded gradients locally until the last
        return contextlib.nullcontext()

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor | None:
        norm = super().clip_grad_norm(model, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _flat_state(self, model, optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        flat = {f"model.{k}": v for k, v in model_state.items()}
        for fqn, values in optim_state["state"].items():
            flat.update({f"optim.{fqn}.{name}": v for name, v in values.items()})
        return flat, optim_state["param_groups"]

    def save_state(self, model, optimizer, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        flat, groups = self._flat_state(model, optimizer)
        dcp.save(flat, storage_writer=dcp.HuggingFaceStorageWriter(str(folder / "sharded"), save_distributed=True))
        if self.is_main:
            (folder / "optimizer_param_groups.json").write_text(json.dumps(groups, indent=1))

    def load_state(self, model, optimizer, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        flat, _ = self._flat_state(model, optimizer)
        dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(folder / "sharded")))
        groups = json.loads((folder / "optimizer_param_groups.json").read_text())
        model_state = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
        optim_state: dict = {"state": {}, "param_groups": groups}
        for group in groups:
            for fqn in group["params"]:
                prefix = f"optim.{fqn}."
                optim_state["state"][fqn] = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def export_model(self, model) -> torch.nn.Module | None:
        state = self.full_state_dict(model)
        if not self.is_main:
            return None
        plain = self._model_class(model.config)
        plain.load_state_dict(state)
        return plain


@dataclass
class DeepSpeedEngine(BaseEngine):
    """``deepspeed``: ZeRO stage 1 / 2 / 3 with optional CPU offload, through ``deepspeed.initialize``.

    The DeepSpeed config is ``deepspeed_config`` (a JSON file, or the one an ``accelerate launch``
    DeepSpeed config names) with its ``"auto"`` entries filled from the run: micro-batch size, gradient
    accumulation, clipping and precision. ``zero_stage`` and ``offload`` default to the JSON's and
    must agree with it when both are given. Checkpoints use DeepSpeed's own sharded format; they are
    read back with ``weights_only=True`` (DeepSpeed's loader would unpickle arbitrary objects).
    """

    zero_stage: int | None = None
    offload: bool | None = None
    deepspeed_config: str | None = None
    strategy: ClassVar[str] = "deepspeed"
    _uses_autocast: ClassVar[bool] = False  # DeepSpeed casts the model to bf16 / fp16 itself

    def _start(self) -> torch.device:
        import deepspeed
        import deepspeed.ops

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        device = init_process_group(self.cpu)
        if device.type == "cpu":
            # the shared-memory all-reduce kernel is compiled at first use (a minute, and a C++ compiler);
            # on CPU the plain gloo collectives serve, so it is switched off
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl")
        self.ds_config = self._resolve_config()
        return device

    def _resolve_config(self) -> dict:
        path = self.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        config = json.loads(Path(path).read_text()) if path else {}
        return fill_deepspeed_config(config, micro_batch_size=self.micro_batch_size, grad_accum=self.grad_accum,
                                     world_size=self.world_size, clip_grad=self.clip_grad, precision=self.precision,
                                     zero_stage=self.zero_stage, offload=self.offload, source=path or "defaults")


    def prepare(self, model, optimizer):
        import deepspeed

        self._model_class = type(model)
        model = self._apply_model_options(model)
        if not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(list(model.parameters()))
        self._model, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self._model.checkpoint_engine = weights_only_deepspeed_checkpoint_engine()
        # the loop's LR schedule drives the client optimizer, whose param groups ZeRO keeps using
        return self._model, optimizer

    def accumulate(self, model):
        return contextlib.nullcontext()  # DeepSpeed counts micro-batches itself

    def backward(self, loss: torch.Tensor) -> None:
        self._model.backward(loss)  # divides by gradient_accumulation_steps
        self._model.step()  # a no-op except at accumulation boundaries, where it clips, steps and zeroes

    def step(self, model, optimizer, max_norm: float) -> torch.Tensor | float | None:
        """The optimizer step already ran in the last micro-batch's :meth:`backward`; returns its norm."""
        return model.get_global_grad_norm()  # read at log intervals, as the other engines' norms

    def unwrap(self, model):
        return model.module

    def save_state(self, model, optimizer, folder: Path) -> None:
        model.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load_state(self, model, optimizer, folder: Path) -> None:
        path, _ = model.load_checkpoint(str(folder), tag="deepspeed", load_optimizer_states=True,
                                        load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise FileNotFoundError(f"{folder}/deepspeed: no DeepSpeed checkpoint to resume from")

    def full_state_dict(self, model) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        # every rank takes part in gathering each parameter (ZeRO-3 partitions, ZeRO-1/2 fp32 masters)
        state = {name: safe_get_full_fp32_param(param).detach().cpu() for name, param in model.module.named_parameters()}
        state.update({name: buf.detach().cpu() for name, buf in model.module.named_buffers()})
        return state if self.is_main else {}

    def export_model(self, model) -> torch.nn.Module | None:
        state = self.full_state_dict(model)
        if not self.is_main:
            return None
        plain = self._model_class(model.module.config)
        plain.load_state_dict(state)
        return plain


def fill_deepspeed_config(config: dict, *, micro_batch_size: int, grad_accum: int, world_size: int,
                          clip_grad: float, precision: str, zero_stage: int | None, offload: bool | None,
                          source: str = "deepspeed_config") -> dict:
    """A complete DeepSpeed config: the given one with "auto" (or missing) entries taken from the run.

    Raises ``ValueError`` where the file states a value that contradicts the run's settings.
    """
    config = json.loads(json.dumps(config))  # a deep copy
    run = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": clip_grad,
    }
    for key, value in run.items():
        if config.get(key, "auto") not in ("auto", value):
            raise ValueError(f"{source}: {key}={config[key]} but this run has {value}; set it to \"auto\".")
        config[key] = value
    for kind in ("bf16", "fp16"):
        section = config.setdefault(kind, {})
        wanted = precision == kind
        if section.get("enabled", "auto") not in ("auto", wanted):
            raise ValueError(f"{source}: {kind}.enabled={section['enabled']} but precision={precision}; use \"auto\".")
        section["enabled"] = wanted
    zero = config.setdefault("zero_optimization", {})
    file_stage = zero.get("stage", "auto")
    if zero_stage is not None and file_stage not in ("auto", zero_stage):
        raise ValueError(f"{source}: ZeRO stage {file_stage} but zero_stage={zero_stage}; drop one of the two.")
    zero["stage"] = zero_stage if zero_stage is not None else (2 if file_stage == "auto" else file_stage)
    file_offload = bool(zero.get("offload_optimizer", {}).get("device", "none") != "none")
    if offload is not None and "offload_optimizer" in zero and file_offload != offload:
        raise ValueError(f"{source}: offload_optimizer is {'on' if file_offload else 'off'} but offload={offload}.")
    if offload if offload is not None else file_offload:
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": torch.cuda.is_available()})
        if zero["stage"] == 3:
            zero.setdefault("offload_param", {"device": "cpu", "pin_memory": torch.cuda.is_available()})
        config.setdefault("zero_force_ds_cpu_optimizer", False)  # the loop's torch AdamW runs on the CPU copy
    config.setdefault("zero_allow_untested_optimizer", True)  # torch.optim.AdamW is untested in DeepSpeed's list
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


ENGINES: dict[str, type[BaseEngine]] = {"ddp": Engine, "fsdp": FSDPEngine, "deepspeed": DeepSpeedEngine}


def check_launcher(strategy: str) -> None:
    """An ``accelerate launch`` FSDP / DeepSpeed config must match the run's strategy (named, not guessed)."""
    launched = {"fsdp": os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true",
                "deepspeed": os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"}
    for name, active in launched.items():
        if active and strategy != name:
            raise ValueError(f"the accelerate config launches {name}, but the run has strategy={strategy}; "
                             f"pass strategy={name} (or launch with an accelerate config for {strategy}).")


def make_engine(cfg) -> BaseEngine:
    """The engine for ``cfg.strategy`` (a :class:`~atlasformer.pretrain.PretrainConfig`)."""
    check_launcher(cfg.strategy)
    common = dict(precision=cfg.precision, grad_accum=cfg.grad_accum, cpu=cfg.cpu, seed=cfg.seed, compile=cfg.compile,
                  gradient_checkpointing=cfg.gradient_checkpointing, sdpa_backend=cfg.sdpa_backend,
                  clip_grad=cfg.clip_grad, micro_batch_size=cfg.batch_size)
    if cfg.strategy == "deepspeed":
        return DeepSpeedEngine(**common, zero_stage=cfg.zero_stage, offload=cfg.offload,
                               deepspeed_config=cfg.deepspeed_config)
    if cfg.strategy == "ddp":
        return Engine(**common, fp32_outputs=False)  # the losses are fp32; the other outputs are not read
    return ENGINES[cfg.strategy](**common)

"""Attention kernels of the CellTransformer: scaled_dot_product_attention that says why no kernel fits,
FlexAttention over the real tokens of a padded batch (``attention_impl="flex"``), and the explicit softmax that
returns the attention weights (``output_attentions=True``, for analysis; neither fused kernel returns them).

Kept apart from the model file so that it reads top to bottom; nothing here holds weights.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

NO_KERNEL = ("No available kernel", "No viable backend")
"""How torch says that no allowed scaled_dot_product_attention kernel takes the inputs (CUDA, CPU)."""


def allowed_sdpa_backends() -> list[str]:
    """The kernels scaled_dot_product_attention may use now (``sdpa_kernel`` / ``sdpa_backend`` restrict them)."""
    flags = torch.backends.cuda  # the flags apply to CPU dispatch too
    allowed = {"flash": flags.flash_sdp_enabled(), "efficient": flags.mem_efficient_sdp_enabled(),
               "cudnn": flags.cudnn_sdp_enabled(), "math": flags.math_sdp_enabled()}
    return [name for name, on in allowed.items() if on]


def no_kernel_message(device_type: str, dtype: torch.dtype, *, masked: bool, dropout_p: float, allowed: list[str]) -> str:
    """The error message when no ``allowed`` kernel (:func:`allowed_sdpa_backends`) takes queries of ``device_type``
    and ``dtype``, with a padding mask (``masked``) and ``dropout_p``: what refused them, and what to change."""
    reasons, fixes = [], ["sdpa_backend=auto lets torch choose a kernel that fits"]
    if device_type == "cuda" and masked and allowed == ["flash"]:
        reasons.append("this batch has padding, so attention gets a padding mask, and the flash kernel takes no mask")
        fixes += ["model.attention_impl=flex runs padded batches as variable-length attention, without a mask",
                  "sdpa_backend=efficient or cudnn take the mask"]
    if device_type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"flash attention needs fp16/bf16 inputs on a CUDA device, got {dtype} (set precision=bf16)")
    if device_type == "cpu" and dropout_p > 0:
        reasons.append(f"the CPU kernels other than math take no attention dropout (attention_dropout={dropout_p})")
    if device_type not in ("cuda", "cpu"):
        reasons.append(f"flash attention needs a CUDA device with fp16/bf16 inputs, got {device_type}")
    why = "; ".join(reasons) or "torch's warnings above say why each kernel was skipped"
    return (f"scaled_dot_product_attention has no kernel for these inputs among those allowed "
            f"({', '.join(allowed) or 'none'}): {why}. Fix: {'; or '.join(fixes)}.")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """``scaled_dot_product_attention``, whose "No available kernel" says why and how to fix it."""
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    except RuntimeError as err:
        if not any(text in str(err) for text in NO_KERNEL):
            raise
        message = no_kernel_message(q.device.type, q.dtype, masked=attn_mask is not None, dropout_p=dropout_p,
                                    allowed=allowed_sdpa_backends())
        raise RuntimeError(message) from err


def attention_with_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(head_dim) + mask) V written out, returning the weights that SDPA and FlexAttention keep
    to themselves: ``(out, weights)``, out (batch, heads, seq, head_dim) as :func:`sdpa` computes it (no dropout:
    the weights path is for models in eval mode) and weights (batch, heads, seq, seq) in float32.

    ``key_mask`` is None (every key real) or a (batch, 1, 1, seq) bool mask, True on keys that may be attended to:
    each query's weights sum to 1 over the real keys and are exactly 0 on padding (padded queries, whose outputs
    are never read, also attend to the real keys, as masked SDPA makes them).
    """
    with torch.autocast(q.device.type, enabled=False):  # float32 weights even inside a bf16 / fp16 autocast
        scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5  # (batch, heads, seq, seq)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, float("-inf"))
        weights = scores.softmax(dim=-1)  # (batch, heads, seq, seq)
        return (weights @ v.float()).to(v.dtype), weights


@functools.cache
def flex_attention_kernel(compiled: bool):
    """FlexAttention, compiled into a fused kernel for GPUs; eager elsewhere (it then materialises the scores)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as err:
        raise ImportError(f"attention_impl='flex' needs torch >= 2.5 (this is {torch.__version__}); "
                          "use attention_impl='sdpa'") from err
    return torch.compile(flex_attention) if compiled else flex_attention


def padding_block_mask(real: torch.Tensor):
    """FlexAttention block mask of a (batch, seq) bool mask of real tokens: real queries see real keys; padded
    queries see nothing (zero output, never read), so blocks of padding are skipped both ways."""
    from torch.nn.attention.flex_attention import create_block_mask

    def keep(b, h, q, kv):
        return real[b, q] & real[b, kv]

    return create_block_mask(keep, real.shape[0], None, real.shape[1], real.shape[1], device=real.device)


def has_no_padding(attention_mask: torch.Tensor) -> bool:
    """True when every token is real. A CPU mask is checked (microseconds); a GPU mask is taken as padded, as
    reading it back would stall the host until the GPU catches up, every forward: callers drop an all-True
    mask on the CPU side before moving a batch."""
    return attention_mask.device.type == "cpu" and bool(attention_mask.all())

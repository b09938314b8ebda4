"""The PyTorch side of the benchmarks: the batch-of-one loops' model loading, threads, hooks
and memory counters (run as scripts from the repository root: imported as ``torch_loop``)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from common import rss_mb

StepFn = Callable[[dict[str, np.ndarray]], tuple[float, float]]  # batch -> (loss, grad norm)


def torch_setup(args: argparse.Namespace) -> tuple[str, Callable[[], None]]:
    """(torch device, a device-sync function) from ``--device`` and ``--torch_tf32``."""
    import torch

    name = args.device
    if name == "auto":
        name = "gpu" if torch.cuda.is_available() else "cpu"
    if name == "gpu" and not torch.cuda.is_available():
        raise SystemExit("error: --device gpu but torch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = args.torch_tf32
    if name == "gpu":
        torch.cuda.reset_peak_memory_stats()
        return "cuda", torch.cuda.synchronize
    return "cpu", lambda: None


def torch_stats(device: str) -> dict[str, Any]:
    """Device name, threads, TF32, peak CUDA memory (MB) and peak host RSS of the torch phase."""
    import torch

    cuda = device == "cuda"
    return {
        "device": device,
        "device_kind": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "device_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "host_rss_mb": rss_mb(),
    }


def load_torch_model(path: str, dtype: str, device: str) -> Any:
    """transformers' causal LM from a ``.gguf`` file or a HF directory, on ``device``."""
    import torch
    import transformers

    p = Path(path)
    kw: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if p.suffix == ".gguf":
        kw["gguf_file"] = p.name
        p = p.parent
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p), **kw)
    return model.to(device).eval()


def attach_input_hook(model: Any, device: str, lengths: list[int]) -> Any:
    """Moves the model's tensor inputs to ``device`` and records every call's sequence length.

    The reference loops build CPU tensors; this forward pre-hook lets them run unchanged on
    a GPU and counts exactly the tokens the model processed. It survives ``copy.deepcopy``.
    """
    import torch

    def hook(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = tuple(a.to(device) if torch.is_tensor(a) else a for a in args)
        kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        ids = args[0] if args else kwargs["input_ids"]
        lengths.append(int(ids.shape[-1]))
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def train_step_fn(
    args: argparse.Namespace, config: Any, n_steps: int
) -> tuple[StepFn, dict[str, Any]]:
    """bench_train's torch side: transformers' model + torch AdamW with the recipe's schedule,
    ``step(batch) -> (loss, grad norm)`` (synced)."""
    import torch
    from torch_train_reference import warmup_cosine

    device, sync = torch_setup(args)
    t0 = time.perf_counter()
    model = load_torch_model(config.model.path, "float32", device)
    model.train()
    o = config.optim
    if o.schedule != "cosine" or o.end_lr != 0.0 or o.decay != "matrices":
        raise SystemExit("error: the torch loop implements the recipe's cosine/matrices optimizer")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": float(o.weight_decay)},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=float(o.lr), betas=(o.b1, o.b2), eps=float(o.eps))
    warm = max(int(o.warmup_steps), 0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup=warm, total=n_steps)
    )
    kind = "cuda" if device == "cuda" else "cpu"

    def step(batch: dict[str, np.ndarray]) -> tuple[float, float]:
        inputs = {
            "input_ids": torch.from_numpy(batch["input_ids"][0]).long(),
            "attention_mask": torch.from_numpy((batch["segment_ids"][0] > 0).astype(np.int64)),
            "labels": torch.from_numpy(batch["labels"][0]).long(),
        }
        inputs = {k: v.to(device) for k, v in inputs.items()}
        bf16 = args.torch_dtype == "bfloat16"
        with torch.autocast(kind, dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = model(**inputs).loss  # HF: mean CE over labels[:, 1:] != -100
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        out = float(loss.detach()), float(norm)
        sync()
        return out

    info = {"load_s": time.perf_counter() - t0, "sync": sync}
    return step, info

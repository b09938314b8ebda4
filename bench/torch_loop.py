"""The PyTorch side of the benchmarks: the batch-of-one loops' model loading, threads, hooks
and memory counters (run as scripts from the repository root: imported as ``torch_loop``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import rss_mb


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

"""Where the time of one jitted step goes on XLA:CPU, by HLO op and by source line.

Traces the scoring forward + loss (``--step forward``) or its gradient (``--step grad``: the
per-token chunked CE, as under resonance; ``--step train_grad``: the summed CE whose gradient
the forward pass computes, as the SFT step) of SmolLM2
at one batch shape with ``jax.profiler``, and sums the thunk times of each HLO instruction
(the thunks of the two cores overlap, so shares matter more than totals). Each instruction is
labelled with what it is (a dot with its operand dtypes and shapes, a fusion with its kind and
root) and the source line that issued it, so the table says which op of the model to fix:

    python bench/profile_forward.py --dtype bfloat16 --batch 2 --length 1024
    python bench/profile_forward.py --dtype bfloat16 --step grad --batch 4 --length 512
    python bench/profile_forward.py --dtype bfloat16 --param_dtype float32 --step train_grad \
        --batch 8 --length 512 --iters 2
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from resofilter_jax import assets  # noqa: E402
from resofilter_jax.models.attention import configure_attention  # noqa: E402
from resofilter_jax.models.loading import load_model  # noqa: E402
from resofilter_jax.models.precision import matmul_precision_scope  # noqa: E402
from resofilter_jax.runtime import tune_allocator  # noqa: E402
from resofilter_jax.scoring.losses import token_loss_sum, token_losses  # noqa: E402


def _source_lines(hlo_text: str) -> dict[str, str]:
    """{stack frame id: "file:line"} of the innermost project frame (not the precision helper)."""
    names = hlo_text.split("FunctionNames")[0]  # the FileNames table comes first
    files = dict(re.findall(r'^(\d+) "([^"]*)"$', names, re.M))
    locs = {
        i: (f, ln)
        for i, f, ln in re.findall(r"^(\d+) \{file_name_id=(\d+) .*?line=(\d+)", hlo_text, re.M)
    }
    frames = dict(
        (i, (loc, parent))
        for i, loc, parent in re.findall(
            r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}", hlo_text, re.M
        )
    )
    out = {}
    for fid in frames:
        chain, seen, cur = [], set(), fid
        while cur in frames and cur not in seen:  # innermost frame first
            seen.add(cur)
            loc, parent = frames[cur]
            name, line = files.get(locs.get(loc, ("", ""))[0], "?"), locs.get(loc, ("", "?"))[1]
            chain.append((name, line))
            cur = parent
        mine = [
            (n, ln)
            for n, ln in chain
            if "resofilter_jax" in n and not n.endswith(("precision.py", "nnx/module.py"))
        ]
        name, line = mine[0] if mine else (chain[0] if chain else ("?", "?"))
        out[fid] = f"{Path(name).parent.name}/{Path(name).name}:{line}"
    return out


def instruction_labels(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (what it is, source file:line)} of an optimised HLO module's text."""
    sources = _source_lines(hlo_text)
    labels: dict[str, tuple[str, str]] = {}
    fused_roots: dict[str, str] = {}
    comp = ""
    for line in hlo_text.splitlines():
        if line.startswith(("%", "ENTRY")) and line.rstrip().endswith("{"):
            comp = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else "ENTRY"
            continue
        m = re.match(r"^\s*(ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$", line)
        if not m:
            continue
        root, name, shape, opcode, rest = m.groups()
        shape = re.sub(r"\{[\d,]*\}", "", shape)
        if root:
            fused_roots[comp] = f"{opcode} {shape}"
        frame = re.search(r"stack_frame_id=(\d+)", line)
        where = sources.get(frame.group(1), "?") if frame else "?"
        what = f"{opcode} {shape}"
        if opcode == "fusion":
            calls = re.search(r"calls=%?([\w.\-]+)", rest)
            kind = re.search(r"kind=(\w+)", rest)
            what = f"fusion[{kind.group(1) if kind else '?'}] {shape}"
            if calls:
                what += f" <{calls.group(1)}>"
        labels[name] = (what, where)
    # name each fusion by its fused computation's root op
    for name, (what, where) in list(labels.items()):
        m = re.search(r"<([\w.\-]+)>", what)
        if m and m.group(1) in fused_roots:
            labels[name] = (what.replace(m.group(0), f"root {fused_roots[m.group(1)]}"), where)
    return labels


def thunk_times(trace_dir: Path) -> dict[str, float]:
    """{event name: summed seconds} over the host threads of the newest trace in trace_dir."""
    from jax.profiler import ProfileData

    xplane = sorted(trace_dir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)[-1]
    data = ProfileData.from_file(str(xplane))
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        if not plane.name.startswith("/host"):
            continue
        for line in plane.lines:
            for ev in line.events:
                totals[ev.name] += ev.duration_ns * 1e-9
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model_path", default="", help="default: the shipped SmolLM2 GGUF")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--param_dtype", default="", help="default: --dtype")
    ap.add_argument("--matmul_precision", default="highest")
    ap.add_argument("--step", choices=("forward", "grad", "train_grad"), default="forward")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--hlo_out", default="", help="also write the optimised HLO text here")
    args = ap.parse_args()
    tune_allocator()
    path = args.model_path or str(assets.smollm2_gguf())
    lm = load_model(
        path, dtype=args.dtype, param_dtype=args.param_dtype or args.dtype, tokenizer=False
    )
    configure_attention(lm.model, "auto", packed=True)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, lm.config.vocab_size, (args.batch, args.length)), jnp.int32)
    mask = jnp.ones_like(ids)
    graphdef, state = nnx.split(lm.model)

    def loss(state: nnx.State, ids: jax.Array, mask: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state)
        if args.step == "train_grad":
            total = token_loss_sum(model, ids, mask, mask.astype(jnp.float32), chunk=256)
        else:
            total = jnp.sum(token_losses(model, ids, mask, mask.astype(jnp.float32)))
        return total / jnp.sum(mask[:, 1:])

    fn = jax.jit(loss if args.step == "forward" else jax.grad(loss))
    with matmul_precision_scope(args.matmul_precision):
        t0 = time.perf_counter()
        compiled = fn.lower(state, ids, mask).compile()
        print(f"compile {time.perf_counter() - t0:.1f} s", flush=True)
        labels = instruction_labels(compiled.as_text())
        if args.hlo_out:
            Path(args.hlo_out).write_text(compiled.as_text())
        jax.block_until_ready(compiled(state, ids, mask))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            with jax.profiler.trace(tmp):
                for _ in range(args.iters):
                    jax.block_until_ready(compiled(state, ids, mask))
            wall = (time.perf_counter() - t0) / args.iters
            totals = thunk_times(Path(tmp))
    rows = [(s / args.iters, n, *labels[n]) for n, s in totals.items() if n in labels]
    op_time = sum(r[0] for r in rows)
    tokens = args.batch * args.length
    print(
        f"{args.step} {args.dtype} [{args.batch}, {args.length}]: {wall:.3f} s/step wall, "
        f"{tokens / wall:,.0f} tok/s; op time {op_time:.3f} s summed over threads"
    )
    print("\nby source line:")
    by_line: dict[str, float] = collections.defaultdict(float)
    for s, _, _, where in rows:
        by_line[where] += s
    for where, s in sorted(by_line.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {100 * s / op_time:5.1f}%  {s:7.3f} s  {where}")
    print("\nby kind of instruction and source line:")
    by_kind: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for s, _, what, where in rows:
        key = (re.sub(r"\.\d+", "", what), where)
        by_kind[key][0] += s
        by_kind[key][1] += 1
    for (what, where), (s, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"  {100 * s / op_time:5.1f}%  {s:7.3f} s  x{n:<4} {where:<28} {what[:100]}")
    print("\nby instruction:")
    for s, name, what, where in sorted(rows, reverse=True)[: args.top]:
        print(f"  {100 * s / op_time:5.1f}%  {s:7.3f} s  {where:<22} {name:<24} {what[:110]}")


if __name__ == "__main__":
    main()

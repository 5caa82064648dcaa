#!/usr/bin/env python3
"""The PyTorch side of `nsa-bench`: the same rows, the same JSON format.

Layer rows (one attention layer, forward and forward+backward, f32 and bf16):
  ref-nsa         native-sparse-attention-pytorch 0.2.3 `SparseAttention` (causal, PyTorch ops)
  ref-nsa-triton  the same with its Triton selection kernel (`use_triton_kernel=True`)
  ref-full        the reference's dense `transformer.Attention` layer (projections, rotary, SDPA)
  sdpa            `F.scaled_dot_product_attention` alone on q/k/v of the layer's shape (GQA via
                  `enable_gqa`), i.e. the attention kernel without projections
Training rows: the reference `Transformer` at the seed config (vocab 21128, dim 512, depth 6,
8 heads x 64, sparse 16/16/16/16/4), forward + backward + AdamW step, NSA and dense.

Timing: warm-up excluded, median of --runs, `torch.cuda.synchronize()` before each clock read.
Memory: `torch.cuda.max_memory_allocated()` over the row (weights, inputs and activations:
`allocated_mem_bytes`), and `max_memory_reserved()` (what the caching allocator held:
`reserved_mem_bytes`, what nsa-bench reports of CubeCL's pools). Out-of-memory rows are
recorded as `oom` and larger sizes of the same implementation are skipped.

    python3 -m pip install --no-index --no-deps --target /tmp/site ../shared/reference-wheels/*.whl
    PYTHONPATH=/tmp/site python3 scripts/bench_reference.py --json ref.json
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

PROCESS_START = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse_len(s):
    s = s.strip().lower()
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_tflops(precision):
    """Dense tensor-core peak of an H100/H200 SXM (NVIDIA's figures without sparsity): bf16 and
    f16 989.4 TFLOP/s, f32 as TF32 494.7 (the same rule as nsa-bench)."""
    return 494.7 if precision == "f32" else 989.4


def reset_memory():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    return None, None


def is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def layer_flops(impl, a, n):
    h, kvh, dh, dim = a.heads, a.kv_heads, a.dim_head, a.dim
    proj = 2 * n * dim * (h + 2 * kvh) * dh + 2 * n * h * dh * dim
    if impl == "sdpa":
        return 2 * 2 * h * n * n * dh / 2
    if impl == "ref-full":
        return proj + 2 * 2 * h * n * n * dh / 2
    blocks = n / a.stride
    hidden = a.compress_block * dh
    mlp = 2 * 2 * kvh * blocks * (hidden * hidden + hidden * dh)
    compressed = 4 * h * n * blocks / 2 * dh
    selected = 4 * h * n * (a.selected + 0.5) * a.selection_block * dh
    sliding = 4 * h * n * (a.window + 1) * dh
    return proj + mlp + compressed + selected + sliding


def patch_reference_attention():
    """0.2.3's dense `Attention` crashes on the cache keywords its own Transformer passes."""
    from native_sparse_attention_pytorch import transformer as t

    original = t.Attention.forward
    if getattr(original, "_nsa_bench", False):
        return

    def forward(self, x, cache=None, return_cache=False, **_):
        out = original(self, x)
        return (out, None) if return_cache else out

    forward._nsa_bench = True
    t.Attention.forward = forward


def build_layer(impl, a, device, dtype):
    if impl in ("ref-nsa", "ref-nsa-triton"):
        from native_sparse_attention_pytorch import SparseAttention

        layer = SparseAttention(
            dim=a.dim,
            dim_head=a.dim_head,
            heads=a.heads,
            kv_heads=a.kv_heads,
            sliding_window_size=a.window,
            compress_block_size=a.compress_block,
            compress_block_sliding_stride=a.stride,
            selection_block_size=a.selection_block,
            num_selected_blocks=a.selected,
            causal=True,
            use_triton_kernel=impl == "ref-nsa-triton",
        )
        return layer.to(device=device, dtype=dtype)
    if impl == "ref-full":
        patch_reference_attention()
        from native_sparse_attention_pytorch.transformer import Attention

        layer = Attention(dim=a.dim, dim_head=a.dim_head, heads=a.heads, kv_heads=a.kv_heads)
        return layer.to(device=device, dtype=dtype)
    raise ValueError(impl)


def time_runs(fn, warmup, runs):
    times = []
    first = None
    for i in range(warmup + runs):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ms = (time.perf_counter() - t) * 1e3
        if i == 0:
            first = ms
        if i >= warmup:
            times.append(ms)
    return times, first


def layer_row(args, impl, precision, seq, pass_):
    row = dict(suite="layer", impl=impl, precision=precision, seq=seq, batch=args.batch, pass_=pass_)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[precision]
    backward = pass_ == "fwd+bwd"
    reset_memory()
    torch.manual_seed(0)
    if impl == "sdpa":
        q = torch.randn(args.batch, args.heads, seq, args.dim_head, device=device, dtype=dtype)
        k = torch.randn(args.batch, args.kv_heads, seq, args.dim_head, device=device, dtype=dtype)
        v = torch.randn_like(k)
        if backward:
            q.requires_grad_()
            k.requires_grad_()
            v.requires_grad_()

        def run():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            if backward:
                out.float().mean().backward()
                q.grad = k.grad = v.grad = None
            del out
    else:
        layer = build_layer(impl, args, device, dtype)
        x = torch.randn(args.batch, seq, args.dim, device=device, dtype=dtype)
        if backward:
            x.requires_grad_()
        else:
            layer.eval()

        def run():
            if backward:
                out = layer(x)
                out.float().mean().backward()
                x.grad = None
                layer.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    out = layer(x)
            del out

    times, first = time_runs(run, args.warmup, args.runs)
    peak, reserved = memory()
    flops = layer_flops(impl, args, seq) * args.batch * (3 if backward else 1)
    row.update(
        status="ok",
        ms_median=statistics.median(times),
        ms_min=min(times),
        ms_all=times,
        ms_first=first,
        allocated_mem_bytes=peak,
        reserved_mem_bytes=reserved,
        flop_floor_ms=flops / (peak_tflops(precision) * 1e12) * 1e3,
        flop_peak_tflops=peak_tflops(precision),
    )
    return row


def train_row(args, impl, precision, seq, batch):
    row = dict(suite="train", impl=impl, precision=precision, seq=seq, batch=batch, pass_="train-step")
    from native_sparse_attention_pytorch.transformer import Transformer

    patch_reference_attention()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[precision]
    reset_memory()
    torch.manual_seed(0)
    sparse = impl.startswith("ref-nsa")
    model = Transformer(
        num_tokens=21128,
        dim=512,
        depth=6,
        dim_head=64,
        heads=8,
        use_sparse_attn=sparse,
        use_triton_fine_selection=impl == "ref-nsa-triton",
        sparse_attn_kwargs=dict(
            sliding_window_size=16,
            compress_block_size=16,
            compress_block_sliding_stride=16,
            selection_block_size=16,
            num_selected_blocks=4,
        ),
    ).to(device=device, dtype=dtype)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 21128, (batch, seq + 1), device=device)
    times, ends = [], []
    for _ in range(args.warmup + args.runs):
        sync()
        t = time.perf_counter()
        loss = model(ids, return_loss=True)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        sync()
        times.append((time.perf_counter() - t) * 1e3)
        ends.append(time.perf_counter() - PROCESS_START)
    timed = times[args.warmup:]
    median = statistics.median(timed)
    peak, reserved = memory()
    startup = next((e for t, e in zip(times, ends) if t <= median * 1.1), None)
    row.update(
        status="ok",
        ms_median=median,
        ms_min=min(timed),
        ms_all=timed,
        ms_first=times[0],
        allocated_mem_bytes=peak,
        reserved_mem_bytes=reserved,
        tokens_per_s=seq * batch / (median / 1e3),
        startup_s=startup,
        note="startup_s counts from the Python process start (imports included)",
    )
    return row


def guarded(fn, row_base):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - every failure becomes a row
        status = "oom" if is_oom(e) else "error"
        msg = str(e).strip().splitlines()
        note = (msg[0] if msg else type(e).__name__)[:300]
        if status == "error":
            traceback.print_exc(file=sys.stderr)
        row = dict(row_base)
        row.update(status=status, note=note)
        reset_memory()
        return row


def print_row(r):
    t = f"{r['ms_median']:10.2f} ms" if r.get("ms_median") is not None else f"{r['status']:>13}"
    mem = r.get("reserved_mem_bytes")
    mem = f"{mem / 2**30:8.2f} GiB" if mem else "       - GiB"
    extra = f"{r['tokens_per_s']:10.0f} tok/s" if r.get("tokens_per_s") else ""
    print(f"  {r['suite']:6} {r['impl']:15} {r['precision']:5} {r['pass']:10} seq {r['seq']:6} "
          f"x{r['batch']:<3} {t} {mem} {extra} {r.get('note', '')}", file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="layer,train")
    p.add_argument("--lengths", default="1k,4k,16k,32k,64k,128k")
    p.add_argument("--precisions", default="f32,bf16")
    p.add_argument("--impls", default="ref-nsa,ref-nsa-triton,ref-full,sdpa")
    p.add_argument("--passes", default="fwd,fwd+bwd")
    p.add_argument("--train-shapes", default="256x16,4096x1")
    p.add_argument("--train-precisions", default="f32")
    p.add_argument("--train-impls", default="ref-nsa,ref-full")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", help="write a benchmark record (scripts/record.py) here")
    p.add_argument("--commit", help="the commit of the nsa binaries measured beside (for the record)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--compress-block", type=int, default=32)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--selection-block", type=int, default=64)
    p.add_argument("--selected", type=int, default=16)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()

    suites = args.suite.split(",")
    lengths = [parse_len(s) for s in args.lengths.split(",") if s]
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"bench_reference: torch {torch.__version__} on {device_name}", file=sys.stderr)
    try:
        import triton  # noqa: F401

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None

    rows = []
    if "layer" in suites:
        for pass_ in args.passes.split(","):
            for impl in args.impls.split(","):
                for precision in args.precisions.split(","):
                    failed = None
                    for seq in lengths:
                        base = dict(suite="layer", impl=impl, precision=precision, seq=seq,
                                    batch=args.batch, pass_=pass_)
                        if failed:
                            row = dict(base, status="skipped", note=f"{failed[1]} at {failed[0]} tokens")
                        else:
                            row = guarded(lambda: layer_row(args, impl, precision, seq, pass_), base)
                            if row["status"] in ("oom",):
                                failed = (seq, row["status"])
                        row["pass"] = row.pop("pass_")
                        print_row(row)
                        rows.append(row)
    if "train" in suites:
        for shape in args.train_shapes.split(","):
            seq, batch = shape.lower().split("x")
            seq, batch = parse_len(seq), int(batch)
            for precision in args.train_precisions.split(","):
                for impl in args.train_impls.split(","):
                    base = dict(suite="train", impl=impl, precision=precision, seq=seq, batch=batch,
                                pass_="train-step")
                    row = guarded(lambda: train_row(args, impl, precision, seq, batch), base)
                    row["pass"] = row.pop("pass_")
                    print_row(row)
                    rows.append(row)

    settings = dict(
        suite=suites,
        lengths=args.lengths.split(","),
        impls=args.impls.split(","),
        passes=args.passes.split(","),
        train_shapes=args.train_shapes.split(","),
        layer={k: getattr(args, k) for k in ("dim", "dim_head", "heads", "kv_heads", "compress_block",
                                              "stride", "selection_block", "selected", "window", "batch")},
        warmup=args.warmup,
        runs=args.runs,
    )
    if args.json:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from record import write_record

        write_record(args.json, "bench_reference.py", args.commit,
                     "cuda" if torch.cuda.is_available() else "cpu", device_name, settings,
                     dict(torch=torch.__version__, triton=triton_version, rows=rows))
        print(f"wrote {args.json}", file=sys.stderr)
    for r in rows:
        if r.get("ms_median") is not None:
            floor = r.get("flop_floor_ms")
            floor = f" (FLOP floor {floor:.2f} ms)" if floor else ""
            print(f"{r['suite']}\t{r['impl']}\t{r['precision']}\t{r['pass']}\t{r['seq']}x{r['batch']}\t"
                  f"{r['ms_median']:.2f} ms{floor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

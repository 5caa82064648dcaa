#!/usr/bin/env python3
"""Decode speed of the reference `Transformer.sample` (native-sparse-attention-pytorch 0.2.3) at
the seed config with random weights: batch 1, a 64-token prompt, 256 new tokens, top-k 0.9 and
gumbel sampling as the reference samples, with and without its KV cache. Prints one JSON line
per row. The row mirrors `nsa-bench --suite decode` (random seed-config weights, same shapes).

    PYTHONPATH=/tmp/site python3 scripts/reference_decode.py [--runs 3]
"""
import argparse
import json
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--json", help="also write a benchmark record (scripts/record.py) here")
    p.add_argument("--commit", help="the commit of the nsa binaries measured beside")
    args = p.parse_args()
    rows = []
    from native_sparse_attention_pytorch.transformer import Transformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = Transformer(
        num_tokens=21128, dim=512, depth=6, dim_head=64, heads=8, use_sparse_attn=True,
        sparse_attn_kwargs=dict(sliding_window_size=16, compress_block_size=16,
                                compress_block_sliding_stride=16, selection_block_size=16,
                                num_selected_blocks=4),
    ).to(device).eval()
    prompt = torch.randint(0, 21128, (1, args.prompt), device=device)
    for cache in (True, False):
        times = []
        with torch.no_grad():
            for _ in range(args.runs + 1):
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                model.sample(prompt, args.prompt + args.new, use_cache_kv=cache)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        warm = sorted(times[1:])[len(times[1:]) // 2]
        row = dict(impl="reference", kv_cache=cache, device=device, prompt=args.prompt,
                   new=args.new, first_s=round(times[0], 3), median_s=round(warm, 3),
                   tokens_per_s=round(args.new / warm, 1),
                   tokens_per_s_all=[round(args.new / t, 1) for t in times[1:]])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        import os
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from record import write_record

        name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        write_record(args.json, "reference_decode.py", args.commit, device, name,
                     dict(prompt=args.prompt, new=args.new, runs=args.runs),
                     dict(torch=torch.__version__, rows=rows))


if __name__ == "__main__":
    main()

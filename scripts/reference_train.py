#!/usr/bin/env python3
"""Trains the reference `Transformer` (native-sparse-attention-pytorch 0.2.3) on the exact token
stream of an nsa-train run, with the same optimisation, and evaluates it on the same validation
windows, so the two loss curves compare like for like.

    cargo run --release -p nsa-train --example export_stream -- CONFIG.toml STEPS STREAM_DIR
    PYTHONPATH=/tmp/site python3 scripts/reference_train.py STREAM_DIR --csv ref.csv

Optimisation as nsa-train: AdamW (decoupled weight decay), linear warmup then cosine to
lr * min_lr_ratio, micro-batch gradients averaged, global gradient-norm clipping. The reference
model keeps its own initialisation (PyTorch defaults), as our model keeps Burn's. Validation
loss is the mean token NLL over the exported validation windows.
"""

import argparse
import csv
import json
import math
import os
import sys
import time

import numpy as np
import torch


def lr_at(cfg, i, total):
    peak, warm = cfg["lr"], min(cfg["warmup_steps"], total)
    low = peak * cfg["min_lr_ratio"]
    if i < warm:
        return peak * (i + 1) / warm
    span = max(total - warm, 1)
    t = min(max((i - warm) / span, 0.0), 1.0)
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * t))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("stream")
    p.add_argument("--csv", required=True)
    p.add_argument("--steps", type=int, default=0, help="default: all exported steps")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=0)
    args = p.parse_args()

    cfg = json.load(open(os.path.join(args.stream, "stream.json")))
    tokens = torch.from_numpy(
        np.fromfile(os.path.join(args.stream, "tokens.u16"), dtype="<u2").astype(np.int64))
    starts = np.fromfile(os.path.join(args.stream, "train_starts.u32"), dtype="<u4").astype(np.int64)
    valid = np.fromfile(os.path.join(args.stream, "valid_starts.u32"), dtype="<u4").astype(np.int64)
    seq, bs, accum = cfg["seq_len"], cfg["batch_size"], cfg["grad_accum"]
    rows = bs * accum
    steps = args.steps or cfg["steps"]
    eval_every = args.eval_every or cfg["eval_every"]
    assert len(starts) >= steps * rows, "stream shorter than --steps"

    from native_sparse_attention_pytorch.transformer import Transformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg["seed"])
    s = cfg["sparse"]
    model = Transformer(
        num_tokens=cfg["num_tokens"], dim=cfg["dim"], depth=cfg["depth"], dim_head=cfg["dim_head"],
        heads=cfg["heads"], kv_heads=cfg["kv_heads"], ff_expansion_factor=cfg["ff_expansion_factor"],
        use_sparse_attn=cfg["attention"] == "nsa",
        sparse_attn_kwargs=dict(
            sliding_window_size=s["sliding_window_size"],
            compress_block_size=s["compress_block_size"],
            compress_block_sliding_stride=s["compress_block_sliding_stride"],
            selection_block_size=s["selection_block_size"],
            num_selected_blocks=s["num_selected_blocks"],
        ),
    ).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                              eps=cfg["eps"], weight_decay=cfg["weight_decay"])
    offs = torch.arange(seq + 1)

    def windows(st):
        idx = torch.as_tensor(st).unsqueeze(1) + offs
        return tokens[idx].to(device)

    @torch.no_grad()
    def evaluate():
        model.eval()
        total, n = 0.0, 0
        for i in range(0, len(valid), bs):
            ids = windows(valid[i:i + bs])
            loss = model(ids, return_loss=True)
            total += loss.item() * ids.shape[0] * seq
            n += ids.shape[0] * seq
        model.train()
        return total / max(n, 1)

    out = open(args.csv, "w", newline="")
    w = csv.writer(out)
    w.writerow(["step", "split", "loss", "lr", "tokens_per_s", "elapsed_s"])
    t0 = time.perf_counter()
    last, last_t = 0, t0
    for step in range(steps):
        lr = lr_at(cfg, step, cfg["steps"])
        for g in optim.param_groups:
            g["lr"] = lr
        rs = starts[step * rows:(step + 1) * rows]
        loss_sum = 0.0
        for m in range(accum):
            ids = windows(rs[m * bs:(m + 1) * bs])
            loss = model(ids, return_loss=True)
            (loss / accum).backward()
            loss_sum += loss.item()
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optim.step()
        optim.zero_grad(set_to_none=True)
        done = step + 1
        if done % 50 == 0 or done == steps:
            if device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            tps = (done - last) * rows * seq / (now - last_t)
            last, last_t = done, now
            w.writerow([done, "train", loss_sum / accum, lr, round(tps), round(now - t0, 2)])
            print(f"step {done} loss {loss_sum / accum:.4f} lr {lr:.2e} {tps:,.0f} tok/s", flush=True)
        if done % eval_every == 0 or done == steps:
            vl = evaluate()
            w.writerow([done, "valid", vl, lr, "", round(time.perf_counter() - t0, 2)])
            print(f"step {done} valid loss {vl:.4f}", flush=True)
            out.flush()
        if args.max_seconds and time.perf_counter() - t0 > args.max_seconds:
            print(f"stopping at step {done}: --max-seconds", flush=True)
            vl = evaluate()
            w.writerow([done, "valid", vl, lr, "", round(time.perf_counter() - t0, 2)])
            break
    out.close()


if __name__ == "__main__":
    sys.exit(main())

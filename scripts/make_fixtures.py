#!/usr/bin/env python3
"""Writes the reference-parity fixtures in assets/fixtures/ from native-sparse-attention-pytorch.

Each fixture is one safetensors file holding
  - `param.<name>`: every parameter of the reference module (its state_dict naming),
  - `input` (float activations `[batch, seq, dim]`, or token ids for the transformer),
  - `output` (the module output, or the transformer's logits),
  - `loss_weight` (layers: the random `R` of the scalar loss `sum(output * R)`),
  - `loss` (the scalar loss) and `grad.input` / `grad.<name>`: its gradients,
and, in its metadata, `kind` (`layer` or `transformer`) and `config` (our JSON config).

The reference runs in float64 so that the stored numbers are (nearly) exact; the Rust tests run
in f32 and compare. Seeds are chosen so that no top-k decision is closer than `MIN_GAP`: a
near-tie would let rounding flip a selected block and make the comparison meaningless.

Usage (needs torch and the reference wheels, see README "Reference fixtures"):
    python3 scripts/make_fixtures.py [--out assets/fixtures]
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

import native_sparse_attention_pytorch.transformer as reference_transformer
from native_sparse_attention_pytorch import SparseAttention
from native_sparse_attention_pytorch.transformer import Transformer

MIN_GAP = 1e-6

# -- the reference's full-attention `Attention` ignores the cache protocol that its own
# `Transformer.forward` uses (it crashes on `cache=`); accept and ignore those keywords.
_attention_forward = reference_transformer.Attention.forward


def _attention_forward_with_cache(self, x, cache=None, return_cache=False, **_):
    out = _attention_forward(self, x)
    return (out, None) if return_cache else out


reference_transformer.Attention.forward = _attention_forward_with_cache

# -- record the smallest margin of every top-k the reference takes
_topk = torch.Tensor.topk
_gaps = []


def _recording_topk(self, k, dim=-1, *args, **kwargs):
    out = _topk(self, k, dim, *args, **kwargs)
    if self.shape[dim] > k and self.dtype.is_floating_point:
        top = _topk(self, k + 1, dim).values
        kth, nxt = top.select(dim, k - 1), top.select(dim, k)
        live = kth > 1e-10  # ties among masked (zero) blocks do not matter
        if live.any():
            _gaps.append((kth - nxt)[live].min().item())
    return out


torch.Tensor.topk = _recording_topk


LAYERS = {
    # name: (SparseAttention kwargs, batch, seq)
    "gqa1_seq31": (dict(dim=32, dim_head=8, heads=2, kv_heads=2, sliding_window_size=8,
                        compress_block_size=8, compress_block_sliding_stride=8,
                        selection_block_size=8, num_selected_blocks=2), 2, 31),
    "gqa2_overlap_seq77": (dict(dim=32, dim_head=8, heads=4, kv_heads=2, sliding_window_size=6,
                                compress_block_size=8, compress_block_sliding_stride=4,
                                selection_block_size=8, num_selected_blocks=3), 1, 77),
    "gqa4_noshare_seq130": (dict(dim=48, dim_head=8, heads=8, kv_heads=2, sliding_window_size=16,
                                 compress_block_size=8, compress_block_sliding_stride=4,
                                 selection_block_size=16, num_selected_blocks=2,
                                 query_heads_share_selected_kv=False), 1, 130),
    "gqa4_share_seq130": (dict(dim=48, dim_head=8, heads=8, kv_heads=2, sliding_window_size=16,
                               compress_block_size=8, compress_block_sliding_stride=4,
                               selection_block_size=16, num_selected_blocks=2), 1, 130),
    "difftopk_seq77": (dict(dim=32, dim_head=8, heads=4, kv_heads=1, sliding_window_size=8,
                            compress_block_size=4, compress_block_sliding_stride=4,
                            selection_block_size=8, num_selected_blocks=2,
                            use_diff_topk=True), 2, 77),
    "nsel0_seq31": (dict(dim=32, dim_head=8, heads=2, kv_heads=1, sliding_window_size=4,
                         compress_block_size=4, compress_block_sliding_stride=2,
                         selection_block_size=4, num_selected_blocks=0), 1, 31),
    "nsel_many_seq130": (dict(dim=32, dim_head=8, heads=4, kv_heads=2, sliding_window_size=8,
                              compress_block_size=16, compress_block_sliding_stride=8,
                              selection_block_size=16, num_selected_blocks=50), 1, 130),
    "seq1": (dict(dim=32, dim_head=8, heads=4, kv_heads=2, sliding_window_size=8,
                  compress_block_size=4, compress_block_sliding_stride=4,
                  selection_block_size=4, num_selected_blocks=2), 3, 1),
    "mem3_expand2_nonorm_seq64": (dict(dim=32, dim_head=16, heads=2, kv_heads=1,
                                       sliding_window_size=16, compress_block_size=8,
                                       compress_block_sliding_stride=8, selection_block_size=8,
                                       num_selected_blocks=3, num_compressed_mem_kv=3,
                                       compress_mlp_expand_factor=2.0, norm=False), 2, 64),
    "seed_recipe_seq100": (dict(dim=64, dim_head=16, heads=4, kv_heads=4, sliding_window_size=16,
                                compress_block_size=16, compress_block_sliding_stride=16,
                                selection_block_size=16, num_selected_blocks=4), 1, 100),
}

TRANSFORMERS = {
    # name: (Transformer kwargs, batch, seq)  (seq + 1 token ids for the loss)
    "transformer_nsa": (dict(num_tokens=64, dim=32, depth=2, dim_head=8, heads=4, kv_heads=2,
                             use_sparse_attn=True,
                             sparse_attn_kwargs=dict(sliding_window_size=8, compress_block_size=8,
                                                     compress_block_sliding_stride=4,
                                                     selection_block_size=8,
                                                     num_selected_blocks=2)), 2, 45),
    "transformer_full": (dict(num_tokens=64, dim=32, depth=2, dim_head=8, heads=4, kv_heads=2,
                              use_sparse_attn=False), 2, 45),
}

OPTIONAL_DEFAULTS = dict(kv_heads=None, num_compressed_mem_kv=1, norm=True, use_diff_topk=False,
                         query_heads_share_selected_kv=True, compress_mlp_expand_factor=1.0)


def nsa_config(kwargs):
    cfg = dict(OPTIONAL_DEFAULTS)
    cfg.update(kwargs)
    return cfg


def transformer_config(kwargs):
    sparse = dict(kwargs.get("sparse_attn_kwargs", {}))
    cfg = dict(num_tokens=kwargs["num_tokens"], dim=kwargs["dim"], depth=kwargs["depth"],
               dim_head=kwargs["dim_head"], heads=kwargs["heads"], kv_heads=kwargs.get("kv_heads"),
               ff_expansion_factor=4.0,
               attention="nsa" if kwargs.get("use_sparse_attn") else "full")
    if sparse:
        cfg["sparse"] = sparse
    return cfg


def randomise(module, gen):
    """Replaces zero / one initialisations by random values, so every parameter matters."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("freqs"):
                continue
            if name.endswith("norm.weight") or name == "norm.weight" or ".1.0.weight" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif "compress_mem_kv" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif "intrablock_positions" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif "to_strategy_combine" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                bound = 1 / max(p.shape[-1], 1) ** 0.5 if p.ndim > 1 else 0.1
                p.copy_(bound * (2 * torch.rand(p.shape, generator=gen, dtype=p.dtype) - 1) * 1.7)


def params(module):
    return {f"param.{k}": v.detach().float().contiguous() for k, v in module.state_dict().items()}


def grads(module):
    return {f"grad.{k}": p.grad.detach().float().contiguous()
            for k, p in module.named_parameters() if p.grad is not None}


def layer_fixture(kwargs, batch, seq, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = SparseAttention(causal=True, **kwargs).double()
    randomise(module, gen)
    x = torch.randn(batch, seq, kwargs["dim"], generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.randn(batch, seq, kwargs["dim"], generator=gen, dtype=torch.float64)
    _gaps.clear()
    out = module(x)
    loss = (out * r).sum()
    loss.backward()
    tensors = params(module)
    tensors.update(grads(module))
    tensors.update({
        "input": x.detach().float(), "output": out.detach().float(), "loss_weight": r.float(),
        "loss": loss.detach().float().reshape(1), "grad.input": x.grad.float(),
    })
    return tensors, min(_gaps, default=float("inf"))


def transformer_fixture(kwargs, batch, seq, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Transformer(**kwargs).double()
    randomise(model, gen)
    ids = torch.randint(0, kwargs["num_tokens"], (batch, seq + 1), generator=gen)
    _gaps.clear()
    logits = model(ids[:, :-1])
    loss = model(ids, return_loss=True)
    loss.backward()
    tensors = params(model)
    tensors.update(grads(model))
    tensors.update({"input": ids.to(torch.int64), "output": logits.detach().float(),
                    "loss": loss.detach().float().reshape(1)})
    return tensors, min(_gaps, default=float("inf"))


def write(out_dir, name, make, kwargs, batch, seq, kind, config):
    for seed in range(100):
        tensors, gap = make(kwargs, batch, seq, seed)
        if gap >= MIN_GAP:
            break
    else:
        sys.exit(f"{name}: no seed without a near-tie in top-k")
    path = os.path.join(out_dir, f"{name}.safetensors")
    save_file(tensors, path, metadata={"kind": kind, "config": json.dumps(config),
                                       "seed": str(seed), "min_topk_gap": f"{gap:.3g}",
                                       "reference": "native-sparse-attention-pytorch==0.2.3"})
    print(f"{name}: seed {seed}, smallest top-k margin {gap:.3g}, {os.path.getsize(path)} bytes")
    if kind == "transformer":
        # the same weights as a torch.save'd state_dict plus the constructor arguments, for the
        # checkpoint import tests
        state = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
        torch.save(state, os.path.join(out_dir, f"{name}.pt"))
        save_file({k: v.contiguous() for k, v in state.items()},
                  os.path.join(out_dir, f"{name}.state.safetensors"))
        with open(os.path.join(out_dir, f"{name}.args.json"), "w") as f:
            json.dump(kwargs, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "assets", "fixtures"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, (kwargs, batch, seq) in LAYERS.items():
        write(args.out, name, layer_fixture, kwargs, batch, seq, "layer", nsa_config(kwargs))
    for name, (kwargs, batch, seq) in TRANSFORMERS.items():
        write(args.out, name, transformer_fixture, kwargs, batch, seq, "transformer",
              transformer_config(kwargs))


if __name__ == "__main__":
    main()

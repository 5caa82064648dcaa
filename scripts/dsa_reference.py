#!/usr/bin/env python3
"""A PyTorch reference of DeepSeek sparse attention (DSA) and the parity fixtures of our Rust
model's `attention = "dsa"`.

There is no pip package of DSA. This reference is written from the DeepSeek-V3.2-Exp report
(lightning indexer, token-level top-k, the indexer's KL loss in a dense warm-up and in sparse
training) and the seed article (a local window mixed with the global branch by a learned gate),
as plainly as possible: every score is materialised and every mask is explicit. The dense parts
are the reference transformer's own `Attention` (native-sparse-attention-pytorch 0.2.3: pre
RMSNorm, q/k/v projections, rotary embedding, GQA by repetition), which the DSA layer extends.

The layer, for queries t and keys s ≤ t of one sequence:
  I(t, s)   = Σ_j w(t, j) · ReLU(q_I(t, j) · k_I(s)),  w = to_weights(x) · (heads · width)^-1/2,
              q_I, k_I = to_q(x), LayerNorm(to_k(x)), the first dim_head features rotated;
              the indexer reads x (after the layer's norm) detached.
  S(t)      = {t} ∪ the top_k − 1 earlier tokens by I(t, ·) (stable: the earlier of equal
              scores first); every earlier token in the dense stage.
  global    = softmax attention of each head over S(t)
  local     = softmax attention over t − window .. t
  out       = to_out(gate · local + (1 − gate) · global),  gate = sigmoid(to_gate(x)) per head
  KL(t)     = Σ_{s ∈ S(t)} p(t, s) (log p(t, s) − log softmax_{S(t)} I(t, ·)(s)),
              p = the global attention's probabilities averaged over the heads (detached);
              the indexer loss of a layer is the mean over batch and queries, the model's the
              sum over layers.

Fixtures (safetensors, in assets/fixtures/, like scripts/make_fixtures.py's transformer ones):
`param.*`, `input` (ids), `output` (logits), `loss`, `grad.*` (of the LM loss), and for each
stage (`sparse`, `dense`): `indexer_loss.<stage>`, `grad_kl.<stage>.*` (of the indexer loss),
`output.<stage>` (logits). Run in float64; seeds are taken only where no top-k decision is within
`MIN_GAP` of a tie and no indexer dot product within `MIN_DOT` of zero (a ReLU kink), so that
f32 rounding cannot change a selection.

Usage (needs torch and the reference wheels, see README "Reference fixtures"):
    python3 scripts/dsa_reference.py [--out assets/fixtures]
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from safetensors.torch import save_file
from torch import nn

import native_sparse_attention_pytorch.transformer as reference_transformer
from native_sparse_attention_pytorch.transformer import Attention, Transformer

MIN_GAP = 1e-4
MIN_DOT = 1e-5


class Indexer(nn.Module):
    def __init__(self, dim, heads, width):
        super().__init__()
        self.heads, self.width = heads, width
        self.to_q = nn.Linear(dim, heads * width, bias=False)
        self.to_k = nn.Linear(dim, width, bias=False)
        self.k_norm = nn.LayerNorm(width)
        self.to_weights = nn.Linear(dim, heads, bias=False)

    def forward(self, x, rotary):
        """x [b, n, dim] → scores I [b, n, n] (every pair) and the dot products [b, j, n, n]."""
        q = rearrange(self.to_q(x), "b n (j e) -> b j n e", j=self.heads)
        k = self.k_norm(self.to_k(x)).unsqueeze(1)
        # rotary_embedding_torch rotates the first dim_head features and passes the rest
        q, k = rotary.rotate_queries_or_keys(q), rotary.rotate_queries_or_keys(k)
        w = self.to_weights(x) * (self.heads * self.width) ** -0.5
        dots = torch.einsum("bjte,bjse->bjts", q, k.expand(-1, self.heads, -1, -1))
        return torch.einsum("bjts,btj->bts", F.relu(dots), w), dots


class DSAttention(Attention):
    """The reference transformer's dense `Attention` with a lightning indexer, top-k token
    selection and a gated local window."""

    stage = "sparse"          # or "dense": the global branch sees every earlier token
    indexer_losses = None     # a list: the layer appends its KL when set

    def __init__(self, dim, dim_head, heads, kv_heads, index_heads, index_dim_head, top_k, window):
        super().__init__(dim=dim, dim_head=dim_head, heads=heads, causal=True, kv_heads=kv_heads)
        self.dim_head, self.top_k, self.window = dim_head, top_k, window
        self.indexer = Indexer(dim, index_heads, index_dim_head or dim_head)
        self.to_gate = nn.Linear(dim, heads) if window > 0 else None

    def forward(self, x, cache=None, return_cache=False, **_):
        b, n, _ = x.shape
        x = self.norm(x)
        q, k, v = map(self.split_heads, (self.to_q(x), self.to_k(x), self.to_v(x)))
        q, k = self.rotary_embed.rotate_queries_with_cached_keys(q, k)
        g = self.heads // self.kv_heads
        k, v = (repeat(t, "b h ... -> b (g h) ...", g=g) for t in (k, v))

        # 1. indexer scores on the detached input, the selection
        scores, dots = self.indexer(x.detach(), self.rotary_embed)
        Recorder.dots.append(dots.detach().abs().min().item())
        pos = torch.arange(n)
        causal = pos[None, :] <= pos[:, None]
        if self.stage == "dense":
            selected = causal.expand(b, n, n)
        else:
            ranked = scores.detach().masked_fill(~causal, float("-inf"))
            ranked = ranked.masked_fill(torch.eye(n, dtype=torch.bool), float("inf"))
            order = torch.sort(ranked, dim=-1, descending=True, stable=True)
            k_eff = min(self.top_k, n)
            Recorder.gap(order.values, k_eff, causal)
            selected = torch.zeros(b, n, n, dtype=torch.bool)
            selected.scatter_(-1, order.indices[..., :k_eff], True)
            selected &= causal

        # 2. the global and local branches
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * self.dim_head ** -0.5
        blocked = -torch.finfo(sim.dtype).max
        attn = sim.masked_fill(~selected[:, None], blocked).softmax(-1)
        out = attn @ v
        if self.to_gate is not None:
            local = causal & (pos[None, :] >= pos[:, None] - self.window)
            local_out = sim.masked_fill(~local, blocked).softmax(-1) @ v
            gate = rearrange(torch.sigmoid(self.to_gate(x)), "b n h -> b h n 1")
            out = gate * local_out + (1 - gate) * out

        # 3. the indexer's KL from the global attention over the same keys
        if self.indexer_losses is not None:
            p = attn.detach().mean(1)
            log_q = scores.masked_fill(~selected, float("-inf")).log_softmax(-1)
            terms = torch.where(selected, p * (torch.log(p.clamp(min=1e-300)) - log_q), 0.0)
            self.indexer_losses.append(terms.sum(-1).mean())

        out = self.to_out(self.merge_heads(out))
        return (out, None) if return_cache else out


class Recorder:
    """The smallest top-k margin and indexer |dot| of a forward pass."""
    gaps, dots = [], []

    @classmethod
    def clear(cls):
        cls.gaps, cls.dots = [], []

    @classmethod
    def gap(cls, values, k, causal):
        # rows with more earlier tokens than the selection takes: the k-th against the next
        n = values.shape[-1]
        if k >= n:
            return
        rows = causal.sum(-1) > k
        kth, nxt = values[..., k - 1][:, rows], values[..., k][:, rows]
        # two exact zeros (every dot product of both keys negative, none near zero: see
        # MIN_DOT) tie on every path alike: the earlier position first
        live = (kth != 0) | (nxt != 0)
        margin = (kth - nxt)[live]
        if margin.numel():
            cls.gaps.append(margin.min().item())


FIXTURES = {
    # name: (Transformer kwargs, DSA settings, batch, seq)  (seq + 1 token ids for the loss)
    "dsa_gqa_window_seq40": (dict(num_tokens=64, dim=32, depth=2, dim_head=8, heads=4, kv_heads=2),
                             dict(index_heads=3, index_dim_head=12, top_k=6, window=4), 2, 40),
    "dsa_nowindow_seq30": (dict(num_tokens=48, dim=24, depth=2, dim_head=6, heads=4, kv_heads=4),
                           dict(index_heads=4, index_dim_head=None, top_k=5, window=0), 1, 30),
}


def model_with(kwargs, dsa):
    model = Transformer(use_sparse_attn=False, **kwargs)
    for layer in model.layers:
        layer[0] = DSAttention(kwargs["dim"], kwargs["dim_head"], kwargs["heads"],
                               kwargs.get("kv_heads"), dsa["index_heads"], dsa["index_dim_head"],
                               dsa["top_k"], dsa["window"])
    return model.double()


def randomise(model, gen):
    """Random values for every parameter (norms around one), so every one matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("freqs"):
                continue
            if name.endswith("norm.weight") or ".1.0.weight" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif name.endswith("norm.bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                bound = 1 / max(p.shape[-1], 1) ** 0.5 if p.ndim > 1 else 0.1
                p.copy_(bound * (2 * torch.rand(p.shape, generator=gen, dtype=p.dtype) - 1) * 1.7)


def set_stage(model, stage, losses):
    for layer in model.layers:
        layer[0].stage = stage
        layer[0].indexer_losses = losses


def fixture(kwargs, dsa, batch, seq, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = model_with(kwargs, dsa)
    randomise(model, gen)
    ids = torch.randint(0, kwargs["num_tokens"], (batch, seq + 1), generator=gen)
    Recorder.clear()
    set_stage(model, "sparse", None)
    logits = model(ids[:, :-1])
    loss = model(ids, return_loss=True)
    loss.backward()
    tensors = {f"param.{k}": v.detach().float().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"grad.{k}": p.grad.detach().float().contiguous()
                    for k, p in model.named_parameters() if p.grad is not None})
    tensors.update({"input": ids.to(torch.int64), "output": logits.detach().float(),
                    "loss": loss.detach().float().reshape(1)})
    for stage in ("sparse", "dense"):
        model.zero_grad()
        losses = []
        set_stage(model, stage, losses)
        out = model(ids[:, :-1])
        kl = torch.stack(losses).sum()
        kl.backward()
        tensors[f"output.{stage}"] = out.detach().float()
        tensors[f"indexer_loss.{stage}"] = kl.detach().float().reshape(1)
        tensors.update({f"grad_kl.{stage}.{k}": p.grad.detach().float().contiguous()
                        for k, p in model.named_parameters() if p.grad is not None})
    set_stage(model, "sparse", None)
    return tensors, min(Recorder.gaps, default=float("inf")), min(Recorder.dots)


def config(kwargs, dsa):
    return dict(num_tokens=kwargs["num_tokens"], dim=kwargs["dim"], depth=kwargs["depth"],
                dim_head=kwargs["dim_head"], heads=kwargs["heads"], kv_heads=kwargs.get("kv_heads"),
                ff_expansion_factor=4.0, attention="dsa", dsa=dsa)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "assets", "fixtures"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, (kwargs, dsa, batch, seq) in FIXTURES.items():
        for seed in range(200):
            tensors, gap, dot = fixture(kwargs, dsa, batch, seq, seed)
            if gap >= MIN_GAP and dot >= MIN_DOT:
                break
        else:
            sys.exit(f"{name}: no seed without a near-tie in top-k or an indexer dot near zero")
        path = os.path.join(args.out, f"{name}.safetensors")
        save_file(tensors, path, metadata={
            "kind": "transformer", "config": json.dumps(config(kwargs, dsa)), "seed": str(seed),
            "min_topk_gap": f"{gap:.3g}", "min_index_dot": f"{dot:.3g}",
            "reference": "scripts/dsa_reference.py (on native-sparse-attention-pytorch==0.2.3)"})
        print(f"{name}: seed {seed}, smallest top-k margin {gap:.3g}, smallest |indexer dot| "
              f"{dot:.3g}, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()

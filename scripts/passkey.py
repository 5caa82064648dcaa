#!/usr/bin/env python3
"""Passkey retrieval (issue 22): does a trained model find a number hidden far back in its context?

A document is filler text with a five-digit passkey stated once and asked for at the end:

    <filler> 密钥：4 8 2 1 3 。 <filler> 密钥是什么？密钥：4 8 2 1 3 。

(bert-base-chinese: one token per character, digit and punctuation mark). The filler is a few
sentences repeated, so everything but the passkey is predictable; the digits after the second
"密钥：" can only come from the first (neither "：" nor a digit occurs in the filler). The sliding window of the seed model is 16 tokens: any
passkey further back must be reached through the compressed and selected branches.

    passkey.py corpus OUT_DIR --tokens N [--seed S] [--min-len A] [--max-len B]
                      [--long-share P --long-min C]
        training documents (log-uniform lengths in [A, B] tokens, the passkey at a uniform
        depth), about N tokens in all, in text files of OUT_DIR; with --long-share, a document
        is short (log-uniform in [A, C]) or, with probability P, long (log-uniform in [C, B]):
        many short documents put many more answers into a step than a single range does
    passkey.py prompts OUT_DIR --lengths 16384,32768,65536 --depths 0.1,0.5,0.9 --trials K
        evaluation prompts (each ends with the question's "密钥：") and answers.json
    passkey.py grade OUT_DIR
        reads OUT_DIR/NAME.out (what `nsa-infer generate --greedy --no-echo` printed for
        NAME.txt), prints the accuracy per length and depth, writes OUT_DIR/grades.json;
        exits 1 when an output is missing
"""

import argparse
import json
import math
import os
import random
import re
import sys

FILLER = [
    "草是绿的。",
    "天是蓝的。",
    "太阳是黄的。",
    "我们走吧。",
    "来来回回。",
]
STATE = "密钥：{} 。"
ASK = "密钥是什么？密钥："
ANSWER = " {} 。"
# tokens of the pieces (one per character; digits separated by spaces are one token each)
STATE_TOKENS = len("密钥：") + 5 + len("。")
ASK_TOKENS = len(ASK)
ANSWER_TOKENS = 5 + 1


def filler(n, rng):
    """`n` tokens of filler, starting at a random sentence."""
    out = []
    i = rng.randrange(len(FILLER))
    count = 0
    while count < n:
        s = FILLER[i % len(FILLER)]
        out.append(s)
        count += len(s)
        i += 1
    text = "".join(out)
    return text[:n]


def digits(rng):
    return " ".join(str(rng.randrange(10)) for _ in range(5))


def document(length, depth, rng, answer=True):
    """A document of about `length` tokens with the passkey at `depth` (0..1) of the filler."""
    key = digits(rng)
    room = max(0, length - STATE_TOKENS - ASK_TOKENS - (ANSWER_TOKENS if answer else 0))
    before = int(room * depth)
    text = filler(before, rng) + STATE.format(key) + filler(room - before, rng) + ASK
    if answer:
        text += ANSWER.format(key)
    return text, key.replace(" ", "")


def corpus(args):
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    total, part, docs = 0, 0, []
    lo, hi = math.log(args.min_len), math.log(args.max_len)
    split = math.log(args.long_min) if args.long_share > 0 else None

    def flush():
        nonlocal part, docs
        if docs:
            with open(os.path.join(args.out, f"passkey-{part:04d}.txt"), "w") as f:
                f.write("\n".join(docs) + "\n")
            part += 1
            docs = []

    while total < args.tokens:
        if split is None:
            length = int(math.exp(rng.uniform(lo, hi)))
        elif rng.random() < args.long_share:
            length = int(math.exp(rng.uniform(split, hi)))
        else:
            length = int(math.exp(rng.uniform(lo, split)))
        text, _ = document(length, rng.random(), rng)
        docs.append(text)
        total += length
        if sum(len(d) for d in docs) > 4_000_000:
            flush()
    flush()
    print(f"{part} files, about {total:,} tokens, in {args.out}")


def prompts(args):
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    answers = {}
    for length in (int(x) for x in args.lengths.split(",")):
        for depth in (float(x) for x in args.depths.split(",")):
            for t in range(args.trials):
                text, key = document(length, depth, rng, answer=False)
                name = f"len{length}-depth{depth:g}-{t}"
                with open(os.path.join(args.out, name + ".txt"), "w") as f:
                    f.write(text)
                answers[name] = {"length": length, "depth": depth, "key": key}
    with open(os.path.join(args.out, "answers.json"), "w") as f:
        json.dump(answers, f, indent=1)
    print(f"{len(answers)} prompts in {args.out}")


def grade(args):
    with open(os.path.join(args.out, "answers.json")) as f:
        answers = json.load(f)
    cells, missing, rows = {}, [], []
    for name, a in sorted(answers.items()):
        path = os.path.join(args.out, name + ".out")
        if not os.path.exists(path):
            missing.append(name)
            continue
        with open(path) as f:
            got = "".join(re.findall(r"[0-9]", f.read()))[:5]
        ok = got == a["key"]
        rows.append({**a, "name": name, "got": got, "ok": ok})
        cell = cells.setdefault((a["length"], a["depth"]), [0, 0])
        cell[0] += ok
        cell[1] += 1
    for (length, depth), (ok, n) in sorted(cells.items()):
        print(f"length {length:>6}  depth {depth:4.2f}  {ok}/{n}")
    with open(os.path.join(args.out, "grades.json"), "w") as f:
        json.dump(rows, f, indent=1)
    if missing:
        print(f"missing outputs: {', '.join(missing)}", file=sys.stderr)
        sys.exit(1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("out")
    c.add_argument("--tokens", type=int, required=True)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--min-len", type=int, default=64)
    c.add_argument("--max-len", type=int, default=8192)
    c.add_argument("--long-share", type=float, default=0.0)
    c.add_argument("--long-min", type=int, default=1024)
    c.set_defaults(run=corpus)
    q = sub.add_parser("prompts")
    q.add_argument("out")
    q.add_argument("--lengths", default="16384,32768,65536")
    q.add_argument("--depths", default="0.1,0.5,0.9")
    q.add_argument("--trials", type=int, default=4)
    q.add_argument("--seed", type=int, default=2)
    q.set_defaults(run=prompts)
    g = sub.add_parser("grade")
    g.add_argument("out")
    g.set_defaults(run=grade)
    args = p.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()

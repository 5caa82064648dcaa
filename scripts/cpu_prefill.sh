#!/usr/bin/env bash
# CPU prefill of long prompts on the bundled NSA fixture model (issue 22's CPU targets):
# time to first token and peak RSS of `nsa-infer generate --backend cpu` with 4k, 20k and 100k
# token prompts, one log per length in OUT.
#
#   scripts/cpu_prefill.sh NSA_INFER OUT [LENGTHS...]     (default lengths: 4000 20000 100000)
#
# The fixture (width 32, depth 2, 4 heads over 2 kv heads of 8, stride 4, blocks of 8, 2
# selected) is imported with a 131,072-token context and a 46-token vocabulary (the one
# scripts/gpu_session.sh writes); prompts are characters drawn uniformly from it (Python's
# random.seed(1)), one token each.
set -euo pipefail
bin=$1
out=$2
shift 2
lengths=("${@:-4000 20000 100000}")
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
{ printf '%s\n' '[PAD]' '[UNK]' '[CLS]' '[SEP]' '[MASK]'
  echo "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会" |
    python3 -c 'import sys; print("\n".join(sys.stdin.read().strip()))'; } | head -n 60 >"$work/vocab.txt"
cd "$(dirname "$0")/.."
"$bin" import --weights assets/fixtures/transformer_nsa.pt \
  --args assets/fixtures/transformer_nsa.args.json --tokenizer "$work/vocab.txt" \
  --max-seq-len 131072 --out "$work/model" >/dev/null
commit=$("$bin" --version | sed -n 's/.*(\(.*\)).*/\1/p')
for n in ${lengths[@]}; do
  python3 -c "import random; v=open('$work/vocab.txt').read().split()[5:]; random.seed(1); print(''.join(random.choice(v) for _ in range($n)))" >"$work/prompt.txt"
  log="$out/prefill-$((n / 1000))k-${commit:0:7}.log"
  /usr/bin/time -f "n=$((n / 1000))k wall %e s, maxrss %M KB" "$bin" generate -m "$work/model" \
    --backend cpu --greedy -n 4 --no-echo --stats -f "$work/prompt.txt" >/dev/null 2>"$log"
  tail -n 3 "$log"
done

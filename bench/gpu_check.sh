#!/usr/bin/env bash
# bench/gpu_check.sh — the GPU numbers in one command: ≤ 8 minutes on one H200, needing only torch and transformers
# beside this repository (no Ray, no vLLM, no DeepSpeed, no download: LLaMA-2-7B built from its config, random bf16 weights).
#
#   1. IFD scoring: unifit's batched `compute_ifd` against Cherry_LLM's per-example procedure (bench/ifd_bench.py):
#      tokens/s both ways and their ratio, padding efficiency, FLOPs per scored answer token.
#   2. One training step at a time (1 warm-up + 3 timed) with NEFTune, packing and activation checkpointing, plain
#      torch AdamW (bench/train_bench.py --engine torch): tokens/s and MFU = 6·N·tokens/s ÷ 989 TFLOP/s.
#   3. Batched HF generation, left-padded, against batch 1 (bench/gen_bench.py --arch): output tokens/s.
#
# Writes bench/results/gpu_check-<UTC time>.json and appends a dated row to bench/README.md (section "GPU check").
# Commit both.
#
#   bench/gpu_check.sh                              # on the GPU machine (python = the one with torch + transformers)
#   UNIFIT_CHECK_TINY=1 PYTHON=.venv/bin/python bench/gpu_check.sh
#                                                   # end-to-end check on a CPU with a toy LLaMA; its row says so
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python}
if [[ ${UNIFIT_CHECK_TINY:-0} == 1 ]]; then
    device=cpu arch=tiny kind="CPU smoke check (tiny arch, not GPU results)"
    ifd_args=(--n 16 --repeats 1) train_args=(--batch 2 --max-length 512 --peak-tflops 989)
    gen_args=(--n 8 --batch-size 4 --n-seq 2 --max-new-tokens 8)
else
    device=cuda arch=llama7b kind="GPU check"
    ifd_args=(--n 256 --ref-n 64 --repeats 2) train_args=(--batch 4 --max-length 2048 --peak-tflops 989)
    gen_args=(--n 64 --batch-size 32 --n-seq 4 --max-new-tokens 64)
fi
stamp=$(date -u +%Y-%m-%dT%H%MZ)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p bench/results
out=bench/results/gpu_check-$stamp.json
started=$(date +%s)

step() {  # step NAME SECONDS ARGS...: run one bench under a time limit; a failure is recorded, not fatal
    local name=$1 limit=$2
    shift 2
    echo "== $name ($device, $arch, limit ${limit}s)" >&2
    if ! timeout "$limit" "$python" "$@" --json-out "$work/$name.json" > "$work/$name.log" 2>&1; then
        echo "$name failed (exit $?); last lines:" >&2
        tail -n 20 "$work/$name.log" >&2
        tail -n 20 "$work/$name.log" > "$work/$name.error"
    fi
}

step ifd 170 bench/ifd_bench.py --device "$device" --arch "$arch" "${ifd_args[@]}"
step train 170 bench/train_bench.py --device "$device" --arch "$arch" --engine torch --neftune-alpha 5 --warmup 1 --steps 3 "${train_args[@]}"
step generate 110 bench/gen_bench.py --device "$device" --arch "$arch" "${gen_args[@]}"

"$python" - "$work" "$out" "$stamp" "$kind" "$(( $(date +%s) - started ))" "${UNIFIT_CHECK_TINY:-0}" <<'PY'
"""Merge the three benches into one JSON and append its row to bench/README.md."""
import json
import sys
from pathlib import Path

work, out, stamp, kind, seconds, tiny = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6] == "1"
result = {"date": stamp, "kind": kind, "wall_seconds": seconds}
for name in ("ifd", "train", "generate"):
    path, error = work / f"{name}.json", work / f"{name}.error"
    result[name] = json.loads(path.read_text()) if path.exists() and not error.exists() else {"error": error.read_text() if error.exists() else "no output"}
out.write_text(json.dumps(result, indent=2))

def number(section, key, fmt, unit=""):
    value = result[section].get(key)
    return "failed" if "error" in result[section] else ("—" if value is None else format(value, fmt) + unit)

ifd, train, gen = result["ifd"], result["train"], result["generate"]
row = [stamp, kind, ifd.get("device") or train.get("device") or "?", f"{seconds} s",
       number("ifd", "fast_tokens_per_s", ",.0f"), number("ifd", "reference_tokens_per_s", ",.0f"), number("ifd", "speedup", ".2f", "×"),
       number("ifd", "padding_efficiency", ".3f"), number("ifd", "reference_flops_ratio", ".2f", "×"),
       number("train", "tokens_per_second", ",.0f"), number("train", "mfu", ".1%"),
       number("generate", "batched_tokens_per_s", ",.0f"), number("generate", "batch1_tokens_per_s", ",.0f"),
       f"`{out.as_posix()}`"]
readme = Path("bench/README.md")
text = readme.read_text()
heading = "## GPU check"
if heading not in text:
    text = text.rstrip("\n") + f"""

{heading}

`bench/gpu_check.sh` on one GPU (LLaMA-2-7B architecture, random bf16 weights; `--engine torch` training, no DeepSpeed):
IFD = `compute_ifd` vs Cherry_LLM's per-example procedure (tokens/s on the reference's workload, padding efficiency =
real tokens ÷ computed positions, reference FLOPs ÷ batched FLOPs per scored answer token); train = packed rows +
NEFTune + activation checkpointing, MFU = 6·N·tokens/s ÷ 989 TFLOP/s; generate = output tokens/s, left-padded batch
vs batch 1. One row per run, appended by the script; rows marked "CPU smoke check" only show that the command runs.

| date (UTC) | run | device | wall | IFD tok/s | reference tok/s | IFD speed-up | padding eff. | ref FLOPs ÷ ours | train tok/s | MFU | gen tok/s batched | gen tok/s batch 1 | JSON |
|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|
"""
lines = text.rstrip("\n").split("\n")
at = next(i for i in range(lines.index(heading), len(lines)) if lines[i].startswith("| date (UTC)"))
while at + 1 < len(lines) and lines[at + 1].startswith("|"):  # after the table's last row, wherever the section is
    at += 1
lines.insert(at + 1, "| " + " | ".join(row) + " |")
readme.write_text("\n".join(lines) + "\n")
print(json.dumps({k: v for k, v in result.items() if k in ("date", "kind", "wall_seconds")}), "->", out)
failed = [name for name in ("ifd", "train", "generate") if "error" in result[name]]
sys.exit(1 if failed else 0)
PY

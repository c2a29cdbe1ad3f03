#!/usr/bin/env bash
# Every `jdit bench ...` and `jdit aot ...` command behind a table or figure in BENCHMARKS.md, in
# document order, each under a comment naming the BENCHMARKS.md section it reproduces.
#
#   scripts/reproduce_benchmarks.sh [--dry-run] [--only PATTERN] [--out DIR]
#
#   --dry-run       print the commands (shell-quoted, one per line) instead of running them
#   --only PATTERN  run only the commands whose command line (as printed, without the --json
#                   part) contains PATTERN: a plain substring, e.g. "bench train", "v5e:4x4",
#                   "sana_1600m", "jdit aot"
#   --out DIR       write each command's report to DIR/<n>_<slug>.json (`--json`); <n> is the
#                   command's number in this file (01, 02, ...), the same with or without --only
#
# Environment: JDIT (default `jdit`) is the command to run, e.g. JDIT="python -m jdit.cli".
# The TPU rows (`jdit aot`, `jdit bench kernels`, `jdit bench tiling --topology`) compile for TPU
# topologies through libtpu (`pip install -e '.[tpu]'`; no TPU needed) and run with
# ALLOW_MULTIPLE_LIBTPU_LOAD=1.
#
# CPU timings are only meaningful on a quiet machine: BENCHMARKS.md's figures are ratios measured
# on a 2-core box with other jobs idle; anything else running shifts them. The TPU rows report
# compiler figures (HBM, FLOPs, roofline), which do not depend on load; only their compile times
# do.
#
# How long (estimated from the times quoted in BENCHMARKS.md, on that 2-core box): the CPU
# benchmarks take 45-60 minutes (most of it `jdit bench bars`: shapes_tiny ~15 min and
# digits_tiny ~9 min with their evaluations, and `jdit bench sample` ~6 min); the libtpu compiles
# take about 3-5 hours (a `--max-batch` search is about four compiles of 1-4 min each, an
# unrolled compile of an XL model 4-14 min, the pipeline search 16 min). Roughly 4-6 hours in all.
#
# Commands that record a failure in BENCHMARKS.md (the SANA-1.6B 4K row with FSDP alone does not
# fit: `jdit aot` exits 1) are expected to fail; any other failure is reported at the end, after
# the remaining commands have run, and makes the script exit 1.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
}

DRY_RUN=0
ONLY=""
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --only) [[ $# -ge 2 ]] || { echo "$0: --only needs a PATTERN" >&2; exit 2; }
      ONLY=$2; shift 2 ;;
    --only=*) ONLY=${1#--only=}; shift ;;
    --out) [[ $# -ge 2 ]] || { echo "$0: --out needs a DIR" >&2; exit 2; }
      OUT=$2; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "$0: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -n $OUT && $DRY_RUN -eq 0 ]]; then
  mkdir -p "$OUT"
fi

read -r -a JDIT_CMD <<< "${JDIT:-jdit}"

# A word as a shell would need it: bare when safe, else single-quoted.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

SECTION=""
N=0
SELECTED=0
FAILED=()

# The BENCHMARKS.md section the following commands reproduce (printed while running).
section() { SECTION=$1; }

# run KIND SLUG ARGS...: one `jdit ARGS...` command.
#   KIND  cpu   a timing on this CPU
#         tpu   a libtpu compile (run with ALLOW_MULTIPLE_LIBTPU_LOAD=1)
#         nofit a libtpu compile that BENCHMARKS.md records as not fitting (exit status 1 expected)
#   SLUG  names the --out file: DIR/<n>_<slug>.json
run() {
  local kind=$1 slug=$2
  shift 2
  N=$((N + 1))
  local id
  id=$(printf '%02d' "$N")
  local -a cmd=("${JDIT_CMD[@]}" "$@")
  local -a envs=()
  if [[ $kind != cpu ]]; then
    envs=(ALLOW_MULTIPLE_LIBTPU_LOAD=1)
  fi
  local line="" word
  for word in ${envs[@]+"${envs[@]}"} "${cmd[@]}"; do
    line+="${line:+ }$(quote "$word")"
  done
  if [[ -n $ONLY && $line != *"$ONLY"* ]]; then  # matched before --json is added
    return 0
  fi
  if [[ -n $OUT ]]; then
    cmd+=(--json "$OUT/${id}_${slug}.json")
    line+=" --json $(quote "$OUT/${id}_${slug}.json")"
  fi
  SELECTED=$((SELECTED + 1))
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '%s\n' "$line"
    return 0
  fi
  printf '\n==> [%s] %s\n==> %s\n' "$id" "$SECTION" "$line" >&2
  local start=$SECONDS status=0
  env ${envs[@]+"${envs[@]}"} "${cmd[@]}" || status=$?
  local took=$((SECONDS - start))
  if [[ $status -eq 0 && $kind == nofit ]]; then
    printf '==> [%s] exit status 0 in %d s, but BENCHMARKS.md records this as not fitting\n' \
      "$id" "$took" >&2
    FAILED+=("[$id] $line (fitted; BENCHMARKS.md: does not fit)")
  elif [[ $status -ne 0 && $kind == nofit ]]; then
    printf '==> [%s] does not fit, as recorded (exit status %d, %d s)\n' "$id" "$status" \
      "$took" >&2
  elif [[ $status -ne 0 ]]; then
    printf '==> [%s] FAILED with exit status %d after %d s\n' "$id" "$status" "$took" >&2
    FAILED+=("[$id] $line (exit status $status)")
  else
    printf '==> [%s] done in %d s\n' "$id" "$took" >&2
  fi
}

PIXART_1024=configs/pixart_sigma_xl2_1024.py
PIXART_2K=configs/pixart_sigma_xl2_2k.py
# 2K with KV compression: 2x2 `conv` in blocks 14-27 (BENCHMARKS.md, issue 5's command list)
KV=(--config.model.kv_compress=conv
    "--config.model.kv_compress_layers=(14,15,16,17,18,19,20,21,22,23,24,25,26,27)")

# ## PixArt forward: jdit vs diffusers (issue 2)
section "PixArt forward: jdit vs diffusers (issue 2)"
run cpu bench_forward bench forward --repeats 9

# ## Compile time of full PixArt-XL/2 (issue 2)
section "Compile time of full PixArt-XL/2 (issue 2)"
run cpu bench_compile bench compile

# ## Sampling loop overhead (issue 3)
section "Sampling loop overhead (issue 3)"
run cpu bench_sample bench sample

# ## Training step: jdit vs diffusers + torch (issue 4), first measurement
section "Training step: jdit vs diffusers + torch (issue 4), first measurement"
run cpu bench_train_repeats5 bench train --repeats 5

# ### Training step, second measurement, with the machine's ceiling (session 5)
section "Training step, second measurement, with the machine's ceiling (session 5)"
run cpu bench_train_repeats7 bench train --repeats 7

# ## `shapes_tiny` recipe tuning (issue 4): the status line (run M against the bars). The table
# rows (exp1-3, A-M) are `jdit train` + `jdit eval` runs of recipe variants, not repeated here.
section "shapes_tiny recipe tuning (issue 4): status"
run cpu bars_shapes_tiny bench bars shapes_tiny

# ## `digits_tiny` (issue 4)
section "digits_tiny (issue 4)"
run cpu bars_digits_tiny bench bars digits_tiny

# ## Pods without the pod: `jdit aot` (issue 5): the two commands listed there, i.e. the XLA
# attention row of the PixArt-Σ 1024 table (v5p-64: largest batch 30, roofline at batch 30).
# Pallas flash attention is now the default for model-only configs, so the row needs
# --config.model.attention_impl=xla (as BENCHMARKS.md's "bar" paragraph says).
section "Pods without the pod: jdit aot (issue 5): PixArt-Σ 1024, v5p-64, XLA attention"
run tpu aot_pixart1024_v5p64_xla_maxbatch aot --config "$PIXART_1024" --topology v5p:4x4x4 \
  --max-batch --batch 4 --scan-layers on --config.model.attention_impl=xla
run tpu aot_pixart1024_v5p64_xla_batch30 aot --config "$PIXART_1024" --topology v5p:4x4x4 \
  --batch 30 --config.model.attention_impl=xla

# ## Pallas kernels vs the XLA attention they replace (issue 6): the kernel table
section "Pallas kernels vs the XLA attention they replace (issue 6): kernels on v5e"
run tpu bench_kernels_v5e bench kernels --topology v5e:2x2

# ## Pallas kernels vs the XLA attention they replace (issue 6): CPU, the XLA paths
section "Pallas kernels vs the XLA attention they replace (issue 6): CPU attention"
run cpu bench_attention bench attention --repeats 8

# ## Pallas kernels vs the XLA attention they replace (issue 6): PixArt-Σ XL/2 at 1024 px, FSDP
# over every chip, Pallas flash rows (the XLA row is above, under issue 5). Two compiles per row:
# the largest per-chip batch with the blocks scanned, then the unrolled compile at the row's batch.
section "Pallas kernels vs the XLA attention (issue 6): PixArt-Σ 1024, Pallas flash, v5p-64"
run tpu aot_pixart1024_v5p64_maxbatch aot --config "$PIXART_1024" --topology v5p:4x4x4 \
  --max-batch --batch 4 --scan-layers on
# the bar command (8 examples per chip by default): roofline_mfu_bound 1.00
run tpu aot_pixart1024_v5p64_bar aot --config "$PIXART_1024" --topology v5p:4x4x4
section "Pallas kernels vs the XLA attention (issue 6): PixArt-Σ 1024, Pallas flash, v5e-16"
run tpu aot_pixart1024_v5e16_maxbatch aot --config "$PIXART_1024" --topology v5e:4x4 \
  --max-batch --batch 4 --scan-layers on
run tpu aot_pixart1024_v5e16_batch4 aot --config "$PIXART_1024" --topology v5e:4x4 --batch 4
section "Pallas kernels vs the XLA attention (issue 6): PixArt-Σ 1024, Pallas flash, v6e-16"
run tpu aot_pixart1024_v6e16_maxbatch aot --config "$PIXART_1024" --topology v6e:4x4 \
  --max-batch --batch 4 --scan-layers on
run tpu aot_pixart1024_v6e16_batch8 aot --config "$PIXART_1024" --topology v6e:4x4 --batch 8

# ## Pallas kernels vs the XLA attention they replace (issue 6): PixArt-Σ XL/2 at 2K with KV
# compression (2x2 conv in blocks 14-27) and Pallas flash attention, FSDP over every chip
section "Pallas kernels vs the XLA attention (issue 6): PixArt-Σ 2K + KV compression, v5e-16"
run tpu aot_pixart2k_kv_v5e16_maxbatch aot --config "$PIXART_2K" --topology v5e:4x4 \
  --max-batch --scan-layers on "${KV[@]}"
run tpu aot_pixart2k_kv_v5e16_batch1 aot --config "$PIXART_2K" --topology v5e:4x4 --batch 1 \
  "${KV[@]}"
section "Pallas kernels vs the XLA attention (issue 6): PixArt-Σ 2K + KV compression, v6e-16"
run tpu aot_pixart2k_kv_v6e16_maxbatch aot --config "$PIXART_2K" --topology v6e:4x4 \
  --max-batch --scan-layers on "${KV[@]}"
run tpu aot_pixart2k_kv_v6e16_batch2 aot --config "$PIXART_2K" --topology v6e:4x4 --batch 2 \
  "${KV[@]}"
section "Pallas kernels vs the XLA attention (issue 6): PixArt-Σ 2K + KV compression, v5p-64"
run tpu aot_pixart2k_kv_v5p64_maxbatch aot --config "$PIXART_2K" --topology v5p:4x4x4 \
  --max-batch --scan-layers on "${KV[@]}"
run tpu aot_pixart2k_kv_v5p64_batch17 aot --config "$PIXART_2K" --topology v5p:4x4x4 --batch 17 \
  "${KV[@]}"

# ## Pallas kernels vs the XLA attention they replace (issue 6): sequence parallelism at 2K,
# v5p-64 as 16-way FSDP x 4-way context, XLA attention, unrolled compiles (one per table row)
section "Pallas kernels vs the XLA attention (issue 6): 2K sequence parallelism on v5p-64"
run tpu aot_pixart2k_v5p64_context4 aot --config "$PIXART_2K" --topology v5p:4x4x4 --batch 1 \
  --mesh data=1,fsdp=16,tensor=1,context=4 --config.model.attention_impl=xla
run tpu aot_pixart2k_kv_v5p64_context4 aot --config "$PIXART_2K" --topology v5p:4x4x4 \
  --batch 1 --mesh data=1,fsdp=16,tensor=1,context=4 --config.model.attention_impl=xla "${KV[@]}"

# ## SANA block vs PixArt block on CPU (issue 7)
section "SANA block vs PixArt block on CPU (issue 7)"
run cpu bench_scaling bench scaling --repeats 3

# ## `shapes_tiny_linear` (issue 7): `jdit train` + `jdit eval` runs, not repeated here.

# ## SANA-1.6B on v5e-16 (issue 7): one or two compiles per table row
section "SANA-1.6B on v5e-16 (issue 7): 1024 px"
run tpu aot_sana1600m_1024_v5e16_maxbatch aot --config configs/sana_1600m_1024.py \
  --topology v5e:4x4 --max-batch --batch 8 --scan-layers on
run tpu aot_sana1600m_1024_v5e16_batch15 aot --config configs/sana_1600m_1024.py \
  --topology v5e:4x4 --batch 15
section "SANA-1.6B on v5e-16 (issue 7): 4K, FSDP over 16 (batch 1 does not fit)"
run nofit aot_sana1600m_4k_v5e16_batch1 aot --config configs/sana_1600m_4k.py \
  --topology v5e:4x4 --batch 1 --scan-layers on
section "SANA-1.6B on v5e-16 (issue 7): 4K, FSDP 4 x context 4"
run tpu aot_sana1600m_4k_v5e16_context4_maxbatch aot --config configs/sana_1600m_4k.py \
  --topology v5e:4x4 --mesh data=1,fsdp=4,tensor=1,context=4 --max-batch --scan-layers on
run tpu aot_sana1600m_4k_v5e16_context4_batch1 aot --config configs/sana_1600m_4k.py \
  --topology v5e:4x4 --mesh data=1,fsdp=4,tensor=1,context=4 --batch 1

# ## LiT: a linear student distilled from a short PixArt run (issue 7): `jdit train` / the test
# tests/models/test_lit_adherence.py, not repeated here.

# ## Text-to-image pipeline: jdit vs diffusers (issue 8)
section "Text-to-image pipeline: jdit vs diffusers (issue 8)"
run cpu bench_pipeline bench pipeline

# ## AutoencoderKL tiled decoding (issue 8): the first table (blended tiles vs untiled) comes
# from the random VAEs of tests/autoencoders, not from a `jdit bench` command.
# ### Exact tiles: `decode_tiled_exact` (session 5): the CPU table, then the TPU (v5e) table
section "Exact tiles: decode_tiled_exact (session 5): CPU"
run cpu bench_tiling bench tiling
section "Exact tiles: decode_tiled_exact (session 5): SDXL VAE on one v5e chip"
run tpu bench_tiling_v5e bench tiling --topology v5e:2x2

# ## PixArt-Σ 1024 pipeline on v5e-8: `jdit aot --pipeline` (issue 8): the search (rows 2-4 of
# the table), then the batch-1 row, which the search starting at 2 does not compile
section "PixArt-Σ 1024 pipeline on v5e-8: jdit aot --pipeline (issue 8)"
run tpu aot_pipeline_pixart_sigma_1024_v5e8_maxbatch aot --pipeline pixart_sigma_1024 \
  --topology v5e:2x4 --max-batch --batch 2
run tpu aot_pipeline_pixart_sigma_1024_v5e8_batch1 aot --pipeline pixart_sigma_1024 \
  --topology v5e:2x4 --batch 1

# ## `jdit cache` throughput against its encoders (issue 18)
section "jdit cache throughput against its encoders (issue 18)"
run cpu bench_cache bench cache

# ## Feature caching on v5e-8 (issue 18): the search, then the batch-1 reference
section "Feature caching on v5e-8: jdit aot --cache (issue 18)"
run tpu aot_cache_sdxl_t5xxl_1024_v5e8_maxbatch aot --cache sdxl_t5xxl_1024 --topology v5e:2x4 \
  --max-batch --batch 2
run tpu aot_cache_sdxl_t5xxl_1024_v5e8_batch1 aot --cache sdxl_t5xxl_1024 --topology v5e:2x4 \
  --batch 1

# ## LoRA against full fine-tuning on v5e (issue 19): the largest per-chip batch of each
section "LoRA against full fine-tuning on v5e (issue 19)"
run tpu aot_lora_sigma_1024_v5e8 aot --config configs/pixart_sigma_xl2_1024.py --topology v5e:2x4 \
  --max-batch --scan-layers on --batch 4 --config.lora.rank=16
run tpu aot_full_sigma_1024_v5e8 aot --config configs/pixart_sigma_xl2_1024.py --topology v5e:2x4 \
  --max-batch --scan-layers on --batch 2
run tpu aot_lora_sana_1600m_v5e4 aot --config configs/sana_1600m_1024.py --topology v5e:2x2 \
  --max-batch --scan-layers on --batch 4 --config.lora.rank=16
run tpu aot_full_sana_1600m_v5e4 aot --config configs/sana_1600m_1024.py --topology v5e:2x2 \
  --max-batch --scan-layers on --batch 2

# ## LiT: a linear student distilled from a short PixArt run (issue 7)
section "LiT: a linear student distilled from a short PixArt run (issue 7)"
run cpu bench_lit bench lit

# ## EasyControl's cache (issue 20): a sampling step with it and without, and the TPU memory
section "EasyControl's cache: a sampling step with it and without (issue 20)"
run cpu bench_control bench control
run cpu bench_control_half bench control --condition-latent 16
run tpu aot_pipeline_sigma_1024_control_cached aot --pipeline pixart_sigma_1024 \
  --topology v5e:2x4 --batch 1 --control cached
run tpu aot_pipeline_sigma_1024_control_uncached aot --pipeline pixart_sigma_1024 \
  --topology v5e:2x4 --batch 1 --control uncached

if [[ $SELECTED -eq 0 ]]; then
  echo "$0: no command matches --only '$ONLY'" >&2
  exit 2
fi
if [[ $DRY_RUN -eq 1 ]]; then
  exit 0
fi
if [[ ${#FAILED[@]} -gt 0 ]]; then
  printf '\n%d of %d command(s) failed:\n' "${#FAILED[@]}" "$SELECTED" >&2
  printf '  %s\n' "${FAILED[@]}" >&2
  exit 1
fi
printf '\nall %d command(s) done%s\n' "$SELECTED" "${OUT:+; reports in $OUT}" >&2

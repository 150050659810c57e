#!/usr/bin/env bash
# The GPU paths in one script (about 5 minutes on one GPU): a torchrun --nproc_per_node=1 training over NCCL,
# bf16 (with data.gpu_augment) and fp16 (GradScaler) steps, kill -9 mid-run and an exact resume on the GPU,
# `ivpt eval` under torchrun, train.compile, and the speed report: `ivpt bench --device cuda --amp bf16` (and fp32)
# at the paper config (ViT-B/14-reg4, 518 px, batch 16; with --profile, and with --compile) and ViT-S/14 at 224 px.
#
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine
#   DEVICE=cpu TINY=1 bash benchmarks/gpu_check.sh   # the same steps on CPU (gloo), a dry run of the script
#
# It prints one "check ..." line per step (a failed step prints its log's tail and "check NAME: FAILED"), runs every
# step whatever failed before, and exits non-zero when any failed. COMPILE=0 skips the
# train.compile step (on by default on CUDA; on CPU Inductor needs minutes, so the dry run skips it unless
# COMPILE=1). BENCH=0 skips the speed report (for a GPU shared with other work, where timings mean nothing).
# The bench reports land in $WORK/bench_*/bench.md.
set -euo pipefail
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-$(mktemp -d)}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
PY=${PYTHON:-python3}
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1)
COMPILE=${COMPILE:-$([ "$DEVICE" = cpu ] && echo 0 || echo 1)}  # Inductor needs minutes on CPU

"$PY" - <<'PY'
import torch
print("check env: torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY
"$PY" -m ivpt.cli synth "$WORK/pw" --classes 4 --per-class 24 --size 112 --seed 0 --no-progress >/dev/null
ARGS=(model.backbone=vit_small_patch14_reg4_dinov2 model.weights=random model.img_size=112 model.num_classes=4
      model.n_pro=9,7,5 "data.root=$WORK/pw" data.num_workers=2 data.resize=112 "train.device=$DEVICE"
      optim.batch_size=8 optim.min_steps=0 train.log_every=1)
if [ -n "${TINY:-}" ]; then ARGS+=("model.backbone_kwargs={depth: 4, embed_dim: 64, num_heads: 2}"); fi

FAILED=()
step() {  # name, then a function and its arguments: run it, record a failure, carry on
  local name=$1; shift
  "$@" || { echo "check $name: FAILED"; FAILED+=("$name"); }
}
log_tail() { tail -30 "$1"; return 1; }

torchrun_train() {  # amp: 4 steps under torchrun --nproc_per_node=1 (NCCL on CUDA)
  local amp=$1 extra=()
  [ "$amp" = bf16 ] && extra=(data.gpu_augment=true)  # the device-side augmentation under NCCL
  "${TORCHRUN[@]}" -m ivpt.cli train "${ARGS[@]}" "optim.amp=$amp" "${extra[@]}" optim.epochs=1 train.max_steps=4 \
      --out "$WORK/$amp" --no-progress > "$WORK/$amp.log" 2>&1 || log_tail "$WORK/$amp.log" || return 1
  "$PY" - "$WORK/$amp" "$amp" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/metrics.json"))
assert m["steps"] == 4, m
print(f"check torchrun nproc 1 ({sys.argv[2]}): 4 steps, metrics.json written, test top-1 {m['test_top1']:.3f}")
PY
}
step torchrun_bf16 torchrun_train bf16
step torchrun_fp16 torchrun_train fp16

# kill -9 after step 3 of 10, resume, compare with an uninterrupted run (deterministic algorithms, fp32)
kill_resume() {
  local EXACT=("${ARGS[@]}" optim.epochs=2 train.ckpt_every_steps=1 train.deterministic=true optim.amp=none) pid
  export CUBLAS_WORKSPACE_CONFIG=:4096:8
  "$PY" -m ivpt.cli train "${EXACT[@]}" --out "$WORK/full" --no-progress > "$WORK/full.log" 2>&1 \
      || log_tail "$WORK/full.log" || return 1
  "$PY" -m ivpt.cli train "${EXACT[@]}" --out "$WORK/killed" --no-progress > "$WORK/killed.log" 2>&1 &
  pid=$!
  "$PY" - "$WORK/killed/last.pt" <<'PY'
import sys, time, torch
deadline = time.time() + 240
while time.time() < deadline:
    try:
        if torch.load(sys.argv[1], map_location="cpu", weights_only=True)["step"] >= 3:
            break
    except Exception:  # not written yet, or being replaced
        pass
    time.sleep(0.05)
PY
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  "$PY" -m ivpt.cli train --resume "$WORK/killed" --no-progress > "$WORK/resume.log" 2>&1 \
      || log_tail "$WORK/resume.log" || return 1
  "$PY" - "$WORK" <<'PY'
import sys, torch
w = sys.argv[1]
a = torch.load(f"{w}/full/last.pt", map_location="cpu", weights_only=True)
b = torch.load(f"{w}/killed/last.pt", map_location="cpu", weights_only=True)
diff = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])
print(f"check kill -9 + resume: step {b['step']} == {a['step']}, max |param difference| {diff:.3g}")
assert a["step"] == b["step"] and diff == 0, "the resumed run is not bit-identical to the uninterrupted one"
PY
}
step kill_resume kill_resume

torchrun_eval() {
  "${TORCHRUN[@]}" -m ivpt.cli eval "$WORK/bf16/best" --data "$WORK/pw" --out "$WORK/eval" --no-progress \
      "train.device=$DEVICE" > "$WORK/eval.log" 2>&1 || log_tail "$WORK/eval.log" || return 1
"$PY" - "$WORK/eval/eval.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"check ivpt eval under torchrun (nproc 1): top-1 {r['top1']:.1f}, consistency {r['consistency']:.1f}, "
      f"NMI {r['nmi']:.1f}, eval.amp {r['protocol']['amp']}")
PY
}
step torchrun_eval torchrun_eval

compiled_train() {
  "$PY" -m ivpt.cli train "${ARGS[@]}" optim.amp=bf16 train.compile=true optim.epochs=1 train.max_steps=3 \
      --out "$WORK/compiled" --no-progress > "$WORK/compiled.log" 2>&1 || log_tail "$WORK/compiled.log" || return 1
  local fallback
  fallback=$(grep -c "train.compile: torch.compile failed" "$WORK/compiled.log" || true)
  echo "check train.compile: 3 steps trained, $([ "$fallback" = 0 ] && echo compiled || echo "fell back to eager: $(grep -m1 'train.compile' "$WORK/compiled.log")")"
}
if [ "$COMPILE" = 1 ]; then step compile compiled_train; fi

if [ "${BENCH:-1}" = 1 ]; then
# Speed: ratios, peak memory, the training DataLoader's images/s (CPU and gpu_augment paths) and the
# projected paper recipe, in one run per setting.
if [ -n "${TINY:-}" ]; then
  PAPER=(--backbone vit_small_patch14_reg4_dinov2 --img-size 56 --batch 2 --n-pro 5,4,3 --loader-images 8
         --loader-image-size 64 --workers 2 "--backbone-kwargs={\"depth\": 4, \"embed_dim\": 64, \"num_heads\": 2}")
  SMALL=("${PAPER[@]}")
else
  PAPER=(--backbone vit_base_patch14_reg4_dinov2 --img-size 518 --batch 16 --loader-images 1024)
  SMALL=(--backbone vit_small_patch14_dinov2 --img-size 224 --batch 64 --loader-images 1024)
fi
bench() {  # name, then ivpt bench arguments
  local name=$1; shift
  "$PY" -m ivpt.cli bench --quick --device "$DEVICE" "$@" --out "$WORK/bench_$name" > "$WORK/bench_$name.log" 2>&1 \
      || log_tail "$WORK/bench_$name.log" || return 1
  "$PY" - "$WORK/bench_$name/bench.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ivpt = r["groups"][0]["models"]["ivpt"]
print(f"check bench {sys.argv[2]} ({r['settings']['backbone']}, {r['settings']['img_size']} px, batch "
      f"{r['settings']['batch']}, {r['settings']['amp']}): ivpt train peak {ivpt.get('train_peak_mb') or 0:.0f} MB, "
      f"host syncs per train step {ivpt.get('train_host_syncs', '-')}, per eval forward {ivpt.get('forward_host_syncs', '-')}")
for k, t in r["targets"].items():
    bound = f"<= {t['max']}" if "max" in t else f">= {t['min']}"
    measured = "-" if t["measured"] is None else f"{t['measured']:.3g}"
    print(f"  {k}: {measured} (target {bound}) {'met' if t['met'] else 'MISSED'}")
for path in ("cpu", "gpu_augment"):
    if r.get("loader") and path in r["loader"]:
        syncs = r["loader"][path].get("host_syncs_per_batch")
        print(f"  loader {path}: {r['loader'][path]['images_per_s']:.0f} images/s"
              + ("" if syncs is None else f", {syncs} host syncs per device-augmented batch"))
if r.get("projection"):
    print(f"  projection: {r['projection']['formula']}")
PY
}
step bench_paper_bf16 bench paper_bf16 --amp bf16 --profile "${PAPER[@]}"
step bench_paper_fp32 bench paper_fp32 --amp none --no-loader "${PAPER[@]}"
if [ "$COMPILE" = 1 ]; then  # the step with fewer launches
  step bench_paper_bf16_compiled bench paper_bf16_compiled --amp bf16 --compile --no-loader --no-memory "${PAPER[@]}"
fi
step bench_vits_bf16 bench vits_bf16 --amp bf16 "${SMALL[@]}"
fi

if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check: ${#FAILED[@]} failed: ${FAILED[*]} ($WORK)"
  exit 1
fi
echo "gpu_check: all checks passed ($WORK)"

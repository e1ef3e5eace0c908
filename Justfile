# vitup recipes: `just --list`. Run them inside the virtual environment made by `just install`.
set shell := ["bash", "-euo", "pipefail", "-c"]

default:
    @just --list

# Install vitup with the dev tools (pytest, ruff, just, xarray, s3fs, moto) into the active environment
install:
    python -m pip install -e ".[dev]"

# The whole suite, slow and integration tests included (what CI runs)
test *args:
    python -m pytest {{args}}

# Only the fast tests
test-fast:
    python -m pytest -m "not slow and not integration"

# Lint and format check (what CI runs)
lint:
    ruff check .
    ruff format --check .

# Format and fix in place
fmt:
    ruff format .
    ruff check --fix .

# The whole pipeline on CPU in a few minutes (random-init shrunk backbone: a demo, not quality)
demo out="out/quickstart":
    bash examples/quickstart.sh {{out}}

# Every benchmark (faithfulness takes ~10 minutes on 2 cores)
bench: bench-extract bench-writer bench-faithfulness bench-probe

# Extraction throughput and memory (model-only vs end-to-end, R=224 vs 448)
bench-extract *args:
    python benchmarks/extract_throughput.py {{args}}

# Store writer MB/s per codec and writer threads vs zarr's own pipeline, beside the rate a GPU makes (JSON in benchmarks/results)
bench-writer *args:
    python benchmarks/writer_throughput.py {{args}}

# Does training make ViT-Up closer to the teacher than bilinear? (3 seeds, JSON in benchmarks/results)
bench-faithfulness *args:
    python benchmarks/faithfulness.py {{args}}

# Working memory of the field's upsamplers at 224/448/896 outputs from a 448 input (banded, exact; JSON in benchmarks/results)
bench-memory *args:
    python benchmarks/memory.py {{args}}

# Runtime and memory of every upsampler at 56-448 outputs (Table 9 style; JSON in benchmarks/results)
bench-runtime *args:
    python benchmarks/runtime.py {{args}}

# On a CUDA machine: the full DINOv3-S+ leaderboard (every upsampler x voc, ade20k, cityscapes, cocostuff, nyu, spair; 3 seeds, 448^2), after a timing pass that prints each cell's expected time on this GPU
leaderboard-gpu data out="lb-dinov3_splus" *args:
    python examples/leaderboard_gpu.py --data-root {{data}} --out {{out}} {{args}}

# On a CUDA machine: the paper's Table 9 setting (bf16), eager, then torch.compile'd; then end-to-end extraction with the published ViT-Up at 224^2/448^2 (JSON in benchmarks/results)
bench-gpu:
    python benchmarks/runtime.py --device cuda --precision bf16
    python benchmarks/runtime.py --device cuda --precision bf16 --compile --upsamplers vitup,uplift,loftup
    python benchmarks/extract_throughput.py --device cuda --checkpoint vit-up:dinov3_splus --count 256 --res 224,448 --workers 8 --out benchmarks/results/extract_cuda.json

# Probe training streamed from a store vs held in memory
bench-probe *args:
    python benchmarks/probe_streaming.py {{args}}

# ViT-Up decode, vitup vs the reference on the same weights (src: your clone of krispinwandel/vit-up)
bench-reference src *args:
    OMP_NUM_THREADS=1 python benchmarks/decode_vs_reference.py --reference-src {{src}} {{args}}

# What CI runs, in a fresh virtual environment
ci:
    bash .ci/run

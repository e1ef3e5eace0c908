"""ViT-Up decode, vitup against the reference implementation: same weights, same cache, same queries.

The reference (github krispinwandel/vit-up) is never vendored: point ``--reference-src`` at your own
clone; its ``vit_up`` package is imported from there at run time (it needs torch and torchvision only for
the modules used here, not its omegaconf/cv2/lightning wrapper). The steps:

1. vitup's ViT-Up is built on a random-init backbone (``load_backbone(..., pretrained="none")``, the
   full DINOv3-S+ shape by default) with LoRA, every zero-initialised part (FiLM output, LoRA B) moved
   off zero; one random image is encoded once (hidden states at the 7 taps and the 224 x 224 query
   grid). Random weights are fine: the time does not depend on the values.
2. The same weights go into the reference's own modules (``ViTUp``, ``ViTUpBlock``, ``CrossAttention``,
   ``SimpleFiLMV2``, ... built as its ``configs/runs/dinov3_splus.yaml`` says) through
   ``official_state``, vitup's writer of the official release layout, loaded ``strict``.
3. Both get the same cached states and query grid, and decode the same queries. A short pre-check on a
   few queries must agree before anything is timed; afterwards the last timed run's output of each cell is compared
   on a strided subset of its queries (max abs diff printed).
4. For each (implementation, output R) cell, a fresh child process: warm-up on one chunk, then the full
   decode of the R x R pixel-centre grid (the last level, as both return it by default), in chunks of
   112^2 queries for both (the reference's chunk loop is that of its ``ViTUpPL.forward``), repeated;
   the median is reported. Peak resident memory is sampled during the timed runs: the growth over the
   child's resident memory after setup (model, cache and query coordinates in memory), and the total.
5. ``--allocator tuned`` applies ``vitup_cli.allocator.tune_malloc`` (what the ``vitup`` command does at
   start) in both children alike; the default measures glibc's malloc as it comes.

    python benchmarks/decode_vs_reference.py --reference-src ~/src/vit-up
    python benchmarks/decode_vs_reference.py --reference-src ~/src/vit-up --outputs 224,448 --repeats 5 \\
        --threads 4

Writes ``benchmarks/results/decode_vs_reference_cpu.json`` (``--out``) with the machine, the thread
count and the reference commit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "decode_vs_reference_cpu.json"
MIB = 2**20


class _RssSampler:
    """Peak resident memory of this process, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.02) -> None:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            self._stop.wait(interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    """Resident memory of this process in bytes."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    import psutil

    return psutil.Process().memory_info().rss


def _fail(message: str) -> None:
    """Bad input: one line on stderr, exit status 2 (as the vitup CLI does)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def _import_reference(src: Path) -> dict[str, Any]:
    """The reference's modules, imported from ``src``; a one-line exit naming what is missing."""
    if not (src / "vit_up" / "model" / "vit_up.py").is_file():
        _fail(
            f"--reference-src {src}: no vit_up/model/vit_up.py there; "
            "point it at a clone of github.com/krispinwandel/vit-up"
        )
    sys.path.insert(0, str(src))
    names = {
        "vit_up.layers.continuous_rope": ["ContinuousRoPE2D"],
        "vit_up.layers.cross_attention": ["CrossAttention"],
        "vit_up.layers.film": ["SimpleFiLMV2"],
        "vit_up.layers.mlp": ["SimpleMLP"],
        "vit_up.layers.pos_enc": ["FourierPositionalEncoding"],
        "vit_up.layers.query_encoder": ["QueryEncoder"],
        "vit_up.model.vit_up": ["ViTUp", "ViTUpBlock"],
    }
    found: dict[str, Any] = {}
    try:
        for module, attrs in names.items():
            mod = importlib.import_module(module)
            found.update({a: getattr(mod, a) for a in attrs})
    except (ImportError, AttributeError) as exc:
        _fail(
            f"--reference-src {src}: importing the reference's vit_up modules failed ({exc}); "
            "needed: a full clone of github.com/krispinwandel/vit-up, and torch + torchvision here"
        )
    return found


def _reference_commit(src: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


# -- the models ---------------------------------------------------------------------------------------
def _vitup_model(args: argparse.Namespace) -> Any:
    """vitup's ViT-Up on a random-init backbone with LoRA; deterministic for a given seed."""
    import torch

    from vitup_cli.backbones import load_backbone, parse_overrides
    from vitup_cli.models import ViTUp, ViTUpConfig

    torch.manual_seed(args.seed)
    bb = load_backbone(args.backbone, pretrained="none", overrides=parse_overrides(args.backbone_args))
    bb.add_lora()
    model = ViTUp(bb, ViTUpConfig(input_tokens=args.input_size // bb.patch_size)).eval()
    return model


def _randomise(model: Any, seed: int) -> None:
    """Zero-initialised parts (FiLM output layer, LoRA B) off zero, so the whole network is at work."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ("film.2" in name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _reference_model(ref: dict[str, Any], dim: int, heads: int, taps: list[int], query_img: int) -> Any:
    """The reference's ViT-Up modules, built as its configs/runs/dinov3_splus.yaml builds them."""
    from torch import nn

    def block() -> Any:
        return ref["ViTUpBlock"](
            transition_mlp=ref["SimpleMLP"]([dim, 2 * dim, dim], input_layernorm=True, use_residual=True),
            cross_attention=ref["CrossAttention"](dim=dim, num_heads=heads, cross_attn_window_size=32, qkv_bias=True),
            featx=ref["SimpleFiLMV2"](
                input_module=nn.LayerNorm(dim),
                gamma_beta_mlp=ref["SimpleMLP"]([66, dim, 2 * dim], zero_init_last=True),
                post_mlp=ref["SimpleMLP"]([dim, 4 * dim, dim], input_layernorm=True),
            ),
            mlp=ref["SimpleMLP"]([dim, 4 * dim, dim]),
            dim=dim,
            dim_h=dim,
        )

    return ref["ViTUp"](
        layer_indices=taps,
        query_embedding=ref["QueryEncoder"](img_in_size=query_img, layer_index=0),
        rel_pos_enc=ref["FourierPositionalEncoding"](num_bands=16, max_resolution=10.0),
        vit_up_blocks=nn.ModuleList([block() for _ in taps[1:]]),
        decoder_mlp=nn.ModuleList([ref["SimpleMLP"]([dim, dim], input_layernorm=True) for _ in taps]),
        q_rope_embeddings=ref["ContinuousRoPE2D"](dim=dim // heads, base=100.0, scale=2 * math.pi),
    ).eval()


def _load_reference_weights(model: Any, official: dict[str, Any]) -> None:
    """The upsampler part of an official-layout state dict into the reference modules; every key used."""
    wanted = {k: v for k, v in official.items() if not k.startswith("backbone.")}
    missing, unexpected = model.load_state_dict(wanted, strict=False)
    if missing or unexpected:
        raise SystemExit(
            f"weights do not fit the reference modules: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


# -- the two decoders -----------------------------------------------------------------------------------
class _VitupDecoder:
    def __init__(self, model: Any, states: list[Any], query_grid: Any, chunk: int) -> None:
        from vitup_cli.models.vitup import ViTUpCache

        self.model, self.chunk = model, chunk
        self.cache = ViTUpCache(states=states, query_grid=query_grid)

    def __call__(self, xy: Any) -> Any:
        return self.model.decode(self.cache, xy, chunk=self.chunk)[0]


class _ReferenceDecoder:
    def __init__(self, model: Any, states: list[Any], query_grid: Any, chunk: int) -> None:
        self.model, self.chunk = model, chunk
        self.cache = {
            "layer_hidden_states_hwc": [s.permute(0, 2, 3, 1).contiguous() for s in states],
            "query_embedding_cache_data": {"last_hidden_state_hwc": query_grid.permute(0, 2, 3, 1).contiguous()},
        }

    def __call__(self, xy: Any) -> Any:
        import torch

        # the reference's chunk loop (vit_up/training/lightning_module.py, ViTUpPL.forward): last level only
        parts = []
        for start in range(0, xy.shape[1], self.chunk):
            out = self.model(
                pixel_values=None, q_xy_normalized=xy[:, start : start + self.chunk], cache_data=self.cache
            )
            parts.append(out[-1])
        return torch.cat(parts, dim=1)


def _decoder(impl: str, args: argparse.Namespace, tensors: dict[str, Any], meta: dict[str, Any]) -> Any:
    states = [tensors[f"cache/state{i}"] for i in range(len(meta["taps"]))]
    query_grid = tensors["cache/query_grid"]
    official = {k.removeprefix("weights/"): v for k, v in tensors.items() if k.startswith("weights/")}
    if impl == "vitup":
        from vitup_cli.hub.official import load_official_state

        model = _vitup_model(args)
        load_official_state(model, official, "benchmark weights")
        return _VitupDecoder(model, states, query_grid, args.chunk)
    ref = _import_reference(args.reference_src)
    model = _reference_model(ref, meta["dim"], meta["heads"], meta["taps"], meta["query_img"])
    _load_reference_weights(model, official)
    return _ReferenceDecoder(model, states, query_grid, args.chunk)


def _grid(res: int) -> Any:
    from vitup_cli.models.base import grid_xy

    return grid_xy(res, res)[None]  # (1, R*R, 2)


# -- child: one (implementation, output) cell -----------------------------------------------------------
def _child(args: argparse.Namespace, impl: str, res: int) -> dict[str, Any]:
    if args.allocator == "tuned":
        from vitup_cli.allocator import tune_malloc

        if not tune_malloc():
            sys.exit("--allocator tuned: glibc's mallopt is not available here")
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    meta = json.loads((work / "meta.json").read_text())
    tensors = load_file(str(work / "inputs.safetensors"))
    with torch.inference_mode():
        decode = _decoder(impl, args, tensors, meta)
        del tensors
        xy = _grid(res)
        decode(xy[:, : args.chunk])  # warm-up: one chunk
        base = _rss()
        times, cpu_times = [], []
        with _RssSampler() as sampler:
            for i in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                out = decode(xy)
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
                if i < args.repeats - 1:
                    del out  # each run's output is part of its own peak, not the next run's
        save_file({"out": out[0, :: args.stride].contiguous()}, str(work / f"out_{impl}_{res}.safetensors"))
    cell = {
        "impl": impl,
        "res": res,
        "queries": res * res,
        "times_s": times,
        "median_ms": 1000 * statistics.median(times),
        "cpu_times_s": cpu_times,
        "cpu_median_ms": 1000 * statistics.median(cpu_times),
        "rss_setup_mib": base / MIB,
        "peak_rss_mib": sampler.peak / MIB,
        "peak_growth_mib": (sampler.peak - base) / MIB,
        "threads": torch.get_num_threads(),
    }
    (work / f"cell_{impl}_{res}.json").write_text(json.dumps(cell))
    return cell


# -- parent ---------------------------------------------------------------------------------------------
def _prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build vitup's model once, encode one random image, write weights + cache for the children, and
    check that both implementations agree on a few queries."""
    import torch
    from safetensors.torch import save_file

    from vitup_cli.hub.official import official_state

    model = _vitup_model(args)
    _randomise(model, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 2)
    image = torch.rand(1, 3, args.input_size, args.input_size, generator=gen)
    with torch.inference_mode():
        cache = model.encode(image)
    meta = {
        "dim": model.backbone.embed_dim,
        "heads": model.blocks[0].attn.num_heads,
        "taps": list(model.backbone.taps),
        "query_img": model.config.query_grid * model.backbone.patch_size,
        "tokens": list(cache.states[0].shape[-2:]),
    }
    tensors = {f"weights/{k}": v for k, v in official_state(model).items()}
    tensors.update({f"cache/state{i}": s.contiguous() for i, s in enumerate(cache.states)})
    tensors["cache/query_grid"] = cache.query_grid.contiguous()
    save_file(tensors, str(work / "inputs.safetensors"))
    (work / "meta.json").write_text(json.dumps(meta))

    # pre-check: a few hundred queries (random points, token centres and boundaries) through both
    ref = _import_reference(args.reference_src)
    official = {k.removeprefix("weights/"): v for k, v in tensors.items() if k.startswith("weights/")}
    reference = _reference_model(ref, meta["dim"], meta["heads"], meta["taps"], meta["query_img"])
    _load_reference_weights(reference, official)
    # k/8 for k = 0..8: the image edges, and on a 28-token grid every even k lies on a token boundary (a tie)
    edges = torch.stack(torch.meshgrid(torch.arange(9) / 8, torch.arange(9) / 8, indexing="ij"), -1).reshape(-1, 2)
    xy = torch.cat([torch.rand(1, 256, 2, generator=gen), edges[None]], 1)
    with torch.inference_mode():
        ours = _VitupDecoder(model, cache.states, cache.query_grid, args.chunk)(xy)
        theirs = _ReferenceDecoder(reference, cache.states, cache.query_grid, args.chunk)(xy)
    meta["precheck_queries"] = xy.shape[1]
    meta["precheck_max_abs_diff"] = float((ours - theirs).abs().max())
    meta["output_max_abs"] = float(theirs.abs().max())
    return meta


def _run_cell(args: argparse.Namespace, work: Path, impl: str, res: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", f"{impl}:{res}", "--workdir", str(work)]
    for key in ("reference_src", "backbone", "backbone_args", "input_size", "repeats", "threads", "chunk", "allocator"):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    cmd += ["--seed", str(args.seed), "--stride", str(args.stride)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"child {impl} R={res} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _machine(threads: int) -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": threads,
        "OMP_NUM_THREADS": str(threads),
    }


def _table(results: dict[int, dict[str, dict[str, Any]]], agree: dict[int, float]) -> list[str]:
    lines = [
        f"{'R':>5} {'queries':>7} {'vitup ms':>9} {'ref ms':>9} {'ratio':>5}  {'vitup cpu':>9} {'ref cpu':>9} "
        f"{'ratio':>5}  {'vitup MiB':>9} {'ref MiB':>8} {'ratio':>5}  {'vitup tot':>9} {'ref tot':>7}  {'max|diff|':>9}"
    ]
    for res, cell in results.items():
        v, r = cell["vitup"], cell["reference"]
        lines.append(
            f"{res:>5} {res * res:>7} {v['median_ms']:9.0f} {r['median_ms']:9.0f} "
            f"{v['median_ms'] / r['median_ms']:5.2f}  {v['cpu_median_ms']:9.0f} {r['cpu_median_ms']:9.0f} "
            f"{v['cpu_median_ms'] / r['cpu_median_ms']:5.2f}  {v['peak_growth_mib']:9.0f} {r['peak_growth_mib']:8.0f} "
            f"{v['peak_growth_mib'] / r['peak_growth_mib']:5.2f}  {v['peak_rss_mib']:9.0f} {r['peak_rss_mib']:7.0f}  "
            f"{agree[res]:9.1e}"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-src", type=Path, required=True, help="a clone of github.com/krispinwandel/vit-up")
    p.add_argument("--outputs", default="224,448", help="output resolutions R (R x R queries); the first is the base")
    p.add_argument("--repeats", type=int, default=3, help="timed full decodes per cell (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child (default 1: a shared box)")
    p.add_argument("--backbone", default="dinov3_s+")
    p.add_argument("--backbone-args", default=None, help="shape overrides, e.g. 'depth=6,embed_dim=192,num_heads=3'")
    p.add_argument("--input-size", type=int, default=448)
    p.add_argument("--chunk", type=int, default=112 * 112, help="queries per chunk, both implementations")
    p.add_argument(
        "--allocator",
        choices=("default", "tuned"),
        default="default",
        help="glibc malloc as it comes, or raised mmap/trim thresholds (what the vitup command sets) in both children",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stride", type=int, default=97, help="compare every N-th query of the timed outputs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON written")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.reference_src = args.reference_src.expanduser().resolve()

    if args.child is not None:
        impl, res = args.child.split(":")
        print(json.dumps(_child(args, impl, int(res))))
        return

    _import_reference(args.reference_src)  # fail fast, before building anything
    outputs = [int(r) for r in args.outputs.split(",")]
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        meta = _prepare(args, work)
        print(
            f"pre-check on {meta['precheck_queries']} queries: max |vitup - reference| = "
            f"{meta['precheck_max_abs_diff']:.2e} (outputs up to {meta['output_max_abs']:.2f}); "
            f"setup {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        results: dict[int, dict[str, dict[str, Any]]] = {}
        agree: dict[int, float] = {}
        for res in outputs:
            results[res] = {}
            for impl in ("vitup", "reference"):
                results[res][impl] = cell = _run_cell(args, work, impl, res)
                print(
                    f"  {impl:9} R={res}: {cell['median_ms']:.0f} ms wall, {cell['cpu_median_ms']:.0f} ms CPU, "
                    f"+{cell['peak_growth_mib']:.0f} MiB",
                    flush=True,
                )
                _report(args, meta, results, agree, outputs, complete=False)
            a = load_file(str(work / f"out_vitup_{res}.safetensors"))["out"]
            b = load_file(str(work / f"out_reference_{res}.safetensors"))["out"]
            agree[res] = float((a - b).abs().max())
            _report(args, meta, results, agree, outputs, complete=False)

    _report(args, meta, results, agree, outputs, complete=True)


def _report(
    args: argparse.Namespace,
    meta: dict[str, Any],
    results: dict[int, dict[str, dict[str, Any]]],
    agree: dict[int, float],
    outputs: list[int],
    complete: bool,
) -> None:
    """Write the JSON (after every cell, so an interrupted run keeps what it measured); the table at the end."""
    paired = [res for res in outputs if res in agree]  # both implementations measured and compared
    base = outputs[0]
    memory_ratio = {}
    for res in paired[1:] if base in agree else []:
        for impl in ("vitup", "reference"):
            growth = results[res][impl]["peak_growth_mib"] / results[base][impl]["peak_growth_mib"]
            total = results[res][impl]["peak_rss_mib"] / results[base][impl]["peak_rss_mib"]
            memory_ratio[f"{impl}_{res}/{base}"] = {"peak_growth": growth, "peak_rss": total}
    report = {
        "benchmark": "ViT-Up decode only, vitup vs the reference implementation, same weights and cache",
        "complete": complete,
        "weights": "random init (time does not depend on values); FiLM output and LoRA B moved off zero",
        "backbone": args.backbone,
        "backbone_args": args.backbone_args,
        "input_size": args.input_size,
        "tokens": meta["tokens"],
        "width": meta["dim"],
        "heads": meta["heads"],
        "taps": meta["taps"],
        "chunk": args.chunk,
        "allocator": {
            "default": "glibc malloc as it comes (large blocks mmap'd afresh on every allocation)",
            "tuned": "vitup_cli.allocator.tune_malloc() in both children, as the vitup command does at start",
        }[args.allocator],
        "repeats": args.repeats,
        "warmup": "one chunk per child",
        "timing": "wall-clock median_ms and process CPU time cpu_median_ms (with 1 thread, the CPU time is the "
        "work done; the wall time also counts waiting for the CPU on a shared machine)",
        "memory": "peak RSS sampled every 20 ms during the timed runs, per fresh child process; growth = over "
        "the RSS after setup (model, cache, query coordinates); the outputs (R*R x width float32) are included. "
        "Total peak RSS is not comparable across implementations: vitup's child also holds the random-init "
        "backbone its ViTUp is built on, the reference's only the upsampler modules",
        "machine": _machine(args.threads),
        "reference": {"src": "github.com/krispinwandel/vit-up", "commit": _reference_commit(args.reference_src)},
        "precheck": {"queries": meta["precheck_queries"], "max_abs_diff": meta["precheck_max_abs_diff"]},
        "results": [
            {
                **cell,
                "max_abs_diff_vs_reference": agree.get(res),
                "compared_queries": len(range(0, res * res, args.stride)),
            }
            for res in results
            for cell in results[res].values()
        ],
        "ratios": {
            str(res): {
                "time_vitup/reference": results[res]["vitup"]["median_ms"] / results[res]["reference"]["median_ms"],
                "cpu_time_vitup/reference": results[res]["vitup"]["cpu_median_ms"]
                / results[res]["reference"]["cpu_median_ms"],
                "memory_growth_vitup/reference": results[res]["vitup"]["peak_growth_mib"]
                / results[res]["reference"]["peak_growth_mib"],
            }
            for res in paired
        },
        "memory_vs_base_output": memory_ratio,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not complete:
        return
    print(
        f"ViT-Up decode, vitup vs reference: {args.backbone} shape (random init), {args.input_size} input "
        f"({meta['tokens'][0]}x{meta['tokens'][1]} tokens), chunk {args.chunk}, {args.threads} thread(s), "
        f"median of {args.repeats} after a one-chunk warm-up; ms = wall, cpu = process CPU time (steadier on a "
        "shared box); MiB = peak RSS growth over setup, tot = peak RSS"
    )
    for line in _table({res: results[res] for res in paired}, agree):
        print(line)
    for key, ratio in memory_ratio.items():
        impl, sizes = key.split("_", 1)
        res, base = sizes.split("/")
        print(
            f"{impl} memory at R={res} / R={base}: growth {ratio['peak_growth']:.2f}x, "
            f"total peak RSS {ratio['peak_rss']:.2f}x (goal <= 1.3)"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

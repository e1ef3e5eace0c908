import contextlib
from pathlib import Path

import pytest
import torch

from vitup_cli.backbones import load_backbone
from vitup_cli.models import ViTUp, ViTUpConfig

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 1}


def tiny_backbone(name: str = "dinov3_s", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return load_backbone(name, pretrained="none", overrides={**TINY, **overrides})


def tiny_vitup(name: str = "dinov3_s", seed: int = 0, lora: bool = True, **config):
    backbone = tiny_backbone(name, seed)
    if lora:
        backbone.add_lora()
    cfg = ViTUpConfig(**{"input_tokens": 4, "query_grid": 16, **config})
    torch.manual_seed(seed + 1)
    return ViTUp(backbone, cfg).eval()


def _randomise(model):
    """Move every zero-initialised part off zero so tests see the whole network at work."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "film" in name or "lora_B" in name:
                p.normal_(std=0.05)
    return model


@pytest.fixture
def images():
    return torch.rand(2, 3, 72, 88, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in ``tmp_path`` with the hub offline: only what a test places there resolves."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    return cache


def _place_in_cache(cache: Path, repo_id: str, filename: str, data: bytes = b"x") -> Path:
    """The Hugging Face cache layout: models--ORG--REPO/{refs/main, snapshots/<rev>/FILE}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    rev = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    target = repo / "snapshots" / rev / filename
    target.parent.mkdir(parents=True)
    target.write_bytes(data)
    return target


@pytest.fixture
def pca_spy(monkeypatch) -> list[list[torch.Tensor]]:
    """Copies of the maps of every ``viz.fit_joint_pca`` call (which still runs), in call order."""
    from vitup_cli import viz

    calls = []
    real = viz.fit_joint_pca

    def spy(maps, **kw):
        calls.append([m.clone() for m in maps])
        return real(maps, **kw)

    monkeypatch.setattr(viz, "fit_joint_pca", spy)
    return calls


@contextlib.contextmanager
def single_thread():
    """torch on one thread, as ``torchrun`` runs each worker (OMP_NUM_THREADS=1): a 1-process reference
    run then sums in the same order as each rank, so weights compare at float tolerance."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_line_error():
    """``check(result, *needles)``: ``result`` is a user error as ``vitup`` reports it (a ``VitupError``):
    exit code 2, no traceback, and one non-empty line of output, ``error: ...`` on stderr, holding every
    needle; it returns that line. ``result`` is a ``CliRunner`` result, or a ``VitupError`` raised by the
    library (checked as the line the CLI prints for it). ``alone=False``, for a run that fails midway:
    the lines it printed before may precede the error, which is still one line, the only and last
    ``error:`` line."""

    def check(result, *needles: str, alone: bool = True) -> str:
        if isinstance(result, BaseException):
            exit_code, output = getattr(result, "exit_code", None), f"error: {result}\n"
            stderr = output
        else:
            exit_code, output, stderr = result.exit_code, result.output, result.stderr
        assert exit_code == 2, output
        assert "Traceback" not in output, output
        lines = [line for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], output
        if alone:
            assert len(lines) == 1 and stderr.strip() == lines[0], (stderr, output)  # on stderr, alone
        else:
            assert stderr.strip().splitlines()[-1] == lines[-1], (stderr, output)  # on stderr
        for needle in needles:
            assert needle in lines[-1], (needle, lines[-1])
        return lines[-1]

    return check

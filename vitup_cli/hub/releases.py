"""Published upsampler weights by short name (``vit-up:dinov3_splus``, ``uplift:dinov2_s``, ...).

One resolver for every method: a short name from ``RELEASES``, a Hugging Face file written
``hf:ORG/REPO/FILE``, or a local path. Hub files come from the Hugging Face cache first, files published at
a URL (GitHub release assets: ``Release.url``) from torch.hub's cache (``torch.hub.get_dir()/checkpoints``)
first; offline with nothing cached, resolution fails in well under a second with one line naming the
options (no minute of retries). Nothing here unpickles: callers read ``.safetensors`` with safetensors and
``.bin`` / ``.pth`` files only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache

from vitup_cli.backbones import ALIASES, _hub_offline
from vitup_cli.errors import VitupError


@dataclass(frozen=True)
class Release:
    """One published set of upsampler weights and what it needs.

    ``backbone`` is a vitup backbone name (``vitup backbones``); ``backbone_tag`` the hub tag of the
    backbone weights the release was trained on. ``url``: a file published outside the Hugging Face hub
    (a GitHub release), taken from torch.hub's cache (``torch.hub.get_dir()/checkpoints``) first.
    ``any_backbone``: the weights work over any backbone (``backbone`` is only the one they were trained
    on); such a release is the method's default for a backbone no release names.
    """

    name: str
    method: str
    repo_id: str
    filename: str
    backbone: str
    backbone_tag: str
    licence: str
    note: str = ""
    url: str = ""
    any_backbone: bool = False

    @property
    def hub_ref(self) -> str:
        return self.url or f"hf:{self.repo_id}/{self.filename}"


_JAFAR_URL = "https://github.com/PaulCouairon/JAFAR/releases/download/Weights"
_FEATUP_URL = "https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/pretrained"
_VITUP_LICENCE = "cc-by-nc-sa-4.0 (non-commercial, share-alike; not redistributed by vitup)"
_ANYUP_LICENCE = "CC-BY-4.0 (wimmerth/anyup; attribution required; not redistributed by vitup)"

RELEASES: dict[str, Release] = {
    r.name: r
    for r in (
        Release(
            "vit-up:dinov3_splus",
            "vitup",
            "Krispin/vit-up",
            "vit_up_dinov3_splus.safetensors",
            "dinov3_s+",
            "lvd1689m",
            _VITUP_LICENCE,
            "ViT-Up on DINOv3 ViT-S+/16 (the paper's model)",
        ),
        Release(
            "vit-up:dinov3_b",
            "vitup",
            "Krispin/vit-up",
            "vit_up_dinov3_base.safetensors",
            "dinov3_b",
            "lvd1689m",
            _VITUP_LICENCE,
            "ViT-Up on DINOv3 ViT-B/16",
        ),
        Release(
            "uplift:dinov2_s",
            "uplift",
            "UPLiFT-upsampler/uplift_dinov2-s14",
            "uplift_dinov2-s14.safetensors",
            "dinov2_s",
            "lvd142m",
            "see the model card (UPLiFT code: MIT)",
            "UPLiFT on DINOv2 ViT-S/14",
        ),
        Release(
            "uplift:dinov3_splus",
            "uplift",
            "UPLiFT-upsampler/uplift_dinov3-splus16",
            "uplift_dinov3-splus16.safetensors",
            "dinov3_s+",
            "lvd1689m",
            "see the model card (UPLiFT code: MIT)",
            "UPLiFT on DINOv3 ViT-S+/16",
        ),
        *(
            Release(
                f"loftup:{bb}",
                "loftup",
                f"haiwen/loftup-{hub}",
                "pytorch_model.bin",
                bb,
                "lvd142m",
                "see the model card (LoftUp code: MIT)",
                f"LoftUp on {desc}",
            )
            for bb, hub, desc in (
                ("dinov2_s", "dinov2s", "DINOv2 ViT-S/14"),
                ("dinov2_s_reg", "dinov2s_reg", "DINOv2 ViT-S/14 + registers"),
                ("dinov2_b", "dinov2b", "DINOv2 ViT-B/14"),
                ("dinov2_b_reg", "dinov2b_reg", "DINOv2 ViT-B/14 + registers"),
            )
        ),
        *(
            Release(
                f"jafar:{bb}",
                "jafar",
                "PaulCouairon/JAFAR",
                filename,
                bb,
                "lvd142m",
                "Apache-2.0 (JAFAR code and weights)",
                f"JAFAR on {desc}",
                f"{_JAFAR_URL}/{filename}",
            )
            for bb, filename, desc in (
                ("dinov2_s", "vit_small_patch14_dinov2.lvd142m.pth", "DINOv2 ViT-S/14"),
                ("dinov2_b", "vit_base_patch14_dinov2.lvd142m.pth", "DINOv2 ViT-B/14"),
                ("dinov2_s_reg", "vit_small_patch14_reg4_dinov2.pth", "DINOv2 ViT-S/14 + registers"),
            )
        ),
        Release(
            "featup:dinov2_s",
            "featup",
            "mhamilton723/FeatUp",
            "dinov2_jbu_stack_cocostuff.ckpt",
            "dinov2_s",
            "lvd142m",
            "MIT (the FeatUp repository's licence; no separate weights licence stated)",
            "FeatUp JBU on DINOv2 ViT-S/14 with its ChannelNorm (torch.hub 'dinov2', use_norm=True)",
            url=f"{_FEATUP_URL}/dinov2_jbu_stack_cocostuff.ckpt",
        ),
        Release(
            "anyup:default",
            "anyup",
            "wimmerth/anyup",
            "anyup_paper.pth",
            "dinov2_s",
            "lvd142m",
            _ANYUP_LICENCE,
            "AnyUp (the paper's model, trained on DINOv2 ViT-S/14 features; usable over any backbone)",
            url="https://github.com/wimmerth/anyup/releases/download/checkpoint/anyup_paper.pth",
            any_backbone=True,
        ),
        Release(
            "anyup:multi_backbone",
            "anyup",
            "wimmerth/anyup",
            "anyup_multi_backbone.pth",
            "dinov2_s",
            "lvd142m",
            _ANYUP_LICENCE,
            "AnyUp trained on DINOv2-S, DINOv2-R-S, CLIP-B, SigLIP-B and ViT-B features; usable over any backbone",
            url="https://github.com/wimmerth/anyup/releases/download/checkpoint_v2/anyup_multi_backbone.pth",
            any_backbone=True,
        ),
        Release(
            "naf:default",
            "naf",
            "valeoai/NAF",
            "naf_release.pth",
            "dinov3_b",
            "lvd1689m",
            "Apache-2.0 (valeoai/NAF, code and weights)",
            "NAF, trained on DINOv3 ViT-B/16 features, zero-shot over any backbone",
            url="https://github.com/valeoai/NAF/releases/download/model/naf_release.pth",
            any_backbone=True,
        ),
    )
}

#: The release used when a command gets neither ``--checkpoint`` nor ``--upsampler``.
DEFAULT_RELEASE: dict[str, str] = {r.backbone: r.name for r in RELEASES.values() if r.method == "vitup"}

_printed_licences: set[str] = set()


@dataclass(frozen=True)
class ResolvedWeights:
    """A weights file on disk and, when known, the release it is."""

    path: Path
    source: str  # the short name, ``hf:ORG/REPO/FILE`` or the local path, as the user can type it again
    release: Release | None = None


def release_for_file(path: str | Path) -> Release | None:
    """The release whose published file name this local file carries (a user's local copy), if any."""
    name = Path(path).name
    matches = [r for r in RELEASES.values() if r.filename == name and r.filename != "pytorch_model.bin"]
    return matches[0] if len(matches) == 1 else None


def is_release_ref(ref: str) -> bool:
    """True for a short name (``vit-up:dinov3_b``) or a hub reference (``hf:ORG/REPO/FILE``)."""
    return ref in RELEASES or ref.startswith("hf:")


def _parse_hf(ref: str) -> tuple[str, str]:
    parts = ref[3:].strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        raise VitupError(f"'{ref}': a Hugging Face reference is hf:ORG/REPO/FILE (for example {RELEASES_EXAMPLE})")
    return "/".join(parts[:2]), "/".join(parts[2:])


RELEASES_EXAMPLE = "hf:Krispin/vit-up/vit_up_dinov3_splus.safetensors"


def _offline_message(label: str, repo_id: str, filename: str) -> str:
    return (
        f"{label}: {repo_id}/{filename} is not in the Hugging Face cache and the hub is unreachable. "
        f"Fix: go online (or pre-download it with `hf download {repo_id} {filename}`), pass a local copy "
        "of the file (--checkpoint PATH), or use --upsampler bilinear"
    )


def hub_file(repo_id: str, filename: str, label: str | None = None) -> Path:
    """A file of a Hugging Face repo: the cache first, the hub only when it is reachable."""
    label = label or f"hf:{repo_id}/{filename}"
    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return Path(cached)
    if _hub_offline():
        raise VitupError(_offline_message(label, repo_id, filename))
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as exc:  # network errors, gated repos, missing files
        raise VitupError(f"{label}: cannot download {repo_id}/{filename} ({type(exc).__name__}: {exc})") from None


def _url_offline(url: str) -> bool:
    """True when ``url``'s host cannot be reached (or vitup is told to stay offline: ``HF_HUB_OFFLINE``)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return True
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "", parsed.port or 443), timeout=3):
            return False
    except OSError:
        return True


def url_file(url: str, filename: str, label: str) -> Path:
    """A file published at ``url``: torch.hub's cache (``torch.hub.get_dir()/checkpoints``) first, the URL
    only when its host is reachable; downloaded into that cache."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cached = cache / filename
    if cached.is_file():
        return cached
    if _url_offline(url):
        raise VitupError(
            f"{label}: {filename} is not in the torch.hub cache ({cache}) and {urlparse(url).hostname} is "
            f"unreachable. Fix: go online (or pre-download {url} into {cache}), pass a local copy of the file "
            "(--checkpoint PATH), or use --upsampler bilinear"
        )
    cache.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(cached), progress=False)
    except Exception as exc:  # network errors, missing files
        raise VitupError(f"{label}: cannot download {url} ({type(exc).__name__}: {exc})") from None
    return cached


def resolve_weights(ref: str | Path) -> ResolvedWeights:
    """A short name, ``hf:ORG/REPO/FILE`` or a local path -> the file on disk and its release."""
    text = str(ref)
    if text in RELEASES:
        release = RELEASES[text]
        if release.url:
            return ResolvedWeights(url_file(release.url, release.filename, label=text), text, release)
        return ResolvedWeights(hub_file(release.repo_id, release.filename, label=text), text, release)
    if text.startswith("hf:"):
        repo_id, filename = _parse_hf(text)
        known = [r for r in RELEASES.values() if r.repo_id == repo_id and r.filename == filename]
        return ResolvedWeights(hub_file(repo_id, filename), text, known[0] if known else None)
    path = Path(text)
    if (
        ":" in text
        and not path.exists()
        and text.split(":", 1)[0] in {r.method for r in RELEASES.values()} | {"vit-up"}
    ):
        names = ", ".join(RELEASES)
        raise VitupError(f"unknown release '{text}': use one of {names}, hf:ORG/REPO/FILE, or a local file")
    return ResolvedWeights(path, text, release_for_file(path))


def licence_notice(release: Release) -> str | None:
    """The licence line for a release, once per process (``None`` when already shown)."""
    if release.name in _printed_licences:
        return None
    _printed_licences.add(release.name)
    return f"{release.name} ({release.repo_id}): weights licence {release.licence}"


def releases_for(method: str | None = None) -> list[Release]:
    """The known releases, optionally of one method, in table order."""
    return [r for r in RELEASES.values() if method is None or r.method == method]


def release_for_backbone(method: str, backbone: str) -> Release | None:
    """The first published release of ``method`` trained on ``backbone`` (aliases understood), else its
    first release usable over any backbone (``Release.any_backbone``), if any."""
    key = ALIASES.get(backbone, backbone)
    for release in releases_for(method):
        if ALIASES.get(release.backbone, release.backbone) == key:
            return release
    return next((r for r in releases_for(method) if r.any_backbone), None)

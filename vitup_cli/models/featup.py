"""FeatUp's JBU upsampler: four learned joint-bilateral 2x steps guided by the image (Fu et al., ICLR 2024).

The published models (``torch.hub.load("mhamilton723/FeatUp", "dinov2" | "dino16" | "vit" | ...)``)
upsample the backbone's **last** block output after its own final LayerNorm (patch tokens only: DINOv2's
``x_norm_patchtokens``, DINO's ``get_intermediate_feat(n=1)``), passed through one more learned LayerNorm
over channels (``ChannelNorm``, the default ``use_norm=True`` files). The image, normalised with the
ImageNet mean/std (FeatUp's ``norm``, for every backbone), is both the backbone's input and the guidance.

One step (``JBULearnedRange``) maps ``(B, C, h, w)`` to ``(B, C, 2h, 2w)``:

- the guidance is the image average-pooled (``adaptive_avg_pool2d``) to ``2h x 2w``;
- range kernel: a 1x1 conv MLP projects the guidance to 32-d keys; per pixel, a softmax over the 7x7
  window (reflect padding) of ``exp(range_temp) * <key(p), key(q)>``;
- spatial kernel: ``exp(-|d|^2 / (2 sigma^2))`` over the window, ``d`` on ``linspace(-1, 1, 7)``;
- their product, normalised to sum 1, plus ``0.1 * fixup_proj([kernel, guidance])``;
- the features bicubically upsampled to ``2h x 2w`` (``align_corners=False``), reflect-padded, and
  filtered per pixel with that kernel (the reference's ``AdaptiveConv``: a CUDA kernel and a C++ CPU
  loop; here plain PyTorch, the C++ loop's order: window rows, then columns).

After four steps (16x) a 1x1 conv adds ``0.1 * fixup_proj(x)``. Module and parameter names follow the
reference (github.com/mhamilton723/FeatUp, MIT): ``upsampler.*`` and ``model.1.norm.*`` of its checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitup_cli.backbones import Backbone
from vitup_cli.errors import VitupError
from vitup_cli.models.base import Upsampler, _as_size, sample_map
from vitup_cli.models.registry import Capabilities, Preprocessing, UpsamplerSpec, register_upsampler

#: FeatUp's ``norm`` (``featup/util.py``): the ImageNet mean/std, used for every backbone
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the side the published models were trained and are used at (``T.Resize(224)``)
PUBLISHED_INPUT_SIZE = 224


@dataclass
class FeatUpConfig:
    """The JBU stack's architecture; the defaults are every published model's."""

    key_dim: int = 32
    radius: int = 3
    steps: int = 4
    channel_norm: bool = True  # the ``use_norm=True`` files: a learned LayerNorm over the tokens' channels


class JBULearnedRange(nn.Module):
    """One guided 2x step (the reference's ``JBULearnedRange``; dropouts are inference no-ops)."""

    def __init__(self, guidance_dim: int = 3, key_dim: int = 32, radius: int = 3) -> None:
        super().__init__()
        self.radius = radius
        self.diameter = 2 * radius + 1
        taps = self.diameter**2
        self.range_temp = nn.Parameter(torch.tensor(0.0))
        self.range_proj = nn.Sequential(
            nn.Conv2d(guidance_dim, key_dim, 1), nn.GELU(), nn.Identity(), nn.Conv2d(key_dim, key_dim, 1)
        )
        self.fixup_proj = nn.Sequential(
            nn.Conv2d(guidance_dim + taps, taps, 1), nn.GELU(), nn.Identity(), nn.Conv2d(taps, taps, 1)
        )
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0))

    def spatial_kernel(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(1, D*D, 1, 1)`` Gaussian of the window offsets (row-major)."""
        d = torch.linspace(-1, 1, self.diameter, device=device, dtype=dtype)
        dist = d[:, None].square() + d[None, :].square()
        return torch.exp(-dist / (2 * self.sigma_spatial**2)).reshape(1, -1, 1, 1)

    def kernel(self, keys_padded: torch.Tensor, keys: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """Per-pixel filters ``(B, D*D, n, W)`` for ``n`` rows: ``keys`` and ``guidance`` cover those rows,
        ``keys_padded`` them plus ``radius`` reflected rows/columns on each side."""
        n, W = keys.shape[-2:]
        D = self.diameter
        logits = torch.stack(
            [(keys_padded[:, :, i : i + n, j : j + W] * keys).sum(1) for i in range(D) for j in range(D)], dim=1
        )
        temp = self.range_temp.exp().clamp_min(1e-4).clamp_max(1e4)
        combined = F.softmax(temp * logits, dim=1) * self.spatial_kernel(keys.device, keys.dtype)
        combined = combined / combined.sum(1, keepdim=True).clamp(1e-7)
        return combined + 0.1 * self.fixup_proj(torch.cat([combined, guidance], dim=1))

    def forward(self, source: torch.Tensor, guidance: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
        """Features ``(B, C, h, w)`` + guidance ``(B, G, H, W)`` -> ``(B, C, H, W)``, ``chunk_rows`` output
        rows at a time (all at once by default; the result is the same)."""
        H, W = guidance.shape[-2:]
        r, D = self.radius, self.diameter
        pad = [r] * 4
        hr = F.interpolate(source, size=(H, W), mode="bicubic", align_corners=False)
        hr_padded = F.pad(hr, pad, mode="reflect")
        del hr
        keys = self.range_proj(guidance)
        keys_padded = F.pad(keys, pad, mode="reflect")
        out = hr_padded.new_empty(source.shape[0], source.shape[1], H, W)
        step = H if chunk_rows is None else max(1, int(chunk_rows))
        for r0 in range(0, H, step):
            r1 = min(H, r0 + step)
            k = self.kernel(keys_padded[:, :, r0 : r1 + 2 * r], keys[:, :, r0:r1], guidance[:, :, r0:r1])
            acc = torch.zeros_like(out[:, :, r0:r1])
            for i in range(D):  # the reference kernel's order: out += w[i, j] * x[h + i, w + j]
                for j in range(D):
                    acc = acc + k[:, i * D + j : i * D + j + 1] * hr_padded[:, :, r0 + i : r1 + i, j : j + W]
            out[:, :, r0:r1] = acc
        return out


class JBUStack(nn.Module):
    """``up1`` .. ``up4`` and the final ``fixup_proj`` (the reference's ``JBUStack``)."""

    def __init__(self, channels: int, config: FeatUpConfig | None = None) -> None:
        super().__init__()
        config = config or FeatUpConfig()
        for i in range(config.steps):
            self.add_module(f"up{i + 1}", JBULearnedRange(3, config.key_dim, config.radius))
        self.steps = config.steps
        self.fixup_proj = nn.Sequential(nn.Identity(), nn.Conv2d(channels, channels, kernel_size=1))

    def step(self, i: int, source: torch.Tensor, guidance: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
        """Step ``i`` (0-based): the guidance average-pooled to twice ``source``'s grid, one 2x JBU."""
        h, w = source.shape[-2:]
        small = F.adaptive_avg_pool2d(guidance, (2 * h, 2 * w))
        return getattr(self, f"up{i + 1}")(source, small, chunk_rows)

    def forward(self, source: torch.Tensor, guidance: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
        x = source
        for i in range(self.steps):
            x = self.step(i, x, guidance, chunk_rows)
        H = x.shape[-2]
        rows = H if chunk_rows is None else max(1, int(chunk_rows))
        for r0 in range(0, H, rows):  # x + 0.1 * fixup(x), in place, a band of rows at a time
            band = x[:, :, r0 : r0 + rows]
            x[:, :, r0 : r0 + rows] = self.fixup_proj(band) * 0.1 + band
        return x


class FeatUpNet(nn.Module):
    """``norm`` (the published ``model.1.norm``, absent for ``use_norm=False`` files) and ``upsampler``."""

    def __init__(self, channels: int, config: FeatUpConfig | None = None) -> None:
        super().__init__()
        self.config = config or FeatUpConfig()
        self.channels = int(channels)
        self.norm = nn.LayerNorm(self.channels) if self.config.channel_norm else None
        self.upsampler = JBUStack(self.channels, self.config)

    def normalise(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ChannelNorm``: a LayerNorm over the channels of ``(B, C, h, w)`` (identity without one)."""
        if self.norm is None:
            return tokens
        return self.norm(tokens.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
        """Backbone tokens ``(B, C, h, w)`` + normalised image -> ``(B, C, 16h, 16w)``."""
        return self.upsampler(self.normalise(tokens), image, chunk_rows)

    def published_state(self) -> dict[str, torch.Tensor]:
        """The weights under the reference checkpoints' names (``model.1.norm.*``, ``upsampler.*``)."""
        return {(f"model.1.{k}" if k.startswith("norm.") else k): v for k, v in self.state_dict().items()}


def config_from_state(state: dict[str, torch.Tensor], source: str) -> tuple[int, FeatUpConfig]:
    """Channels and configuration of published-layout weights (``upsampler.fixup_proj.1.weight``, the norm)."""
    weight = state.get("upsampler.fixup_proj.1.weight")
    if weight is None or weight.ndim != 4:
        raise VitupError(f"{source}: not FeatUp JBU weights (no upsampler.fixup_proj.1.weight)")
    steps = sum(1 for k in state if k.startswith("upsampler.up") and k.endswith(".range_temp"))
    proj, fixup = state.get("upsampler.up1.range_proj.0.weight"), state.get("upsampler.up1.fixup_proj.3.weight")
    key_dim = 32 if proj is None else proj.shape[0]
    taps = 49 if fixup is None else fixup.shape[0]
    radius = (round(taps**0.5) - 1) // 2
    config = FeatUpConfig(key_dim=int(key_dim), radius=radius, steps=steps, channel_norm="model.1.norm.weight" in state)
    return int(weight.shape[0]), config


def load_published_state(net: FeatUpNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``model.1.norm.*`` / ``upsampler.*`` weights into ``net`` (cast to its dtype); the backbone
    (``model.0.*``) and training-only parts (``scale_net.*``, ``downsampler.*``) of a checkpoint are skipped.

    Raises:
        VitupError: one line naming ``source`` and the first unknown, missing or mis-shaped key.
    """
    own = net.state_dict()
    renamed = {}
    for key, value in state.items():
        if key.startswith(("model.0.", "scale_net.", "downsampler.")):
            continue
        name = key.removeprefix("model.1.") if key.startswith("model.1.norm.") else key
        renamed[name] = value
    unknown = sorted(set(renamed) - set(own))
    if unknown:
        raise VitupError(
            f"{source}: unknown FeatUp weight '{unknown[0]}' ({len(unknown)} unknown keys); expected the published "
            "upsampler.* / model.1.norm.* layout"
        )
    missing = sorted(set(own) - set(renamed))
    if missing:
        raise VitupError(f"{source}: FeatUp weight '{missing[0]}' is missing ({len(missing)} missing keys)")
    for name, value in renamed.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise VitupError(
                f"{source}: {name} has shape {tuple(value.shape)}, this FeatUp needs {tuple(own[name].shape)} "
                f"(a {net.channels}-channel backbone); use the weights released for that backbone"
            )
    with torch.no_grad():
        for name, value in renamed.items():
            own[name].copy_(value.to(own[name].dtype))


class FeatUp(Upsampler):
    """FeatUp's JBU stack behind the ``Upsampler`` interface (the backbone's last hidden state only).

    Its native output is 16x the token grid (256 x 256 for DINOv2-S/14 at 224 px); ``features`` resizes
    that bilinearly to any other size (antialiased when shrinking; ``output_notes`` records it) and
    ``query`` samples it bilinearly. ``chunk_rows`` bounds the memory of the steps' per-pixel kernels.
    """

    name = "featup"

    def __init__(
        self,
        backbone: Backbone,
        input_size: int | None = None,
        config: FeatUpConfig | None = None,
        chunk_rows: int | None = 32,
        source: str = "",
        weights_sha256: str = "",
    ) -> None:
        super().__init__(backbone, input_size or PUBLISHED_INPUT_SIZE)
        self.net = FeatUpNet(backbone.embed_dim, config)
        self.chunk_rows = chunk_rows
        self.source = source
        self.weights_sha256 = weights_sha256  # the file the weights came from (a store's identity)
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def config(self) -> FeatUpConfig:
        return self.net.config

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return self.net.published_state()

    def settings(self) -> dict[str, Any]:
        return {
            "featup": asdict(self.config),
            "normalisation": "ImageNet mean/std for backbone and guidance (FeatUp's norm)",
            "weights": self.source,
        }

    def check_tap(self, tap: int | None) -> None:
        if tap is not None and tap != self.backbone.depth:
            raise VitupError(f"--tap {tap}: FeatUp upsamples the last layer only (tap {self.backbone.depth})")

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, 3, S, S)`` normalised with the ImageNet mean/std."""
        if images.shape[-2:] != (self.input_size, self.input_size):
            size = (self.input_size, self.input_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (images - self.image_mean.to(images.dtype)) / self.image_std.to(images.dtype)

    def tokens(self, images: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        return super().tokens(images, self.backbone.depth if tap is None else tap)

    @property
    def native_size(self) -> tuple[int, int]:
        h, w = self.token_grid
        return h * 2**self.config.steps, w * 2**self.config.steps

    def output_notes(self, size: int | tuple[int, int]) -> dict[str, Any]:
        native = list(self.native_size)
        return {"native_size": native, "resized": native != list(_as_size(size))}

    def native(self, images: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        """The JBU output at its own size ``(B, C, 16h, 16w)``."""
        self.check_tap(tap)
        x = self.prepare(images)
        tokens = self.backbone.hidden_states(x, [self.backbone.depth])[0]
        return self.net(tokens, x, self.chunk_rows)

    def features(self, images: torch.Tensor, size: int | tuple[int, int], tap: int | None = None) -> torch.Tensor:
        out_h, out_w = _as_size(size)
        x = self.native(images, tap)
        if tuple(x.shape[-2:]) != (out_h, out_w):
            shrink = x.shape[-2] > out_h or x.shape[-1] > out_w
            x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=shrink)
        return x

    def query(self, images: torch.Tensor, xy: torch.Tensor, tap: int | None = None) -> torch.Tensor:
        return sample_map(self.native(images, tap), xy)


register_upsampler(
    UpsamplerSpec(
        name="featup",
        model_class=FeatUp,
        build=lambda backbone, config=None, input_size=None: FeatUp(backbone, input_size, config),
        config_class=FeatUpConfig,
        capabilities=Capabilities(
            trained=True,
            input_size_from_weights=False,
            final_tap_only=True,
            any_tap=False,
            channel_space="normalised",
            default_release=True,
        ),
        # the reference pipeline: T.Resize(224) (PIL bilinear), T.Normalize(ImageNet mean/std)
        preprocessing=Preprocessing(resize_filter="bilinear", normalisation="imagenet"),
        summary="four learned joint-bilateral 2x steps guided by the image (16x, then resized)",
        paper="Fu et al. 2024 (FeatUp, JBU)",
        licence="reference code MIT (mhamilton723/FeatUp)",
    )
)

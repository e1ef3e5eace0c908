"""``vitup backbones``: the backbone names vitup knows."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from vitup_cli.cli._app import app


@app.command("backbones")
def backbones_cmd() -> None:
    """List the backbone names vitup knows (any timm ViT name works too)."""
    from vitup_cli.backbones import ALIASES, BACKBONES  # imports torch: lazy for CLI start-up speed
    from vitup_cli.hub.releases import DEFAULT_RELEASE  # imports torch (backbones): lazy likewise

    table = Table("name", "timm model", "hub tag", "published ViT-Up", "notes")
    aliases = {v: k for k, v in ALIASES.items()}
    for name, spec in BACKBONES.items():
        shown = f"{name} ({aliases[name]})" if name in aliases else name
        table.add_row(shown, spec.timm_name, spec.tag or "-", DEFAULT_RELEASE.get(name, "-"), spec.note)
    Console().print(table)

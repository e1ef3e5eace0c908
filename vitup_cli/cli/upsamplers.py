"""``vitup upsamplers``: every registered upsampler, what it needs and where its weights are."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from vitup_cli.cli._app import app


@app.command("upsamplers")
def upsamplers_cmd(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the table as JSON (one object per upsampler).")
    ] = False,
) -> None:
    """List the upsamplers vitup can run: trained or training-free, per-backbone or any-backbone, output
    sizes, published releases (`--checkpoint NAME`) and licences."""
    from vitup_cli.api import list_upsamplers  # imports torch: lazy for CLI start-up speed

    rows = list_upsamplers()
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in rows], indent=1))
        return
    table = Table("name", "kind", "backbones", "output", "releases (--checkpoint)", "licence", "what it is")
    for r in rows:
        kind = ("trained" + (", vitup train" if r.trainable else ", run only")) if r.trained else "training-free"
        table.add_row(
            r.name,
            kind,
            "any" if r.any_backbone else "its own (per release)",
            r.output + ("" if r.channel_space == "raw" else f", {r.channel_space} channels"),
            ", ".join(r.releases) or "-",
            "; ".join(r.licences) or "-",
            r.summary,
        )
    Console().print(table)

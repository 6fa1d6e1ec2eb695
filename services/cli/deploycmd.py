"""`relay deploy render`: write the deploy files the code generates (compose, Kubernetes, dashboards, alerts)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated

import typer

from services.cli.render import console

deploy_app = typer.Typer(help="The deploy files, generated from the code.", no_args_is_help=True)

# Each module's ``render() -> dict[str, str]`` maps a path under the repository root to the file's text.
RENDERERS = ("services.deploy.observability", "services.deploy.compose", "services.deploy.k8s")


def rendered() -> dict[str, str]:
    """Every generated deploy file: path (relative to the repository root) -> text."""
    out: dict[str, str] = {}
    for module in RENDERERS:
        try:
            render = importlib.import_module(module).render
        except ModuleNotFoundError:
            continue  # a renderer not written yet
        out.update(render())
    return out


@deploy_app.command("render")
def render(
    out: Annotated[Path, typer.Option(help="The repository root to write under.")] = Path("."),
    check: Annotated[bool, typer.Option("--check", help="Write nothing; fail if a file differs.")] = False,
) -> None:
    """Write (or check) the generated deploy files."""
    stale = []
    for rel, text in sorted(rendered().items()):
        path = out / rel
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        console.print(f"wrote {rel}")
    if stale:
        console.print(f"[red]stale: {', '.join(stale)}; run `relay deploy render`[/red]")
        raise typer.Exit(1)

"""The browser page at `/`: static files in web/static (index.html, app.js, audio-worklet.js, style.css), no build
step.

A package so that `pip install .` ships the files beside the server's modules (pyproject's package data) and the
installed server finds them by this module's location, not the working directory's."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

PAGE_DIR = Path(__file__).resolve().parent / "static"  # only these files are served (not this module)
ASSETS_PATH = "/web"  # index.html loads app.js, audio-worklet.js and style.css from here


def mount_page(app: FastAPI) -> None:
    """`GET /` answers the page; `/web/*` its scripts and style. Only these two paths: an unknown path stays the
    API's JSON 404, and WebSocket paths never reach the static files."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        # no-cache: a browser revalidates (ETag), so a restarted server's new page is never mixed with old scripts.
        return FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount(ASSETS_PATH, StaticFiles(directory=PAGE_DIR, check_dir=True), name="web")

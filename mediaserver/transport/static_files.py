"""The status page's files, served from the package (no path can leave it)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from .safe_files import read_regular

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
TYPES = {".html": "text/html", ".js": "application/javascript", ".css": "text/css"}
SERVED = frozenset(p.name for p in STATIC_DIR.iterdir() if p.suffix in TYPES) if STATIC_DIR.is_dir() else frozenset()


def page(admin: bool) -> web.Response:
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    if admin:
        html = html.replace("<html lang=\"en\">", "<html lang=\"en\" data-admin=\"1\">", 1)
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-cache"})


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["file"]
    if name not in SERVED:
        raise web.HTTPNotFound(text=f"no such file {name!r}\n")
    # Read like the HLS files: a symlink or FIFO put in the package is not followed.
    body = read_regular(STATIC_DIR, name)
    if body is None:
        raise web.HTTPNotFound(text=f"no such file {name!r}\n")
    return web.Response(
        body=body, headers={"Content-Type": TYPES[Path(name).suffix], "Cache-Control": "max-age=300"}
    )


def add_routes(app: web.Application, admin: bool) -> None:
    async def index(request: web.Request) -> web.Response:
        return page(admin)

    app.router.add_get("/", index)
    app.router.add_get("/static/{file}", static_file)


def is_public_path(path: str) -> bool:
    """Paths of the admin listener that carry no data and need no token: the page itself."""
    return path == "/" or (path.startswith("/static/") and path[len("/static/"):] in SERVED)

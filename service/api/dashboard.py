"""The operator dashboard: a static page and its script, served without a token (the page asks for one
and sends it as a bearer header; every figure comes from the API)."""

from __future__ import annotations

from pathlib import Path

from litestar import Response, get
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "dashboard"
# Covers and audio come from the relay's CDN; everything else only from here.
CSP = (
    "default-src 'self'; img-src 'self' https: http: data:; media-src 'self' https: http:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_PAGE = (DASHBOARD_DIR / "index.html").read_bytes()


@get("/", summary="The operator dashboard (HTML)", security=[], media_type="text/html")
async def dashboard() -> Response[bytes]:
    return Response(
        _PAGE,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": CSP,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )


DASHBOARD_ROUTES: list[ControllerRouterHandler] = [
    dashboard,
    create_static_files_router(
        path="/static", directories=[DASHBOARD_DIR], include_in_schema=False, name="dashboard-static"
    ),
]

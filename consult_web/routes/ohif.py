"""``/ohif/...``: the OHIF viewer's files (``consult_web.ohif``), for logged-in users only.

Mounted only when ``ohif_dist_dir`` is set. A path that names no file in the folder
answers OHIF's ``index.html``: the viewer routes itself on the client (``/ohif/viewer``,
``/ohif/`` the study list), as OHIF's own ``serve.json`` rewrites do.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from consult_web.deps import CurrentUser
from consult_web.ohif import MOUNT, OhifSite

router = APIRouter()


def _site(request: Request) -> OhifSite:
    return request.app.state.ohif


@router.get(MOUNT, include_in_schema=False)
async def ohif_root(_user: CurrentUser) -> Response:
    return RedirectResponse(f"{MOUNT}/", status_code=307)


@router.get(MOUNT + "/{relative:path}", include_in_schema=False)
async def ohif_file(request: Request, relative: str, _user: CurrentUser) -> Response:
    site = _site(request)
    found = await run_in_threadpool(site.file, relative)
    if found is None:
        # never cached: it names the current entry bundle, and a login may sit in front of it
        return Response(site.index_html, media_type="text/html; charset=utf-8", headers={"cache-control": "no-store"})
    content, media_type = found
    # bundles are named by their content hash; the generated config follows the settings
    cache = {"cache-control": "no-cache" if relative == "app-config.js" else "private, max-age=3600"}
    if isinstance(content, bytes):
        return Response(content, media_type=media_type, headers=cache)
    return FileResponse(content, media_type=media_type, headers=cache)

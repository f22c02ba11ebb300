"""The OHIF viewer's prebuilt files served under ``/ohif/``, same-origin with ``/dicomweb``.

A site that sets ``ohif_dist_dir`` to the ``dist/`` folder of npm's ``@ohif/app`` package
gets OHIF at ``/ohif/``: it runs on this server's origin, so its QIDO-RS/WADO-RS requests to
``/dicomweb`` carry the browser's session cookie and need no CORS. Nothing is downloaded
at run time; the folder is read once at start-up.

The npm build is made for the root of a site (webpack's ``PUBLIC_URL`` is ``/``), so three
things are adapted in memory, never on disk:

- ``index.html``: root-relative ``src``/``href`` and ``window.PUBLIC_URL`` point under
  ``/ohif/`` (OHIF's own "deploy at a sub-path" build does the same at build time);
- the bundles that start webpack (the entry bundle and the web workers' bundles): webpack's
  public path (``__webpack_require__.p = "/"``), from which they load their other chunks, CSS
  and WebAssembly, becomes ``/ohif/``; in the style sheets, root-relative ``url(/...)`` (fonts)
  too. Each file is adapted on its first request and kept in memory (a few files, ~20 MB);
  the others are sent as they are;
- ``app-config.js`` is generated from the settings: one DICOMweb data source whose
  ``qidoRoot``/``wadoRoot``/``wadoUriRoot`` are ``/dicomweb``, ``routerBasename`` ``/ohif``.

If the package's layout changed so that a rewrite no longer applies, start-up fails with
:class:`OhifDistError` naming what is missing, instead of serving a blank page.

Every ``/ohif/`` request needs a logged-in user (the route depends on ``CurrentUser``): an
anonymous browser is sent to the login page and back. OHIF needs inline boot scripts and
WebAssembly, which the app's strict CSP forbids: ``/ohif/`` answers get their own CSP
(:attr:`OhifSite.content_security_policy`) that allows the index's inline scripts by hash,
``'wasm-unsafe-eval'`` and blob workers, still ``connect-src 'self'``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import mimetypes
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xray_triage.settings import SettingsError

log = logging.getLogger(__name__)

MOUNT = "/ohif"  # where the viewer is served; also its routerBasename
DICOMWEB_ROOT = "/dicomweb"
PUBLIC_PATH_RUNTIME = '__webpack_require__.p = "/";'  # webpack's runtime/public_path in the entry bundle
_ROOT_REFERENCE = re.compile(r'(\s(?:src|href))="/(?!/)')
_ENTRY_BUNDLE = re.compile(r'src="/(app\.bundle\.[0-9a-f]+\.js)"')
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)
_CSS_ROOT_URL = re.compile(r"url\((['\"]?)/(?!/)")


class OhifDistError(SettingsError):
    """``ohif_dist_dir`` is not a usable OHIF ``dist/`` folder; the message says why (a
    ``SettingsError``: ``serve`` stops with that one line)."""


def study_viewer_url(base: str, study_uid: str) -> str:
    """OHIF's viewer route for one study: ``<base>/viewer?StudyInstanceUIDs=<uid>``.

    ``base`` is OHIF's address without the trailing slash (``/ohif``, or a site's
    ``ohif_url`` such as ``https://viewer.example.org``). UIDs are digits and dots only
    (PS3.5 9.1), so they need no escaping.
    """
    return f"{base.rstrip('/')}/viewer?StudyInstanceUIDs={study_uid}"


def app_config(mount: str = MOUNT, dicomweb_root: str = DICOMWEB_ROOT) -> str:
    """OHIF v3's ``window.config`` for this server (``app-config.js``).

    One DICOMweb data source (OHIF's ``@ohif/extension-default`` ``dicomweb`` module) on
    ``dicomweb_root``: WADO-RS frames for images and thumbnails (PS3.18 10.4), QIDO-RS
    without ``includefield`` (PS3.18 10.6). JSON, so nothing executable comes from settings.
    """
    config: dict[str, Any] = {
        "routerBasename": mount,
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "xray-triage",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "xray-triage",
                "configuration": {
                    "friendlyName": "xray-triage DICOMweb",
                    "name": "xray-triage",
                    "qidoRoot": dicomweb_root,
                    "wadoRoot": dicomweb_root,
                    "wadoUriRoot": dicomweb_root,
                    "qidoSupportsIncludeField": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": False,
                    "staticWado": False,
                    "singlepart": "bulkdata,video",
                    "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
                    "omitQuotationForMultipartRequest": True,
                },
            }
        ],
    }
    return "/* generated by xray-triage from its settings */\nwindow.config = " + json.dumps(config, indent=2) + ";\n"


@dataclass
class OhifSite:
    """One OHIF ``dist/`` folder, prepared for serving under :data:`MOUNT`."""

    dist_dir: Path
    index_html: bytes
    prefix: str  # the mount with its trailing slash, "/ohif/"
    config_js: bytes
    script_hashes: list[str] = field(default_factory=list)
    adapted: dict[Path, bytes | None] = field(default_factory=dict)  # file -> adapted bytes, None = as it is

    @classmethod
    def load(cls, dist_dir: Path, mount: str = MOUNT) -> OhifSite:
        """Read and adapt the folder; :class:`OhifDistError` when it is not OHIF's ``dist/``."""
        dist_dir = Path(dist_dir).resolve()
        index_path = dist_dir / "index.html"
        if not index_path.is_file():
            raise OhifDistError(f"ohif_dist_dir {dist_dir}: no index.html (expected the dist/ folder of @ohif/app)")
        index = index_path.read_text(encoding="utf-8")
        entry = _ENTRY_BUNDLE.search(index)
        if entry is None or not (dist_dir / entry.group(1)).is_file():
            raise OhifDistError(f"ohif_dist_dir {dist_dir}: index.html names no app.bundle.*.js that exists")
        bundle = (dist_dir / entry.group(1)).read_text(encoding="utf-8")
        if bundle.count(PUBLIC_PATH_RUNTIME) != 1:
            raise OhifDistError(
                f"ohif_dist_dir {dist_dir}: {entry.group(1)} does not set webpack's public path to '/' exactly once; "
                "this OHIF build cannot be served under /ohif/ (build it with PUBLIC_URL=/ohif/ and serve it yourself)"
            )
        prefix = mount.rstrip("/") + "/"
        if 'window.PUBLIC_URL="/"' not in index:
            raise OhifDistError(f"ohif_dist_dir {dist_dir}: index.html does not set window.PUBLIC_URL=\"/\"")
        index = index.replace('window.PUBLIC_URL="/"', f"window.PUBLIC_URL={json.dumps(prefix)}")
        index = _ROOT_REFERENCE.sub(lambda m: f'{m.group(1)}="{prefix}', index)
        hashes = [
            "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
            for body in _INLINE_SCRIPT.findall(index)
        ]
        log.info("OHIF viewer served", extra={"dist_dir": str(dist_dir), "mount": prefix, "entry": entry.group(1)})
        return cls(
            dist_dir=dist_dir,
            index_html=index.encode(),
            prefix=prefix,
            config_js=app_config(mount.rstrip("/")).encode(),
            script_hashes=hashes,
            adapted={dist_dir / entry.group(1): bundle.replace(PUBLIC_PATH_RUNTIME, _public_path(prefix)).encode()},
        )

    @property
    def content_security_policy(self) -> str:
        """The CSP of ``/ohif/`` answers: OHIF's inline boot scripts (by hash), WebAssembly
        codecs and blob workers; everything else as strict as the app's."""
        scripts = " ".join(["'self'", *self.script_hashes, "'wasm-unsafe-eval'"])
        return (
            f"default-src 'self'; script-src {scripts}; worker-src 'self' blob:; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
            "connect-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'none'"
        )

    def file(self, relative: str) -> tuple[bytes | Path, str] | None:
        """What to send for ``/ohif/<relative>``: adapted bytes or a file inside the folder,
        with its media type; ``None`` for a path that names no file (then the caller serves
        the index, as OHIF's client-side routes such as ``viewer`` need). Reads the file on
        its first request (call it in a worker thread)."""
        if relative == "app-config.js":
            return self.config_js, "text/javascript"
        if relative in ("", "index.html"):
            return None
        candidate = (self.dist_dir / relative).resolve()
        if not candidate.is_relative_to(self.dist_dir) or not candidate.is_file():
            return None
        media_type = mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
        if candidate.suffix in (".js", ".mjs"):
            media_type = "text/javascript"
        elif candidate.suffix == ".wasm":
            media_type = "application/wasm"  # WebAssembly.instantiateStreaming insists
        if candidate.suffix not in (".js", ".css") or candidate.parent != self.dist_dir:
            return candidate, media_type
        if candidate not in self.adapted:
            self.adapted[candidate] = self._adapt(candidate)
        content = self.adapted[candidate]
        return (content if content is not None else candidate), media_type

    def _adapt(self, path: Path) -> bytes | None:
        """A webpack runtime's public path or a style sheet's root-relative urls, moved under
        the mount; ``None`` when the file has neither."""
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        if path.suffix == ".js":
            adapted = text.replace(PUBLIC_PATH_RUNTIME, _public_path(self.prefix))
        else:
            adapted = _CSS_ROOT_URL.sub(lambda m: f"url({m.group(1)}{self.prefix}", text)
        return adapted.encode("utf-8", errors="surrogateescape") if adapted != text else None


def _public_path(prefix: str) -> str:
    return f"__webpack_require__.p = {json.dumps(prefix)};"

"""OHIF's prebuilt files under /ohif/ (``ohif_dist_dir``) and the study page's link (issue 14, item 3).

A small folder laid out like ``@ohif/app``'s ``dist/`` (an index with inline boot scripts and
root-relative references, an entry bundle and a worker bundle that set webpack's public path,
a style sheet with a root-relative font) stands in for the 200 MB package; the browser test
(tests/e2e/test_ohif_browser_e2e.py) runs the real one.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path

import pytest
from web_helpers import WebEnv, add_station_row, add_user_row, client_for, make_web_env, store_dicom

from consult_web.ohif import OhifDistError, OhifSite, app_config
from e2e_helpers import PROJECT_ROOT

INDEX = (
    '<!doctype html><html><head><link rel="manifest" href="/manifest.json">'
    '<script rel="preload" as="script" src="/app-config.js"></script>'
    '<script>function browserImportFunction(n){return import(n)}window.PUBLIC_URL="/"</script>'
    '<script defer src="/app.bundle.0f61.js"></script><link href="/app.bundle.css" rel="stylesheet">'
    '<a href="//example.org/x">x</a></head><body><div id="root"></div></body></html>'
)
RUNTIME = '// webpack/runtime/public_path\n(() => {\n__webpack_require__.p = "/";\n})();\n'
REAL_DIST = PROJECT_ROOT / "test-artifacts" / "ohif" / "3.13.2" / "package" / "dist"


def fake_dist(root: Path) -> Path:
    dist = root / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text(INDEX)
    (dist / "app.bundle.0f61.js").write_text("var a = 1;\n" + RUNTIME)
    (dist / "compute.bundle.77.js").write_text("self.x = 1;\n" + RUNTIME)
    (dist / "1602.bundle.aa.js").write_text("chunk();\n")
    (dist / "app.bundle.css").write_text("@font-face{src:url(/a34f.woff2) format('woff2')}.x{background:url(data:a)}")
    (dist / "a34f.woff2").write_bytes(b"wOF2")
    (dist / "5130ccb17e3f3f5b.wasm").write_bytes(b"\0asm\1\0\0\0")
    (dist / "app-config.js").write_text("window.config = {dataSources: ['https://public.example/dicomweb']};")
    (dist / "assets" / "favicon.ico").write_bytes(b"ico")
    return dist


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> WebEnv:
    root = tmp_path_factory.mktemp("ohif-mount")
    env = make_web_env(root, ohif_dist_dir=fake_dist(root))
    add_station_row(env, "STATION1", "Trạm 1")
    add_user_row(env, "spec", "specialist")
    add_user_row(env, "bacsi", "specialist", language="vi")
    return env


def test_ohif_needs_a_login(env: WebEnv) -> None:
    client, _ = client_for(env)
    for path in ("/ohif/", "/ohif/viewer?StudyInstanceUIDs=1.2.3", "/ohif/app-config.js", "/ohif/1602.bundle.aa.js"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/login?next=%2Fohif%2F"), path


def test_index_and_client_routes_point_under_ohif_with_hashed_inline_scripts(env: WebEnv) -> None:
    client, _ = client_for(env, "spec")
    for path in ("/ohif/", "/ohif/viewer?StudyInstanceUIDs=1.2.3", "/ohif/no/such/file.js"):
        response = client.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html"), path
        html = response.text
        assert 'window.PUBLIC_URL="/ohif/"' in html
        assert 'src="/ohif/app.bundle.0f61.js"' in html and 'href="/ohif/app.bundle.css"' in html
        assert 'src="/ohif/app-config.js"' in html and 'href="/ohif/manifest.json"' in html
        assert 'href="//example.org/x"' in html  # protocol-relative: not ours to move
        assert not re.search(r'(src|href)="/(?!ohif/|/)', html), html
        csp = response.headers["content-security-policy"]
        (inline,) = re.findall(r"<script>(.*?)</script>", html)
        digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp and "'wasm-unsafe-eval'" in csp and "'unsafe-inline'" not in csp.split("style-src")[0]
        assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    # the rest of the app keeps its strict policy
    assert "'wasm-unsafe-eval'" not in client.get("/worklist").headers["content-security-policy"]


def test_app_config_points_at_our_dicomweb_not_the_packaged_one(env: WebEnv) -> None:
    client, _ = client_for(env, "spec")
    response = client.get("/ohif/app-config.js")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/javascript")
    assert "public.example" not in response.text
    assert '"qidoRoot": "/dicomweb"' in response.text and '"wadoRoot": "/dicomweb"' in response.text
    assert '"wadoUriRoot": "/dicomweb"' in response.text and '"routerBasename": "/ohif"' in response.text


def test_bundles_load_their_chunks_and_fonts_from_under_ohif(env: WebEnv) -> None:
    client, _ = client_for(env, "spec")
    for bundle in ("app.bundle.0f61.js", "compute.bundle.77.js"):
        text = client.get(f"/ohif/{bundle}").text
        assert '__webpack_require__.p = "/ohif/";' in text and '__webpack_require__.p = "/";' not in text, bundle
    assert client.get("/ohif/1602.bundle.aa.js").text == "chunk();\n"
    css = client.get("/ohif/app.bundle.css")
    assert css.headers["content-type"].startswith("text/css")
    assert "url(/ohif/a34f.woff2)" in css.text and "url(data:a)" in css.text
    wasm = client.get("/ohif/5130ccb17e3f3f5b.wasm")
    assert wasm.headers["content-type"] == "application/wasm" and wasm.content.startswith(b"\0asm")
    assert client.get("/ohif/assets/favicon.ico").content == b"ico"


def test_no_file_outside_the_dist_folder(env: WebEnv, tmp_path: Path) -> None:
    client, _ = client_for(env, "spec")
    secret = env.settings.ohif_dist_dir.parent / "secret.txt"
    secret.write_text("not for the browser")
    for path in ("/ohif/..%2Fsecret.txt", "/ohif/%2e%2e/secret.txt", "/ohif/assets/..%2F..%2Fsecret.txt"):
        response = client.get(path)
        assert "not for the browser" not in response.text, path


def test_study_page_links_to_ohif_in_both_languages(env: WebEnv, shared_dicom: Path) -> None:
    study_uid, _ = store_dicom(env, shared_dicom / "dev_07_dx_pa_utf8_name.dcm", "STATION1")
    for user, text in (("spec", "Open in OHIF"), ("bacsi", "Mở bằng OHIF")):
        client, _ = client_for(env, user)
        html = client.get(f"/studies/{study_uid}").text
        link = re.search(r'<a id="ohif-link"[^>]*href="([^"]*)"[^>]*>([^<]*)</a>', html)
        assert link, html[:500]
        assert link.groups() == (f"/ohif/viewer?StudyInstanceUIDs={study_uid}", text)


def test_ohif_url_links_to_a_viewer_served_elsewhere_and_nothing_without_it(tmp_path: Path, shared_dicom: Path) -> None:
    elsewhere = make_web_env(tmp_path / "a", ohif_url="https://viewer.example.org/")
    plain = make_web_env(tmp_path / "b")
    for env in (elsewhere, plain):
        add_station_row(env, "STATION1")
        add_user_row(env, "spec", "specialist")
    study_uid, _ = store_dicom(elsewhere, shared_dicom / "dev_07_dx_pa_utf8_name.dcm", "STATION1")
    client, _ = client_for(elsewhere, "spec")
    assert f'href="https://viewer.example.org/viewer?StudyInstanceUIDs={study_uid}"' in client.get(f"/studies/{study_uid}").text
    assert client.get("/ohif/").status_code == 404  # not served here
    study_uid, _ = store_dicom(plain, shared_dicom / "dev_07_dx_pa_utf8_name.dcm", "STATION1")
    client, _ = client_for(plain, "spec")
    assert 'id="ohif-link"' not in client.get(f"/studies/{study_uid}").text
    assert client.get("/ohif/").status_code == 404


@pytest.mark.parametrize("bad", ["javascript:alert(1)", "//evil.example/ohif", "ohif", "data:text/html,x"])
def test_ohif_url_must_be_a_path_here_or_an_http_address(bad: str) -> None:
    from xray_triage.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="ohif_url"):
        load_settings(ohif_url=bad)
    assert load_settings(ohif_url=" /ohif/ ").ohif_link_base == "/ohif"
    assert load_settings(ohif_url="https://viewer.example.org").ohif_link_base == "https://viewer.example.org"


def test_a_folder_that_is_not_ohif_dist_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(OhifDistError, match="no index.html"):
        OhifSite.load(tmp_path)
    dist = fake_dist(tmp_path)
    (dist / "app.bundle.0f61.js").write_text("var a = 1; // built with PUBLIC_URL=/viewer/\n")
    with pytest.raises(OhifDistError, match="public path"):
        OhifSite.load(dist)


def test_the_packaged_ohif_build_can_be_served_under_ohif() -> None:
    """The real @ohif/app dist that scripts/test.sh packs still has the layout adapted above."""
    if not (REAL_DIST / "index.html").is_file():
        message = f"{REAL_DIST} missing: run scripts/test.sh (npm pack @ohif/app)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    site = OhifSite.load(REAL_DIST)
    assert b'window.PUBLIC_URL="/ohif/"' in site.index_html and len(site.script_hashes) >= 1
    content, _ = site.file("app.bundle.css")
    assert isinstance(content, bytes) and b"url(/ohif/" in content
    assert "dicomweb" in app_config()

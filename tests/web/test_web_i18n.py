"""Every UI string exists in Vietnamese and English; dates follow the user's time zone."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from web_helpers import add_user_row, client_for, make_web_env

from consult_web.i18n import LANGUAGES, catalog, format_age, format_datetime, translate
from e2e_helpers import PROJECT_ROOT
from xray_triage.pipeline.pixels import PixelError
from xray_triage.store.consult_schema import CONCLUSIONS, CONSULT_STATUSES, ROLES, URGENCIES
from xray_triage.store.schema import AI_DONE, AI_FAILED, AI_NOT_APPLICABLE, AI_PENDING, QUARANTINE_REASONS
from xray_triage.store.worklist_order import TIERS

TEMPLATES = PROJECT_ROOT / "consult_web" / "templates"
DYNAMIC = {
    "ai.": (AI_PENDING, AI_DONE, AI_FAILED, AI_NOT_APPLICABLE),
    "priority.": ("urgent", "abnormal", "normal", "none"),
    "consult.status.": (*CONSULT_STATUSES, "none"),
    "urgency.": URGENCIES,
    "conclusion.": CONCLUSIONS,
    "role.": ROLES,
    "lang.": LANGUAGES,
    "quarantine.": QUARANTINE_REASONS,
    "why.": TIERS,
}


def test_both_languages_define_the_same_keys() -> None:
    vi, en = catalog("vi"), catalog("en")
    assert set(vi) == set(en), sorted(set(vi) ^ set(en))
    assert all(value.strip() for value in [*vi.values(), *en.values()])
    assert sum(vi[k] != en[k] for k in vi) > 0.8 * len(vi)  # really translated, not copied


def test_every_key_used_by_the_templates_exists() -> None:
    keys = catalog("en")
    used: set[str] = set()
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text(encoding="utf-8")
        used |= set(re.findall(r"""t\(\s*'([a-z_.]+)'\s*[,)]""", text))
        for prefix in re.findall(r"""t\(\s*'([a-z_.]+\.)'\s*~""", text):
            assert prefix in DYNAMIC, f"{template.name}: unknown dynamic key prefix {prefix!r}"
            used |= {prefix + value for value in DYNAMIC[prefix]}
    missing = sorted(k for k in used if k not in keys)
    assert not missing, missing
    assert len(used) > 80


def test_vietnamese_is_the_default_and_english_is_per_user(tmp_path: Path) -> None:
    env = make_web_env(tmp_path)
    page = client_for(env)[0].get("/login").text
    assert 'lang="vi"' in page and "Đăng nhập" in page and "không phải chẩn đoán" in page
    add_user_row(env, "bacsi", "specialist", language="vi")
    client, csrf = client_for(env, "bacsi")
    assert "Danh sách ca" in client.get("/worklist").text
    client.post("/settings/language", data={"language": "en", "csrf_token": csrf, "next": "/worklist"})
    page = client.get("/worklist").text
    assert 'lang="en"' in page and "Worklist" in page and "decision support, not a diagnosis" in page


@pytest.mark.parametrize(
    ("zone", "language", "expected"),
    [
        ("Asia/Ho_Chi_Minh", "vi", "26/11/2026 03:00"),
        ("Asia/Ho_Chi_Minh", "en", "2026-11-26 03:00"),
        ("Europe/Paris", "en", "2026-11-25 21:00"),
        ("Not/AZone", "vi", "26/11/2026 03:00"),  # unknown zones fall back to Ho Chi Minh City
    ],
)
def test_dates_in_the_users_time_zone(zone: str, language: str, expected: str) -> None:
    assert format_datetime(datetime(2026, 11, 25, 20, 0, tzinfo=UTC), zone, language) == expected


def test_waiting_times() -> None:
    assert format_age(125, "en") == "2 min"
    assert format_age(3 * 3600 + 600, "vi") == "3 giờ 10 phút"
    assert format_age(3 * 86400, "en") == "3 d"
    assert translate("vi", "no.such.key") == "no.such.key"


def test_example_config_is_valid() -> None:
    """Every key of xray-triage.example.toml is a real setting with a valid value."""
    from xray_triage.settings import load_settings

    example = PROJECT_ROOT / "xray-triage.example.toml"
    settings = load_settings(example)
    assert settings.default_language == "vi" and settings.login_max_failures == 5


def test_users_set_their_own_time_zone(tmp_path: Path) -> None:
    env = make_web_env(tmp_path)
    add_user_row(env, "bacsi", "specialist", language="en")
    client, csrf = client_for(env, "bacsi")
    assert 'value="Asia/Ho_Chi_Minh"' in client.get("/settings").text
    bad = client.post("/settings", data={"timezone": "Mars/Olympus", "csrf_token": csrf})
    assert bad.status_code == 400 and "unknown time zone" in bad.text
    assert client.post("/settings", data={"timezone": "Europe/Paris"}).status_code == 403  # CSRF
    ok = client.post("/settings", data={"timezone": "Europe/Paris", "csrf_token": csrf}, follow_redirects=True)
    assert ok.status_code == 200 and 'id="settings-saved"' in ok.text and 'value="Europe/Paris"' in ok.text


SOURCES = PROJECT_ROOT / "consult_web"


def test_every_user_error_has_both_languages() -> None:
    """``LocalizedError`` keys in the code (literal or f-string prefix) exist in both catalogs."""
    vi, en = catalog("vi"), catalog("en")
    used: set[str] = set()
    for source in SOURCES.rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        used |= set(re.findall(r'LocalizedError\(\s*\d+,\s*"(usererror\.[a-z_]+)"', text))
        for prefix, suffix in re.findall(r'LocalizedError\(\s*\d+,\s*f"(usererror\.)\{what\}(_[a-z_]+)"', text):
            used |= {f"{prefix}{what}{suffix}" for what in ("question", "reply")}
        for prefix in re.findall(r'LocalizedError\(\s*\d+,\s*f"(usererror\.image_)\{exc\.kind\}"', text):
            used |= {f"{prefix}{kind}" for kind in PixelError.KINDS}
    assert len(used) >= 15, used
    assert not sorted(k for k in used if k not in en or k not in vi)


def test_errors_a_user_can_act_on_are_in_their_language(tmp_path: Path) -> None:
    from consult_web.errors import LocalizedError

    env = make_web_env(tmp_path)
    add_user_row(env, "bacsi", "specialist", language="vi")
    add_user_row(env, "doctor", "specialist", language="en")
    vi_client, _ = client_for(env, "bacsi")
    en_client, _ = client_for(env, "doctor")
    page = vi_client.get("/worklist", params={"date_from": "2026-13-40"})
    assert page.status_code == 400 and "cần ngày dạng YYYY-MM-DD" in page.text and "2026-13-40" in page.text
    page = en_client.get("/worklist", params={"date_from": "2026-13-40"})
    assert page.status_code == 400 and "expected a date YYYY-MM-DD" in page.text

    def closed() -> None:
        raise LocalizedError(409, "usererror.consult_closed")

    env.app.add_api_route("/api/test-closed", closed)
    answer = vi_client.get("/api/test-closed")  # JSON: English detail for programs, the user's message for scripts
    assert answer.status_code == 409
    assert answer.json() == {"detail": "This consult is closed.", "message": "Hội chẩn này đã đóng."}


@pytest.mark.parametrize(
    ("language", "age", "sex", "expected"),
    [
        ("vi", "067Y", "M", "67 tuổi, Nam"),
        ("en", "067Y", "M", "67 y, Male"),
        ("vi", "003M", "F", "3 tháng tuổi, Nữ"),
        ("en", "010D", "O", "10 d old, Other"),
        ("vi", "", "F", "Nữ"),
        ("vi", "67", "", "67"),  # not a DICOM AS: shown as written
        ("en", None, None, ""),
    ],
)
def test_dicom_age_and_sex_in_the_users_words(language: str, age: str | None, sex: str | None, expected: str) -> None:
    from consult_web.i18n import format_age_sex

    assert format_age_sex(age, sex, language) == expected


def test_findings_dates_and_audit_actions_in_the_users_language() -> None:
    from consult_web.i18n import audit_action, finding_name, format_dicom_date, format_dicom_time

    assert finding_name("Effusion", "vi") == "Tràn dịch màng phổi"
    assert finding_name("Pleural_Thickening", "en") == "Pleural thickening"
    assert finding_name("Some_New_Label", "vi") == "Some New Label"  # a label the catalogs do not know
    assert format_dicom_date("20251110", "vi") == "10/11/2025" and format_dicom_date("20251110", "en") == "2025-11-10"
    assert format_dicom_date("2025", "vi") == "2025"
    assert format_dicom_time("144931.123") == "14:49" and format_dicom_time("1449") == "14:49" and format_dicom_time("99") == "99"
    assert audit_action("study.view", "vi") == "Xem ca chụp" and audit_action("made.up", "vi") == "made.up"
    # one date format per page: the DICOM dates and the stored times agree
    stamp = datetime(2025, 11, 10, 3, 0, tzinfo=UTC)
    assert format_datetime(stamp, "Asia/Ho_Chi_Minh", "vi").startswith(format_dicom_date("20251110", "vi"))


def test_every_label_of_the_shipped_model_and_audit_action_is_translated() -> None:
    vi = catalog("vi")
    labels = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
              "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax", "Abnormal"]  # fmt: skip
    assert all(f"finding.{label}" in vi for label in labels)
    used = set()
    for source in (PROJECT_ROOT / "consult_web").rglob("*.py"):
        used |= set(re.findall(r"""audit\(\s*session,\s*\w+,\s*"([a-z_.]+)\"""", source.read_text(encoding="utf-8")))
        used |= set(re.findall(r"""_act\([^)]*?"(consult\.[a-z_]+)\"""", source.read_text(encoding="utf-8")))
    assert {"study.view", "login", "consult.reply", "consult.conclude"} <= used
    assert not sorted(a for a in used if f"audit.{a}" not in vi)


def test_role_names_and_footer_read_for_doctors() -> None:
    for language in LANGUAGES:
        strings = catalog(language)
        footer = strings["footer.demo_model"].lower()
        assert "readme" not in footer and "operator" not in footer and "plug" not in footer
    # the role in the top bar is the one the error messages use
    assert catalog("vi")["role.specialist"].lower() in catalog("vi")["usererror.only_specialist_claims"].lower()
    assert catalog("vi")["role.station"].lower() in catalog("vi")["usererror.only_station_requests"].lower()

"""Shared fixtures: the shared DICOM test data, a tiny ONNX model, real server processes."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

# The helpers live beside this file; make them importable however pytest imports tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_helpers import (  # noqa: E402
    SHARED_DICOM,
    STATION1,
    STATION1_NAME,
    SampleFile,
    Server,
    add_stations,
    create_api_user,
    load_manifest,
)

KINDS = ("unit", "web", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its kind, from its directory (tests/unit, tests/web, tests/e2e)."""
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        try:
            kind = Path(item.path).resolve().relative_to(tests_dir).parts[0]
        except ValueError:
            continue
        if kind in KINDS:
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def shared_dicom() -> Path:
    if not (SHARED_DICOM / "manifest.csv").is_file():
        pytest.skip(
            f"shared DICOM test data not found: expected {SHARED_DICOM}/manifest.csv "
            "(../shared/data/dicom beside the project root)"
        )
    return SHARED_DICOM


@pytest.fixture(scope="session")
def samples(shared_dicom: Path) -> list[SampleFile]:
    entries = load_manifest()
    missing = [e.name for e in entries if not e.path.is_file()]
    assert not missing, f"files named in manifest.csv are missing: {missing}"
    assert entries, "manifest.csv lists no files"
    return entries


@pytest.fixture(scope="session")
def dcmtk() -> None:
    missing = [tool for tool in ("storescu", "echoscu", "dcmodify") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"dcmtk tools not installed: {', '.join(missing)} (apt-get install dcmtk)")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ONNX model and its card (tests/onnx_factory.py): fast, no trained weights."""
    from onnx_factory import write_tiny_model_dir

    directory = tmp_path_factory.mktemp("tiny-model")
    write_tiny_model_dir(directory)
    return directory


class ServerLauncher:
    """Starts ``xray-triage serve`` processes and makes sure they all stop cleanly."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.tiny_model = tiny_model
        self.servers: list[Server] = []

    def launch(
        self,
        name: str = "server",
        *,
        model: Path | None | str = "tiny",
        env: dict[str, str] | None = None,
        stations: Sequence[tuple[str, str, str | None]] = (),
        start: bool = True,
    ) -> Server:
        """A server with a fresh data directory where STATION1 (and ``stations``) are registered.

        ``model="tiny"`` uses the tiny test model; ``model=None`` passes no ``--model``
        (the shipped default model).
        """
        root = self.tmp_path_factory.mktemp(name)
        server = Server(
            root=root, model_dir=self.tiny_model if model == "tiny" else model, env_extra=dict(env or {})
        )
        self.servers.append(server)
        add_stations(server.data_dir, [(STATION1, STATION1_NAME, None)])  # creates the database
        server.api_token = create_api_user(server.data_dir)
        if stations:
            add_stations(server.data_dir, stations)
        if start:
            server.start()
        return server

    def close(self) -> None:
        errors = []
        for server in self.servers:
            if server.running:
                try:
                    server.stop_cleanly()
                except AssertionError as exc:
                    errors.append(str(exc))
        assert not errors, "\n\n".join(errors)


@pytest.fixture
def launch_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, dcmtk: None, shared_dicom: Path
) -> Iterator[ServerLauncher]:
    launcher = ServerLauncher(tmp_path_factory, tiny_model)
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def module_launcher(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, dcmtk: None, shared_dicom: Path
) -> Iterator[ServerLauncher]:
    launcher = ServerLauncher(tmp_path_factory, tiny_model)
    yield launcher
    launcher.close()


# -- the database: SQLite, or PostgreSQL with XRAY_TRIAGE_TEST_DATABASE_URL (tests/db_helpers.py) --


@pytest.fixture(autouse=True)
def _test_database(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """On PostgreSQL: every in-process ``Settings`` of this test uses a database of its own."""
    import db_helpers

    if not db_helpers.on_postgres():
        yield
        return
    url = db_helpers.create_database()
    monkeypatch.setenv("XRAY_TRIAGE_DATABASE_URL", url)
    yield
    db_helpers.drop_database(url)


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """A fresh database URL for one test: SQLite under tmp_path, or a new PostgreSQL database."""
    import db_helpers

    url = db_helpers.database_url(tmp_path)
    yield url
    if db_helpers.on_postgres():
        db_helpers.drop_database(url)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import db_helpers

    if db_helpers.on_postgres():
        db_helpers.drop_data_dir_databases()

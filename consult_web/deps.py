"""What routes depend on, as typed ``Annotated`` aliases (FastAPI's dependency injection).

A route names what it needs in its signature instead of reaching into ``request.app.state``:

- ``Db``: the app's ``Database`` (for routes that open more than one unit of work);
- ``ReadSession``: a read-only session (deferred BEGIN: never takes SQLite's write lock;
  anything written is rolled back) around the route function;
- ``WriteSession``: a session that commits when the route function returns and rolls back
  when it raises. Both end *before* the response is sent (``scope="function"``), so a
  failed commit is answered as an error, never after a success was already sent;
- ``CurrentUser``: the logged-in user (``auth.current_user``: session cookie + CSRF, or an
  API bearer token); ``AdminUser``: the same, and 403 unless an admin;
- ``AppSettings``, ``Storage``, ``Card``: the settings, the disk guard and the model card.

A route that needs the user to be known before a session opens (every route) lists
``CurrentUser`` first: FastAPI resolves dependencies in parameter order. The lookups of app
state are ``async`` (FastAPI would run a plain ``def`` in its thread pool: a thread hop per
dependency for nothing); the sessions are plain generators, run in the thread pool, because
opening and committing one may wait on the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from consult_web.auth import current_user
from consult_web.permissions import require_admin
from xray_triage.inference.card import ModelCard
from xray_triage.settings import Settings
from xray_triage.store.db import Database
from xray_triage.store.diskspace import StorageGuard
from xray_triage.store.users import AuthUser


async def get_db(request: Request) -> Database:
    return request.app.state.db


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_storage(request: Request) -> StorageGuard:
    return request.app.state.storage


async def get_card(request: Request) -> ModelCard | None:
    return request.app.state.card


def urgent_labels(card: ModelCard | None) -> tuple[str, ...]:
    """The card's labels that make a study urgent (none known without a card)."""
    return tuple(card.triage.urgent_labels) if card is not None else ()


Db = Annotated[Database, Depends(get_db)]


def read_session(db: Db) -> Iterator[Session]:
    with db.read_session() as session:
        yield session


def write_session(db: Db) -> Iterator[Session]:
    with db.session() as session:
        yield session


ReadSession = Annotated[Session, Depends(read_session, scope="function")]
WriteSession = Annotated[Session, Depends(write_session, scope="function")]
CurrentUser = Annotated[AuthUser, Depends(current_user)]
AdminUser = Annotated[AuthUser, Depends(require_admin)]
AppSettings = Annotated[Settings, Depends(get_settings)]
Storage = Annotated[StorageGuard, Depends(get_storage)]
Card = Annotated[ModelCard | None, Depends(get_card)]

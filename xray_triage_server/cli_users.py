"""``xray-triage users ...`` and ``xray-triage tokens ...``: accounts of the web view and JSON API.

Passwords are never taken as command-line arguments (they would land in shell
history and ``ps``): ``--password-stdin`` reads one line from standard input;
without it, the password is asked for twice on the terminal.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from xray_triage_server.cli_error import CliError

ROLE_CHOICES = ("station", "specialist", "admin")  # xray_triage.store.consult_schema.ROLES (keeps --help fast)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise CliError("--password-stdin: nothing on standard input (pipe the password in)")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask for the password: use --password-stdin")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Repeat password: "):
        raise CliError("the two passwords differ")
    return first


def cmd_users(args: argparse.Namespace, settings: Any) -> int:
    from xray_triage.store.db import open_database
    from xray_triage.store.users import UserError, add_user, list_users, set_disabled, set_password

    db = open_database(settings)
    try:
        with db.session() as session:
            if args.users_cmd == "add":
                password = _read_password(args.password_stdin)
                user = add_user(
                    session, args.username, password, args.role, station_ae=args.station,
                    display_name=args.name, language=args.language, timezone=args.timezone,
                )  # fmt: skip
                print(f"added {user.role} user {user.username}" + (f" (station {user.station_ae})" if user.station_ae else ""))
            elif args.users_cmd in ("disable", "enable"):
                set_disabled(session, args.username, args.users_cmd == "disable")
                print(f"{args.users_cmd}d user {args.username}")
            elif args.users_cmd == "passwd":
                set_password(session, args.username, _read_password(args.password_stdin))
                print(f"password changed for {args.username}; their sessions were ended")
            else:
                _print_users(list_users(session), as_json=args.json)
    except UserError as exc:
        raise CliError(str(exc)) from exc
    finally:
        db.dispose()
    return 0


def _print_users(users: list[Any], *, as_json: bool) -> None:
    rows = [
        {
            "username": u.username, "name": u.display_name, "role": u.role, "station": u.station_ae or "",
            "language": u.language, "disabled": u.disabled,
            "last_login_at": u.last_login_at.isoformat() if u.last_login_at else None,
        }
        for u in users
    ]  # fmt: skip
    if as_json:
        import json

        print(json.dumps(rows, ensure_ascii=False, indent=2))
    elif not rows:
        print("no users; add one with: xray-triage users add NAME --role admin --password-stdin")
    else:
        for r in rows:
            state = "disabled" if r["disabled"] else "active"
            print(f"{r['username']:<24} {r['role']:<11} {r['station']:<16} {state:<8} {r['name']}")


def cmd_tokens(args: argparse.Namespace, settings: Any) -> int:
    from xray_triage.store.db import open_database
    from xray_triage.store.users import UserError, create_api_token, revoke_api_tokens

    db = open_database(settings)
    try:
        with db.session() as session:
            if args.tokens_cmd == "create":
                token = create_api_token(session, args.username, args.name)
                print(token)
                print(
                    "Keep this token secret; it is shown only once. Use it as "
                    "'Authorization: Bearer <token>' on /api/... requests.",
                    file=sys.stderr,
                )
            else:
                count = revoke_api_tokens(session, args.username)
                print(f"revoked {count} token(s) of {args.username}")
    except UserError as exc:
        raise CliError(str(exc)) from exc
    finally:
        db.dispose()
    return 0


def register(sub: Any, common: argparse.ArgumentParser, settings_for: Any) -> None:
    """Add the ``users`` and ``tokens`` command groups; ``settings_for(args)`` builds Settings."""
    users = sub.add_parser("users", help="accounts of the web view (station doctors, specialists, admins)")
    us = users.add_subparsers(dest="users_cmd", required=True, metavar="ACTION")
    add = us.add_parser("add", parents=[common], help="create a user")
    add.add_argument("username", metavar="NAME")
    add.add_argument("--role", required=True, choices=ROLE_CHOICES)
    add.add_argument("--station", metavar="AE_TITLE", help="station users: the registered station whose studies they see")
    add.add_argument("--name", default="", help='display name, e.g. "BS. Nguyễn Văn An"')
    add.add_argument("--language", default="vi", choices=("vi", "en"))
    add.add_argument("--timezone", default="Asia/Ho_Chi_Minh", help="IANA time zone for dates in the UI")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    ls = us.add_parser("list", parents=[common], help="list users")
    ls.add_argument("--json", action="store_true")
    for action, text in (("disable", "block a user: ends their sessions, revokes their tokens"), ("enable", "unblock")):
        p = us.add_parser(action, parents=[common], help=text)
        p.add_argument("username", metavar="NAME")
    pw = us.add_parser("passwd", parents=[common], help="set a new password (ends the user's sessions)")
    pw.add_argument("username", metavar="NAME")
    pw.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    users.set_defaults(func=lambda args: cmd_users(args, settings_for(args)))

    tokens = sub.add_parser("tokens", help="API tokens for the JSON API")
    ts = tokens.add_subparsers(dest="tokens_cmd", required=True, metavar="ACTION")
    create = ts.add_parser("create", parents=[common], help="create a token for USER (printed once)")
    create.add_argument("username", metavar="USER")
    create.add_argument("--name", default="", help="what the token is for")
    revoke = ts.add_parser("revoke", parents=[common], help="revoke all tokens of USER")
    revoke.add_argument("username", metavar="USER")
    tokens.set_defaults(func=lambda args: cmd_tokens(args, settings_for(args)))

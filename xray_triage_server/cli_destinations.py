"""``xray-triage destinations ...``: the PACS peers stored objects are C-STOREd to.

A running server picks up an added or removed destination within ``delivery_poll_s``; objects
stored from then on are queued for it (earlier ones are not sent to a new destination).
``retry`` makes everything pending for a destination due now (after fixing the peer).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from xray_triage_server.cli_error import CliError

SEND_HELP = (
    "comma list of: images (every stored instance, as received), ai-results, consult-results; "
    "or none (nothing is pushed: a C-MOVE destination only)"
)


def cmd_destinations(args: argparse.Namespace, settings: Any) -> int:
    from xray_triage.store.db import open_database
    from xray_triage.store.destinations import (
        DestinationError,
        DestinationSpec,
        add_destination,
        destination_states,
        parse_send,
        remove_destination,
        retry_destination,
        sync_configured,
    )
    from xray_triage_server.delivery import configured_specs

    db = open_database(settings)
    try:
        with db.session() as session:
            sync_configured(session, configured_specs(settings))  # [[destinations]] of the TOML file
            if args.destinations_cmd == "add":
                spec = DestinationSpec(
                    args.name, args.ae_title, args.host, args.port, parse_send(args.send), args.tls, args.rate_limit
                )
                d = add_destination(session, spec)
                print(f"added destination {d.name}: {d.ae_title} at {d.host}:{d.port}, sends {d.send}")
            elif args.destinations_cmd == "remove":
                if not remove_destination(session, args.name):
                    raise CliError(f"no destination named {args.name!r} (see 'xray-triage destinations list')")
                print(f"removed destination {args.name} and its queue")
            elif args.destinations_cmd == "retry":
                count = retry_destination(session, args.name)
                print(f"{count} object(s) of {args.name} due now; a running server sends them within delivery_poll_s")
            else:
                rows = destination_states(session, failing_degraded_s=settings.destination_failing_degraded_s)
                if args.json:
                    print(json.dumps(rows, ensure_ascii=False, indent=2))
                else:
                    _print_table(rows)
    except DestinationError as exc:
        raise CliError(str(exc)) from exc
    finally:
        db.dispose()
    return 0


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no destinations; add one with: xray-triage destinations add NAME --ae-title AE --host HOST --port PORT --send images")
        return
    print(f"{'NAME':<16} {'PEER':<36} {'SENDS':<34} {'STATE':<9} {'QUEUED':>6} {'SENT':>6} {'FAILED':>6}  LAST SUCCESS / LAST ERROR")
    for r in rows:
        peer = f"{r['ae_title']}@{r['host']}:{r['port']}" + (" tls" if r["tls"] else "")
        print(
            f"{r['name']:<16} {peer:<36} {','.join(r['send']) or 'none':<34} {r['state']:<9} {r['queued']:>6} {r['sent']:>6} "
            f"{r['failed']:>6}  {r['last_success_at'] or '-'} / {r['last_error'] or '-'}"
        )


def register(sub: Any, common: argparse.ArgumentParser, settings_for: Any) -> None:
    """Add the ``destinations`` command group; ``settings_for(args)`` builds Settings."""
    destinations = sub.add_parser("destinations", help="PACS destinations that stored objects are sent to (C-STORE)")
    ds = destinations.add_subparsers(dest="destinations_cmd", required=True, metavar="ACTION")
    add = ds.add_parser("add", parents=[common], help="add a DICOM peer (PACS) to send to")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--ae-title", required=True, help="the peer's (called) AE title")
    add.add_argument("--host", required=True)
    add.add_argument("--port", required=True, type=int)
    add.add_argument("--send", required=True, help=SEND_HELP)
    add.add_argument("--tls", action="store_true", help="DICOM over TLS (delivery_tls_* settings: CA, client certificate)")
    add.add_argument("--rate-limit", type=int, metavar="BYTES_PER_S", help="at most this many bytes per second")
    ls = ds.add_parser("list", parents=[common], help="each destination: queued, sent, failed, last error, last success")
    ls.add_argument("--json", action="store_true")
    for action, text in (
        ("remove", "remove a destination and its queue"),
        ("retry", "retry everything pending for a destination now"),
    ):
        p = ds.add_parser(action, parents=[common], help=text)
        p.add_argument("name", metavar="NAME")
    destinations.set_defaults(func=lambda args: cmd_destinations(args, settings_for(args)))

"""The ``xray-triage`` command line: serve, stations, studies, predict, models."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from xray_triage import __version__
from xray_triage.settings import Settings, SettingsError, load_settings
from xray_triage_server.cli_error import CliError

log = logging.getLogger("xray_triage")
VARIANT_CHOICES = ("fp32", "int8", "fp16")  # xray_triage.inference.card.VARIANTS (not imported: keeps --help fast)


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    return load_settings(getattr(args, "config", None), data_dir=getattr(args, "data_dir", None), **overrides)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2, default=str))


# -- serve -----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from xray_triage.logging_setup import configure_logging

    if args.roles is not None and args.roles.strip() == "receiver":
        return _serve_receiver(args)
    from xray_triage_server.serve import run_server

    settings = _settings(
        args,
        dicom_port=args.dicom_port,
        http_port=args.http_port,
        dicom_host=args.dicom_host,
        http_host=args.http_host,
        model_dir=args.model,
        model_variant=args.variant,
        ae_title=args.ae_title,
        roles=args.roles,
        gateway_processes=args.gateway_processes,
    )
    configure_logging(settings.log_level, settings.log_format)
    return run_server(settings)


def _serve_receiver(args: argparse.Namespace) -> int:
    """``serve --roles receiver``: a receiver process that the gateway process started itself
    (``gateway_processes`` > 1, ``xray_triage_server/receiver.py``); not for starting by hand."""
    import os

    from xray_triage.logging_setup import configure_logging
    from xray_triage_server.receiver import read_settings, run_receiver

    if args.events_fd is None or args.receiver_index is None:
        raise CliError("the receiver role is started by the gateway process when gateway_processes > 1")
    try:
        settings = read_settings(sys.stdin.fileno())
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    fields = {"receiver": args.receiver_index, "pid": os.getpid()}
    configure_logging(settings.log_level, settings.log_format, fields=fields)
    return run_receiver(settings, args.receiver_index, args.events_fd, sys.stdin.fileno(), handoff_fd=args.handoff_fd)


# -- stations --------------------------------------------------------------------------


def cmd_stations(args: argparse.Namespace) -> int:
    from xray_triage.store.db import open_database
    from xray_triage.store.station_certs import pin_certificate, pinned_fingerprints, unpin_all
    from xray_triage.store.stations import StationError, add_station, list_stations, remove_station

    db = open_database(_settings(args))
    try:
        with db.session() as session:
            if args.stations_cmd == "add":
                station = add_station(session, args.ae_title, args.name or "", args.allow_ip)
                for fingerprint in args.tls_cert_fingerprint or []:
                    pin_certificate(session, station.ae_title, fingerprint)
                pinned = f", {len(args.tls_cert_fingerprint)} pinned TLS certificate(s)" if args.tls_cert_fingerprint else ""
                print(f"added station {station.ae_title} ({station.name or 'no name'}){pinned}")
            elif args.stations_cmd == "remove":
                unpin_all(session, args.ae_title)
                if not remove_station(session, args.ae_title):
                    raise CliError(f"no station with AE title {args.ae_title!r} (see 'xray-triage stations list')")
                print(f"removed station {args.ae_title}")
            else:
                rows = [
                    {
                        "ae_title": s.ae_title,
                        "name": s.name,
                        "allowed_ips": s.allowed_ips or "",
                        "created_at": s.created_at,
                        "tls_cert_sha256": sorted(pinned_fingerprints(session, s.ae_title)),
                    }
                    for s in list_stations(session)
                ]
                if args.json:
                    _print_json(rows)
                elif not rows:
                    print("no stations registered; add one with: xray-triage stations add AE_TITLE --name NAME")
                else:
                    for r in rows:
                        pins = f"  {len(r['tls_cert_sha256'])} pinned TLS certificate(s)" if r["tls_cert_sha256"] else ""
                        print(f"{r['ae_title']:<16}  {r['name']:<40}  {r['allowed_ips'] or 'any address'}{pins}")
    except StationError as exc:
        raise CliError(str(exc)) from exc
    finally:
        db.dispose()
    return 0


# -- studies ---------------------------------------------------------------------------


def cmd_studies(args: argparse.Namespace) -> int:
    from xray_triage.store.db import open_database
    from xray_triage.store.queries import get_study, list_studies

    settings = _settings(args, model_dir=getattr(args, "model", None))
    db = open_database(settings)
    if args.studies_cmd == "redecode-text":
        return _redecode_text(db, settings, dry_run=args.dry_run)
    try:
        with db.session() as session:
            urgent = _urgent_labels(settings)
            if args.studies_cmd == "show":
                study = get_study(session, args.study_uid, urgent)
                if study is None:
                    raise CliError(f"no study with Study Instance UID {args.study_uid}")
                _print_json(study) if args.json else _print_study(study, settings.default_timezone)
            else:
                studies = list_studies(session, limit=args.limit, urgent_labels=urgent)
                _print_json(studies) if args.json else _print_study_table(studies, settings.default_timezone)
    finally:
        db.dispose()
    return 0


def _redecode_text(db: Any, settings: Settings, *, dry_run: bool) -> int:
    from xray_triage.store.redecode import redecode_text

    try:
        with db.session() as session:
            changes = redecode_text(session, settings.data_dir, settings.default_character_set, apply=not dry_run)
    finally:
        db.dispose()
    for change in changes:
        print(f"{change.study_uid} {change.field}: {change.old!r} -> {change.new!r}")
    verb = "would change" if dry_run else "changed"
    print(f"{verb} {len(changes)} text field(s)")
    return 0


def _urgent_labels(settings: Settings) -> tuple[str, ...]:
    """The configured model card's urgent labels (a TOML read; none when the card cannot be read)."""
    from xray_triage.inference.card import ModelCardError, load_card

    try:
        return tuple(load_card(settings.model_dir, verify_sha256=False, variant=settings.model_variant).triage.urgent_labels)
    except (ModelCardError, OSError) as exc:
        log.warning("model card unreadable (%s): urgent findings are not marked", exc)
        return ()


WHY_TEXT = {  # xray_triage.store.worklist_order.TIERS
    "emergency_consult": "emergency consult request (open)",
    "urgent_consult": "urgent consult request (open)",
    "ai_urgent": "AI: urgent finding",
    "ai_abnormal": "AI: abnormal",
    "ai_normal": "AI: normal",
    "ai_none": "no AI result yet",
}


def _finding_text(f: dict[str, Any]) -> str:
    mark = " URGENT" if f["urgent"] else ""
    return f"{f['label']} {f['probability']:.2f}>={f['threshold']:.2f}{mark}"


def _findings_text(findings: list[dict[str, Any]]) -> str:
    """The flagged findings (the ones over their threshold), not the highest probabilities."""
    return ", ".join(_finding_text(f) for f in findings) or "-"


def _rule_text(study: dict[str, Any]) -> str:
    """Which triage rule gave the study its AI priority (``triage/scoring.py``)."""
    findings, priority = study["findings"], study["priority"]
    urgent = [f["label"] for f in findings if f["urgent"]]
    if priority == "urgent":
        return f"urgent: flagged urgent finding(s) {', '.join(urgent) or ', '.join(f['label'] for f in findings)}"
    if priority == "abnormal":
        if findings:
            return f"abnormal: flagged finding(s) {', '.join(f['label'] for f in findings)}"
        return "abnormal: abnormal_score at or above the card's abnormal_threshold"
    if priority == "normal":
        return "normal: no finding at or above its threshold"
    return "no AI result"


def _local_time(iso: str | None, tz_name: str) -> str:
    """An ISO timestamp (UTC, from the store) as local wall-clock time in ``tz_name``: "YYYY-MM-DD HH:MM"."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    if not iso:
        return "-"
    return datetime.fromisoformat(iso).astimezone(ZoneInfo(tz_name)).strftime("%Y-%m-%d %H:%M")


def _print_study_table(studies: list[dict[str, Any]], tz_name: str) -> None:
    if not studies:
        print("no studies yet")
        return
    print(f"times in {tz_name} (the default_timezone setting)")
    print(
        f"{'WHY (worklist order)':<34} {'PRIORITY':<9} {'AI':<15} {'RECEIVED':<20} {'STATION':<16} "
        f"{'PATIENT':<28} {'FLAGGED (p>=threshold)':<44} STUDY UID"
    )
    for s in studies:
        print(
            f"{WHY_TEXT.get(s['why'], s['why']):<34} {s['priority'] or '-':<9} {s['ai_status']:<15} "
            f"{_local_time(s['received_at'], tz_name):<20} {s['station']['ae_title']:<16} {s['patient_name'][:28]:<28} "
            f"{_findings_text(s['findings'])[:44]:<44} {s['study_uid']}"
        )


def _print_study(study: dict[str, Any], tz_name: str) -> None:
    print(f"Study      {study['study_uid']}")
    print(f"Patient    {study['patient_name']} ({study['patient_id']}), {study['patient_sex']} {study['patient_age']}")
    print(f"Station    {study['station']['ae_title']} {study['station']['name']}")
    print(f"Received   {_local_time(study['received_at'], tz_name)} ({tz_name})")
    print(f"AI status  {study['ai_status']}    priority: {study['priority'] or '-'}")
    consult = study["consult_status"] or "none"
    if study["consult_urgency"] and study["consult_status"]:
        consult += f" ({study['consult_urgency']})"
    print(f"Consult    {consult}")
    print(f"Why        {WHY_TEXT.get(study['why'], study['why'])}")
    print(f"Rule       {_rule_text(study)}")
    print("Flagged    " + ("none" if not study["findings"] else ""))
    for f in study["findings"]:
        mark = "  (urgent finding)" if f["urgent"] else ""
        print(f"  - {f['label']}: {f['probability']:.3f} >= threshold {f['threshold']:.3f}{mark}")
    for image in study["images"]:
        print(f"- {image['sop_instance_uid']}  {image['modality']} {image['view_position']}  ai={image['ai_status']}")
        if image["ai_error"]:
            print(f"    error: {image['ai_error']}")
        if image["result"]:
            r = image["result"]
            probs = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["probabilities"].items(), key=lambda kv: -kv[1]))
            print(f"    {r['priority']}  abnormal_score {r['abnormal_score']:.3f}  model {r['model_version']}")
            print(f"    probabilities: {probs}")
            print(f"    timings ms: {r['timings_ms']}")
    print(f"\n{study.get('disclaimer', '')}".rstrip())


# -- predict ---------------------------------------------------------------------------


def cmd_predict(args: argparse.Namespace) -> int:
    from xray_triage.inference.card import load_card
    from xray_triage.inference.runner import ModelRunner
    from xray_triage.pipeline.pixels import PixelError
    from xray_triage.triage.analyze import analyze_file

    settings = _settings(args, model_dir=args.model, model_variant=args.variant)
    card = load_card(settings.model_dir, variant=settings.model_variant)
    runner = ModelRunner(card, providers=settings.providers, intra_op_threads=settings.intra_op_threads)
    failures = 0
    for file in args.files:
        try:
            analysis = analyze_file(
                Path(file), runner, reduced_decode=settings.j2k_reduced_decode, max_frame_pixels=settings.max_frame_pixels
            )
        except (PixelError, OSError) as exc:
            failures += 1
            record = {"file": file, "error": str(exc)}
        else:
            record = {
                "file": file,
                "probabilities": analysis.score.probabilities,
                "flagged": analysis.score.flagged,
                "abnormal_score": analysis.score.abnormal_score,
                "priority": analysis.score.priority,
                "model_version": analysis.model_version,
            }
        if args.json or "error" in record:
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            flagged = ", ".join(record["flagged"]) or "none"
            print(f"{file}: {record['priority']} (abnormal_score {record['abnormal_score']:.3f}; flagged: {flagged})")
    return 1 if failures else 0


# -- models ----------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from xray_triage.inference.card import ModelCardError, list_cards, load_card
    from xray_triage.inference.runner import ModelRunner

    settings = _settings(args, model_dir=args.model, model_variant=args.variant)
    card = load_card(settings.model_dir, variant=settings.model_variant)  # verifies sha256
    if args.models_cmd == "verify":
        runner = ModelRunner(card, providers=settings.providers, warm_up=False)
        seconds = runner.warm_up()
        print(f"ok: {card.model_version} sha256 {card.sha256[:16]}… smoke inference {seconds * 1000:.0f} ms on {runner.providers[0]}")
    else:
        print(f"{card.model_version}  {card.path}")
        print(f"  labels: {', '.join(card.labels)}")
        print(f"  input: {card.input.channels}x{card.input.height}x{card.input.width} ({card.input.resize})")
        print(f"  intended use: {card.intended_use}")
        variants = list_cards(settings.model_dir) if Path(settings.model_dir).is_dir() else {}
        if variants:
            print(f"  variants in {settings.model_dir} (model_variant = {settings.model_variant!r}):")
        for variant, path in variants.items():
            try:
                other = load_card(path)
                size_mb = other.onnx_file.stat().st_size / 1e6
                text = f"{other.model_version}  {other.onnx_file.name} {size_mb:.1f} MB, sha256 ok"
            except ModelCardError as exc:
                text = f"error: {exc}"
            print(f"  {'*' if path == card.path else ' '} {variant:<5} {path.name:<16} {text}")
    return 0


def cmd_models_evaluate(args: argparse.Namespace) -> int:
    from xray_triage.evaluation.evaluate import EvaluationError, evaluate, format_table
    from xray_triage.inference.card import load_card
    from xray_triage.inference.runner import ModelRunner
    from xray_triage.pipeline.pixels import PixelError

    settings = _settings(args, model_dir=args.model)
    runner = ModelRunner(load_card(settings.model_dir), providers=settings.providers)
    try:
        result = evaluate(
            runner, args.data, n_boot=args.bootstrap, seed=args.seed, reduced_decode=settings.j2k_reduced_decode
        )
    except (EvaluationError, PixelError, OSError) as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        _print_json(result)
    else:
        print(format_table(result))
    return 0


# -- parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML settings file (also XRAY_TRIAGE_CONFIG)")
    common.add_argument("--data-dir", type=Path, help="data directory (also XRAY_TRIAGE_DATA_DIR; default ./xray-triage-data)")

    parser = argparse.ArgumentParser(
        prog="xray-triage",
        description="AI-assisted chest X-ray triage server. AI output is decision support, not a diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"xray-triage {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the DICOM gateway, triage workers and HTTP app")
    serve.add_argument("--dicom-port", type=int, help="DICOM listening port (default 11112)")
    serve.add_argument("--http-port", type=int, help="HTTP port (default 8000)")
    serve.add_argument("--dicom-host", help="DICOM bind address (default 0.0.0.0)")
    serve.add_argument("--http-host", help="HTTP bind address (default 127.0.0.1)")
    serve.add_argument("--ae-title", help="our AE title (default XRAY_TRIAGE)")
    serve.add_argument("--model", type=Path, help="model directory or card (default: the shipped demo model)")
    serve.add_argument("--variant", choices=VARIANT_CHOICES, help="model_variant: which card in the model directory")
    serve.add_argument(
        "--roles",
        help="what this process runs, comma-separated: gateway,worker,web (default: all three); "
        "several processes share one database and data directory",
    )
    serve.add_argument(
        "--gateway-processes",
        type=int,
        metavar="N",
        help="gateway_processes: N processes receive DICOM on the same port(s) (default 1; "
        "recommended for many concurrent senders: the number of CPU cores)",
    )
    # The receiver processes of gateway_processes > 1 (--roles receiver): started by the gateway process.
    serve.add_argument("--events-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--receiver-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--handoff-fd", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    stations = sub.add_parser("stations", help="register the X-ray machines allowed to send")
    st_sub = stations.add_subparsers(dest="stations_cmd", required=True, metavar="ACTION")
    st_add = st_sub.add_parser("add", parents=[common], help="register a station by its calling AE title")
    st_add.add_argument("ae_title", metavar="AE_TITLE")
    st_add.add_argument("--name", default="", help='human name, e.g. "Trạm Y tế Thạnh An"')
    st_add.add_argument("--allow-ip", help="only accept from these addresses/networks, comma-separated")
    st_add.add_argument(
        "--tls-cert-fingerprint",
        action="append",
        metavar="SHA256",
        help="pin a TLS client certificate by its SHA-256 (openssl x509 -noout -fingerprint -sha256); repeatable. "
        "The station must then use the DICOM TLS port with that certificate (without: its certificate's CN "
        "must be its AE title)",
    )
    st_rm = st_sub.add_parser("remove", parents=[common], help="unregister a station")
    st_rm.add_argument("ae_title", metavar="AE_TITLE")
    st_ls = st_sub.add_parser("list", parents=[common], help="list registered stations")
    st_ls.add_argument("--json", action="store_true")
    stations.set_defaults(func=cmd_stations)

    studies = sub.add_parser("studies", help="read studies and their AI results")
    sd_sub = studies.add_subparsers(dest="studies_cmd", required=True, metavar="ACTION")
    card_help = "model directory or card whose urgent labels mark findings (default: model_dir, as serve)"
    sd_ls = sd_sub.add_parser("list", parents=[common], help="studies in the worklist order, with why")
    sd_ls.add_argument("--json", action="store_true")
    sd_ls.add_argument("--limit", type=int, default=200)
    sd_ls.add_argument("--model", type=Path, help=card_help)
    sd_show = sd_sub.add_parser("show", parents=[common], help="one study: why, flagged findings, every image")
    sd_show.add_argument("study_uid", metavar="STUDY_UID")
    sd_show.add_argument("--json", action="store_true")
    sd_show.add_argument("--model", type=Path, help=card_help)
    sd_re = sd_sub.add_parser(
        "redecode-text",
        parents=[common],
        help="decode stored studies' names and descriptions again from their files with the current "
        "character set rules (for studies stored before them or before default_character_set changed)",
    )
    sd_re.add_argument("--dry-run", action="store_true", help="only print what would change")
    studies.set_defaults(func=cmd_studies)

    predict = sub.add_parser("predict", parents=[common], help="triage DICOM/PNG/JPEG files without the server")
    predict.add_argument("files", nargs="+", metavar="FILE")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.add_argument("--model", type=Path, help="model directory or card")
    predict.add_argument("--variant", choices=VARIANT_CHOICES, help="model_variant: which card in the model directory")
    predict.set_defaults(func=cmd_predict)

    models = sub.add_parser("models", help="inspect and verify models")
    md_sub = models.add_subparsers(dest="models_cmd", required=True, metavar="ACTION")
    for name, text in (("list", "show the configured model's card"), ("verify", "check sha256 and run a smoke inference")):
        p = md_sub.add_parser(name, parents=[common], help=text)
        p.add_argument("--model", type=Path, help="model directory or card")
        p.add_argument("--variant", choices=VARIANT_CHOICES, help="model_variant: which card in the model directory")
        p.set_defaults(func=cmd_models)
    evaluate = md_sub.add_parser(
        "evaluate", parents=[common], help="AUROC with CIs, sensitivity/specificity, heatmap-in-box on a labelled set"
    )
    evaluate.add_argument("--model", type=Path, help="model directory or card")
    evaluate.add_argument("--data", type=Path, required=True, help="directory with images/ and labels.csv")
    evaluate.add_argument("--json", action="store_true", help="print the full result as JSON")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.set_defaults(func=cmd_models_evaluate)
    from xray_triage_server.cli_users import register as register_user_commands

    register_user_commands(sub, common, _settings)
    from xray_triage_server.cli_destinations import register as register_destination_commands

    register_destination_commands(sub, common, _settings)
    from xray_triage_server.cli_db import register as register_db_commands

    register_db_commands(sub, common, _settings)
    register_plugin_commands(CommandGroups(top=sub, models=md_sub, common=common))
    return parser


# -- extra commands from other installed packages ----------------------------------------


COMMANDS_GROUP = "xray_triage.commands"


@dataclass(frozen=True)
class CommandGroups:
    """Where an extra-commands plugin adds its subcommands (argparse ``add_parser``).

    A plugin is an entry point in the ``xray_triage.commands`` group whose object is
    ``register(groups: CommandGroups) -> None``; each parser it adds sets ``func``
    (``args -> exit status``) with ``set_defaults``. The model tooling registers
    ``xray-triage models export-*`` this way, so this package never imports it.
    """

    top: argparse._SubParsersAction  # xray-triage COMMAND
    models: argparse._SubParsersAction  # xray-triage models ACTION
    common: argparse.ArgumentParser  # parent parser with --config and --data-dir


def register_plugin_commands(groups: CommandGroups) -> None:
    """Let every installed ``xray_triage.commands`` entry point add its subcommands.

    A plugin that fails to load or register is reported on stderr and skipped: a
    broken optional tool must not stop ``serve`` or any other command.
    """
    for entry_point in sorted(entry_points(group=COMMANDS_GROUP), key=lambda ep: ep.name):
        try:
            entry_point.load()(groups)
        except Exception as exc:  # noqa: BLE001 - any failure of optional code: report and go on
            print(
                f"xray-triage: warning: extra commands {entry_point.name!r} ({entry_point.value}) "
                f"not available: {type(exc).__name__}: {exc}",
                file=sys.stderr,
            )


def main(argv: Sequence[str] | None = None) -> int:
    from xray_triage.inference.card import ModelCardError
    from xray_triage.store.schema_error import SchemaError

    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (CliError, SettingsError, ModelCardError, SchemaError) as exc:
        print(f"xray-triage: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``python -m benchmarks run [--quick] [--out FILE.json]``: the benchmark suite's command line.

Exit status: 0 = every image sent was stored and triaged (slow is still 0:
targets are reported, never asserted); 1 = an image was lost or not triaged,
a send failed, or the server crashed or did not exit 0 on SIGTERM; 2 = the
benchmark could not run here (missing tool, server would not start).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import DEFAULT_MODEL_DIR, DETECTOR_SOURCE, SHARED_DICOM
from benchmarks.common import BenchSetupError, progress, require_tools
from benchmarks.dicom_files import (
    DETECTOR_VARIANTS,
    ImageInfo,
    ensure_gdcmconv,
    image_info,
    make_detector_variants,
)
from benchmarks.machine import describe_machine, filesystem_of, load_average
from benchmarks.report import collect_targets, markdown, write_json
from benchmarks.server import ResultsDB, TriageServer, env_overrides, proc_status_kb
from xray_triage_tools.faultproxy import parse_rate

PARTS = (
    "latency",
    "throughput",
    "ingest",
    "inference",
    "viewer",
    "worklist",
    "dicomweb",
    "delivery",
    "scaleout",
)
# --quick without --only leaves out the parts that cannot be made small: scaleout starts 12
# server processes (each loads the model) and takes ~2-3 min even with 8 images.
NOT_IN_QUICK_DEFAULT = ("scaleout",)
DCMTK_TOOLS = ("storescu", "storescp", "echoscu", "dcmodify", "dcmdjpls", "dcmcjpeg", "dcmcrle")
WORKLIST_SEED = (
    SHARED_DICOM / "dev_03_dx_pa_jpeg_lossless_sv1.dcm"
)  # 1024 px, 0.9 MB: cheap to seed studies with
DELIVERY_IMAGE = WORKLIST_SEED  # a typical compressed 1024 px station image for the slow-link figures
QUIET_LOAD = 1.0  # 1-minute load average above which figures are flagged as taken on a busy machine


@dataclass
class Plan:
    """How much to measure. --quick keeps a 2-core machine under ~3 minutes."""

    warmup: int
    reps: int
    images: int
    concurrency: list[int]
    inference_warmup: int
    inference_reps: dict[int, int]
    viewer_warmup: int
    viewer_cold_reps: int
    viewer_warm_reps: int

    @classmethod
    def for_mode(cls, quick: bool) -> Plan:
        if quick:
            return cls(
                warmup=1,
                reps=5,
                images=8,
                concurrency=[1, 4, 8],
                inference_warmup=3,
                inference_reps={1: 30, 8: 15},
                viewer_warmup=1,
                viewer_cold_reps=3,
                viewer_warm_reps=5,
            )
        return cls(
            warmup=2,
            reps=20,
            images=48,
            concurrency=[1, 4, 8],
            inference_warmup=10,
            inference_reps={1: 200, 8: 50},
            viewer_warmup=1,
            viewer_cold_reps=10,
            viewer_warm_reps=30,
        )


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency values must be >= 1")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks of xray-triage: end-to-end latency, ingest throughput vs dcmtk storescp, "
        "inference overhead, memory, viewer rendering vs dcmtk dcmj2pnm, worklist latency under load, DICOMweb "
        "QIDO-RS latency and WADO-RS MB/s, scale-out with process roles (one process vs gateway + workers, web busy vs idle). Starts its own server on free ports "
        "in a temporary directory.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the benchmarks and print a Markdown report")
    run.add_argument(
        "--quick", action="store_true", help="few repetitions and images (CI smoke run, ~2-3 min on 2 cores)"
    )
    run.add_argument(
        "--out",
        type=Path,
        metavar="FILE.json",
        help="also write every figure and the machine description here",
    )
    run.add_argument(
        "--only",
        choices=PARTS,
        action="append",
        help="run only this part (repeatable; default: all, with --quick all but scaleout)",
    )
    run.add_argument("--reps", type=int, help="timed sends per latency case (default: 5 quick, 20 full)")
    run.add_argument(
        "--warmup", type=int, help="untimed sends per latency case first (default: 1 quick, 2 full)"
    )
    run.add_argument("--images", type=int, help="images per throughput run (default: 8 quick, 48 full)")
    run.add_argument(
        "--concurrency",
        type=_int_list,
        metavar="K,K,...",
        help="storescu processes (default: 1,4,8)",
    )
    run.add_argument(
        "--throughput-image",
        choices=list(DETECTOR_VARIANTS),
        default="explicit-le",
        help="which 2800x2800 variant the throughput runs send (default: explicit-le, uncompressed)",
    )
    run.add_argument(
        "--link-rate",
        type=parse_rate,
        metavar="RATE",
        help="the delivery part's link rate through the fault proxy: bytes/s or 2Mbit, 250kB "
        "(default: 8Mbit quick, 2Mbit full)",
    )
    run.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL_DIR, help="model directory (default: the shipped model)"
    )
    run.add_argument(
        "--work-dir", type=Path, help="where to create the temporary directory (default: system temp)"
    )
    run.add_argument("--keep", action="store_true", help="keep the temporary directory (server data and log)")
    run.add_argument(
        "--no-install",
        action="store_true",
        help="never apt-get install libgdcm-tools (J2K case skipped if missing)",
    )
    return parser


def _plan(args: argparse.Namespace) -> Plan:
    plan = Plan.for_mode(args.quick)
    if args.reps is not None:
        plan.reps = max(1, args.reps)
    if args.warmup is not None:
        plan.warmup = max(0, args.warmup)
    if args.images is not None:
        plan.images = max(1, args.images)
    if args.concurrency:
        plan.concurrency = args.concurrency
    return plan


def _method(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "plan": plan.__dict__,
        "dcmtk_env": {"TCP_NODELAY": "1"},
        "storescu": "storescu -aet BENCH -aec <called> -R <-xe|-xs|-xt|-xv|-xr|-xi as the file's transfer syntax> 127.0.0.1 PORT FILES",
        "storescp": "storescp --fork +xa -dhl -pdu 131072 -aet STORESCP -od DIR PORT (no fsync, no database)",
        "server": "xray-triage serve --data-dir TMP --dicom-port P --http-port H --dicom-host 127.0.0.1 --model MODEL",
        "server_env_overrides": env_overrides(),
        "model_dir": str(args.model),
        "uids": "each send is a copy made with dcmodify -gin -gse -gst before timing",
        "mb": "10^6 bytes of DICOM files sent",
        "viewer": "in-process ImageCache.get + render (xray_triage.pipeline.render) vs dcmtk, whole process: "
        "dcmj2pnm -q +oj +Jq 85 +Sxv 1024 (JPEG-LS: dcml2pnm -q +on +Sxv 1024, PNG; JPEG 2000: n/a)",
    }


def _detector_source_ok() -> None:
    if not DETECTOR_SOURCE.is_file():
        raise BenchSetupError(
            f"{DETECTOR_SOURCE} not found (the shared test data is expected at {SHARED_DICOM.parent})"
        )


def _server_parts(
    args: argparse.Namespace, plan: Plan, parts: set[str], work: Path, report: dict[str, Any]
) -> list[ImageInfo]:
    """Latency and throughput against one server process (started once), plus a store-only server for throughput.

    Returns the 2800x2800 variants it made, for the viewer part to reuse.
    """
    from benchmarks.latency import run_latency
    from benchmarks.throughput import run_throughput

    need_j2k = "latency" in parts or args.throughput_image == "j2k-lossless"
    have_gdcm = ensure_gdcmconv(allow_install=not args.no_install) if need_j2k else False
    if need_j2k and not have_gdcm:
        report["warnings"].append("gdcmconv (GDCM) unavailable: no 2800x2800 JPEG 2000 case")
    progress("making the 2800x2800 variants (dcmdjpls, dcmcjpeg, dcmcrle, gdcmconv)")
    variants = {
        v.name: v for v in make_detector_variants(DETECTOR_SOURCE, work / "images", have_gdcm=have_gdcm)
    }
    shared = [image_info(p.stem, p) for p in sorted(SHARED_DICOM.glob("*.dcm"))]
    progress(f"starting xray-triage serve (model {args.model})")
    with TriageServer(work, args.model) as server:
        progress(
            f"server pid {server.pid} healthy after {server.start_seconds} s "
            f"(DICOM port {server.dicom_port}, HTTP port {server.http_port})"
        )
        memory: dict[str, Any] = {
            "server_rss_mb_idle_after_start": round(proc_status_kb(server.pid).get("VmRSS", 0) / 1024, 1)
        }
        db = ResultsDB(server.db_path)
        try:
            if "latency" in parts:
                images: list[tuple[str, ImageInfo]] = [("detector", v) for v in variants.values()]
                images += [("shared", s) for s in shared]
                report["latency"], failures = run_latency(
                    server, db, images, work, warmup=plan.warmup, reps=plan.reps
                )
                report["failures"] += failures
                report["warnings"] += report["latency"]["warnings"]
            if "throughput" in parts and server.alive():
                source = variants.get(args.throughput_image)
                if source is None:
                    raise BenchSetupError(f"throughput image {args.throughput_image} could not be made")
                progress("starting a second server with triage off (XRAY_TRIAGE_TRIAGE_WORKERS=0)")
                store_only = TriageServer(
                    work, args.model, name="server-store-only", extra_env={"XRAY_TRIAGE_TRIAGE_WORKERS": "0"}
                )
                with store_only:
                    so_db = ResultsDB(store_only.db_path)
                    try:
                        report["throughput"], failures = run_throughput(
                            server,
                            db,
                            source,
                            work,
                            images=plan.images,
                            concurrency=plan.concurrency,
                            store_only=(store_only, so_db),
                        )
                    finally:
                        so_db.close()
                report["failures"] += failures
                if store_only.exit_code != 0:
                    report["failures"].append(
                        f"the store-only server exited {store_only.exit_code} after SIGTERM (expected 0); "
                        f"log tail:\n{store_only.log_tail()}"
                    )
                memory["peak_rss_mb_sampled_per_throughput_run"] = {
                    str(r["concurrency"]): r["xray_triage"]["peak_rss_mb_sampled"]
                    for r in report["throughput"]["runs"]
                }
        finally:
            db.close()
            status = proc_status_kb(server.pid)
            memory["server_vm_hwm_mb_lifetime"] = round(status.get("VmHWM", 0) / 1024, 1)
            memory["server_vm_rss_mb_before_stop"] = round(status.get("VmRSS", 0) / 1024, 1)
            report["memory"] = memory
            progress("stopping the server (SIGTERM)")
    report["server"] = {
        "start_seconds": server.start_seconds,
        "exit_code": server.exit_code,
        "log": str(server.log_path),
    }
    if server.exit_code != 0:
        report["failures"].append(
            f"the server exited {server.exit_code} after SIGTERM (expected 0); log tail:\n{server.log_tail()}"
        )
    return list(variants.values())


def run(args: argparse.Namespace) -> int:
    plan = _plan(args)
    parts = set(args.only or (p for p in PARTS if not (args.quick and p in NOT_IN_QUICK_DEFAULT)))
    started = time.monotonic()
    machine = describe_machine()
    report: dict[str, Any] = {
        "schema": 1,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "parts": sorted(parts),
        "machine": machine,
        "method": _method(plan, args),
        "failures": [],
        "warnings": [],
    }
    load = machine["load_average_at_start"]
    progress(
        f"benchmark ({report['mode']}): {', '.join(p for p in PARTS if p in parts)}; load average {load}"
    )
    if load and load[0] > QUIET_LOAD:
        report["warnings"].append(
            f"1-minute load average was {load[0]} at start (> {QUIET_LOAD}): other work shares this machine, "
            "so the figures are not representative"
        )
        progress(
            f"WARNING: load average {load[0]} > {QUIET_LOAD}: figures from a busy machine are not representative"
        )
    work = Path(tempfile.mkdtemp(prefix="xray-triage-bench-", dir=args.work_dir))
    machine["work_dir_filesystem"] = filesystem_of(work)
    setup_error = False
    try:
        variants: list[ImageInfo] | None = None
        if parts & {"latency", "throughput"}:
            require_tools(DCMTK_TOOLS)
            _detector_source_ok()
            variants = _server_parts(args, plan, parts, work, report)
        if "ingest" in parts:
            from benchmarks.ingest import IngestPlan, run_ingest

            require_tools(("storescu", "storescp", "echoscu", "dcmodify", "dcmdjpls", "dcmcjpeg", "dcmcrle"))
            _detector_source_ok()
            ingest_plan = IngestPlan.for_mode(args.quick)
            if variants is None:
                progress("ingest: making the 2800x2800 variants (dcmdjpls, dcmcjpeg, dcmcrle)")
                variants = make_detector_variants(DETECTOR_SOURCE, work / "images", have_gdcm=False)
            big = {v.name: v for v in variants}.get("explicit-le")
            report["ingest"], failures = run_ingest(args.model, big, work, ingest_plan)
            report["failures"] += failures
            report["warnings"] += report["ingest"]["warnings"]
        if "inference" in parts:
            from benchmarks.inference import run_inference

            _detector_source_ok()
            progress("inference: bare onnxruntime vs ModelRunner, batch 1 and 8")
            report["inference"] = run_inference(
                args.model, DETECTOR_SOURCE, warmup=plan.inference_warmup, reps=plan.inference_reps
            )
        if "viewer" in parts:
            from benchmarks.viewer import run_viewer

            _detector_source_ok()
            if variants is None:  # no server part made them
                have_gdcm = ensure_gdcmconv(allow_install=not args.no_install)
                progress("viewer: making the 2800x2800 variants (dcmdjpls, dcmcjpeg, dcmcrle, gdcmconv)")
                variants = make_detector_variants(DETECTOR_SOURCE, work / "images", have_gdcm=have_gdcm)
            images = [("detector", v) for v in variants]
            images += [("shared", image_info(p.stem, p)) for p in sorted(SHARED_DICOM.glob("*.dcm"))]
            report["viewer"] = run_viewer(
                images,
                work,
                warmup=plan.viewer_warmup,
                cold_reps=plan.viewer_cold_reps,
                warm_reps=plan.viewer_warm_reps,
            )
            report["warnings"] += report["viewer"]["warnings"]
        if "worklist" in parts:
            from benchmarks.worklist_load import LoadPlan, run_worklist_load

            require_tools(("storescu", "dcmodify", "dcmdjpls", "dcmcjpeg", "dcmcrle"))
            _detector_source_ok()
            if variants is None:
                progress("worklist: making the 2800x2800 variants (dcmdjpls, dcmcjpeg, dcmcrle)")
                variants = make_detector_variants(DETECTOR_SOURCE, work / "images", have_gdcm=False)
            burst = {v.name: v for v in variants}.get(args.throughput_image)
            if burst is None:
                raise BenchSetupError(f"worklist burst image {args.throughput_image} could not be made")
            seed = image_info(WORKLIST_SEED.stem, WORKLIST_SEED)
            report["worklist"], failures = run_worklist_load(
                args.model, seed, burst, work, LoadPlan.for_mode(args.quick)
            )
            report["failures"] += failures
        if "scaleout" in parts:
            from benchmarks.scaleout import ScalePlan, run_scaleout

            require_tools(("storescu", "storescp", "echoscu", "dcmodify", "dcmdjpls", "dcmcjpeg", "dcmcrle"))
            _detector_source_ok()
            if variants is None:
                progress("scaleout: making the 2800x2800 variants (dcmdjpls, dcmcjpeg, dcmcrle)")
                variants = make_detector_variants(DETECTOR_SOURCE, work / "images", have_gdcm=False)
            burst = {v.name: v for v in variants}.get(args.throughput_image)
            if burst is None:
                raise BenchSetupError(f"scaleout image {args.throughput_image} could not be made")
            scale_plan = ScalePlan.for_mode(args.quick)
            if args.images is not None:
                scale_plan.images = max(1, args.images)
            report["scaleout"], failures = run_scaleout(
                args.model, burst, image_info(WORKLIST_SEED.stem, WORKLIST_SEED), work, scale_plan
            )
            report["failures"] += failures
            report["warnings"] += report["scaleout"]["warnings"]
        if "dicomweb" in parts:
            from benchmarks.dicomweb import DicomwebPlan, run_dicomweb

            _detector_source_ok()
            report["dicomweb"], failures = run_dicomweb(args.model, work, DicomwebPlan.for_mode(args.quick))
            report["failures"] += failures
        if "delivery" in parts:
            from benchmarks.delivery import DeliveryPlan, run_delivery, run_orthanc_ack

            require_tools(("storescu", "dcmodify"))
            delivery_plan = DeliveryPlan.for_mode(args.quick)
            if args.link_rate:
                delivery_plan.rate = args.link_rate
            if args.images is not None:
                delivery_plan.images = max(1, args.images)
            report["delivery"], failures = run_delivery(args.model, DELIVERY_IMAGE, work, delivery_plan)
            report["failures"] += failures
            report["warnings"] += report["delivery"]["warnings"]
            ack, failures = run_orthanc_ack(
                args.model, DELIVERY_IMAGE, work, warmup=plan.warmup, reps=plan.reps
            )
            report["delivery"]["orthanc_ack"] = ack
            report["failures"] += failures
            report["warnings"] += ack["warnings"]
    except BenchSetupError as exc:
        setup_error = True
        report["failures"].append(f"setup: {exc}")
        print(f"benchmarks: cannot run: {exc}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("benchmarks: interrupted", file=sys.stderr)
        return 130
    finally:
        report["duration_s"] = round(time.monotonic() - started, 1)
        report["load_average_at_end"] = load_average()
        report["targets"] = collect_targets(report)
        keep = args.keep or bool(report["failures"])
        if keep:
            report["work_dir"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
            report.get("server", {}).pop("log", None)
    print()
    print(markdown(report), flush=True)
    if args.out:
        write_json(report, args.out)
        progress(f"wrote {args.out}")
    if report.get("work_dir"):
        progress(f"kept {report['work_dir']} (server data and log)")
    if setup_error:
        return 2
    return 1 if report["failures"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

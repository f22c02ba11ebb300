"""The run's report: a JSON document with every figure, and Markdown tables for the console."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _target(target: dict[str, Any] | None, fmt: str) -> str:
    if not target:
        return ""
    mark = "met" if target["met"] else "MISSED"
    return f"{fmt.format(target['target'])} ({mark})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _machine_lines(report: dict[str, Any]) -> list[str]:
    m = report["machine"]
    v = m["versions"]
    gpu = ", ".join(g["name"] for g in m["gpus"]) or "none"
    fs = m.get("work_dir_filesystem") or {}
    return [
        f"Machine: {m['cpu_model']}, {m['usable_cpus']} usable of {m['logical_cpus']} CPUs, {m['ram_gib']} GiB RAM, "
        f"GPU: {gpu}; load average at start {m['load_average_at_start']}, at end {report.get('load_average_at_end')}",
        f"Software: Python {v['python']}, onnxruntime {v['onnxruntime']}, pynetdicom {v['pynetdicom']}, "
        f"pydicom {v['pydicom']}, {v['dcmtk']}, xray-triage {v['xray_triage']} ({v['xray_triage_git']})",
        f"Mode: {report['mode']}; total {report['duration_s']} s; TCP_NODELAY=1 for every dcmtk process; "
        f"data on {fs.get('type', '?')} ({fs.get('mount', '?')}).",
    ]


def _latency_lines(latency: dict[str, Any]) -> list[str]:
    cases = latency["cases"]
    echo = latency["echo_baseline"]["xray_triage_s"]
    echo_ref = latency["echo_baseline"]["storescp_s"]
    lines = [
        "",
        "### End-to-end latency (storescu spawned -> triage result committed), one image at a time",
        "",
    ]
    rows = []
    for c in cases:
        e = c["e2e_s"]
        rows.append(
            [
                c["case"],
                c["transfer_syntax_name"],
                f"{c['rows']}x{c['cols']}",
                _f(c["size_mb"], 1),
                str(e["n"]),
                _f(e["p50"]),
                _f(e["p95"]),
                _f(e["max"]),
                _target(c.get("target"), "<= {:.1f} s"),
                _f(c["ack_s"]["p50"]),
                _f(c["observed_s"]["p50"]),
            ]
        )
    lines += _table(
        [
            "case",
            "transfer syntax",
            "pixels",
            "MB",
            "n",
            "e2e p50 s",
            "e2e p95 s",
            "e2e max s",
            "target p95",
            "ack p50 s",
            "seen p50 s",
        ],
        rows,
    )
    lines += [
        "",
        f"C-ECHO round trip (echoscu spawn -> exit: client start-up + association + release): p50 {_f(echo['p50'])} s, "
        f"p95 {_f(echo['p95'])} s; against storescp p50 {_f(echo_ref['p50'])} s.",
        "",
        "Where the time goes, median ms. Left: the server's own stage timers (triage_results.timings_ms);",
        "'other' is DERIVED = e2e - those stages (storescu start-up, association set-up, dataset parsing,",
        "scoring, heatmaps, result insert; slightly low because the queue timer starts before the store's",
        "commit ends). Right: intervals between the server's timestamps in its DB (instances.received_at,",
        "triage_jobs.started_at, triage_results.created_at): measured, not derived; per send they add up to e2e.",
        "",
    ]
    stage_names = ["receive", "store", "queue", "decode", "preprocess", "inference"]
    segment_names = ["spawn_to_stored_ms", "stored_to_claimed_ms", "claimed_to_result_ms"]
    rows = []
    for c in cases:
        st, seg = c["server_stages_ms_median"], c["segments_ms_median"]
        rows.append(
            [
                c["case"],
                *(_f(st.get(k), 1) for k in stage_names),
                _f(c["other_derived_ms_median"], 1),
                *(_f(seg.get(k), 1) for k in segment_names),
            ]
        )
    lines += _table(
        ["case", *stage_names, "other (derived)", "spawn -> row", "row -> claimed", "claimed -> result"], rows
    )
    return lines


def _throughput_lines(throughput: dict[str, Any]) -> list[str]:
    runs = throughput["runs"]
    if not runs:
        return []
    first = runs[0]
    lines = [
        "",
        f"### Ingest throughput: {first['images']} x {first['image']} ({first['transfer_syntax']}, "
        f"{first['total_mb']} MB in all) from K concurrent storescu",
        "",
    ]
    rows = []
    for r in runs:
        ours, ref = r["xray_triage"], r["storescp"]
        rows.append(
            [
                str(r["concurrency"]),
                _f(ref["mb_per_s"], 1),
                _f(ours["ingest"]["mb_per_s"], 1),
                _f(ours["ingest"]["images_per_s"], 2),
                _f(r["ingest_mb_s_ratio_vs_storescp"], 2),
                _target(r["target"], ">= {:.1f}"),
                _f((r.get("xray_triage_store_only") or {}).get("mb_per_s"), 1),
                _f(r.get("store_only_mb_s_ratio_vs_storescp"), 2),
                _f(ours["all_triaged"]["seconds"], 2),
                _f(ours["all_triaged"]["images_per_s"], 2),
                _f(ours["per_image_e2e_s"]["p95"], 2),
                f"{ours['stored']}/{ours['triaged']}/{r['images']}",
                _f(ours["peak_rss_mb_sampled"], 0),
            ]
        )
    lines += _table(
        [
            "K",
            "storescp MB/s",
            "ours ingest MB/s",
            "ours img/s",
            "ratio",
            "target ratio",
            "ours, triage off, MB/s",
            "its ratio",
            "all triaged s",
            "triaged img/s",
            "e2e p95 s",
            "stored/triaged/sent",
            "peak RSS MB",
        ],
        rows,
    )
    lines += [
        "",
        "ratio = ours (triaging) / storescp MB/s. 'triage off' = a second server with XRAY_TRIAGE_TRIAGE_WORKERS=0:",
        "the storage path alone. e2e p95: per image, first storescu spawn -> that image's triage result (queueing included).",
        f"Server VmHWM (lifetime peak RSS) at the end of the throughput runs: {throughput['server_vm_hwm_mb']} MB.",
    ]
    return lines


def _inference_lines(inference: dict[str, Any]) -> list[str]:
    results = inference["results"]
    if not results:
        return []
    lines = ["", f"### Inference ({inference['model']}), ms per call, warm-up excluded", ""]
    rows = []
    for r in results:
        ms = r["ms"]
        rows.append(
            [
                r["provider"].replace("ExecutionProvider", ""),
                str(r["batch"]),
                str(r["timed_calls"]),
                f"{_f(ms['bare']['p50'], 2)} / {_f(ms['bare']['p95'], 2)}",
                f"{_f(ms['runner']['p50'], 2)} / {_f(ms['runner']['p95'], 2)}",
                f"{r['runner_overhead']:+.1%}" if r["runner_overhead"] is not None else "-",
                _target(r["target"], "<= {:.0%}"),
                f"{_f(ms['runner_with_preprocess']['p50'], 2)} / {_f(ms['runner_with_preprocess']['p95'], 2)}",
                _f(r["per_image_ms_p50"]["runner_with_preprocess"], 2),
            ]
        )
    lines += _table(
        [
            "provider",
            "batch",
            "n",
            "bare p50/p95",
            "runner p50/p95",
            "overhead",
            "target",
            "runner+preprocess p50/p95",
            "with preprocess per image",
        ],
        rows,
    )
    return lines


def _p50_p95(stats: dict[str, Any] | None, digits: int = 0) -> str:
    if not stats or stats.get("p50") is None:
        return "n/a"
    return f"{_f(float(stats['p50']), digits)} / {_f(float(stats['p95']), digits)}"


def _viewer_lines(viewer: dict[str, Any]) -> list[str]:
    cases = viewer["cases"]
    if not cases:
        return []
    size, zoom = viewer["first_view_size_px"], viewer["zoom_size_px"]
    lines = [
        "",
        f"### Viewer rendering (in-process, ms p50 / p95): first view at {size} px, re-render, {zoom} px zoom",
        "",
    ]
    rows = []
    for c in cases:
        fv, ref = c["first_view"], c["reference"]
        ratio = c["ours_cold_over_reference_p50"]
        rows.append(
            [
                c["case"],
                c["transfer_syntax_name"],
                f"{c['rows']}x{c['cols']}",
                f"{fv['width']}x{fv['height']}",
                _f(fv["kb"], 1),
                str(c["cold_first_view_ms"]["n"]),
                _p50_p95(c["cold_first_view_ms"]),
                str(c["warm_rerender_ms"]["n"]),
                _p50_p95(c["warm_rerender_ms"]),
                _f(c["zoom_first_ms"]["p50"], 0),
                _p50_p95(c["zoom_warm_ms"]),
                f"{ref['tool']} ({ref['output'].split()[-1]})" if ref["available"] else "n/a",
                _p50_p95(ref["ms"]) if ref["available"] else "n/a",
                f"{ratio:.2f}" if ratio is not None else "n/a",
            ]
        )
    lines += _table(
        [
            "case",
            "transfer syntax",
            "pixels",
            "first view px",
            "first view KB",
            "n cold",
            "cold first view",
            "n warm",
            "warm re-render",
            "zoom first p50",
            "zoom warm",
            "dcmtk (output)",
            "dcmtk process",
            "ours cold / dcmtk",
        ],
        rows,
    )
    t = viewer["target"]
    m = t["measured"]
    na = sorted({c["reference"]["why_not"] for c in cases if not c["reference"]["available"]})
    lines += [
        "",
        f"cold = empty cache: decode (model pixel pipeline) + window presets + resize + JPEG q85; warm = decoded "
        f"image cached, another window; zoom first = the first {zoom} px render after a cold view (resize from "
        f"the cached decode), zoom warm = that copy cached ({zoom} px is clamped to the source size, so for "
        f"1024x1024 files the zoom is a 1024 px render). dcmtk = `dcmj2pnm -q +oj +Jq 85 +Sxv {size}` "
        f"(JPEG-LS: `dcml2pnm -q +on +Sxv {size}`, PNG: dcml2pnm writes no JPEG) timed as a whole process, "
        "spawn -> exit, so its figure includes process start-up (ours runs in a live process). "
        "KB = 10^3 bytes." + (f" dcmtk n/a: {'; '.join(na)}." if na else ""),
        f"Target: first view <= {t['target']['max_side_px']} px and <= {t['target']['max_kb']:.0f} KB: largest "
        f"{m['max_side_px']} px, {m['max_kb']} KB ({m['largest_case']}) ({'met' if t['met'] else 'MISSED'}).",
    ]
    return lines


def _worklist_lines(worklist: dict[str, Any]) -> list[str]:
    plan = worklist["plan"]
    lines = [
        "",
        f"### Worklist under load: {plan['users']} users polling GET /worklist every {plan['poll_s']} s "
        f"(each with an /events stream open) while {plan['stations']} stations send {plan['images']} x "
        f"{worklist['burst_image']}; {plan['studies']} studies seeded",
        "",
    ]
    rows = []
    for label, key in (
        ("burst alone", "burst_alone"),
        ("users only", "users_only"),
        ("burst + users", "burst_with_users"),
    ):
        part = worklist.get(key) or {}
        web = part if key == "users_only" else part.get("worklist") or {}
        stats = web.get("ms") or {}
        rows.append(
            [
                label,
                str(web.get("requests", "")) if web else "",
                _f(stats.get("p50"), 0) if web else "",
                _f(stats.get("p95"), 0) if web else "",
                _f(stats.get("max"), 0) if web else "",
                str(web.get("not_ok", "")) if web else "",
                _f(part.get("ingest_images_per_s"), 2) if "ingest_s" in part else "",
                _f(part.get("ingest_mb_per_s"), 1) if "ingest_s" in part else "",
                _f(part.get("all_triaged_s"), 2) if "ingest_s" in part else "",
            ]
        )
    lines += _table(
        [
            "phase",
            "worklist requests",
            "p50 ms",
            "p95 ms",
            "max ms",
            "not 200",
            "ingest img/s",
            "ingest MB/s",
            "all triaged s",
        ],
        rows,
    )
    lines += [
        "",
        f"Latency: request sent -> whole page read, per user thread. Ingest: first storescu spawn -> last exit. "
        f"Live events received per user (median): {worklist.get('events_received_per_user_median')}; "
        f"streams refused: {worklist.get('event_streams_refused')}.",
    ]
    return lines


def _delivery_lines(delivery: dict[str, Any]) -> list[str]:
    plan = delivery["plan"]
    lines = [
        "",
        f"### Delivery over a slow link: {plan['images']} x {delivery['image']} "
        f"({delivery['bytes'] / 1e6:.1f} MB) through the fault proxy at {plan['rate_mbit_per_s']:g} Mbit/s each way",
        "",
    ]
    rows = [
        [
            r["transfer"],
            _f(r.get("seconds"), 2),
            _f(r.get("mb_per_s"), 3),
            _f(r.get("ratio_raw_over_this"), 2),
            r.get("note", ""),
        ]
        for r in delivery["rows"]
    ]
    lines += _table(["transfer", "s", "MB/s", "raw s / this s", "note"], rows)
    lines += [
        "",
        "raw = the same bytes through the same proxy into a TCP sink (the link itself); storescu = dcmtk straight "
        "to the centre through the proxy; edge -> centre = storescu to the edge, whose images destination "
        "forwards them through the proxy (first spawn -> the centre's last received_at).",
    ]
    ack = delivery.get("orthanc_ack") or {}
    if ack.get("received_to_orthanc_ack_ms"):
        rows = [
            [
                label,
                str(stats.get("n")),
                _f(stats.get("p50"), 0),
                _f(stats.get("p95"), 0),
                _f(stats.get("max"), 0),
            ]
            for label, stats in (
                ("stored here -> acknowledged by Orthanc", ack["received_to_orthanc_ack_ms"]),
                ("triage result -> acknowledged by Orthanc", ack["result_to_orthanc_ack_ms"]),
            )
        ]
        lines += [
            "",
            f"### Delivery to Orthanc (images destination, no proxy), one {ack.get('image')} at a time, ms",
            "",
        ]
        lines += _table(["interval", "n", "p50", "p95", "max"], rows)
    return lines


def markdown(report: dict[str, Any]) -> str:
    lines = ["## xray-triage benchmark", "", *_machine_lines(report)]
    if report.get("latency"):
        lines += _latency_lines(report["latency"])
    if report.get("throughput"):
        lines += _throughput_lines(report["throughput"])
    if report.get("ingest"):
        from benchmarks.ingest import markdown_lines as ingest_lines

        lines += ingest_lines(report["ingest"])
    if report.get("inference"):
        lines += _inference_lines(report["inference"])
    if report.get("viewer"):
        lines += _viewer_lines(report["viewer"])
    if report.get("worklist"):
        lines += _worklist_lines(report["worklist"])
    if report.get("dicomweb"):
        from benchmarks.dicomweb import markdown_lines

        lines += markdown_lines(report["dicomweb"])
    if report.get("delivery"):
        lines += _delivery_lines(report["delivery"])
    if report.get("scaleout"):
        from benchmarks.scaleout import markdown_lines as scaleout_lines

        lines += scaleout_lines(report["scaleout"])
    if report.get("warnings"):
        lines += ["", "Warnings:", *(f"- {w}" for w in report["warnings"])]
    if report.get("failures"):
        lines += ["", f"FAILED ({len(report['failures'])}):", *(f"- {f}" for f in report["failures"])]
    elif any(report.get(p) for p in ("latency", "throughput", "ingest", "worklist", "scaleout")):
        lines += ["", "Every image sent was stored and triaged."]
    else:
        lines += ["", "No failures."]
    return "\n".join(lines)


def collect_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with where it came from, for the JSON summary."""
    targets = []
    for c in (report.get("latency") or {}).get("cases", []):
        if c.get("target"):
            targets.append({"where": f"latency {c['case']}", **c["target"]})
    for r in (report.get("throughput") or {}).get("runs", []):
        targets.append({"where": f"throughput K={r['concurrency']}", **r["target"]})
    targets += (report.get("ingest") or {}).get("targets", [])
    for r in (report.get("inference") or {}).get("results", []):
        targets.append({"where": f"inference {r['provider']} batch {r['batch']}", **r["target"]})
    viewer = report.get("viewer") or {}
    if viewer.get("target") and viewer.get("cases"):
        targets.append({"where": f"viewer first view ({len(viewer['cases'])} files)", **viewer["target"]})
    dicomweb = report.get("dicomweb") or {}
    if dicomweb.get("target"):
        targets.append({"where": "DICOMweb QIDO-RS worst p95", **dicomweb["target"]})
    scaleout = report.get("scaleout") or {}
    for r in scaleout.get("rows", []):
        targets.append({"where": f"scaleout {r['layout']} ({r['database']})", **r["target"]})
    if (scaleout.get("web") or {}).get("target"):
        targets.append({"where": "scaleout web busy vs idle", **scaleout["web"]["target"]})
    return targets


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")

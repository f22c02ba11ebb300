"""Test images: the detector-size image in each transfer syntax, and unique copies to send.

Only third-party tools convert images (dcmtk, GDCM), so a codec bug of ours
cannot make its own test data. Every send needs a new SOP Instance UID (the
server acknowledges a re-sent instance as a duplicate without storing or
triaging it again), so copies are made, and their UIDs renewed with
``dcmodify -gin -gse -gst``, before the timed part starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pydicom

from benchmarks.common import BenchSetupError, progress, run_tool

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

# storescu's flag that proposes a file's own transfer syntax, so it is sent as
# stored rather than converted by storescu on the way.
STORESCU_FLAGS = {
    EXPLICIT_LE: "-xe",
    IMPLICIT_LE: "-xi",
    JPEG_LOSSLESS_SV1: "-xs",
    JPEG_LS_LOSSLESS: "-xt",
    J2K_LOSSLESS: "-xv",
    RLE_LOSSLESS: "-xr",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.1.99": "-xd",
}

TS_NAMES = {
    EXPLICIT_LE: "Explicit VR LE",
    IMPLICIT_LE: "Implicit VR LE",
    JPEG_LOSSLESS_SV1: "JPEG Lossless SV1",
    JPEG_LS_LOSSLESS: "JPEG-LS lossless",
    J2K_LOSSLESS: "JPEG 2000 lossless",
    RLE_LOSSLESS: "RLE lossless",
}

# name -> transfer syntax of the detector-size variants, in report order.
DETECTOR_VARIANTS = {
    "explicit-le": EXPLICIT_LE,
    "jpeg-lossless-sv1": JPEG_LOSSLESS_SV1,
    "jpeg-ls": JPEG_LS_LOSSLESS,
    "j2k-lossless": J2K_LOSSLESS,
    "rle": RLE_LOSSLESS,
}

DCMODIFY_BATCH = 64  # files per dcmodify call: keeps command lines short


@dataclass(frozen=True)
class ImageInfo:
    """What the benchmark needs to know about one source image."""

    name: str
    path: Path
    transfer_syntax: str
    rows: int
    cols: int
    size_bytes: int

    @property
    def ts_name(self) -> str:
        return TS_NAMES.get(self.transfer_syntax, self.transfer_syntax)

    @property
    def storescu_flag(self) -> str:
        return STORESCU_FLAGS.get(self.transfer_syntax, "-xe")


def image_info(name: str, path: Path) -> ImageInfo:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ImageInfo(
        name=name,
        path=path,
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        size_bytes=path.stat().st_size,
    )


def sop_instance_uid(path: Path) -> str:
    return str(
        pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID
    )


def ensure_gdcmconv(allow_install: bool) -> bool:
    """GDCM's ``gdcmconv`` makes the JPEG 2000 variant (dcmtk has no J2K codec).

    If it is missing and installing is allowed, ``apt-get install libgdcm-tools``
    is tried once (as root, or through ``sudo -n`` which never prompts), with an
    ``apt-get update`` first if the package is unknown; the outcome is printed.
    """
    if shutil.which("gdcmconv"):
        return True
    why = "--no-install given" if not allow_install else ""
    prefix: list[str] | None = []
    if os.geteuid() != 0:
        prefix = ["sudo", "-n"] if shutil.which("sudo") else None
    if not why and (shutil.which("apt-get") is None or prefix is None):
        why = "no apt-get, or not root and no sudo"
    if why or prefix is None:
        progress(f"gdcmconv not found ({why}): the 2800x2800 JPEG 2000 case is skipped")
        return False
    progress("gdcmconv not found: installing Debian package libgdcm-tools with apt-get (one-time setup)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", "libgdcm-tools"]
    for args in (install, [*prefix, "apt-get", "update", "-q"], install):
        try:
            subprocess.run(args, capture_output=True, env=env, check=False, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            progress(f"{' '.join(args)}: {exc}")
            break
        if args is install and shutil.which("gdcmconv"):
            progress("installed libgdcm-tools (gdcmconv)")
            return True
    progress("could not install libgdcm-tools: the 2800x2800 JPEG 2000 case is skipped")
    return False


def make_detector_variants(source: Path, out_dir: Path, *, have_gdcm: bool) -> list[ImageInfo]:
    """The 2800x2800 12-bit DX image in every benchmarked transfer syntax."""
    out_dir.mkdir(parents=True, exist_ok=True)
    src = image_info("source", source)
    if src.transfer_syntax != JPEG_LS_LOSSLESS:
        raise BenchSetupError(f"{source}: expected a JPEG-LS lossless file, found {src.ts_name}")
    raw = out_dir / "explicit-le.dcm"
    run_tool(["dcmdjpls", "+te", str(source), str(raw)])  # -> explicit VR little endian
    jls = out_dir / "jpeg-ls.dcm"
    shutil.copyfile(source, jls)
    run_tool(["dcmcjpeg", "--encode-lossless-sv1", str(raw), str(out_dir / "jpeg-lossless-sv1.dcm")])
    run_tool(["dcmcrle", str(raw), str(out_dir / "rle.dcm")])
    if have_gdcm:
        run_tool(["gdcmconv", "--j2k", str(raw), str(out_dir / "j2k-lossless.dcm")])
    variants = []
    for name, ts in DETECTOR_VARIANTS.items():
        path = out_dir / f"{name}.dcm"
        if not path.exists():
            continue
        info = image_info(name, path)
        if info.transfer_syntax != ts or (info.rows, info.cols) != (src.rows, src.cols):
            raise BenchSetupError(
                f"{path}: conversion gave {info.ts_name} {info.rows}x{info.cols}, "
                f"expected {TS_NAMES[ts]} {src.rows}x{src.cols}"
            )
        variants.append(info)
    return variants


def renew_uids(paths: list[Path]) -> None:
    """New SOP Instance, Series and Study UIDs in every file (and its meta header)."""
    for i in range(0, len(paths), DCMODIFY_BATCH):
        run_tool(["dcmodify", "-nb", "-gin", "-gse", "-gst", *map(str, paths[i : i + DCMODIFY_BATCH])])


def unique_copies(source: Path, out_dir: Path, count: int, prefix: str) -> list[Path]:
    """``count`` copies of ``source``, each with its own new UIDs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    for i in range(count):
        dest = out_dir / f"{prefix}-{i:04d}.dcm"
        shutil.copyfile(source, dest)
        dest.chmod(0o644)  # the shared sources are read-only; dcmodify must rewrite the copy
        copies.append(dest)
    renew_uids(copies)
    return copies

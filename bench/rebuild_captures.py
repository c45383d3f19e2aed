"""Rebuild the real captures of the model card from git snapshots, one command.

    python bench/rebuild_captures.py --mirrors /work/.mirror --out /work/captures \
        [--names beer,lund] [--use validation] [--max-size 512] [--sfm-python /path/to/env/bin/python]

For each capture of ``bench/captures.json`` (the model card's table, "Real captures"): the
photos (and the COLMAP model where the repository has one) are read from the bare snapshot
``<mirrors>/<owner>+<name>/`` at the recorded commit (``git ls-tree`` / ``git cat-file``);
``capture-sfm`` recomputes the model where the card says so; ``prepare-capture`` (the
library function) writes the prepared copy with its provenance. Each capture is built in
``<out>/<name>.partial`` and renamed to ``<out>/<name>`` at the end, so a finished folder is
always complete; a finished one is skipped, so the command resumes. A recomputed model is
kept in ``<out>/.work/<name>/sfm`` until its capture is finished, so an interrupted run does
not repeat the (slow) SfM. ``<out>/<name>/rebuild.json`` records the manifest entry, the
snapshot files taken and capture-sfm's ``sfm.json``. ``--max-size`` is the prepared photos' long
side (512, the card's, unless a benchmark asks for another size; smaller photos keep theirs, none is
enlarged). A capture whose model capture-sfm recomputes is prepared from the photos its SfM read (its
downscaled copies, at most the manifest's ``sfm.max_side``, else capture-sfm's default 1600 px) while
``--max-size`` is within their size, as before; a larger ``--max-size`` prepares it from the ORIGINAL
photos of the snapshot (BENCHMARKS.md "Renders above 2048 px": flowerpot 3104x4192, perikles
2610x4640), the SfM model's poses and points unchanged and each camera scaled by prepare-capture's one
rule (``Camera.scaled``: f and c per axis by the prepared photo's size over the photo SfM read, in
COLMAP's corner-origin pixels; the lens distortion is in normalised coordinates, so it is kept).
An original with an EXIF orientation (turned or mirrored) is turned upright by capture-sfm's own
``read_upright``, as its copy was, and saved as PNG in the scratch folder only (the prepared photos
are JPEG as for every capture).
``rebuild.json``'s ``photos_read`` says which photos were read and at which sizes.

Snapshots come from the session's ``fetch github:<owner>/<name>``; files the snapshot did not
bring (large blobs) are left out and counted, and a photo count other than the card's is an
error. capture-sfm needs pycolmap (optional): ``--sfm-python`` names an interpreter that has it.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from headless_train.capture_sfm import is_photo  # noqa: E402  (what capture-sfm counts as a photo)

MANIFEST = ROOT / "bench" / "captures.json"
USES = ("training", "validation")
# prepare-capture's --use values for the manifest's (the card's) words
PREPARE_USE = {"training": "train", "validation": "validation"}


class RebuildError(RuntimeError):
    """A missing snapshot, commit or path, or a capture that differs from the card; the
    message says what to do."""


def load_manifest(path: str | os.PathLike = MANIFEST) -> list[dict[str, Any]]:
    """The manifest's capture entries (checked for the keys the rebuild reads)."""
    from headless_train.capture_sfm import OTHER_SIZES  # sfm.other_sizes: --single-camera's rules
    with open(path) as f:
        entries = json.load(f)["captures"]
    for e in entries:
        for key in ("name", "repo", "commit", "licence", "use", "images", "orient", "expected"):
            if key not in e:
                raise RebuildError(f"{path}: capture {e.get('name', '?')} lacks {key!r}")
        if e["use"] not in USES:
            raise RebuildError(f"{path}: capture {e['name']}: use must be one of {USES}, got {e['use']!r}")
        if e.get("sparse") is None and "sfm" not in e:
            raise RebuildError(f"{path}: capture {e['name']} has neither a sparse model path nor sfm options")
        other = e.get("sfm", {}).get("other_sizes", "camera")
        if other not in OTHER_SIZES:
            raise RebuildError(f"{path}: capture {e['name']}: sfm.other_sizes must be one of {OTHER_SIZES}, "
                               f"got {other!r}")
    return entries


def find_snapshot(mirrors: str, repo: str) -> str:
    """The git directory of ``repo``'s snapshot under ``mirrors`` (bare or with a .git)."""
    base = os.path.join(mirrors, repo.replace("/", "+"))
    for cand in (os.path.join(base, "repo", ".git"), os.path.join(base, "repo"), os.path.join(base, ".git"), base):
        if os.path.isfile(os.path.join(cand, "HEAD")) and os.path.isdir(os.path.join(cand, "objects")):
            return cand
    raise RebuildError(f"no snapshot of {repo} under {mirrors} (looked in {base}): fetch github:{repo} first")


def _git(git_dir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True)


def check_commit(git_dir: str, repo: str, commit: str) -> None:
    """RebuildError unless ``commit`` is in the snapshot."""
    if _git(git_dir, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        raise RebuildError(f"{git_dir}: commit {commit} of {repo} is not in this snapshot: "
                           f"fetch github:{repo} first (a newer snapshot) or check the manifest's commit")


def list_folder(git_dir: str, repo: str, commit: str, folder: str) -> list[tuple[str, str, bool]]:
    """(name, blob id, blob present) of the files directly in ``folder`` at ``commit``."""
    folder = folder.rstrip("/")
    out = _git(git_dir, "ls-tree", commit, folder + "/")
    if out.returncode != 0:
        raise RebuildError(f"{repo}@{commit[:12]}: cannot list {folder}: {out.stderr.decode().strip()}")
    rows = []
    for line in out.stdout.decode().splitlines():
        meta, path = line.split("\t", 1)
        _, kind, blob = meta.split()
        if kind == "blob":
            present = _git(git_dir, "cat-file", "-e", blob).returncode == 0
            rows.append((path[len(folder) + 1:], blob, present))
    if not rows:
        raise RebuildError(f"{repo}@{commit[:12]}: no files in {folder}/ (wrong path in the manifest, or a "
                           f"snapshot without it: fetch github:{repo} first)")
    return rows


def extract_folder(git_dir: str, repo: str, commit: str, folder: str, dst: str, pattern: str = "*",
                   need_all: bool = False) -> dict[str, Any]:
    """Write the files of ``folder`` whose names match ``pattern`` to ``dst``; blobs the
    snapshot lacks are skipped and listed (an error when ``need_all``)."""
    os.makedirs(dst, exist_ok=True)
    taken, absent = [], []
    for name, blob, present in list_folder(git_dir, repo, commit, folder):
        if not fnmatch.fnmatch(name, pattern):
            continue
        if not present:
            absent.append(name)
            continue
        data = _git(git_dir, "cat-file", "blob", blob)
        if data.returncode != 0:
            raise RebuildError(f"{repo}@{commit[:12]}: cannot read {folder}/{name}: {data.stderr.decode().strip()}")
        with open(os.path.join(dst, name), "wb") as f:
            f.write(data.stdout)
        taken.append(name)
    if need_all and absent:
        raise RebuildError(f"{repo}@{commit[:12]}: the snapshot lacks {folder}/{', '.join(absent)} (large files "
                           "are not brought): this capture cannot be rebuilt from it")
    if not taken:
        raise RebuildError(f"{repo}@{commit[:12]}: no file of {folder}/ matches {pattern!r}")
    return {"folder": folder, "pattern": pattern, "taken": len(taken), "not_in_snapshot": absent}


def _photo_count(folder: str) -> int:
    return sum(1 for n in os.listdir(folder) if is_photo(n))


def run_capture_sfm(raw: str, out: str, options: dict[str, Any], python: str) -> None:
    """``python -m headless_train capture-sfm`` with the manifest's options (one thread, as every
    recorded run); ``other_sizes: "drop"`` is the rule a capture was made with before
    --single-camera gave each photo size a camera of its own (``--drop-other-sizes``)."""
    cmd = [python, "-m", "headless_train", "capture-sfm", raw, out, "--threads", "1"]
    if "max_side" in options:
        cmd += ["--max-side", str(options["max_side"])]
    if options.get("every", 1) != 1:
        cmd += ["--every", str(options["every"])]
    if options.get("single_camera"):
        cmd.append("--single-camera")
    if options.get("other_sizes", "camera") == "drop":
        cmd.append("--drop-other-sizes")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print("  " + " ".join(cmd), flush=True)
    if subprocess.run(cmd, env=env).returncode != 0:
        raise RebuildError(f"capture-sfm failed for {raw} (its message is above; without pycolmap pass "
                           "--sfm-python with an interpreter that has it)")


def _sfm_model(sfm_dir: str) -> tuple[str, dict, dict]:
    """(sparse folder, cameras, images) of capture-sfm's model in ``sfm_dir``."""
    from npbgpp_core.datasets.colmap import _read_model, find_sparse_dir

    sparse = find_sparse_dir(sfm_dir)
    if sparse is None:
        raise RebuildError(f"{sfm_dir}: capture-sfm's folder holds no sparse model: delete it and run again")
    cams, images, _ = _read_model(sparse)
    return sparse, cams, images


def sfm_source(entry: dict[str, Any], git_dir: str, sfm_dir: str, work: str,
               max_size: int) -> tuple[str, dict[str, Any]]:
    """The folder prepare-capture reads for a model capture-sfm recomputed, and what was read.

    capture-sfm's own folder (its downscaled copies, the old behaviour bit for bit) unless
    ``max_size`` gives some photo a longer side than the copy SfM read; then a folder of the
    snapshot's original photos with the SfM model (cameras and points as SfM wrote them, the
    images file naming the originals), whose cameras prepare-capture scales to the photos it
    writes (``Camera.scaled`` in ``distortion.view_cameras``, the one scaling rule)."""
    from headless_train.capture_sfm import CaptureSfmError, read_upright
    from npbgpp_core.datasets.colmap import _model_file
    from npbgpp_core.image_size import fit_long_side

    repo, commit = entry["repo"], entry["commit"]
    sparse, cams, images = _sfm_model(sfm_dir)
    sfm_sizes = {name: (cams[cam_id][1], cams[cam_id][2]) for _, _, cam_id, name in images.values()}
    info: dict[str, Any] = {"sfm_photo_sizes": sorted({f"{w}x{h}" for w, h in sfm_sizes.values()})}
    kept = dict(info, read="capture-sfm's downscaled copies (--max-size within their size)")
    copies_side = min(max(s) for s in sfm_sizes.values())  # the largest --max-size the copies serve
    if max_size <= copies_side:
        return sfm_dir, kept
    raw = os.path.join(work, "originals")
    shutil.rmtree(raw, ignore_errors=True)
    info["originals"] = extract_folder(git_dir, repo, commit, entry["images"], raw, entry.get("image_pattern", "*"))
    by_stem = {os.path.splitext(n)[0]: n for n in os.listdir(raw) if is_photo(n)}
    src = os.path.join(work, "from_originals")
    shutil.rmtree(src, ignore_errors=True)
    os.makedirs(os.path.join(src, "images"))
    os.makedirs(os.path.join(src, "sparse", "0"))
    lines, sizes, turned, larger = [], set(), [], False
    for image_id, (q, t, cam_id, name) in sorted(images.items()):
        stem = os.path.splitext(os.path.basename(name))[0]
        if stem not in by_stem:
            raise RebuildError(f"{repo}@{commit[:12]}: SfM photo {name} has no original in {entry['images']}/ "
                               f"(a snapshot without it?): rebuild at --max-size {copies_side} or less, from the "
                               "SfM's copies")
        orig = by_stem[stem]
        try:  # capture-sfm's own reading: its copy is upright, so is the photo prepared here
            upright, orientation = read_upright(os.path.join(raw, orig))
        except CaptureSfmError as exc:
            raise RebuildError(f"{repo}@{commit[:12]}: {exc} (the SfM read this photo: another snapshot? "
                               f"rebuild at --max-size {copies_side} or less, from the SfM's copies)") from None
        size, read = upright.size, orig
        if orientation != 1:  # stored turned or mirrored: saved upright, lossless, in the scratch folder only
            read = stem + ".png"  # (a PNG original keeps its name: the upright copy replaces it)
            upright.save(os.path.join(src, "images", read))
            turned.append(orig)
        else:
            os.replace(os.path.join(raw, orig), os.path.join(src, "images", read))
        del upright
        sizes.add(f"{size[0]}x{size[1]}")
        larger |= max(fit_long_side(size, max_size)) > max(sfm_sizes[name])
        pose = " ".join(repr(float(x)) for x in (*q, *t))
        lines.append(f"{image_id} {pose} {cam_id} {read}\n\n")
    shutil.rmtree(raw)
    if not larger:  # the originals are no larger than the copies SfM read: nothing to gain
        shutil.rmtree(src)
        return sfm_dir, kept
    for stem in ("cameras", "points3D"):  # as SfM wrote them, each file the loader would read
        path = _model_file(sparse, stem)
        if path is not None:
            shutil.copyfile(path, os.path.join(src, "sparse", "0", os.path.basename(path)))
    with open(os.path.join(src, "sparse", "0", "images.txt"), "w") as f:
        f.write("# capture-sfm's poses (repr of its float64 values), naming the original photos\n" + "".join(lines))
    info.update(read="the original photos (--max-size above the SfM copies' size)", original_sizes=sorted(sizes),
                exif_turned_upright=turned,
                camera_scaling="prepare-capture's Camera.scaled: f and c per axis by prepared size / SfM photo size")
    return src, info


def rebuild_one(entry: dict[str, Any], mirrors: str, out: str, sfm_python: str, max_size: int) -> str:
    """Build ``<out>/<name>`` for one manifest entry with photos of long side ``max_size``;
    returns 'skipped' or 'built'."""
    from npbgpp_core.datasets.capture import prepare_capture

    name, repo, commit = entry["name"], entry["repo"], entry["commit"]
    final = os.path.join(out, name)
    if os.path.isfile(os.path.join(final, "capture.json")):
        return "skipped"
    if os.path.exists(final):
        raise RebuildError(f"{final}: exists without capture.json (not made by this command): move it away")
    git_dir = find_snapshot(mirrors, repo)
    check_commit(git_dir, repo, commit)
    work = os.path.join(out, ".work", name)
    raw = os.path.join(work, "raw")
    record: dict[str, Any] = {"manifest": entry, "snapshot": os.path.abspath(git_dir)}
    if entry.get("sparse") is None:
        sfm_dir = os.path.join(work, "sfm")
        if not os.path.isfile(os.path.join(sfm_dir, "sfm.json")):  # capture-sfm writes its folder atomically
            shutil.rmtree(raw, ignore_errors=True)
            record["photos"] = extract_folder(git_dir, repo, commit, entry["images"], raw,
                                              entry.get("image_pattern", "*"))
            got = _photo_count(raw)
            if "photos" in entry and got != entry["photos"]:
                raise RebuildError(f"{repo}@{commit[:12]}: {got} photos taken from {entry['images']}/, the model "
                                   f"card says {entry['photos']}: another snapshot? check the manifest")
            run_capture_sfm(raw, sfm_dir, entry["sfm"], sfm_python)
            shutil.rmtree(raw)
        with open(os.path.join(sfm_dir, "sfm.json")) as f:
            record["sfm"] = json.load(f)
        src, record["photos_read"] = sfm_source(entry, git_dir, sfm_dir, work, max_size)
    else:
        src = os.path.join(work, "src")
        shutil.rmtree(src, ignore_errors=True)
        record["photos"] = extract_folder(git_dir, repo, commit, entry["images"], os.path.join(src, "images"),
                                          entry.get("image_pattern", "*"))
        record["model"] = extract_folder(git_dir, repo, commit, entry["sparse"], os.path.join(src, "sparse", "0"),
                                         need_all=True)
    prov = {"repo": repo, "commit": commit, "licence": entry["licence"], "use": PREPARE_USE[entry["use"]]}
    if "licence_commit" in entry:
        prov["licence_commit"] = entry["licence_commit"]
    partial = final + ".partial"
    summary = prepare_capture(src, partial, max_size=max_size, provenance=prov, overwrite=True, orient=entry["orient"])
    # prepare-capture recorded the scratch folder it read, removed below: name the snapshot instead
    summary["source"] = f"{repo}@{commit}:{entry['images']}" + (f" + {entry['sparse']}" if entry.get("sparse") else
                                                               " (model recomputed by capture-sfm)")
    with open(os.path.join(partial, "capture.json"), "w") as f:
        json.dump(summary, f, indent=1)
    expected = entry["expected"]
    record["matches_card"] = {k: summary[k] == expected[k] for k in ("images", "points")}
    with open(os.path.join(partial, "rebuild.json"), "w") as f:
        json.dump(record, f, indent=1)
    os.rename(partial, final)
    shutil.rmtree(work)
    if not os.listdir(os.path.dirname(work)):
        os.rmdir(os.path.dirname(work))
    if not all(record["matches_card"].values()):
        print(f"  WARNING {name}: {summary['images']} images / {summary['points']} points, the model card says "
              f"{expected['images']} / {expected['points']}", flush=True)
    return "built"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mirrors", required=True, help="folder of the fetched snapshots (<owner>+<name>/...)")
    p.add_argument("--out", required=True, help="output folder: one prepared capture per name")
    p.add_argument("--names", default=None, help="comma-separated capture names (default: all)")
    p.add_argument("--use", choices=USES, default=None, help="only the captures of this use")
    p.add_argument("--manifest", default=str(MANIFEST), help="captures manifest (default bench/captures.json)")
    p.add_argument("--max-size", type=int, default=512,
                   help="long side of the prepared photos in pixels (default 512, the model card's)")
    p.add_argument("--sfm-python", default=sys.executable,
                   help="Python with pycolmap for capture-sfm (default: this one)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Rebuild the selected captures in manifest order; exit 2 with one line on an error."""
    from npbgpp_core.datasets.capture import MIN_MAX_SIZE
    from npbgpp_core.datasets.errors import DatasetError

    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if a.max_size < MIN_MAX_SIZE:  # prepare_capture's own floor, refused before anything is extracted
            raise RebuildError(f"--max-size must be at least {MIN_MAX_SIZE} pixels (got {a.max_size})")
        entries = load_manifest(a.manifest)
        if a.names:
            wanted = [n.strip() for n in a.names.split(",") if n.strip()]
            unknown = sorted(set(wanted) - {e["name"] for e in entries})
            if unknown:
                raise RebuildError(f"unknown capture name(s) {', '.join(unknown)}; the manifest has "
                                   f"{', '.join(e['name'] for e in entries)}")
            entries = [e for e in entries if e["name"] in wanted]
        if a.use:
            entries = [e for e in entries if e["use"] == a.use]
        os.makedirs(a.out, exist_ok=True)
        for e in entries:
            print(f"{e['name']}: {e['repo']}@{e['commit'][:12]}", flush=True)
            print(f"  {rebuild_one(e, a.mirrors, a.out, a.sfm_python, a.max_size)}: {os.path.join(a.out, e['name'])}",
                  flush=True)
    except (RebuildError, DatasetError) as exc:
        print(f"rebuild_captures: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

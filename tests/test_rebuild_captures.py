"""bench/rebuild_captures.py: the manifest says what the model card's table says, and a
capture committed to a small git repository made here comes back as a prepared capture
(provenance, skipped when finished), with a clear error for a missing snapshot, commit,
path or blob and nothing half-written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, os.path.dirname(__file__))
from test_capture_import import write_capture  # noqa: E402

from bench import rebuild_captures as rc  # noqa: E402
from npbgpp_core.datasets import load_scene  # noqa: E402

CARD = ROOT / "npbgpp_core" / "weights" / "MODEL_CARD.md"


def _card_rows() -> dict[str, list[str]]:
    """The model card's "Real captures" table: name -> its cells."""
    text = CARD.read_text().split("## Real captures", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `(\w+)` \|", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


def test_manifest_matches_the_model_card_table():
    rows = _card_rows()
    entries = {e["name"]: e for e in rc.load_manifest()}
    assert len(rows) == 12 and set(entries) == set(rows)
    for name, (_, repo, commit, licence, taken, images, points, use) in rows.items():
        e = entries[name]
        hexes = re.findall(r"\b[0-9a-f]{40}\b", commit)
        assert e["repo"] == repo and e["commit"] == hexes[0], name
        assert e.get("licence_commit") == (hexes[1] if len(hexes) > 1 else None), name
        assert licence.startswith(e["licence"]), name
        assert use.startswith(e["use"]), name
        assert (e["expected"]["images"], e["expected"]["points"]) == (int(images), int(points)), name
        assert e["orient"] == ("z-up" if "Z-up" in taken else "keep"), name
        recomputed = "model recomputed" in taken
        assert (e.get("sparse") is None) == recomputed, name
        if recomputed:  # the capture-sfm options the card names, and no others
            card_opts = re.search(r"model recomputed(?: \(([^)]*)\))?", taken).group(1) or ""
            opts = e["sfm"]
            assert ("--single-camera" in taken) == opts.get("single_camera", False), name
            side = re.search(r"--max-side (\d+)", card_opts)
            assert opts.get("max_side") == (int(side.group(1)) if side else None), name
            every = re.search(r"--every (\d+)", card_opts)
            assert opts.get("every", 1) == (int(every.group(1)) if every else 1), name
        for path in (e["images"], e.get("sparse") or ""):
            assert path.rstrip("/") in taken.replace("`", "") or path.split("/")[-1] in taken, (name, path)
        assert e["name"] in {"skull", "lund", "socketed_axe"} or e["use"] == "validation"


def _git(cwd: str, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def _snapshot(tmp_path) -> tuple[str, str, str]:
    """A repository owner/cap under mirrors/ holding a COLMAP capture in data/ (with one extra
    photo whose blob is then removed, as a snapshot leaves out large files); (mirrors, commit,
    git dir)."""
    work = str(tmp_path / "mirrors" / "owner+cap" / "repo")
    pts, _ = write_capture(os.path.join(work, "data"))
    with open(os.path.join(work, "data", "images", "big.jpg"), "wb") as f:
        f.write(b"not brought")
    _git(work, "init", "-q")
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", "capture")
    commit = _git(work, "rev-parse", "HEAD")
    blob = _git(work, "rev-parse", f"{commit}:data/images/big.jpg")
    os.remove(os.path.join(work, ".git", "objects", blob[:2], blob[2:]))
    return str(tmp_path / "mirrors"), commit, os.path.join(work, ".git")


def _entry(commit: str, **kw) -> dict:
    e = {"name": "cap", "repo": "owner/cap", "commit": commit, "licence": "CC BY 4.0", "use": "validation",
         "images": "data/images", "sparse": "data/sparse/0", "orient": "keep", "expected": {"images": 3, "points": 0}}
    e.update(kw)
    return e


def _manifest(tmp_path, *entries: dict) -> str:
    path = str(tmp_path / "m.json")
    with open(path, "w") as f:
        json.dump({"captures": list(entries)}, f)
    return path


def test_rebuild_from_a_snapshot_then_skip(tmp_path, capsys):
    mirrors, commit, git_dir = _snapshot(tmp_path)
    pts = load_scene(os.path.join(os.path.dirname(git_dir), "data"), undistort=True).points
    out = str(tmp_path / "out")
    man = _manifest(tmp_path, _entry(commit, expected={"images": 3, "points": len(pts)}))
    assert rc.main(["--mirrors", mirrors, "--out", out, "--manifest", man]) == 0
    assert "built" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["cap"]  # no .partial, the work folder removed
    info = json.load(open(os.path.join(out, "cap", "capture.json")))
    assert (info["repo"], info["commit"], info["licence"], info["use"]) == ("owner/cap", commit, "CC BY 4.0",
                                                                            "validation")
    assert info["source"] == f"owner/cap@{commit}:data/images + data/sparse/0"
    record = json.load(open(os.path.join(out, "cap", "rebuild.json")))
    assert record["matches_card"] == {"images": True, "points": True}
    assert record["photos"]["taken"] == 3 and record["photos"]["not_in_snapshot"] == ["big.jpg"]
    scene = load_scene(os.path.join(out, "cap"))
    assert len(scene.views) == 3
    np.testing.assert_allclose(scene.points, pts, atol=1e-6)
    stamp = os.path.getmtime(os.path.join(out, "cap", "capture.json"))
    assert rc.main(["--mirrors", mirrors, "--out", out, "--manifest", man]) == 0
    assert "skipped" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "cap", "capture.json")) == stamp


@pytest.mark.parametrize("change, message", [
    ({"repo": "owner/other"}, "fetch github:owner/other first"),
    ({"commit": "0" * 40}, "is not in this snapshot: fetch github:owner/cap first"),
    ({"images": "data/photos"}, "no files in data/photos/"),
    ({"sparse": "data/images"}, "the snapshot lacks data/images/big.jpg"),
    ({"images": "data/images", "image_pattern": "*.png"}, "no file of data/images/ matches '*.png'"),
    ({"sparse": None, "sfm": {}, "photos": 9}, "3 photos taken from data/images/, the model card says 9"),
])
def test_missing_snapshot_commit_path_or_blob_is_named(tmp_path, capsys, change, message):
    mirrors, commit, _ = _snapshot(tmp_path)
    out = str(tmp_path / "out")
    man = _manifest(tmp_path, {**_entry(commit), **change})
    assert rc.main(["--mirrors", mirrors, "--out", out, "--manifest", man]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not os.path.exists(os.path.join(out, "cap")) and not os.path.exists(os.path.join(out, "cap.partial"))


def test_unknown_name_is_refused(tmp_path, capsys):
    man = _manifest(tmp_path, _entry("0" * 40))
    assert rc.main(["--mirrors", str(tmp_path), "--out", str(tmp_path / "o"), "--manifest", man,
                    "--names", "cap,nope"]) == 2
    assert "unknown capture name(s) nope" in capsys.readouterr().err


def test_max_size_reaches_the_prepared_photos(tmp_path, capsys):
    """--max-size is the written photos' long side (the test photos are 240x180), the points
    unchanged; a size below prepare_capture's floor is refused before anything is written."""
    from PIL import Image

    mirrors, commit, git_dir = _snapshot(tmp_path)
    pts = load_scene(os.path.join(os.path.dirname(git_dir), "data"), undistort=True).points
    man = _manifest(tmp_path, _entry(commit, expected={"images": 3, "points": len(pts)}))
    out = str(tmp_path / "out")
    assert rc.main(["--mirrors", mirrors, "--out", out, "--manifest", man, "--max-size", "120"]) == 0
    photos = sorted(os.listdir(os.path.join(out, "cap", "images")))
    assert len(photos) == 3
    for name in photos:
        with Image.open(os.path.join(out, "cap", "images", name)) as im:
            assert im.size == (120, 90)
    assert json.load(open(os.path.join(out, "cap", "capture.json")))["max_size"] == 120
    np.testing.assert_allclose(load_scene(os.path.join(out, "cap")).points, pts, atol=1e-6)
    capsys.readouterr()
    small = str(tmp_path / "small")
    assert rc.main(["--mirrors", mirrors, "--out", small, "--manifest", man, "--max-size", "8"]) == 2
    assert "--max-size must be at least 16 pixels (got 8)" in capsys.readouterr().err
    assert not os.path.exists(small)

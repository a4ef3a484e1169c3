"""Reliability of engine.score, engine.features and the library (issue 15): one writer per output, no
silent corruption, every user error one `error:` line and exit 2, Ctrl-C exit 130, and a kill -9 at
EVERY write point (engine.files.write_point, BSSAN_KILL_AT_WRITE=N) followed by a rerun ends with
byte-identical output and no leftovers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from engine.errors import ArtifactError, CaptionError, ClosedError, DataError, ImageError, InputError
from engine.files import KILL_AT_WRITE_ENV
from engine.journal import STOP_AFTER_ENV
from engine.runtime import Scorer
from engine.score import format_results, main, read_captions, read_images
from tests.conftest import REPO_ROOT, build_store

BASE = ["--backend", "onnxruntime-cpu", "--threads", "1"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv] + BASE)
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code: int, err: str) -> str:
    """The single `error:` line of a refused command (exit 2, no traceback)."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, err)
    return errors[0]


def child(module: str, argv: list, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("reliability") / "store", splits={"test": 10})  # 2 units of 8 image rows


# ---------------------------------------------------------------------------------------------
# 1. one writer per output; progress of another run is never trusted


def test_a_second_writer_on_the_same_output_is_refused(capsys, tmp_path, tiny_artifact, small_store):
    fcntl = pytest.importorskip("fcntl", reason="output locking uses POSIX advisory locks")
    out = tmp_path / "results.jsonl"
    out.write_text("an earlier result\n")
    with open(tmp_path / ".results.jsonl.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running engine.score holds it
        code, _, err = run(capsys, "--model", tiny_artifact, "--images", small_store, "--out", out)
    assert "another engine.score process is writing this output" in one_error(code, err)
    assert out.read_text() == "an earlier result\n" and not (tmp_path / ".results.jsonl.partial").exists()
    code, _, err = run(capsys, "--model", tiny_artifact, "--images", small_store, "--out", out)  # lock released: runs
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]  # lock file and journal gone


def test_progress_of_another_run_is_not_trusted(capsys, tmp_path, tiny_artifact, small_store):
    argv = ["--model", tiny_artifact, "--images", small_store]
    reference = tmp_path / "reference.jsonl"
    assert run(capsys, *argv, "--out", reference)[0] == 0
    out = tmp_path / "results.jsonl"
    killed = child("engine.score", [*argv, "--out", out, *BASE], {STOP_AFTER_ENV: "1"})
    assert killed.returncode == -9, killed.stderr
    progress = tmp_path / ".results.jsonl.partial" / "progress.json"
    # what the probe saw: another writer's progress listing every unit, over this run's (zero) score rows
    progress.write_text(json.dumps({"done": ["rows0", "rows8"]}))
    code, _, err = run(capsys, *argv, "--out", out)
    assert code == 0 and "is not this run's; recomputing its units" in err, err
    assert out.read_bytes() == reference.read_bytes()


# ---------------------------------------------------------------------------------------------
# 3. the batch plan depends on the inputs and options only; 4. stale temp files; 5. unwritable --out


def test_the_batch_plan_does_not_depend_on_the_live_memory(tiny_artifact, small_store):
    from engine.runtime import resident_bytes
    from engine.store import FeatureStore

    split = FeatureStore(small_store).split("test")
    with Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1, memory_budget_mb=140) as scorer:
        images, captions = scorer.encode_images(split), scorer.encode_captions(split)
        before = resident_bytes(images, captions)
        plan = scorer._pair_calls(images, captions, np.array([[i, j] for i in range(10) for j in range(50)]), before)
        ballast = np.ones(2**24)  # 128 MB more resident memory
        assert resident_bytes(images, captions) == before
        again = scorer._pair_calls(images, captions, np.array([[i, j] for i in range(10) for j in range(50)]), before)
        assert [c.tolist() for c in plan] == [c.tolist() for c in again] and ballast.sum() > 0


def test_a_rerun_removes_the_temp_file_of_a_writer_killed_mid_write(capsys, tmp_path, tiny_artifact, small_store):
    out = tmp_path / "results.jsonl"
    stale = tmp_path / ".results.jsonl.tmp-999999"
    stale.write_text("a full-size result a killed writer never renamed\n")
    assert run(capsys, "--model", tiny_artifact, "--images", small_store, "--out", out)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


def test_an_out_that_cannot_be_written_is_refused_before_any_work(capsys, tmp_path, tiny_artifact):
    parent_file = tmp_path / "a-file"
    parent_file.write_text("")
    missing_images = tmp_path / "no-such-folder"  # would fail later: --out is checked first
    code, _, err = run(capsys, "--model", tiny_artifact, "--images", missing_images, "--out", parent_file / "r.jsonl")
    assert f"--out {parent_file / 'r.jsonl'}: not writable ({parent_file} is a file)" in one_error(code, err)
    (tmp_path / "folder.jsonl").mkdir()
    code, _, err = run(capsys, "--model", tiny_artifact, "--images", missing_images, "--out", tmp_path / "folder.jsonl")
    assert "folder.jsonl: is a folder; expected a file path" in one_error(code, err)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_folder_is_refused(capsys, tmp_path, tiny_artifact, small_store):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, _, err = run(capsys, "--model", tiny_artifact, "--images", small_store, "--out", folder / "r.jsonl")
        assert "not writable" in one_error(code, err)
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# 6. TSV fields; 7. byte-order mark; 8. errors about one caption name its file and line


def test_tsv_fields_never_break_a_line():
    records = [{"direction": "i2t", "query": "two\nlines.jpg", "ranked": ["a\tb", "c\\d", "e\r\nf"], "scores": [0.5, 0.25, 0.125]},
               {"direction": "t2i", "query": "x.txt:1", "text": "t", "ranked": ["two\nlines.jpg"], "scores": [1.0]}]
    lines = format_results(".tsv", records).splitlines()
    assert len(lines) == 2
    assert lines[0].split("\t") == ["i2t", "two\\nlines.jpg", "a\\tb", "0.5", "c\\\\d", "0.25", "e\\r\\nf", "0.125"]


def test_a_byte_order_mark_does_not_drop_the_first_caption(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes("\ufeffa.jpg#0\ta dog runs .\na.jpg#1\ta dog plays .\n".encode("utf-8"))
    texts, ids, images, wheres = read_captions(path, ["a.jpg"])
    assert ids == ["a.jpg#0", "a.jpg#1"] and images == ["a.jpg", "a.jpg"] and wheres == ["captions.txt line 1", "captions.txt line 2"]
    from engine.data import read_caption_lines

    plain = tmp_path / "plain.txt"
    plain.write_bytes("\ufeffa dog .\n".encode("utf-8"))
    assert read_caption_lines(plain) == ["a dog ."]


def test_an_error_about_one_caption_names_its_file_and_line(tmp_path):
    from engine.score import Inputs, encode_captions

    path = tmp_path / "tokens.txt"
    path.write_text("gone.jpg#0\tnot in the gallery .\na.jpg#0\ta dog .\na.jpg#1\ta very long caption .\n", encoding="utf-8")
    texts, ids, images, wheres = read_captions(path, ["a.jpg"])

    def refuse(*args, **kwargs):
        raise CaptionError("600 MiniLM word pieces; expected at most 512", 1)  # index 1 of the kept captions

    inputs = Inputs([], ["a.jpg"], "", texts, ids, wheres, images, "")
    with pytest.raises(CaptionError, match=r"^tokens\.txt line 3: 600 MiniLM word pieces; expected at most 512$"):
        encode_captions(SimpleNamespace(encode_captions=refuse), inputs)


# ---------------------------------------------------------------------------------------------
# 9. numbers; 10. the manifest; 11. the library


def test_a_budget_or_batch_that_is_not_a_positive_finite_number_is_refused(tiny_artifact):
    for budget in (float("nan"), float("inf"), 0, -5, "2048"):
        with pytest.raises(InputError, match=r"memory budget .* expected a finite number > 0"):
            Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1, memory_budget_mb=budget)
    with pytest.raises(InputError, match=r"batch size\) 2\.5: expected an integer >= 1"):
        Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1, batch_size=2.5)


def _edited(tiny_artifact: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(tiny_artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(copy, manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_an_edited_manifest_is_refused_at_load(tmp_path, tiny_artifact):
    from engine.artifact import load_artifact

    edited = _edited(tiny_artifact, tmp_path, lambda root, m: m["dims"].update(max_words=5))
    with pytest.raises(ArtifactError, match=r"manifest\.json: content differs from its manifest_sha256; the manifest was edited"):
        load_artifact(edited)
    shutil.rmtree(edited)
    edited = _edited(tiny_artifact, tmp_path, lambda root, m: m["dims"].update(object_count="ten"))
    with pytest.raises(ArtifactError, match=r"manifest\.json: dims\.object_count: expected a positive int, got 'ten'$"):
        load_artifact(edited)
    shutil.rmtree(edited)
    edited = _edited(tiny_artifact, tmp_path, lambda root, m: m["model"]["score_weights"].update(o2w="x"))
    with pytest.raises(ArtifactError, match=r"manifest\.json: model\.score_weights\.o2w: expected a finite number, got 'x'$"):
        load_artifact(edited)


def test_a_swapped_graph_is_refused_at_load_naming_it(tmp_path, tiny_artifact):
    from engine.artifact import file_entry
    from engine.manifest import manifest_digest

    def swap(root: Path, manifest: dict) -> None:  # o2w_pair's file in w2r_pair's place, its hash re-recorded
        rel = manifest["graphs"]["w2r_pair"]["fp32"]["file"]
        shutil.copy(root / manifest["graphs"]["o2w_pair"]["fp32"]["file"], root / rel)
        manifest["files"][rel] = file_entry(root / rel)
        manifest["manifest_sha256"] = manifest_digest(manifest)

    swapped = _edited(tiny_artifact, tmp_path, swap)
    with pytest.raises(ArtifactError, match=r"w2r_pair\.fp32\.onnx: inputs .*; expected .* the file is not this artifact's w2r_pair graph"):
        Scorer.load(swapped, backend="onnxruntime-cpu", threads=1)


def test_a_closed_scorer_and_rows_out_of_range_are_one_line_errors(tiny_artifact, small_store):
    from engine.store import FeatureStore

    split = FeatureStore(small_store).split("test")
    scorer = Scorer.load(tiny_artifact, backend="onnxruntime-cpu", threads=1)
    images, captions = scorer.encode_images(split), scorer.encode_captions(split)
    for queries, direction in (([10**6], "i2t"), ([-1], "i2t"), ([50], "t2i"), ([-1], "t2i")):
        with pytest.raises(InputError, match=r"queries \((image|caption) rows\): expected rows in \[0, (10|50)\)"):
            scorer.top_k(images, captions, 2, direction, queries=queries)
        with pytest.raises(InputError, match=r"queries \((image|caption) rows\): expected rows in"):
            scorer.top_k(images, captions, 2, direction, queries=queries, shortlist_k=4)
    with pytest.raises(InputError, match=r"image_rows: expected rows in \[0, 10\), got \[-1, -1\]"):
        scorer.score_grid(images, captions, image_rows=[-1])
    scorer.close()
    with pytest.raises(ClosedError, match=r"used after close\(\)"):
        scorer.score_matrix(images, captions)


# ---------------------------------------------------------------------------------------------
# Decisions: hidden sidecars, broken links, duplicates, early budget refusal, journal cleanup, EXIF


def _png(path: Path, size=(32, 24)) -> Path:
    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path


def test_hidden_sidecars_are_skipped_and_broken_links_refused(capsys, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    _png(folder / "a.png")
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS sidecar: not an image
    paths, ids, _ = read_images(folder, "test")
    assert ids == ["a.png"] and "skipped 1 hidden files" in capsys.readouterr().err
    (folder / "b.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(ImageError, match=r"b\.jpg: broken symbolic link"):
        read_images(folder, "test")


def test_an_image_listed_twice_is_refused(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    listing = tmp_path / "list.txt"
    listing.write_text("a.png\nb.png\na.png\n")
    with pytest.raises(DataError, match=r"list\.txt line 3: 'a\.png' is listed again \(first at line 1\); expected each image once"):
        read_images(listing, "test")


def test_a_budget_too_small_is_refused_before_encoding_and_a_failed_run_leaves_no_journal(capsys, tmp_path, tiny_artifact,
                                                                                         small_store, monkeypatch):
    out = tmp_path / "results.jsonl"
    encoded = []
    monkeypatch.setattr(Scorer, "encode_images", lambda *a, **k: encoded.append(1))
    code, _, err = run(capsys, "--model", tiny_artifact, "--images", small_store, "--out", out, "--memory-budget-mb", 100)
    assert "memory budget 100 MB" in one_error(code, err) and not encoded
    monkeypatch.undo()

    def fail(*args, **kwargs):
        raise InputError("a caption the encoder refuses")  # after the journal exists

    monkeypatch.setattr(Scorer, "encode_captions", fail)
    code, _, err = run(capsys, "--model", tiny_artifact, "--images", small_store, "--out", out)
    assert "a caption the encoder refuses" in one_error(code, err)
    assert list(tmp_path.iterdir()) == []  # no journal, no lock file, no output


def test_exif_orientation_is_applied(tmp_path):
    from engine.vision import load_image

    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    upright = load_image(tmp_path / "phone.jpg")
    assert upright.size == (20, 40)  # viewed as the phone showed it
    pixels = np.asarray(upright)
    assert pixels[5, 10].mean() > 200 and pixels[35, 10].mean() < 50  # the white half is on top now


# ---------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    import engine.features
    import engine.score

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.features, "extract", interrupt)
    code = engine.features.main(["--images", "x", "--out", "y"])
    assert code == 130 and capsys.readouterr().err == "interrupted; rerun the same command to continue\n"
    monkeypatch.setattr(engine.score, "run", interrupt)
    assert engine.score.main([]) == 130 and capsys.readouterr().err == "interrupted; rerun the same command to continue\n"


# ---------------------------------------------------------------------------------------------
# kill -9 at every write point


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_score_killed_at_every_write_point_resumes_byte_identical(capsys, tmp_path, tiny_artifact, small_store):
    argv = ["--model", tiny_artifact, "--images", small_store, "--direction", "both", "--top-k", 3]
    reference = tmp_path / "reference" / "r.tsv"
    reference.parent.mkdir()
    assert run(capsys, *argv, "--out", reference)[0] == 0
    point = 0
    while True:
        point += 1
        folder = tmp_path / f"kill-{point}"
        folder.mkdir()
        killed = child("engine.score", [*argv, "--out", folder / "r.tsv", *BASE], {KILL_AT_WRITE_ENV: str(point)})
        if killed.returncode == 0:  # fewer write points than `point`: every one was tried
            break
        assert killed.returncode == -9, killed.stderr
        code, _, err = run(capsys, *argv, "--out", folder / "r.tsv")
        assert code == 0, (point, err)
        assert outputs(folder) == {"r.tsv": reference.read_bytes()}, point  # no journal, lock or temp file left
        assert point < 40, "more write points than expected"
    assert point > 8  # journal, caches, units, result: every kind of write point was reached


def test_features_killed_at_every_write_point_resume_byte_identical(tmp_path, flickr8k, backbone_assets, monkeypatch):
    from engine.features import main as features_main

    photos = tmp_path / "photos"
    photos.mkdir()
    names = sorted(n for n in os.listdir(flickr8k / "images") if n.endswith(".jpg"))[:2]
    for name in names:
        shutil.copy(flickr8k / "images" / name, photos / name)
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"{name}\ta photo number {k} of a dog .\n" for k, name in enumerate(names)), encoding="utf-8")
    words = tmp_path / "tiny-glove.txt"  # a 4-d word table: loads in milliseconds (the 400k-word GloVe takes seconds)
    words.write_text("".join(f"{w} {i} 0.5 -0.5 1\n" for i, w in enumerate("a photo number of dog 0 1 .".split())), encoding="utf-8")
    env = {"BSSAN_CACHE": str(tmp_path / "word-cache")}
    monkeypatch.setenv("BSSAN_CACHE", env["BSSAN_CACHE"])
    argv = ["--format", "folder", "--images", photos, "--captions", captions, "--assets", backbone_assets,
            "--word-features", words, "--batch-size", 1, "--threads", 1]
    assert features_main([*map(str, argv), "--out", str(tmp_path / "reference")]) == 0
    reference = outputs(tmp_path / "reference")
    point = 0
    while True:
        point += 1
        store = tmp_path / f"kill-{point}"
        killed = child("engine.features", [*argv, "--out", store], {**env, KILL_AT_WRITE_ENV: str(point)})
        if killed.returncode == 0:  # fewer write points than `point`: every one was tried
            break
        assert killed.returncode == -9, killed.stderr
        assert features_main([*map(str, argv), "--out", str(store)]) == 0, point
        assert outputs(store) == reference, point  # same files, same bytes: no temp or partial file left
        assert point < 40, "more write points than expected"
    assert point > 8  # manifest, lines, batches, word set: every kind of write point was reached


def test_extract_config_refuses_what_the_command_line_refuses():
    from engine.features import ExtractConfig

    for bad in ({"batch_size": -3}, {"batch_size": 0}, {"boxes_per_image": -1}, {"threads": 0}, {"max_words": 0},
                {"min_score": float("nan")}, {"min_score": 1.5}):
        with pytest.raises(InputError, match=r"ExtractConfig\.\w+=.*: expected"):
            ExtractConfig(images=Path("photos"), captions=None, out=Path("store"), **bad)

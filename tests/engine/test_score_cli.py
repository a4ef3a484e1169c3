"""`python -m engine.score` end to end in temp dirs: outputs, evaluation, image files and caption
files, the demo, every bad input (one line, exit 2, nothing written lost), and resume after kill -9."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.journal import STOP_AFTER_ENV, UNIT_SHORTLIST_IMAGES
from engine.metrics import retrieval_metrics
from engine.score import main
from engine.store import FeatureStore
from tests.conftest import REPO_ROOT, build_store

BASE = ["--backend", "onnxruntime-cpu", "--threads", "1"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv] + BASE)
    out, err = capsys.readouterr()
    return code, out, err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def training_scores(tiny_store, tiny_checkpoints) -> np.ndarray:
    from training.checkpoint import load_checkpoint

    split = FeatureStore(tiny_store).split("test")
    model = load_checkpoint(tiny_checkpoints["bssan"]).model
    return model.score_matrix(np.array(split.regions), np.array(split.objects), np.array(split.words("glove50")),
                              np.asarray(split.lengths)).numpy()


def test_store_end_to_end_jsonl_and_tsv(capsys, tmp_path, tiny_artifact, tiny_store, training_scores):
    out = tmp_path / "results.jsonl"
    code, stdout, err = run(capsys, "--model", tiny_artifact, "--images", tiny_store, "--direction", "both", "--top-k", 3, "--out", out)
    assert code == 0, err
    assert "pair/s" in err and "backend: onnxruntime-cpu" in err
    records = read_jsonl(out)
    assert [r["direction"] for r in records] == ["i2t"] * 10 + ["t2i"] * 50
    split = FeatureStore(tiny_store).split("test")
    names = split.image_names
    for i, record in enumerate(records[:10]):
        order = np.argsort(-training_scores[i], kind="stable")[:3]
        assert record["query"] == names[i] and record["ranked"] == [f"{names[j // 5]}#{j % 5}" for j in order]
        assert record["texts"] == [split.captions[j] for j in order]
        np.testing.assert_allclose(record["scores"], training_scores[i, order], atol=1e-5)
    t2i = records[10]
    assert t2i["query"] == f"{names[0]}#0" and t2i["text"] == split.captions[0]
    assert t2i["ranked"] == [names[j] for j in np.argsort(-training_scores[:, 0], kind="stable")[:3]]
    tsv = tmp_path / "results.tsv"
    assert run(capsys, "--model", tiny_artifact, "--images", tiny_store, "--direction", "both", "--top-k", 3, "--out", tsv)[0] == 0
    for line, record in zip(tsv.read_text().splitlines(), records):
        fields = line.split("\t")
        assert fields[:2] == [record["direction"], record["query"]] and fields[2::2] == record["ranked"]
        assert [float(s) for s in fields[3::2]] == record["scores"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl", "results.tsv"]  # journals removed


def test_evaluate_equals_the_training_side_metrics(capsys, tiny_artifact, tiny_store, training_scores):
    code, stdout, err = run(capsys, "--model", tiny_artifact, "--images", tiny_store, "--evaluate")
    assert code == 0, err
    metrics = json.loads(stdout)
    want = retrieval_metrics(training_scores, 5)
    for direction in ("i2t", "t2i"):
        for key, value in want[direction].items():
            assert metrics[direction][key] == pytest.approx(value, abs=0.1)
    assert metrics["rsum"] == pytest.approx(want["rsum"], abs=0.1) and metrics["mode"] == "exhaustive"
    code, stdout, err = run(capsys, "--model", tiny_artifact, "--images", tiny_store, "--evaluate", "--direction", "both",
                            "--shortlist-k", 50)
    shortlisted = json.loads(stdout)
    assert shortlisted["shortlist"] == {"i2t_recall": 100.0, "t2i_recall": 100.0, "k": 50}
    assert {d: shortlisted[d] for d in ("i2t", "t2i", "rsum")} == {d: metrics[d] for d in ("i2t", "t2i", "rsum")}
    code, stdout, err = run(capsys, "--model", tiny_artifact, "--images", tiny_store, "--evaluate", "--direction", "both",
                            "--shortlist-k", 4, "--top-k", 2)
    small = json.loads(stdout)
    assert 0 <= small["shortlist"]["t2i_recall"] <= 100 and small["t2i"]["r1"] <= small["shortlist"]["t2i_recall"]
    # one direction asked: the other direction's candidate pairs are scored by the evaluation itself, same metrics
    code, stdout, err = run(capsys, "--model", tiny_artifact, "--images", tiny_store, "--evaluate", "--direction", "i2t",
                            "--shortlist-k", 4, "--top-k", 2)
    one = json.loads(stdout)
    assert {d: one[d] for d in ("i2t", "t2i", "rsum")} == {d: small[d] for d in ("i2t", "t2i", "rsum")}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, demo_photos) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for path in demo_photos:
        shutil.copy(path, folder / path.name)
    return folder


def test_image_folder_list_and_caption_files(capsys, tmp_path, image_artifact, photo_dir):
    names = sorted(p.name for p in photo_dir.iterdir())
    captions = tmp_path / "captions.txt"
    captions.write_text("An astronaut in an orange suit .\nA cat with green eyes .\nA cup of coffee .\n", encoding="utf-8")
    out = tmp_path / "r.jsonl"
    code, _, err = run(capsys, "--model", image_artifact, "--images", photo_dir, "--captions", captions, "--out", out, "--direction", "both")
    assert code == 0, err
    records = read_jsonl(out)
    assert [r["query"] for r in records] == names + ["captions.txt:1", "captions.txt:2", "captions.txt:3"]
    listing = tmp_path / "list" / "images.txt"
    listing.parent.mkdir()
    listing.write_text("".join(f"{n}\n" for n in names[::-1]), encoding="utf-8")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(f"{n}#{k}\tcaption {k} of the photo {n.split('.')[0]} .\n" for n in names for k in range(2))
                      + "unknown.jpg#0\tnot in the gallery .\n", encoding="utf-8")
    code, stdout, err = run(capsys, "--model", image_artifact, "--images", listing, "--image-root", photo_dir, "--captions", tokens,
                            "--evaluate")
    assert code == 0, err
    assert "kept 6 of 7 captions" in err
    metrics = json.loads(stdout)
    assert metrics["captions_per_image"] == 2 and metrics["images"] == 3 and 0 <= metrics["i2t"]["r1"] <= 100
    code, stdout, err = run(capsys, "--model", image_artifact, "--images", photo_dir, "--query", "a cat", "--top-k", 2)
    assert code == 0, err
    assert stdout.splitlines()[0] == "t2i query:1  'a cat'" and len(stdout.splitlines()) == 3


def test_demo(capsys, image_artifact):
    pytest.importorskip("skimage", reason="the demo photos come from scikit-image")
    code, stdout, err = run(capsys, "--demo", "--model", image_artifact, "--top-k", 2)
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0] == "i2t astronaut.png" and sum(line.startswith("i2t ") for line in lines) == 6
    assert sum(line.startswith("t2i ") for line in lines) == 12


def test_demo_without_its_artifact_says_how_to_build_it(capsys, tmp_path, monkeypatch, tiny_checkpoints):
    import engine.demo

    monkeypatch.setattr(engine.demo, "DEMO_ARTIFACT", tmp_path / "artifact")
    monkeypatch.setattr(engine.demo, "DEMO_ASSETS", tmp_path / "assets")
    monkeypatch.setattr(engine.demo, "DEMO_MODEL", tiny_checkpoints["bssan"])
    code, _, err = run(capsys, "--demo")
    assert code == 2
    assert err.strip() == (f"error: {tmp_path / 'artifact'}: demo artifact not found; build it with: python -m export.backbones "
                           f"--out {tmp_path / 'assets'} && python -m export {tiny_checkpoints['bssan']} --out {tmp_path / 'artifact'} "
                           f"--assets {tmp_path / 'assets'}")


@pytest.fixture
def previous(tmp_path) -> Path:
    """An output file from an earlier run: bad input must leave it as it was."""
    path = tmp_path / "previous.jsonl"
    path.write_text("an earlier result\n", encoding="utf-8")
    return path


def bad_input(capsys, previous: Path, *argv) -> str:
    code, stdout, err = run(capsys, *argv, "--out", previous)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert previous.read_text(encoding="utf-8") == "an earlier result\n"
    return errors[0]


def test_bad_caption_files(capsys, tmp_path, previous, image_artifact, photo_dir):
    files = {"empty.txt": b"a dog runs .\n   \na cat .\n", "wordless.txt": b"... !!!\n", "latin1.txt": b"a caf\xe9 table .\n",
             "mixed.txt": b"a.jpg#0\ta dog .\njust a caption\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    common = ("--model", image_artifact, "--images", photo_dir, "--captions")
    assert "empty.txt line 2: empty caption; expected at least one word" in bad_input(capsys, previous, *common, tmp_path / "empty.txt")
    assert "wordless.txt line 1: no word in '... !!!'; expected at least one word" in bad_input(capsys, previous, *common, tmp_path / "wordless.txt")
    assert "latin1.txt line 1: not valid UTF-8 (byte 0xe9 at column 6); expected UTF-8 text" in bad_input(capsys, previous, *common, tmp_path / "latin1.txt")
    assert "mixed.txt line 2: 'just a caption'; expected `image#n<TAB>caption` like line 1" in bad_input(capsys, previous, *common, tmp_path / "mixed.txt")
    assert "--query '?!': no word" in bad_input(capsys, previous, "--model", image_artifact, "--images", photo_dir, "--query", "?!")


def test_bad_images(capsys, tmp_path, previous, image_artifact, photo_dir):
    listing = tmp_path / "images.txt"
    listing.write_text(f"{photo_dir / 'astronaut.png'}\n{tmp_path / 'gone.jpg'}\n", encoding="utf-8")
    captions = tmp_path / "c.txt"
    captions.write_text("a dog .\n", encoding="utf-8")
    message = bad_input(capsys, previous, "--model", image_artifact, "--images", listing, "--captions", captions)
    assert f"images.txt line 2: image '{tmp_path / 'gone.jpg'}' not found; expected an existing image file" in message
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(photo_dir / "astronaut.png", broken / "astronaut.png")
    (broken / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    message = bad_input(capsys, previous, "--model", image_artifact, "--images", broken, "--captions", captions)
    assert f"{broken / 'corrupt.jpg'}: cannot decode image" in message
    assert "no image files" in bad_input(capsys, previous, "--model", image_artifact, "--images", tmp_path / "broken" / "..", "--captions", captions)


def test_bad_options_and_artifacts(capsys, tmp_path, previous, tiny_artifact, tiny_store, image_artifact, photo_dir):
    common = ("--model", tiny_artifact, "--images", tiny_store)
    assert "--top-k 0: expected 1..50 (the most items any query ranks here)" in bad_input(capsys, previous, *common, "--top-k", 0)
    assert "--top-k 1000000: expected 1..50" in bad_input(capsys, previous, *common, "--top-k", 1000000)
    assert "--shortlist-k -3: expected 1..50" in bad_input(capsys, previous, *common, "--shortlist-k", -3)
    assert "--shortlist-k 2: expected at least --top-k 5" in bad_input(capsys, previous, *common, "--shortlist-k", 2, "--top-k", 5)
    assert "argument --top-k: invalid int value: 'ten'" in bad_input(capsys, previous, *common, "--top-k", "ten")
    message = bad_input(capsys, previous, *common, "--backend", "fast")
    assert "argument --backend: invalid choice: 'fast' (choose from 'auto', 'onnxruntime-cpu'" in message
    assert "argument --precision: invalid choice: 'int4'" in bad_input(capsys, previous, *common, "--precision", "int4")
    code, _, err = run(capsys, *common, "--out", tmp_path / "results.txt")
    assert code == 2 and "--out " in err and "results.txt: expected a file name ending in .jsonl or .tsv" in err
    assert "--images: missing" in bad_input(capsys, previous, "--model", tiny_artifact)
    assert "no shortlist graphs" in bad_input(capsys, previous, "--model", image_artifact, "--images", photo_dir,
                                             "--query", "a cat", "--shortlist-k", 2, "--top-k", 1)
    newer = tmp_path / "newer"
    shutil.copytree(tiny_artifact, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "version": manifest["version"] + 1}))
    message = bad_input(capsys, previous, "--model", newer, "--images", tiny_store)
    assert f"artifact format version {manifest['version'] + 1} is newer than this engine reads ({manifest['version']})" in message


# ---------------------------------------------------------------------------------------------
# Resume after kill -9


def killed_run(argv: list, stop_after: int) -> subprocess.CompletedProcess:
    """The command in a child process that SIGKILLs itself after `stop_after` journaled units."""
    env = {**os.environ, STOP_AFTER_ENV: str(stop_after), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "engine.score", *map(str, argv), *BASE], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode, n_images", [([], 20), (["--shortlist-k", 6], UNIT_SHORTLIST_IMAGES + 4)], ids=["exhaustive", "shortlist"])
def test_resume_after_kill_is_byte_identical(capsys, tmp_path, tiny_artifact, mode, n_images):
    # exhaustive: 3 units of score-matrix rows; shortlist: 2 units of images' re-rank pairs
    store = build_store(tmp_path / "store", splits={"test": n_images})
    argv = ["--model", tiny_artifact, "--images", store, "--direction", "both", "--top-k", 5, *mode]
    reference = tmp_path / "reference.jsonl"
    assert run(capsys, *argv, "--out", reference)[0] == 0
    out = tmp_path / "results.jsonl"
    out.write_text("an earlier result\n")
    killed = killed_run([*argv, "--out", out], stop_after=1)
    assert killed.returncode == -9, killed.stderr
    journal = tmp_path / ".results.jsonl.partial"
    assert len(json.loads((journal / "progress.json").read_text())["done"]) == 1 and out.read_text() == "an earlier result\n"
    code, _, err = run(capsys, *argv, "--out", out)
    assert code == 0, err
    assert out.read_bytes() == reference.read_bytes() and not journal.exists()


def test_a_journal_of_another_run_is_discarded(capsys, tmp_path, tiny_artifact):
    store = build_store(tmp_path / "store", splits={"test": 20})
    out = tmp_path / "results.jsonl"
    argv = ["--model", tiny_artifact, "--images", store, "--out", out]
    assert killed_run([*argv, "--batch-size", 7], stop_after=1).returncode == -9
    code, _, err = run(capsys, *argv)
    assert code == 0 and "is from a different run (or incomplete); starting over" in err
    reference = tmp_path / "reference.jsonl"
    assert run(capsys, "--model", tiny_artifact, "--images", store, "--out", reference)[0] == 0
    assert out.read_bytes() == reference.read_bytes()


def test_torch_backend_takes_the_checkpoints_the_artifact_records_by_hash(capsys, tiny_artifact, tiny_store, tiny_checkpoints):
    def torch_run(*extra):
        code = main([str(a) for a in ("--model", tiny_artifact, "--images", tiny_store, "--evaluate", "--threads", "1",
                                      "--backend", "torch", *extra)])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = torch_run()
    assert code == 2 and err.count("\n") == 1 and "pass checkpoint=DIR" in err
    code, out, err = torch_run("--checkpoint", tiny_checkpoints["bssan"], "--shortlist-checkpoint", tiny_checkpoints["shortlist"])
    assert code == 0, err
    torch_metrics = json.loads(out.strip().splitlines()[-1])
    code, out, err = run(capsys, "--model", tiny_artifact, "--images", tiny_store, "--evaluate")
    assert code == 0 and torch_metrics["backend"] == "torch"
    assert torch_metrics["rsum"] == pytest.approx(json.loads(out.strip().splitlines()[-1])["rsum"], abs=0.1)

"""Every command line of the project, given bad options and inputs: exactly one line on stderr, starting
with `error: `, exit code 2, no traceback (engine.cli: `command` + `ArgumentParser` + checked number types).
Each case runs the module's `main(argv)` in this process (no interpreter start-up), and stops before any
model, store or artifact is read, so the whole battery takes seconds."""

from __future__ import annotations

import importlib

import pytest

BAD_NUMBERS = {"positive": ["0", "-3", "ten", "nan", "inf"]}


def cases(tmp) -> list[tuple[str, list[str]]]:
    """(module, argv) pairs; `tmp` is a folder holding `a-file` (a plain file)."""
    a_file = str(tmp / "a-file")
    out = str(tmp / "out.jsonl")
    result = [
        ("engine.score", ["--no-such-option"]),
        ("engine.score", ["--top-k", "ten"]),
        ("engine.score", ["--backend", "fast"]),
        ("engine.score", ["--precision", "int4"]),
        ("engine.score", ["--direction", "sideways"]),
        ("engine.score", []),  # no --model
        ("engine.score", ["--model", str(tmp / "none"), "--images", str(tmp), "--query", "a dog", "--out", f"{a_file}/r.jsonl"]),
        ("engine.score", ["--model", str(tmp / "none"), "--images", str(tmp), "--query", "a dog", "--out", str(tmp / "r.txt")]),
        ("engine.score", ["--model", str(tmp / "none"), "--images", str(tmp), "--query", "a dog"]),  # no artifact
        ("engine.features", []),  # --images and --out required
        ("engine.features", ["--images", str(tmp), "--out", a_file]),  # --out is a file
        ("engine.features", ["--images", str(tmp), "--out", f"{a_file}/store"]),
        ("engine.features", ["--images", str(tmp), "--out", str(tmp / "s"), "--format", "coco"]),
        ("engine.features", ["--images", str(tmp / "none"), "--out", str(tmp / "s"), "--format", "folder"]),
        ("engine.features", ["--images", str(tmp), "--out", str(tmp / "s"), "--min-score", "nan"]),
        ("engine.features", ["--images", str(tmp), "--out", str(tmp / "s"), "--min-score", "1.5"]),
        ("export.__main__", []),
        ("export.__main__", [str(tmp / "none"), "--out", str(tmp / "artifact"), "--precision", "int4"]),
        ("export.__main__", [str(tmp / "none"), "--out", str(tmp / "artifact"), "--tensorrt", "maybe"]),
        ("export.__main__", [str(tmp / "none"), "--out", a_file]),
        ("export.backbones", ["--grid", "9", "--out", str(tmp)]),
        ("export.text", ["--bogus"]),
        ("export.precision", ["--out", out]),  # neither --preset nor --artifact
        ("engine.data", []),
        ("engine.data", [str(tmp / "none")]),
        ("engine.text", []),
        ("benchmarks.run", ["--presets", "huge", "--json", out]),
        ("benchmarks.tables", []),
        ("benchmarks.plots", [str(tmp / "none.json")]),
        ("benchmarks.random_model", [str(tmp / "m"), "--preset", "giant"]),
        ("benchmarks.gpu", ["--json", out, "--dtypes", "fp8"]),
        ("benchmarks.pair_scoring", ["--json", out, "--scorers", "magic"]),
        ("benchmarks.parity", [str(tmp / "none")]),  # --model missing
        ("benchmarks.compare", [str(tmp / "none-a.json"), str(tmp / "none-b.json")]),
        ("benchmarks.compare", [a_file, a_file]),  # not JSON reports
        ("benchmarks.profile", ["--artifact", str(tmp / "none")]),
    ]
    for module in ("benchmarks.run", "benchmarks.end_to_end", "benchmarks.gpu", "benchmarks.pair_scoring", "benchmarks.peak",
                   "benchmarks.precision", "benchmarks.profile"):  # a report that cannot be written: refused before minutes of measuring
        result += [(module, ["--json", f"{a_file}/report.json"]), (module, ["--json", str(tmp)])]
    result += [("export.precision", ["--preset", "demo", "--work", str(tmp), "--out", f"{a_file}/r.json"])]
    numeric = {
        "engine.score": ["--batch-size", "--threads", "--memory-budget-mb"],
        "engine.features": ["--batch-size", "--boxes", "--threads", "--max-words"],
        "export.precision": ["--threads", "--images", "--lengths"],
        "benchmarks.end_to_end": ["--images", "--threads", "--shortlist"],
        "benchmarks.gpu": ["--budget-s"],
        "benchmarks.pair_scoring": ["--repeats", "--threads", "--lengths", "--batches"],
        "benchmarks.parity": ["--images", "--captions"],
        "benchmarks.peak": ["--threads", "--rows", "--hidden"],
        "benchmarks.precision": ["--images", "--captions", "--threads", "--artifact-images"],
        "benchmarks.random_model": ["--max-words"],
        "benchmarks.profile": ["--captions", "--length", "--calls"],
    }
    required = {"engine.features": ["--images", str(tmp), "--out", str(tmp / "s")], "benchmarks.gpu": ["--json", out],
                "benchmarks.pair_scoring": ["--json", out], "benchmarks.precision": ["--json", out],
                "benchmarks.end_to_end": ["--json", out], "benchmarks.parity": [str(tmp), "--model", str(tmp)],
                "benchmarks.random_model": [str(tmp / "m")], "export.precision": ["--out", out]}
    for module, options in numeric.items():
        for option in options:
            for value in BAD_NUMBERS["positive"]:
                result.append((module, [*required.get(module, []), option, value]))
    return result


OTHERS = [  # the CLIs of the training, serving and load-test owners
    ("training.train", ["--no-such-option"]),
    ("training.train", ["--store", "s", "--out", "o", "--epochs", "-1"]),
    ("training.train", ["--store", "s", "--out", "o", "--threads", "0"]),
    ("training.train", ["--store", "s", "--out", "o", "--save-every", "nan"]),
    ("training.evaluate", []),
    ("training.evaluate", ["--scores", "s.npy", "--captions-per-image", "0"]),
    ("training.attention_maps", ["--checkpoint", "c", "--image", "i", "--caption", "x", "--out", "o", "--threads", "0"]),
    ("engine.serve.__main__", ["--model", "m", "--max-body-mb", "nan"]),
    ("engine.serve.__main__", ["--model", "m", "--max-wait-ms", "-1"]),
    ("benchmarks.load_test", ["--no-such-option"]),
]


def run_main(module: str, argv: list[str], capsys) -> tuple[int | None, str]:
    main = importlib.import_module(module).main
    try:
        code = main(argv)
    except SystemExit as exc:  # plain argparse: usage block and exit 2
        code = exc.code
    except Exception as exc:  # noqa: BLE001  (a bug's traceback: recorded as a failure of this case)
        code = f"{type(exc).__name__} raised"
        print(f"Traceback: {type(exc).__name__}: {exc}", file=__import__("sys").stderr)
    return code, capsys.readouterr().err


def test_every_cli_refuses_bad_options_in_one_line(tmp_path, capsys):
    pytest.importorskip("torch", reason="export and benchmarks CLIs import torch")
    (tmp_path / "a-file").write_text("")
    failures = []
    for module, argv in cases(tmp_path):
        code, err = run_main(module, argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        if not (code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err):
            failures.append(f"python -m {module} {' '.join(argv)}: exit {code}, stderr {err[-300:]!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("module,argv", OTHERS, ids=[f"{m} {' '.join(a)}" for m, a in OTHERS])
def test_cli_of_training_serving_and_load_test(module, argv, capsys):
    pytest.importorskip("torch", reason="training CLIs import torch")
    if module == "engine.serve.__main__":
        pytest.importorskip("fastapi", reason="engine.serve needs the serve extra")
    code, err = run_main(module, argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (code, err)

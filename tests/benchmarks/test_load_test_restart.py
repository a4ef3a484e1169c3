"""benchmarks.load_test's restart part on a small synthetic gallery: the saved index is loaded and answers as the
closed one did, and a background compaction of a quarter of the rows completes (its timings are the benchmark's
business, not asserted here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("faiss", reason="the first stage needs the serve extra: pip install 'bssan-engine[serve]'")

from benchmarks import load_test  # noqa: E402


def test_restart_part_loads_the_saved_index(tmp_path, monkeypatch):
    monkeypatch.setattr(load_test, "WORK", tmp_path)
    args = SimpleNamespace(restart_size=3000, clusters=20, spread=1.0, approximate=["hnsw", "ivf"], threads=1, hnsw_m=8,
                           ef_construction=40, ivf_lists=None)
    report = load_test.run_restart(args, dim=16)
    hnsw, ivf = report["indexes"]["hnsw"], report["indexes"]["ivf"]
    assert hnsw["loaded_answers_as_before"] and hnsw["saved_index_mb"] > 0
    assert ivf["saved_index_mb"] == 0  # 3,000 rows: below IVF's training size, a flat index, never saved
    assert set(hnsw) >= {"first_build_s", "close_with_save_s", "open_loading_saved_s", "open_rebuilding_s"}
    assert hnsw["removals"] == 30 and hnsw["loaded_after_removals"]  # 1% removed: the saved index still fits
    for point in (hnsw, ivf):  # a quarter removed: the background compaction ran, searches went on meanwhile
        compaction = point["compaction"]
        assert compaction["compacted"] and compaction["live_rows"] == 3000 - point["removals"] - compaction["removed_rows"]
        assert compaction["removed_rows"] >= 0.25 * (3000 - point["removals"]) and compaction["seconds"] >= 0
    assert not list(tmp_path.glob("bssan-restart-*"))  # its galleries are removed

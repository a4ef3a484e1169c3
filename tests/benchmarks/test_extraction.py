"""benchmarks.extraction's store comparison (the parity line of --cli) on two tiny hand-made stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.extraction import _difference, compare_stores


def _store(root: Path, names: list[str], captions: list[str], owner: list[int], objects: np.ndarray) -> Path:
    split = root / "test"
    split.mkdir(parents=True)
    (split / "image_names.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    (split / "captions.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    np.save(split / "caption_image.npy", np.array(owner, dtype=np.int32))
    np.save(split / "objects.npy", objects.astype(np.float16))
    np.save(split / "regions.npy", np.arange(len(names) * 2, dtype=np.float16).reshape(len(names), 2))
    np.save(split / "words_minilm.npy", np.array([[c.count(" ")] for c in captions], dtype=np.float16))
    return root


def test_compare_stores_matches_photos_and_captions_by_name_and_counts_float16_steps(tmp_path):
    objects = np.array([[1.0, -0.5], [0.25, 2.0], [-1.0, 0.0]])
    reference = _store(tmp_path / "ref", ["a.jpg", "b.jpg", "c.jpg"], ["a one", "b one", "b two", "c one"], [0, 1, 1, 2], objects)
    # the new store holds c and b (in that order): rows 2 and 1 of the reference
    new_objects = objects[[2, 1]].astype(np.float16)
    new_objects[0, 1] = -np.float16(0.0)  # -0.0 vs 0.0: 0 steps apart (same value)
    new_objects[1, 0] = np.nextafter(np.float16(0.25), np.float16(1))  # 1 float16 step up
    new = _store(tmp_path / "new", ["c.jpg", "b.jpg"], ["c one", "b one", "b two"], [0, 1, 1], new_objects)
    np.save(new / "test" / "regions.npy", np.array([[4, 5], [2, 3]], dtype=np.float16))
    out = compare_stores(new, reference)
    assert out["images"] == 2 and out["captions"] == 3 and out["captions_identical"]
    assert out["regions"]["identical"] and out["words_minilm"]["identical"]
    assert out["objects"]["max_fp16_steps"] == 1 and out["objects"]["values_differing"] == 0.25
    assert "1 fp16 steps" in _difference(out["objects"]) and out["boxes"]["skipped"]
    assert compare_stores(new, tmp_path / "absent") == {"skipped": f"no {tmp_path / 'absent'}/test"}

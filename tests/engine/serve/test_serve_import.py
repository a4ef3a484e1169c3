"""--import-store: a gallery folder's images that a feature store holds are encoded from the store's
features (the image graphs only) and equal the same images encoded from their files; a store made
by another pipeline is refused with one line before anything is imported."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the service needs the serve extra: pip install 'bssan-engine[serve]'")

from engine.errors import InputError  # noqa: E402
from engine.runtime import Scorer  # noqa: E402
from engine.serve.gallery import Gallery  # noqa: E402
from engine.serve.state import _without_fingerprints, import_store  # noqa: E402
from engine.store import StoreWriter  # noqa: E402


def write_store(root, extractor: dict, names: list[str], regions: np.ndarray, objects: np.ndarray):
    writer = StoreWriter(root, extractor=extractor)
    n = len(names)
    writer.open_array("test", "regions", regions.shape)[:] = regions
    writer.open_array("test", "objects", objects.shape)[:] = objects
    writer.open_array("test", "boxes", (n, objects.shape[1], 4))[:] = 0.5
    writer.open_array("test", "objects_real", (n,))[:] = objects.shape[1]
    writer.open_array("test", "caption_image", (n,))[:] = np.arange(n)
    writer.open_array("test", "lengths", (n,))[:] = 1
    writer.write_lines("test", "image_names", names)
    writer.write_lines("test", "captions", ["a photo"] * n)
    writer.finish_split("test", {"images": n, "captions": n})
    return root


def test_import_equals_encoding_the_files(serve_artifact, serve_photos, tmp_path):
    folder = tmp_path / "gallery"
    folder.mkdir()
    for photo in serve_photos[:4]:
        shutil.copy(photo, folder / photo.name)
    with Scorer.load(serve_artifact, backend="onnxruntime-cpu", threads=1) as scorer:
        stored = sorted(folder.iterdir())[:3]  # the store holds 3 of the 4 (and one image not in the folder)
        regions, objects = scorer.image_features(stored + [serve_photos[5]])
        record = json.loads((serve_artifact / "manifest.json").read_text())["preprocessing"]
        record = record.get("extractor", record)  # as a store made by the same pipeline records it
        store = write_store(tmp_path / "store", record, [p.name for p in stored] + ["elsewhere.jpg"], regions, objects)

        gallery = Gallery.open(tmp_path / "index", scorer.fingerprint, scorer.cache_precision)
        names = {p.name for p in folder.iterdir()}
        # the same pipeline with its export-time parity measured again (another OpenCV): still the same pipeline
        remeasured = json.loads((serve_artifact / "manifest.json").read_text())["preprocessing"]
        remeasured = remeasured.get("extractor", remeasured)
        parity = [part for part in remeasured.values() if isinstance(part, dict) and any(k.startswith("parity") for k in part)]
        assert parity, "the artifact's extractor record names no parity figure"
        for part in parity:
            part.update({k: "re-measured" for k in part if k.startswith("parity")})
        assert _without_fingerprints(remeasured) == _without_fingerprints(record)
        assert import_store(scorer, gallery, store, names, progress=False) == 3
        assert set(gallery.ids()) == {p.name for p in stored}
        assert import_store(scorer, gallery, store, names, progress=False) == 0  # already there: nothing again
        gallery.index_folder(folder, scorer.encode_images, {".jpg", ".png"}, progress=False)  # the 4th from its file
        assert set(gallery.ids()) == names
        from_files = scorer.encode_images(stored)
        view = gallery.view()
        slots = [view.ids.index(p.name) for p in stored]
        for name, array in from_files.arrays.items():
            assert np.array_equal(np.asarray(view.arrays[name])[slots], array), name
        gallery.close()

        other = dict(record, boxes_per_image=record.get("boxes_per_image", 10) + 1)
        wrong = write_store(tmp_path / "wrong", other, [stored[0].name], regions[:1], objects[:1])
        fresh = Gallery.open(tmp_path / "index2", scorer.fingerprint, scorer.cache_precision)
        with pytest.raises(InputError, match="boxes_per_image"):
            import_store(scorer, fresh, wrong, names, progress=False)
        assert not fresh.ids()

        # the same weights exported on another CPU: other graph bytes, fingerprints within tolerance -> the same pipeline
        graphs = [k for k, part in record.items() if isinstance(part, dict) and "graph_sha256" in part and "fingerprint" in part]
        assert graphs, "the artifact's extractor record names no graph with a fingerprint"
        section = graphs[0]
        values = np.asarray(record[section]["fingerprint"]["values"], np.float64)
        for scale, accepted in ((1 + 1e-6, True), (1 + 1e-2, False)):
            moved = {**record[section], "graph_sha256": "0" * 64,
                     "fingerprint": {**record[section]["fingerprint"], "values": (values * scale).tolist()}}
            other_cpu = write_store(tmp_path / f"other-cpu-{accepted}", dict(record, **{section: moved}), [stored[0].name],
                                    regions[:1], objects[:1])
            if accepted:
                assert import_store(scorer, fresh, other_cpu, {stored[0].name}, progress=False) == 1
            else:
                with pytest.raises(InputError, match=f"{section} \\(graph sha256 differs and the fingerprints do not match\\)"):
                    import_store(scorer, fresh, other_cpu, names, progress=False)
        assert fresh.ids() == [stored[0].name]

"""The embedded demo: real photos shipped inside scikit-image, captions written for this project.

    python -m engine.score --demo                       # ranks the captions of each photo, and the reverse
    python -m engine.score --demo --model ARTIFACT_DIR  # the same gallery with another artifact

The six photos are the colour photographs that scikit-image's wheel carries in `skimage/data`
(no download: `skimage.data.<name>()` fetches others from the network, we only read these
files). Two captions per photo, written here in Flickr8K's style, so `--evaluate` works
(captions_per_image 2). The model is the reference model trained by this project
(models/reference, a checkpoint directory), exported to DEMO_ARTIFACT.

The demo never builds anything by itself (nothing is written implicitly): if the artifact or
the feature backbones are missing, the error says the exact commands:

    python -m export.backbones --out build/assets
    python -m export models/reference --out build/artifacts/reference --assets build/assets
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from engine.errors import AssetError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO_ROOT / "models" / "reference"  # checkpoint directory (training.checkpoint)
DEMO_ARTIFACT = REPO_ROOT / "build" / "artifacts" / "reference"
DEMO_ASSETS = REPO_ROOT / "build" / "assets"
SKIMAGE = ("scikit-image", "skimage")  # (distribution, import name)

# file in skimage/data -> the captions this project wrote for it
DEMO_GALLERY: dict[str, tuple[str, ...]] = {
    "astronaut.png": ("A smiling woman in an orange space suit stands in front of an American flag .",
                      "An astronaut poses with her helmet beside a model of the space shuttle ."),
    "chelsea.png": ("A close up of a tabby cat with green eyes .",
                    "A brown striped cat looks at the camera ."),
    "coffee.png": ("A red cup of coffee sits on a saucer with a spoon .",
                   "A cup of espresso on a wooden table ."),
    "rocket.jpg": ("A rocket stands on the launch pad at dusk .",
                   "A tall white rocket between towers under a blue evening sky ."),
    "motorcycle_left.png": ("A red motorcycle is parked in a garage .",
                            "A motorbike stands in front of shelves full of boxes ."),
    "hubble_deep_field.jpg": ("Many small galaxies shine against a black sky .",
                              "A dark night sky full of colorful stars ."),
}


def skimage_data_dir() -> Path:
    """skimage/data of the installed wheel, found without importing scikit-image."""
    spec = importlib.util.find_spec(SKIMAGE[1])
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {SKIMAGE[0]!r} is not installed; expected it for the demo photos (pip install 'bssan-engine[demo]')")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def demo_gallery() -> tuple[list[Path], list[str], list[str]]:
    """(image paths, captions, the image id of each caption): 6 photos, 2 captions each."""
    folder = skimage_data_dir()
    paths = [folder / name for name in DEMO_GALLERY]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise AssetError(f"{missing[0]}: not in the installed {SKIMAGE[0]}; expected the photos its wheel ships (reinstall it)")
    captions = [caption for name in DEMO_GALLERY for caption in DEMO_GALLERY[name]]
    image_ids = [name for name in DEMO_GALLERY for _ in DEMO_GALLERY[name]]
    return paths, captions, image_ids


def demo_artifact(model: Path | None = None) -> Path:
    """The artifact the demo runs (`model` if given); AssetError with the build commands if it is absent."""
    artifact = Path(model) if model is not None else DEMO_ARTIFACT
    if (artifact / "manifest.json").is_file():
        return artifact
    steps = []
    if not (DEMO_ASSETS / "roi_align.json").is_file():
        steps.append(f"python -m export.backbones --out {DEMO_ASSETS}")
    if model is None and not (DEMO_MODEL / "config.json").is_file():
        raise AssetError(f"{artifact}: demo artifact not found, and the reference model {DEMO_MODEL} is not there to "
                         f"export it; expected models/reference (trained by python -m training.train)")
    steps.append(f"python -m export {DEMO_MODEL if model is None else '<checkpoint dir>'} --out {artifact} --assets {DEMO_ASSETS}")
    raise AssetError(f"{artifact}: demo artifact not found; build it with: {' && '.join(steps)}")

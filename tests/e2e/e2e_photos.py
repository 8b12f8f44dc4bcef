"""Photo folders for the end-to-end tests: dev photos when present, else faces scikit-image ships.

Each folder comes with the "truth" a labeler would enter: {file name: gender}. For the dev photos it
is labels.csv; for the packaged faces it is made up (two groups), which is all the tests need: they
compare the backend's figures with a count of what the simulated labeler did, not with reality.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def dev_photos(dev: Path, folder: Path, n: int) -> dict[str, str]:
    """n LFW news photos from the dev set, half male and half female, copied into folder."""
    with open(dev / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "lfw" and r["gender"]]
    truth = {}
    for gender in ("male", "female"):
        picked = [r for r in rows if r["gender"] == gender][: n // 2]
        for row in picked:
            name = Path(row["path"]).name
            shutil.copyfile(dev / row["path"], folder / name)
            truth[name] = gender
    return truth


def packaged_photos(folder: Path, n: int) -> dict[str, str]:
    """n photos made from scikit-image's astronaut and its LFW face subset, plus two without a face.

    Faces are scaled up and padded (the subset is 25x25 crops, too small for the HOG detector).
    """
    from skimage import data, transform

    truth = {}
    astronaut = data.astronaut()
    variants = [astronaut, astronaut[:, ::-1], astronaut[:300, 50:400], astronaut[:, ::-1][:300, 100:460],
                (astronaut * 0.7).astype(np.uint8)]
    for i, img in enumerate(variants):
        truth[_save(folder, f"astronaut_{i}.jpg", img)] = "female"
    faces = data.lfw_subset()[:100]             # the first 100 of the subset are faces
    i = 0
    while len(truth) < n - 2 and i < len(faces):
        grey = (transform.resize(faces[i], (150, 150)) * 255).astype(np.uint8)
        rgb = np.pad(np.stack([grey] * 3, axis=-1), ((50, 50), (50, 50), (0, 0)), mode="edge")
        truth[_save(folder, f"lfw_{i:03d}.png", rgb)] = "male" if i % 2 else "female"
        i += 1
    _save(folder, "coffee.jpg", data.coffee())          # no face: an empty prediction, no crash
    _save(folder, "chelsea.jpg", data.chelsea())
    return truth


def make_photos(folder: Path, n: int, dev: Path | None) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    if dev is not None and (dev / "labels.csv").exists():
        return dev_photos(dev, folder, n)
    return packaged_photos(folder, n)


def _save(folder: Path, name: str, rgb: np.ndarray) -> str:
    Image.fromarray(np.ascontiguousarray(rgb)).save(folder / name, quality=92)
    return name

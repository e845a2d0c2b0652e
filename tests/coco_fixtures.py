"""Small fake MS-COCO 2014 files, in the official layout that tfds's `coco_captions` builder reads.

Only what the builder opens is written (see `tensorflow_datasets/object_detection/coco.py` and
`coco_captions.py`):

    train2014/COCO_train2014_<id:012d>.jpg      images of the Karpathy "train" split
    val2014/COCO_val2014_<id:012d>.jpg          images of the "val", "test" and "restval" splits
    annotations/instances_train2014.json        image list, 80 categories, boxes
    annotations/instances_val2014.json
    dataset_coco.json                           Karpathy and Li's splits and the captions

The builder takes captions from `dataset_coco.json` (`sentences[].raw`), not from
`annotations/captions_*.json`, so those are not written. `zipped=True` writes the four official
archives instead (`train2014.zip`, `val2014.zip`, `annotations_trainval2014.zip`,
`caption_datasets.zip`) with the same contents.

The images cover what real COCO throws at a reader: sizes differ, one is grayscale, one has no
box annotations, caption counts run from 5 to 7 and one caption is not ASCII.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

KARPATHY_SPLITS = ("train", "val", "test", "restval")

# COCO's 80 category ids run from 1 to 90 with these gaps.
_MISSING_CATEGORY_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in _MISSING_CATEGORY_IDS)


@dataclasses.dataclass(frozen=True)
class FakeImage:
    """One fake COCO image and what the builder should make of it."""

    karpathy_split: str  # train | val | test | restval
    folder: str  # train2014 | val2014
    image_id: int
    width: int
    height: int
    captions: tuple[str, ...]
    grayscale: bool = False
    num_boxes: int = 1

    @property
    def file_name(self) -> str:
        return f"COCO_{self.folder}_{self.image_id:012d}.jpg"


def _captions(image_id: int, count: int) -> tuple[str, ...]:
    return tuple(f"photo {image_id} caption {k}: a small scene" for k in range(count))


# (split, folder, id, width, height, number of captions, grayscale, number of boxes)
_LAYOUT = [
    ("train", "train2014", 9, 64, 48, 5, False, 2),
    ("train", "train2014", 25, 40, 56, 6, True, 1),
    ("train", "train2014", 30, 48, 48, 5, False, 0),  # COCO has images without boxes
    ("train", "train2014", 34, 72, 40, 7, False, 1),
    ("val", "val2014", 42, 56, 64, 5, False, 1),
    ("test", "val2014", 73, 32, 40, 5, False, 3),
    ("restval", "val2014", 74, 48, 32, 5, False, 1),
    ("restval", "val2014", 133, 60, 44, 6, False, 1),
]


def fake_images() -> list[FakeImage]:
    """The images `write_fake_coco` writes, in a fixed order."""
    images = [
        FakeImage(split, folder, image_id, w, h, _captions(image_id, n), gray, boxes)
        for split, folder, image_id, w, h, n, gray, boxes in _LAYOUT
    ]
    # One caption outside ASCII, to check that text round-trips as UTF-8.
    first = images[0]
    images[0] = dataclasses.replace(
        first, captions=("a café sign — «ouvert»",) + first.captions[1:]
    )
    return images


def split_sizes() -> dict[str, int]:
    """Examples per Karpathy split, as the builder should count them."""
    return {s: sum(im.karpathy_split == s for im in fake_images()) for s in KARPATHY_SPLITS}


def _jpeg(image: FakeImage, rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 256, size=(image.height, image.width, 3), dtype=np.uint8)
    pil = Image.fromarray(pixels)
    if image.grayscale:
        pil = pil.convert("L")
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _instances(images: list[FakeImage], folder: str) -> dict:
    """An `instances_<folder>.json` with COCO's keys: images, annotations, categories."""
    mine = [im for im in images if im.folder == folder]
    annotations = []
    for im in mine:
        for k in range(im.num_boxes):
            x, y, w, h = 2.0 + k, 3.0 + k, im.width / 2, im.height / 3
            annotations.append(
                {
                    "id": im.image_id * 100 + k,
                    "image_id": im.image_id,
                    "category_id": CATEGORY_IDS[(im.image_id + k) % len(CATEGORY_IDS)],
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x + w, y + h]],
                }
            )
    return {
        "info": {"description": "fake COCO 2014 for tests", "year": 2014},
        "licenses": [{"id": 1, "name": "test", "url": ""}],
        "images": [
            {
                "id": im.image_id,
                "file_name": im.file_name,
                "width": im.width,
                "height": im.height,
                "license": 1,
                "coco_url": f"http://images.cocodataset.org/{folder}/{im.file_name}",
                "date_captured": "2013-11-20 02:07:55",
            }
            for im in mine
        ],
        "annotations": annotations,
        "categories": [
            {"id": i, "name": f"thing{i}", "supercategory": "stuff"} for i in CATEGORY_IDS
        ],
    }


def _karpathy(images: list[FakeImage]) -> dict:
    """A `dataset_coco.json` in Karpathy and Li's format."""
    entries, sentence_id = [], 0
    for imgid, im in enumerate(images):
        sentences = []
        for raw in im.captions:
            tokens = raw.lower().replace(":", "").split()
            sentences.append({"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentence_id})
            sentence_id += 1
        entries.append(
            {
                "filepath": im.folder,
                "sentids": [s["sentid"] for s in sentences],
                "filename": im.file_name,
                "imgid": imgid,
                "split": im.karpathy_split,
                "sentences": sentences,
                "cocoid": im.image_id,
            }
        )
    return {"images": entries, "dataset": "coco"}


def _official_files(seed: int) -> dict[str, dict[str, bytes]]:
    """Official archive name -> {path inside the archive: contents}."""
    images = fake_images()
    rng = np.random.default_rng(seed)
    archives: dict[str, dict[str, bytes]] = {"train2014.zip": {}, "val2014.zip": {}}
    for im in images:
        archives[f"{im.folder}.zip"][f"{im.folder}/{im.file_name}"] = _jpeg(im, rng)
    archives["annotations_trainval2014.zip"] = {
        f"annotations/instances_{folder}.json": json.dumps(_instances(images, folder)).encode()
        for folder in ("train2014", "val2014")
    }
    karpathy = json.dumps(_karpathy(images), ensure_ascii=False).encode()
    archives["caption_datasets.zip"] = {"dataset_coco.json": karpathy}
    return archives


def write_fake_coco(root: Path, *, zipped: bool = False, seed: int = 0) -> Path:
    """Writes the fake COCO files under `root` (extracted folders, or the official zips).

    Returns `root`, ready to be the builder's manual directory.
    """
    root.mkdir(parents=True, exist_ok=True)
    for archive, members in _official_files(seed).items():
        if zipped:
            with zipfile.ZipFile(root / archive, "w") as z:
                for name, data in members.items():
                    z.writestr(name, data)
        else:
            for name, data in members.items():
                path = root / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    return root


def image_path(root: Path, image: FakeImage) -> Path:
    """Where `write_fake_coco(root)` (extracted layout) put `image`."""
    return root / image.folder / image.file_name

"""Pascal VOC and COCO for torchvision's detectors, read through torchvision.datasets.

Splits: Pascal VOC's YEAR-SET (`2007-trainval`, `2012-trainval`, `2007-test`) under
DATA/VOCdevkit/VOC<year>, the layout of VOC's archives; COCO's SPLIT (`train2017`,
`val2017`) as DATA/annotations/instances_<split>.json and the images in DATA/<split>/.
A sample is (image, target): the image a float tensor in [0, 1], RGB, at its own size
(the detector resizes and normalises it); the target {"boxes": [N, 4] float (x0, y0,
x1, y1) in pixels, "labels": [N] int64 from 1, "image_id": int}.
"""

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from torchvision.datasets import CocoDetection, VOCDetection
from torchvision.transforms.functional import pil_to_tensor

from moco.utils import UsageError

# VOC's 20 classes; label i + 1 is VOC_CLASSES[i], 0 is the background
VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
DATASETS = ("voc", "coco")
# (training splits, test split): the paper's
DEFAULT_SPLITS = {
    "voc": (("2007-trainval", "2012-trainval"), "2007-test"),
    "coco": (("train2017",), "val2017"),
}
VOC_LAYOUT = (
    "expected DATA/VOCdevkit/VOC<year>/{Annotations,ImageSets/Main,JPEGImages} (the "
    "layout of VOC's archives)"
)
COCO_LAYOUT = "expected DATA/annotations/instances_<split>.json and DATA/<split>/"


def collate(batch):
    """A list of samples -> (images, targets): the detector takes lists."""
    return tuple(zip(*batch))


def _voc_root(data):
    """The folder holding VOCdevkit: DATA, or DATA's parent when DATA is VOCdevkit."""
    if os.path.isdir(os.path.join(data, "VOCdevkit")):
        return data
    if os.path.basename(os.path.normpath(data)) == "VOCdevkit":
        return os.path.dirname(os.path.normpath(data))
    if os.path.isdir(os.path.join(data, "VOC2007")):
        raise UsageError(
            f"{data!r} holds VOC2007/ itself (detectron2's datasets/ layout); give a "
            "folder holding VOCdevkit/VOC2007, e.g. mkdir voc && ln -s "
            f"{os.path.abspath(data)} voc/VOCdevkit"
        )
    problem = "does not exist" if not os.path.isdir(data) else "has no VOCdevkit/"
    raise UsageError(f"VOC folder {data!r} {problem}; {VOC_LAYOUT}")


def open_voc(data, split):
    """
    VOCDetection of split 'YEAR-SET' under DATA, every listed annotation and image
    checked to exist (a missing file is a one-line error now, not mid-training).
    """
    year, _, image_set = split.partition("-")
    voc = os.path.join("VOCdevkit", f"VOC{year}")
    root = _voc_root(data)
    folder = os.path.join(root, voc)
    listing = os.path.join(folder, "ImageSets", "Main", f"{image_set}.txt")
    if not os.path.isdir(folder):
        raise UsageError(
            f"VOC split {split!r}: {folder!r} does not exist; {VOC_LAYOUT}"
        )
    if not os.path.isfile(listing):
        raise UsageError(
            f"VOC split {split!r}: its list {listing!r} does not exist; {VOC_LAYOUT}"
        )
    try:
        dataset = VOCDetection(root, year=year, image_set=image_set, download=False)
    except ValueError as e:  # verify_str_arg: a year or set VOC does not have
        raise UsageError(f"VOC split {split!r}: {e}") from None
    for kind, paths in (("annotation", dataset.annotations), ("image", dataset.images)):
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UsageError(
                f"{kind} file {missing[0]!r}{more} of VOC split {split!r} does not "
                f"exist (listed in {listing}); {VOC_LAYOUT}"
            )
    if not dataset.images:
        raise UsageError(f"VOC split {split!r}: {listing!r} lists no images")
    return dataset


def read_voc_annotation(path):
    """(width, height, [(class, (xmin, ymin, xmax, ymax), difficult)]) of a VOC XML."""
    try:
        tree = VOCDetection.parse_voc_xml(ET.parse(path).getroot())["annotation"]
        size = tree["size"]
        objects = [
            (
                obj["name"],
                tuple(
                    float(obj["bndbox"][k]) for k in ("xmin", "ymin", "xmax", "ymax")
                ),
                obj.get("difficult", "0") == "1",
            )
            for obj in tree.get("object", [])
        ]
        width, height = int(size["width"]), int(size["height"])
    except (ET.ParseError, KeyError, TypeError, ValueError) as e:
        raise UsageError(
            f"annotation {path!r} cannot be read as VOC XML ({type(e).__name__}: {e})"
        ) from None
    unknown = next((name for name, _, _ in objects if name not in VOC_CLASSES), None)
    if unknown is not None:
        raise UsageError(
            f"annotation {path!r} names class {unknown!r}, not one of VOC's 20"
        )
    return width, height, objects


def voc_boxes(objects):
    """
    Boxes and labels of read_voc_annotation's objects. VOC's corners are pixel
    indices from 1, both inclusive: the box from the left edge of pixel xmin to the
    right edge of pixel xmax is (xmin - 1, ymin - 1, xmax, ymax) in 0-based
    coordinates, as detectron2 reads them.
    """
    boxes = [(x0 - 1, y0 - 1, x1, y1) for _, (x0, y0, x1, y1), _ in objects]
    labels = [VOC_CLASSES.index(name) + 1 for name, _, _ in objects]
    return (
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64),
    )


def coco_files(data, split):
    """(annotation file, image folder) of a COCO split, checked to exist."""
    ann = os.path.join(data, "annotations", f"instances_{split}.json")
    images = os.path.join(data, split)
    for what, path, exists in (
        ("annotation file", ann, os.path.isfile),
        ("image folder", images, os.path.isdir),
    ):
        if not exists(path):
            raise UsageError(
                f"{what} {path!r} of COCO split {split!r} does not exist; "
                + COCO_LAYOUT
            )
    return ann, images


def open_coco(data, split):
    """CocoDetection of DATA/annotations/instances_<split>.json and DATA/<split>/."""
    ann, images = coco_files(data, split)
    try:
        return CocoDetection(images, ann)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UsageError(
            f"annotation file {ann!r} is not COCO's instances JSON ({e})"
        ) from None


def check_layout(kind: str, data: str, splits: Sequence[str]) -> None:
    """Refuse a dataset folder in the wrong layout, without reading COCO's JSON."""
    for split in splits:
        if kind == "voc":
            open_voc(data, split)
        else:
            coco_files(data, split)


class DetectionSet(Dataset):
    """
    The samples of one or more splits of a dataset. train: drop COCO's images without
    a box (as detectron2) and flip each sample horizontally with probability 1/2, drawn
    from the seed EpochSampler gives it (the same flips on a resumed run). Indexed by
    an int, or by an (index, seed) pair.
    """

    def __init__(self, kind: str, data: str, splits: Sequence[str], train: bool):
        self.kind, self.train = kind, train
        self.parts = [
            open_voc(data, s) if kind == "voc" else open_coco(data, s) for s in splits
        ]
        self.categories: list[int] = []  # COCO's category ids, in label order
        if kind == "coco":
            cats = [sorted(p.coco.getCatIds()) for p in self.parts]
            if any(c != cats[0] for c in cats):
                raise UsageError(
                    f"COCO splits {list(splits)} have different categories"
                )
            self.categories = cats[0]
        # (part, index within it) of each sample
        self.index = [
            (p, j)
            for p, part in enumerate(self.parts)
            for j in range(len(part))
            if not (train and kind == "coco" and not self._coco_objects(p, j))
        ]

    @property
    def classes(self) -> tuple[str, ...]:
        if self.kind == "voc":
            return VOC_CLASSES
        cats = self.parts[0].coco.cats
        return tuple(cats[c]["name"] for c in self.categories)

    def __len__(self):
        return len(self.index)

    def image_id(self, i: int) -> int:
        """Sample i's id in the ground truth: COCO's own, or i for VOC."""
        p, j = self.index[i]
        return self.parts[p].ids[j] if self.kind == "coco" else i

    def _coco_objects(self, p, j):
        """[((x0, y0, x1, y1), label)] of image j of COCO part p, crowds left out."""
        coco = self.parts[p].coco
        objects = []
        for a in coco.loadAnns(coco.getAnnIds(imgIds=self.parts[p].ids[j])):
            x, y, w, h = a["bbox"]
            # crowd regions are neither objects to find nor background
            if not a.get("iscrowd", 0) and w > 0 and h > 0:
                label = self.categories.index(a["category_id"]) + 1
                objects.append(((x, y, x + w, y + h), label))
        return objects

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        p, j = self.index[i]
        part = self.parts[p]
        if self.kind == "voc":
            image, _ = part[j]
            _, _, objects = read_voc_annotation(part.annotations[j])
            boxes, labels = voc_boxes(objects)
        else:
            image, _ = part[j]
            objects = self._coco_objects(p, j)
            boxes = torch.tensor([b for b, _ in objects], dtype=torch.float32)
            boxes = boxes.reshape(-1, 4)
            labels = torch.tensor([c for _, c in objects], dtype=torch.int64)
        image = pil_to_tensor(image).float().div_(255)
        if self.train and seed is not None:
            flip = torch.rand(1, generator=torch.Generator().manual_seed(seed)) < 0.5
            if flip:
                image = image.flip(-1)
                width = image.shape[-1]
                boxes = torch.stack(
                    [
                        width - boxes[:, 2],
                        boxes[:, 1],
                        width - boxes[:, 0],
                        boxes[:, 3],
                    ],
                    dim=1,
                )
        return image, {"boxes": boxes, "labels": labels, "image_id": self.image_id(i)}

    def ground_truth(self) -> dict:
        """
        The samples' boxes as COCO's instances JSON, for pycocotools: a test split's
        own annotations (COCO), or VOC's objects with 'difficult' ones as crowd regions (neither
        found nor missed, as VOC's evaluation ignores them).
        """
        if self.kind == "coco":
            # a test split keeps all its images
            return self.parts[0].coco.dataset
        images, annotations = [], []
        for i, (p, j) in enumerate(self.index):
            width, height, objects = read_voc_annotation(self.parts[p].annotations[j])
            images.append({"id": i, "width": width, "height": height})
            boxes, labels = voc_boxes(objects)
            for (x0, y0, x1, y1), label, (_, _, difficult) in zip(
                boxes.tolist(), labels.tolist(), objects
            ):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i,
                        "category_id": label,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": int(difficult),
                    }
                )
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(VOC_CLASSES)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def category_id(self, label: int) -> int:
        """The ground truth's category id of a detector's label."""
        return self.categories[label - 1] if self.categories else label

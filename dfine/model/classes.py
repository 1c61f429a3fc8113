"""What a detector's labels mean: class names and dataset category ids, carried with the weights.

The model predicts labels 0..K-1. Their meaning travels with it as one plain record ("class metadata"):

    {"num_classes": K, "names": [name of label 0, ...], "category_ids": [dataset category id of label 0, ...],
     "category_map": "contiguous" | "mscoco" | "identity", "annotation_file": "..."}

(lists indexed by label: ``category_ids[label]`` is the label -> category id mapping, its inverse the
category id -> label one; a label no dataset category maps to has the name ``class <label>`` and category id
None). Plain lists, strings and ints, so it loads with ``torch.load(weights_only=True)``.

* ``train.py`` writes it into every checkpoint (key ``"classes"``, next to ``"config"``, the config trained
  with); a ``.safetensors`` file holds both as JSON strings in its metadata; an exported ONNX file holds
  ``names`` and ``category_ids`` (JSON lists) and ``num_classes`` in its ``metadata_props``.
* A checkpoint without it: 80 classes are taken to be COCO's (the published checkpoints: COCO names and
  COCO category ids); any other count gets numbered names (``class 0`` ...), category id = label, and a
  notice.
* ``--classes FILE`` (predict, visualize, export) overrides; ``read_classes_file`` documents the formats.

Also here: the Objects365 -> COCO class-row table of the published fine-tuning (``OBJ365_IDS_FOR_COCO``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from dfine.model.postprocessor import MSCOCO_CATEGORY_IDS

__all__ = ["COCO_CLASS_NAMES", "ClassInfo", "OBJ365_IDS_FOR_COCO", "OBJ365_NUM_CLASSES", "class_metadata",
           "classes_from_onnx_metadata", "read_classes_file", "resolve_classes"]

# names of COCO's 80 detection classes, in label order (COCO category ids MSCOCO_CATEGORY_IDS)
COCO_CLASS_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]
COCO_NAME_BY_CATEGORY_ID = dict(zip(MSCOCO_CATEGORY_IDS, COCO_CLASS_NAMES))

# The published fine-tuning's table (facts file, "Objects365 -> COCO class mapping"): COCO label c corresponds
# to Objects365 class row OBJ365_IDS_FOR_COCO[c] + 1 of a 366-class model (row 0 unused).
OBJ365_IDS_FOR_COCO = [
    0, 46, 5, 58, 114, 55, 116, 65, 21, 40, 176, 127, 249, 24, 56, 139, 92, 78, 99, 96,
    144, 295, 178, 180, 38, 39, 13, 43, 120, 219, 148, 173, 165, 154, 137, 113, 145, 146, 204, 8,
    35, 10, 88, 84, 93, 26, 112, 82, 265, 104, 141, 152, 234, 143, 150, 97, 2, 50, 25, 75,
    98, 153, 37, 73, 115, 132, 106, 61, 163, 134, 277, 81, 133, 18, 94, 30, 169, 70, 328, 226,
]
OBJ365_NUM_CLASSES = 366


def _numbered(label: int) -> str:
    return f"class {label}"


def class_metadata(num_classes: int, label_to_category_id: Dict[int, int], category_names: Dict[int, str],
                   category_map: str = "contiguous", annotation_file: Optional[str] = None) -> dict:
    """The record a checkpoint stores, from a dataset's mapping (``CocoDetection.label_to_category_id``) and the
    names of its 'categories' (by category id). COCO ids missing from the names (``category_map: mscoco`` on a
    JSON that lists fewer categories) take the COCO name."""
    names: List[str] = []
    ids: List[Optional[int]] = []
    for label in range(int(num_classes)):
        cid = label_to_category_id.get(label)
        ids.append(None if cid is None else int(cid))
        name = category_names.get(cid) if cid is not None else None
        if name is None and cid is not None and category_map == "mscoco":
            name = COCO_NAME_BY_CATEGORY_ID.get(cid)
        names.append(str(name) if name is not None else _numbered(label))
    record = {"num_classes": int(num_classes), "names": names, "category_ids": ids, "category_map": str(category_map)}
    if annotation_file is not None:
        record["annotation_file"] = os.fspath(annotation_file)
    return record


@dataclass(frozen=True)
class ClassInfo:
    """Names and dataset category ids per label, and where they came from (``origin``). ``notice`` is a message
    for the user when they were guessed (no metadata)."""

    names: Tuple[str, ...]
    category_ids: Tuple[Optional[int], ...]
    origin: str
    notice: Optional[str] = None

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def name(self, label: int) -> str:
        label = int(label)
        return self.names[label] if 0 <= label < len(self.names) else _numbered(label)

    def category_id(self, label: int) -> Optional[int]:
        label = int(label)
        return self.category_ids[label] if 0 <= label < len(self.category_ids) else None

    def categories(self) -> List[dict]:
        """COCO 'categories' entries [{"id", "name"}] of the labels that have a category id."""
        return [{"id": cid, "name": name} for name, cid in zip(self.names, self.category_ids) if cid is not None]

    def onnx_metadata(self) -> Dict[str, str]:
        """The ONNX ``metadata_props`` entries (strings)."""
        return {"num_classes": str(self.num_classes), "names": json.dumps(list(self.names)),
                "category_ids": json.dumps(list(self.category_ids))}


def _checked(record, num_classes: int, where: str) -> Tuple[Tuple[str, ...], Tuple[Optional[int], ...]]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: class metadata must be a mapping, got {type(record).__name__}")
    names, ids = record.get("names"), record.get("category_ids")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: class metadata 'names' must be a list of strings")
    if ids is None:
        ids = list(range(len(names)))
    if not isinstance(ids, (list, tuple)) or len(ids) != len(names) or not all(
            i is None or (isinstance(i, int) and not isinstance(i, bool)) for i in ids):
        raise ValueError(f"{where}: class metadata 'category_ids' must be a list of {len(names)} integers (or null)")
    if len(names) != num_classes:
        raise ValueError(f"{where} names {len(names)} classes but the model has num_classes {num_classes}; "
                         "is it the checkpoint of another config?")
    return tuple(names), tuple(ids)


def classes_from_onnx_metadata(props: Optional[Dict[str, str]]) -> Optional[dict]:
    """The class record of an exported ONNX file's ``metadata_props`` ({key: value}); None when it has none."""
    if not props or "names" not in props:
        return None
    try:
        record = {"names": json.loads(props["names"])}
        if "category_ids" in props:
            record["category_ids"] = json.loads(props["category_ids"])
    except json.JSONDecodeError as err:
        raise ValueError(f"the ONNX file's class metadata is not valid JSON ({err})") from None
    return record


def read_classes_file(path, num_classes: int) -> Tuple[List[str], Optional[List[Optional[int]]]]:
    """(names per label, category ids per label or None) from a ``--classes`` file. Formats:

    * text: one class name per line, in label order (blank lines are skipped);
    * JSON list of names, in label order;
    * JSON object ``{"<category id>": "name", ...}``: labels in ascending category-id order (the order
      training gives them, ``category_map: contiguous``), category ids from the keys;
    * a COCO annotation file (JSON object with ``"categories": [{"id", "name"}, ...]``): the same.

    Names only (text, list): the category ids stay those the checkpoint records, else the label. Fewer names
    than ``num_classes`` leave the other labels numbered; more is an error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"--classes file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--classes file {path!r} could not be read ({err})") from None
    ids: Optional[List[int]] = None
    stripped = text.lstrip()
    if path.lower().endswith(".json") or stripped.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--classes file {path!r} is not valid JSON ({err})") from None
        if isinstance(data, dict) and isinstance(data.get("categories"), list):
            cats = data["categories"]
            if not all(isinstance(c, dict) and "id" in c and "name" in c for c in cats):
                raise ValueError(f"--classes file {path!r}: every 'categories' entry needs an 'id' and a 'name'")
            data = {c["id"]: c["name"] for c in cats}
        if isinstance(data, list):
            names = data
        elif isinstance(data, dict):
            try:
                pairs = sorted((int(k), v) for k, v in data.items())
            except (TypeError, ValueError):
                raise ValueError(f"--classes file {path!r}: a JSON object must map category ids (integers) to "
                                 "names") from None
            ids = [k for k, _ in pairs]
            names = [v for _, v in pairs]
        else:
            raise ValueError(f"--classes file {path!r}: expected a JSON list of names or an object "
                             f"{{category id: name}}, got {type(data).__name__}")
        if not all(isinstance(n, str) for n in names):
            raise ValueError(f"--classes file {path!r}: class names must be strings")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"--classes file {path!r} names no classes")
    if len(names) > num_classes:
        raise ValueError(f"--classes file {path!r} names {len(names)} classes but the model has num_classes "
                         f"{num_classes}")
    return list(names), ids


def resolve_classes(num_classes: int, metadata: Optional[dict] = None, classes_file=None, coco_config: bool = False,
                    source: str = "the checkpoint") -> ClassInfo:
    """The ClassInfo of a model with ``num_classes`` labels: ``metadata`` (a checkpoint's or an ONNX file's class
    record), else the COCO classes for 80 (with a notice unless the config is a COCO one, ``coco_config``), else
    numbered labels with a notice; then ``classes_file`` (``read_classes_file``) overrides. ``source`` names where
    the metadata was looked for, in messages. Raises ValueError for a bad record or file."""
    num_classes = int(num_classes)
    notice = None
    if metadata is not None:
        names, ids = _checked(metadata, num_classes, source)
        origin = source
    elif num_classes == len(COCO_CLASS_NAMES):
        names, ids = tuple(COCO_CLASS_NAMES), tuple(MSCOCO_CATEGORY_IDS)
        origin = "COCO (no class metadata, 80 classes)"
        if not coco_config:
            notice = (f"{source} records no class names; with 80 classes they are taken to be COCO's (COCO names and "
                      "category ids). Pass --classes FILE if it was trained on other classes")
    else:
        names, ids = tuple(_numbered(i) for i in range(num_classes)), tuple(range(num_classes))
        origin = "numbered (no class metadata)"
        notice = (f"{source} records no class names (it was not written by this project's train.py): its "
                  f"{num_classes} classes are shown as 'class 0'..'class {num_classes - 1}' and results carry "
                  "category_id = label. Pass --classes FILE to name them (docs/deploy.md)")
    if classes_file is not None:
        file_names, file_ids = read_classes_file(classes_file, num_classes)
        n = len(file_names)
        names = tuple(file_names) + tuple(_numbered(i) for i in range(n, num_classes))
        if file_ids is not None:
            ids = tuple(file_ids) + tuple(None for _ in range(n, num_classes))
        elif metadata is None:  # names only, nothing recorded: category id = label
            ids = tuple(range(num_classes))
        origin, notice = f"--classes {os.fspath(classes_file)}", None
    return ClassInfo(tuple(names), tuple(ids), origin, notice)

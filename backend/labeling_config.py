"""What a Label Studio labeling config asks of us: the image, the face boxes, and the attributes.

    config = parse(xml)              # raises ConfigError with every problem found, for people
    config.image_key                 # task["data"][config.image_key] is the photo
    config.face_name, config.face_label
    [a.name for a in config.attributes]     # every Choices on the image is an attribute

Attributes are not hard-coded: each `Choices` whose toName is the image is one, its `Choice` values
(the `alias` when given, since that is what Label Studio stores in results) are the classes.
perRegion="true" Choices describe each face (they need the face RectangleLabels); plain Choices
describe the whole image (the backend answers them from the photo's largest face).
A config the backend cannot serve raises ConfigError at /setup, not a crash at /predict.
"""
from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib import resources

DEFAULT_CONFIG_FILE = "default_config.xml"


class ConfigError(ValueError):
    """The labeling config cannot be served; the message says why and what to change."""


@dataclass(frozen=True)
class Attribute:
    """One Choices tag: name (its from_name), values (classes), per_region (per face or per image)."""

    name: str
    values: tuple[str, ...]
    per_region: bool
    multiple: bool = False


@dataclass(frozen=True)
class LabelingConfig:
    xml: str
    image_name: str            # the Image tag's name: results' to_name
    image_key: str             # the task data key holding the photo ($image -> "image")
    face_name: str | None      # the RectangleLabels tag's name (None: whole-image attributes only)
    face_label: str | None     # the Label value a face box carries
    attributes: tuple[Attribute, ...]
    ignored: tuple[str, ...] = ()   # tags we saw and do not serve, with the reason

    def attribute(self, name: str) -> Attribute:
        for a in self.attributes:
            if a.name == name:
                return a
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    def fingerprint(self) -> str:
        """A short id of everything predictions depend on (not of comments or layout)."""
        served = {"image": [self.image_name, self.image_key], "face": [self.face_name, self.face_label],
                  "attributes": [[a.name, list(a.values), a.per_region] for a in self.attributes]}
        return hashlib.sha256(json.dumps(served, sort_keys=True).encode()).hexdigest()[:12]


def default_config_xml() -> str:
    """The labeling config shipped with subdisc (face box + six per-face attributes)."""
    return resources.files("backend").joinpath(DEFAULT_CONFIG_FILE).read_text()


def _tag(el: ET.Element) -> str:
    return el.tag.lower() if isinstance(el.tag, str) else ""


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes")


def _targets(el: ET.Element) -> list[str]:
    # toName may list several objects ("image,text").
    return [t.strip() for t in (el.get("toName") or "").split(",") if t.strip()]


def _label_value(el: ET.Element) -> str | None:
    return el.get("alias") or el.get("value")


def parse(xml: str) -> LabelingConfig:
    """Read a labeling config; ConfigError lists every reason it cannot be served."""
    if not isinstance(xml, str) or not xml.strip():
        raise ConfigError("the labeling config is empty: send the project's XML config")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ConfigError(f"the labeling config is not valid XML: {exc}") from None
    elements = list(root.iter())
    problems: list[str] = []
    ignored: list[str] = []

    names = [el.get("name") for el in elements if el.get("name") and _tag(el) not in ("label", "choice")]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"tag names must be unique; repeated: {', '.join(duplicates)}")

    images = [el for el in elements if _tag(el) == "image"]
    rect_tags = [el for el in elements if _tag(el) == "rectanglelabels"]
    if not images:
        raise ConfigError("the labeling config has no <Image> tag: subdisc pre-annotates faces in images")

    # The image we serve: the one the face boxes point at, else the only one.
    image = None
    if rect_tags:
        wanted = set(_targets(rect_tags[0]))
        image = next((el for el in images if el.get("name") in wanted), None)
    if image is None:
        if len(images) > 1:
            raise ConfigError(f"the labeling config has {len(images)} <Image> tags and no "
                              "<RectangleLabels> saying which one holds the faces")
        image = images[0]
    image_name = image.get("name") or ""
    value = (image.get("value") or "").strip()
    if not image_name:
        problems.append("the <Image> tag has no name")
    if not value.startswith("$") or len(value) < 2:
        problems.append(f'the <Image> tag\'s value must name a task field, like value="$image" '
                        f"(found {value!r})")
    for other in images:
        if other is not image:
            ignored.append(f"Image {other.get('name')!r}: only {image_name!r} is pre-annotated")

    face_name, face_label = _face(rect_tags, image_name, problems, ignored)

    attributes = []
    for el in elements:
        if _tag(el) != "choices":
            continue
        name = el.get("name") or ""
        if image_name not in _targets(el):
            ignored.append(f"Choices {name!r}: it describes {el.get('toName')!r}, not the image")
            continue
        values = [_label_value(c) for c in el.iter() if _tag(c) == "choice"]
        values = list(dict.fromkeys(v for v in values if v))
        per_region = _is_true(el.get("perRegion"))
        if not name:
            problems.append("a <Choices> tag has no name")
        elif len(values) < 2:
            problems.append(f"Choices {name!r} has {len(values)} <Choice> value(s): an attribute "
                            "needs at least two classes")
        elif per_region and face_name is None:
            problems.append(f'Choices {name!r} is perRegion="true" but there is no face '
                            "<RectangleLabels> on the image for its regions")
        else:
            attributes.append(Attribute(name, tuple(values), per_region,
                                        (el.get("choice") or "single").lower() == "multiple"))

    if face_name is None and not attributes and not problems:
        problems.append("nothing to pre-annotate: add a <RectangleLabels> for faces and/or "
                        "<Choices> on the image")
    if problems:
        raise ConfigError("the labeling config cannot be served: " + "; ".join(problems))
    return LabelingConfig(xml, image_name, value[1:], face_name, face_label, tuple(attributes),
                          tuple(ignored))


def _face(rect_tags: list[ET.Element], image_name: str, problems: list[str],
          ignored: list[str]) -> tuple[str | None, str | None]:
    """(name, label) of the RectangleLabels that boxes faces, or (None, None) without one."""
    on_image = [el for el in rect_tags if image_name in _targets(el)]
    for el in rect_tags:
        if el not in on_image:
            ignored.append(f"RectangleLabels {el.get('name')!r}: not on the image")
    if not on_image:
        return None, None

    def labels(el):
        return [v for v in (_label_value(c) for c in el.iter() if _tag(c) == "label") if v]

    # Several box tags: the one with a "Face" label is ours.
    chosen = [el for el in on_image if any(v.lower() == "face" for v in labels(el))]
    if not chosen:
        chosen = on_image if len(on_image) == 1 else []
    if not chosen:
        problems.append("several <RectangleLabels> on the image and none has a label named "
                        '"Face": name the face label "Face"')
        return None, None
    el = chosen[0]
    for other in on_image:
        if other is not el:
            ignored.append(f"RectangleLabels {other.get('name')!r}: only {el.get('name')!r} boxes faces")
    values = labels(el)
    faces = [v for v in values if v.lower() == "face"]
    if faces:
        return el.get("name"), faces[0]
    if len(values) == 1:
        return el.get("name"), values[0]
    problems.append(f"RectangleLabels {el.get('name')!r} has labels {values}: name the face label "
                    '"Face" (or keep a single label) so the backend knows which boxes are faces')
    return None, None

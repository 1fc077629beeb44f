"""MTT's ImageNet subsets (Cazenavette et al. 2022) as ImageNet-1K WordNet ids, and class labels.

MTT's ``utils.py`` (``Config.imagenette`` ... ``Config.imagesquawk``, commit 0c42493 of
GeorgeCazenavette/mtt-distillation) lists each subset as indices into the 1000 ImageNet-1K classes
in torchvision's order (the sorted wnids); MTT relabels class ``Config.<subset>[i]`` as ``i``. Below,
each index is written with the wnid it names (timm's ``imagenet_synsets.txt``, the sorted list) and
its lemma (timm's ``imagenet_synset_to_lemma.txt``), so the lists hold no hidden dependency.

Note on ImageNette: MTT's index 701 is ``n03888257`` (parachute). fast.ai's Imagenette release names
its parachute folder ``n03888605``, which in ImageNet-1K is index 702, "parallel bars": MTT's list
(followed here) takes ImageNet's parachute class.

Pure data, no imports beyond the standard library: :mod:`condense.config` expands a subset name.
"""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path

from condense.errors import ConfigError

INFRASTRUCTURE = "subset lists: expanded into dataset.classes, whose value (the wnids) enters the keys"

_SUBSETS: dict[str, tuple[tuple[int, str, str], ...]] = {
    # (ImageNet-1K index as MTT lists it, wnid, lemma), in MTT's order: position = label.
    "imagenette": (
        (0, "n01440764", "tench"),
        (217, "n02102040", "English springer"),
        (482, "n02979186", "cassette player"),
        (491, "n03000684", "chain saw"),
        (497, "n03028079", "church"),
        (566, "n03394916", "French horn"),
        (569, "n03417042", "garbage truck"),
        (571, "n03425413", "gas pump"),
        (574, "n03445777", "golf ball"),
        (701, "n03888257", "parachute"),
    ),
    "imagewoof": (
        (193, "n02096294", "Australian terrier"),
        (182, "n02093754", "Border terrier"),
        (258, "n02111889", "Samoyed"),
        (162, "n02088364", "beagle"),
        (155, "n02086240", "Shih-Tzu"),
        (167, "n02089973", "English foxhound"),
        (159, "n02087394", "Rhodesian ridgeback"),
        (273, "n02115641", "dingo"),
        (207, "n02099601", "golden retriever"),
        (229, "n02105641", "Old English sheepdog"),
    ),
    "imagefruit": (
        (953, "n07753275", "pineapple"),
        (954, "n07753592", "banana"),
        (949, "n07745940", "strawberry"),
        (950, "n07747607", "orange"),
        (951, "n07749582", "lemon"),
        (957, "n07768694", "pomegranate"),
        (952, "n07753113", "fig"),
        (945, "n07720875", "bell pepper"),
        (943, "n07718472", "cucumber"),
        (948, "n07742313", "Granny Smith"),
    ),
    "imageyellow": (
        (309, "n02206856", "bee"),
        (986, "n12057211", "yellow lady's slipper"),
        (954, "n07753592", "banana"),
        (951, "n07749582", "lemon"),
        (987, "n12144580", "corn"),
        (779, "n04146614", "school bus"),
        (599, "n03530642", "honeycomb"),
        (291, "n02129165", "lion"),
        (72, "n01773157", "black and gold garden spider"),
        (11, "n01531178", "goldfinch"),
    ),
    "imagemeow": (
        (281, "n02123045", "tabby"),
        (282, "n02123159", "tiger cat"),
        (283, "n02123394", "Persian cat"),
        (284, "n02123597", "Siamese cat"),
        (285, "n02124075", "Egyptian cat"),
        (291, "n02129165", "lion"),
        (292, "n02129604", "tiger"),
        (290, "n02128925", "jaguar"),
        (289, "n02128757", "snow leopard"),
        (287, "n02127052", "lynx"),
    ),
    "imagesquawk": (
        (84, "n01806143", "peacock"),
        (130, "n02007558", "flamingo"),
        (88, "n01818515", "macaw"),
        (144, "n02051845", "pelican"),
        (145, "n02056570", "king penguin"),
        (22, "n01614925", "bald eagle"),
        (96, "n01843383", "toucan"),
        (9, "n01518878", "ostrich"),
        (100, "n01860187", "black swan"),
        (89, "n01819313", "sulphur-crested cockatoo"),
    ),
}

SUBSETS: tuple[str, ...] = tuple(_SUBSETS)
"""MTT's subset names, as its ``--subset`` flag spells them."""

RESOLUTION = 128
"""MTT's ImageNet subsets are distilled at 128 px (resize, then centre crop)."""


def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name.lower(), SUBSETS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown ImageNet subset {name!r}{hint}; known: {', '.join(SUBSETS)}")


def subset_classes(name: str) -> list[str]:
    """The wnids of MTT's subset ``name`` (``imagenette``, ...), in MTT's order (position = label)."""
    found = _SUBSETS.get(name.lower())
    if found is None:
        raise _unknown(name)
    return [wnid for _, wnid, _ in found]


def subset_indices(name: str) -> list[int]:
    """MTT's own list for ``name``: indices into the 1000 ImageNet-1K classes (sorted wnids)."""
    found = _SUBSETS.get(name.lower())
    if found is None:
        raise _unknown(name)
    return [index for index, _, _ in found]


def subset_labels(name: str) -> list[str]:
    """Readable names of the classes of ``name``, in its order (the first lemma of each wnid)."""
    return [class_label(wnid) for wnid in subset_classes(name)]


_KNOWN = {wnid: lemma for entries in _SUBSETS.values() for _, wnid, lemma in entries}


@cache
def _timm_lemmas() -> dict[str, str]:
    """timm's wnid -> lemmas table, when timm is installed (read from its data files, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("timm")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "data" / "_info" / "imagenet_synset_to_lemma.txt"
        if path.is_file():
            pairs = (line.rstrip("\n").split("\t", 1) for line in path.read_text().splitlines())
            return {p[0]: p[1] for p in pairs if len(p) == 2}
    return {}


def class_label(wnid: str) -> str:
    """A readable name for an ImageNet wnid: its first lemma (``n01440764`` -> ``tench``); the wnid
    itself when it is not known (timm's table is read when timm is installed)."""
    if wnid in _KNOWN:
        return _KNOWN[wnid]
    lemmas = _timm_lemmas().get(wnid)
    return lemmas.split(",")[0].strip() if lemmas else wnid

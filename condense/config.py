"""Typed configuration of a pipeline run: the schemas, nothing else.

A run's settings are these fields, stacked up from a dataset card, a method's recipe and budget
(``condense/recipes/``) or a YAML file, then overrides (:mod:`condense.configure`), and the method
registry types the ``distill`` section. Every model forbids unknown keys, so a typo is an error,
never a silently ignored setting.
"""

from __future__ import annotations

import difflib
import math
import re
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from condense.store import names

INFRASTRUCTURE = "schemas: a setting's value, not this code, enters the keys of the stages it shapes"


def _numeric(annotation: Any) -> bool:
    """An int or float field (possibly optional or a float-or-literal union)."""
    if annotation in (int, float):
        return True
    return get_origin(annotation) in (Union, UnionType) and any(
        a in (int, float) for a in get_args(annotation)
    )


NEUTRAL = "key_neutral"
"""Schema mark of a field left out of stage keys while it holds this value (see :func:`added`)."""
KEYING = {"keying": True}
"""Serialisation context of a stage key's config slice (see :func:`keyed`)."""
_SAME = object()


def added(neutral: Any, default: Any = _SAME, **field: Any) -> Any:
    """A field added to a schema after artifacts were keyed without it, whose value ``neutral`` does
    what the code did before the field existed: at that value the field is left out of stage keys,
    so adding it re-keys nothing already stored; any other value enters them. ``default`` is
    ``neutral`` unless given: a default changed later is a change of behaviour, and enters every key
    that holds the field."""
    return Field(neutral if default is _SAME else default, json_schema_extra={NEUTRAL: neutral}, **field)


def keyed(model: BaseModel, **dump: Any) -> dict[str, Any]:
    """``model`` dumped for a stage key: as ``model_dump(**dump)``, without the fields (nested
    sections too) that hold their :func:`added` neutral value."""
    return model.model_dump(context=KEYING, **dump)


class Strict(BaseModel):
    """Unknown keys are errors; so is ``true``/``false`` where a number belongs (``ipc: true`` is a
    slip, not 1)."""

    model_config = ConfigDict(extra="forbid")

    @model_serializer(mode="wrap")
    def _neutral_fields_out_of_keys(
        self, serialize: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> Any:
        dumped = serialize(self)
        if info.context == KEYING and isinstance(dumped, dict):
            for name, field in type(self).model_fields.items():
                extra = field.json_schema_extra
                if isinstance(extra, dict) and NEUTRAL in extra and getattr(self, name) == extra[NEUTRAL]:
                    dumped.pop(name, None)
        return dumped

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and _numeric(cls.model_fields[str(info.field_name)].annotation):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        # YAML's .nan and .inf are floats: a learning rate of nan would run for minutes to no end.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value}")
        return value


class DatasetConfig(Strict):
    """Where the real data comes from and how it is prepared."""

    source: Literal["digits", "webdataset", "folder", "torchvision", "huggingface"] = "digits"
    name: str = "digits"
    """The dataset's name: its series of published versions in the store (``versions/<name>/...``),
    so a plain name (letters, digits, ``_ . -``); for ``source: torchvision`` the dataset class, e.g.
    ``CIFAR10``. Unset for another source than digits: the folder's name (``path``, else the train
    shards' folder, else the hub id's last part), never ``digits``."""
    path: str | None = None
    """Shard directory (webdataset), image-folder root (folder), download root (torchvision) or
    ``save_to_disk`` folder (huggingface; with ``hf_name``, its download cache)."""
    train_urls: str | None = None
    """WebDataset URL/brace pattern for the train split; overrides ``path`` (local or remote)."""
    test_urls: str | None = None
    class_names: list[str] | None = added(None)
    """``source: webdataset``: the classes' names in ``cls`` order, since shards store only the index
    (``[airplane, automobile, ...]``); they label the reports and pictures. None: the names in the
    shards' ``classes.txt`` (one per line, as ``condense data convert`` writes it), else the indices."""
    classes: list[str] | None = added(None)
    """Keep only these classes, in this order, relabelled 0..k-1 (an ImageNet subset of an ImageNet
    folder or shards): each entry a class id (a class folder's name, an ImageNet wnid, an entry of
    the shards' ``classes.txt``) or a class name. A name of MTT's subsets (``imagenette``,
    ``imagewoof``, ``imagefruit``, ``imageyellow``, ``imagemeow``, ``imagesquawk``) stands for its
    wnids (:mod:`condense.datasets.imagenet_subsets`). None: every class."""
    hf_name: str | None = None
    """``source: huggingface``: a hub dataset id (``uoft-cs/cifar10``) for ``datasets.load_dataset``;
    None reads the ``save_to_disk`` folder at ``path``."""
    hf_image_column: str | None = None
    """``source: huggingface``: the ``Image`` column; None: the only one, else the one named ``image``."""
    hf_label_column: str | None = None
    """``source: huggingface``: the ``ClassLabel`` column (its names are the class names); None: the only
    one, else the one named ``label``."""
    resolution: int | None = Field(default=None, gt=0)
    """Resize images to this square side; None keeps the native size."""
    train_per_class: int | None = Field(default=None, gt=0)
    """Keep only the first N training images of each class (CPU budgets); None keeps all."""
    zca: bool = False
    """ZCA-whiten train and test (fitted on train), as MTT does for some settings."""
    load: Literal["auto", "memory", "stream"] = "auto"
    """``memory``: decode both splits once into the store and load them whole (small data);
    ``stream``: keep only an index (sample, byte range or row, label) and decode per batch, with
    memory flat in the dataset's size (webdataset ``.tar`` shards, or a huggingface dataset's
    memory-mapped Arrow rows); ``auto``: stream when the encoded training data (the shards, the
    arrow files) exceed ``stream_above_mb``."""
    stream_above_mb: float = Field(default=2048, gt=0)
    transform: Literal["resize", "imagenet", "center"] = "resize"
    """``resize``: every image resized to ``resolution`` squared (CIFAR-style); ``imagenet``: the
    short side resized to ``resolution / 0.875`` and centre-cropped (test, and every class-balanced
    draw), RandomResizedCrop(0.08-1) plus flip when training epochs stream; ``center``: the short
    side resized to ``resolution`` and the centre square kept (MTT's ImageNet subsets)."""
    normalize: Literal["dataset", "imagenet"] = "dataset"
    """Input mean/std: the training split's (``dataset``) or ImageNet's fixed values."""
    stats_images: int = Field(default=20_000, gt=0)
    """Streaming: mean/std (and the ZCA whitening with ``zca: true``) measured on a seeded
    class-balanced sample of this many training images (all of them when the split is smaller; then
    both equal the in-memory path's)."""
    on_corrupt: Literal["error", "skip"] = "error"
    """A sample without an image or integer ``cls``, or whose image does not decode: stop with the
    sample's name (``error``), or leave it out and count it in the card (``skip``). Never a wrong label."""
    workers: int = Field(default=2, ge=0)
    """DataLoader worker processes that read and decode streamed batches (0: in the main process)."""
    shuffle_buffer: int = Field(default=2048, gt=0)
    """Streaming epochs are shuffled by shard order and then through a buffer of this many samples."""

    @field_validator("classes", mode="before")
    @classmethod
    def _subset_by_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            # Imported here: the subsets live with the datasets, which import this module.
            from condense.datasets.imagenet_subsets import subset_classes
            from condense.errors import ConfigError

            try:
                return subset_classes(value)
            except ConfigError as err:
                raise ValueError(str(err)) from None
        return value

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError(f"classes must be distinct and not empty, got {value}")
        return value

    @model_validator(mode="after")
    def _names_for_shards(self) -> DatasetConfig:
        if self.class_names is None:
            return self
        if self.source != "webdataset":
            raise ValueError(
                "class_names is for source webdataset (shards store only class indices); "
                f"source {self.source} names its classes itself"
            )
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be distinct and not empty, got {self.class_names}")
        return self

    @model_validator(mode="after")
    def _series_name(self) -> DatasetConfig:
        if "name" not in self.model_fields_set and self.source != "digits":
            # Another source must not publish into the digits series of a shared store.
            location = self.path or self.train_urls or self.hf_name
            derived = _folder_name(location)
            if location and derived is None:
                raise ValueError(f"name is needed for source {self.source}: it names the set in the store")
            # No location at all: the source's own check names what is missing when it loads.
            self.name = derived or self.name
        if not names.COMPONENT.fullmatch(self.name):
            raise ValueError(
                f"name {self.name!r} is not a plain name (letters, digits, '_', '.', '-'; no leading '.'):"
                " it becomes a folder of the store"
            )
        return self


def _folder_name(location: str | None) -> str | None:
    """The last folder of a path, URL or brace pattern that is a plain name (``.../cifar10/train-{0..9}.tar``
    -> ``cifar10``), or None."""
    if not location:
        return None
    parts = [p for p in re.split(r"[/\\:]", location.rstrip("/")) if p and "{" not in p and "*" not in p]
    for part in reversed(parts):
        if names.COMPONENT.fullmatch(part) and not re.search(r"\.(tar|tgz|gz|zip|arrow)$", part):
            return part
    return None


class DSAConfig(Strict):
    """Differentiable siamese augmentation (Zhao & Bilen 2021), the defaults MTT uses."""

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    brightness: float = Field(default=1.0, ge=0)
    saturation: float = Field(default=2.0, ge=0)
    contrast: float = Field(default=0.5, ge=0)
    crop: float = Field(default=0.125, ge=0, lt=1)
    """Largest shift, as a fraction of the side."""
    cutout: float = Field(default=0.5, ge=0, le=1)
    """Side of the erased square, as a fraction of the image's."""
    scale: float = Field(default=1.2, ge=1)
    """Largest zoom factor (its inverse the smallest)."""
    rotate: float = Field(default=15.0, ge=0, le=180)
    """Largest rotation in degrees, either way."""
    flip: float = Field(default=0.5, ge=0, le=1)
    """Probability of a horizontal flip."""

    @field_validator("strategy")
    @classmethod
    def _known_families(cls, value: str) -> str:
        known = {"color", "crop", "cutout", "flip", "scale", "rotate"}
        unknown = [f for f in value.split("_") if f not in known]
        if unknown or not value:
            raise ValueError(f"unknown DSA families {unknown}; choose from {sorted(known)} joined by '_'")
        return value


class ModelConfig(Strict):
    """ConvNet-D: D blocks of conv3x3(width) -> norm -> ReLU -> avgpool2, then a linear head."""

    width: int = Field(default=128, gt=0)
    depth: int | None = Field(default=None, gt=0)
    """None: chosen from the resolution so the last feature map is 4x4 (3 for 32 px, 4 for 64 px)."""
    norm: Literal["instancenorm", "batchnorm", "none"] = "instancenorm"


class ExpertScheduleConfig(Strict):
    """PAD's difficulty-ordered expert data (Li et al. 2024, ``buffer_CL.py``).

    Each class's training images are sorted from easy to hard by their EL2N score (the ``difficulty``
    stage: ``el2n_models`` ConvNets trained ``el2n_epochs`` epochs with the experts' SGD recipe).
    Expert epoch ``e`` (0-based) trains on, per class of ``n`` images in that order:

    - ``e <= add_end_epoch``: the easiest ``int(p * n)``, ``p = min(1, init_ratio + (1 - init_ratio)
      * e / add_end_epoch)`` (hard images are added linearly);
    - ``add_end_epoch < e <= rm_epoch_first``: all of them;
    - ``rm_epoch_first < e <= rm_epoch_second``: all but the easiest ``int(rm_easy_ratio_first * n)``;
    - later: all but the easiest ``int(rm_easy_ratio_second * n)``.

    Defaults: PAD's README command for CIFAR-10.
    """

    init_ratio: float = Field(default=0.75, ge=0, le=1)
    add_end_epoch: int = Field(default=20, gt=0)
    """> 0: PAD's formula divides by it."""
    rm_epoch_first: int = Field(default=40, ge=0)
    rm_epoch_second: int = Field(default=60, ge=0)
    rm_easy_ratio_first: float = Field(default=0.1, ge=0, le=1)
    rm_easy_ratio_second: float = Field(default=0.2, ge=0, le=1)
    el2n_models: int = Field(default=2, gt=0)
    """Networks (different seeds) whose EL2N scores are averaged (Paul et al. 2021)."""
    el2n_epochs: int = Field(default=2, gt=0)
    """Epochs each scoring network trains before it scores (EL2N is an early-training score)."""

    @model_validator(mode="after")
    def _phases_in_order(self) -> ExpertScheduleConfig:
        if not self.add_end_epoch <= self.rm_epoch_first <= self.rm_epoch_second:
            raise ValueError(
                "need add_end_epoch <= rm_epoch_first <= rm_epoch_second, got "
                f"{self.add_end_epoch}, {self.rm_epoch_first}, {self.rm_epoch_second}"
            )
        return self


class ExpertsConfig(Strict):
    """Expert trajectories, MTT's buffer.py recipe: plain SGD, constant LR, DSA, a snapshot per epoch;
    optionally FTD's GSAM experts, PAD's difficulty-ordered data and AST's smooth experts (momentum,
    weight decay, clipping loss, gradient penalty, one learning-rate step)."""

    num_experts: int = Field(default=5, gt=0)
    epochs: int = Field(default=20, gt=0)
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    lr_step_factor: float = added(1.0, gt=0, le=1)
    """The learning rate is multiplied by this once, after epoch ``epochs // 2 + 2`` (1-based: the
    official ``e == train_epochs // 2 + 1`` at 0-based ``e``), and the optimizer is rebuilt, so its
    momentum buffers restart, as buffer.py does (AST: 0.6, always on; MTT's ``--decay``: 0.1). 1: none."""
    loss_decay_epochs: int = added(0, ge=0)
    """AST's clipping loss: the cross-entropy of epoch ``e < loss_decay_epochs`` (0-based) is scaled by
    ``(1 + e / loss_decay_epochs) / 2``: 0.5, 0.55, ..., 0.95 for AST's 10, so early steps are short."""
    gradient_penalty: float = added(0.0, ge=0)
    """AST's gradient penalty weight lambda (2 in its code; 0: off): lambda * mean over images and
    pixels of (||d(sum of logits)/dx||_2 - 1)^2, the norm over channels, on the un-augmented batch."""
    batch_size: int = Field(default=256, gt=0)
    dsa: bool = True
    optimizer: Literal["sgd", "gsam"] = "sgd"
    """``gsam``: FTD's flat experts (Du et al. 2023), GSAM (:mod:`condense.gsam`) around the SGD above."""
    rho: float = Field(default=0.01, ge=0)
    """GSAM's perturbation radius, constant (FTD's and PAD's scripts: rho_max = rho_min = 0.01)."""
    gsam_alpha: float = Field(default=0.4, ge=0)
    """GSAM's weight of the gradient component orthogonal to the perturbed one (FTD 0.4; PAD 0.3)."""
    adaptive: bool = True
    """Adaptive (ASAM-scaled) perturbation, as FTD's buffer_FTD.py always runs it (its flag is
    ``type=bool, default=True``, so no command-line value turns it off)."""
    schedule: ExpertScheduleConfig | None = None
    """PAD's easy-to-hard expert data; None: every epoch on all images. ``true`` (or ``{}``) turns it
    on with PAD's defaults, setting any of its keys turns it on too."""

    @field_validator("schedule", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        # `--set experts.schedule=true` reads as "on, with the defaults"; `false` as off.
        if value is True:
            return {}
        return None if value is False else value


class TeacherConfig(Strict):
    """The teacher (RDED's "observer", SRe2L's "squeeze" stage): labels synthetic images, scores RDED's
    patches, and drives the KD recipe. It is a stage of its own, cached like every other."""

    source: Literal["best_expert", "train", "file"] = "best_expert"
    """``best_expert``: the expert with the best final train accuracy (free when experts exist);
    ``train``: train ``arch`` on the full real data with the settings below; ``file``: a PyTorch
    state_dict of ``arch`` at ``path`` (e.g. a published observer), or a checkpoint dict holding it
    under ``state_dict`` or ``model``; read weights-only, a DataParallel ``module.`` prefix dropped."""
    path: str | None = None
    arch: str = "convnet"
    """``convnet`` (ConvNet-D with ``norm``, width/depth from ``model``), a timm name (``resnet18``) or
    ``torchvision:<name>`` for torchvision's classification models (``torchvision:resnet18``, built
    by ``torchvision.models.get_model``; a file of ``torchvision.models.resnet18().state_dict()``
    loads into it). Bare names are timm's. Images up to 64 px get ResNets' 3x3 stride-1 stem without
    max-pool, as SRe2L's and RDED's small-image teachers."""
    norm: Literal["instancenorm", "batchnorm", "none"] = "batchnorm"
    """Norm of a trained ConvNet teacher; RDED's and SRe2L's teachers use batch norm."""
    epochs: int = Field(default=30, gt=0)
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0)
    weight_decay: float = Field(default=5e-4, ge=0)
    batch_size: int = Field(default=256, gt=0)
    dsa: bool = True
    """Train with DSA on every batch (cosine learning rate to 0 over ``epochs``)."""
    ensemble: list[str] = added([])
    """Further architectures (``convnet``, timm or ``torchvision:`` names), each trained with the
    recipe above (a ConvNet with ``norm``) as a teacher-stage job of its own, whatever ``source``
    gives the first teacher: the teacher is then the ensemble of all of them, the mean of their
    logits, wherever a teacher labels or supervises (INFER's teachers of different architectures).
    Empty: one teacher."""

    @model_validator(mode="after")
    def _path_for_file(self) -> TeacherConfig:
        if self.source == "file" and not self.path:
            raise ValueError("teacher.source 'file' needs teacher.path (a state_dict saved with torch.save)")
        return self


class SoftLabelsConfig(Strict):
    """One soft label per synthetic image (exported with the set): the teacher's softmax at T."""

    temperature: float = Field(default=4.0, gt=0)


class RelabelConfig(Strict):
    """How the KD recipe gets its labels: the teacher's top-k probabilities on every augmented batch.

    ``online`` runs the teacher during student training (RDED). ``stored`` (FKD/SRe2L) precomputes,
    for every epoch, each image's crop box, flip, the batch's CutMix and the teacher's top-k
    probabilities, so a student trains later without the teacher.
    """

    mode: Literal["online", "stored"] = "online"
    top_k: int | None = Field(default=None, gt=0)
    """Keep the k largest probabilities and spread the rest uniformly (FKD's marginal smoothing);
    None keeps all classes. Applied in both modes, so they train on the same labels."""
    fp16: bool = True
    """Store boxes and probabilities as float16 (FKD's --use_fp16)."""
    quantize: Literal["none", "uint8"] = "none"
    """``uint8``: the kept probabilities as 8-bit codes on a grid from 0 to the row's largest
    probability (one scale per row, in ``fp16``'s precision), error at most 1/510 of that maximum:
    half of float16's bytes per value. The KD gradient errs by exactly the target's absolute error,
    hence a uniform grid; per row because KD temperatures make rows flat. Applied in both modes, so
    they train on the same labels."""
    stored_epochs: int | None = Field(default=None, gt=0)
    """Draw and label only this many epochs of crops, flips and CutMix; training epoch e replays
    epoch e mod ``stored_epochs`` (storage falls by ``evaluate.epochs / stored_epochs``). None: one
    per training epoch. Online mode cycles its plans the same way, so both modes agree."""


class KDRecipeConfig(Strict):
    """The knowledge-distillation evaluation recipe of RDED/SRe2L (``evaluate.recipe: kd``)."""

    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay, not applied to biases and norm weights."""
    final_lr_fraction: float = Field(default=0.0, ge=0, le=1)
    """Cosine from ``lr`` to ``lr * final_lr_fraction`` (SRe2L: 0; RDED's quarter cosine ends at 0.5)."""
    temperature: float = Field(default=20.0, gt=0)
    """KL divergence between student and teacher at this temperature (RDED/SRe2L with CutMix: 20)."""
    crop_scale: tuple[float, float] | None = None
    """RandomResizedCrop area range; None: (1/factor, 1) of the set's stitching factor, as RDED."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    cutmix_beta: float = Field(default=1.0, ge=0)
    cutmix_prob: float = Field(default=1.0, ge=0, le=1)

    @field_validator("crop_scale")
    @classmethod
    def _valid_scale(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 < value[0] <= value[1] <= 1:
            raise ValueError("crop_scale must be (low, high) with 0 < low <= high <= 1")
        return value


class EvaluateConfig(Strict):
    """Train fresh networks on a set, test on the real test split.

    ``recipe: mtt`` is MTT's evaluate_synset (SGD, DSA, hard or stored soft labels); ``recipe: kd`` is
    the RDED/SRe2L recipe (AdamW, cosine, crops + CutMix, KL to the teacher at every step);
    ``recipe: replay`` is DD's own evaluation: the distilled set trains fresh networks by exactly the
    step schedule the method learned with it (its steps in order, each on its images with its learned
    step size; only a set that carries one, DD's); ``recipe: staged`` is PDD's: one network trained on
    the set's first stage, then its first two, ..., each stage for ``epochs`` epochs with a new SGD
    at that stage's learned step size (``lr: learned``) that keeps the previous one's momentum (only
    a set that carries stages, PDD's; SGD, on the labels ``labels`` names, each stage's rows of
    them). Every baseline is trained with the same
    recipe as the distilled set; under ``replay`` and ``staged``, whose schedule or stages belong to
    the distilled set alone, with the mtt recipe.
    """

    recipe: Literal["mtt", "kd", "replay", "staged"] = "mtt"
    kd: KDRecipeConfig = Field(default_factory=KDRecipeConfig)

    models: list[str] = Field(default_factory=lambda: ["convnet"], min_length=1)
    """``convnet`` (the distillation architecture) and/or timm names such as ``resnet18``."""
    model: ModelConfig | None = None
    """The ``convnet`` students' norm, width and depth; None: the pipeline's ``model`` (the network the
    method distils with). Set it to train one student whatever the method, e.g. across a comparison's
    label regimes, whose presets distil with instance-norm (MTT's family) or batch-norm ConvNets."""
    seeds: int = Field(default=3, gt=0)
    seeds_per_job: int | None = Field(default=None, gt=0)
    """Seeds trained together in one evaluation job (stacked networks, one vmapped step for all:
    about 3x faster on a CPU, far more on a GPU); None: all of them. Smaller groups spread over more
    devices and cache finer."""
    epochs: int = Field(default=300, gt=0)
    batch_size: int = Field(default=256, gt=0)
    lr: float | Literal["learned"] = "learned"
    """``learned``: the synthetic learning rate the method learned (MTT); else a fixed value."""
    optimizer: Literal["sgd", "adam"] = added("sgd")
    """The mtt recipe's optimiser, everything else of the recipe kept (epochs, batches, DSA, weight
    decay, the learning rate /10 halfway): ``sgd`` with ``momentum`` at ``lr`` (``baseline_lr`` for
    the baselines), or ``adam`` (betas 0.9/0.999, eps 1e-8) at ``adam_lr`` for every set, the inner
    optimiser with which RaT-BPTT's and AT-BPTT's official code evaluates."""
    adam_lr: float = added(0.001, gt=0)
    """Adam's learning rate under ``optimizer: adam`` (RaT-BPTT's ``--inner_lr`` 0.001)."""
    momentum: float = Field(default=0.9, ge=0)
    weight_decay: float = Field(default=5e-4, ge=0)
    dsa: bool = True
    labels: Literal["hard", "soft", "learned"] = "hard"
    """MTT recipe only. ``soft``: KD loss (KL at ``soft_labels.temperature``) against the teacher's
    per-image soft labels; ``learned``: soft cross-entropy against softmax of the label logits the
    method learned (DATM, PAD), random real images labelled by the experts' logits the way DATM
    initialises its labels. The full-data baseline keeps hard labels."""
    temperature: float = Field(default=4.0, gt=0)
    random_real: bool = True
    """Baseline: the same number of randomly chosen real images, same recipe, lr ``baseline_lr``."""
    full_data: bool = True
    """Baseline: the whole training set, ``full_data_epochs`` epochs."""
    baseline_lr: float = Field(default=0.01, gt=0)
    full_data_epochs: int = Field(default=30, gt=0)
    mask_ratios: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    """Masked temperature scaling (Zhu et al., ICCV 2023): the ratios t swept, each the share of input
    values zeroed while the temperature is fitted on the held-out split; t is picked there too, never
    on the test split. Empty: plain temperature scaling only (each ratio costs a pass over the split)."""

    @field_validator("mask_ratios")
    @classmethod
    def _ratios(cls, value: list[float]) -> list[float]:
        if any(not 0 <= r < 1 for r in value):
            raise ValueError(f"mask ratios are shares of input values zeroed, in [0, 1): {value}")
        return value

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and value <= 0:
            raise ValueError("lr must be > 0 or 'learned'")
        return value

    @model_validator(mode="after")
    def _labels_belong_to_mtt(self) -> EvaluateConfig:
        if self.recipe == "kd" and self.labels != "hard":
            raise ValueError("evaluate.labels applies to the mtt recipe; kd recipe labels come from relabel")
        if self.recipe == "replay" and self.labels != "hard":
            raise ValueError(
                "evaluate.labels applies to the mtt recipe; a replayed schedule trains on hard labels"
            )
        return self

    @model_validator(mode="after")
    def _optimizer_belongs_to_mtt(self) -> EvaluateConfig:
        if self.optimizer != "sgd" and self.recipe != "mtt":
            raise ValueError(
                f"evaluate.optimizer applies to the mtt recipe; the {self.recipe} recipe has its own"
                " (kd: AdamW; replay: the learned gradient-descent steps; staged: SGD at each stage's"
                " step size)"
            )
        return self


class ComputeConfig(Strict):
    """Where the arithmetic runs (in no cache key: devices change rounding, not what is computed)."""

    device: str = "auto"
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    devices: list[str] | None = None
    """Devices the fanned-out jobs (experts, evaluation runs) take in turn, one job per GPU at a time,
    e.g. ``[cuda:0, cuda:1]``; None: every visible GPU for ``auto``/``cuda``, else ``device``."""
    compile: Literal["auto", "on", "off"] = "auto"
    """``torch.compile`` the hot training steps: ``auto`` on CUDA only (it pays there; on a CPU the
    compilation costs more than it saves at these sizes), ``on`` everywhere a compiler works."""

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        # YAML 1.1 reads `on`/`off` (as in `--set compute.compile=on`) as booleans.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    deterministic: bool = False
    """Bit-reproducible CUDA runs (deterministic kernels, no TF32); CPU runs are reproducible anyway."""
    shards: int | Literal["auto"] = added(1)
    """Jobs one distillation splits into, where its method splits (RDED and DM by classes; SRe2L, CDA
    and CUDD's first curriculum by IPC index; the others refuse more than 1), and stored relabeling
    (by stored epoch): each shard is its own cached, resumable job, on the devices in turn, and their
    merge is the unsharded artifact byte for byte, so the count enters no key. ``auto``: one per
    device of ``devices``, else ``cpu_jobs``; ``condense run --runner dask``: one per Dask worker."""
    data_parallel: int | Literal["auto"] = added(1)
    """Processes that train a teacher (``teacher.source: train``) data-parallel: each batch split
    across them, gradients averaged (torch.distributed: NCCL on GPUs, Gloo on CPUs). The teacher is
    the one-process teacher up to floating-point reduction order, as on another GPU model, so the
    count enters no key. ``auto``: one per device of ``devices``, else every visible GPU, else 1."""

    @field_validator("data_parallel")
    @classmethod
    def _positive_processes(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"data_parallel must be at least 1 (or auto), got {value}")
        return value

    @field_validator("shards")
    @classmethod
    def _positive_shards(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"shards must be at least 1 (or auto), got {value}")
        return value

    def shard_count(self) -> int:
        """``shards`` resolved: ``auto`` is one per listed device, else ``cpu_jobs``."""
        if self.shards == "auto":
            return len(self.devices) if self.devices else self.cpu_jobs
        return int(self.shards)

    cpu_jobs: int = Field(default=1, gt=0)
    """Jobs computed at once on the CPU by one process (the threads runner; a Dask cluster's
    single-threaded workers are separate processes). Each job already uses every core through
    torch's threads: 30 evaluations at once on 2 cores (a comparison's fan-out) finished 2 in 42
    minutes. Raise it for many small jobs on a many-core machine."""

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"unknown device {value!r}: use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("devices")
    @classmethod
    def _device_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("give at least one device, or leave it unset")
            for name in value:
                if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
                    raise ValueError(f"unknown device {name!r}: use cpu, cuda or cuda:N")
        return value


class PipelineConfig(Strict):
    """One pipeline run: dataset -> experts -> distill -> soft labels -> evaluate."""

    name: str = "custom"
    budget: str | None = None
    """The budget the settings were sized by: None or ``cpu`` (a laptop CPU), ``paper`` (the method's
    published hyperparameters for the dataset and IPC), or a YAML file's own named budget."""
    method: str = "mtt"
    ipc: int = Field(default=1, gt=0)
    """Images per class of the distilled set."""
    seed: int = 0
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    dsa: DSAConfig = Field(default_factory=DSAConfig)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    distill: Any = None
    """The method's own config: a mapping here, typed by the method registry
    (:func:`condense.methods.configure`) into the method's config class."""
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    soft_labels: SoftLabelsConfig = Field(default_factory=SoftLabelsConfig)
    relabel: RelabelConfig = Field(default_factory=RelabelConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)

    @property
    def student(self) -> ModelConfig:
        """The ConvNet that evaluation trains: ``evaluate.model``, else ``model``."""
        return self.evaluate.model or self.model

    @model_validator(mode="after")
    def _stored_labels_feed_kd(self) -> PipelineConfig:
        if self.relabel.mode == "stored" and self.evaluate.recipe != "kd":
            raise ValueError("relabel.mode 'stored' feeds the kd recipe: set evaluate.recipe=kd")
        return self


def known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of ``model`` (sections and their fields), for "did you mean" hints."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += known_keys(ann, prefix + name + ".")
    return keys


def explain(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """Pydantic's report as one actionable line (the first error, with a suggestion for a typo)."""
    first = err.errors()[0]
    loc = prefix + ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(loc, known_keys(model, prefix), n=1)
        return f"unknown config key {loc!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
    msg = first["msg"].removeprefix("Value error, ")
    return f"invalid config value for {loc!r}: {msg}" if loc else f"invalid config: {msg}"

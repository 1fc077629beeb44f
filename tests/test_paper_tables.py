"""The methods' paper tables (``paper:`` of condense/recipes/methods/<method>.yaml), checked against
their sources with the numbers written out here: one test per method, one case per (dataset, IPC) row,
each asserting the key hyperparameters of the resolved config (``--budget paper --ipc N``). Editing a
paper value in a recipe, or adding a row without its numbers here, fails a test. Config resolution
only: nothing trains."""

from __future__ import annotations

from typing import Any

import pytest

from condense.configure import cards, load_config, recipes
from condense.errors import ConfigError

Row = tuple[str, int, dict[str, Any]]

SUBSETS = ["imagenette", "imagewoof", "imagefruit", "imagemeow", "imagesquawk", "imageyellow"]
"""MTT's 128 px ImageNet subsets (MTT Table 2)."""


def read(cfg: Any, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def check_row(method: str, dataset: str, ipc: int, expected: dict[str, Any]) -> None:
    cfg = load_config(f"{dataset}-{method}", ["budget=paper", f"ipc={ipc}"])
    assert (cfg.method, cfg.ipc, cfg.budget) == (method, ipc, "paper")
    assert {key: read(cfg, key) for key in expected} == expected


def rows(table: list[Row]) -> list[Any]:
    return [pytest.param(d, n, values, id=f"{d}-ipc{n}") for d, n, values in table]


# -- MTT: its appendix table (mtt-distillation #7) as dc_benchmark restates it; subsets from issue #1 --

MTT_ALL = {
    "experts.num_experts": 100,
    "experts.epochs": 50,
    "experts.batch_size": 256,
    "experts.lr": 0.01,
    "distill.iterations": 5000,
    "evaluate.epochs": 1000,
    "evaluate.seeds": 5,
}


def mtt(
    zca: bool, n: int, m: int, t: int, lr_img: float, lr_lr: float, lr_teacher: float, batch: int | None
) -> dict[str, Any]:
    return {
        **MTT_ALL,
        "dataset.zca": zca,
        "distill.syn_steps": n,
        "distill.expert_epochs": m,
        "distill.max_start_epoch": t,
        "distill.lr_img": lr_img,
        "distill.lr_lr": lr_lr,
        "distill.lr_init": lr_teacher,
        "distill.batch_syn": batch,
    }


MTT: list[Row] = [
    ("cifar10", 1, mtt(True, 50, 2, 2, 100, 1e-7, 0.01, None)),
    ("cifar10", 10, mtt(True, 30, 2, 20, 100, 1e-5, 0.001, None)),
    ("cifar10", 50, mtt(False, 30, 2, 40, 1000, 1e-5, 0.001, None)),
    ("cifar100", 1, mtt(True, 20, 3, 20, 1000, 1e-5, 0.01, None)),
    ("cifar100", 10, mtt(False, 20, 2, 20, 1000, 1e-5, 0.01, None)),
    ("cifar100", 50, mtt(True, 80, 2, 40, 1000, 1e-5, 0.01, 125)),
    ("tinyimagenet", 1, mtt(False, 10, 2, 10, 10000, 1e-4, 0.01, None)),
    ("tinyimagenet", 10, mtt(False, 20, 2, 40, 10000, 1e-4, 0.01, 200)),
    ("tinyimagenet", 50, mtt(False, 20, 2, 40, 10000, 1e-4, 0.01, 300)),
    *[(s, 1, mtt(False, 20, 2, 10, 1e5, 1e-6, 0.01, None)) for s in SUBSETS],
    *[(s, 10, mtt(False, 20, 2, 10, 1e5, 1e-6, 0.01, 20)) for s in SUBSETS],
]


@pytest.mark.parametrize(("dataset", "ipc", "expected"), rows(MTT))
def test_mtt_table(dataset: str, ipc: int, expected: dict[str, Any]):
    check_row("mtt", dataset, ipc, expected)


# -- FTD: its Table 7 (docs/parameters.png) and run scripts; subsets from FTD issue #3 --------------

FTD_ALL = {"experts.optimizer": "gsam", "experts.rho": 0.01}
"""FTD's experts are MTT's (100 x 50 epochs, batch 256) trained with GSAM."""


def ftd(
    zca: bool,
    alpha: float,
    n: int,
    m: int,
    t: int,
    lr_img: float,
    lr_lr: float,
    lr_teacher: float,
    ema: float,
    batch: int | None,
) -> dict[str, Any]:
    return {
        **mtt(zca, n, m, t, lr_img, lr_lr, lr_teacher, batch),
        **FTD_ALL,
        "experts.gsam_alpha": alpha,
        "distill.ema_decay": ema,
    }


FTD: list[Row] = [
    ("cifar10", 1, ftd(True, 0.3, 50, 2, 2, 100, 1e-7, 0.01, 0.9999, None)),
    ("cifar10", 10, ftd(True, 0.3, 30, 2, 20, 100, 1e-5, 0.001, 0.9995, None)),
    ("cifar10", 50, ftd(True, 1.0, 30, 2, 40, 1000, 1e-5, 0.01, 0.999, None)),
    ("cifar100", 1, ftd(True, 1.0, 40, 3, 20, 1000, 1e-5, 0.01, 0.9995, None)),
    ("cifar100", 10, ftd(True, 1.0, 20, 2, 40, 1000, 1e-5, 0.01, 0.9995, None)),
    ("cifar100", 50, ftd(True, 1.0, 80, 2, 40, 1000, 1e-5, 0.01, 0.999, 1000)),
    ("tinyimagenet", 1, ftd(False, 1.0, 30, 2, 10, 10000, 1e-4, 0.01, 0.999, None)),
    ("tinyimagenet", 10, ftd(False, 1.0, 20, 2, 40, 10000, 1e-4, 0.01, 0.999, 500)),
    *[
        (s, n, ftd(False, 1.0, 20, 2, 10, 10000, 1e-4, 0.01, 0.999, 64))
        for s in ["imagenette", "imagewoof", "imagefruit", "imagemeow"]
        for n in (1, 10)
    ],
]


@pytest.mark.parametrize(("dataset", "ipc", "expected"), rows(FTD))
def test_ftd_table(dataset: str, ipc: int, expected: dict[str, Any]):
    check_row("ftd", dataset, ipc, expected)


# -- DATM and PAD: their configs/<dataset>/ConvIN/IPC<N>.yaml --------------------------------------
# Windows: the configs' exclusive upper ends minus one (0..(10 -> 20) is 0, 9 -> 19); growth is
# expansion_end_epoch, given where the window grows (Sequential_Generation).

DATM_ALL = {
    "dataset.zca": True,
    "experts.optimizer": "gsam",
    "experts.gsam_alpha": 0.3,
    "experts.num_experts": 100,
    "experts.epochs": 100,
    "experts.batch_size": 256,
    "distill.iterations": 10000,
    "distill.lr_init": 0.01,
    "distill.momentum_labels": 0.9,
    "distill.labels": "learned",
    "evaluate.labels": "learned",
    "evaluate.epochs": 1000,
    "evaluate.batch_size": 128,
    "evaluate.seeds": 5,
}


def window(low: int, first: int | None, top: int, growth: int | None = None) -> dict[str, Any]:
    values = {
        "distill.min_start_epoch": low,
        "distill.initial_max_start_epoch": first,
        "distill.max_start_epoch": top,
    }
    return values | ({"distill.window_growth_iterations": growth} if growth is not None else {})


def datm(
    n: int,
    m: int,
    win: dict[str, Any],
    lr_img: float,
    lr_lr: float,
    lr_y: float,
    batch: int,
    threshold: float,
    init: str = "correct",
) -> dict[str, Any]:
    return {
        **DATM_ALL,
        **win,
        "distill.syn_steps": n,
        "distill.expert_epochs": m,
        "distill.lr_img": lr_img,
        "distill.lr_lr": lr_lr,
        "distill.lr_labels": lr_y,
        "distill.batch_syn": batch,
        "distill.skip_above": threshold,
        "distill.init": init,
    }


DATM: list[Row] = [
    ("cifar10", 1, datm(80, 2, window(0, None, 3), 100, 1e-7, 5.0, 10, 1.1)),
    ("cifar10", 10, datm(80, 2, window(0, 9, 19, 1000), 100, 1e-5, 2.0, 100, 1.0)),
    ("cifar10", 50, datm(80, 2, window(0, 19, 39, 2000), 1000, 1e-5, 2.0, 500, 1.0)),
    ("cifar10", 500, datm(40, 2, window(40, None, 59), 50, 1e-5, 10.0, 1000, 1.0)),
    ("cifar10", 1000, datm(100, 2, window(40, None, 59), 50, 1e-5, 10.0, 1000, 1.0)),
    ("cifar100", 1, datm(40, 3, window(0, 9, 19, 1000), 1000, 1e-5, 10.0, 1000, 1.0)),
    ("cifar100", 10, datm(80, 2, window(0, 29, 49, 2000), 1000, 1e-5, 10.0, 1000, 1.0)),
    ("cifar100", 50, datm(80, 2, window(20, None, 69), 1000, 1e-5, 10.0, 1000, 1.0, init="real")),
    ("cifar100", 100, datm(80, 2, window(30, None, 69), 50, 1e-5, 10.0, 1000, 1.0)),
    ("tinyimagenet", 1, datm(40, 2, window(0, 14, 19, 2000), 10000, 1e-4, 10.0, 1000, 1.0)),
    ("tinyimagenet", 10, datm(40, 2, window(10, None, 49), 100, 1e-4, 10.0, 500, 1.0)),
    ("tinyimagenet", 50, datm(20, 2, window(40, None, 69), 100, 1e-4, 10.0, 1000, 1.0)),
]


@pytest.mark.parametrize(("dataset", "ipc", "expected"), rows(DATM))
def test_datm_table(dataset: str, ipc: int, expected: dict[str, Any]):
    check_row("datm", dataset, ipc, expected)


PAD_ALL = {
    "experts.schedule.init_ratio": 0.75,
    "experts.schedule.add_end_epoch": 20,
    "experts.schedule.rm_epoch_first": 40,
    "experts.schedule.rm_epoch_second": 60,
    "experts.schedule.rm_easy_ratio_first": 0.1,
    "experts.schedule.rm_easy_ratio_second": 0.2,
}


def pad(depth_ratio: float, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return {**datm(*args, **kwargs), **PAD_ALL, "distill.shallow_fraction": depth_ratio}


PAD: list[Row] = [
    ("cifar10", 1, pad(0.0, 80, 2, window(0, None, 3), 100, 1e-7, 5.0, 10, 1.1)),
    ("cifar10", 10, pad(0.5, 80, 2, window(0, 9, 19, 1000), 100, 1e-5, 2.0, 500, 1.0)),
    ("cifar10", 50, pad(0.25, 80, 3, window(0, 19, 39, 2000), 1000, 1e-5, 2.0, 1000, 1.0)),
    ("cifar10", 500, pad(0.5, 40, 2, window(40, 59, 69, 2000), 50, 1e-5, 10.0, 1000, 1.0)),
    ("cifar10", 1000, pad(0.5, 100, 2, window(40, None, 59), 50, 1e-5, 10.0, 1000, 1.0)),
    ("cifar100", 1, pad(0.5, 40, 3, window(0, 19, 29, 1000), 1000, 1e-5, 10.0, 1000, 1.0)),
    ("cifar100", 10, pad(0.5, 80, 2, window(0, 29, 49, 2000), 1000, 1e-5, 10.0, 1000, 1.0)),
    ("cifar100", 50, pad(0.0, 80, 2, window(20, None, 69), 1000, 1e-5, 10.0, 1000, 1.0, init="real")),
    ("cifar100", 100, pad(0.5, 80, 2, window(30, None, 69), 50, 1e-5, 10.0, 1000, 1.0)),
    ("tinyimagenet", 1, pad(0.5, 40, 2, window(0, 14, 19, 2000), 10000, 1e-4, 10.0, 1000, 1.0)),
    ("tinyimagenet", 10, pad(0.5, 40, 2, window(10, None, 49), 100, 1e-4, 10.0, 500, 1.0)),
    ("tinyimagenet", 50, pad(0.5, 20, 2, window(40, None, 69), 100, 1e-4, 10.0, 1000, 1.0)),
]


@pytest.mark.parametrize(("dataset", "ipc", "expected"), rows(PAD))
def test_pad_table(dataset: str, ipc: int, expected: dict[str, Any]):
    check_row("pad", dataset, ipc, expected)


# -- DSA, DM, DREAM: DatasetCondensation's main.py / main_DM.py; DREAM's argument.py -----------------

MATCHING_EVAL = {"evaluate.epochs": 1000, "evaluate.lr": 0.01, "evaluate.seeds": 5}

DSA_ALL = {
    **MATCHING_EVAL,
    "distill.iterations": 1000,
    "distill.lr_img": 0.1,
    "distill.batch_real": 256,
    "distill.init": "real",
    "distill.lr_net": 0.01,
    "distill.batch_train": 256,
    "distill.outer_loop": None,  # get_loops(ipc)
    "distill.inner_loop": None,
}
DSA: list[Row] = [
    (d, n, DSA_ALL)
    for d, n in [("cifar10", 1), ("cifar10", 10), ("cifar10", 50), ("cifar100", 1), ("cifar100", 10)]
]


@pytest.mark.parametrize(("dataset", "ipc", "expected"), rows(DSA))
def test_dsa_table(dataset: str, ipc: int, expected: dict[str, Any]):
    check_row("dsa", dataset, ipc, expected)


def dm(lr_img: float) -> dict[str, Any]:
    return {
        **MATCHING_EVAL,
        "distill.iterations": 20000,
        "distill.lr_img": lr_img,
        "distill.batch_real": 256,
        "distill.init": "real",
    }


DM: list[Row] = [
    *[(d, n, dm(1.0)) for d in ("cifar10", "cifar100", "tinyimagenet") for n in (1, 10, 50)],
    *[("cifar10", n, dm(10.0)) for n in (100, 200, 500, 1000, 1250)],
]


@pytest.mark.parametrize(("dataset", "ipc", "expected"), rows(DM))
def test_dm_table(dataset: str, ipc: int, expected: dict[str, Any]):
    check_row("dm", dataset, ipc, expected)


DREAM_ALL = {
    **MATCHING_EVAL,
    "distill.base": "dsa",
    "distill.sampler": "representative",
    "distill.init": "kmeans",
    "distill.batch_real": 128,
    "distill.interval": 10,
    "distill.iterations": 1000,
    "distill.lr_img": 0.1,
}
DREAM: list[Row] = [(d, n, DREAM_ALL) for d in ("cifar10", "cifar100") for n in (1, 10, 50)]


@pytest.mark.parametrize(("dataset", "ipc", "expected"), rows(DREAM))
def test_dream_table(dataset: str, ipc: int, expected: dict[str, Any]):
    check_row("dream", dataset, ipc, expected)


# -- RDED: scripts/*.sh and argument.py ---------------------------------------------------------------

RDED_ALL = {
    "distill.candidates": 300,
    "distill.crops_per_image": 5,
    "relabel.mode": "online",
    "evaluate.recipe": "kd",
    "evaluate.epochs": 300,
    "evaluate.kd.final_lr_fraction": 0.5,
    "evaluate.kd.temperature": 20.0,
}


def rded(observer: str, factor: int, batch: int, lr: float = 0.001, seeds: int = 5) -> dict[str, Any]:
    return {
        **RDED_ALL,
        "teacher.arch": observer,
        "distill.factor": factor,
        "evaluate.models": [observer],
        "evaluate.batch_size": batch,
        "evaluate.kd.lr": lr,
        "evaluate.seeds": seeds,
    }


RDED: list[Row] = [
    ("cifar10", 1, rded("convnet", 1, 10)),
    ("cifar10", 10, rded("convnet", 1, 50)),
    ("cifar10", 50, rded("convnet", 1, 100)),
    *[("cifar100", n, rded("convnet", 1, 25, lr=0.002)) for n in (1, 10, 50)],
    *[("tinyimagenet", n, rded("torchvision:resnet18", 1, 100)) for n in (1, 10, 50)],
    *[
        (s, n, rded("convnet", 2, b))
        for s in ("imagenette", "imagewoof")
        for n, b in ((1, 10), (10, 50), (50, 100))
    ],
    ("imagenet", 1, rded("torchvision:resnet18", 2, 20, seeds=1)),
    ("imagenet", 10, rded("torchvision:resnet18", 2, 100, seeds=1)),
    ("imagenet", 50, rded("torchvision:resnet18", 2, 200, seeds=1)),
]


@pytest.mark.parametrize(("dataset", "ipc", "expected"), rows(RDED))
def test_rded_table(dataset: str, ipc: int, expected: dict[str, Any]):
    check_row("rded", dataset, ipc, expected)


# -- SRe2L, CDA, CUDD: VILA-Lab/SRe2L (SRe2L/, CDA/) and MIV-XJTU/CUDD scripts ----------------------


def recover(iterations: int, lr: float, r_bn: float, jitter: int, crop: bool = True) -> dict[str, Any]:
    return {
        "distill.iterations": iterations,
        "distill.lr": lr,
        "distill.r_bn": r_bn,
        "distill.jitter": jitter,
        "distill.crop": crop,
        "distill.first_bn_multiplier": 10.0,
    }


def kd_eval(
    student: str,
    epochs: int,
    batch: int,
    temperature: float,
    crop_scale: tuple[float, float] | None,
    seeds: int,
) -> dict[str, Any]:
    return {
        "evaluate.recipe": "kd",
        "evaluate.models": [student],
        "evaluate.epochs": epochs,
        "evaluate.batch_size": batch,
        "evaluate.kd.temperature": temperature,
        "evaluate.kd.crop_scale": crop_scale,
        "evaluate.seeds": seeds,
    }


CIFAR10_KD = {"teacher.arch": "convnet", "teacher.epochs": 200, **kd_eval("convnet", 300, 50, 20.0, None, 5)}
TINY_SQUEEZE = {"teacher.arch": "torchvision:resnet18", "teacher.epochs": 50, "teacher.lr": 0.2}
TINY_KD = {**kd_eval("torchvision:resnet18", 100, 256, 20.0, (0.08, 1.0), 5), "evaluate.kd.cutmix_prob": 0.0}
IMAGENET_SQUEEZE = {"teacher.arch": "torchvision:resnet18", "teacher.epochs": 90, "teacher.lr": 0.1}
IMAGENET_FKD = {
    **kd_eval("torchvision:resnet18", 300, 1024, 20.0, (0.08, 1.0), 1),
    "relabel.mode": "stored",
    "relabel.top_k": 10,
}

SRE2L: list[Row] = [
    ("cifar10", 10, {**CIFAR10_KD, **recover(1000, 0.25, 0.01, 4), "relabel.mode": "online"}),
    (
        "cifar100",
        50,
        {
            "teacher.arch": "torchvision:resnet18",
            "teacher.epochs": 200,
            "teacher.lr": 0.1,
            **recover(1000, 0.25, 0.01, 4, crop=False),
            **kd_eval("torchvision:resnet18", 400, 128, 30.0, None, 5),
        },
    ),
    *[("tinyimagenet", n, {**TINY_SQUEEZE, **recover(4000, 0.1, 1.0, 4), **TINY_KD}) for n in (50, 100)],
    *[
        ("imagenet", n, {**IMAGENET_SQUEEZE, **recover(4000, 0.25, 0.01, 32), **IMAGENET_FKD})
        for n in (10, 50, 100, 200)
    ],
]


@pytest.mark.parametrize(("dataset", "ipc", "expected"), rows(SRE2L))
def test_sre2l_table(dataset: str, ipc: int, expected: dict[str, Any]):
    check_row("sre2l", dataset, ipc, expected)


CURRICULUM = {"distill.crop_curriculum": "cosine", "distill.milestone": 1.0, "distill.crop_min_scale": 0.08}

CDA: list[Row] = [
    ("cifar10", 10, {**CIFAR10_KD, **recover(1000, 0.25, 0.01, 4), **CURRICULUM}),
    *[
        ("tinyimagenet", n, {**TINY_SQUEEZE, **recover(4000, 0.4, 0.05, 4), **CURRICULUM, **TINY_KD})
        for n in (50, 100)
    ],
    *[
        ("imagenet", n, {**IMAGENET_SQUEEZE, **recover(4000, 0.25, 0.01, 32), **CURRICULUM, **IMAGENET_FKD})
        for n in (50, 100, 200)
    ],
]


@pytest.mark.parametrize(("dataset", "ipc", "expected"), rows(CDA))
def test_cda_table(dataset: str, ipc: int, expected: dict[str, Any]):
    check_row("cda", dataset, ipc, expected)


CUDD: list[Row] = [
    (
        "cifar10",
        10,
        {
            **CIFAR10_KD,
            **recover(1000, 0.25, 0.01, 4),
            "distill.init": "real",
            "distill.curricula": None,
            "distill.student_epochs": 150,
            "distill.student_batch_size": 50,
        },
    ),
    (
        "imagenet",
        50,
        {
            **IMAGENET_SQUEEZE,
            **recover(4000, 0.25, 0.01, 32),
            **IMAGENET_FKD,
            "evaluate.batch_size": 128,
            "distill.init": "real",
            "distill.curricula": [20, 30],
            "distill.adv_weight": 1.0,
            "distill.l2_weight": 1.0,
            "distill.student_epochs": 150,
            "distill.student_batch_size": 128,
            "distill.student.crop_scale": (0.08, 1.0),
            "distill.student.temperature": 20.0,
        },
    ),
]


@pytest.mark.parametrize(("dataset", "ipc", "expected"), rows(CUDD))
def test_cudd_table(dataset: str, ipc: int, expected: dict[str, Any]):
    check_row("cudd", dataset, ipc, expected)


# -- INFER: zhangxin-xd/UFC sh/ufc_cifar.sh, ufc_imgnet.py; val_dyn.py's 400 / (M + 1) epochs, T 30 ------

UFC_CIFAR_TEACHERS = {
    "teacher.arch": "torchvision:resnet18",
    "teacher.ensemble": ["mobilenetv2_100", "efficientnet_b0", "torchvision:shufflenet_v2_x1_0"],
    "teacher.epochs": 200,
    "teacher.lr": 0.1,
}
UFC_CIFAR = {
    **UFC_CIFAR_TEACHERS,
    **recover(1000, 0.25, 1.0, 4, crop=False),
    "distill.flip": False,
    "evaluate.epochs": 80,
    "evaluate.batch_size": 64,
    "evaluate.kd.temperature": 30.0,
    "evaluate.kd.weight_decay": 0.01,
}
INFER: list[Row] = [
    *[
        ("cifar10", n, {**UFC_CIFAR, "evaluate.models": ["convnet", "torchvision:resnet18"]})
        for n in (10, 50)
    ],
    *[
        ("cifar100", n, {**UFC_CIFAR, "evaluate.models": ["convnet", "torchvision:resnet18"]})
        for n in (10, 50, 100)
    ],
    *[("tinyimagenet", n, {**UFC_CIFAR, "evaluate.models": ["torchvision:resnet18"]}) for n in (10, 50)],
    *[
        (
            "imagenet",
            n,
            {
                **IMAGENET_SQUEEZE,
                "teacher.ensemble": ["torchvision:mobilenet_v2", "torchvision:efficientnet_b0"],
                **recover(2000, 0.25, 0.01, 32),
                "distill.flip": True,
                "evaluate.epochs": 75,
                "relabel.mode": "stored",
            },
        )
        for n in (10, 50)
    ],
]


@pytest.mark.parametrize(("dataset", "ipc", "expected"), rows(INFER))
def test_infer_table(dataset: str, ipc: int, expected: dict[str, Any]):
    check_row("infer", dataset, ipc, expected)


# -- DataDAM: DataDistillation/DataDAM's hyperparameter table (p = 4, 8000 iterations) --------------

DATADAM_ALL = {
    "distill.iterations": 8000,
    "distill.lr_img": 1.0,
    "distill.power": 4.0,
    "distill.task_balance": 0.01,
    "distill.batch_real": 64,
    "distill.init": "real",
    "evaluate.epochs": 1800,
    "evaluate.lr": 0.01,
    "evaluate.seeds": 10,
}
DATADAM: list[Row] = [
    (d, n, DATADAM_ALL) for d in ("cifar10", "cifar100", "tinyimagenet") for n in (1, 10, 50)
]


@pytest.mark.parametrize(("dataset", "ipc", "expected"), rows(DATADAM))
def test_datadam_table(dataset: str, ipc: int, expected: dict[str, Any]):
    check_row("datadam", dataset, ipc, expected)


# -- DD (SsnL/dataset-distillation), RaT-BPTT (fengyzpku/Simple_Dataset_Distillation), AT-BPTT -----

BPTT_EVAL = {"evaluate.seeds": 8, "evaluate.epochs": 1000, "evaluate.lr": 0.01, "dsa.strategy": "flip_rotate"}


def rat(
    zca: bool,
    iterations: int,
    unroll: int,
    window: int,
    lr: float,
    batch: int,
    per_class: int | None,
    classes: int | None,
    labels: str,
    **more: Any,
) -> dict[str, Any]:
    return {
        **BPTT_EVAL,
        "dataset.zca": zca,
        "distill.iterations": iterations,
        "distill.unroll": unroll,
        "distill.window": window,
        "distill.min_start": 0,
        "distill.inner_lr": 0.001,
        "distill.lr": lr,
        "distill.batch_real": batch,
        "distill.images_per_class": per_class,
        "distill.classes_per_step": classes,
        "distill.labels": labels,
        "evaluate.labels": labels,
        "distill.init": "noise",
        "distill.clip_ema": 0.9,
        "distill.window_every": None,
        **{f"distill.{key}": value for key, value in more.items()},
    }


DD: list[Row] = [
    (
        "cifar10",
        10,
        {
            "distill.iterations": 19600,
            "distill.decay_every": 1960,
            "distill.decay_factor": 0.5,
            "distill.lr": 0.01,
            "distill.lr_init": 0.001,
            "distill.batch_real": 1024,
            "distill.epochs": 3,
            "distill.images_per_step": 1,
            "distill.init": "unknown",
            "distill.start": "noise",
            "evaluate.seeds": 5,
        },
    )
]
RATBPTT: list[Row] = [
    ("cifar10", 10, rat(True, 600000, 200, 60, 0.001, 5000, None, None, "hard", placement="random")),
    ("cifar100", 1, rat(True, 600000, 130, 90, 0.0003, 5000, 1, None, "learned", placement="end")),
    ("cifar100", 10, rat(True, 600000, 300, 100, 0.001, 5000, 1, None, "learned", placement="random")),
    ("tinyimagenet", 10, rat(False, 6000000, 300, 100, 0.0003, 1000, 1, 50, "learned", placement="random")),
]
AT_STAGES = {"stage2_gain": 1.5, "stage3_gain": 1.0, "stage2_patience": 0.15, "stage3_patience": 0.125}
ATBPTT: list[Row] = [
    (
        "cifar10",
        10,
        rat(True, 600000, 200, 40, 0.001, 5000, None, None, "hard", window_range=10, **AT_STAGES),
    ),
    (
        "cifar100",
        10,
        rat(True, 3000000, 300, 100, 0.001, 1000, 1, None, "learned", window_range=20, **AT_STAGES),
    ),
    (
        "tinyimagenet",
        10,
        rat(False, 6000000, 300, 100, 0.0003, 1000, 1, 50, "learned", window_range=30, **AT_STAGES),
    ),
]

BPTT_TABLES = {"dd": DD, "ratbptt": RATBPTT, "atbptt": ATBPTT}


@pytest.mark.parametrize(
    ("method", "dataset", "ipc", "expected"),
    [
        pytest.param(m, d, n, values, id=f"{m}-{d}-ipc{n}")
        for m, t in BPTT_TABLES.items()
        for d, n, values in t
    ],
)
def test_bptt_tables(method: str, dataset: str, ipc: int, expected: dict[str, Any]):
    check_row(method, dataset, ipc, expected)


# -- AST: shenjiyuan123/AST-Alignment-with-Smooth-Expert's distill.sh ------------------------------

AST_ALL = {
    "experts.num_experts": 100,
    "experts.epochs": 50,
    "experts.batch_size": 256,
    "experts.lr": 0.003,
    "experts.momentum": 0.9,
    "experts.weight_decay": 0.001,
    "experts.lr_step_factor": 0.6,
    "experts.loss_decay_epochs": 10,
    "experts.gradient_penalty": 2.0,
    "distill.iterations": 5000,
    "distill.lr_init": 0.01,
    "distill.student_momentum": 0.9,
}


def ast(
    zca: bool,
    n: int,
    m: int,
    t: int,
    lr_img: float,
    lr_lr: float,
    batch: int | None,
    init: str,
    flags: str,
    eval_epochs: int,
) -> dict[str, Any]:
    """``flags``: b(alance_loss), a(gg_middle_loss), w(eight_perturb) as distill.sh passes them."""
    return {
        **AST_ALL,
        "dataset.zca": zca,
        "distill.syn_steps": n,
        "distill.expert_epochs": m,
        "distill.max_start_epoch": t,
        "distill.lr_img": lr_img,
        "distill.lr_lr": lr_lr,
        "distill.batch_syn": batch,
        "distill.init": init,
        "distill.balanced_inner_loss": "b" in flags,
        "distill.intermediate_matching": "a" in flags,
        "distill.weight_perturbation": 1.0 if "w" in flags else 0.0,
        "evaluate.epochs": eval_epochs,
    }


AST: list[Row] = [
    ("cifar10", 10, ast(True, 30, 2, 20, 100, 1e-6, None, "real", "baw", 1000)),
    ("cifar100", 1, ast(False, 40, 3, 15, 100, 1e-5, None, "representative", "aw", 300)),
    ("cifar100", 10, ast(False, 20, 2, 30, 1000, 1e-5, 128, "representative", "aw", 300)),
    ("cifar100", 50, ast(False, 80, 2, 40, 1000, 1e-5, 700, "representative", "", 1000)),
    ("tinyimagenet", 1, ast(False, 10, 2, 10, 10000, 1e-4, None, "real", "aw", 1000)),
]


@pytest.mark.parametrize(("dataset", "ipc", "expected"), rows(AST))
def test_ast_table(dataset: str, ipc: int, expected: dict[str, Any]):
    check_row("ast", dataset, ipc, expected)


# -- the tables as a whole -------------------------------------------------------------------------

# -- PDD: VITA-Group/ProgressiveDD's README commands (per-stage ipc x 5 stages) ------------------------


def pdd(t: int, m: int, start: int, lr_lr: float, **extra: Any) -> dict[str, Any]:
    return {
        "experts.num_experts": 100,
        "experts.epochs": 50,
        "distill.base": "mtt",
        "distill.stages": 5,
        "distill.synthetic_epochs": 1000,
        "distill.iterations": 5000,
        "distill.syn_steps": t,
        "distill.expert_epochs": m,
        "distill.max_start_epoch": start,
        "distill.lr_img": 1000,
        "distill.lr_lr": lr_lr,
        "distill.lr_init": 0.01,
        "dataset.zca": True,
        "evaluate.recipe": "staged",
        "evaluate.seeds": 5,
        "evaluate.epochs": 500,
        **extra,
    }


PDD: list[Row] = [
    ("cifar10", 10, pdd(50, 2, 5, 1e-7)),
    ("cifar10", 50, pdd(30, 2, 15, 1e-5)),
    ("cifar100", 10, pdd(20, 3, 20, 1e-5)),
    ("cifar100", 50, pdd(20, 2, 20, 1e-5, **{"distill.batch_syn": 512})),
]


@pytest.mark.parametrize(("dataset", "ipc", "expected"), rows(PDD))
def test_pdd_table(dataset: str, ipc: int, expected: dict[str, Any]):
    check_row("pdd", dataset, ipc, expected)


TABLES: dict[str, list[Row]] = {
    "mtt": MTT,
    "ftd": FTD,
    "datm": DATM,
    "pad": PAD,
    "dsa": DSA,
    "dm": DM,
    "dream": DREAM,
    "rded": RDED,
    "sre2l": SRE2L,
    "cda": CDA,
    "cudd": CUDD,
    "infer": INFER,
    "datadam": DATADAM,
    "dd": DD,
    "ratbptt": RATBPTT,
    "atbptt": ATBPTT,
    "ast": AST,
    "pdd": PDD,
}


def test_every_paper_row_resolves_validates_and_has_its_numbers_above():
    assert set(TABLES) == set(recipes())
    for method, recipe in recipes().items():
        table = recipe.paper_rows()
        assert table, f"{method} has no paper table"
        assert set(table) <= set(cards()), f"{method}'s paper table names a dataset without a card"
        assert recipe.paper_source, f"{method}'s paper table names no source"
        for dataset, ipcs in table.items():
            assert dataset not in recipe.not_for
            for ipc in ipcs:
                cfg = load_config(f"{dataset}-{method}", ["budget=paper", f"ipc={ipc}"])
                assert (cfg.method, cfg.ipc, cfg.budget) == (method, ipc, "paper")
        # Every row is one of this file's cases and every case a row: a new row needs its numbers.
        assert {(d, n) for d, ipcs in table.items() for n in ipcs} == {(d, n) for d, n, _ in TABLES[method]}


def test_a_method_that_does_not_apply_to_a_dataset_says_why():
    refused = {m: set(r.not_for) for m, r in recipes().items() if r.not_for}
    assert refused == {m: {"imagenet"} for m in ("mtt", "ftd", "datm", "pad", "ast", "pdd", "dsa", "dream")}
    for method, datasets in refused.items():
        for dataset in datasets:
            reason = recipes()[method].not_for[dataset]
            with pytest.raises(ConfigError) as err:
                load_config(f"{dataset}-{method}", ["budget=paper", "ipc=10"])
            assert str(err.value) == f"{method} does not apply to {dataset}: {reason}"
            assert "\n" not in reason and len(reason) > 40


@pytest.mark.parametrize(
    ("name", "ipc", "rows_named"),
    [
        ("cifar100-dsa", 50, "rows: cifar100 IPC 1, 10 "),
        ("cifar10-mtt", 20, "rows: cifar10 IPC 1, 10, 50 "),
        ("imagenette-dsa", 1, "rows: cifar10 IPC 1, 10, 50; cifar100 IPC 1, 10 "),
    ],
)
def test_a_missing_row_is_a_one_line_error_naming_the_rows_there_are(name: str, ipc: int, rows_named: str):
    dataset, _, method = name.rpartition("-")
    with pytest.raises(ConfigError) as err:
        load_config(name, ["budget=paper", f"ipc={ipc}"])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{method} has no paper table row for {dataset} at IPC {ipc}; ")
    assert rows_named in message
    # The same pair at any IPC runs on the CPU budget.
    assert load_config(name, [f"ipc={ipc}"]).ipc == ipc

"""``condense data ...``: dataset tools. ``convert`` writes any supported source as WebDataset shards.

Only typer is imported here: the work (and torch) is imported when a command runs, so that
``condense --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(
    help="Dataset tools: convert a source into WebDataset shards ready for streaming.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@data_app.command()
def convert(
    src: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="torchvision:NAME (e.g. torchvision:CIFAR100), hf:ID (a hub dataset), digits, or a folder: "
            "an image folder (train/<class>/..., test|val/<class>/...; Tiny-ImageNet's official layout), "
            "WebDataset shards (train-*.tar[.gz]) or a Hugging Face save_to_disk folder.",
        ),
    ],
    to: Annotated[Path, typer.Option("--to", metavar="DIR", help="Output directory for the shards.")],
    root: Annotated[
        str | None,
        typer.Option(metavar="DIR", help="Download root (torchvision:NAME) or cache folder (hf:ID)."),
    ] = None,
    download: Annotated[
        bool, typer.Option("--download", help="torchvision:NAME: download the data when it is not in --root.")
    ] = False,
    shard_size: Annotated[int, typer.Option(metavar="N", help="Samples per shard at most.")] = 10_000,
    shard_mb: Annotated[
        float | None, typer.Option(metavar="MB", help="Also start a new shard once one holds this many MB.")
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            metavar="A,B,...",
            help="Keep only these classes (folder names, wnids or class names), in this order, "
            "relabelled 0..k-1.",
        ),
    ] = None,
    subset: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="Keep one of MTT's ImageNet subsets: imagenette, imagewoof, imagefruit, imageyellow, "
            "imagemeow, imagesquawk (from an ImageNet folder or shards of wnid classes).",
        ),
    ] = None,
    keep_order: Annotated[
        bool,
        typer.Option(
            "--keep-order",
            help="Keep the source's training order (default: shuffled with a fixed seed, as "
            "streaming wants).",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty --to (swapped whole once written).")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an unexpected error.")
    ] = False,
) -> None:
    """Write SRC as uncompressed WebDataset shards: DIR/train-NNNNNN.tar, DIR/test-NNNNNN.tar (an image
    as the source stores it, else PNG, and its cls), and DIR/classes.txt (the class names, one per line
    in cls order), which dataset.source: webdataset reads for the class names."""
    from condense_flows.cli import _fail, one_line_errors

    if classes is not None and subset is not None:
        _fail("give --classes or --subset, not both", 2)
    with one_line_errors(debug):
        from condense.datasets.imagenet_subsets import subset_classes
        from condense.datasets.write import convert as write_shards
        from condense.datasets.write import source_config
        from condense.progress import close_bars

        wanted = subset_classes(subset) if subset is not None else None
        if classes is not None:
            wanted = [c.strip() for c in classes.split(",") if c.strip()]
        cfg = source_config(src, root, wanted)
        try:
            done = write_shards(
                cfg, to, shard_size, shard_mb, keep_order=keep_order, overwrite=overwrite, download=download
            )
        finally:
            close_bars()
    counts = ", ".join(
        f"{split} {n} images in {done.shards[split]} shards" for split, n in done.counts.items()
    )
    typer.echo(f"wrote {done.out_dir}: {counts}, {len(done.classes)} classes (classes.txt)")

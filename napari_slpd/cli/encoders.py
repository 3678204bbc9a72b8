"""``slpd encoders [NAME] [--json]``: the named patch-encoder presets (published pathology foundation models).

Each line says what ``--encoder NAME --checkpoint PATH`` builds: output dimension, input size, the
magnification it was trained at (the tiling default of ``slpd extract``), normalisation, licence and the
files the checkpoint path must hold. ``slpd encoders NAME`` shows one preset in full; ``--check PATH``
also says whether a local file or folder is in a layout the preset takes, without loading the weights.
"""

from __future__ import annotations

import json

from napari_slpd.cli.common import add_command, add_output_flags, table


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "encoders", run,
        help="list the named encoder presets (UNI, Virchow2, CONCH, ...) and the files each needs",
        description="List the patch-encoder presets: published pathology foundation models loaded from local "
        "files in their published layout (nothing is downloaded). Use one with `slpd extract --encoder NAME "
        "--checkpoint FILE_OR_FOLDER`; `timm:<name>` and `open_clip:<name>` remain for other models.",
    )
    parser.add_argument("name", nargs="?", default=None, help="show one preset in full")
    parser.add_argument("--check", metavar="PATH", default=None,
                        help="with NAME: say which layout PATH is in and whether NAME takes it (reads no weights)")
    add_output_flags(parser, quiet=False)


def format_presets(infos: list[dict]) -> str:
    """One line per preset; the licence is cut to 34 characters so the files stay on the line."""
    return table(("name", "dim", "px", "mag", "norm", "licence", "files"),
                 [(info["name"], info["dim"], info["input_size"], info["magnification"], info["normalisation"],
                   info["licence"][:34], " + ".join(info["files"])) for info in infos],
                 right=("dim", "px", "mag"))


def run(args) -> int:
    from napari_slpd.errors import SlpdError
    from napari_slpd.models.presets import PRESETS, get_preset

    if args.check and not args.name:
        raise SlpdError("--check needs the preset NAME to check the path against")
    if args.name:
        preset = get_preset(args.name)
        info = preset.describe()
        if args.check:
            info["check"] = _check(preset, args.check)
        if args.json:
            print(json.dumps(info, indent=1))
            return 0 if not args.check or info["check"]["fits"] else 1
        for key, value in info.items():
            if key != "check":
                print(f"{key:>15}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
        if args.check:
            print(f"{'check':>15}: {info['check']['message']}")
            return 0 if info["check"]["fits"] else 1
        return 0
    infos = [p.describe() for p in PRESETS.values()]
    if args.json:
        print(json.dumps(infos, indent=1))
        return 0
    print(format_presets(infos))
    print("\nslpd extract SLIDES --out COHORT --encoder NAME --checkpoint FILE_OR_FOLDER "
          "(also timm:<name>, open_clip:<name>)")
    return 0


def _check(preset, path) -> dict:
    """Which layout a path is in and whether the preset takes it (configs only; weights are not read)."""
    from napari_slpd.errors import CheckpointError
    from napari_slpd.models.layouts import identify_folder, locate_checkpoint

    try:
        source = locate_checkpoint(path)
    except CheckpointError as exc:
        return {"fits": False, "layout": None, "message": str(exc)}
    description, presets = identify_folder(source)
    fits = preset.name in presets or (source.layout == "weights_file" and preset.family != "transformers")
    if fits:
        message = f"{description}: {preset.name} takes this layout (the weights are checked when loaded)"
    else:
        others = ", ".join(p for p in presets if p != preset.name)
        message = f"{description}: not the layout of {preset.name} ({' + '.join(preset.files)})" + (
            f"; it looks like {others}" if others else "")
    return {"fits": fits, "layout": source.layout, "message": message}

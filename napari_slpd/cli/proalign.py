"""``slpd proalign COHORT --vlm NAME --checkpoint PATH --descriptions lung``: ProAlign slide embeddings and
named zero-shot label maps for every slide of a cohort, from the patch features in its cache."""

from __future__ import annotations

import argparse
import sys

from napari_slpd.cli.common import add_cohort_argument, add_command
from napari_slpd.errors import SlpdError

EPILOG = """\
The patch features must come from the same model's image tower:
  slpd extract COHORT --encoder conch_v1 --checkpoint FOLDER ...
  slpd proalign COHORT --vlm conch_v1 --checkpoint FOLDER --descriptions lung
Vision-language models by name, from their published folders (nothing is downloaded):
  conch_v1    FOLDER with pytorch_model.bin (huggingface.co/MahmoodLab/CONCH) and
              conch_byte_level_bpe_uncased.json (github.com/mahmoodlab/CONCH, conch/open_clip_custom/tokenizers)
  plip        transformers CLIPModel folder (huggingface.co/vinid/plip): config.json, pytorch_model.bin or
              model.safetensors, tokenizer files (vocab.json, merges.txt / tokenizer.json, tokenizer_config.json)
  quiltnet    open_clip folder (huggingface.co/wisdomik/QuiltNet-B-32): open_clip_config.json,
              open_clip_pytorch_model.bin
  biomedclip  open_clip folder (huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224) plus
              PubMedBERT's vocab.txt and tokenizer_config.json (in the folder or --tokenizer FOLDER)
or any open_clip architecture name (ViT-B-32, local-dir:FOLDER, a custom --model-config).
Results go to COHORT/proalign/<slide_id>.h5 (slide_embedding [K*D], slide_embedding_mean [D],
visual_prototypes [K, D], patch and region label maps with names and colours).
Descriptions: a shipped name (lung, breast, kidney, colorectal), a user file name, or a .yaml path.
"""


def register(subparsers) -> None:
    p = add_command(
        subparsers, "proalign", run,
        help="ProAlign slide embeddings and named zero-shot label maps (vision-language prototypes)",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cohort_argument(p, help="cohort cache folder (features already extracted)")
    p.add_argument("--vlm", required=True, metavar="NAME",
                   help="vision-language model: conch_v1, plip, quiltnet, biomedclip (published folders), or an "
                        "open_clip architecture (e.g. ViT-B-32) / local-dir:FOLDER with open_clip_config.json")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="local weights of the VLM: the model's folder as published (or its weights file); "
                        "never downloaded")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer file or folder when it is not next to the weights (CONCH: "
                        "conch_byte_level_bpe_uncased.json; BiomedCLIP: PubMedBERT's vocab.txt folder)")
    p.add_argument("--model-config", metavar="JSON",
                   help="open_clip model config (or open_clip_config.json) for an architecture open_clip does not "
                        "ship, registered under --vlm")
    p.add_argument("--descriptions", required=True, metavar="NAME|PATH",
                   help="prototype descriptions: lung, breast, kidney, colorectal, a user file name, or a path")
    p.add_argument("--descriptions-dir", action="append", default=[], metavar="DIR",
                   help="extra folder of description files, searched first (repeatable)")
    p.add_argument("--tau", type=float, default=None, help="softmax temperature (default 0.05, SPEC section 4)")
    p.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="patches per streamed chunk (bounds memory; default 16384)")
    p.add_argument("--slides", nargs="+", metavar="ID", help="only these slide ids (default: all)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--overwrite", action="store_true", help="recompute slides whose result is up to date")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow unpickling a checkpoint that is not a plain tensor file (only for files you trust)")


def run(args) -> int:
    from napari_slpd.cohort import Cohort
    from napari_slpd.proalign.core import ProAlignConfig
    from napari_slpd.proalign.descriptions import load_descriptions
    from napari_slpd.proalign.pipeline import run_proalign
    from napari_slpd.proalign.vlm import VisionLanguageModel

    cohort = Cohort(args.cohort, create=False)
    if not cohort.slide_ids():
        raise SlpdError(f"cohort {cohort.root} has no slides; add slides and extract features first")
    descriptions = load_descriptions(args.descriptions, args.descriptions_dir)
    defaults = ProAlignConfig()
    config = ProAlignConfig(
        tau=defaults.tau if args.tau is None else args.tau,
        chunk_size=defaults.chunk_size if args.chunk_size is None else args.chunk_size,
        device=args.device,
    )
    vlm = VisionLanguageModel.load(args.vlm, args.checkpoint, device=args.device, model_cfg=args.model_config,
                                   allow_pickle=args.allow_pickle, tokenizer=args.tokenizer)
    print(f"ProAlign: {vlm.model_id}, {len(descriptions)} prototype types from {descriptions.organ!r} "
          f"(version {descriptions.version}), tau {config.tau:g}")

    from tqdm import tqdm

    slide_ids = args.slides if args.slides else None
    total = len(slide_ids) if slide_ids else len(cohort.slide_ids())
    with tqdm(total=total, unit="slide", disable=not sys.stderr.isatty()) as bar:
        def on_slide(outcome):
            bar.write(f"{outcome.slide_id}: {outcome.status}" + (f" ({outcome.message})" if outcome.message else ""))
            bar.update(1)

        outcomes = run_proalign(cohort, vlm, descriptions, config, slide_ids=slide_ids, overwrite=args.overwrite,
                                on_slide=on_slide)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    print("done: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) +
          f"; results in {cohort.root / 'proalign'}")
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        listed = "\n  ".join(f"{o.slide_id}: {o.message}" for o in failed)
        raise SlpdError(f"{len(failed)} slide(s) failed:\n  {listed}")
    return 0

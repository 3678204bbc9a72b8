"""``slpd describe --organ lung --endpoint URL --model NAME``: (re)generate a prototype description file with
any OpenAI-compatible chat-completions endpoint; ``slpd describe --list`` shows the files available."""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_slpd.cli.common import add_command
from napari_slpd.errors import SlpdError

EPILOG = """\
The API key is read from the environment variable named by --api-key-env (default OPENAI_API_KEY); it is
never printed or written. Local servers (Ollama, vLLM, llama.cpp) need no key.
Examples:
  OPENAI_API_KEY=... slpd describe --organ lung --endpoint https://api.openai.com/v1 --model gpt-4o
  slpd describe --organ "soft tissue sarcoma" --endpoint http://localhost:11434/v1 --model llama3.1
The file goes to the user descriptions folder (see --list) unless --out is given; an existing file is
only replaced by a valid answer. Review generated descriptions before use.
"""


def register(subparsers) -> None:
    p = add_command(
        subparsers, "describe", run, help="generate prototype descriptions with an OpenAI-compatible chat endpoint",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--list", action="store_true", help="list the description files found, and exit")
    p.add_argument("--organ", help="organ or tissue to describe (also the file name), e.g. lung")
    p.add_argument("--endpoint", metavar="URL",
                   help="chat-completions base URL, e.g. https://api.openai.com/v1 or http://localhost:11434/v1")
    p.add_argument("--model", metavar="NAME", help="chat model name served by the endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="NAME of the environment variable holding the API key (default OPENAI_API_KEY)")
    p.add_argument("--out", type=Path, metavar="PATH", help="output .yaml (default: user folder/<organ>.yaml)")
    p.add_argument("--base", metavar="NAME|PATH", help="an existing description file to improve on")
    p.add_argument("--num-prototypes", type=int, default=14, metavar="K", help="about how many types (default 14)")
    p.add_argument("--num-descriptions", type=int, default=4, metavar="N", help="descriptions per type (default 4)")
    p.add_argument("--cohort-hint", default="", metavar="TEXT", help="what the slides are, to focus the types")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer (default 120)")
    p.add_argument("--descriptions-dir", action="append", default=[], metavar="DIR",
                   help="extra folder of description files (for --list and --base)")


def run(args) -> int:
    from napari_slpd.proalign.descriptions import available_descriptions, load_descriptions, user_descriptions_dir

    if args.list:
        print(f"user folder: {user_descriptions_dir()}")
        for name, path in available_descriptions(args.descriptions_dir).items():
            print(f"{name}\t{path}")
        return 0
    missing = [flag for flag, value in (("--organ", args.organ), ("--endpoint", args.endpoint),
                                        ("--model", args.model)) if not value]
    if missing:
        raise SlpdError(f"{', '.join(missing)} required (or --list)")
    if args.num_prototypes < 2 or args.num_descriptions < 1:
        raise SlpdError("--num-prototypes must be at least 2 and --num-descriptions at least 1")
    if args.timeout <= 0:
        raise SlpdError("--timeout must be positive")
    from napari_slpd.proalign.describe import DescribeRequest, generate_descriptions

    base = load_descriptions(args.base, args.descriptions_dir) if args.base else None
    req = DescribeRequest(organ=args.organ, endpoint=args.endpoint, model=args.model, api_key_env=args.api_key_env,
                          num_prototypes=args.num_prototypes, num_descriptions=args.num_descriptions,
                          temperature=args.temperature, timeout=args.timeout, cohort_hint=args.cohort_hint)
    out, descriptions = generate_descriptions(req, args.out, base)
    n_desc = sum(len(p.descriptions) for p in descriptions.prototypes)
    print(f"wrote {out}: {len(descriptions)} prototype types, {n_desc} descriptions "
          f"({', '.join(descriptions.names)}). Review it before use.")
    return 0

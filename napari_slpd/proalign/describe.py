"""Write prototype description files with any OpenAI-compatible chat-completions endpoint.

The endpoint is a base URL (``https://api.openai.com/v1``, ``http://localhost:11434/v1`` for Ollama, a vLLM
server, ...) or the full ``.../chat/completions`` URL. The API key is read from an environment variable
whose *name* the user gives (default ``OPENAI_API_KEY``); it is sent only in the Authorization header and
never logged, printed, written, or put into an exception message (any echo of it by the server is
redacted). Without the variable the request goes out without a key (local servers need none).

The model is asked for YAML in the schema of :mod:`napari_slpd.proalign.descriptions`; the answer is
parsed with ``yaml.safe_load``, validated, and written atomically. On any error (endpoint unreachable,
HTTP error, time-out, malformed or invalid answer) a :class:`DescribeError` says what happened and the
existing file is left as it was. Only the standard library is used for HTTP (urllib).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import logging
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from napari_slpd.utils.files import atomic_write_text
from napari_slpd.proalign.descriptions import (
    DescriptionError,
    PrototypeDescriptions,
    fill_missing_colors,
    parse_descriptions,
    user_descriptions_dir,
    validate_descriptions,
)

log = logging.getLogger(__name__)

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # an answer is a few kB; never read an unbounded body
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class DescribeError(DescriptionError):
    """Generating prototype descriptions failed; the old file (if any) is unchanged."""


@dataclass(frozen=True)
class DescribeRequest:
    organ: str
    endpoint: str
    model: str
    api_key_env: str = DEFAULT_API_KEY_ENV
    num_prototypes: int = 14          # how many tissue types to ask for (a guide for the model)
    num_descriptions: int = 4         # descriptions per type
    temperature: float = 0.2
    timeout: float = 120.0            # seconds for connect + answer
    cohort_hint: str = ""             # e.g. "TCGA-LUAD and TCGA-LUSC resections"


SYSTEM_PROMPT = (
    "You are an experienced anatomic pathologist who writes precise, standard histopathology terminology. "
    "You answer with a single YAML document and nothing else."
)


def build_prompt(req: DescribeRequest, base: PrototypeDescriptions | None = None) -> str:
    """The user message: the task, the schema and the constraints that make a usable file."""
    cohort = f" The cohort: {req.cohort_hint}." if req.cohort_hint else ""
    keep = ""
    if base is not None:
        names = "; ".join(base.names)
        keep = (f" Start from these existing prototype types and improve their descriptions (you may add "
                f"missing types): {names}.")
    return f"""Write the tissue prototype types expected in H&E-stained whole-slide images of {req.organ} tissue \
(resections and biopsies, including cancer), for zero-shot labeling of image patches with a pathology \
vision-language model (CLIP-style, such as CONCH, PLIP or QuiltNet).{cohort}{keep}

Include about {req.num_prototypes} types covering: each relevant tumour type and histological subtype or growth \
pattern, in-situ or precursor lesions where relevant, tumour-associated stroma, necrosis, immune infiltrate \
(lymphocytes, tertiary lymphoid structures), the normal structures of the organ, fat, blood/haemorrhage, and \
two non-tissue types: "background" (empty glass) and "artefacts" (tissue folds, pen marks, out-of-focus areas, \
bubbles).

For each type give {req.num_descriptions} different descriptions. Each description is one short caption \
(at most 25 words) of what the tissue looks like on H&E at 20x: architecture, cells, nuclei, cytoplasm, \
stroma. Make the first one of the form "an H&E image of <type>". Use correct, standard terminology (WHO \
classification). Do not mention immunohistochemistry, molecular tests or clinical data.

Answer with YAML only, exactly this schema:

organ: {req.organ}
version: 1
prototypes:
  - name: <short unique name of the type>
    color: "<distinct hex colour #rrggbb>"
    descriptions:
      - <description 1>
      - <description 2>
"""


# -- HTTP ---------------------------------------------------------------------------------------------------
def chat_completions_url(endpoint: str) -> str:
    """``endpoint`` as the full chat-completions URL (a base URL gets ``/chat/completions`` appended)."""
    endpoint = endpoint.strip()
    parsed = urllib.parse.urlsplit(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise DescribeError(
            f"endpoint must be an http(s) URL such as https://api.openai.com/v1, got {_safe_url(endpoint)!r}")
    path = parsed.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path = f"{path}/chat/completions"
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, parsed.query, ""))


def _safe_url(url: str) -> str:
    """The URL without user info and query (either could carry a credential)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Redactor:
    """Removes the API key from any text that could reach the user, a log or a file."""

    def __init__(self, key: str | None):
        self._key = key or ""

    def __call__(self, text: str) -> str:
        if self._key and len(self._key) >= 4:
            text = text.replace(self._key, "[REDACTED]")
        return text


def post_chat(req: DescribeRequest, messages: list[dict]) -> str:
    """Send the chat request; return the assistant message's text. Raises DescribeError."""
    url = chat_completions_url(req.endpoint)
    shown = _safe_url(url)
    if not _ENV_NAME.match(req.api_key_env or ""):
        raise DescribeError("--api-key-env must be the NAME of an environment variable, got an invalid name")
    key = os.environ.get(req.api_key_env) or None
    redact = _Redactor(key)
    if key is None:
        log.info("environment variable %s is not set: sending the request without an API key", req.api_key_env)
    body = json.dumps({
        "model": req.model,
        "messages": messages,
        "temperature": req.temperature,
        "stream": False,
    }).encode("utf-8")
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    # A server on this machine is reached directly even when an HTTP proxy is configured.
    handlers = [urllib.request.ProxyHandler({})] if _is_loopback(urllib.parse.urlsplit(url).hostname) else []
    opener = urllib.request.build_opener(*handlers)
    log.info("asking %s (model %s) for prototype descriptions", shown, req.model)
    try:
        with opener.open(request, timeout=req.timeout) as response:
            raw = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        detail = ""
        try:
            detail = exc.read(2000).decode("utf-8", "replace")
        except Exception:
            pass
        detail = redact(_error_detail(detail))
        hint = " (check the API key in $" + req.api_key_env + ")" if exc.code in (401, 403) else ""
        raise DescribeError(f"{shown} answered HTTP {exc.code} {redact(str(exc.reason))}{hint}"
                            f"{': ' + detail if detail else ''}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise DescribeError(f"{shown} did not answer within {req.timeout:g} s (use --timeout)") from None
        raise DescribeError(f"cannot reach {shown}: {redact(str(reason))}") from None
    except (socket.timeout, TimeoutError):
        raise DescribeError(f"{shown} did not answer within {req.timeout:g} s (use --timeout)") from None
    except (OSError, ValueError) as exc:  # connection reset mid-answer, malformed HTTP
        raise DescribeError(f"the connection to {shown} failed: {redact(str(exc))}") from None
    if len(raw) > MAX_RESPONSE_BYTES:
        raise DescribeError(f"{shown} sent more than {MAX_RESPONSE_BYTES // (1024 * 1024)} MiB; not a chat answer")
    return _message_text(raw, shown, redact)


def _error_detail(text: str) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body's first line (short)."""
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            err = data.get("error", data)
            if isinstance(err, dict) and err.get("message"):
                return str(err["message"])[:500]
            if isinstance(err, str):
                return err[:500]
    except ValueError:
        pass
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def _message_text(raw: bytes, shown: str, redact) -> str:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise DescribeError(
            f"{shown} did not answer with JSON: is it an OpenAI-compatible chat-completions endpoint? "
            f"(answer starts with {redact(raw[:80].decode('utf-8', 'replace'))!r})") from None
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise DescribeError(
            f"{shown} answered without choices[0].message.content; not an OpenAI-compatible chat answer") from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str) or not content.strip():
        raise DescribeError(f"{shown} answered with an empty message")
    return content


# -- answer -> file -----------------------------------------------------------------------------------------
_FENCE = re.compile(r"```[ \t]*(?:ya?ml|json)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_document(text: str) -> str:
    """The YAML/JSON document in a chat answer: the first fenced code block if any, else the whole text."""
    match = _FENCE.search(text)
    return match.group(1) if match else text.strip()


def parse_answer(text: str, organ: str, model: str) -> PrototypeDescriptions:
    """Parse and validate a model's answer; the organ is the one asked for, missing colours are filled."""
    import yaml

    doc = extract_document(text)
    try:
        data = yaml.safe_load(doc)
    except yaml.YAMLError as exc:
        raise DescribeError(f"the model's answer is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict) or "prototypes" not in data:
        raise DescribeError("the model's answer is not a mapping with a 'prototypes' list (schema: organ, "
                            "version, prototypes: [{name, color, descriptions}]); try again or another model")
    data["organ"] = organ
    data.setdefault("version", 1)
    data["generated_by"] = {"model": model, "date": _dt.date.today().isoformat(), "tool": "slpd describe"}
    fill_missing_colors(data)
    try:
        return validate_descriptions(data, source="the model's answer")
    except DescriptionError as exc:
        raise DescribeError(f"{exc}\n(try again, or another model)") from None


def default_output_path(organ: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", organ.strip()) or "descriptions"
    return user_descriptions_dir() / f"{safe}.yaml"


def generate_descriptions(req: DescribeRequest, out_path: str | os.PathLike | None = None,
                          base: PrototypeDescriptions | None = None) -> tuple[Path, PrototypeDescriptions]:
    """Ask the endpoint, validate, and write ``out_path`` atomically (the old file stays on any error)."""
    if not req.organ or not req.organ.strip():
        raise DescribeError("give the organ or tissue to describe (--organ lung)")
    if not req.model or not req.model.strip():
        raise DescribeError("give the chat model name the endpoint serves (--model NAME)")
    out = Path(out_path).expanduser() if out_path else default_output_path(req.organ)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": build_prompt(req, base)}]
    answer = post_chat(req, messages)
    descriptions = parse_answer(answer, req.organ.strip(), req.model)
    text = "# Generated by `slpd describe`; review before use (see the notes of the shipped files).\n" + \
        descriptions.to_yaml()
    parse_descriptions(text, out)  # what is written must load back
    try:
        atomic_write_text(out, text)
    except OSError as exc:
        raise DescribeError(f"cannot write {out}: {exc}") from None
    return out, descriptions

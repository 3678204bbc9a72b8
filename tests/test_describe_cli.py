"""`slpd describe` against a local HTTP server speaking the OpenAI chat-completions protocol: a valid file is
written, the API key never appears anywhere but the Authorization header, and failures (unreachable,
HTTP errors, time-outs, malformed answers) give clear errors and keep the old file."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from napari_slpd.cli import main
from napari_slpd.proalign.descriptions import load_descriptions

KEY = "sk-test-8f3a9c1e2d7b4a6f"
KEY_ENV = "SLPD_TEST_CHAT_KEY"

GOOD_YAML = """organ: lung
version: 1
prototypes:
  - name: adenocarcinoma
    color: "#d62728"
    descriptions:
      - an H&E image of lung adenocarcinoma
      - malignant glands in desmoplastic stroma
  - name: alveolar parenchyma
    descriptions:
      - an H&E image of normal alveoli
  - name: background
    color: "#f0f0f0"
    descriptions: [empty glass slide]
"""


class ChatServer:
    """A bounded OpenAI-compatible stub on 127.0.0.1: answers at most ``max_requests`` requests."""

    def __init__(self, max_requests: int = 8):
        self.requests: list[dict] = []
        self.reply = lambda handler, body: self.chat_reply(GOOD_YAML)
        self.max_requests = max_requests
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a stuck client cannot hold the thread forever

            def do_POST(self):  # noqa: N802
                if len(server.requests) >= server.max_requests:
                    self.send_error(429, "test server request budget exhausted")
                    return
                length = min(int(self.headers.get("Content-Length", 0)), 1 << 20)
                body = json.loads(self.rfile.read(length) or b"{}")
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, payload, delay = server.reply(self, body)
                if delay:
                    time.sleep(delay)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (time-out test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @staticmethod
    def chat_reply(content: str, status: int = 200, delay: float = 0.0):
        return status, {"id": "c1", "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                     "finish_reason": "stop"}]}, delay

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server():
    srv = ChatServer()
    yield srv
    srv.close()


@pytest.fixture
def old_file(tmp_path):
    path = tmp_path / "descriptions" / "lung.yaml"
    path.parent.mkdir()
    text = (load_descriptions("lung").source).read_text()
    path.write_text(text)
    return path, text


def _describe(url, out, *extra):
    return main(["describe", "--organ", "lung", "--endpoint", url, "--model", "test-model",
                 "--api-key-env", KEY_ENV, "--out", str(out), "--timeout", "5", *extra])


def _assert_key_nowhere(capsys, caplog, *paths):
    captured = capsys.readouterr()
    assert KEY not in captured.out and KEY not in captured.err
    assert KEY not in caplog.text
    for path in paths:
        if path.exists():
            assert KEY not in path.read_text()
    return captured


def test_describe_writes_a_valid_file_and_never_the_key(server, old_file, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, KEY)
    path, _ = old_file
    server.reply = lambda h, body: server.chat_reply(f"Here you are:\n```yaml\n{GOOD_YAML}```\n")
    assert _describe(server.url, path, "--cohort-hint", "TCGA-LUAD") == 0
    desc = load_descriptions(path)
    assert desc.organ == "lung" and desc.names == ["adenocarcinoma", "alveolar parenchyma", "background"]
    assert len(set(desc.colors)) == 3  # the missing colour was filled
    assert desc.generated_by["model"] == "test-model"
    out = _assert_key_nowhere(capsys, caplog, path).out
    assert "wrote" in out and "3 prototype types" in out
    # what went over the wire: the key only in the Authorization header; a proper chat request
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in json.dumps(req["body"])
    assert req["body"]["model"] == "test-model"
    roles = [m["role"] for m in req["body"]["messages"]]
    assert roles == ["system", "user"]
    assert "lung" in req["body"]["messages"][1]["content"] and "TCGA-LUAD" in req["body"]["messages"][1]["content"]
    assert not list(path.parent.glob(".*partial"))


def test_json_answer_and_full_url_and_no_key(server, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.delenv(KEY_ENV, raising=False)
    answer = json.dumps(yaml.safe_load(GOOD_YAML))
    server.reply = lambda h, body: server.chat_reply(answer)
    out = tmp_path / "new" / "lung.yaml"
    assert _describe(server.url + "/chat/completions", out) == 0
    assert load_descriptions(out).organ == "lung"
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions" and "Authorization" not in req["headers"]


@pytest.mark.parametrize(("reply", "match"), [
    (lambda s: s.chat_reply("I cannot help with that."), "not a mapping with a 'prototypes' list"),
    (lambda s: s.chat_reply("organ: lung\nprototypes: [unclosed"), "not valid YAML"),
    (lambda s: s.chat_reply("prototypes:\n  - name: a\n    descriptions: [x]\n"), "at least 2 prototype types"),
    (lambda s: s.chat_reply(""), "empty message"),
    (lambda s: (200, b"<html>not json</html>", 0), "did not answer with JSON"),
    (lambda s: (200, {"object": "list", "data": []}, 0), "choices"),
    (lambda s: (500, {"error": {"message": "model overloaded"}}, 0), "HTTP 500.*model overloaded"),
    (lambda s: (401, {"error": {"message": f"Incorrect API key provided: {KEY}"}}, 0), r"HTTP 401.*check the API key"),
])
def test_bad_answers_give_clear_errors_and_keep_the_old_file(server, old_file, monkeypatch, capsys, caplog,
                                                             reply, match):
    monkeypatch.setenv(KEY_ENV, KEY)
    path, text = old_file
    server.reply = lambda h, body: reply(server)
    assert _describe(server.url, path) == 2
    err = _assert_key_nowhere(capsys, caplog, path).err
    assert "slpd describe: error:" in err
    import re

    assert re.search(match, err, re.DOTALL), err
    assert path.read_text() == text
    assert sorted(p.name for p in path.parent.iterdir()) == ["lung.yaml"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_keeps_the_old_file(old_file, monkeypatch, capsys, caplog):
    monkeypatch.setenv(KEY_ENV, KEY)
    path, text = old_file
    assert _describe(f"http://127.0.0.1:{_free_port()}/v1", path) == 2
    err = _assert_key_nowhere(capsys, caplog, path).err
    assert "cannot reach http://127.0.0.1:" in err
    assert path.read_text() == text


def test_timeout_is_reported(server, old_file, monkeypatch, capsys, caplog):
    monkeypatch.setenv(KEY_ENV, KEY)
    path, text = old_file
    server.reply = lambda h, body: server.chat_reply(GOOD_YAML, delay=2.0)
    t0 = time.perf_counter()
    assert main(["describe", "--organ", "lung", "--endpoint", server.url, "--model", "m", "--api-key-env", KEY_ENV,
                 "--out", str(path), "--timeout", "0.5"]) == 2
    assert time.perf_counter() - t0 < 1.9
    assert "did not answer within 0.5 s" in _assert_key_nowhere(capsys, caplog, path).err
    assert path.read_text() == text


def test_bad_arguments(capsys):
    assert main(["describe", "--organ", "lung", "--endpoint", "ftp://x", "--model", "m", "--out", "/tmp/x.yaml"]) == 2
    assert "http(s) URL" in capsys.readouterr().err
    assert main(["describe", "--organ", "lung"]) == 2
    assert "--endpoint, --model required" in capsys.readouterr().err
    assert main(["describe", "--organ", "lung", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m",
                 "--api-key-env", "NOT A NAME", "--out", "/tmp/x.yaml"]) == 2
    assert "NAME of an environment variable" in capsys.readouterr().err


def test_list_shows_the_shipped_files(capsys):
    assert main(["describe", "--list"]) == 0
    out = capsys.readouterr().out
    for organ in ("lung", "breast", "kidney", "colorectal"):
        assert f"{organ}\t" in out

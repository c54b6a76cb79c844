"""A stand-in for `vllm serve` (and `flagscale serve`) at their process and HTTP interfaces.

    vllm_standin.py serve MODEL [--host H] [--port P] [--served-model-name N ...] [any vLLM flag ...]

Serves GET /health, GET /v1/models, GET /version ({"version": "0.20.2-fake"}) and
POST /v1/chat/completions (a fixed answer, streamed when asked).  Like vLLM it loads the
`vllm.general_plugins` entry points allowed by VLLM_PLUGINS (unset = all, "" = none) at start-up.
If the plugin switched a `flag_gems` module on, answering a chat request "calls" a few operators
through it, the way a real model forward pass would.

Knobs (flag, or environment variable FAKE_VLLM_<NAME>):
  --startup-delay S     sleep S seconds before listening
  --crash-after S       exit with code 3 S seconds after start
  --ignore-sigterm      ignore SIGTERM (so does the grandchild)
  --spawn-grandchild    start a sleeping grandchild in the same process group
  --detach              behave like `flagscale serve`: start the server in the background, write its pid to
                        outputs/standin/serve_logs/pids/host_0_localhost.pid and return at once
  --detach-new-session  with --detach: the background server also leaves our process group (setsid)
FlagScale's `--engine-args JSON` is understood for served_model_name and host.  Standard library only.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import entry_points

ANSWER = "This is the stand-in answer."
VERSION = "0.20.2-fake"
PID_FILE = os.path.join("outputs", "standin", "serve_logs", "pids", "host_0_localhost.pid")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm_standin")
    p.add_argument("command", choices=["serve"])
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--engine-args", default="{}")
    env = os.environ.get
    p.add_argument("--startup-delay", type=float, default=float(env("FAKE_VLLM_STARTUP_DELAY", "0")))
    p.add_argument("--crash-after", type=float, default=float(env("FAKE_VLLM_CRASH_AFTER", "0")))
    p.add_argument("--ignore-sigterm", action="store_true", default=env("FAKE_VLLM_IGNORE_SIGTERM") == "1")
    p.add_argument("--spawn-grandchild", action="store_true", default=env("FAKE_VLLM_SPAWN_GRANDCHILD") == "1")
    p.add_argument("--detach", action="store_true")
    p.add_argument("--detach-new-session", action="store_true")
    args, unknown = p.parse_known_args(argv)
    args.unknown = unknown
    engine_args = json.loads(args.engine_args)
    names = args.served_model_name or [engine_args.get("served_model_name") or args.model]
    args.name = names[0] if isinstance(names, list) else names
    args.host = engine_args.get("host", args.host)
    return args


def detach(argv: list[str], new_session: bool) -> None:
    """Start the real server in the background (inheriting stdout/stderr), record its pid, return."""
    rest = [a for a in argv if a not in ("--detach", "--detach-new-session")]
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), *rest], start_new_session=new_session,
                             stdin=subprocess.DEVNULL)
    os.makedirs(os.path.dirname(PID_FILE), exist_ok=True)
    with open(PID_FILE, "w") as fh:
        fh.write(f"{child.pid}\n")
    print(f"launched background server pid {child.pid}", flush=True)


def load_general_plugins() -> None:
    allowed = os.environ.get("VLLM_PLUGINS")
    names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    for ep in entry_points(group="vllm.general_plugins"):
        if names is None or ep.name in names:
            print(f"INFO loading general plugin {ep.name}", flush=True)
            ep.load()()


def forward_pass() -> None:
    """What a model step would do to FlagGems: call operators through it when it is switched on."""
    gems = sys.modules.get("flag_gems")
    if gems is not None and hasattr(gems, "call_op"):
        for op in ("mm", "embedding", "softmax"):
            gems.call_op(op)


def make_handler(name: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: object) -> None:
            sys.stderr.write("INFO access: " + fmt % args + "\n")

        def send_json(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "vllm"}]})
            elif self.path == "/version":
                self.send_json(200, {"version": VERSION})
            else:
                self.send_json(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path != "/v1/chat/completions":
                self.send_json(404, {"error": {"message": f"no route {self.path}"}})
                return
            if body.get("model") != name:
                self.send_json(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                return
            forward_pass()
            created = int(time.time())
            if body.get("stream"):
                self.stream(created)
                return
            self.send_json(200, {
                "id": "chatcmpl-standin", "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
            })

        def stream(self, created: int) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            base = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": created, "model": name}
            for word in ANSWER.split(" "):
                chunk = {**base, "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            last = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            self.wfile.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
            self.wfile.flush()
            self.close_connection = True

    return Handler


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.detach:
        detach(argv, args.detach_new_session)
        return 0
    print(f"INFO stand-in vLLM {VERSION}: serve {args.model} as {args.name} on {args.host}:{args.port} "
          f"(extra flags {args.unknown})", flush=True)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the grandchild as well
        print("INFO ignoring SIGTERM", flush=True)
    else:
        signal.signal(signal.SIGTERM, lambda *_: (print("INFO shutting down on SIGTERM", flush=True), os._exit(0)))
    if args.spawn_grandchild:
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        print(f"INFO grandchild pid {grandchild.pid}", flush=True)
    if args.crash_after:
        def crash() -> None:
            print("ERROR stand-in: engine core died (simulated crash)", file=sys.stderr, flush=True)
            os._exit(3)
        threading.Timer(args.crash_after, crash).start()
    load_general_plugins()
    time.sleep(args.startup_delay)
    try:
        server = ThreadingHTTPServer((args.host, args.port), make_handler(args.name))
    except OSError as exc:
        print(f"ERROR [Errno {exc.errno}] error while attempting to bind on address ({args.host}, {args.port}): "
              f"{exc.strerror}", file=sys.stderr, flush=True)
        return 1
    server.daemon_threads = True
    print(f"INFO Application startup complete. Listening on http://{args.host}:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

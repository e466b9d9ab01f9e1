"""A real sglang server on a CPU-only machine, for the end-to-end test and ``make serve-demo``.

``write_tiny_llama(dir)`` writes a Llama config (hidden 64, 2 layers) and a byte-level BPE
tokenizer trained here with the ``tokenizers`` library; the server runs it with random
weights (``--load-format dummy``), so nothing is downloaded. ``Server`` launches
``python -m sglang.launch_server`` in its own session with the CPU stand-ins active in
every process it spawns (a ``sitecustomize`` on ``PYTHONPATH``), waits for it by
polling, and kills the whole process tree on ``stop()``.

Test-bed code: never imported by ``apply()`` or the plugin.

``python -m sgl_accel.testing.server`` starts one with ``SGL_ACCEL=1``, prints the
sgl-accel lines of each sglang process and one answer, and serves until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# The processes a served sglang runs, by the titles it gives them.
SGLANG_ROLES = ("sglang::engine", "sglang::scheduler", "sglang::detokenizer")

# The launch line, seen working on a 2-core CPU machine.
SERVER_ARGS = [
    "--load-format", "dummy", "--device", "cpu", "--attention-backend", "torch_native",
    "--sampling-backend", "pytorch", "--disable-cuda-graph", "--max-total-tokens", "2048",
    "--max-running-requests", "4", "--chunked-prefill-size", "256", "--mem-fraction-static", "0.05",
    "--skip-server-warmup", "--dtype", "bfloat16", "--grammar-backend", "none",
]

SPECIAL_TOKENS = ["<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "sglang serves language models; sgl-accel backports upstream fixes to pinned releases",
    "a tiny llama with random weights answers every prompt with noise, and that is fine",
    "user: hello there\nassistant: hello, how can i help you today?",
]


def write_tiny_llama(directory: Path, vocab_size: int = 384) -> Path:
    """A Llama model directory sglang can serve with ``--load-format dummy``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    bos, eos = (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "add_bos_token": False, "model_max_length": 2048, "chat_template": CHAT_TEMPLATE,
    }, indent=1))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": tokenizer.get_vocab_size(), "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": bos, "eos_token_id": eos,
    }, indent=1))
    return directory


def write_standin_site(directory: Path) -> Path:
    """A directory whose ``sitecustomize`` turns the CPU stand-ins on at interpreter start.

    Put it on ``PYTHONPATH``: every sglang process (engine, scheduler, detokenizer) is a
    fresh interpreter (multiprocessing spawn) and needs them before sglang imports
    ``torchvision``. Start-up activation (the ``.pth``) runs before ``sitecustomize``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        "# sgl_accel.testing.server: CPU stand-ins for every Python process of a test server.\n"
        "from sgl_accel.testing import standins\n\n"
        "standins.activate()\n"
    )
    return directory


def free_port() -> int:
    """A port free now, low enough for sglang's derived ports (gRPC: port + 10000)."""
    import random

    for _ in range(200):
        port = random.randint(20000, 45000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in 20000-45000")


@dataclass
class Server:
    """One ``sglang.launch_server`` process tree; ``stop()`` always leaves nothing behind."""

    model: Path
    log: Path
    env: dict
    name: str = "server"
    port: int = field(default_factory=free_port)
    times: dict = field(default_factory=dict)  # measured seconds, for the record
    process: subprocess.Popen = None
    seen: dict = field(default_factory=dict)  # pid -> (create_time, name) of every process of the tree
    started_s: float = 0.0  # launch to first answer of /v1/models

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600.0) -> "Server":
        command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(self.model),
                   "--host", "127.0.0.1", "--port", str(self.port), *SERVER_ARGS]
        began = time.monotonic()
        with open(self.log, "wb") as out:
            # Own session: the whole tree can be killed as one process group.
            self.process = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready(began, timeout)
        self.started_s = time.monotonic() - began
        self._wait_titled(timeout=60.0)
        return self

    def _wait_titled(self, timeout: float) -> None:
        """sglang answers before its detokenizer has named itself: wait (bounded) until every
        role has its title, so tests can find each process's log lines by role."""
        deadline = time.monotonic() + timeout
        while True:
            self.record_tree()
            titles = {title for _, title in self.seen.values()}
            if set(SGLANG_ROLES) <= titles or time.monotonic() > deadline:
                return
            time.sleep(0.2)  # poll interval, not a wait for a state

    def _wait_ready(self, began: float, timeout: float) -> None:
        import requests

        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"sglang exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            if time.monotonic() - began > timeout:
                raise TimeoutError(f"sglang did not answer within {timeout:.0f} s:\n{self.log_tail()}")
            self.record_tree()
            try:
                if requests.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)  # poll interval, not a wait for a state

    def record_tree(self) -> None:
        """Remember every process of the tree (with its title: sglang::scheduler, ...)."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            for proc in [root, *root.children(recursive=True)]:
                with proc.oneshot():
                    self.seen[proc.pid] = (proc.create_time(), process_title(proc))
        except psutil.Error:
            pass

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, grace: float = 30.0) -> int:
        """SIGTERM (sglang then ends its own children), SIGKILL to the group after ``grace``."""
        if self.process is None:
            return 0
        self.record_tree()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        for pid in self.survivors():
            _kill(pid)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(grace)
        deadline = time.monotonic() + grace
        while self.survivors() and time.monotonic() < deadline:
            time.sleep(0.1)  # reaping by init after SIGKILL
        return self.process.returncode

    def survivors(self) -> list:
        """Live processes of the tree: every one recorded, and any other in its session
        (the server is a session leader). Zombies awaiting reaping count as gone."""
        import psutil

        alive = set()
        for proc in psutil.process_iter():
            try:
                recorded = self.seen.get(proc.pid)
                if recorded and proc.create_time() != recorded[0]:
                    continue  # the pid was reused by an unrelated process
                if recorded or os.getsid(proc.pid) == self.process.pid:
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        alive.add(proc.pid)
            except (psutil.Error, OSError):
                pass
        return sorted(alive)


def process_title(proc) -> str:
    """sglang names its processes with setproctitle (``sglang::scheduler``); else the command."""
    cmdline = proc.cmdline()
    first = cmdline[0] if cmdline else proc.name()
    if first.startswith("sglang::"):
        return first.split()[0]
    if "sglang.launch_server" in cmdline:
        return "sglang::engine"
    if any("multiprocessing.resource_tracker" in part for part in cmdline):
        return "python: multiprocessing resource tracker"
    return " ".join(cmdline)[:80]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def server_env(site: Path, release_dir: Path | None, **variables: str) -> dict:
    """The environment of a test server: stand-ins first on PYTHONPATH, then the release."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGL_ACCEL")}
    paths = [str(site)] + ([str(release_dir)] if release_dir else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env.update(variables)
    return env


LOG_LINE = re.compile(r"\b(?P<level>[A-Z]+) sgl_accel\[(?P<pid>\d+)\]: (?P<message>.*)$")


def accel_lines(log: str) -> dict:
    """pid -> [(level, message)] of the sgl_accel log lines of that process, in order."""
    lines: dict = {}
    for line in log.splitlines():
        match = LOG_LINE.search(line)
        if match:
            lines.setdefault(int(match["pid"]), []).append((match["level"], match["message"]))
    return lines


# --------------------------------------------------------------------------- make serve-demo


def main(argv=None) -> int:
    import argparse
    import tempfile

    import requests

    parser = argparse.ArgumentParser(prog="python -m sgl_accel.testing.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", required=True, help="an sglang release installed in .envs/sglang-<release>")
    parser.add_argument("--hardware", help="SGL_ACCEL_HARDWARE for the server (e.g. ascend: what the gates then decide)")
    parser.add_argument("--once", action="store_true", help="stop after the first answer instead of serving until Ctrl-C")
    args = parser.parse_args(argv)
    release_dir = Path(__file__).resolve().parents[2] / ".envs" / f"sglang-{args.release}"
    if not (release_dir / f"sglang-{args.release}.dist-info").is_dir():
        parser.error(f"sglang {args.release} is not installed in {release_dir}: run scripts/envs.sh")
    variables = {"SGL_ACCEL": "1", "SGL_ACCEL_LOG_LEVEL": "DEBUG"}
    if args.hardware:
        variables["SGL_ACCEL_HARDWARE"] = args.hardware
    with tempfile.TemporaryDirectory(prefix="sgl-accel-demo-") as tmp:
        tmp = Path(tmp)
        env = server_env(write_standin_site(tmp / "site"), release_dir, **variables)
        server = Server(model=write_tiny_llama(tmp / "tiny-llama"), log=tmp / "server.log", env=env, name="demo")
        print(f"starting sglang {args.release} on {server.url} with {' '.join(f'{k}={v}' for k, v in variables.items())} (log: {server.log})", flush=True)
        try:
            server.start()
            print(f"ready after {server.started_s:.1f} s\n")
            lines = accel_lines(server.log_text())
            for pid, (_, title) in sorted(server.seen.items()):
                print(f"{title} (pid {pid}):")
                for level, message in lines.get(pid, [("", "(no sgl-accel line)")]):
                    print(f"    {level:7} {message}")
            payload = {"text": "Hello", "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}
            answer = requests.post(f"{server.url}/generate", json=payload, timeout=300).json()
            print(f"\nPOST /generate {json.dumps(payload)}\n -> {json.dumps(answer)[:400]}")
            if not args.once:
                print(f"\nserving on {server.url} (random weights: the text is noise); try\n"
                      f"  curl -s {server.url}/generate -H 'Content-Type: application/json' -d '{json.dumps(payload)}'\n"
                      "Ctrl-C stops it.", flush=True)
                while server.process.poll() is None:
                    time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
            left = server.survivors()
            print(f"\nstopped; processes left: {left or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

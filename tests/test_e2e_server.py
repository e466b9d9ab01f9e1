"""End to end: a real ``sglang.launch_server`` on this CPU machine with sgl-accel active.

The server runs a tiny Llama (hidden 64, 2 layers, random weights) written by the test,
with the CPU stand-ins active in each of its processes (``sgl_accel.testing.server``).
One server per configuration, shared by the tests of its class and always killed:

* ``SGL_ACCEL=1``: answers ``/generate`` and ``/v1/chat/completions`` with the requested
  token counts; every process logs exactly one summary and each patch's state, and each
  state is what ``sgl-accel status`` (the static plan, an independent path) says for this
  release and hardware, or ``pending-import`` where the process never imported the target;
* a bad ``SGL_ACCEL`` value: serves, one warning per process at most, nothing applied;
* ``SGL_ACCEL_HARDWARE=ascend``: serves, nothing applied that the plan excludes;
* the sglang plugin only (``SGL_ACCEL`` unset, sglang >= 0.5.11): the engine and the
  scheduler report, the detokenizer stays untouched.

Start-up and request times are written to ``.cache/e2e/`` with the server logs.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sgl_accel._registry import default_names

from sgl_accel.testing import server as srv

pytestmark = pytest.mark.sglang

ROOT = Path(__file__).resolve().parents[1]
RELEASE = os.environ.get("SGL_ACCEL_TEST_SGLANG")
OUT = ROOT / ".cache" / "e2e"
SUMMARY = re.compile(r"^sgl-accel \S+: applied \d+/\d+ on ")
STATE_AT_APPLY = re.compile(r"^(?P<name>[a-z0-9-]+): (?P<state>[a-z-]+) \((?P<reason>.*)\)$")
STATE_ON_IMPORT = re.compile(r"^sgl-accel: (?P<name>[a-z0-9-]+) (?P<state>[a-z-]+) on import of (?P<module>\S+) \((?P<reason>.*)\)$")
SGLANG_ROLES = srv.SGLANG_ROLES


def _release_at_least(version: str) -> bool:
    from packaging.version import Version

    return Version(RELEASE) >= Version(version)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return srv.write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return srv.write_standin_site(tmp_path_factory.mktemp("standin-site"))


def _launch(request, model, site, name: str, **variables):
    """A started server for one configuration; killed (whole tree) at the end of the class."""
    OUT.mkdir(parents=True, exist_ok=True)
    env = srv.server_env(site, ROOT / ".envs" / f"sglang-{RELEASE}", **variables)
    server = srv.Server(model=model, log=OUT / f"{RELEASE}-{name}.log", env=env, name=name)
    request.addfinalizer(lambda: _finish(server))
    server.start()
    server.times["start_s"] = round(server.started_s, 2)
    return server


def _finish(server) -> None:
    server.stop()
    (OUT / f"{RELEASE}-{server.name}.json").write_text(json.dumps({"release": RELEASE, "config": server.name, **server.times}) + "\n")


def _plan(site, **variables) -> dict:
    """``sgl-accel status --json`` for this release in the server's environment (stand-ins
    on, same SGL_ACCEL_HARDWARE): what apply() should reach once a target is imported."""
    env = srv.server_env(site, ROOT / ".envs" / f"sglang-{RELEASE}", **variables)
    out = subprocess.run([sys.executable, "-m", "sgl_accel", "status", "--json"], env=env, capture_output=True, text=True, timeout=300, check=True)
    # SGL_ACCEL=1 and the plugin leave opt-in patches out: those are applied only when named.
    wanted = set(default_names())
    return {p["name"]: p for p in json.loads(out.stdout)["patches"] if p["name"] in wanted}


def _generate(server, max_new_tokens: int = 8) -> dict:
    import requests

    began = time.monotonic()
    answer = requests.post(f"{server.url}/generate", timeout=300, json={
        "text": "The capital of France is", "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
    })
    server.times.setdefault("generate_s", round(time.monotonic() - began, 3))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert isinstance(body["text"], str)
    assert body["meta_info"]["completion_tokens"] == max_new_tokens, body
    assert len(body["output_ids"]) == max_new_tokens, body
    assert body["meta_info"]["finish_reason"]["type"] == "length", body
    return body


def _chat(server, max_tokens: int = 6) -> dict:
    import requests

    began = time.monotonic()
    answer = requests.post(f"{server.url}/v1/chat/completions", timeout=300, json={
        "model": "tiny-llama", "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
    })
    server.times.setdefault("chat_s", round(time.monotonic() - began, 3))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == max_tokens, body
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + max_tokens
    return body


def _release_excludes(name: str) -> bool:
    from packaging.specifiers import SpecifierSet

    from sgl_accel._registry import all_patches

    releases = all_patches()[name].releases
    return bool(releases) and not SpecifierSet(releases).contains(RELEASE)


def _assert_stops_clean(server) -> None:
    began = time.monotonic()
    server.stop()
    server.times["stop_s"] = round(time.monotonic() - began, 2)
    assert server.survivors() == [], f"left behind: {server.survivors()}"
    # sglang ends its own tree on SIGTERM (its exit status is then -9, which is normal).
    assert server.process.returncode is not None


def _final_states(messages: list) -> dict:
    """Per patch, the last state a process logged: at apply(), then on each import."""
    states = {}
    for _, message in messages:
        for pattern in (STATE_AT_APPLY, STATE_ON_IMPORT):
            match = pattern.match(message)
            if match:
                states[match["name"]] = (match["state"], match["reason"], match.groupdict().get("module"))
    return states


def _summaries(messages: list) -> list:
    return [m for _, m in messages if SUMMARY.match(m)]


def _lines_by_role(server) -> dict:
    """role -> sgl-accel lines, for the engine, scheduler and detokenizer (all must exist)."""
    lines = srv.accel_lines(server.log_text())
    by_role = {title: lines.get(pid, []) for pid, (_, title) in server.seen.items() if title in SGLANG_ROLES}
    assert set(by_role) == set(SGLANG_ROLES), server.seen
    return by_role


def _check_processes_against_plan(server, plan: dict) -> dict:
    """Every process with SGL_ACCEL set logs one summary; each sglang process logs every
    patch's state, each what the plan says (or pending-import: target never imported)."""
    for pid, messages in srv.accel_lines(server.log_text()).items():
        assert len(_summaries(messages)) == 1, (pid, server.seen.get(pid), messages)
        assert not [m for level, m in messages if level != "INFO" and level != "DEBUG"], (pid, messages)
    reached = {}
    for role, messages in _lines_by_role(server).items():
        assert len(_summaries(messages)) == 1, (role, messages)
        states = _final_states(messages)
        assert set(states) == set(plan), (role, states)
        for name, (state, reason, module) in states.items():
            expected = plan[name]
            if state == "pending-import":  # this process never imported the target
                assert not _release_excludes(name), (role, name)  # decided before any import
                continue
            if module:
                reached.setdefault(role, []).append(f"{name}: {state} on import of {module}")
            assert state == {"applies": "applied"}.get(expected["state"], expected["state"]), (role, name, state, reason, expected)
            if expected["state"] != "applies":
                assert reason == expected["reason"], (role, name, reason, expected["reason"])
    return reached


# --------------------------------------------------------------------------- SGL_ACCEL=1


class TestAccelOn:
    @pytest.fixture(scope="class")
    @staticmethod
    def server(request, model, site):
        return _launch(request, model, site, "accel-on", SGL_ACCEL="1", SGL_ACCEL_LOG_LEVEL="DEBUG")

    def test_generate_returns_the_requested_tokens(self, server):
        _generate(server)

    def test_chat_completion_returns_the_requested_tokens(self, server):
        _chat(server)

    def test_each_process_logs_one_summary_and_the_planned_states(self, server, site):
        plan = _plan(site)
        server.times["reached"] = _check_processes_against_plan(server, plan)
        # On CPU no gate admits a patch: nothing may be applied anywhere.
        assert all(p["state"] == "not-applicable" for p in plan.values()), plan

    def test_shutdown_leaves_no_process(self, server):
        _assert_stops_clean(server)


# --------------------------------------------------------------------------- bad SGL_ACCEL value


class TestBadValue:
    @pytest.fixture(scope="class")
    @staticmethod
    def server(request, model, site):
        return _launch(request, model, site, "bad-value", SGL_ACCEL="fastest-please", SGL_ACCEL_LOG_LEVEL="INFO")

    def test_serves(self, server):
        _generate(server)
        _chat(server)

    def test_one_warning_per_process_naming_valid_values_and_nothing_applied(self, server):
        by_pid = srv.accel_lines(server.log_text())
        by_role = _lines_by_role(server)
        for messages in [*by_pid.values(), *by_role.values()]:
            # Every process inherits the value; each says so once and applies nothing.
            assert len(messages) == 1, messages
            level, message = messages[0]
            assert level == "WARNING" and "fastest-please" in message and "valid values" in message, messages

    def test_shutdown_leaves_no_process(self, server):
        _assert_stops_clean(server)


# --------------------------------------------------------------------------- SGL_ACCEL_HARDWARE=ascend


class TestAscendOverride:
    @pytest.fixture(scope="class")
    @staticmethod
    def server(request, model, site):
        return _launch(request, model, site, "ascend", SGL_ACCEL="1", SGL_ACCEL_HARDWARE="ascend", SGL_ACCEL_LOG_LEVEL="DEBUG")

    def test_serves(self, server):
        _generate(server)
        _chat(server)

    def test_each_process_reaches_only_what_the_plan_admits(self, server, site):
        plan = _plan(site, SGL_ACCEL_HARDWARE="ascend")
        server.times["reached"] = _check_processes_against_plan(server, plan)

    def test_shutdown_leaves_no_process(self, server):
        _assert_stops_clean(server)


# --------------------------------------------------------------------------- plugin only


@pytest.mark.skipif(not RELEASE or not _release_at_least("0.5.11"), reason="sglang < 0.5.11 has no plugin mechanism")
class TestPluginOnly:
    @pytest.fixture(scope="class")
    @staticmethod
    def server(request, model, site):
        return _launch(request, model, site, "plugin", SGL_ACCEL_LOG_LEVEL="DEBUG")

    def test_serves(self, server):
        _generate(server)
        _chat(server)

    def test_engine_and_scheduler_report_detokenizer_untouched(self, server, site):
        plan = _plan(site)
        by_role = _lines_by_role(server)
        for role in ("sglang::engine", "sglang::scheduler"):
            assert len(_summaries(by_role[role])) == 1, (role, by_role[role])
            assert set(_final_states(by_role[role])) == set(plan), (role, by_role[role])
        assert by_role["sglang::detokenizer"] == [], by_role["sglang::detokenizer"]

    def test_shutdown_leaves_no_process(self, server):
        _assert_stops_clean(server)

"""The federation across six hosts: Linux network namespaces joined by veth links on one
machine (:mod:`tests.multihost.network`), each host with its own home holding only its
bundle (:mod:`tests.multihost.hosts`). The tests run in order on one deployment: what
works across hosts first, then the faults (an inference host cut off, the database host
cut off, a node presenting another host's certificate), then the audit chain, intact.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.hosts import (
    CLI,
    ENROLLMENT_PORT,
    FIRST_EVENT_TIMEOUT,
    HOSTS,
    PORTS,
    REQUEST_DEADLINE,
    DeployedFederation,
    clean_env,
)
from tests.multihost.network import Network, unavailable_reason

REASON = unavailable_reason()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=REASON or ""),
              pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployedFederation]:
    network = Network(dict(HOSTS))
    deployed = DeployedFederation(network, tmp_path_factory.mktemp("hosts"))
    try:
        network.open()
        deployed.start()
        yield deployed
    finally:
        try:
            deployed.stop()
        finally:
            network.close()


@pytest.fixture(scope="module")
def key(federation: DeployedFederation) -> str:
    issued = federation.cli("keys", "issue", "--tenant", "acme", "--scope", "chat",
                            "--scope", "council", "--json")
    return str(json.loads(issued.stdout)["key"])


def test_the_openai_client_chats_through_the_gateway_host(
        federation: DeployedFederation, key: str) -> None:
    result = federation.client("chat", key)
    assert result["text"] == "hello across hosts"
    assert result["streamed"] == "streamed across hosts" and result["usage"] > 0


def test_status_shows_every_node_across_hosts(federation: DeployedFederation) -> None:
    result = federation.cli("status", "--peers", "--json")
    nodes = json.loads(result.stdout)["nodes"]
    assert len(nodes) == 7 and all(n["health"] == "serving" for n in nodes), nodes
    identities = {n["identity"] for n in nodes}
    assert "spiffe://federation.local/node/inf2/inference" in identities
    assert all(n["version"] and n["certificate_expires"] for n in nodes)


def test_a_council_vote_across_hosts(federation: DeployedFederation) -> None:
    result = federation.cli("council", "ask", "Should we deploy across hosts?", "--tenant",
                            "acme", "--json", timeout=120)
    vote = json.loads(result.stdout)
    assert vote["decision"] == "DECISION_AUTHORIZED", vote
    assert vote["quorum"]["voted"] == 7


def test_an_edge_device_enrolls_uploads_and_runs_a_job(federation: DeployedFederation,
                                                       tmp_path: Path) -> None:
    broker = federation.network.address("cb")
    token = json.loads(federation.cli("edge", "token", "--name", "phone1", "--json").stdout)
    device = tmp_path / "phone1"
    ca = federation.ca_home / "pki" / "ca.pem"
    # The device has nothing of the federation but the root certificate and its token.
    device_env = clean_env(FEDERATION_HOME=str(tmp_path / "phone-home"))
    federation.run("client", [CLI, "edge", "enroll", "--broker", f"{broker}:{ENROLLMENT_PORT}",
                              "--ca", str(ca), "--token", token["token"], "--out", str(device)],
                   env=device_env)
    payload = tmp_path / "capture.bin"
    payload.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    uploaded = federation.run("client", [CLI, "edge", "upload", str(payload), "--cert-dir",
                                         str(device), "--broker", f"{broker}:{PORTS['broker']}",
                                         "--json"], env=device_env)
    digest = json.loads(uploaded.stdout)["blob_digest"]
    assert digest == "sha256:" + hashlib.sha256(payload.read_bytes()).hexdigest()
    job = json.loads(federation.cli("edge", "jobs", "submit", "--tenant", "acme", "--kind",
                                    "sha256", "--blob", digest, "--json").stdout)
    agent = subprocess.Popen(
        federation.network.command("client", [CLI, "edge", "agent", "--cert-dir", str(device),
                                              "--broker", f"{broker}:{PORTS['broker']}"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=device_env)
    try:
        watched = federation.cli("edge", "jobs", "watch", job["job_id"], "--json", timeout=90)
    finally:
        agent.terminate()
        agent.wait(30)
    final = _documents(watched.stdout)[-1]
    assert final["state"] == "succeeded", watched.stdout


def _documents(text: str) -> list[dict[str, object]]:
    """Every JSON document printed one after another (each may span lines)."""
    decoder, found, index = json.JSONDecoder(), [], 0
    text = text.strip()
    while index < len(text):
        document, index = decoder.raw_decode(text, index)
        found.append(document)
        while index < len(text) and text[index].isspace():
            index += 1
    return found


def test_a_node_with_another_hosts_certificate_is_refused(
        federation: DeployedFederation) -> None:
    """inf2's bundle copied onto inf1's host: clients reaching inf1's address refuse a
    certificate that names inf2."""
    stolen = federation.base / "stolen-home"
    subprocess.run(["cp", "-a", str(federation.home("inf2")), str(stolen)], check=True)
    rogue_port = 7199
    process = subprocess.Popen(
        federation.network.command("inf1", [CLI, "node", "--role", "inference", "--listen",
                                            f"{federation.network.address('inf1')}:{rogue_port}",
                                            "--metrics-port", "0"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=clean_env(FEDERATION_HOME=str(stolen),
                      FEDERATION_NODES_METRICS_HOST=federation.network.address("inf1")))
    try:
        target = f"{federation.network.address('inf1')}:{rogue_port}"
        env = clean_env(FEDERATION_HOME=str(federation.ca_home),
                        FEDERATION_PEERS_INFERENCE=target)
        for _ in range(50):
            status = federation.run("client", [CLI, "status", "--peers", "--json"], env=env,
                                    check=False)
            node = next(n for n in json.loads(status.stdout)["nodes"] if n["address"] == target)
            if "Connection refused" not in node["problem"] or process.poll() is not None:
                break
            time.sleep(0.2)
        assert status.returncode == 1 and node["health"] == "unreachable"
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert "IP address mismatch" in node["problem"], node
    finally:
        process.terminate()
        process.wait(30)


def test_cutting_an_inference_host_fails_over_and_ends_its_streams(
        federation: DeployedFederation, key: str) -> None:
    streams = federation.client_in_background("streams", key, "4:30")  # 30 × 0.25 s each
    assert streams.stdout is not None
    assert json.loads(streams.stdout.readline()) == {"started": 4}
    time.sleep(2.0)  # every stream has its first tokens
    federation.network.cut("inf1")
    cut_at = time.monotonic()
    try:
        # New requests: served by inf2, failing over before the first token.
        for _ in range(3):
            result = federation.client("chat", key, timeout=60)
            assert result["text"] == "hello across hosts"
        out, _ = streams.communicate(timeout=REQUEST_DEADLINE + 30)
        outcomes = json.loads(out.splitlines()[-1])["streams"]
        elapsed = time.monotonic() - cut_at
    finally:
        federation.network.restore("inf1")
    completed = [s for s in outcomes if s["done"] and s["error"] is None]
    ended_with_error = [s for s in outcomes if s["error"] is not None]
    assert len(completed) + len(ended_with_error) == 4, outcomes
    assert ended_with_error, "no stream was on the cut host"
    assert all(s["done"] for s in ended_with_error)  # the error event, then [DONE]
    assert all(s["seconds"] < REQUEST_DEADLINE + 5 for s in outcomes), outcomes
    assert elapsed < REQUEST_DEADLINE + 10
    assert FIRST_EVENT_TIMEOUT < REQUEST_DEADLINE


def test_cutting_the_database_host_answers_503_and_recovers(
        federation: DeployedFederation, key: str) -> None:
    federation.network.cut("db")
    try:
        deadline = time.monotonic() + 30
        health = federation.client("status", key, "/health")
        while health["status"] != 503 and time.monotonic() < deadline:
            time.sleep(0.5)
            health = federation.client("status", key, "/health")
        assert health["status"] == 503
        for _ in range(3):
            chat = federation.client("status", key, "/v1/chat/completions")
            assert chat["status"] == 503, chat
            assert json.loads(chat["body"])["error"]["type"]
    finally:
        federation.network.restore("db")
    deadline = time.monotonic() + 60
    while True:
        chat = federation.client("status", key, "/v1/chat/completions")
        if chat["status"] == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert chat["status"] == 200, chat
    # Each component watches its database once a second: /health may follow the first
    # answered chat by a watch interval or two.
    deadline = time.monotonic() + 10
    health = federation.client("status", key, "/health")
    while health["status"] != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
        health = federation.client("status", key, "/health")
    assert health["status"] == 200, health
    # No node was restarted.
    assert all(r.process.poll() is None for r in federation.processes)


def test_the_audit_chain_is_intact_at_the_end(federation: DeployedFederation) -> None:
    deadline = time.monotonic() + 30
    while True:  # the gateway's spooled records of the outage are delivered first
        result = federation.cli("audit", "verify", "--json", check=False)
        report = json.loads(result.stdout) if result.stdout else {}
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert result.returncode == 0 and report["intact"], result.stdout + result.stderr
    assert int(report["records_checked"]) > 10


"""Drives the gateway's sandbox API with the published OpenShell SDK, as a user's program would:
connects with SandboxClient.from_active_cluster (XDG_CONFIG_HOME and OPENSHELL_GATEWAY are set by
tests/sandbox_sdk.rs), asserts each behaviour, and prints the checks it passed as JSON. Any failed
assertion exits non-zero with its traceback. argv[1] is `driver` (the gateway runs the test
driver) or `no-driver` (it runs none, as the gateway VM does today)."""
import json
import sys

import grpc
from openshell import DeletionOutcome, Sandbox, SandboxClient
from openshell._proto import openshell_pb2

WS = "default"
checks = []


def code_of(call):
    """The gRPC status code `call()` raised through the SDK, or None if it did not raise."""
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return None


client = SandboxClient.from_active_cluster(timeout=10)

if sys.argv[1] == "no-driver":
    info = client._stub.GetGatewayInfo(openshell_pb2.GetGatewayInfoRequest(), timeout=10)
    assert len(info.compute_drivers) == 0, info
    checks.append("no_driver_info")
    for call in (
        lambda: client.list_all(workspace=WS),
        lambda: client.create(workspace=WS, name="sdk-one"),
        lambda: client.get("sdk-one", workspace=WS),
    ):
        try:
            call()
            raise AssertionError("a sandbox call succeeded on a gateway without a compute driver")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.code()
            assert "runs no compute driver" in e.details(), e.details()
    checks.append("no_driver_sandbox_calls")
    try:
        client._stub.GetSandboxLogs(openshell_pb2.GetSandboxLogsRequest(sandbox="x"), timeout=10)
        raise AssertionError("GetSandboxLogs, which the gateway does not serve, answered")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNIMPLEMENTED and "GetSandboxLogs" in e.details(), e
    checks.append("unserved")
    print(json.dumps({"checks": checks}))
    sys.exit(0)

info = client._stub.GetGatewayInfo(openshell_pb2.GetGatewayInfoRequest(), timeout=10)
assert [d.name for d in info.compute_drivers] == ["host-processes"], info
checks.append("gateway_info")

with Sandbox(workspace=WS, name="sdk-one", labels={"suite": "e2e", "n": "1"}) as sb:
    assert sb.sandbox.phase == openshell_pb2.SANDBOX_PHASE_READY, sb.sandbox
    r = sb.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n"), r
    checks.append("context_exec")

    r = sb.exec(["sh", "-c", 'cat; echo " $GREETING"; pwd'], stdin=b"fed", env={"GREETING": "hi"}, workdir="/tmp")
    assert (r.exit_code, r.stdout) == (0, "fed hi\n/tmp\n"), r
    checks.append("stdin_env_workdir")

    got = code_of(lambda: client.create(workspace=WS, name="sdk-one"))
    assert got == grpc.StatusCode.ALREADY_EXISTS, got
    checks.append("already_exists")

    got = code_of(lambda: client.create(workspace=WS, name="Not_A_Name"))
    assert got == grpc.StatusCode.INVALID_ARGUMENT, got
    checks.append("invalid_name")

    spec = openshell_pb2.SandboxSpec(template=openshell_pb2.SandboxTemplate(image="docker.io/library/absent:1"))
    try:
        client.create(workspace=WS, name="sdk-image", spec=spec)
        raise AssertionError("a sandbox of an image the gateway lacks was created")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.code()
        assert "cargo xtask image import docker.io/library/absent:1" in e.details(), e.details()
    checks.append("missing_image")

    for n in ("2", "3"):
        client.create(workspace=WS, name=f"sdk-{n}", labels={"suite": "e2e", "n": n})
        client.wait_ready(f"sdk-{n}", workspace=WS, timeout_seconds=30)

    pages = list(client.list(workspace=WS, page_size=1))
    assert [len(p.items) for p in pages] == [1, 1, 1], pages
    names = [p.items[0].name for p in pages]
    assert names == ["sdk-2", "sdk-3", "sdk-one"], names
    checks.append("list_pages")

    picked = client.list_all(workspace=WS, label_selector="suite=e2e,n=2")
    assert [s.name for s in picked] == ["sdk-2"], picked
    assert [s.name for s in client.list_all(workspace=WS, label_selector="n!=2")] == ["sdk-3", "sdk-one"]
    checks.append("label_selector")

# Leaving the context deleted sdk-one and waited for it to go (DeleteSandbox, wait_deleted).
assert code_of(lambda: client.get("sdk-one", workspace=WS)) == grpc.StatusCode.NOT_FOUND
for n in ("2", "3"):
    result = client.delete(f"sdk-{n}", workspace=WS)
    assert result.outcome == DeletionOutcome.ACCEPTED, result
    client.wait_deleted(f"sdk-{n}", workspace=WS, timeout_seconds=30)
assert client.list_all(workspace=WS) == []
assert client.delete("sdk-2", workspace=WS, allow_missing=True).outcome == DeletionOutcome.ALREADY_ABSENT
checks.append("delete_wait_deleted")

got = code_of(lambda: client.get("never-made", workspace=WS))
assert got == grpc.StatusCode.NOT_FOUND, got
checks.append("not_found")

client.close()
print(json.dumps({"checks": checks}))

"""What a user of the published OpenShell SDK does against the active gateway: find it from
$XDG_CONFIG_HOME/openshell (active_gateway, metadata.json's gateway_endpoint, the mtls bundle),
call Health and GetGatewayInfo, see ListSandboxes answer FAILED_PRECONDITION (the gateway VM runs
no compute driver yet) and a method the gateway does not serve answer UNIMPLEMENTED, each with a
message. Prints one JSON line; any exception fails the trial with its traceback."""
import json

import grpc
from openshell import SandboxClient
from openshell._proto import openshell_pb2

with SandboxClient.from_active_cluster(timeout=60) as client:
    health = client.health()
    info = client._stub.GetGatewayInfo(openshell_pb2.GetGatewayInfoRequest(), timeout=60)
    try:
        client.list(workspace="default").all()
        listed = {"code": "OK", "details": ""}
    except grpc.RpcError as e:
        listed = {"code": e.code().name, "details": e.details()}
    try:
        client._stub.GetSandboxLogs(openshell_pb2.GetSandboxLogsRequest(sandbox="x"), timeout=60)
        unserved = {"code": "OK", "details": ""}
    except grpc.RpcError as e:
        unserved = {"code": e.code().name, "details": e.details()}
print(json.dumps({
    "health": {"status": openshell_pb2.ServiceStatus.Name(health.status), "version": health.version},
    "info": {
        "status": openshell_pb2.ServiceStatus.Name(info.status),
        "gateway_version": info.gateway_version,
        "compute_drivers": len(info.compute_drivers),
    },
    "list_sandboxes": listed,
    "unserved": unserved,
}))

"""A Kubernetes API server's discovery, and nothing else.

`kubectl apply --dry-run=client` asks a server which kinds exist (and
whether each object does) before it accepts a manifest; this machine has
no API server. This answers discovery for the kinds the manifests under
deploy/kubernetes use, and 404 for every object, so kubectl checks every
kind and field path it knows and reports "created (dry run)".

usage: python3 discovery.py PORT
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def res(name, kind, namespaced=True):
    return {"name": name, "singularName": "", "namespaced": namespaced, "kind": kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}


GROUPS = {
    "apps/v1": [res("statefulsets", "StatefulSet"), res("deployments", "Deployment")],
    "batch/v1": [res("jobs", "Job"), res("cronjobs", "CronJob")],
    "rbac.authorization.k8s.io/v1": [res("roles", "Role"), res("rolebindings", "RoleBinding")],
    "snapshot.storage.k8s.io/v1": [res("volumesnapshots", "VolumeSnapshot")],
}
CORE = [res("configmaps", "ConfigMap"), res("secrets", "Secret"), res("services", "Service"),
        res("pods", "Pod"), res("persistentvolumeclaims", "PersistentVolumeClaim"),
        res("serviceaccounts", "ServiceAccount")]

PATHS = {
    "/version": {"major": "1", "minor": "32", "gitVersion": "v1.32.0"},
    "/api": {"kind": "APIVersions", "versions": ["v1"],
             "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": CORE},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": gv.split("/")[0],
         "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
         "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}}
        for gv in GROUPS]},
}
for gv, resources in GROUPS.items():
    PATHS[f"/apis/{gv}"] = {"kind": "APIResourceList", "groupVersion": gv, "resources": resources}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = PATHS.get(self.path.split("?")[0])
        code = 200
        if body is None:
            code, body = 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "reason": "NotFound", "code": 404}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()

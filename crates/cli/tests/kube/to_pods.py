"""Turn rendered Kubernetes manifests into what `podman kube play` runs.

podman plays Pods, Deployments, ConfigMaps, Secrets and PersistentVolumeClaims,
but not StatefulSets, Jobs or CronJobs. This does for them what their
controllers would: the pod template becomes one Pod (a StatefulSet's is
`<name>-0`, and each of its volumeClaimTemplates a PVC `<claim>-<name>-0`
mounted in its place), with restartPolicy Never unless the template says
otherwise for a Job. Nothing else in the pod spec is changed: the containers,
their init containers, environment, security contexts and mounts are the
manifests' own. Services are dropped (podman has no use for them).

usage: python3 to_pods.py [--without-claims] [--sidecars-as-containers] < rendered.yaml > playable.yaml

--without-claims leaves the claims out, to play a pod again on the volumes
an earlier play made (podman refuses a claim whose volume exists), as a
restarted pod finds its PersistentVolumeClaims.

--sidecars-as-containers moves native sidecars (init containers with
restartPolicy: Always, Kubernetes 1.29) into the pod's containers, as they
ran before 1.29: podman 4.3 refuses an init container with a probe, and
would wait for a sidecar to exit before starting the node. What is lost is
the ordering (the node no longer waits for the sidecar's startup probe).
"""
import sys

import yaml


SIDECARS_AS_CONTAINERS = "--sidecars-as-containers" in sys.argv[1:]


def pod(name, template, restart):
    spec = dict(template["spec"])
    if SIDECARS_AS_CONTAINERS:
        inits = spec.get("initContainers", [])
        sidecars = [dict(c) for c in inits if c.get("restartPolicy") == "Always"]
        for c in sidecars:
            del c["restartPolicy"]
        spec["initContainers"] = [c for c in inits if c.get("restartPolicy") != "Always"]
        spec["containers"] = sidecars + spec["containers"]
    spec.setdefault("restartPolicy", restart)
    meta = dict(template.get("metadata") or {})
    meta["name"] = name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def convert(doc):
    kind = doc.get("kind")
    name = doc["metadata"]["name"]
    if kind == "StatefulSet":
        p = pod(f"{name}-0", doc["spec"]["template"], "Never")
        out = []
        for claim in doc["spec"].get("volumeClaimTemplates", []):
            cname = f"{claim['metadata']['name']}-{name}-0"
            out.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": {"name": cname}, "spec": claim["spec"]})
            p["spec"].setdefault("volumes", []).append(
                {"name": claim["metadata"]["name"],
                 "persistentVolumeClaim": {"claimName": cname}})
        return out + [p]
    if kind == "Job":
        return [pod(name, doc["spec"]["template"], "Never")]
    if kind == "CronJob":
        return [pod(name, doc["spec"]["jobTemplate"]["spec"]["template"], "Never")]
    if kind in ("Service",):
        return []
    return [doc]


docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
out = [c for d in docs for c in convert(d)]
if "--without-claims" in sys.argv[1:]:
    out = [d for d in out if d["kind"] != "PersistentVolumeClaim"]
# ConfigMaps, Secrets and claims before the pods that use them.
out.sort(key=lambda d: d["kind"] == "Pod")
yaml.safe_dump_all(out, sys.stdout, sort_keys=False)

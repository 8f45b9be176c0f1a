#!/bin/sh
# Run by the btm-export CronJob: export the node's newest labelled
# VolumeSnapshot unless a Job already did. The ConfigMap btm-export gives
# the variables (STORE, TAG, NODE, STORAGE_CLASS, SIZE, IMAGE, RPC_*).
set -eu
node=${NODE:?the ConfigMap btm-export sets no NODE}; class=${STORAGE_CLASS:-}
: "${STORE:?the ConfigMap btm-export sets no STORE}" "${IMAGE:?the ConfigMap btm-export sets no IMAGE}"

snap=$(kubectl get volumesnapshot -l "app.kubernetes.io/name=$node,btm.io/height" \
    --sort-by=.metadata.creationTimestamp -o jsonpath='{.items[-1:].metadata.name}')
if [ -z "$snap" ]; then
    echo "no VolumeSnapshot of $node is labelled btm.io/height: nothing to export" >&2
    exit 1
fi
height=$(kubectl get volumesnapshot "$snap" -o jsonpath='{.metadata.labels.btm\.io/height}')
ready=$(kubectl get volumesnapshot "$snap" -o jsonpath='{.status.readyToUse}')
case $height in
    ''|*[!0-9]*) echo "VolumeSnapshot $snap has btm.io/height '$height', not a height" >&2; exit 1 ;;
esac
if [ "$ready" != true ]; then
    echo "VolumeSnapshot $snap (height $height) is not ready to use yet; the next run exports it" >&2
    exit 0
fi
job="btm-export-$node-$height"
if kubectl get job "$job" >/dev/null 2>&1; then
    echo "height $height ($snap) is exported already, by Job $job"
    exit 0
fi

kubectl create -f - <<YAML
apiVersion: batch/v1
kind: Job
metadata:
  name: $job
  labels: {app.kubernetes.io/name: btm-export, btm.io/height: "$height"}
spec:
  backoffLimit: 3
  ttlSecondsAfterFinished: 86400
  template:
    spec:
      restartPolicy: OnFailure
      securityContext: {runAsUser: 1000, runAsGroup: 1000, fsGroup: 1000, fsGroupChangePolicy: OnRootMismatch}
      containers:
        - name: btm-export
          image: $IMAGE
          # lost+found: the file system's (root's, unreadable to the node's
          # user); .btm/: a restore's cache and journal.
          args: ["backup", "/data", "--json", "--exclude", "lost+found", "--exclude", ".btm/**"]
          env:
            - {name: BTM_STORE, value: "$STORE"}
            - {name: BTM_TAG, value: "$TAG"}
            - {name: BTM_HEIGHT, value: "$height"}
            - {name: BTM_RPC_URL, value: "${RPC_URL:-}"}
            - {name: BTM_RPC_KIND, value: "${RPC_KIND:-}"}
            - {name: BTM_RPC_USER, value: "${RPC_USER:-}"}
            - {name: BTM_CACHE_DIR, value: /tmp/btm-cache}
          envFrom:
            - secretRef: {name: btm-store-credentials, optional: true}
          securityContext:
            runAsNonRoot: true
            readOnlyRootFilesystem: true
            allowPrivilegeEscalation: false
            capabilities: {drop: ["ALL"]}
          volumeMounts:
            - {name: data, mountPath: /data, readOnly: true}
            - {name: btm-tmp, mountPath: /tmp}
      volumes:
        - name: data
          persistentVolumeClaim: {claimName: $job}
        - name: btm-tmp
          emptyDir: {}
YAML
uid=$(kubectl get job "$job" -o jsonpath='{.metadata.uid}')
kubectl create -f - <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: $job
  ownerReferences:
    - {apiVersion: batch/v1, kind: Job, name: $job, uid: $uid}
spec:
  accessModes: [ReadWriteOnce]
  ${class:+storageClassName: $class}
  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: $snap}
  resources: {requests: {storage: $SIZE}}
YAML
echo "exporting $snap (height $height) with Job $job"

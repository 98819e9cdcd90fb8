"""deploy/kubernetes/: every manifest is valid Kubernetes, and the pieces fit together.

* Schema: each resource validates against the Kubernetes OpenAPI schemas shipped inside
  ``kubernetes-validate`` (offline), in strict mode (unknown fields are errors), for the oldest
  release the manifests target (1.27: native gRPC probes) and the newest the package knows.
* Wiring: the Service, PodDisruptionBudget and StatefulSet select the same pods; the probes,
  Service ports and checkpoint volume point at what the container really has; the Secret and
  ConfigMap that pods read exist.
* Shard list: every pod, with the environment expanded the way the kubelet does it, computes a
  shard list equal to the headless Service's DNS names
  ``<statefulset>-<i>.<service>.<namespace>.svc.cluster.local:<port>``, and its own index (from
  its hostname, as ``serve --shard-index-from-hostname`` does) names itself in that list.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from adamax_server.cli.runtime import shard_index_from_hostname

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
OLDEST = "1.27"  # grpc probes are GA from 1.27 on
VERSIONS = (OLDEST, kubernetes_validate.utils.latest_version())


def _files() -> list[Path]:
    return sorted(MANIFESTS.rglob("*.yaml"))


def _resources() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in _files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((str(path.relative_to(MANIFESTS)), doc))
    return out


RESOURCES = _resources()


def _one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in RESOURCES if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    assert len(pod_spec["containers"]) == 1
    return pod_spec["containers"][0]


def expand_env(env: list[dict[str, Any]], field_refs: dict[str, str], secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: in list order, ``$(NAME)`` in a
    ``value`` replaced by an earlier variable (left as is when undefined), ``$$`` an escaped ``$``."""
    out: dict[str, str] = {}
    for item in env:
        if "value" in item:
            def substitute(match: re.Match[str]) -> str:
                if match.group(0) == "$$":
                    return "$"
                return out.get(match.group(1), match.group(0))

            out[item["name"]] = re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", substitute, item["value"])
        else:
            source = item["valueFrom"]
            if "fieldRef" in source:
                out[item["name"]] = field_refs[source["fieldRef"]["fieldPath"]]
            else:
                ref = source["secretKeyRef"]
                out[item["name"]] = secrets[(ref["name"], ref["key"])]
    return out


def _secrets() -> dict[tuple[str, str], str]:
    secret = _one("Secret")
    return {(secret["metadata"]["name"], key): value for key, value in secret["stringData"].items()}


# ---------------------------------------------------------------- schema


def test_the_kubernetes_set_is_complete() -> None:
    kinds = sorted(doc["kind"] for _, doc in RESOURCES)
    assert kinds == ["ConfigMap", "Job", "PodDisruptionBudget", "Secret", "Service", "StatefulSet"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name,doc", RESOURCES, ids=[f"{n}:{d['kind']}" for n, d in RESOURCES])
def test_manifest_validates_against_the_kubernetes_schema(name: str, doc: dict[str, Any], version: str) -> None:
    assert kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    "mutate,where",
    [
        (lambda d: d["spec"].update(replica=2), "unknown field"),
        (lambda d: _container(d["spec"]["template"]["spec"])["readinessProbe"]["grpc"].update(port="grpc"), "named grpc port"),
        (lambda d: d["spec"]["volumeClaimTemplates"][0]["spec"].update(accessModes="ReadWriteOnce"), "wrong type"),
    ],
    ids=["unknown-field", "named-grpc-port", "wrong-type"],
)
def test_the_validator_catches_mistakes(mutate: Any, where: str) -> None:
    """The schemas really bite: a broken StatefulSet fails (else the test above proves nothing)."""
    broken = copy.deepcopy(_one("StatefulSet"))
    mutate(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


# ---------------------------------------------------------------- wiring


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_service_statefulset_and_budget_select_the_shard_pods() -> None:
    sts, svc, pdb, job = _one("StatefulSet"), _one("Service"), _one("PodDisruptionBudget"), _one("Job")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert _selects(sts["spec"]["selector"]["matchLabels"], pod_labels)
    assert _selects(svc["spec"]["selector"], pod_labels)
    assert _selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    # the workers are not shards: no selector of the shards picks them up
    worker_labels = job["spec"]["template"]["metadata"]["labels"]
    assert not _selects(svc["spec"]["selector"], worker_labels)
    assert not _selects(pdb["spec"]["selector"]["matchLabels"], worker_labels)
    # headless, the StatefulSet's governing Service, names resolvable before Ready
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    # shards call each other: all start together, none waits for another to be Ready
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    # a drain takes at most one shard at a time, and never blocks forever
    assert pdb["spec"]["maxUnavailable"] == 1


def test_probes_ports_and_volumes_point_at_the_container() -> None:
    sts, svc = _one("StatefulSet"), _one("Service")
    pod = sts["spec"]["template"]["spec"]
    container = _container(pod)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = expand_env(container["env"], {"metadata.namespace": "ns"}, _secrets())
    assert ports == {"grpc": int(env["ADAMAX_PS_PORT"]), "bulk": int(env["ADAMAX_PS_BULK_PORT"]),
                     "metrics": int(env["ADAMAX_PS_METRICS_PORT"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe  # the gRPC health service
    for port in svc["spec"]["ports"]:
        assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]
    # one PersistentVolumeClaim per shard, mounted where the server writes its checkpoints
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert claims == {"checkpoints"} and mounts["checkpoints"] == env["ADAMAX_PS_CHECKPOINT_DIR"]
    assert env["ADAMAX_PS_RESTORE"] == "latest"
    # SIGTERM: the grace for calls plus the final checkpoint fit in the pod's termination grace
    assert pod["terminationGracePeriodSeconds"] >= float(env["ADAMAX_PS_GRACE"]) + 30
    # a read-only root needs a writable /tmp for numba's kernel cache
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert env["NUMBA_CACHE_DIR"].startswith(mounts["tmp"] + "/")


def test_secrets_and_config_maps_that_pods_read_exist() -> None:
    names = {(doc["kind"], doc["metadata"]["name"]) for _, doc in RESOURCES}
    for kind in ("StatefulSet", "Job"):
        pod = _one(kind)["spec"]["template"]["spec"]
        for item in _container(pod)["env"]:
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ("Secret", ref["name"]) in names and (ref["name"], ref["key"]) in _secrets()
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names


def test_the_worker_job_runs_the_demo_worker_of_docker() -> None:
    """The ConfigMap carries docker/demo_worker.py verbatim, so the two never drift apart."""
    config_map, job = _one("ConfigMap"), _one("Job")
    assert config_map["data"]["demo_worker.py"] == (ROOT / "docker" / "demo_worker.py").read_text()
    container = _container(job["spec"]["template"]["spec"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == "script")
    assert container["command"] == ["python", f"{mount['mountPath']}/demo_worker.py"]


# ---------------------------------------------------------------- the shard list


@pytest.mark.parametrize("namespace", ["default", "ml-team"])
def test_every_pod_computes_the_services_dns_names_as_its_shard_list(namespace: str) -> None:
    sts, svc = _one("StatefulSet"), _one("Service")
    replicas, name, service = sts["spec"]["replicas"], sts["metadata"]["name"], svc["metadata"]["name"]
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    expected = [f"{name}-{i}.{service}.{namespace}.svc.cluster.local:{grpc_port}" for i in range(replicas)]
    container = _container(sts["spec"]["template"]["spec"])
    assert "--shard-index-from-hostname" in container["args"]
    for ordinal in range(replicas):
        hostname = f"{name}-{ordinal}"  # a StatefulSet pod's name and hostname
        env = expand_env(container["env"], {"metadata.namespace": namespace}, _secrets())
        shards = env["ADAMAX_PS_SHARDS"].split(",")
        assert shards == expected
        index = shard_index_from_hostname(hostname)
        assert index == ordinal
        assert shards[index].split(".")[0] == hostname  # shard i's address is this very pod
    # the workers connect to the same list, in the same order
    job_container = _container(_one("Job")["spec"]["template"]["spec"])
    job_env = expand_env(job_container["env"], {"metadata.namespace": namespace}, _secrets())
    assert job_env["ADAMAX_PS_TARGET"].split(",") == expected


@pytest.mark.parametrize(
    "hostname,index",
    [("adamax-ps-0", 0), ("adamax-ps-7", 7), ("adamax-ps-12.adamax-ps.ml.svc.cluster.local", 12), ("a-b-3", 3)],
)
def test_shard_index_from_hostname(hostname: str, index: int) -> None:
    assert shard_index_from_hostname(hostname) == index


@pytest.mark.parametrize("hostname", ["adamax-ps", "adamax-ps-", "adamax-ps-01", "-3", "ps-1a", ""])
def test_shard_index_from_a_hostname_without_ordinal_is_refused(hostname: str) -> None:
    with pytest.raises(ValueError, match="ends with -<ordinal>"):
        shard_index_from_hostname(hostname)

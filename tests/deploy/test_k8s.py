"""deploy/k8s (issue 12): the committed files are what the code renders, each overlay builds with kustomize,
every object validates against the Kubernetes schemas (custom resources by hand), and the objects agree with
each other and with the code: every role of the CLI is deployed, on its port, probed on its paths, scaled
within its topic's partitions, given time to drain, behind an ingress with the API's body limit."""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import kubernetes_validate
import pytest
import typer
import yaml
from pydantic import BaseModel, ConfigDict

from services.cli import app as cli_app
from services.common import config as config_module
from services.common import targets
from services.common.config import ConfigError, DeliverySettings, Settings, load_settings
from services.common.kafka import DEFAULT_PARTITIONS, EVENTS, INBOX
from services.deploy import k8s
from services.deploy.roles import IMAGE, METRICS_PATH, Role, roles, topics
from services.ingest.api import MAX_BODY, create_api

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("base", "overlays/production")
# The oldest Kubernetes we support and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CRD_GROUPS = ("kafka.strimzi.io", "keda.sh", "monitoring.coreos.com")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
PART_OF = {"app.kubernetes.io/part-of": "klientiks-relay"}

Obj = dict[str, Any]


def _kustomize(path: Path) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to build the kustomizations"
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return [o for o in yaml.safe_load_all(done.stdout) if o]


@pytest.fixture(scope="module")
def built() -> dict[str, list[Obj]]:
    """Every overlay's objects, as `kubectl kustomize` renders them (once per overlay)."""
    return {overlay: _kustomize(ROOT / k8s.ROOT / overlay) for overlay in OVERLAYS}


def _all(objs: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def _one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = _all(objs, kind)
    assert name in found, f"no {kind} {name!r}; there are {sorted(found)}"
    return found[name]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _container(obj: Obj) -> Obj:
    containers = obj["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _secret_template() -> Obj:
    docs = [d for d in yaml.safe_load_all((ROOT / k8s.SECRET_TEMPLATE).read_text()) if d]
    assert len(docs) == 1
    return dict(docs[0])


# --- the files ---------------------------------------------------------------------------------------------


def test_the_committed_files_are_what_the_code_renders() -> None:
    stale = [
        path
        for path, text in k8s.render().items()
        if not (ROOT / path).exists() or (ROOT / path).read_text(encoding="utf-8") != text
    ]
    assert not stale, f"stale: {stale}; run `relay deploy render`"


def test_the_base_lists_every_file_it_deploys_and_the_observability_files() -> None:
    kustomization = yaml.safe_load((ROOT / k8s.BASE / "kustomization.yaml").read_text())
    rendered = {p.removeprefix(f"{k8s.BASE}/") for p in k8s.render() if p.startswith(f"{k8s.BASE}/")}
    listed = set(kustomization["resources"])
    assert set(k8s.OBSERVABILITY_FILES) <= listed
    assert listed - set(k8s.OBSERVABILITY_FILES) == rendered - {"kustomization.yaml", "relay.yaml"}
    assert kustomization["namespace"] == k8s.NAMESPACE
    assert kustomization["configMapGenerator"][0]["files"] == ["relay.yaml"]
    # The Secret template is never applied by the kustomization: its placeholders would replace real values.
    assert not k8s.SECRET_TEMPLATE.startswith(k8s.BASE)


def test_each_overlay_builds(built: dict[str, list[Obj]]) -> None:
    for overlay, objs in built.items():
        kinds = {o["kind"] for o in objs}
        assert {"Namespace", "Deployment", "Service", "Ingress", "Kafka", "KafkaTopic", "Job"} <= kinds, (
            overlay
        )
        keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]
        assert len(keys) == len(set(keys)), f"{overlay}: an object is defined twice"
        for o in objs:
            assert DNS_SUBDOMAIN.match(o["metadata"]["name"]), (overlay, o["kind"], o["metadata"]["name"])
            assert PART_OF.items() <= o["metadata"].get("labels", {}).items(), (overlay, o["kind"])
            if o["kind"] != "Namespace":
                assert o["metadata"]["namespace"] == k8s.NAMESPACE, (
                    overlay,
                    o["kind"],
                    o["metadata"]["name"],
                )


# --- schemas -----------------------------------------------------------------------------------------------


def _is_custom(obj: Obj) -> bool:
    return str(obj["apiVersion"]).split("/")[0] in CRD_GROUPS


@pytest.fixture(scope="module")
def _schemas_cached() -> Iterator[None]:
    """kubernetes-validate reads and parses its schema files on every call: read each once here."""
    with pytest.MonkeyPatch.context() as mp:
        read = getattr(kubernetes_validate.utils, "schema_contents", None)
        if read is not None:
            mp.setattr(kubernetes_validate.utils, "schema_contents", functools.cache(read))
        yield


@pytest.mark.usefixtures("_schemas_cached")
def test_every_core_object_validates_against_the_kubernetes_schemas(built: dict[str, list[Obj]]) -> None:
    unique = {json.dumps(o, sort_keys=True): o for objs in built.values() for o in objs if not _is_custom(o)}
    for obj in [*unique.values(), _secret_template()]:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']} (Kubernetes {version}): {e.message}")


def _check_custom(obj: Obj) -> None:
    kind, spec, labels = obj["kind"], obj["spec"], obj["metadata"].get("labels", {})
    where = f"{kind} {obj['metadata']['name']}"
    expected = {
        "Kafka": "kafka.strimzi.io/v1beta2",
        "KafkaNodePool": "kafka.strimzi.io/v1beta2",
        "KafkaTopic": "kafka.strimzi.io/v1beta2",
        "ScaledObject": "keda.sh/v1alpha1",
        "ServiceMonitor": "monitoring.coreos.com/v1",
        "PrometheusRule": "monitoring.coreos.com/v1",
    }
    assert kind in expected, f"{where}: a custom resource this test does not check yet"
    assert obj["apiVersion"] == expected[kind], where
    if kind == "Kafka":
        assert obj["metadata"]["annotations"] == {
            "strimzi.io/kraft": "enabled",
            "strimzi.io/node-pools": "enabled",
        }
        assert "zookeeper" not in spec
        for listener in spec["kafka"]["listeners"]:
            assert {"name", "port", "type", "tls"} <= listener.keys(), where
        assert "topicOperator" in spec["entityOperator"], where
    elif kind == "KafkaNodePool":
        assert "strimzi.io/cluster" in labels, where
        assert isinstance(spec["replicas"], int), where
        assert set(spec["roles"]) <= {"controller", "broker"}, where
        assert spec["storage"]["type"] in ("jbod", "persistent-claim", "ephemeral"), where
        for volume in spec["storage"].get("volumes", []):
            assert {"id", "type", "size"} <= volume.keys(), where
    elif kind == "KafkaTopic":
        assert "strimzi.io/cluster" in labels, where
        assert isinstance(spec["partitions"], int), where
        assert isinstance(spec["replicas"], int), where
    elif kind == "ScaledObject":
        assert spec["scaleTargetRef"]["name"], where
        assert spec["triggers"], where
        for trigger in spec["triggers"]:
            assert trigger["type"], where
            assert isinstance(trigger["metadata"], dict), where
            assert all(isinstance(v, str) for v in trigger["metadata"].values()), (
                f"{where}: metadata are strings"
            )
    elif kind == "ServiceMonitor":
        assert isinstance(spec["selector"], dict), where
        assert spec["endpoints"], where
        for endpoint in spec["endpoints"]:
            assert endpoint.get("port") or endpoint.get("targetPort"), where
    elif kind == "PrometheusRule":
        assert spec["groups"], where
        for group in spec["groups"]:
            assert group["name"], where
            assert group["rules"], where
            for rule in group["rules"]:
                assert rule["expr"], where
                assert ("alert" in rule) != ("record" in rule), where


def test_every_custom_resource_has_its_required_fields(built: dict[str, list[Obj]]) -> None:
    for objs in built.values():
        for obj in objs:
            if _is_custom(obj):
                _check_custom(obj)


# --- the roles ---------------------------------------------------------------------------------------------


@functools.cache
def _cli() -> Any:
    return typer.main.get_command(cli_app)


def _cli_roles() -> dict[str, tuple[str, ...]]:
    """Every long-running role the `relay` CLI has: the ingest group's, and each delivery command."""
    cli = _cli()
    ctx = typer.Context(cli)
    out: dict[str, tuple[str, ...]] = {}
    for name in cli.list_commands(ctx):
        if (cli.get_command(ctx, name).help or "").startswith("Deliver events to"):
            out[name] = (name,)
    ingest = cli.get_command(ctx, "ingest")
    assert set(ingest.list_commands(ctx)) == {"api", "normalizer"}, "a new ingest role: deploy it"
    out["ingest-api"] = ("ingest", "api")
    out["normalizer"] = ("ingest", "normalizer")
    return out


def _resolve(args: tuple[str, ...]) -> Any:
    """The command `relay <args>` runs."""
    command = _cli()
    ctx = typer.Context(command)
    for arg in args:
        assert hasattr(command, "get_command"), args
        found = command.get_command(ctx, arg)
        assert found is not None, f"`relay {' '.join(args)}` is not a command"
        command = found
    return command


def test_every_role_of_the_cli_is_deployed(built: dict[str, list[Obj]]) -> None:
    cli = _cli_roles()
    assert {r.name: r.args for r in roles()} == cli
    for overlay, objs in built.items():
        deployments = _all(objs, "Deployment")
        assert set(deployments) == set(cli), overlay
        for role in roles():
            args = _container(deployments[role.name])["args"]
            assert args == [*role.args, "--host", "0.0.0.0", "--port", str(role.port)]
            # The arguments run that role: its command takes --host and --port.
            params = {p.name for p in _resolve(role.args).params}
            assert {"host", "port"} <= params, role.name


def _role(name: str) -> Role:
    return next(r for r in roles() if r.name == name)


def test_names_labels_selectors_ports_and_probes_agree(built: dict[str, list[Obj]]) -> None:
    for overlay, objs in built.items():
        deployments, services = _all(objs, "Deployment"), _all(objs, "Service")
        monitors, pdbs = _all(objs, "ServiceMonitor"), _all(objs, "PodDisruptionBudget")
        scaled, hpas = _all(objs, "ScaledObject"), _all(objs, "HorizontalPodAutoscaler")
        config_maps = _all(objs, "ConfigMap")
        assert set(services) == set(monitors) == set(pdbs) == set(deployments), overlay
        assert set(scaled) | set(hpas) == set(deployments), overlay
        assert not set(scaled) & set(hpas), overlay
        for name, dep in deployments.items():
            role = _role(name)
            pods = dep["spec"]["template"]["metadata"]["labels"]
            assert _matches(dep["spec"]["selector"]["matchLabels"], pods), name
            # Each selector picks this role's pods and no other role's.
            for other, o in deployments.items():
                other_pods = o["spec"]["template"]["metadata"]["labels"]
                assert _matches(services[name]["spec"]["selector"], other_pods) == (other == name)
                assert _matches(pdbs[name]["spec"]["selector"]["matchLabels"], other_pods) == (other == name)
                assert _matches(dep["spec"]["selector"]["matchLabels"], other_pods) == (other == name)
            for other, svc in services.items():
                picked = _matches(
                    monitors[name]["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]
                )
                assert picked == (other == name), (overlay, name, other)
            c = _container(dep)
            assert c["image"].startswith(f"{IMAGE}:"), c["image"]
            assert c["ports"] == [{"name": "http", "containerPort": role.port, "protocol": "TCP"}]
            assert services[name]["spec"]["ports"] == [
                {"name": "http", "port": role.port, "targetPort": "http", "protocol": "TCP"}
            ]
            # Only the ingest API's Service takes traffic, so only it leaves out pods that are not ready.
            assert services[name]["spec"]["publishNotReadyAddresses"] is (name != "ingest-api")
            assert monitors[name]["spec"]["endpoints"][0]["port"] == "http"
            assert monitors[name]["spec"]["endpoints"][0]["path"] == METRICS_PATH
            for probe, path in (
                ("startupProbe", "/healthz"),
                ("livenessProbe", "/healthz"),
                ("readinessProbe", "/readyz"),
            ):
                assert c[probe]["httpGet"] == {"path": path, "port": "http"}, (name, probe)
            assert "replicas" not in dep["spec"], f"{name}: its autoscaler owns the replicas"
            target = (scaled.get(name) or hpas[name])["spec"]["scaleTargetRef"]
            assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
            # The config it mounts is the generated one (hash-suffixed) and holds relay.yaml.
            volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
            assert "relay.yaml" in config_maps[volumes["config"]["configMap"]["name"]]["data"]
        ingress = _one(objs, "Ingress", "ingest-api")
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == "ingest-api"
                assert backend["port"]["name"] in {p["name"] for p in services["ingest-api"]["spec"]["ports"]}


def test_the_pods_run_hardened_with_the_config_and_secrets(built: dict[str, list[Obj]]) -> None:
    for overlay, objs in built.items():
        template = _secret_template()
        workloads = [*_all(objs, "Deployment").values(), *_all(objs, "Job").values()]
        for w in workloads:
            pod = w["spec"]["template"]["spec"]
            c = _container(w)
            where = (overlay, w["kind"], w["metadata"]["name"])
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["runAsUser"] == 10001, where
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert pod["automountServiceAccountToken"] is False, where
            assert pod["serviceAccountName"] in _all(objs, "ServiceAccount"), where
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert {"requests", "limits"} <= c["resources"].keys(), where
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], where
            assert "configMap" in volumes[mounts["/etc/relay"]["name"]], where
            secret = volumes[mounts["/etc/relay/secrets"]["name"]]["secret"]
            assert secret["secretName"] == template["metadata"]["name"], where
            assert mounts["/etc/relay/secrets"]["readOnly"] is True, where
            env = {e["name"]: e for e in c["env"]}
            assert env["RELAY_CONFIG"]["value"] == "/etc/relay/relay.yaml", where
            assert env["RELAY_LOG_FORMAT"]["value"] == "json", where
            ref = env["RELAY_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == template["metadata"]["name"], where
            assert ref["key"] in template["stringData"], where
            kafka = _one(objs, "Kafka", k8s.KAFKA_CLUSTER)
            port = kafka["spec"]["kafka"]["listeners"][0]["port"]
            assert (
                env["RELAY_KAFKA__BOOTSTRAP_SERVERS"]["value"]
                == f"{k8s.KAFKA_CLUSTER}-kafka-bootstrap:{port}"
            )


def test_a_pod_has_time_to_drain_before_it_is_killed(built: dict[str, list[Obj]]) -> None:
    grace = DeliverySettings().shutdown_grace_s
    for objs in built.values():
        for dep in _all(objs, "Deployment").values():
            seconds = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert seconds > grace
            # uvicorn's graceful shutdown, then the runtime's drain, one after the other.
            assert seconds > k8s.UVICORN_GRACE_S + grace + k8s.PRE_STOP_S


def test_the_migration_job_runs_before_the_deployments(built: dict[str, list[Obj]]) -> None:
    for objs in built.values():
        job = _one(objs, "Job", k8s.MIGRATION_JOB)
        c = _container(job)
        assert c["args"] == ["db", "upgrade"]
        assert _resolve(("db", "upgrade"))
        annotations = job["metadata"]["annotations"]
        assert annotations["argocd.argoproj.io/hook"] == "Sync"
        assert int(annotations["argocd.argoproj.io/sync-wave"]) < 0
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
        # Same image, config and credentials as the roles.
        api = _container(_one(objs, "Deployment", "ingest-api"))
        assert (c["image"], c["env"], c["volumeMounts"]) == (api["image"], api["env"], api["volumeMounts"])
        # `kubectl apply -l <apply-first>` (README) brings the Job and all it needs, and no Deployment.
        first = [o for o in objs if o["metadata"].get("labels", {}).get(k8s.APPLY_FIRST) == "true"]
        kinds = {o["kind"] for o in first}
        assert kinds == {"Namespace", "ServiceAccount", "ConfigMap", "Job"}
        pod = job["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["config"]["configMap"]["name"] in _all(first, "ConfigMap")
        assert pod["serviceAccountName"] in _all(first, "ServiceAccount")


# --- scaling and Kafka -------------------------------------------------------------------------------------


def test_consumers_scale_on_their_lag_within_their_topics_partitions(built: dict[str, list[Obj]]) -> None:
    for overlay, objs in built.items():
        kafka_topics = {t["spec"]["topicName"]: t for t in _all(objs, "KafkaTopic").values()}
        scaled = _all(objs, "ScaledObject")
        consumers = [r for r in roles() if r.group is not None]
        assert set(scaled) == {r.name for r in consumers}, overlay
        for role in consumers:
            assert role.topic is not None
            spec = scaled[role.name]["spec"]
            (trigger,) = spec["triggers"]
            meta = trigger["metadata"]
            assert trigger["type"] == "kafka"
            assert (meta["consumerGroup"], meta["topic"]) == (role.group, role.topic)
            assert int(meta["lagThreshold"]) > 0
            assert meta["bootstrapServers"] == f"{k8s.KAFKA_CLUSTER}-kafka-bootstrap.{k8s.NAMESPACE}.svc:9092"
            assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
            assert spec["maxReplicaCount"] <= kafka_topics[role.topic]["spec"]["partitions"]
            assert spec["maxReplicaCount"] <= DEFAULT_PARTITIONS[role.topic]
        hpa = _one(objs, "HorizontalPodAutoscaler", "ingest-api")["spec"]
        assert hpa["metrics"][0]["resource"]["name"] == "cpu"
        assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
        # A drain can always evict one ingest API pod.
        assert _one(objs, "PodDisruptionBudget", "ingest-api")["spec"]["minAvailable"] < hpa["minReplicas"]


def test_every_topic_is_a_kafka_topic_with_replication_and_retention(built: dict[str, list[Obj]]) -> None:
    for objs in built.values():
        kafka = _one(objs, "Kafka", k8s.KAFKA_CLUSTER)
        pools = _all(objs, "KafkaNodePool")
        assert all(p["metadata"]["labels"]["strimzi.io/cluster"] == k8s.KAFKA_CLUSTER for p in pools.values())
        assert sum(p["spec"]["replicas"] for p in pools.values() if "broker" in p["spec"]["roles"]) == 3
        assert any("controller" in p["spec"]["roles"] for p in pools.values())
        assert kafka["spec"]["kafka"]["config"]["min.insync.replicas"] == 2
        kafka_topics = {t["spec"]["topicName"]: t for t in _all(objs, "KafkaTopic").values()}
        assert set(kafka_topics) == set(topics())
        for name, topic in kafka_topics.items():
            assert topic["metadata"]["labels"]["strimzi.io/cluster"] == k8s.KAFKA_CLUSTER
            spec = topic["spec"]
            assert spec["partitions"] == DEFAULT_PARTITIONS[name]
            assert spec["replicas"] == 3
            assert spec["config"]["min.insync.replicas"] == 2
            days = 7 if name == INBOX else 30  # events, quarantine, dead letters: as the ledger keeps events
            assert spec["config"]["retention.ms"] == days * 24 * 3600 * 1000, name


# --- the ingress and the network -----------------------------------------------------------------------------


def _bytes(size: str) -> int:
    """An nginx size (``64k``, ``1m``, ``65536``) in bytes."""
    units = {"k": 1024, "m": 1024 * 1024, "g": 1024**3}
    last = size[-1].lower()
    return int(size[:-1]) * units[last] if last in units else int(size)


def test_the_ingress_serves_only_webhooks_with_tls_and_the_apis_body_limit(
    built: dict[str, list[Obj]],
) -> None:
    api = create_api(Settings(database_url="sqlite+aiosqlite:///:memory:"))
    paths = {getattr(r, "path", "") for r in api.routes}
    for overlay, objs in built.items():
        ingress = _one(objs, "Ingress", "ingest-api")
        annotations = ingress["metadata"]["annotations"]
        assert _bytes(annotations["nginx.ingress.kubernetes.io/proxy-body-size"]) == MAX_BODY
        assert annotations["cert-manager.io/cluster-issuer"]
        assert annotations["nginx.ingress.kubernetes.io/enable-access-log"] == "false"  # tokens in the URL
        spec = ingress["spec"]
        assert spec["ingressClassName"] == "nginx"
        hosts = [r["host"] for r in spec["rules"]]
        assert [h for t in spec["tls"] for h in t["hosts"]] == hosts
        assert all(t["secretName"] for t in spec["tls"])
        prefixes = [p["path"] for r in spec["rules"] for p in r["http"]["paths"]]
        assert prefixes == ["/hooks/"], overlay
        exposed = {p for p in paths if any(p.startswith(prefix) for prefix in prefixes)}
        assert exposed == {"/hooks/klientiks/{token}/{event}"}, "only webhooks reach the API from outside"
    assert {
        o["spec"]["rules"][0]["host"] for o in (_one(b, "Ingress", "ingest-api") for b in built.values())
    } == {
        k8s.BASE_HOST,
        k8s.PRODUCTION_HOST,
    }


def _policies_for(objs: list[Obj], labels: dict[str, str], kind: Literal["Ingress", "Egress"]) -> list[Obj]:
    return [
        p
        for p in _all(objs, "NetworkPolicy").values()
        if kind in p["spec"]["policyTypes"]
        and (not p["spec"]["podSelector"] or _matches(p["spec"]["podSelector"]["matchLabels"], labels))
    ]


def _from_namespace(rule: Obj, ns: str) -> bool:
    return any(
        peer.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": ns}
        for peer in rule.get("from", [])
    )


def _egress_ports(policies: list[Obj]) -> set[tuple[str, int | str]]:
    return {
        (port["protocol"], port["port"])
        for p in policies
        for rule in p["spec"].get("egress", [])
        for port in rule.get("ports", [])
    }


def test_network_policies_let_in_only_the_ingress_and_prometheus(built: dict[str, list[Obj]]) -> None:
    for overlay, objs in built.items():
        deny = _one(objs, "NetworkPolicy", "default-deny-ingress")["spec"]
        assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
        for name, dep in _all(objs, "Deployment").items():
            pods = dep["spec"]["template"]["metadata"]["labels"]
            ingress = _policies_for(objs, pods, "Ingress")
            rules = [r for p in ingress for r in p["spec"].get("ingress", [])]
            assert all(r.get("from") for r in rules), f"{name}: a rule open to everyone"
            assert all(p["port"] == "http" for r in rules for p in r["ports"])
            assert any(_from_namespace(r, k8s.PROMETHEUS_NAMESPACE) for r in rules), (
                f"{overlay} {name}: not scraped"
            )
            from_ingress = any(_from_namespace(r, k8s.INGRESS_CONTROLLER_NAMESPACE) for r in rules)
            assert from_ingress == (name == "ingest-api"), name


def test_network_policies_let_out_dns_kafka_postgres_and_each_vendor(built: dict[str, list[Obj]]) -> None:
    for overlay, objs in built.items():
        workloads = [*_all(objs, "Deployment").values(), *_all(objs, "Job").values()]
        for w in workloads:
            name = w["metadata"]["name"]
            egress = _policies_for(objs, w["spec"]["template"]["metadata"]["labels"], "Egress")
            ports = _egress_ports(egress)
            assert {("UDP", 53), ("TCP", 53), ("TCP", 9092), ("TCP", 5432)} <= ports, (overlay, name)
            https = [
                rule
                for p in egress
                for rule in p["spec"]["egress"]
                if {"protocol": "TCP", "port": 443} in rule.get("ports", [])
            ]
            role = next((r for r in roles() if r.name == name), None)
            wants_internet = role is not None and role.kind in ("delivery", "normalizer")
            assert bool(https) == wants_internet, (overlay, name)
            for rule in https:
                (peer,) = rule["to"]
                assert peer["ipBlock"]["cidr"] == "0.0.0.0/0"
                assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"} <= set(peer["ipBlock"]["except"])
        kafka = _one(objs, "Kafka", k8s.KAFKA_CLUSTER)
        (listener,) = kafka["spec"]["kafka"]["listeners"]
        peers = listener["networkPolicyPeers"]
        assert {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "klientiks-relay"}}} in peers
        assert any(
            p.get("namespaceSelector", {}).get("matchLabels")
            == {"kubernetes.io/metadata.name": k8s.KEDA_NAMESPACE}
            for p in peers
        ), "KEDA reads the consumer lag"


# --- the config and its secrets ----------------------------------------------------------------------------


def _deployment_env(objs: list[Obj], secret_values: dict[str, str]) -> dict[str, str]:
    env = {}
    for e in _container(_one(objs, "Deployment", "ingest-api"))["env"]:
        env[e["name"]] = e["value"] if "value" in e else secret_values[e["valueFrom"]["secretKeyRef"]["key"]]
    return env


def _write_config(objs: list[Obj], tmp_path: Path, values: dict[str, str]) -> Path:
    (config_map,) = (c for n, c in _all(objs, "ConfigMap").items() if n.startswith(k8s.CONFIG_MAP))
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    for key, value in values.items():
        (secrets_dir / key).write_text(value)
    path = tmp_path / "relay.yaml"
    path.write_text(config_map["data"]["relay.yaml"].replace(k8s.SECRETS_DIR, str(secrets_dir)))
    return path


def test_the_example_config_loads_with_the_secret_and_the_pods_environment(
    built: dict[str, list[Obj]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objs = built["overlays/production"]
    keys = _secret_template()["stringData"]
    # Every ${file:...} of the config is a key of the Secret.
    config_text = next(c for n, c in _all(objs, "ConfigMap").items() if n.startswith(k8s.CONFIG_MAP))["data"]
    referenced = set(
        re.findall(r"\$\{file:" + re.escape(k8s.SECRETS_DIR) + r"/([^}]+)\}", config_text["relay.yaml"])
    )
    assert referenced == set(keys) - {k8s.DATABASE_URL_KEY}

    values = {k: secrets.token_urlsafe(32) for k in keys} | {
        k8s.DATABASE_URL_KEY: "sqlite+aiosqlite:///:memory:"
    }
    for name, value in _deployment_env(objs, values).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RELAY_CONFIG", str(_write_config(objs, tmp_path, values)))
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == f"{k8s.KAFKA_CLUSTER}-kafka-bootstrap:9092"
    assert settings.kafka.replication_factor == 3
    assert settings.log_format == "json"
    assert settings.database_url == values[k8s.DATABASE_URL_KEY]
    assert targets.check(settings) == []
    (source,) = settings.sources
    assert {c.target for c in source.connections if c.enabled} == set(targets.names())
    for conn in source.connections:
        spec = targets.get(conn.target)
        url = str(getattr(conn, spec.url_key, ""))
        default = spec.connection.model_fields[spec.url_key].default
        if isinstance(default, str):
            assert url == default, f"{conn.target}: the vendor's real URL"


def test_the_secret_templates_placeholders_cannot_run(
    built: dict[str, list[Obj]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objs = built["base"]
    values = _secret_template()["stringData"]
    for name, value in _deployment_env(objs, values).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="relay token"):
        load_settings(_write_config(objs, tmp_path, values))


# --- a new target ------------------------------------------------------------------------------------------


class _ProbeConnection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Literal["probe"]
    name: str
    enabled: bool = True
    events: dict[str, str] = {"client-created": "record"}
    rate_limit_per_s: float | None = None
    base_url: str = "https://api.probe.example"
    api_key: str


@pytest.fixture
def probe_target(monkeypatch: pytest.MonkeyPatch) -> str:
    """A target registered only in this test (the registry is restored after it)."""
    monkeypatch.setattr(targets, "_specs", dict(targets._specs))
    monkeypatch.setattr(config_module, "_REGISTERED", set(config_module._REGISTERED))
    targets.register(
        targets.TargetSpec(
            name="probe",
            title="Probe",
            connection=_ProbeConnection,
            deliverer=lambda *_: None,  # type: ignore[arg-type,return-value]
            port=8099,
            sandbox_secret=("--key-file", "probe-key"),
            demo=lambda url, key: {"target": "probe", "base_url": url, "api_key": key},
        )
    )
    return "probe"


def test_a_new_target_reaches_the_files_with_no_hand_edit(probe_target: str) -> None:
    files = k8s.render()
    objs = [o for o in yaml.safe_load_all(files[f"{k8s.BASE}/roles/probe.yaml"]) if o]
    kinds = {o["kind"]: o for o in objs}
    assert set(kinds) == {"Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget", "ScaledObject"}
    assert _container(kinds["Deployment"])["args"] == ["probe", "--host", "0.0.0.0", "--port", "8099"]
    trigger = kinds["ScaledObject"]["spec"]["triggers"][0]["metadata"]
    assert (trigger["consumerGroup"], trigger["topic"]) == ("relay-probe", EVENTS)
    assert "roles/probe.yaml" in yaml.safe_load(files[f"{k8s.BASE}/kustomization.yaml"])["resources"]
    dlq = [
        t
        for t in yaml.safe_load_all(files[f"{k8s.BASE}/topics.yaml"])
        if t and t["spec"]["topicName"] == "relay.probe.dlq"
    ]
    assert len(dlq) == 1
    policies = {
        p["metadata"]["name"] for p in yaml.safe_load_all(files[f"{k8s.BASE}/networkpolicies.yaml"]) if p
    }
    assert "probe-egress-vendor" in policies
    assert "salon-center-probe-key" in yaml.safe_load(files[k8s.SECRET_TEMPLATE])["stringData"]
    config = yaml.safe_load(files[f"{k8s.BASE}/relay.yaml"])
    probe = [c for c in config["sources"][0]["connections"] if c["target"] == "probe"]
    assert probe == [
        {
            "target": "probe",
            "name": "probe",
            "base_url": "https://api.probe.example",
            "api_key": "${file:/etc/relay/secrets/salon-center-probe-key}",
        }
    ]


def test_an_operators_overlay_replaces_the_example_config(tmp_path: Path) -> None:
    """The README's way to deploy one's own config: the pods mount it (a new hash), not the example."""
    (tmp_path / "relay.yaml").write_text("sources: []\n")
    production = ROOT / k8s.PRODUCTION
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(production, tmp_path)],
                "configMapGenerator": [
                    {"name": k8s.CONFIG_MAP, "behavior": "replace", "files": ["relay.yaml"]}
                ],
            }
        )
    )
    objs = _kustomize(tmp_path)
    (name,) = [n for n in _all(objs, "ConfigMap") if n.startswith(k8s.CONFIG_MAP)]
    assert _all(objs, "ConfigMap")[name]["data"] == {"relay.yaml": "sources: []\n"}
    for w in [*_all(objs, "Deployment").values(), *_all(objs, "Job").values()]:
        volumes = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        assert volumes["config"]["configMap"]["name"] == name

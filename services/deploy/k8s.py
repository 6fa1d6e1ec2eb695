"""The Kubernetes files (``deploy/k8s/``): a kustomize base and the production overlay, generated from the roles.

``render()`` maps each path under the repository root to its text; ``relay deploy render`` writes them and
``--check`` fails on a stale one. Every role of :func:`services.deploy.roles.roles` gets a Deployment, a Service,
a ServiceMonitor, a PodDisruptionBudget and its scaler (an HPA on CPU for the ingest API, a KEDA ``ScaledObject``
on consumer lag for every consumer), so a target added to ``services/common/targets.py`` reaches these files with
no hand edit. ``prometheusrule.yaml`` and ``grafana-dashboards.yaml`` in the base are the observability
renderer's (``services/deploy/observability.py``); the base's kustomization lists them.
"""

from __future__ import annotations

import importlib.metadata
import math
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic_core import PydanticUndefined

from services.common import targets
from services.common.config import DeliverySettings
from services.common.kafka import DEFAULT_PARTITIONS, retention_ms
from services.deploy.roles import IMAGE, METRICS_PATH, Role, roles, topics

ROOT = "deploy/k8s"
BASE = f"{ROOT}/base"
PRODUCTION = f"{ROOT}/overlays/production"
# The observability renderer's files in the base (listed in its kustomization, never written here).
OBSERVABILITY_FILES = ("prometheusrule.yaml", "grafana-dashboards.yaml")
SECRET_TEMPLATE = f"{ROOT}/secrets.example.yaml"

NAMESPACE = "klientiks-relay"
PART_OF = "klientiks-relay"  # app.kubernetes.io/part-of of every object (the kustomization's labels)
APP = "klientiks-relay"  # app.kubernetes.io/name of the relay's own pods: the NetworkPolicies select on it
NAME, COMPONENT = "app.kubernetes.io/name", "app.kubernetes.io/component"
# Applied before the Deployments roll when plain kubectl is used (deploy/k8s/README.md): what the
# migration Job needs, and the Job.
APPLY_FIRST = "klientiks-relay/apply-first"
CONTAINER = "relay"
SERVICE_ACCOUNT = "relay"
CONFIG_MAP = "relay-config"
SECRET = "relay-secrets"  # noqa: S105 - the Secret's name
DATABASE_URL_KEY = "database-url"
CONFIG_DIR = "/etc/relay"
SECRETS_DIR = f"{CONFIG_DIR}/secrets"
CONFIG_FILE = f"{CONFIG_DIR}/relay.yaml"
UID = 10001  # the image's user (Dockerfile)
MIGRATION_JOB = "relay-db-upgrade"

KAFKA_CLUSTER = "relay-kafka"
KAFKA_PORT = 9092
KAFKA_BOOTSTRAP = f"{KAFKA_CLUSTER}-kafka-bootstrap:{KAFKA_PORT}"
# KEDA's operator runs in its own namespace: it needs the bootstrap service's full name.
KAFKA_BOOTSTRAP_FQDN = f"{KAFKA_CLUSTER}-kafka-bootstrap.{NAMESPACE}.svc:{KAFKA_PORT}"
KAFKA_NODE_POOL = "dual"
KAFKA_REPLICAS = 3
MIN_INSYNC_REPLICAS = 2
POSTGRES_PORT = 5432

# Where the cluster's add-ons run (the NetworkPolicies let them in); an overlay patches these if yours differ.
INGRESS_CONTROLLER_NAMESPACE = "ingress-nginx"
PROMETHEUS_NAMESPACE = "monitoring"
KEDA_NAMESPACE = "keda"
INGRESS_CLASS = "nginx"
CLUSTER_ISSUER = "letsencrypt"
INGRESS_TLS_SECRET = "ingest-api-tls"  # noqa: S105 - cert-manager writes it
WEBHOOK_PATH = "/hooks/"
BASE_HOST = "relay.example.com"
PRODUCTION_HOST = "hooks.example.com"  # replace with the host Klientiks posts to
# Egress to vendors and the Klientiks API: HTTPS to the internet, never to cluster or private addresses
# (nor the cloud metadata service).
PRIVATE_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16")

# Shutdown: the ingest API's preStop pause (endpoints leave the ingress first), uvicorn's graceful shutdown
# (`timeout_graceful_shutdown` in services/cli/roles.py serve()), then the runtime's drain
# (`delivery.shutdown_grace_s`); plus a margin before SIGKILL.
PRE_STOP_S = 5
UVICORN_GRACE_S = 20
TERMINATION_GRACE_S = math.ceil(PRE_STOP_S + UVICORN_GRACE_S + DeliverySettings().shutdown_grace_s) + 15

# Requests and limits from the RSS measured in docs/benchmarks.md: ingest API 92 MB and normalizer 99 MB
# (end to end at 200 webhooks/s), a delivery service 135 MB (maxma at ~1,100 deliveries/s, its in-memory
# buffer full). Request ~1.3x the measured RSS, limit 2x the request. One Python event loop uses at most
# about one core: the ingest API 0.3-0.7 ms of CPU per webhook (a core at 1,500-3,000/s), maxma ~95% of a
# core at ~1,100 deliveries/s.
RESOURCES: dict[str, dict[str, dict[str, str]]] = {
    "ingest-api": {"requests": {"cpu": "500m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}},
    "normalizer": {"requests": {"cpu": "250m", "memory": "160Mi"}, "limits": {"cpu": "1", "memory": "320Mi"}},
    "delivery": {"requests": {"cpu": "250m", "memory": "192Mi"}, "limits": {"cpu": "1", "memory": "384Mi"}},
}
PRODUCTION_INGEST_RESOURCES = {
    "requests": {"cpu": "1", "memory": "192Mi"},
    "limits": {"cpu": "1", "memory": "384Mi"},
}
# KEDA adds a replica per this many records of lag (the normalizer is cheap per record; a delivery service
# waits on its vendor).
LAG_THRESHOLD = {"normalizer": 1000, "delivery": 500}
INGEST_HPA = {"base": (2, 6), "production": (3, 12)}  # (min, max) replicas
INGEST_CPU_TARGET = 70  # % of the CPU request

HEADER = "# Generated by `relay deploy render` (services/deploy/k8s.py): edit the generator, not this file.\n"


class _Dumper(yaml.SafeDumper):
    """Block YAML with keys in their given order, no anchors, multi-line strings as literal blocks."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)


def _docs(*objs: dict[str, Any], note: str = "") -> str:
    return HEADER + note + "---\n".join(_yaml(o) for o in objs)


def _version() -> str:
    """The image tag: the project's version (pyproject.toml; the installed package's outside a checkout)."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.exists():
        return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])
    return importlib.metadata.version("klientiks-relay")


def _meta(name: str, component: str | None = None, **extra: Any) -> dict[str, Any]:
    labels = {NAME: APP} | ({COMPONENT: component} if component else {})
    return {"name": name, "labels": labels, **extra}


def _selector(role: Role) -> dict[str, str]:
    return {NAME: APP, COMPONENT: role.name}


def _body_size() -> str:
    """The ingest API's webhook body limit in nginx's notation (``64k`` is 65,536 bytes)."""
    from services.ingest.api import MAX_BODY

    return f"{MAX_BODY // 1024}k" if MAX_BODY % 1024 == 0 else str(MAX_BODY)


def partitions(topic: str) -> int:
    """A topic's partition count (services/common/kafka.py; a topic it does not name has one)."""
    return DEFAULT_PARTITIONS.get(topic, 1)


# --- the config and its secrets ----------------------------------------------------------------------------

SOURCE = "salon-center"


def _secret_ref(key: str) -> str:
    return f"${{file:{SECRETS_DIR}/{key}}}"


def _connection(name: str) -> tuple[dict[str, Any], str, str | None]:
    """(the example connection, its secret's key, a note) of one target: its demo connection with the vendor's
    real URL (the connection model's default)."""
    spec = targets.get(name)
    key = f"{SOURCE}-{spec.sandbox_secret[1] if spec.sandbox_secret else f'{name}-key'}"
    field = spec.connection.model_fields.get(spec.url_key)
    default = field.default if field is not None else PydanticUndefined
    real = default if isinstance(default, str) and default.startswith("https://") else None
    note = None
    if spec.demo is None:
        conn: dict[str, Any] = {"target": name, "enabled": False}
        note = f"{name}: no example connection (its TargetSpec has no `demo`): see docs/configuration.md"
    else:
        conn = dict(spec.demo(real or f"https://{name}.invalid", _secret_ref(key)))
        if real:
            conn[spec.url_key] = real
        else:
            note = f"{name}: `{spec.url_key}` has no default: copy yours from {spec.title} (the host is a placeholder)"
    return {"target": conn.pop("target", name), "name": name, **conn}, key, note


def secret_keys() -> dict[str, str]:
    """Every key of the ``relay-secrets`` Secret -> its placeholder (refused by `relay config check` where the
    relay validates the value, so a template applied unchanged cannot run)."""
    keys = {
        DATABASE_URL_KEY: "postgresql+asyncpg://relay:<password>@<postgres-host>:5432/relay",
        "phone-hash-key": "<replace: relay token>",
        f"{SOURCE}-token": "<replace: relay token>",
        f"{SOURCE}-klientiks-token": "<replace: the Klientiks API access token>",
    }
    for name in targets.names():
        _, key, _ = _connection(name)
        keys[key] = f"<replace: the {targets.get(name).title} credential>"
    return keys


def config_yaml() -> str:
    """The example ``relay.yaml`` of the ConfigMap: one source with a connection to every target."""
    connections, notes = [], []
    for name in targets.names():
        conn, _, note = _connection(name)
        connections.append(conn)
        if note:
            notes.append(note)
    config = {
        # A topic a role creates at start is replicated as the KafkaTopics are (Strimzi's topic operator
        # cannot change a topic's replication factor afterwards).
        "kafka": {"replication_factor": KAFKA_REPLICAS},
        # Above ingress-nginx's upstream keep-alive (60 s): the API never closes a connection nginx reuses.
        "ingest": {"keepalive_timeout_s": 75},
        "phone_hash_key": _secret_ref("phone-hash-key"),
        "sources": [
            {
                "name": SOURCE,
                "token": _secret_ref(f"{SOURCE}-token"),
                "timezone": "Europe/Moscow",
                "phone_region": "RU",
                "klientiks": {
                    "account_id": "21947",
                    "user_id": "1",
                    "access_token": _secret_ref(f"{SOURCE}-klientiks-token"),
                },
                "connections": connections,
            }
        ],
    }
    lines = [
        "# An example config (docs/configuration.md): replace it in your overlay (deploy/k8s/README.md).",
        f"# Secrets are files of the `{SECRET}` Secret mounted at {SECRETS_DIR} (deploy/k8s/secrets.example.yaml).",
        "# The pods set RELAY_DATABASE_URL, RELAY_KAFKA__BOOTSTRAP_SERVERS and RELAY_LOG_FORMAT, which win over",
        "# this file. A connection's other keys are its demo's (`relay run`): use your account's.",
        *(f"# {n}" for n in notes),
    ]
    return HEADER + "\n".join(lines) + "\n" + _yaml(config)


def secret_template() -> str:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(SECRET, "config", namespace=NAMESPACE),
        "type": "Opaque",
        "stringData": secret_keys(),
    }
    note = (
        "# The credentials: fill in every value and apply it once, before the kustomization\n"
        f"# (`kubectl apply -n {NAMESPACE} -f secrets.example.yaml`), or create the same keys with\n"
        "# `kubectl create secret generic` / your secret manager. Not listed in the kustomization, so its\n"
        "# placeholders can never overwrite the real values.\n"
    )
    return _docs(secret, note=note)


# --- per role ----------------------------------------------------------------------------------------------


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _env() -> list[dict[str, Any]]:
    return [
        {"name": "RELAY_CONFIG", "value": CONFIG_FILE},
        {
            "name": "RELAY_DATABASE_URL",
            "valueFrom": {"secretKeyRef": {"name": SECRET, "key": DATABASE_URL_KEY}},
        },
        {"name": "RELAY_KAFKA__BOOTSTRAP_SERVERS", "value": KAFKA_BOOTSTRAP},
        {"name": "RELAY_LOG_FORMAT", "value": "json"},
    ]


def _mounts() -> list[dict[str, Any]]:
    return [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "secrets", "mountPath": SECRETS_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - the emptyDir of a read-only root filesystem
    ]


def _volumes() -> list[dict[str, Any]]:
    return [
        {"name": "config", "configMap": {"name": CONFIG_MAP}},
        {"name": "secrets", "secret": {"secretName": SECRET, "defaultMode": 0o440}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]


def _pod_spec(containers: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "serviceAccountName": SERVICE_ACCOUNT,
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        **extra,
        "containers": containers,
        "volumes": _volumes(),
    }


def _probe(path: str, period: int, failures: int, timeout: int = 2) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def deployment(role: Role) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": IMAGE,  # the tag comes from the kustomization's `images:`
        "imagePullPolicy": "IfNotPresent",
        "args": [*role.args, "--host", "0.0.0.0", "--port", str(role.port)],  # noqa: S104
        "ports": [{"name": "http", "containerPort": role.port, "protocol": "TCP"}],
        "env": _env(),
        # Start-up waits for Kafka and the database (topics ensured, consumer group joined): up to 150 s.
        "startupProbe": _probe("/healthz", 5, 30),
        "livenessProbe": _probe("/healthz", 10, 3),
        # 503 while Kafka or the database is unreachable, or a consumer has stalled.
        "readinessProbe": _probe("/readyz", 5, 3, timeout=3),
        "resources": RESOURCES[role.kind],
        "securityContext": _container_security(),
        "volumeMounts": _mounts(),
    }
    if role.kind == "ingest-api":
        # Let the ingress controller drop this pod from its upstreams before uvicorn stops accepting.
        container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", str(PRE_STOP_S)]}}}
    spread = [
        {
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": _selector(role)},
        }
        for key in ("topology.kubernetes.io/zone", "kubernetes.io/hostname")
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(role.name, role.name),
        "spec": {
            # No `replicas`: the HPA or KEDA owns it (an apply would reset it).
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": _selector(role)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": _selector(role)},
                "spec": _pod_spec(
                    [container],
                    terminationGracePeriodSeconds=TERMINATION_GRACE_S,
                    topologySpreadConstraints=spread,
                ),
            },
        },
    }


def service(role: Role) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(role.name, role.name),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(role),
            "ports": [{"name": "http", "port": role.port, "targetPort": "http", "protocol": "TCP"}],
            # No client calls a consumer: its Service is for Prometheus, which must keep scraping a pod that
            # is not ready (a stalled consumer is when its metrics matter). The ingest API's stays ready-only.
            "publishNotReadyAddresses": role.group is not None,
        },
    }


def service_monitor(role: Role) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(role.name, role.name),
        "spec": {
            "selector": {"matchLabels": _selector(role)},
            "endpoints": [{"port": "http", "path": METRICS_PATH, "interval": "30s", "scrapeTimeout": "10s"}],
        },
    }


def pdb(role: Role) -> dict[str, Any]:
    # The ingest API runs at least two replicas (its HPA) and keeps one; a consumer may run one, which a
    # drain may stop (its records wait in Kafka).
    budget = {"minAvailable": 1} if role.kind == "ingest-api" else {"maxUnavailable": 1}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(role.name, role.name),
        "spec": {**budget, "selector": {"matchLabels": _selector(role)}},
    }


def hpa(role: Role) -> dict[str, Any]:
    low, high = INGEST_HPA["base"]
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(role.name, role.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": role.name},
            "minReplicas": low,
            "maxReplicas": high,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": INGEST_CPU_TARGET},
                    },
                }
            ],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }


def scaled_object(role: Role) -> dict[str, Any]:
    assert role.topic is not None
    assert role.group is not None
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _meta(role.name, role.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": role.name},
            "minReplicaCount": 1,
            # A consumer past the topic's partition count would get none.
            "maxReplicaCount": partitions(role.topic),
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}
                }
            },
            "triggers": [
                {
                    "type": "kafka",
                    "metadata": {
                        "bootstrapServers": KAFKA_BOOTSTRAP_FQDN,
                        "consumerGroup": role.group,
                        "topic": role.topic,
                        "lagThreshold": str(LAG_THRESHOLD[role.kind]),
                        "offsetResetPolicy": "earliest",  # as the relay's consumers
                        "allowIdleConsumers": "false",
                    },
                }
            ],
        },
    }


def role_file(role: Role) -> str:
    scaler = hpa(role) if role.group is None else scaled_object(role)
    return _docs(deployment(role), service(role), service_monitor(role), pdb(role), scaler)


# --- shared objects ----------------------------------------------------------------------------------------


def namespace() -> str:
    ns = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": {APPLY_FIRST: "true"}, "annotations": _wave(-2)},
    }
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(SERVICE_ACCOUNT, "config", annotations=_wave(-2)) | {"labels": _first("config")},
        "automountServiceAccountToken": False,
    }
    return _docs(ns, account)


def _wave(n: int) -> dict[str, str]:
    return {"argocd.argoproj.io/sync-wave": str(n)}


def _first(component: str) -> dict[str, str]:
    return {NAME: APP, COMPONENT: component, APPLY_FIRST: "true"}


def ingress() -> str:
    api = next(r for r in roles() if r.kind == "ingest-api")
    obj = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": _meta(
            api.name,
            api.name,
            annotations={
                "cert-manager.io/cluster-issuer": CLUSTER_ISSUER,
                # The API refuses a larger body (413); nginx refuses it first, without buffering it.
                "nginx.ingress.kubernetes.io/proxy-body-size": _body_size(),
                # The webhook URL carries the source's token: no access log (the API keeps none either).
                "nginx.ingress.kubernetes.io/enable-access-log": "false",
                "nginx.ingress.kubernetes.io/force-ssl-redirect": "true",
            },
        ),
        "spec": {
            "ingressClassName": INGRESS_CLASS,
            "tls": [{"hosts": [BASE_HOST], "secretName": INGRESS_TLS_SECRET}],
            "rules": [
                {
                    "host": BASE_HOST,
                    "http": {
                        "paths": [
                            {
                                "path": WEBHOOK_PATH,
                                "pathType": "Prefix",
                                "backend": {"service": {"name": api.name, "port": {"name": "http"}}},
                            }
                        ]
                    },
                }
            ],
        },
    }
    return _docs(obj)


def _policy(name: str, selector: dict[str, str], **spec: Any) -> dict[str, Any]:
    types = [t for t in ("Ingress", "Egress") if t.lower() in spec]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(name),
        "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": types, **spec},
    }


def _in_namespace(ns: str, pods: dict[str, str] | None = None) -> dict[str, Any]:
    peer: dict[str, Any] = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
    if pods:
        peer["podSelector"] = {"matchLabels": pods}
    return peer


def _internet_https() -> dict[str, Any]:
    return {
        "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": list(PRIVATE_RANGES)}}],
        "ports": [{"protocol": "TCP", "port": 443}],
    }


def network_policies() -> str:
    relay = {NAME: APP}
    api = next(r for r in roles() if r.kind == "ingest-api")
    policies = [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "default-deny-ingress"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
        },
        _policy(
            "ingest-api-from-ingress-controller",
            _selector(api),
            ingress=[
                {
                    "from": [_in_namespace(INGRESS_CONTROLLER_NAMESPACE)],
                    "ports": [{"protocol": "TCP", "port": "http"}],
                }
            ],
        ),
        # Every role names its port `http` (metrics, health and, for the API, webhooks).
        _policy(
            "relay-metrics-from-prometheus",
            relay,
            ingress=[
                {
                    "from": [_in_namespace(PROMETHEUS_NAMESPACE)],
                    "ports": [{"protocol": "TCP", "port": "http"}],
                }
            ],
        ),
        _policy(
            "relay-egress",
            relay,
            egress=[
                {
                    "to": [_in_namespace("kube-system", {"k8s-app": "kube-dns"})],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                },
                {
                    "to": [{"podSelector": {"matchLabels": {"strimzi.io/cluster": KAFKA_CLUSTER}}}],
                    "ports": [{"protocol": "TCP", "port": KAFKA_PORT}],
                },
                # The database may live anywhere (a managed service, another namespace): narrow it in an overlay.
                {"ports": [{"protocol": "TCP", "port": POSTGRES_PORT}]},
            ],
        ),
    ]
    for role in roles():
        if role.kind == "normalizer":
            policies.append(
                _policy("normalizer-egress-klientiks-api", _selector(role), egress=[_internet_https()])
            )
        elif role.kind == "delivery":
            policies.append(
                _policy(f"{role.name}-egress-vendor", _selector(role), egress=[_internet_https()])
            )
    return _docs(*policies)


def kafka() -> str:
    cluster = {
        "apiVersion": "kafka.strimzi.io/v1beta2",
        "kind": "Kafka",
        "metadata": {
            "name": KAFKA_CLUSTER,
            "annotations": {"strimzi.io/kraft": "enabled", "strimzi.io/node-pools": "enabled"},
        },
        "spec": {
            "kafka": {
                "listeners": [
                    {
                        "name": "plain",
                        "port": KAFKA_PORT,
                        "type": "internal",
                        "tls": False,
                        # Strimzi's NetworkPolicy for the listener: the relay's pods, and KEDA reading lag.
                        "networkPolicyPeers": [
                            {"podSelector": {"matchLabels": {NAME: APP}}},
                            _in_namespace(KEDA_NAMESPACE),
                        ],
                    }
                ],
                "config": {
                    "default.replication.factor": KAFKA_REPLICAS,
                    "min.insync.replicas": MIN_INSYNC_REPLICAS,
                    "offsets.topic.replication.factor": KAFKA_REPLICAS,
                    "transaction.state.log.replication.factor": KAFKA_REPLICAS,
                    "transaction.state.log.min.isr": MIN_INSYNC_REPLICAS,
                    "auto.create.topics.enable": False,
                },
            },
            "entityOperator": {"topicOperator": {}},
        },
    }
    pool = {
        "apiVersion": "kafka.strimzi.io/v1beta2",
        "kind": "KafkaNodePool",
        "metadata": {"name": KAFKA_NODE_POOL, "labels": {"strimzi.io/cluster": KAFKA_CLUSTER}},
        "spec": {
            "replicas": KAFKA_REPLICAS,
            "roles": ["controller", "broker"],
            "storage": {
                "type": "jbod",
                "volumes": [
                    {
                        "id": 0,
                        "type": "persistent-claim",
                        "size": "20Gi",
                        "deleteClaim": False,
                        "kraftMetadata": "shared",
                    }
                ],
            },
            "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        },
    }
    return _docs(cluster, pool)


def kafka_topic(topic: str) -> dict[str, Any]:
    return {
        "apiVersion": "kafka.strimzi.io/v1beta2",
        "kind": "KafkaTopic",
        "metadata": {"name": topic, "labels": {"strimzi.io/cluster": KAFKA_CLUSTER}},
        "spec": {
            "topicName": topic,
            "partitions": partitions(topic),
            "replicas": KAFKA_REPLICAS,
            "config": {
                "retention.ms": retention_ms(topic),  # matched to the ledger's (docs/operations.md)
                "min.insync.replicas": MIN_INSYNC_REPLICAS,
                "cleanup.policy": "delete",
            },
        },
    }


def migration_job() -> str:
    container = {
        "name": CONTAINER,
        "image": IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "args": ["db", "upgrade"],
        "env": _env(),
        "resources": RESOURCES["delivery"],
        "securityContext": _container_security(),
        "volumeMounts": _mounts(),
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(
            MIGRATION_JOB,
            annotations={
                # Argo CD: run it on every sync, after the config (wave -2) and before the Deployments (wave 0),
                # and wait for it to complete. Plain kubectl: deploy/k8s/README.md.
                "argocd.argoproj.io/hook": "Sync",
                "argocd.argoproj.io/hook-delete-policy": "BeforeHookCreation",
                "argocd.argoproj.io/sync-wave": "-1",
            },
        )
        | {"labels": _first("db-upgrade")},
        "spec": {
            "backoffLimit": 3,
            "activeDeadlineSeconds": 600,
            "template": {
                "metadata": {"labels": {NAME: APP, COMPONENT: "db-upgrade"}},
                "spec": _pod_spec([container], restartPolicy="Never"),
            },
        },
    }
    return _docs(job)


# --- kustomizations and the README -------------------------------------------------------------------------


def base_kustomization() -> str:
    resources = [
        "namespace.yaml",
        *(f"roles/{r.name}.yaml" for r in roles()),
        "ingress.yaml",
        "networkpolicies.yaml",
        "kafka.yaml",
        "topics.yaml",
        "migration-job.yaml",
        *OBSERVABILITY_FILES,
    ]
    data = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": NAMESPACE,
        "labels": [
            {
                "pairs": {"app.kubernetes.io/part-of": PART_OF},
                "includeSelectors": False,
                "includeTemplates": True,
            }
        ],
        "resources": resources,
        # A config change gets a new name (hash suffix), so the Deployments roll.
        "configMapGenerator": [
            {
                "name": CONFIG_MAP,
                "files": ["relay.yaml"],
                "options": {"labels": _first("config"), "annotations": _wave(-2)},
            }
        ],
        "images": [{"name": IMAGE, "newTag": _version()}],
    }
    return HEADER + _yaml(data)


def production_kustomization() -> str:
    api = next(r for r in roles() if r.kind == "ingest-api")
    low, high = INGEST_HPA["production"]

    def ops(*items: tuple[str, str, Any]) -> str:
        return _yaml([{"op": op, "path": path, "value": value} for op, path, value in items])

    resources_patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": api.name},
        "spec": {
            "template": {
                "spec": {"containers": [{"name": CONTAINER, "resources": PRODUCTION_INGEST_RESOURCES}]}
            }
        },
    }
    data = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["../../base"],
        "images": [{"name": IMAGE, "newTag": _version()}],
        "patches": [
            {
                "target": {"kind": "Ingress", "name": api.name},
                "patch": ops(
                    ("replace", "/spec/rules/0/host", PRODUCTION_HOST),
                    ("replace", "/spec/tls/0/hosts/0", PRODUCTION_HOST),
                ),
            },
            {
                "target": {"kind": "HorizontalPodAutoscaler", "name": api.name},
                "patch": ops(("replace", "/spec/minReplicas", low), ("replace", "/spec/maxReplicas", high)),
            },
            {
                "target": {"kind": "PodDisruptionBudget", "name": api.name},
                "patch": ops(("replace", "/spec/minAvailable", 2)),
            },
            {"target": {"kind": "Deployment", "name": api.name}, "patch": _yaml(resources_patch)},
            {
                "target": {"kind": "KafkaNodePool", "name": KAFKA_NODE_POOL},
                "patch": ops(
                    ("replace", "/spec/storage/volumes/0/size", "100Gi"),
                    (
                        "replace",
                        "/spec/resources",
                        {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
                    ),
                ),
            },
        ],
    }
    return HEADER + _yaml(data)


def readme() -> str:
    consumers = [r for r in roles() if r.group is not None]
    scaling = "\n".join(
        f"| `{r.name}` | `{r.group}` | `{r.topic}` | {partitions(r.topic or '')} |" for r in consumers
    )
    base_low, base_high = INGEST_HPA["base"]
    prod_low, prod_high = INGEST_HPA["production"]
    grace = f"{DeliverySettings().shutdown_grace_s:g}"
    return f"""<!-- Generated by `relay deploy render` (services/deploy/k8s.py): edit the generator, not this file. -->
# Kubernetes

`base/` deploys every role of the relay into the namespace `{NAMESPACE}` with kustomize;
`overlays/production/` sets the image tag, the ingress host, replicas and resources. The files are generated
from the code (`relay deploy render`; `relay deploy render --check` and `tests/deploy/test_k8s.py` fail on a
stale one): a target added to `services/common/targets.py` gets its Deployment, Service, ServiceMonitor,
PodDisruptionBudget, ScaledObject, egress NetworkPolicy, dead-letter KafkaTopic, example connection and
Secret key with no hand edit. `base/prometheusrule.yaml` and `base/grafana-dashboards.yaml` come from
`services/deploy/observability.py`.

## Prerequisites

- Strimzi with KRaft and node pools (the `Kafka` sets no `spec.kafka.version`, so the operator's default
  runs: pin it in an overlay), and its generated NetworkPolicies left on: the listener admits only the
  relay's pods and KEDA.
- KEDA in the namespace `{KEDA_NAMESPACE}`; it reads the lag at `{KAFKA_BOOTSTRAP_FQDN}` (change that with the
  namespace).
- The Prometheus Operator, Prometheus in `{PROMETHEUS_NAMESPACE}`. If it selects ServiceMonitors and rules by
  label (kube-prometheus-stack: `release: <name>`), add that label in an overlay.
- ingress-nginx (class `{INGRESS_CLASS}`, namespace `{INGRESS_CONTROLLER_NAMESPACE}`), cert-manager with a
  ClusterIssuer `{CLUSTER_ISSUER}`, Grafana's dashboard sidecar watching this namespace.
- PostgreSQL for the ledger. The egress policy allows port {POSTGRES_PORT} anywhere: narrow it in an overlay.
- The Secret `{SECRET}` with every key of `secrets.example.yaml`: the database URL (`RELAY_DATABASE_URL`),
  the phone index key, each source's token and Klientiks API token, each connection's credential. It is not
  part of the kustomization, so its placeholders can never overwrite real values. Pods mount it read-only at
  `{SECRETS_DIR}`; the config refers to its files as `${{file:...}}`.
- Your config. `base/relay.yaml` is an example (one source, a connection to every target); the ConfigMap
  `{CONFIG_MAP}` is mounted at `{CONFIG_DIR}` and renamed by its hash, so a change rolls the pods. Replace
  it in your overlay, beside your `relay.yaml`:
  `configMapGenerator: [{{name: {CONFIG_MAP}, behavior: replace, files: [relay.yaml]}}]`.

The NetworkPolicies deny all ingress in the namespace except: the ingress controller's namespace to the
ingest API, Prometheus to every role's `http` port. The relay's pods may reach DNS, Kafka and PostgreSQL;
the normalizer (Klientiks API) and each delivery service (its vendor) also HTTPS on the internet, never
private ranges.

## Deploying

Migrations run before the Deployments roll. With Argo CD the Job `{MIGRATION_JOB}` is a `Sync` hook in wave
-1 (namespace, service account and config in wave -2, the rest in wave 0): Argo CD waits for it to complete.
With plain kubectl, apply what is labelled `{APPLY_FIRST}=true` (namespace, service account, config, the
Job), wait for the Job, then apply everything:

```sh
kubectl create namespace {NAMESPACE}            # first install: then create the Secret
kubectl apply -n {NAMESPACE} -f my-secrets.yaml   # your filled-in copy of secrets.example.yaml

kubectl kustomize deploy/k8s/overlays/production > relay.yaml
kubectl delete job {MIGRATION_JOB} -n {NAMESPACE} --ignore-not-found   # a Job's template cannot change
kubectl apply -f relay.yaml -l {APPLY_FIRST}=true
kubectl wait -n {NAMESPACE} --for=condition=complete job/{MIGRATION_JOB} --timeout=10m
kubectl apply -f relay.yaml
```

The Job loads the whole config, so a config error stops the release before any pod rolls. On the first
install the Kafka cluster takes minutes; the roles wait for it (their startup probes allow 150 s, then the
pod restarts and waits again).

## Scaling

The ingest API scales on CPU ({INGEST_CPU_TARGET}% of its request; {base_low}-{base_high} replicas in the base,
{prod_low}-{prod_high} in production). Each consumer scales on its group's lag (KEDA), never past its topic's
partitions:

| role | consumer group | topic | max replicas |
|---|---|---|---|
{scaling}

Rate limits are per process: a source's webhook limit (`ingest.rate_limit_per_s`), its Klientiks API limit
(`klientiks.rate_limit_per_s`) and a connection's (`rate_limit_per_s`) hold for each replica, so N replicas
may send N times as much. Set them for the replicas you allow, or lower a ScaledObject's `maxReplicaCount`.

## Shutdown

`terminationGracePeriodSeconds` is {TERMINATION_GRACE_S} s: the ingest API's preStop pause ({PRE_STOP_S} s),
uvicorn's graceful shutdown ({UVICORN_GRACE_S} s), then the runtime's drain (`delivery.shutdown_grace_s`,
{grace} s), and a margin.
"""


def render() -> dict[str, str]:
    """Every file of ``deploy/k8s/``: path (relative to the repository root) -> text."""
    out = {
        f"{BASE}/kustomization.yaml": base_kustomization(),
        f"{BASE}/namespace.yaml": namespace(),
        f"{BASE}/relay.yaml": config_yaml(),
        f"{BASE}/ingress.yaml": ingress(),
        f"{BASE}/networkpolicies.yaml": network_policies(),
        f"{BASE}/kafka.yaml": kafka(),
        f"{BASE}/topics.yaml": _docs(*(kafka_topic(t) for t in topics())),
        f"{BASE}/migration-job.yaml": migration_job(),
        f"{PRODUCTION}/kustomization.yaml": production_kustomization(),
        SECRET_TEMPLATE: secret_template(),
        f"{ROOT}/README.md": readme(),
    }
    for role in roles():
        out[f"{BASE}/roles/{role.name}.yaml"] = role_file(role)
    return out
